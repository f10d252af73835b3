//! The one place that turns a refusal into an HTTP response: status, headers and a page that says what the user
//! can do, and nothing about internals.

use http::{HeaderValue, Response, StatusCode, header};

use crate::Body;
use crate::pages::Pages;

/// Every way a request can be refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// The request is malformed (bad path, bad form).
    BadRequest(&'static str),
    /// No such portal page.
    NotFound,
    /// No app is configured for the Host.
    UnknownHost,
    /// The policy denies the path.
    Denied,
    /// The user's groups don't allow this app.
    NotInGroup,
    /// An admin page, and the request doesn't come from an admin's fully verified session.
    AdminOnly,
    /// The form's CSRF token or origin is wrong.
    Csrf,
    /// A form came without the gateway's cookie, which is `Secure` while the gateway is reached over plain HTTP.
    CookiesNeedHttps,
    /// Authentication is needed and the client is not a browser.
    Unauthorized,
    /// Too many failed attempts; retry after this many seconds.
    TooManyAttempts(u64),
    /// The account is locked by an administrator.
    AccountLocked,
    /// A form body is too large.
    PayloadTooLarge,
    /// The method isn't allowed on this portal page.
    MethodNotAllowed,
    /// The upstream could not be reached.
    BadGateway,
    /// The upstream didn't answer in time.
    GatewayTimeout,
    /// The client's request body paused longer than `body_timeout`.
    RequestTimeout,
    /// The client went away (an HTTP/2 stream reset, a connection closed) before its request was read: nobody
    /// gets this answer, and it is no client error. Counted as 499, nginx's "client closed request".
    ClientClosed,
    /// Storage or another internal part failed; fail closed.
    Unavailable,
}

impl Reject {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use Reject::*;
        match self {
            BadRequest(why) => (StatusCode::BAD_REQUEST, "Bad request", why),
            NotFound => (StatusCode::NOT_FOUND, "Page not found", "There is no such page."),
            UnknownHost => (
                StatusCode::NOT_FOUND,
                "Unknown site",
                "This gateway does not serve the site you asked for. Check the address.",
            ),
            Denied => (StatusCode::FORBIDDEN, "Access denied", "Access to this address is not allowed."),
            NotInGroup => (
                StatusCode::FORBIDDEN,
                "Access denied",
                "Your account is not allowed to use this application. Ask your administrator for access.",
            ),
            AdminOnly => (
                StatusCode::FORBIDDEN,
                "Administrators only",
                "Only administrators can use this page. Sign in with an administrator account.",
            ),
            Csrf => (
                StatusCode::FORBIDDEN,
                "Form expired",
                "This form has expired or was sent from another site. Go back, reload the page and try again.",
            ),
            CookiesNeedHttps => (
                StatusCode::FORBIDDEN,
                "Open this page over https",
                "Your browser did not send this site's cookies: they are marked for https only, and this page was \
                 opened over plain http. Open it with an https:// address, or ask your administrator to set up \
                 https for this gateway.",
            ),
            Unauthorized => (StatusCode::UNAUTHORIZED, "Sign-in required", "Sign in to use this application."),
            TooManyAttempts(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "Too many attempts",
                "There were too many failed attempts. Wait a while before trying again.",
            ),
            AccountLocked => {
                (StatusCode::FORBIDDEN, "Account locked", "This account is locked. Contact your administrator.")
            }
            PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "Request too large", "The form sent was too large."),
            MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", "This page can't handle that kind of request.")
            }
            BadGateway => (
                StatusCode::BAD_GATEWAY,
                "Application unavailable",
                "The application behind this gateway is not responding. Try again in a moment.",
            ),
            GatewayTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "Application too slow",
                "The application behind this gateway took too long to answer. Try again in a moment.",
            ),
            ClientClosed => (
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                "Request cancelled",
                "The request was cancelled before it arrived in full.",
            ),
            RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "Upload too slow",
                "The request stopped arriving before it was complete. Check your connection and try again.",
            ),
            Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Temporarily unavailable",
                "The sign-in service is temporarily unavailable. Try again in a moment.",
            ),
        }
    }

    /// The HTTP status this refusal carries.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }
}

impl From<crate::store::StoreError> for Reject {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "storage failed; refusing the request");
        Reject::Unavailable
    }
}

impl From<crate::credentials::password::PasswordError> for Reject {
    fn from(e: crate::credentials::password::PasswordError) -> Self {
        tracing::error!(error = %e, "password hashing failed; refusing the request");
        Reject::Unavailable
    }
}

impl From<crate::session::SessionError> for Reject {
    fn from(e: crate::session::SessionError) -> Self {
        match e {
            crate::session::SessionError::Store(e) => e.into(),
            crate::session::SessionError::Key(e) => e.into(),
        }
    }
}

impl From<crate::accounts::AccountError> for Reject {
    fn from(e: crate::accounts::AccountError) -> Self {
        use crate::accounts::AccountError;
        use crate::accounts::validate::Invalid;
        match e {
            AccountError::Store(e) => e.into(),
            AccountError::Key(e) => e.into(),
            AccountError::Password(crate::credentials::password::PasswordError::Length) => {
                Reject::BadRequest("A password must be 8 to 1024 characters long.")
            }
            AccountError::Password(e) => e.into(),
            AccountError::Invalid(Invalid::Username) => {
                Reject::BadRequest("A username is 1 to 64 letters, digits or . _ @ + -")
            }
            AccountError::Invalid(Invalid::Email) => Reject::BadRequest("That is not an email address."),
            AccountError::Invalid(Invalid::Group) => {
                Reject::BadRequest("Group names may hold only letters, digits and . _ -")
            }
            AccountError::NoSuchUser(_) => Reject::NotFound,
            AccountError::InvitationsOff => {
                Reject::BadRequest("Invitations are not available: mail or public_url is not configured.")
            }
        }
    }
}

impl From<crate::keys::KeyError> for Reject {
    fn from(e: crate::keys::KeyError) -> Self {
        tracing::error!(error = %e, "key operation failed; refusing the request");
        Reject::Unavailable
    }
}

/// Renders a refusal as a page.
pub fn reject(pages: &Pages, r: &Reject) -> Response<Body> {
    let (status, heading, detail) = r.parts();
    let (action_href, action_label) = match r {
        Reject::Csrf
        | Reject::AccountLocked
        | Reject::TooManyAttempts(_)
        | Reject::AdminOnly
        | Reject::Unauthorized => (format!("{}/login", pages.prefix()), "Back to sign-in"),
        _ => (String::new(), ""),
    };
    let ctx = minijinja::context! { heading, detail, action_href, action_label };
    let mut resp = pages.page("error.html", status, ctx);
    if let Reject::TooManyAttempts(secs) = r {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*secs));
    }
    if let Reject::Unauthorized = r {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Cookie"));
    }
    resp
}
