//! Scopes (spec §2), decoded once at the handshake into [`Entitlements`] so subscribe
//! checks are a set lookup and the delivery path never looks at them at all.

use std::collections::BTreeSet;

/// `md:read:` scope prefix.
pub(crate) const READ_PREFIX: &str = "md:read:";
/// `md:publish:` scope prefix.
pub(crate) const PUBLISH_PREFIX: &str = "md:publish:";
/// The admin scope.
pub(crate) const ADMIN_SCOPE: &str = "tickgate:admin";

/// What a token allows, decoded from its `scope`/`scp` claims.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entitlements {
    read_all: bool,
    read: BTreeSet<String>,
    publish: BTreeSet<String>,
    admin: bool,
}

impl Entitlements {
    /// Builds entitlements from a list of scope strings. Matching is exact: `md:read:XNA`
    /// grants feed `XNA` only, never `XNAS`. Unknown scopes are ignored.
    pub fn from_scopes<'a>(scopes: impl IntoIterator<Item = &'a str>) -> Entitlements {
        let mut e = Entitlements::default();
        for s in scopes {
            if s == "md:read:*" {
                e.read_all = true;
            } else if let Some(feed) = s.strip_prefix(READ_PREFIX) {
                if !feed.is_empty() {
                    e.read.insert(feed.to_owned());
                }
            } else if let Some(feed) = s.strip_prefix(PUBLISH_PREFIX) {
                if !feed.is_empty() {
                    e.publish.insert(feed.to_owned());
                }
            } else if s == ADMIN_SCOPE {
                e.admin = true;
            }
        }
        e
    }

    /// Whether the token may subscribe to `feed`.
    pub fn can_read(&self, feed: &str) -> bool {
        self.read_all || self.read.contains(feed)
    }

    /// Whether the token carries any `md:read:*`-family scope (required to connect).
    pub fn has_any_read(&self) -> bool {
        self.read_all || !self.read.is_empty()
    }

    /// Whether the token may publish into `feed`.
    pub fn can_publish(&self, feed: &str) -> bool {
        self.publish.contains(feed)
    }

    /// Whether the token carries any `md:publish:` scope.
    pub fn has_any_publish(&self) -> bool {
        !self.publish.is_empty()
    }

    /// Whether the token grants the admin API.
    pub fn is_admin(&self) -> bool {
        self.admin
    }
}

/// Splits a space-delimited OAuth2 `scope` string (RFC 6749 §3.3).
pub(crate) fn split_scope(scope: &str) -> impl Iterator<Item = &str> {
    scope.split(' ').filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_is_exact() {
        let e = Entitlements::from_scopes(split_scope("md:read:XNA md:publish:X"));
        assert!(e.can_read("XNA"));
        assert!(!e.can_read("XNAS"));
        assert!(!e.can_read("XN"));
        assert!(e.has_any_read());
        assert!(e.can_publish("X"));
        assert!(!e.is_admin());
    }

    #[test]
    fn wildcard_and_admin() {
        let e = Entitlements::from_scopes(["md:read:*", "tickgate:admin"]);
        assert!(e.can_read("ANY"));
        assert!(e.is_admin());
        let none = Entitlements::from_scopes(split_scope("openid profile md:read:"));
        assert!(!none.has_any_read());
    }
}
