//! What a username, an email address and a group name may be: one rule for the invitation form, the admin pages
//! and the command line.

use crate::store::normalize_login;

/// Why a name was refused; the text is safe to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Not a username.
    #[error("a username is 1 to 64 letters, digits or . _ @ + -")]
    Username,
    /// Not an email address.
    #[error("that is not an email address")]
    Email,
    /// Not a group name.
    #[error("group names may hold only letters, digits and . _ -")]
    Group,
}

/// A username: 1..=64 of letters, digits and `._@+-` after normalisation.
pub fn username(name: &str) -> Result<String, Invalid> {
    let n = normalize_login(name);
    let ok = (1..=64).contains(&n.chars().count()) && n.chars().all(|c| c.is_alphanumeric() || "._@+-".contains(c));
    if ok { Ok(n) } else { Err(Invalid::Username) }
}

/// An email address, checked loosely (one `@`, no spaces or commas) and normalised.
pub fn email(email: &str) -> Result<String, Invalid> {
    let e = normalize_login(email);
    let ok = e.len() <= 254
        && e.split('@').count() == 2
        && !e.starts_with('@')
        && !e.ends_with('@')
        && !e.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',');
    if ok { Ok(e) } else { Err(Invalid::Email) }
}

/// Group names from a list (empty entries dropped, each trimmed).
pub fn groups<S: AsRef<str>>(list: &[S]) -> Result<Vec<String>, Invalid> {
    list.iter()
        .map(|g| g.as_ref().trim())
        .filter(|g| !g.is_empty())
        .map(|g| {
            if g.chars().all(|c| c.is_alphanumeric() || "._-".contains(c)) {
                Ok(g.to_string())
            } else {
                Err(Invalid::Group)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_addresses_and_groups() {
        assert_eq!(username(" Alice ").unwrap(), "alice");
        assert_eq!(username(&"a".repeat(65)), Err(Invalid::Username));
        assert_eq!(username("al ice"), Err(Invalid::Username));
        assert_eq!(email("Bob@Example.com").unwrap(), "bob@example.com");
        for bad in ["bob", "@x", "x@", "a@b@c", "a b@c", "a,b@c"] {
            assert_eq!(email(bad), Err(Invalid::Email), "{bad}");
        }
        assert_eq!(groups(&["wiki", " ", "ops.team "]).unwrap(), ["wiki", "ops.team"]);
        assert_eq!(groups(&["a;b"]), Err(Invalid::Group));
    }
}
