//! The gateway's own pages carry the security headers and the form attributes password managers rely on.

use crate::support::*;

fn assert_security_headers(r: &Resp, what: &str) {
    let csp = r.header("content-security-policy").unwrap_or_default();
    for part in ["default-src 'none'", "frame-ancestors 'none'", "form-action 'self'", "base-uri 'none'"] {
        assert!(csp.contains(part), "{what}: CSP {csp:?} lacks {part}");
    }
    assert_eq!(r.header("x-content-type-options").as_deref(), Some("nosniff"), "{what}");
    assert_eq!(r.header("referrer-policy").as_deref(), Some("no-referrer"), "{what}");
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"), "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_pages_send_csp_nosniff_no_referrer_and_no_store() {
    let up = start_upstream().await;
    let env = Env::password_only(&app("app.test", &up.url(), "deny"));
    let gw = env.start().await;
    let mut c = gw.client("app.test");
    let login = c.get(&format!("{PREFIX}/login")).await;
    assert_eq!(login.status, 200);
    assert_security_headers(&login, "login page");
    for (path, status) in [("/", 403), (&*format!("{PREFIX}/nope"), 404)] {
        let r = c.get(path).await;
        assert_eq!(r.status, status, "{path}");
        assert_security_headers(&r, path);
        assert!(r.text().contains("<!doctype html>"), "{path} is not an HTML error page");
    }
    let unknown = gw.client("other.test").get("/").await;
    assert_eq!(unknown.status, 404);
    assert_security_headers(&unknown, "unknown host page");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_form_works_with_password_managers_and_without_javascript() {
    let up = start_upstream().await;
    let env = Env::password_only(&app("app.test", &up.url(), "one_factor"));
    let gw = env.start().await;
    let html = gw.client("app.test").get(&format!("{PREFIX}/login")).await.text();
    for needle in [
        r#"<form method="post" action="/_portcullis/login">"#,
        r#"name="username""#,
        r#"autocomplete="username""#,
        r#"name="password""#,
        r#"type="password""#,
        r#"autocomplete="current-password""#,
        r#"type="hidden" name="csrf""#,
        r#"name="viewport""#,
        r#"name="color-scheme" content="light dark""#,
    ] {
        assert!(html.contains(needle), "login page lacks {needle}");
    }
    assert!(!html.contains("<script"), "the login page needs no JavaScript");
    assert!(!html.contains("http://") && !html.contains("https://"), "the login page loads nothing from elsewhere");
    let css = gw.client("app.test").get(&format!("{PREFIX}/static/portcullis.css")).await;
    assert_eq!(css.status, 200);
    assert!(css.text().contains("prefers-color-scheme: dark"), "no dark mode in the stylesheet");
    gw.stop().await;
}
