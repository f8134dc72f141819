//! Revoked tokens, shared by every handshake and refresh.
//!
//! A revoked `jti` is refused until it could no longer be valid anyway; a revoked subject
//! refuses every token of that subject issued at or before the revocation (a client that
//! gets a fresh token afterwards is let in again). Entries are dropped once they can no
//! longer matter, and the list is bounded: when it is full of live entries a new
//! revocation is refused rather than an old one forgotten.

use std::collections::HashMap;
use std::sync::Mutex;

use thiserror::Error;

/// The list is full of entries that still matter.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("revocation list full ({0} live entries)")]
pub struct RevocationFull(pub usize);

#[derive(Debug, Default)]
struct Inner {
    /// jti -> forget after (unix seconds).
    jtis: HashMap<String, u64>,
    /// sub -> (revoked at, forget after).
    subs: HashMap<String, (u64, u64)>,
}

/// The shared revocation list. Consulted once per handshake or refresh, never per tick.
#[derive(Debug)]
pub struct RevocationList {
    inner: Mutex<Inner>,
    max_entries: usize,
    /// How long an entry can matter: the longest token lifetime plus the clock leeway.
    horizon_s: u64,
}

impl RevocationList {
    /// A list holding at most `max_entries`, each kept `horizon_s` seconds.
    pub fn new(max_entries: usize, horizon_s: u64) -> RevocationList {
        RevocationList { inner: Mutex::new(Inner::default()), max_entries, horizon_s }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map stays consistent even if a holder panicked: every update is one insert.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn make_room(inner: &mut Inner, now: u64, max: usize) -> Result<(), RevocationFull> {
        if inner.jtis.len() + inner.subs.len() < max {
            return Ok(());
        }
        inner.jtis.retain(|_, until| *until > now);
        inner.subs.retain(|_, (_, until)| *until > now);
        let n = inner.jtis.len() + inner.subs.len();
        if n >= max {
            Err(RevocationFull(n))
        } else {
            Ok(())
        }
    }

    /// Revokes a token id. `exp`, when known, bounds how long it is remembered.
    pub fn revoke_jti(&self, jti: &str, exp: Option<u64>, now: u64) -> Result<(), RevocationFull> {
        let mut g = self.lock();
        Self::make_room(&mut g, now, self.max_entries)?;
        let until = exp.unwrap_or(now + self.horizon_s).min(now + self.horizon_s);
        g.jtis.insert(jti.to_owned(), until);
        Ok(())
    }

    /// Revokes every token of `sub` issued at or before `now`.
    pub fn revoke_sub(&self, sub: &str, now: u64) -> Result<(), RevocationFull> {
        self.revoke_sub_at(sub, now, now).map(|_| ())
    }

    /// Applies a revocation of `sub` made at `at` (here, or on another edge of the
    /// cluster): every token of `sub` issued at or before `at` is refused. The later of two
    /// revocations of one subject wins, so applying one again, or an older one after a
    /// newer, changes nothing. Answers whether anything changed; one that can no longer
    /// matter (`at` + the horizon is past) changes nothing.
    pub fn revoke_sub_at(&self, sub: &str, at: u64, now: u64) -> Result<bool, RevocationFull> {
        let until = at.saturating_add(self.horizon_s);
        if until <= now {
            return Ok(false);
        }
        let mut g = self.lock();
        match g.subs.get_mut(sub) {
            Some((held_at, held_until)) if *held_until > now => {
                if at <= *held_at {
                    return Ok(false);
                }
                (*held_at, *held_until) = (at, until);
                Ok(true)
            }
            _ => {
                Self::make_room(&mut g, now, self.max_entries)?;
                g.subs.insert(sub.to_owned(), (at, until));
                Ok(true)
            }
        }
    }

    /// Applies a revocation of token id `jti` made at `at` (here or elsewhere): refused
    /// until `at` + the horizon. Answers whether it was new.
    pub fn revoke_jti_at(&self, jti: &str, at: u64, now: u64) -> Result<bool, RevocationFull> {
        let until = at.saturating_add(self.horizon_s);
        if until <= now {
            return Ok(false);
        }
        let mut g = self.lock();
        match g.jtis.get_mut(jti) {
            Some(held) if *held > now => {
                *held = (*held).max(until);
                Ok(false)
            }
            _ => {
                Self::make_room(&mut g, now, self.max_entries)?;
                g.jtis.insert(jti.to_owned(), until);
                Ok(true)
            }
        }
    }

    /// Whether a token with these claims is revoked. A token without `iat` counts as
    /// issued before any subject revocation.
    pub fn is_revoked(&self, sub: &str, jti: Option<&str>, iat: Option<u64>, now: u64) -> bool {
        let g = self.lock();
        if let Some(j) = jti {
            if g.jtis.get(j).is_some_and(|until| *until > now) {
                return true;
            }
        }
        match g.subs.get(sub) {
            Some((at, until)) if *until > now => iat.is_none_or(|i| i <= *at),
            _ => false,
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        let g = self.lock();
        g.jtis.len() + g.subs.len()
    }

    /// True when nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jti_and_sub_revocation() {
        let r = RevocationList::new(10, 100);
        r.revoke_jti("j1", Some(1_050), 1_000).expect("room");
        assert!(r.is_revoked("a", Some("j1"), Some(990), 1_010));
        assert!(!r.is_revoked("a", Some("j1"), Some(990), 1_050), "forgotten at its exp");
        r.revoke_sub("bob", 2_000).expect("room");
        assert!(r.is_revoked("bob", None, Some(1_999), 2_001));
        assert!(r.is_revoked("bob", None, None, 2_001));
        assert!(!r.is_revoked("bob", None, Some(2_001), 2_002), "a token issued later is fine");
        assert!(!r.is_revoked("alice", None, Some(1), 2_001));
    }

    #[test]
    fn applying_again_or_older_changes_nothing() {
        let r = RevocationList::new(10, 100);
        assert_eq!(r.revoke_sub_at("bob", 1_000, 1_001), Ok(true));
        assert_eq!(r.revoke_sub_at("bob", 1_000, 1_002), Ok(false), "the same again");
        assert_eq!(r.revoke_sub_at("bob", 900, 1_002), Ok(false), "an older one");
        assert!(r.is_revoked("bob", None, Some(1_000), 1_002));
        assert!(!r.is_revoked("bob", None, Some(1_001), 1_002), "the older one did not win");
        assert_eq!(r.revoke_sub_at("bob", 1_050, 1_060), Ok(true), "a later one");
        assert!(r.is_revoked("bob", None, Some(1_040), 1_060));
        assert_eq!(r.revoke_sub_at("old", 10, 1_000), Ok(false), "past the horizon");
        assert!(!r.is_revoked("old", None, None, 1_000));
        assert_eq!(r.revoke_jti_at("j", 1_000, 1_001), Ok(true));
        assert_eq!(r.revoke_jti_at("j", 1_000, 1_001), Ok(false));
        assert!(r.is_revoked("x", Some("j"), None, 1_099));
        assert!(!r.is_revoked("x", Some("j"), None, 1_100));
    }

    #[test]
    fn bounded_with_expiry_first() {
        let r = RevocationList::new(2, 10);
        r.revoke_jti("a", None, 0).expect("room");
        r.revoke_jti("b", None, 0).expect("room");
        assert_eq!(r.revoke_jti("c", None, 5), Err(RevocationFull(2)));
        // Once the first two can no longer matter, there is room again.
        r.revoke_jti("c", None, 10).expect("expired entries make room");
        assert_eq!(r.len(), 1);
    }
}
