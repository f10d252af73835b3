//! Path normalisation: deny and bypass rules can't be dodged by encodings, dot segments or Windows path rules.

use super::*;

// =============================================================================================
// Path normalisation
// =============================================================================================

/// Is `path` (as received upstream) a normalised path under /public/?
fn clean_public(path: &str) -> bool {
    let p = path.split('?').next().unwrap();
    if !p.starts_with("/public/") || p.contains('\\') || p.chars().any(|c| c.is_control() || c == '\u{fffd}') {
        return false;
    }
    let l = p.to_ascii_lowercase();
    if ["%2f", "%5c", "%2e", "%00", "%c0", "%e0", "%25", "%u"].iter().any(|x| l.contains(x)) {
        return false;
    }
    let segs: Vec<&str> = p[1..].split('/').collect();
    segs.iter().enumerate().all(|(i, s)| {
        let bare = s.split(';').next().unwrap();
        bare != "." && bare != ".." && !(s.is_empty() && i + 1 != segs.len())
    })
}

/// What a lenient upstream (Tomcat/Jetty/Spring-like) would make of a path: decode twice (overlong UTF-8 dots too),
/// `\` as `/`, drop `;params` (path parameters), resolve dots, merge slashes, lower-case.
fn lenient(path: &str) -> String {
    let p = path.split('?').next().unwrap();
    let mut d = p.to_string();
    for _ in 0..2 {
        d = percent_encoding::percent_decode_str(&d).decode_utf8_lossy().into_owned();
    }
    let d = d.replace("\u{fffd}\u{fffd}", ".").replace('\\', "/").to_ascii_lowercase();
    let mut out: Vec<String> = Vec::new();
    for seg in d.split('/') {
        let bare = seg.split(';').next().unwrap();
        match (seg.split(';').next().unwrap(), bare) {
            ("", _) | (".", _) => {}
            ("..", _) => {
                out.pop();
            }
            (_, "") => {}
            (_, b) => out.push(b.to_string()),
        }
    }
    let mut s = format!("/{}", out.join("/"));
    if d.ends_with('/') || d.ends_with(";/") {
        s.push('/');
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_normalisation_bypasses_of_bypass_and_deny_rules_raw_bytes() {
    let w = world("").await;
    let mut alice = w.gw.client(APP);
    alice.login_ok("alice", PW).await;
    let cookie = format!("Cookie: {SESSION}={}\r\n", alice.session_cookie().unwrap());
    // controls
    assert_eq!(raw_get(w.gw.addr, APP, "/public/ok", "").await.status, 200);
    assert_eq!(raw_get(w.gw.addr, APP, "/secret", "").await.status, 401);
    assert_eq!(raw_get(w.gw.addr, APP, "/admin/x", &cookie).await.status, 403);
    assert_eq!(raw_get(w.gw.addr, OPEN, "/admin/x", "").await.status, 403);

    let bypass_tricks: &[&[u8]] = &[
        b"/public/%2e%2e%2f..%2fsecret",
        b"/public/%c0%ae%c0%ae/secret",
        b"/public/%c0%af../secret",
        b"/public/..%c0%afsecret",
        b"/public/%e0%80%ae%e0%80%ae/secret",
        b"/public/%c0%2e%c0%2e/secret",
        b"/public/%u002e%u002e/secret",
        b"/public/%%32%65%%32%65/secret",
        b"/public/%252e%252e%252fsecret",
        b"/public/..%255csecret",
        b"/public/..%00/../secret",
        b"/public/\x00/../secret",
        b"/public/..\x09/secret",
        b"/public/..\x0b/secret",
        b"/PUBLIC/../secret",
        b"/Public/../secret",
        b"/public/..;jsessionid=1/secret",
        b"/public;/../secret",
        b"/public/.;/../secret",
        b"/public/..;/..;/secret",
        b"/public/\\../secret",
        b"/public\\/../secret",
        b"/public/%5c..%5csecret",
        b"///public/../../secret",
        b"/public/../%2e%2e/secret",
        b"/public/\xc0\xae\xc0\xae/secret",
        b"/public/\xe0\x80\xae\xe0\x80\xae/secret",
        b"/public/\xff/../secret",
        b"/public/.%00./secret",
        b"/public/%2e%2e%3b/secret",
        b"/public/%2E%2e/%2E%2e/secret",
        b"/public/./././../secret",
        b"/public/x/..%2f..%2fsecret",
        b"/public%2f..%2fsecret",
        b"/public%2F../secret",
        b"/public/%23/../../secret",
        b"/public/..%3f/secret",
        b"/public/..%20/secret",
        b"/public/.. /secret",
        b"/public/%2e%2e%2f",
        b"/public/..//secret",
        b"/public//..//..//secret",
    ];
    let mut failures = Vec::new();
    for t in bypass_tricks {
        let before = w.up.hit_count();
        let mut req = b"GET ".to_vec();
        req.extend_from_slice(t);
        req.extend_from_slice(b" HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
        let r = raw_send(w.gw.addr, &req).await;
        let new: Vec<Hit> = w.up.hits()[before..].to_vec();
        let shown = String::from_utf8_lossy(t);
        eprintln!("bypass {shown:<44} -> {} {:?}", r.status, new.iter().map(|h| h.path.clone()).collect::<Vec<_>>());
        if r.status >= 500 {
            failures.push(format!("{shown:?}: gateway error {}", r.status));
        }
        for h in &new {
            if !clean_public(&h.path) {
                failures.push(format!(
                    "{shown:?}: unauthenticated request reached upstream as {:?} ({})",
                    h.path, r.status
                ));
            }
        }
        if r.status == 200 && new.len() != 1 {
            failures.push(format!("{shown:?}: 200 without exactly one upstream hit"));
        }
        if ![0, 200, 302, 400, 401, 403, 404].contains(&r.status) {
            failures.push(format!("{shown:?}: unexpected status {} {}", r.status, r.head));
        }
    }

    let deny_tricks: &[&[u8]] = &[
        b"/admin/",
        b"/ADMIN/",
        b"/Admin/x",
        b"/%41dmin/",
        b"/%61dmin/x",
        b"/admin%2f",
        b"/admin%2Fx",
        b"/admin%5cx",
        b"/admin\\x",
        b"/admin;/",
        b"/admin;x=1/",
        b"/admin/;/",
        b"/admin/..;/admin/",
        b"/./admin/",
        b"/x/..;/admin/",
        b"//admin/",
        b"/%2fadmin/",
        b"/admin%00/",
        b"/admin\x00/",
        b"/x/%2e%2e/admin/",
        b"/x/%c0%ae%c0%ae/admin/",
        b"/x/\xc0\xae\xc0\xae/admin/",
        b"/admin%09/",
        b"/x/.%2e/admin/",
        b"/admin/%2e",
        b"/%2e/admin/",
        b"/admin/%2e%2e/admin/x",
        b"http://open.test/admin/",
        b"http://app.test/admin/",
        b"/%252e/admin/",
    ];
    for (host, auth) in [(OPEN, ""), (APP, cookie.as_str())] {
        let up = if host == OPEN { &w.open } else { &w.up };
        for t in deny_tricks {
            let before = up.hit_count();
            let mut req = b"GET ".to_vec();
            req.extend_from_slice(t);
            req.extend_from_slice(format!(" HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n").as_bytes());
            let r = raw_send(w.gw.addr, &req).await;
            let new: Vec<Hit> = up.hits()[before..].to_vec();
            let shown = String::from_utf8_lossy(t);
            eprintln!(
                "deny {host} {shown:<36} -> {} {:?}",
                r.status,
                new.iter().map(|h| h.path.clone()).collect::<Vec<_>>()
            );
            if r.status >= 500 {
                failures.push(format!("deny {host} {shown:?}: gateway error {}", r.status));
            }
            for h in &new {
                let got = h.path.split('?').next().unwrap();
                let l = lenient(got);
                if l.starts_with("/admin/") || l == "/admin" {
                    failures.push(format!(
                        "deny {host} {shown:?}: deny rule dodged, upstream received {:?} (a lenient upstream reads {l:?})",
                        h.path
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} path failure(s):\n{}", failures.len(), failures.join("\n"));
}

/// What Windows/IIS (or any upstream on a Windows file system) makes of a path: `lenient` plus trailing dots and
/// spaces trimmed from every segment (`admin.` and `admin ` name the directory `admin`; `.. ` is `..`).
fn windows_normalise(path: &str) -> String {
    let p = path.split('?').next().unwrap();
    let d = percent_encoding::percent_decode_str(p).decode_utf8_lossy().replace('\\', "/").to_ascii_lowercase();
    let mut out: Vec<String> = Vec::new();
    for seg in d.split('/') {
        let t = seg.split(';').next().unwrap();
        let trimmed = t.trim_end_matches([' ', '.']);
        if t.is_empty() || t == "." {
            continue;
        }
        if t == ".." || (trimmed.is_empty() && t.starts_with("..")) {
            out.pop();
            continue;
        }
        if trimmed.is_empty() {
            continue;
        }
        out.push(trimmed.to_string());
    }
    let mut s = format!("/{}", out.join("/"));
    if d.ends_with('/') {
        s.push('/');
    }
    s
}

/// A path segment ending in a dot or a space is ambiguous (Windows drops them): refused with 400, never forwarded.
fn refused_unforwarded(failures: &mut Vec<String>, target: &str, status: u16, hits: usize) {
    if status != 400 || hits != 0 {
        failures.push(format!("{target:?}: answered {status} with {hits} upstream hit(s); want 400 and none"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_and_bypass_rules_dodged_by_trailing_dots_and_spaces_on_windows_upstreams() {
    let w = world("").await;
    let mut failures = Vec::new();
    for t in ["/admin./", "/admin%20/", "/admin.%20/x", "/admin../", "/admin%20%20/", "/ADMIN./"] {
        let before = w.open.hit_count();
        let r = raw_get(w.gw.addr, OPEN, t, "").await;
        refused_unforwarded(&mut failures, t, r.status, w.open.hit_count() - before);
        for h in &w.open.hits()[before..] {
            let n = windows_normalise(&h.path);
            eprintln!("windows deny {t:<16} -> {} upstream {:?} (Windows reads {n:?})", r.status, h.path);
            if n.starts_with("/admin/") || n == "/admin" {
                failures.push(format!(
                    "deny rule /admin/ dodged by {t:?}: upstream got {:?}, which Windows reads as {n:?}",
                    h.path
                ));
            }
        }
    }
    for t in ["/public/..%20/secret", "/public/..%20%20/secret", "/public/...%20/secret", "/public/..%2e%20/secret"] {
        let before = w.up.hit_count();
        let r = raw_get(w.gw.addr, APP, t, "").await;
        refused_unforwarded(&mut failures, t, r.status, w.up.hit_count() - before);
        for h in &w.up.hits()[before..] {
            let n = windows_normalise(&h.path);
            eprintln!("windows bypass {t:<24} -> {} upstream {:?} (Windows reads {n:?})", r.status, h.path);
            if !n.starts_with("/public/") {
                failures.push(format!("bypass rule /public/ stretched by {t:?}: unauthenticated upstream got {:?}, which Windows reads as {n:?}", h.path));
            }
        }
    }
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}
