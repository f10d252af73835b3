//! Form posts: bounded reading, parsing into fields, and the CSRF check every POST passes first.

use std::collections::HashMap;

use http::{HeaderMap, Request, header};
use http_body_util::BodyExt;
use subtle::ConstantTimeEq;

use crate::Body;
use crate::gateway::Gateway;
use crate::headers::host_of;
use crate::respond::Reject;

/// Largest accepted form body.
const MAX_FORM: usize = 64 * 1024;

/// A parsed form. Repeated fields keep the first value.
#[derive(Debug, Default)]
pub struct Form(HashMap<String, String>);

impl Form {
    /// A field's value, or "".
    pub fn get(&self, name: &str) -> &str {
        self.0.get(name).map_or("", String::as_str)
    }

    /// Sets a field (for handlers that reuse a check on a differently named field).
    pub fn insert(&mut self, name: &str, value: &str) {
        self.0.insert(name.to_string(), value.to_string());
    }
}

/// Reads an `application/x-www-form-urlencoded` body of at most 64 KiB.
pub async fn read(req: Request<Body>) -> Result<(http::request::Parts, Form), Reject> {
    let ok_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("application/x-www-form-urlencoded"));
    if !ok_type {
        return Err(Reject::BadRequest("The form was not sent as a form."));
    }
    let (parts, mut body) = req.into_parts();
    // Collected by hand rather than through `Limited`: its error conversion trips rustc's check that the
    // handler's future is `Send` (a higher-ranked lifetime on the boxed error).
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Reject::BadRequest("The form could not be read."))?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > MAX_FORM {
                return Err(Reject::PayloadTooLarge);
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok((parts, Form::parse(&bytes)?))
}

impl Form {
    /// Parses an urlencoded body. Repeated fields keep their first value.
    pub fn parse(bytes: &[u8]) -> Result<Form, Reject> {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_bytes(bytes).map_err(|_| Reject::BadRequest("The form could not be read."))?;
        let mut map = HashMap::new();
        for (k, v) in pairs {
            map.entry(k).or_insert(v);
        }
        Ok(Form(map))
    }
}

/// Checks a form's CSRF token against its binding (session id or anonymous cookie), in constant time, and
/// refuses requests a browser marks as cross-site or whose Origin is another host.
pub fn check_csrf(
    gw: &Gateway,
    parts: &http::request::Parts,
    form: &Form,
    binding: Option<&[u8]>,
) -> Result<(), Reject> {
    if cross_site(&parts.headers, host_of(&parts.uri, &parts.headers).as_deref()) {
        return Err(Reject::Csrf);
    }
    let Some(binding) = binding else {
        if gw.config.secure_cookies_over_plain_http() {
            tracing::warn!(
                "a form arrived without the gateway's cookie: [session] secure = true over plain HTTP makes \
                 browsers drop it (see check-config)"
            );
            return Err(Reject::CookiesNeedHttps);
        }
        return Err(Reject::Csrf);
    };
    let expected = gw.keys.csrf_token(binding);
    let given = form.get("csrf");
    if given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(Reject::Csrf)
    }
}

/// Whether the browser says the request came from another site.
///
/// Browsers send `Sec-Fetch-Site`; it is trusted when present (`same-origin`, or `none` for a typed URL). Our pages
/// use `Referrer-Policy: no-referrer`, under which browsers send `Origin: null` even for same-origin posts, so the
/// Origin header is only consulted when `Sec-Fetch-Site` is absent.
fn cross_site(headers: &HeaderMap, host: Option<&str>) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        let site = site.trim().to_ascii_lowercase();
        return !(site == "same-origin" || site == "none");
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let origin_host =
        origin.parse::<http::Uri>().ok().and_then(|u| u.authority().map(|a| a.as_str().to_ascii_lowercase()));
    match (origin_host, host) {
        (Some(o), Some(h)) => o != h.to_ascii_lowercase(),
        // "Origin: null" or an unparsable origin: refuse.
        _ => true,
    }
}
