//! One session lifecycle for stream and publisher connections, decided at the edge.
//!
//! A session is who (the validated [`Principal`]: `sub`, `jti`, entitlements), until when
//! (its `Deadline`: `exp` + `auth.expiry_grace_ms`, the validator's [`TimeRules`]) and
//! how it ends (`SessionEnd`: expired → 4001, revoked → 4003, shutdown → 1001). Ends
//! that are not the token's (slow consumer, heartbeat, strikes, protocol errors) stay
//! with the connection that decides them.
//!
//! This module holds (only [`EdgeSessions`] is public: `AppState` holds it):
//! - `Session`: the principal, its deadline and the session id, built once the token is
//!   validated (handshake or in-band `auth`);
//! - `Deadline` and `SessionEnd`;
//! - [`EdgeSessions`]: the sessions the edge keeps itself (publishers), so `/admin/revoke`
//!   reaches them; registration is a `Registration` that leaves the registry on drop;
//! - `revoke_live`: `/admin/revoke`'s one call that ends the matching live sessions of
//!   both kinds (publishers here, streams through `EngineCtl`);
//! - `EdgeWatch`: what ends an edge-kept session (shutdown, revocation, the deadline),
//!   one future for the connection loop;
//! - `begin_refresh` / `PendingRefresh`: an in-band refresh token validated at the
//!   edge (it may wait for a JWKS refetch) whose outcome the engine applies;
//! - `ws`: the WebSocket loop skeleton both kinds of connection run, over `sock`'s
//!   upgraded socket (plain TCP unwrapped from hyper's upgrade, TLS behind it).
//!
//! Where each kind keeps its deadline and revocation: a stream's session is handed to its
//! shard ([`crate::engine::ShardHandle::open`] takes the principal, never a token), whose
//! timer wheel keeps the deadline (one wheel entry rather than one timer per connection,
//! and the close must discard what is queued); revocation reaches it through
//! [`crate::engine::EngineCtl`]. A publisher's session stays here: its deadline is an
//! `EdgeWatch` sleep in the same connection loop, its revocation an [`EdgeSessions`]
//! entry. Both compute the deadline the same way (`exp * 1000 + expiry_grace_ms`).

pub(crate) mod sock;
pub(crate) mod ws;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::AppState;
use crate::auth::validate::{AuthError, Principal, TimeRules, Validator};
use tickgate_proto::close;
use tickgate_proto::now_ns;

/// The longest sleep a deadline arms: a principal that never expires (`exp = u64::MAX`,
/// the benchmark-only no-auth mode) would otherwise overflow the timer.
const FOREVER: Duration = Duration::from_secs(10 * 365 * 86_400);

/// How a session's token ends its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// The deadline (`exp` + grace) passed: 4001 `token expired`.
    Expired,
    /// `/admin/revoke` named the session's `sub` or `jti`: 4003 `token revoked`.
    Revoked,
    /// The server is shutting down: 1001 `server shutting down`.
    Shutdown,
}

impl SessionEnd {
    /// The close this end sends (the engine sends the same for streams).
    pub(crate) const fn close(self) -> close::Reason {
        match self {
            SessionEnd::Expired => close::Reason::TokenExpired,
            SessionEnd::Revoked => close::Reason::TokenRevoked,
            SessionEnd::Shutdown => close::Reason::ShuttingDown,
        }
    }
}

/// When a session's token stops being good: `exp` + `expiry_grace_ms`, in wall-clock
/// milliseconds, to the millisecond like a presented token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deadline {
    /// Milliseconds since the epoch; `u64::MAX`-ish (saturated) for a principal that never
    /// expires.
    at_ms: u64,
}

impl Deadline {
    /// The deadline of a token with this `exp` under these rules.
    pub(crate) fn of(times: &TimeRules, exp: u64) -> Deadline {
        Deadline { at_ms: times.deadline_ms(exp) }
    }

    /// Whether the deadline has passed at `now_ms` (wall clock).
    pub(crate) fn is_past(self, now_ms: u64) -> bool {
        now_ms >= self.at_ms
    }

    /// How long from `now_ms` until the deadline (zero once past), capped so a deadline
    /// that never comes can still arm a timer.
    pub(crate) fn remaining(self, now_ms: u64) -> Duration {
        Duration::from_millis(self.at_ms.saturating_sub(now_ms)).min(FOREVER)
    }

    /// A timer on the runtime's clock that fires at the deadline. Wall-clock time is
    /// turned into an offset once, here.
    pub(crate) fn sleep(self) -> tokio::time::Sleep {
        tokio::time::sleep(self.remaining(now_ns() / 1_000_000))
    }
}

/// A validated session: who, until when, and the id the logs and the `welcome` name it by.
#[derive(Debug)]
pub(crate) struct Session {
    /// The session id (`s-` and 16 hex digits).
    pub(crate) id: String,
    /// Who: `sub`, `jti`, entitlements.
    pub(crate) principal: Principal,
    /// Until when.
    pub(crate) deadline: Deadline,
}

impl Session {
    /// A session for a validated principal, its deadline by the validator's rules.
    pub(crate) fn new(validator: &Validator, principal: Principal) -> Session {
        let deadline = Deadline::of(validator.times(), principal.exp);
        Session { id: format!("s-{:016x}", rand::random::<u64>()), principal, deadline }
    }
}

/// The validation of an in-band refresh token: the request id and the outcome.
pub(crate) type PendingRefresh = Pin<Box<dyn Future<Output = (Option<i64>, RefreshOutcome)>>>;
/// A validated refresh token (the new principal: entitlements and `exp`), or its refusal.
pub(crate) type RefreshOutcome = Result<Principal, AuthError>;

/// Starts validating a refresh token at the edge (it may wait for a JWKS refetch); the
/// connection polls it beside its other work and hands the outcome to the engine
/// ([`crate::engine::ConnGuard::refresh_apply`]), which checks `iss`/`sub` and applies the
/// new entitlements and deadline. One box per refresh, never per frame.
pub(crate) fn begin_refresh(validator: &Arc<Validator>, id: Option<i64>, token: String) -> PendingRefresh {
    let validator = validator.clone();
    Box::pin(async move { (id, validator.validate_async(&token).await) })
}

/// A session the edge keeps, as revocation sees it.
#[derive(Debug)]
struct Live {
    sub: String,
    jti: Option<String>,
    /// Cancelled by a revocation: the connection closes with 4003.
    revoked: CancellationToken,
}

/// The sessions the edge keeps itself (publishers; streams' sessions are on their
/// shards), by registration id. Touched once per connect and close, and by
/// `/admin/revoke`; never per message.
#[derive(Debug, Default)]
pub struct EdgeSessions {
    /// Shared with every [`Registration`], which removes its entry when dropped.
    live: Arc<Mutex<HashMap<u64, Live>>>,
    next_id: AtomicU64,
}

/// Locks the registry. Each update is one insert or remove: the map is consistent after
/// a panic, so a poisoned lock is taken as it is.
fn lock(live: &Mutex<HashMap<u64, Live>>) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
    live.lock().unwrap_or_else(|p| p.into_inner())
}

impl EdgeSessions {
    /// Registers a session; it leaves the registry when the returned registration drops.
    pub(crate) fn register(&self, principal: &Principal) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let revoked = CancellationToken::new();
        let live = Live { sub: principal.sub.clone(), jti: principal.jti.clone(), revoked: revoked.clone() };
        lock(&self.live).insert(id, live);
        Registration { live: self.live.clone(), id, revoked }
    }

    /// Ends (4003) every session of `sub` (when given) or whose token has `jti` (when
    /// given). Returns how many were told to close.
    pub fn revoke(&self, sub: Option<&str>, jti: Option<&str>) -> usize {
        let live = lock(&self.live);
        let mut n = 0;
        for p in live.values().filter(|p| !p.revoked.is_cancelled()) {
            if sub.is_some_and(|s| p.sub == s) || jti.is_some_and(|j| p.jti.as_deref() == Some(j)) {
                p.revoked.cancel();
                n += 1;
            }
        }
        n
    }
}

/// How many live sessions a revocation ended, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RevokedLive {
    /// Stream connections (closed by their shards).
    pub(crate) streams: usize,
    /// Publisher connections (closed by their [`EdgeWatch`]).
    pub(crate) publishers: usize,
}

/// Ends every live session of `sub` (when given) or carrying `jti` (when given) with
/// 4003, wherever it is kept: the edge's own first (publishers; counted in
/// `tickgate_revocations_total` here), then the shards' (streams, through
/// [`crate::engine::EngineCtl`]; each shard counts its own).
pub(crate) async fn revoke_live(app: &AppState, sub: Option<&str>, jti: Option<&str>) -> RevokedLive {
    let publishers = app.publishers.revoke(sub, jti);
    app.metrics.revocations.inc_by(publishers as u64);
    let streams = app.engine.revoke(sub, jti).await;
    RevokedLive { streams, publishers }
}

/// A session's place in [`EdgeSessions`], given back when dropped (every exit path of the
/// connection task, a panic included).
#[derive(Debug)]
pub(crate) struct Registration {
    live: Arc<Mutex<HashMap<u64, Live>>>,
    id: u64,
    revoked: CancellationToken,
}

impl Registration {
    /// Cancelled when the session is revoked.
    pub(crate) fn revoked(&self) -> &CancellationToken {
        &self.revoked
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.live).remove(&self.id);
    }
}

/// What ends a session the edge keeps: shutdown, revocation, the deadline. Polled by the
/// connection loop as one branch ([`EdgeWatch::ended`] is cancel-safe: the deadline's
/// timer is kept across polls).
#[derive(Debug)]
pub(crate) struct EdgeWatch {
    shutdown: CancellationToken,
    revoked: CancellationToken,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl EdgeWatch {
    /// Watches `shutdown`, the registration's revocation and the session's deadline.
    pub(crate) fn new(session: &Session, registration: &Registration, shutdown: CancellationToken) -> EdgeWatch {
        EdgeWatch {
            shutdown,
            revoked: registration.revoked().clone(),
            // Boxed once per connection so the watch can move; polled in place after.
            deadline: Box::pin(session.deadline.sleep()),
        }
    }

    /// Resolves when the session must end, and why.
    pub(crate) async fn ended(&mut self) -> SessionEnd {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => SessionEnd::Shutdown,
            _ = self.revoked.cancelled() => SessionEnd::Revoked,
            _ = self.deadline.as_mut() => SessionEnd::Expired,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(grace_ms: u64) -> TimeRules {
        TimeRules { leeway_s: 0, expiry_grace_ms: grace_ms, max_lifetime_s: 3600 }
    }

    #[test]
    fn deadline_is_exp_plus_grace_to_the_millisecond() {
        let d = Deadline::of(&rules(1_500), 1_000);
        assert_eq!(d, Deadline { at_ms: 1_001_500 });
        assert!(!d.is_past(1_001_499));
        assert!(d.is_past(1_001_500));
        assert_eq!(d.remaining(1_001_000), Duration::from_millis(500));
        assert_eq!(d.remaining(2_000_000), Duration::ZERO);
        let never = Deadline::of(&rules(1_500), u64::MAX);
        assert!(!never.is_past(u64::MAX - 1));
        assert_eq!(never.remaining(0), FOREVER, "a principal that never expires still arms a timer");
    }

    #[test]
    fn ends_close_as_the_engine_closes_streams() {
        let pair = |end: SessionEnd| (end.close().code(), end.close().reason());
        assert_eq!(pair(SessionEnd::Expired), (4001, "token expired"));
        assert_eq!(pair(SessionEnd::Revoked), (4003, "token revoked"));
        assert_eq!(pair(SessionEnd::Shutdown), (1001, "server shutting down"));
    }

    #[test]
    fn revocation_matches_sub_or_jti_once_and_registrations_leave_on_drop() {
        let sessions = EdgeSessions::default();
        let mut a = Principal::unauthenticated("alice", "iss");
        a.jti = Some("j1".into());
        let b = Principal::unauthenticated("bob", "iss");
        let ra = sessions.register(&a);
        let rb = sessions.register(&b);
        assert_eq!(sessions.revoke(None, Some("j1")), 1);
        assert!(ra.revoked().is_cancelled() && !rb.revoked().is_cancelled());
        assert_eq!(sessions.revoke(Some("alice"), None), 0, "already told to close");
        drop(rb);
        assert_eq!(sessions.revoke(Some("bob"), None), 0, "a dropped registration is gone");
    }

    #[tokio::test(start_paused = true)]
    async fn watch_ends_at_the_deadline_unless_revoked_or_shut_down_first() {
        let sessions = EdgeSessions::default();
        let mut p = Principal::unauthenticated("alice", "iss");
        p.exp = now_ns() / 1_000_000_000 + 60;
        let validator_rules = rules(0);
        let session = Session { id: "s-1".into(), deadline: Deadline::of(&validator_rules, p.exp), principal: p };
        let reg = sessions.register(&session.principal);
        let shutdown = CancellationToken::new();
        let mut watch = EdgeWatch::new(&session, &reg, shutdown.clone());
        assert_eq!(watch.ended().await, SessionEnd::Expired);

        let mut watch = EdgeWatch::new(&session, &reg, shutdown.clone());
        sessions.revoke(Some("alice"), None);
        assert_eq!(watch.ended().await, SessionEnd::Revoked);
        shutdown.cancel();
        assert_eq!(watch.ended().await, SessionEnd::Shutdown, "shutdown comes first");
    }
}
