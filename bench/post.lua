-- wrk script for bench/run post: every request a POST with a 1 KiB body (form posts, API writes).
wrk.method = "POST"
wrk.body = string.rep("p", 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
