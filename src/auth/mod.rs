//! Authentication and authorization: why a credential was refused (`failure`, the
//! `tickgate_auth_failures_total` reasons), the key cache ([`keys`]), the JWKS cache ([`jwks`]),
//! token validation ([`validate`]), scopes (`scopes`), one-time tickets (`tickets`),
//! revocation (`revocation`), the embedded issuer ([`issuer`]), its signing keys, generated
//! or loaded from PEM files ([`keyfile`]), and its key rotation (`rotation`), building all of it from the configuration (`setup`), and the crate's one
//! SHA-256 and constant-time compare (`hash`).
//!
//! Everything here runs at the handshake (or on an in-band refresh). Its output, a
//! [`validate::Principal`], is all the connection keeps; the delivery path never sees it.

pub(crate) mod failure;
pub(crate) mod hash;
pub mod issuer;
pub mod jwks;
pub mod keyfile;
pub mod keys;
pub(crate) mod revocation;
mod rotation;
pub(crate) mod scopes;
pub(crate) mod setup;
pub(crate) mod tickets;
pub mod validate;
