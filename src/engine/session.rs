//! A connection's session on its shard: the token's deadline on the timer wheel
//! (`token_expiring`, close 4001, and the writer's last check), the in-band refresh (rate
//! limit, then the validated principal applied: new entitlements and deadline),
//! revocation (4003), termination, and shutdown (`shutdown` + 1001), at once or spread
//! over a lame-duck phase. The engine sees a validated principal, never a token.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

// tokio's Instant follows the runtime's clock, so tests can drive expiry with paused time.
use tokio::time::Instant;

use super::core::{ConnKey, LameDuck, ShardCore, TimerEvent, TimerKind};
use crate::auth::scopes::Entitlements;
use crate::auth::validate::{AuthError, Principal};
use tickgate_proto::close::Reason;
use tickgate_proto::control::{ErrorCode, FeedInfo, ServerMsg};
use tickgate_proto::now_ns;

impl ShardCore {
    /// Milliseconds on the wheel's clock.
    pub(super) fn wheel_now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Schedules the connection's expiry (exp + grace: close 4001) and its
    /// `token_expiring` notice (a jittered 80-90 % of the token's lifetime). Wall-clock
    /// times from the token are turned into offsets from now once, here.
    pub(super) fn schedule_token_timers(&mut self, key: ConnKey) {
        let now_wall_ms = now_ns() / 1_000_000;
        let now_ms = self.wheel_now_ms();
        let grace = self.limits.expiry_grace_ms;
        let Some(c) = self.conns.get(key) else { return };
        let p = &c.principal;
        if p.exp == u64::MAX {
            return; // a principal that never expires (the benchmark-only no-auth mode)
        }
        let serial = c.serial;
        let exp_ms = p.exp.saturating_mul(1000);
        let deadline_wall = exp_ms.saturating_add(grace);
        // The close is decided up to two wheel ticks *before* the deadline (the wheel
        // rounds up by at most one tick and the loop may run up to one tick late): a
        // batch sealed by then is stamped before the deadline, and after the decision the
        // connection's queue is discarded, so no data frame is written after exp + grace.
        let early = 2 * self.wheel.tick_ms();
        let expire_at = now_ms + deadline_wall.saturating_sub(now_wall_ms).saturating_sub(early);
        let issued_ms = p.iat.map(|i| i.saturating_mul(1000)).unwrap_or(now_wall_ms).min(exp_ms);
        let fraction = rand::random_range(0.80..0.90);
        let notice_wall = issued_ms + ((exp_ms - issued_ms) as f64 * fraction) as u64;
        let notice_at = now_ms + notice_wall.saturating_sub(now_wall_ms);
        let expire = self.wheel.schedule(expire_at, TimerEvent { key, serial, kind: TimerKind::Expire });
        let expiring = (notice_wall < exp_ms)
            .then(|| self.wheel.schedule(notice_at, TimerEvent { key, serial, kind: TimerKind::Expiring }));
        if let Some(c) = self.conns.get_mut(key) {
            c.expire_timer = Some(expire);
            c.expiring_timer = expiring;
        }
    }

    pub(super) fn cancel_token_timers(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let (a, b) = (c.expire_timer.take(), c.expiring_timer.take());
        for t in [a, b].into_iter().flatten() {
            self.wheel.cancel(t);
        }
    }

    /// Timers scheduled on this shard.
    pub fn timer_count(&self) -> usize {
        self.wheel.len()
    }

    /// The wheel's resolution while it holds anything (how often the loop must advance it).
    pub fn timer_tick(&self) -> Option<Duration> {
        (!self.wheel.is_empty()).then(|| Duration::from_millis(self.wheel.tick_ms()))
    }

    /// The writer's last check before it stamps and writes a batch: a connection whose
    /// deadline (`exp` + grace) has passed is closed with 4001 now. The wheel decides the
    /// close two ticks early, but a shard thread that runs later than that (a busy machine)
    /// would otherwise write batches after the deadline; this keeps "no data frame after
    /// the deadline" true whatever the thread's lateness. True when it closed the connection
    /// (its queue now holds only the close).
    pub fn expire_if_due(&mut self, key: ConnKey, now_ns: u64) -> bool {
        let grace_ms = self.limits.expiry_grace_ms;
        let Some(c) = self.conns.get(key) else { return false };
        if c.principal.exp == u64::MAX || c.out.is_closed() {
            return false;
        }
        let deadline_ms = c.principal.exp.saturating_mul(1000).saturating_add(grace_ms);
        if now_ns / 1_000_000 < deadline_ms {
            return false;
        }
        self.stats.expiries += 1;
        self.terminate(key, Reason::TokenExpired);
        true
    }

    /// Fires every timer due by now: `token_expiring` notices, closes with 4001 at the
    /// deadline, and the lame-duck phase's `shutdown` + 1001. Runs on the shard loop, between dispatches.
    pub fn advance_timers(&mut self) {
        if self.wheel.is_empty() {
            return;
        }
        let now_ms = self.wheel_now_ms();
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.advance(now_ms, &mut fired);
        for ev in fired.drain(..) {
            let Some(c) = self.conns.get_mut(ev.key) else {
                continue;
            };
            if c.serial != ev.serial || c.out.is_closed() {
                continue;
            }
            match ev.kind {
                TimerKind::Expiring => {
                    c.expiring_timer = None;
                    let exp = c.principal.exp;
                    self.send(ev.key, &ServerMsg::TokenExpiring { exp });
                }
                TimerKind::Expire => {
                    c.expire_timer = None;
                    self.stats.expiries += 1;
                    self.terminate(ev.key, Reason::TokenExpired);
                }
                TimerKind::LameDuck => {
                    let Some(ld) = self.lame_duck.as_ref() else { continue };
                    ld.notified.fetch_add(1, Ordering::Relaxed);
                    let max = ld.reconnect_after_max_ms;
                    self.send_shutdown(ev.key, max);
                }
            }
        }
        self.fired = fired;
    }

    /// Ends a connection now: whatever is queued and not yet handed to the socket is
    /// dropped (no data after the decision), the close is queued, a writer blocked on a
    /// stalled socket is aborted, and the connection leaves the index.
    pub(super) fn terminate(&mut self, key: ConnKey, why: Reason) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if c.out.is_closed() {
            return;
        }
        c.out.discard_and_close(why.code(), why.reason());
        c.rare = None;
        c.notify.notify_one();
        c.kill.notify_one();
        let subs: Vec<((u16, u32), super::core::Sub)> = c.subs.drain().collect();
        for ((f, i), pos) in subs {
            self.unindex(key, f, i, pos);
        }
        self.cancel_token_timers(key);
    }

    /// Closes every connection of `sub` (when given) or carrying `jti` (when given) with
    /// 4003. Returns how many were closed.
    pub fn revoke(&mut self, sub: Option<&str>, jti: Option<&str>) -> usize {
        let keys: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.out.is_closed())
            .filter(|(_, c)| {
                sub.is_some_and(|s| c.principal.sub == s) || jti.is_some_and(|j| c.principal.jti.as_deref() == Some(j))
            })
            .map(|(k, _)| k)
            .collect();
        for &k in &keys {
            self.terminate(k, Reason::TokenRevoked);
        }
        self.stats.revocations += keys.len() as u64;
        keys.len()
    }

    /// Starts shutdown: every connection not yet closing gets `shutdown` with a jittered
    /// reconnect delay, then close 1001. After a lame-duck phase these are the connections
    /// whose moment had not come yet (and any that registered after it began); those told
    /// during the phase are closing already and are skipped, so none gets `shutdown` twice.
    pub fn shutdown_all(&mut self, reconnect_after_max_ms: u64) {
        self.draining = true;
        let keys: Vec<ConnKey> = self.conns.iter().filter(|(_, c)| !c.out.is_closed()).map(|(k, _)| k).collect();
        for key in keys {
            self.send_shutdown(key, reconnect_after_max_ms);
        }
    }

    /// Queues `shutdown` (reconnect hint jittered in 1000..=`reconnect_after_max_ms`, so
    /// the clients of one node do not all come back at once) and close 1001, after what
    /// is already queued for the connection; nothing is queued after it (it leaves the
    /// index).
    fn send_shutdown(&mut self, key: ConnKey, reconnect_after_max_ms: u64) {
        let jitter = if reconnect_after_max_ms > 1000 {
            rand::random_range(1000..=reconnect_after_max_ms)
        } else {
            reconnect_after_max_ms
        };
        self.send(key, &ServerMsg::Shutdown { reconnect_after_ms: jitter });
        // No kill here: the `shutdown` message must reach the client. A client stuck
        // on a full socket is dropped when the drain time runs out instead.
        self.close(key, Reason::ShuttingDown);
    }

    /// Starts a lame-duck phase of `window_ms`: the shard refuses new streams, and each of
    /// its open connections is given its own moment within the window, on the timer
    /// wheel, to be sent `shutdown` and close 1001 (`send_shutdown`). Until
    /// then it streams as before. `notified` counts the connections told (all shards).
    ///
    /// The spreading is stratified, not merely random: of the shard's `n` open connections
    /// (in slab order; any order will do), connection `i` fires at `(i + u) / n × window`
    /// with `u` uniform in [0, 1), one per `window / n` stratum. So the clients leave at an
    /// even rate however few the shard has (independent random offsets bunch up for small
    /// `n`), and `u` keeps the shards, which all start at the same moment, from firing in
    /// lock-step. A timer never fires early (deadlines round up to the wheel's tick), so
    /// `t` into the window at most ⌊t / window × n⌋ + 1 of them have been told (the strata
    /// begun by then, the one beginning at `t` included); a busy thread
    /// only tells them later. What has not fired when the phase ends is told by
    /// [`ShardCore::shutdown_all`]; a timer of a connection that is closing or gone by then
    /// finds it so and does nothing.
    ///
    /// What such a client gets: every record dispatched up to its `shutdown`, in order,
    /// and nothing after it (the close follows at once); it resumes by seq on another node.
    pub fn lame_duck(&mut self, window_ms: u64, reconnect_after_max_ms: u64, notified: Arc<AtomicUsize>) {
        self.draining = true;
        self.lame_duck = Some(LameDuck { reconnect_after_max_ms, notified });
        let now_ms = self.wheel_now_ms();
        let open: Vec<(ConnKey, u64)> =
            self.conns.iter().filter(|(_, c)| !c.out.is_closed()).map(|(k, c)| (k, c.serial)).collect();
        let n = open.len() as f64;
        for (i, (key, serial)) in open.into_iter().enumerate() {
            let u: f64 = rand::random();
            let at_ms = ((i as f64 + u) / n * window_ms as f64) as u64;
            self.wheel.schedule(now_ms + at_ms, TimerEvent { key, serial, kind: TimerKind::LameDuck });
        }
    }

    /// The first half of an in-band `refresh`: the rate limit. `true`: the caller now
    /// validates the token (outside the core, possibly waiting for a JWKS refetch) and
    /// hands the outcome to [`ShardCore::refresh_apply`]; `false`: the refresh was answered
    /// (`rate_limited`, or refresh unavailable) and nothing else is to be done.
    pub fn refresh_begin(&mut self, key: ConnKey, id: Option<i64>) -> bool {
        if !self.limits.refresh_offered {
            self.send_error(key, id, ErrorCode::InvalidToken, "token refresh is not available".into());
            return false;
        }
        let min_gap = Duration::from_millis(self.limits.min_refresh_interval_ms);
        let Some(conn) = self.conns.get_mut(key) else {
            return false;
        };
        if conn.last_refresh.is_some_and(|t| t.elapsed() < min_gap) {
            self.stats.refresh_rate_limited += 1;
            let msg = format!(
                "at most one refresh per {} ms; the current token stays in force",
                self.limits.min_refresh_interval_ms
            );
            self.send_error(key, id, ErrorCode::RateLimited, msg);
            return false;
        }
        conn.last_refresh = Some(Instant::now());
        true
    }

    /// The second half of an in-band `refresh`: applies the validated token (or its
    /// refusal, which leaves the current token and deadline in force). The new principal
    /// must have the same `iss` and `sub`; feeds it no longer covers are unsubscribed
    /// (`scope_revoked`) and its `exp` replaces the deadline.
    pub fn refresh_apply(&mut self, key: ConnKey, id: Option<i64>, validated: Result<Principal, AuthError>) {
        // The validation may have waited (a JWKS refetch); a connection whose close was
        // decided meanwhile (expiry, revocation) stays closed.
        let Some(conn) = self.conns.get(key).filter(|c| !c.out.is_closed()) else {
            return;
        };
        let (iss, sub) = (conn.principal.iss.clone(), conn.principal.sub.clone());
        let p = match validated {
            Ok(p) => p,
            Err(e) => {
                self.stats.refresh_refused += 1;
                return self.send_error(key, id, ErrorCode::InvalidToken, e.to_string());
            }
        };
        if p.iss != iss || p.sub != sub {
            self.stats.refresh_refused += 1;
            return self.send_error(
                key,
                id,
                ErrorCode::InvalidToken,
                "refresh token must have the same iss and sub".into(),
            );
        }
        // Feeds the new token no longer covers are unsubscribed, the rest stream on.
        let catalog = self.catalog.clone();
        for feed in catalog.feeds().iter().filter(|f| !p.entitlements.can_read(f.name())) {
            let fi = feed.idx as u16;
            let Some(conn) = self.conns.get(key) else {
                return;
            };
            let mut is: Vec<u32> = conn.subs.keys().filter(|(cf, _)| *cf == fi).map(|(_, i)| *i).collect();
            if is.is_empty() {
                continue;
            }
            is.sort_unstable();
            let removed = self.drop_subs(key, fi, &is);
            let symbols = removed.iter().map(|&i| feed.symbol(i).to_owned()).collect();
            self.send(
                key,
                &ServerMsg::Unsubscribed {
                    id: None,
                    feed: feed.name().to_owned(),
                    symbols,
                    reason: "scope_revoked".into(),
                },
            );
        }
        let feeds = self.feeds_for(&p.entitlements);
        let exp = p.exp;
        if let Some(conn) = self.conns.get_mut(key) {
            conn.principal = p;
        }
        // The new token's exp replaces the deadline (and re-arms token_expiring).
        self.cancel_token_timers(key);
        self.schedule_token_timers(key);
        self.stats.refresh_ok += 1;
        self.send(key, &ServerMsg::Refreshed { id, exp, feeds });
    }

    pub(super) fn feeds_for(&self, ent: &Entitlements) -> Vec<FeedInfo> {
        self.catalog
            .feeds()
            .iter()
            .filter(|f| ent.can_read(f.name()))
            .map(|f| FeedInfo { name: f.name().to_owned(), id: f.id(), epoch: f.epoch() })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::auth::validate::Principal;
    use crate::engine::outbound::OutItem;
    use crate::engine::testkit::{core, drain, principal, subscribe, texts, tick};
    use tickgate_proto::close;
    use tickgate_proto::now_ns;

    /// Expiry on the wheel with paused time: `token_expiring` once at 80-90 % of the
    /// lifetime, close 4001 at exp, and nothing queued for the connection after that.
    #[tokio::test(start_paused = true)]
    async fn expiry_notice_then_close_then_nothing() {
        let mut core = core();
        let now = now_ns() / 1_000_000_000;
        // A 10 s token issued now (the wall clock does not move; the wheel clock does).
        let h = core.add_conn(principal(now, now + 10), "s1".into());
        core.handle(h.key, subscribe(&["A"]));
        drain(&mut core, h.key);
        assert_eq!(core.timer_count(), 2);
        let mut notice_at = None;
        let mut seq = 0;
        // Step 10 ms at a time; the true deadline is somewhere in the current second, so
        // the close comes between 9 and 10 s from now (exp is whole seconds).
        for step in 1..=1100u64 {
            tokio::time::advance(Duration::from_millis(10)).await;
            seq += 1;
            core.dispatch(&tick(seq));
            core.end_cycle();
            core.advance_timers();
            let items = drain(&mut core, h.key);
            for t in texts(&items) {
                if t.contains("token_expiring") {
                    assert!(notice_at.is_none(), "token_expiring sent twice");
                    notice_at = Some(step * 10);
                }
            }
            if let Some(OutItem::Close { code, .. }) = items.last() {
                assert_eq!(*code, close::TOKEN_EXPIRED);
                let at = step * 10;
                assert!((8_980..=10_000).contains(&at), "closed at {at} ms");
                let n = notice_at.expect("notice before the close");
                assert!((7_000..=9_010).contains(&n), "notice at {n} ms");
                // After the close nothing more is queued, whatever is dispatched.
                for s in 1..=10 {
                    core.dispatch(&tick(seq + s));
                }
                core.advance_timers();
                assert!(core.pop(h.key).is_none(), "data queued after the deadline");
                assert_eq!(core.timer_count(), 0);
                assert_eq!(core.stats.expiries, 1);
                return;
            }
            assert!(items.iter().all(|i| !matches!(i, OutItem::Close { .. })), "close before the deadline");
        }
        panic!("never closed");
    }

    /// Removing a connection cancels its timers; a reused slab key is never hit by a
    /// stale timer.
    #[tokio::test(start_paused = true)]
    async fn removed_connections_leave_no_timers() {
        let mut core = core();
        let now = now_ns() / 1_000_000_000;
        let a = core.add_conn(principal(now, now + 2), "a".into());
        core.remove_conn(a.key);
        assert_eq!(core.timer_count(), 0);
        let b = core.add_conn(principal(now, now + 100), "b".into());
        assert_eq!(b.key, a.key, "slab key reused");
        tokio::time::advance(Duration::from_secs(5)).await;
        core.advance_timers();
        let items = drain(&mut core, b.key);
        assert!(items.iter().all(|i| !matches!(i, OutItem::Close { .. })));
    }

    /// The lame-duck phase on the wheel, with paused time: the connections are told one per
    /// stratum of the window (at most ⌊t / window × n⌋ + 1 by `t`, never all at once), each
    /// gets its records up to `shutdown`, then `shutdown` and 1001 and nothing after; a
    /// connection closing already is left alone, and `shutdown_all` at the end tells only
    /// those not told yet.
    #[tokio::test(start_paused = true)]
    async fn lame_duck_tells_one_connection_per_stratum() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let mut core = core();
        let keys: Vec<_> = (0..10)
            .map(|i| {
                let h = core.add_conn(Principal::unauthenticated(&format!("c{i}"), "i"), format!("s{i}"));
                core.handle(h.key, subscribe(&["A"]));
                drain(&mut core, h.key);
                h.key
            })
            .collect();
        // One connection closing already (revoked): not scheduled, not told.
        let now = now_ns() / 1_000_000_000;
        let revoked = core.add_conn(principal(now, now + 1000), "r".into());
        assert_eq!(core.revoke(None, Some("j")), 1);
        drain(&mut core, revoked.key);
        let notified = Arc::new(AtomicUsize::new(0));
        core.lame_duck(1000, 3000, notified.clone());
        assert!(core.is_draining(), "new streams are refused from the start of the phase");
        let mut told = vec![None; keys.len()];
        let mut seq = 0;
        for step in 1..=150u64 {
            tokio::time::advance(Duration::from_millis(10)).await;
            seq += 1;
            core.dispatch(&tick(seq));
            core.end_cycle();
            core.advance_timers();
            for (k, key) in keys.iter().enumerate() {
                let items = drain(&mut core, *key);
                if told[k].is_some() {
                    assert!(items.is_empty(), "something queued after the close: {items:?}");
                    continue;
                }
                let t = texts(&items);
                if let Some(pos) = t.iter().position(|m| m.contains("\"shutdown\"")) {
                    assert_eq!(pos, t.len() - 1, "`shutdown` is the last text: {t:?}");
                    assert!(matches!(items.last(), Some(OutItem::Close { code: 1001, .. })), "{items:?}");
                    told[k] = Some(step * 10);
                } else {
                    assert!(items.iter().any(|i| matches!(i, OutItem::Batch(..))), "still streaming at {step}0 ms");
                }
            }
            let by_now = told.iter().filter(|t| t.is_some()).count();
            // ⌊t / 1000 × 10⌋ + 1 strata have begun by t (ms), the one starting at t
            // included: a connection whose `u` is (nearly) 0 fires on its stratum's first tick.
            assert!(by_now <= (step * 10 / 100 + 1) as usize, "{by_now} told by {step}0 ms: {told:?}");
        }
        assert!(told.iter().all(Option::is_some), "every connection told within the window: {told:?}");
        assert_eq!(notified.load(Ordering::Relaxed), keys.len());
        // The end of the phase tells nobody twice.
        core.shutdown_all(3000);
        for key in keys.iter().chain([&revoked.key]) {
            assert!(drain(&mut core, *key).is_empty());
        }
    }

    /// Revocation closes matching connections with 4003 and discards their backlog.
    #[tokio::test]
    async fn revoke_by_sub_and_jti() {
        let mut core = core();
        let now = now_ns() / 1_000_000_000;
        let mut p2 = principal(now, now + 100);
        p2.jti = Some("other".into());
        let mut p3 = principal(now, now + 100);
        p3.sub = "someone-else".into();
        p3.jti = Some("third".into());
        let a = core.add_conn(principal(now, now + 100), "a".into());
        let b = core.add_conn(p2, "b".into());
        let c = core.add_conn(p3, "c".into());
        for k in [a.key, b.key, c.key] {
            drain(&mut core, k);
        }
        assert_eq!(core.revoke(None, Some("j")), 1);
        assert!(matches!(drain(&mut core, a.key).as_slice(), [OutItem::Close { code: 4003, .. }]));
        assert_eq!(core.revoke(Some("s"), None), 1, "a is already closing; b matches by sub");
        assert!(matches!(drain(&mut core, b.key).as_slice(), [OutItem::Close { code: 4003, .. }]));
        assert!(drain(&mut core, c.key).is_empty());
        assert_eq!(core.stats.revocations, 2);
    }

    /// The writer's check: a connection past its deadline (exp + grace) is closed 4001 at
    /// the write, whatever the wheel did; one before it, or one that never expires, is not.
    #[tokio::test]
    async fn the_writer_never_writes_past_the_deadline() {
        let mut core = core();
        let now_s = now_ns() / 1_000_000_000;
        let late = core.add_conn(principal(now_s - 10, now_s - 1), "late".into());
        let fine = core.add_conn(principal(now_s, now_s + 100), "fine".into());
        let never = core.add_conn(Principal::unauthenticated("n", "i"), "never".into());
        for k in [late.key, fine.key, never.key] {
            drain(&mut core, k);
        }
        let now = now_ns();
        assert!(core.expire_if_due(late.key, now));
        assert!(matches!(drain(&mut core, late.key).as_slice(), [OutItem::Close { code: 4001, .. }]));
        assert!(!core.expire_if_due(late.key, now), "already closing");
        assert!(!core.expire_if_due(fine.key, now));
        assert!(core.expire_if_due(fine.key, (now_s + 100) * 1_000_000_000), "at the deadline itself");
        assert!(!core.expire_if_due(never.key, u64::MAX));
        assert_eq!(core.stats.expiries, 2);
    }
}
