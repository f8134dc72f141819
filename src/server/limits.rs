//! Admission limits checked at the handshake, before any token work where possible:
//! a connection-rate limit per source IP, and open-connection limits per subject and per
//! source IP (the server-wide `limits.max_connections` is an atomic in `AppState`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use crate::config::LimitsConfig;

/// The connection task's per-connection control-message bucket lives with the other buckets.
pub(crate) use crate::ratelimit::Bucket;
use crate::ratelimit::KeyedBuckets;

#[derive(Default)]
struct Counts {
    by_sub: HashMap<String, usize>,
    by_ip: HashMap<IpAddr, usize>,
}

/// Per-subject and per-IP accounting. Touched once per handshake and once per close.
pub struct Admission {
    counts: Mutex<Counts>,
    rate: Mutex<KeyedBuckets<IpAddr>>,
    per_sub: usize,
    per_ip: usize,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").field("per_sub", &self.per_sub).field("per_ip", &self.per_ip).finish()
    }
}

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Too many handshakes per second from this IP.
    Rate,
    /// Too many open connections of this subject.
    Subject(usize),
    /// Too many open connections from this IP.
    Ip(usize),
}

/// Most source addresses tracked by the rate limiter before idle ones are dropped.
const MAX_RATE_ENTRIES: usize = 100_000;

impl Admission {
    /// Limits from the configuration.
    pub fn new(l: &LimitsConfig) -> Admission {
        Admission {
            counts: Mutex::new(Counts::default()),
            rate: Mutex::new(KeyedBuckets::new(
                l.connect_rate_per_ip as f64,
                l.connect_burst_per_ip as f64,
                MAX_RATE_ENTRIES,
            )),
            per_sub: l.max_connections_per_subject,
            per_ip: l.max_connections_per_ip,
        }
    }

    /// Takes one handshake from `ip`'s token bucket.
    pub fn check_rate(&self, ip: IpAddr) -> Result<(), Refused> {
        let mut buckets = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.take(ip, Instant::now()) {
            Ok(())
        } else {
            Err(Refused::Rate)
        }
    }

    /// Counts a connection of `sub` from `ip`, unless either is at its limit.
    pub fn acquire(&self, sub: Option<&str>, ip: Option<IpAddr>) -> Result<(), Refused> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = sub {
            if c.by_sub.get(s).copied().unwrap_or(0) >= self.per_sub {
                return Err(Refused::Subject(self.per_sub));
            }
        }
        if let Some(ip) = ip {
            if c.by_ip.get(&ip).copied().unwrap_or(0) >= self.per_ip {
                return Err(Refused::Ip(self.per_ip));
            }
        }
        if let Some(s) = sub {
            *c.by_sub.entry(s.to_owned()).or_insert(0) += 1;
        }
        if let Some(ip) = ip {
            *c.by_ip.entry(ip).or_insert(0) += 1;
        }
        Ok(())
    }

    /// Releases what [`Admission::acquire`] counted.
    pub fn release(&self, sub: Option<&str>, ip: Option<IpAddr>) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = sub {
            if let Some(n) = c.by_sub.get_mut(s) {
                *n -= 1;
                if *n == 0 {
                    c.by_sub.remove(s);
                }
            }
        }
        if let Some(ip) = ip {
            if let Some(n) = c.by_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    c.by_ip.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_and_release() {
        let l = LimitsConfig {
            max_connections_per_subject: 2,
            max_connections_per_ip: 3,
            connect_rate_per_ip: 1,
            connect_burst_per_ip: 2,
            ..LimitsConfig::default()
        };
        let a = Admission::new(&l);
        let ip: IpAddr = "127.0.0.9".parse().expect("ip");
        assert!(a.check_rate(ip).is_ok());
        assert!(a.check_rate(ip).is_ok());
        assert_eq!(a.check_rate(ip), Err(Refused::Rate));
        a.acquire(Some("x"), Some(ip)).expect("1");
        a.acquire(Some("x"), Some(ip)).expect("2");
        assert_eq!(a.acquire(Some("x"), Some(ip)), Err(Refused::Subject(2)));
        a.acquire(Some("y"), Some(ip)).expect("3");
        assert_eq!(a.acquire(Some("z"), Some(ip)), Err(Refused::Ip(3)));
        a.release(Some("x"), Some(ip));
        a.acquire(Some("x"), Some(ip)).expect("room again");
    }
}
