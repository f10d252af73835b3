//! The response body type shared by our own pages and streamed upstream bodies.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

/// Any error a body can carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The response body type: our own pages and streamed upstream bodies alike.
pub type Body = BoxBody<Bytes, BoxError>;

/// Wraps owned bytes as a response body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}
