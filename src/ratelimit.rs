//! Token buckets: one for a single caller ([`Bucket`]) and a bounded map of them keyed by
//! address or client id ([`KeyedBuckets`]). Depends on nothing else in the crate, so every
//! layer (auth, server) can use it without an upward edge.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second up to `burst`. The rate and burst are passed
/// in rather than stored, so a map of buckets holds only what differs per key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub(crate) fn full(burst: f64, now: Instant) -> Bucket {
        Bucket { tokens: burst, at: now }
    }

    /// Tokens available at `now`.
    fn level(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate).min(burst)
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        self.tokens = self.level(now, rate, burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Spends `n` tokens, into debt if need be (a byte budget: a frame is never split).
    pub(crate) fn spend(&mut self, now: Instant, rate: f64, burst: f64, n: f64) {
        self.tokens = self.level(now, rate, burst) - n;
        self.at = now;
    }

    /// How long until the bucket is out of debt (zero when it is now).
    pub(crate) fn debt(&self, now: Instant, rate: f64, burst: f64) -> Duration {
        let level = self.level(now, rate, burst);
        if level >= 0.0 || rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(-level / rate)
    }

    /// How long until one token is available (zero when one is now).
    fn wait(&self, now: Instant, rate: f64, burst: f64) -> Duration {
        let level = self.level(now, rate, burst);
        if level >= 1.0 || rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - level) / rate)
    }
}

/// Token buckets by key, at most `max_keys` of them. When the map is full, buckets that
/// have refilled are forgotten (a full bucket is indistinguishable from a new one); if
/// none has, an unknown key is treated as having an empty bucket, so a flood of fresh keys
/// can neither grow memory nor buy itself new tokens.
#[derive(Debug)]
pub(crate) struct KeyedBuckets<K> {
    map: HashMap<K, Bucket>,
    rate: f64,
    burst: f64,
    max_keys: usize,
}

impl<K: Hash + Eq> KeyedBuckets<K> {
    /// `rate` tokens per second, bursts of `burst`, at most `max_keys` keys tracked.
    pub(crate) fn new(rate: f64, burst: f64, max_keys: usize) -> KeyedBuckets<K> {
        KeyedBuckets { map: HashMap::new(), rate, burst, max_keys }
    }

    /// Makes room for `key` if it is new; false when there is none.
    fn room_for(&mut self, key: &K, now: Instant) -> bool {
        if self.map.len() < self.max_keys || self.map.contains_key(key) {
            return true;
        }
        let (rate, burst) = (self.rate, self.burst);
        self.map.retain(|_, b| b.level(now, rate, burst) < burst);
        self.map.len() < self.max_keys
    }

    /// Takes one token from `key`'s bucket.
    pub(crate) fn take(&mut self, key: K, now: Instant) -> bool {
        if !self.room_for(&key, now) {
            return false;
        }
        let (rate, burst) = (self.rate, self.burst);
        self.map.entry(key).or_insert(Bucket::full(burst, now)).take(now, rate, burst)
    }

    /// How long until `key` has a token again; zero when it has one now.
    pub(crate) fn wait(&self, key: &K, now: Instant) -> Duration {
        match self.map.get(key) {
            Some(b) => b.wait(now, self.rate, self.burst),
            None if self.map.len() < self.max_keys => Duration::ZERO,
            // Full of live buckets: a new key would be refused; it waits like one that is empty.
            None => Duration::from_secs_f64(1.0 / self.rate.max(f64::MIN_POSITIVE)).min(Duration::from_secs(3600)),
        }
    }

    /// Keys tracked.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::full(2.0, t0);
        assert!(b.take(t0, 1.0, 2.0));
        assert!(b.take(t0, 1.0, 2.0));
        assert!(!b.take(t0, 1.0, 2.0));
        assert!(b.wait(t0, 1.0, 2.0) > Duration::from_millis(900));
        assert!(b.take(t0 + Duration::from_secs(1), 1.0, 2.0));
    }

    #[test]
    fn keyed_buckets_are_bounded_and_fresh_keys_buy_nothing() {
        let t0 = Instant::now();
        let mut k: KeyedBuckets<u32> = KeyedBuckets::new(1.0, 1.0, 2);
        assert!(k.take(1, t0));
        assert!(k.take(2, t0));
        assert!(!k.take(1, t0), "key 1 is empty");
        assert!(!k.take(3, t0), "full of live buckets: a new key gets nothing");
        assert!(k.wait(&3, t0) > Duration::ZERO);
        assert_eq!(k.len(), 2);
        // Once the buckets have refilled they are forgotten and there is room again.
        assert!(k.take(3, t0 + Duration::from_secs(2)));
        assert_eq!(k.len(), 1);
    }
}
