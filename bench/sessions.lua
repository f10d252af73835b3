-- wrk script for bench/run sessions: each request carries the next session cookie from COOKIES_FILE, in turn
-- (each wrk thread starts at its own offset), so consecutive requests on a connection belong to different users.
local cookies = {}
local n = 0

function init(args)
  local path = os.getenv("COOKIES_FILE")
  for line in io.lines(path) do
    if #line > 0 then cookies[#cookies + 1] = line end
  end
  if #cookies == 0 then error("no cookies in " .. tostring(path)) end
  n = math.random(#cookies)
end

function request()
  n = n % #cookies + 1
  return wrk.format("GET", "/", { ["Cookie"] = cookies[n] })
end
