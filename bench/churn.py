#!/usr/bin/env python3
"""Log one user in and out once a second for SECONDS: the revocations a real deployment sees while it serves.

Usage: churn.py PORT USER PASSWORD SECONDS
Each cycle: GET /_portcullis/login (CSRF cookie and token), POST it (303 and a session cookie), one proxied
GET / with the session (so it is cached like a working user's), GET /_portcullis/logout (the form's CSRF token),
POST it (303). Prints "cycles N failed M" to stdout; exits 1 if no cycle completed.
"""
import http.client, re, sys, time, urllib.parse

port, user, password, seconds = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
host = f"127.0.0.1:{port}"


def cookie_of(resp, name):
    for k, v in resp.getheaders():
        if k.lower() == "set-cookie" and v.startswith(name + "="):
            return v.split(";", 1)[0]
    return None


def csrf_in(page):
    m = re.search(r'name="csrf" value="([^"]*)"', page)
    return m.group(1) if m else None


def cycle():
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/_portcullis/login", headers={"Host": host})
    r = c.getresponse()
    token, csrf_cookie = csrf_in(r.read().decode()), cookie_of(r, "portcullis_session_csrf")
    body = urllib.parse.urlencode({"csrf": token, "rd": "/", "username": user, "password": password})
    c.request("POST", "/_portcullis/login", body=body,
              headers={"Host": host, "Cookie": csrf_cookie, "Content-Type": "application/x-www-form-urlencoded"})
    r = c.getresponse()
    r.read()
    session = cookie_of(r, "portcullis_session")
    if r.status != 303 or not session:
        raise RuntimeError(f"login answered {r.status}")
    c.request("GET", "/", headers={"Host": host, "Cookie": session})
    r = c.getresponse()
    r.read()
    c.request("GET", "/_portcullis/logout", headers={"Host": host, "Cookie": session, "Accept": "text/html"})
    r = c.getresponse()
    token = csrf_in(r.read().decode())
    c.request("POST", "/_portcullis/logout", body=urllib.parse.urlencode({"csrf": token}),
              headers={"Host": host, "Cookie": session, "Content-Type": "application/x-www-form-urlencoded"})
    r = c.getresponse()
    r.read()
    c.close()
    if r.status != 303:
        raise RuntimeError(f"logout answered {r.status}")


done = failed = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    start = time.monotonic()
    try:
        cycle()
        done += 1
    except Exception as e:  # noqa: BLE001 - counted and reported
        failed += 1
        print(f"churn cycle failed: {e}", file=sys.stderr)
    time.sleep(max(0.0, 1.0 - (time.monotonic() - start)))
print(f"cycles {done} failed {failed}")
sys.exit(0 if done > 0 else 1)
