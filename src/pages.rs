//! Page rendering: minijinja templates (operator overrides from `[portal] templates`, embedded defaults otherwise)
//! and the security headers every portal response carries.

use std::path::PathBuf;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use minijinja::{Environment, Value, context};

use crate::Body;

/// The embedded default templates; only these names can be loaded, so a template name can't walk the filesystem.
const EMBEDDED: &[(&str, &str)] = &[
    ("base.html", include_str!("../templates/base.html")),
    ("login.html", include_str!("../templates/login.html")),
    ("logout.html", include_str!("../templates/logout.html")),
    ("error.html", include_str!("../templates/error.html")),
    ("challenge.html", include_str!("../templates/challenge.html")),
    ("confirm_password.html", include_str!("../templates/confirm_password.html")),
    ("enroll.html", include_str!("../templates/enroll.html")),
    ("recovery_codes.html", include_str!("../templates/recovery_codes.html")),
    ("settings.html", include_str!("../templates/settings.html")),
    ("forgot.html", include_str!("../templates/forgot.html")),
    ("reset.html", include_str!("../templates/reset.html")),
    ("invite.html", include_str!("../templates/invite.html")),
    ("password.html", include_str!("../templates/password.html")),
    ("admin_users.html", include_str!("../templates/admin_users.html")),
    ("admin_user.html", include_str!("../templates/admin_user.html")),
];

/// The script served at `{prefix}/static/portcullis.js` (copy and print on the recovery codes page).
pub const SCRIPT: &str = include_str!("../templates/portcullis.js");

/// The stylesheet served at `{prefix}/static/portcullis.css`.
pub const STYLESHEET: &str = include_str!("../templates/portcullis.css");

/// `Content-Security-Policy` of every portal page: nothing from elsewhere, no framing, forms only to us.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// The template environment, with the values every page shows.
pub struct Pages {
    env: Environment<'static>,
    title: String,
    prefix: String,
}

impl Pages {
    /// Templates from `dir` where present, embedded defaults otherwise; pages titled `title`, links under `prefix`.
    pub fn new(dir: Option<PathBuf>, title: &str, prefix: &str) -> Pages {
        let mut env = Environment::new();
        env.set_formatter(html_formatter);
        env.set_loader(move |name: &str| {
            let Some((_, default)) = EMBEDDED.iter().find(|(n, _)| *n == name) else {
                return Ok(None);
            };
            if let Some(dir) = &dir
                && let Ok(text) = std::fs::read_to_string(dir.join(name))
            {
                return Ok(Some(text));
            }
            Ok(Some((*default).to_string()))
        });
        Pages { env, title: title.to_string(), prefix: prefix.to_string() }
    }

    /// The portal prefix pages link under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Renders a template with the common context (`title`, `prefix`) merged in.
    pub fn render(&self, name: &str, ctx: Value) -> Result<String, minijinja::Error> {
        let full = context! { title => &self.title, prefix => &self.prefix, ..ctx };
        self.env.get_template(name)?.render(full)
    }

    /// A full HTML response. A broken operator template degrades to a plain page rather than a crash.
    pub fn page(&self, name: &str, status: StatusCode, ctx: Value) -> Response<Body> {
        match self.render(name, ctx) {
            Ok(html) => html_response(status, html),
            Err(e) => {
                tracing::error!(template = name, error = %e, "template failed to render");
                html_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "<!doctype html><title>Error</title><p>This page could not be shown.</p>".into(),
                )
            }
        }
    }
}

/// HTML-escapes strings without touching `/` (minijinja's default writes `&#x2f;`, which is valid but makes
/// links in pages and tests unreadable): `&`, `<`, `>`, `"` and `'` are what can break out of text or attributes.
fn html_formatter(
    out: &mut minijinja::Output,
    state: &mut minijinja::State,
    value: &Value,
) -> Result<(), minijinja::Error> {
    let html = matches!(state.auto_escape(), minijinja::AutoEscape::Html);
    match value.as_str() {
        Some(s) if html && !value.is_safe() => {
            let mut escaped = String::with_capacity(s.len());
            for c in s.chars() {
                match c {
                    '&' => escaped.push_str("&amp;"),
                    '<' => escaped.push_str("&lt;"),
                    '>' => escaped.push_str("&gt;"),
                    '"' => escaped.push_str("&quot;"),
                    '\'' => escaped.push_str("&#39;"),
                    c => escaped.push(c),
                }
            }
            out.write_str(&escaped)
                .map_err(|_| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, "write failed"))
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

pub use crate::body::full;

/// Adds the headers every portal response carries.
pub fn secure_headers(h: &mut HeaderMap) {
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// An HTML response with the portal's security headers.
pub fn html_response(status: StatusCode, html: String) -> Response<Body> {
    let mut resp = Response::new(full(html));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    secure_headers(h);
    resp
}

/// A redirect with the portal's security headers.
pub fn redirect(status: StatusCode, location: &str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(location) {
        h.insert(header::LOCATION, v);
    }
    secure_headers(h);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflected_values_are_escaped_but_slashes_stay() {
        let mut env = Environment::new();
        env.set_formatter(html_formatter);
        env.add_template("t.html", "<a href=\"{{ u }}\">{{ t }}</a>").unwrap();
        let out = env
            .get_template("t.html")
            .unwrap()
            .render(context! { u => "/_portcullis/login?rd=/a&b", t => "<script>alert('x\")</script>" })
            .unwrap();
        assert_eq!(
            out,
            "<a href=\"/_portcullis/login?rd=/a&amp;b\">&lt;script&gt;alert(&#39;x&quot;)&lt;/script&gt;</a>"
        );
    }
}
