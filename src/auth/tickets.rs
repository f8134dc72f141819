//! One-time stream tickets (`POST /v1/ticket`, then `GET /v1/stream?ticket=...`): for
//! clients that can set neither a header nor a subprotocol.
//!
//! A ticket is 32 random bytes; only its SHA-256 is stored, with the principal decoded
//! from the token it was issued for. Redeeming removes it (single use), and it expires
//! after [`TICKET_TTL`]. The store is bounded: when full of live tickets, issuing fails.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use thiserror::Error;

use super::validate::Principal;

/// How long a ticket stays redeemable.
pub const TICKET_TTL: Duration = Duration::from_secs(30);

/// Why a ticket could not be issued or redeemed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TicketError {
    /// Never issued, already used, or malformed.
    #[error("unknown or already used ticket")]
    Unknown,
    /// Issued more than 30 s ago.
    #[error("ticket expired")]
    Expired,
    /// The store is full of live tickets.
    #[error("too many outstanding tickets")]
    Full,
    /// The system random generator failed.
    #[error("random generator failure")]
    Random,
}

/// The ticket store.
#[derive(Debug)]
pub struct TicketStore {
    map: Mutex<HashMap<[u8; 32], (Principal, Instant)>>,
    max: usize,
}

fn digest(ticket: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, ticket.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl TicketStore {
    /// A store holding at most `max` live tickets.
    pub fn new(max: usize) -> TicketStore {
        TicketStore { map: Mutex::new(HashMap::new()), max }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (Principal, Instant)>> {
        // Each operation is a single insert or remove: the map is consistent after a panic.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Issues a ticket bound to `principal`.
    pub fn issue(&self, principal: Principal) -> Result<String, TicketError> {
        let mut raw = [0u8; 32];
        SystemRandom::new().fill(&mut raw).map_err(|_| TicketError::Random)?;
        let ticket = URL_SAFE_NO_PAD.encode(raw);
        let now = Instant::now();
        let mut map = self.lock();
        if map.len() >= self.max {
            map.retain(|_, (_, at)| now.duration_since(*at) < TICKET_TTL);
            if map.len() >= self.max {
                return Err(TicketError::Full);
            }
        }
        map.insert(digest(&ticket), (principal, now));
        Ok(ticket)
    }

    /// Redeems a ticket: it is gone afterwards, whether it was still valid or not.
    pub fn redeem(&self, ticket: &str) -> Result<Principal, TicketError> {
        if ticket.len() != 43 {
            return Err(TicketError::Unknown);
        }
        let (principal, at) = self.lock().remove(&digest(ticket)).ok_or(TicketError::Unknown)?;
        if at.elapsed() >= TICKET_TTL {
            return Err(TicketError::Expired);
        }
        Ok(principal)
    }

    /// Live and expired-but-not-purged tickets held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no ticket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scopes::Entitlements;

    fn p() -> Principal {
        Principal {
            sub: "s".into(),
            iss: "i".into(),
            jti: None,
            client_id: None,
            exp: u64::MAX,
            iat: None,
            entitlements: Entitlements::default(),
        }
    }

    #[test]
    fn single_use_and_bounded() {
        let store = TicketStore::new(2);
        let t = store.issue(p()).expect("issued");
        assert_eq!(t.len(), 43);
        assert_eq!(store.redeem(&t).expect("first use").sub, "s");
        assert_eq!(store.redeem(&t).unwrap_err(), TicketError::Unknown);
        assert_eq!(store.redeem("short").unwrap_err(), TicketError::Unknown);
        store.issue(p()).expect("room");
        store.issue(p()).expect("room");
        assert_eq!(store.issue(p()).unwrap_err(), TicketError::Full);
    }
}
