//! One-time stream tickets (`POST /v1/ticket`, then `GET /v1/stream?ticket=...`): for
//! clients that can set neither a header nor a subprotocol.
//!
//! A ticket is 32 random bytes; only its SHA-256 is stored, with the principal decoded
//! from the token it was issued for. Redeeming removes it (single use), and it expires
//! after [`TICKET_TTL`]. The store is bounded twice: in all, and per subject, so one
//! subject cannot take every ticket there is. A ticket is only as good as the token
//! behind it: redeeming checks the revocation list again (a token revoked after the
//! ticket was issued does not open a stream), and revoking a subject or a `jti` voids its
//! outstanding tickets at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use thiserror::Error;

use super::revocation::RevocationList;
use super::validate::Principal;

/// How long a ticket stays redeemable.
pub(crate) const TICKET_TTL: Duration = Duration::from_secs(30);

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
    /// This subject already holds its share of live tickets.
    #[error("at most {0} outstanding tickets per subject")]
    SubjectLimit(usize),
    /// The token behind the ticket was revoked after the ticket was issued.
    #[error("token revoked")]
    Revoked,
    /// The system random generator failed.
    #[error("random generator failure")]
    Random,
}

#[derive(Debug)]
struct Entry {
    principal: Principal,
    issued: Instant,
    /// Revoked while outstanding: redeeming it answers "token revoked". It keeps its place
    /// in the counts until it is redeemed or expires, like any other ticket.
    voided: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// SHA-256 of the ticket -> what it stands for.
    tickets: HashMap<[u8; 32], Entry>,
    /// Live (or not yet purged) tickets per subject.
    per_sub: HashMap<String, usize>,
}

impl Inner {
    fn remove(&mut self, digest: &[u8; 32]) -> Option<Entry> {
        let entry = self.tickets.remove(digest)?;
        if let Some(n) = self.per_sub.get_mut(&entry.principal.sub) {
            *n -= 1;
            if *n == 0 {
                self.per_sub.remove(&entry.principal.sub);
            }
        }
        Some(entry)
    }

    /// Forgets the tickets issued `TICKET_TTL` or more before `now`.
    fn purge(&mut self, now: Instant) {
        let old: Vec<[u8; 32]> =
            self.tickets.iter().filter(|(_, e)| now.duration_since(e.issued) >= TICKET_TTL).map(|(d, _)| *d).collect();
        for d in &old {
            self.remove(d);
        }
    }
}

/// The ticket store.
#[derive(Debug)]
pub struct TicketStore {
    inner: Mutex<Inner>,
    max: usize,
    max_per_subject: usize,
    revocations: Arc<RevocationList>,
}

fn digest(ticket: &str) -> [u8; 32] {
    super::hash::sha256(ticket.as_bytes())
}

impl TicketStore {
    /// A store holding at most `max` live tickets, `max_per_subject` of them for one
    /// subject, whose redemptions are checked against `revocations`.
    pub fn new(max: usize, max_per_subject: usize, revocations: Arc<RevocationList>) -> TicketStore {
        TicketStore { inner: Mutex::new(Inner::default()), max, max_per_subject, revocations }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every operation leaves both maps consistent before it can panic (the counts are
        // updated next to the insert or remove they describe).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Issues a ticket bound to `principal`.
    pub fn issue(&self, principal: Principal) -> Result<String, TicketError> {
        let mut raw = [0u8; 32];
        SystemRandom::new().fill(&mut raw).map_err(|_| TicketError::Random)?;
        let ticket = URL_SAFE_NO_PAD.encode(raw);
        let now = Instant::now();
        let mut inner = self.lock();
        let held = |inner: &Inner| inner.per_sub.get(&principal.sub).copied().unwrap_or(0);
        if inner.tickets.len() >= self.max || held(&inner) >= self.max_per_subject {
            inner.purge(now);
        }
        if held(&inner) >= self.max_per_subject {
            return Err(TicketError::SubjectLimit(self.max_per_subject));
        }
        if inner.tickets.len() >= self.max {
            return Err(TicketError::Full);
        }
        *inner.per_sub.entry(principal.sub.clone()).or_insert(0) += 1;
        inner.tickets.insert(digest(&ticket), Entry { principal, issued: now, voided: false });
        Ok(ticket)
    }

    /// Redeems a ticket: it is gone afterwards, whether it was still valid or not. `now`
    /// is the wall clock in Unix seconds (for the revocation check).
    pub fn redeem(&self, ticket: &str, now: u64) -> Result<Principal, TicketError> {
        if ticket.len() != 43 {
            return Err(TicketError::Unknown);
        }
        let entry = self.lock().remove(&digest(ticket)).ok_or(TicketError::Unknown)?;
        if entry.issued.elapsed() >= TICKET_TTL {
            return Err(TicketError::Expired);
        }
        // Revocation voids outstanding tickets as it happens, but one issued while the
        // revocation was being applied could slip past that: the list is the authority.
        let p = &entry.principal;
        if entry.voided || self.revocations.is_revoked(&p.sub, p.jti.as_deref(), p.iat, now) {
            return Err(TicketError::Revoked);
        }
        Ok(entry.principal)
    }

    /// Voids the outstanding tickets of `sub` (when given) or of tokens with `jti` (when
    /// given). Returns how many were voided.
    pub fn void(&self, sub: Option<&str>, jti: Option<&str>) -> usize {
        let mut inner = self.lock();
        let mut n = 0;
        for e in inner.tickets.values_mut().filter(|e| !e.voided) {
            let p = &e.principal;
            if sub.is_some_and(|s| p.sub == s) || jti.is_some_and(|j| p.jti.as_deref() == Some(j)) {
                e.voided = true;
                n += 1;
            }
        }
        n
    }

    /// Live and expired-but-not-purged tickets held.
    pub fn len(&self) -> usize {
        self.lock().tickets.len()
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

    fn store(max: usize, per_sub: usize) -> (TicketStore, Arc<RevocationList>) {
        let r = Arc::new(RevocationList::new(10, 100));
        (TicketStore::new(max, per_sub, r.clone()), r)
    }

    #[test]
    fn single_use_and_bounded() {
        let (store, _) = store(2, 10);
        let t = store.issue(p()).expect("issued");
        assert_eq!(t.len(), 43);
        assert_eq!(store.redeem(&t, 0).expect("first use").sub, "s");
        assert_eq!(store.redeem(&t, 0).unwrap_err(), TicketError::Unknown);
        assert_eq!(store.redeem("short", 0).unwrap_err(), TicketError::Unknown);
        store.issue(p()).expect("room");
        store.issue(p()).expect("room");
        assert_eq!(store.issue(p()).unwrap_err(), TicketError::Full);
    }

    #[test]
    fn one_subject_cannot_take_the_pool() {
        let (store, _) = store(10, 2);
        store.issue(p()).expect("1");
        let t = store.issue(p()).expect("2");
        assert_eq!(store.issue(p()).unwrap_err(), TicketError::SubjectLimit(2));
        let other = Principal { sub: "other".into(), ..p() };
        store.issue(other).expect("another subject still gets one");
        // Redeeming gives the subject's share back.
        store.redeem(&t, 0).expect("redeemed");
        store.issue(p()).expect("room again");
    }

    #[test]
    fn revocation_voids_and_is_checked_at_redemption() {
        let (store, revocations) = store(10, 10);
        let jti = Principal { jti: Some("j1".into()), iat: Some(5), ..p() };
        let a = store.issue(jti.clone()).expect("a");
        let b = store.issue(jti).expect("b");
        let c = store.issue(Principal { sub: "other".into(), ..p() }).expect("c");
        assert_eq!(store.void(None, Some("j1")), 2);
        assert_eq!(store.void(None, Some("j1")), 0, "already voided");
        assert_eq!(store.redeem(&a, 10).unwrap_err(), TicketError::Revoked);
        assert_eq!(store.redeem(&b, 10).unwrap_err(), TicketError::Revoked);
        assert_eq!(store.redeem(&a, 10).unwrap_err(), TicketError::Unknown, "still single use");
        // A ticket issued, then its subject revoked without voiding (a race): refused.
        revocations.revoke_sub("other", 10).expect("room");
        assert_eq!(store.redeem(&c, 11).unwrap_err(), TicketError::Revoked);
        assert!(store.is_empty());
    }
}
