#!/usr/bin/env python3
"""Steady login load for bench/run login: POSTs the login form at a fixed rate (default 20/s).

Usage: login_load.py PORT CSRF_COOKIE CSRF_TOKEN USER PASSWORD SECONDS [RATE]
Each login runs in its own thread (so a slow login does not delay the next tick); prints a one-line summary:
  sent=N ok=N other=N rate=R/s p50_ms=X p99_ms=Y
"""
import http.client, sys, threading, time, urllib.parse

port, cookie, token, user, password, seconds = sys.argv[1:7]
rate = float(sys.argv[7]) if len(sys.argv) > 7 else 20.0
seconds = float(seconds)
body = urllib.parse.urlencode({"csrf": token, "rd": "/", "username": user, "password": password})
headers = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie, "Host": f"127.0.0.1:{port}"}
lock = threading.Lock()
lat, statuses = [], {}

def one():
    t0 = time.perf_counter()
    try:
        c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
        c.request("POST", "/_portcullis/login", body=body, headers=headers)
        r = c.getresponse(); r.read(); c.close(); st = r.status
    except Exception:
        st = 0
    dt = (time.perf_counter() - t0) * 1000
    with lock:
        lat.append(dt); statuses[st] = statuses.get(st, 0) + 1

threads, start, n = [], time.perf_counter(), 0
while True:
    due = start + n / rate
    if due - start >= seconds:
        break
    now = time.perf_counter()
    if due > now:
        time.sleep(due - now)
    t = threading.Thread(target=one, daemon=True); t.start(); threads.append(t); n += 1
for t in threads:
    t.join(35)
elapsed = time.perf_counter() - start
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
ok = statuses.get(303, 0)
print(f"sent={n} ok={ok} other={n - ok} statuses={statuses} rate={n / elapsed:.1f}/s "
      f"p50_ms={q(0.50):.1f} p99_ms={q(0.99):.1f}")
