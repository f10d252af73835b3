#!/usr/bin/env python3
"""Log in once as each of USERS (name PREFIX0..PREFIX{N-1}, one password) and print one Cookie header value per
line: the session cookies for bench/run sessions and logins.

Usage: login_many.py PORT PREFIX COUNT PASSWORD [PARALLEL] [USERS]
With USERS = 1 every login is as PREFIX itself (COUNT sessions of one user); otherwise login i is as
PREFIX{i % USERS} (USERS defaults to COUNT).
Each login is GET /_portcullis/login (CSRF cookie and token) then POST the form, expecting 303. Prints to stdout;
a summary (ok, elapsed, p50/p99 of the POST) to stderr; exits 1 if any login failed.
"""
import http.client, re, sys, threading, time, urllib.parse

port, prefix, count, password = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
parallel = int(sys.argv[5]) if len(sys.argv) > 5 else 4
users = int(sys.argv[6]) if len(sys.argv) > 6 else count
name_of = (lambda i: prefix) if users == 1 else (lambda i: f"{prefix}{i % users}")
host = f"127.0.0.1:{port}"
cookies, lat, failed = [None] * count, [], []
lock = threading.Lock()


def cookie_of(resp, name):
    for k, v in resp.getheaders():
        if k.lower() == "set-cookie" and v.startswith(name + "="):
            return v.split(";", 1)[0]
    return None


def login(i):
    c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=60)
    c.request("GET", "/_portcullis/login", headers={"Host": host})
    r = c.getresponse()
    page = r.read().decode()
    csrf_cookie = cookie_of(r, "portcullis_session_csrf")
    m = re.search(r'name="csrf" value="([^"]*)"', page)
    if not (csrf_cookie and m):
        raise RuntimeError(f"login page without a CSRF token (status {r.status})")
    body = urllib.parse.urlencode({"csrf": m.group(1), "rd": "/", "username": name_of(i), "password": password})
    t0 = time.perf_counter()
    c.request("POST", "/_portcullis/login", body=body, headers={
        "Host": host, "Cookie": csrf_cookie, "Content-Type": "application/x-www-form-urlencoded"})
    r = c.getresponse()
    r.read()
    dt = (time.perf_counter() - t0) * 1000
    session = cookie_of(r, "portcullis_session")
    c.close()
    if r.status != 303 or not session:
        raise RuntimeError(f"login as {name_of(i)} answered {r.status}")
    with lock:
        lat.append(dt)
    cookies[i] = session


def worker(k):
    for i in range(k, count, parallel):
        try:
            login(i)
        except Exception as e:  # noqa: BLE001 - reported and counted
            with lock:
                failed.append(f"{name_of(i)}: {e}")


start = time.perf_counter()
threads = [threading.Thread(target=worker, args=(k,)) for k in range(parallel)]
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.perf_counter() - start
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
for c in cookies:
    if c:
        print(c)
print(f"logins ok={len(lat)} failed={len(failed)} in {elapsed:.1f}s, POST p50_ms={q(0.5):.1f} p99_ms={q(0.99):.1f}",
      file=sys.stderr)
for f in failed[:5]:
    print("  " + f, file=sys.stderr)
sys.exit(1 if failed else 0)
