//! Typed values written as strings: durations, the portal prefix, cookie and header names.

use super::*;

/// A duration written as `"90s"`, `"10m"`, `"1h"`, `"7d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!("invalid duration {s:?}: {e} (use e.g. \"30s\", \"10m\", \"1h\")"))
        })
    }
}

impl Dur {
    /// Whole seconds, at least 1.
    pub fn secs(self) -> u64 {
        self.0.as_secs().max(1)
    }
}

/// A validated portal prefix: starts with `/`, no trailing `/`, plain characters only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix(pub String);

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok = s.starts_with('/')
            && s.len() > 1
            && !s.ends_with('/')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_-.".contains(&b))
            && !s.contains("//")
            && !s.split('/').any(|seg| seg == "." || seg == "..");
        if ok {
            Ok(Prefix(s))
        } else {
            Err(serde::de::Error::custom(
                "portal_prefix must look like \"/_portcullis\": a leading /, no trailing /, letters, digits, _ - .",
            ))
        }
    }
}

/// A cookie name made of token characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieName(pub String);

impl<'de> Deserialize<'de> for CookieName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) {
            Ok(CookieName(s))
        } else {
            Err(serde::de::Error::custom("cookie_name may hold only letters, digits, _ - ."))
        }
    }
}

/// An HTTP header name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderName(pub http::HeaderName);

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        http::HeaderName::from_str(&s)
            .map(HeaderName)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a valid header name")))
    }
}
