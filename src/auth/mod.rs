//! Authentication and authorization: the key cache ([`keys`]), token validation
//! ([`validate`]), scopes ([`scopes`]) and the embedded issuer ([`issuer`]).
//!
//! Everything here runs at the handshake (or on an in-band refresh). Its output, a
//! [`validate::Principal`], is all the connection keeps; the delivery path never sees it.

pub mod issuer;
pub mod jwks;
pub mod keys;
pub mod revocation;
pub mod scopes;
pub mod tickets;
pub mod validate;
