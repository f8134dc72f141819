//! Cluster-wide revocation (nats-feeds-v1 §3): `POST /admin/revoke` on any edge is stored
//! in the JetStream key-value bucket `tickgate_revocations`, and every edge applies what it
//! sees there.
//!
//! - **Keys and values.** `sub.<base64url of the sub>` or `jti.<base64url of the jti>`
//!   (URL-safe alphabet, no padding: every character is one a KV key may hold), value JSON
//!   `{"at": <unix s>, "by": "<admin sub>"}`. The bucket keeps one value per key (history 1)
//!   and lets an entry expire after the longest token lifetime plus the clock leeway
//!   (`auth.max_lifetime_s + auth.leeway_s`): by then no token it could refuse is valid.
//! - **Writes.** The admin handler applies a revocation locally first, then
//!   `ClusterRevocations::store` tries one synchronous write (`stored`). When NATS is
//!   unreachable (or the write fails or is slow) the entry waits in a bounded queue of
//!   pending writes, deduplicated by key, which a task retries until JetStream has it
//!   (`pending`); a full queue refuses the entry (`queue_full`: the caller answers 503).
//! - **Watch.** One task per edge creates the bucket when missing, loads every current
//!   entry (the edge is not ready before: [`super::NatsHealth`]), then follows new ones. It
//!   starts over (reading the whole bucket again) after each NATS reconnect or when the
//!   watch ends. Each entry is applied through the caller's [`Apply`] (the admin call's own code
//!   path); applying is idempotent: an entry already held (our own write, or one seen
//!   before a reconnect) changes nothing and closes nothing.
//! - **Bad entries** (a key or value some other program wrote wrong) are counted in
//!   `tickgate_revocations_cluster_total{result="bad_entry"}`, logged (the key, cut short),
//!   and skipped; they never stop the watch.
//!
//! Deleting or purging an entry does not un-revoke anything on edges that already applied
//! it; it only keeps edges started later from loading it.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, kv};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;
use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::NatsHealth;
use crate::config::{Config, NatsConfig, NatsStorage};
use crate::metrics::Metrics;

/// The bucket's name.
pub const BUCKET: &str = "tickgate_revocations";
/// Longest `sub` or `jti` an entry may name (bytes): the bound `/admin/revoke` applies.
pub const MAX_ID_LEN: usize = 256;
/// Distinct keys the queue of pending writes holds at most.
pub const MAX_PENDING: usize = 10_000;
/// How long the admin call waits for its synchronous write before queueing it instead.
const SYNC_WRITE: Duration = Duration::from_millis(1_000);
/// How long one retried write may take.
const RETRY_WRITE: Duration = Duration::from_secs(2);
/// Pause between rounds of retried writes.
const RETRY_EVERY: Duration = Duration::from_millis(250);
/// Labels of `tickgate_revocations_cluster_total{result}`.
pub(crate) const RESULTS: [&str; 7] =
    ["stored", "pending", "stored_later", "queue_full", "applied_from_cluster", "bad_entry", "list_full"];

/// What a revocation names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every token of this subject issued at or before the revocation.
    Sub(String),
    /// The token with this id.
    Jti(String),
}

/// One revocation, as kept in the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// What is revoked.
    pub target: Target,
    /// When (unix seconds), on the edge that took the admin call.
    pub at: u64,
    /// The admin's `sub`.
    pub by: String,
}

/// Why a bucket entry was skipped.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BadEntry {
    /// Not `sub.<b64>` / `jti.<b64>`, or the identifier is not base64url of 1 to
    /// [`MAX_ID_LEN`] bytes of UTF-8.
    #[error("bad key")]
    Key,
    /// The value is not `{"at": <unix s>, "by": "..."}`.
    #[error("bad value: {0}")]
    Value(String),
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Value {
    at: u64,
    by: String,
}

impl Revocation {
    /// The bucket key.
    pub fn key(&self) -> String {
        match &self.target {
            Target::Sub(s) => format!("sub.{}", URL_SAFE_NO_PAD.encode(s)),
            Target::Jti(j) => format!("jti.{}", URL_SAFE_NO_PAD.encode(j)),
        }
    }

    /// The bucket value.
    pub fn value(&self) -> Bytes {
        let v = Value { at: self.at, by: self.by.clone() };
        // Serialising a struct of a number and a string cannot fail.
        Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
    }

    /// An entry read back from the bucket.
    pub fn decode(key: &str, value: &[u8]) -> Result<Revocation, BadEntry> {
        let (kind, b64) = key.split_once('.').ok_or(BadEntry::Key)?;
        let id = URL_SAFE_NO_PAD.decode(b64).map_err(|_| BadEntry::Key)?;
        let id = String::from_utf8(id).map_err(|_| BadEntry::Key)?;
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(BadEntry::Key);
        }
        let target = match kind {
            "sub" => Target::Sub(id),
            "jti" => Target::Jti(id),
            _ => return Err(BadEntry::Key),
        };
        let v: Value = serde_json::from_slice(value).map_err(|e| BadEntry::Value(e.to_string()))?;
        Ok(Revocation { target, at: v.at, by: v.by })
    }
}

/// Applies a revocation seen in the bucket on this edge (the revocation list, tickets and
/// live connections); answers whether it was new here, or the list was full.
pub type Apply = Arc<dyn Fn(Revocation) -> Pin<Box<dyn Future<Output = Applied> + Send>> + Send + Sync>;

/// What applying an entry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It was new here: remembered, and matching connections closed.
    New,
    /// Already held (or too old to matter): nothing changed.
    Known,
    /// The revocation list is full of live entries.
    ListFull,
}

/// What became of the cluster write of an admin call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No NATS configured: the revocation is this edge's alone.
    Off,
    /// JetStream has it.
    Stored,
    /// Queued; written once NATS is back.
    Pending,
    /// The queue of pending writes is full: not stored anywhere but here.
    QueueFull,
}

impl Outcome {
    /// The `cluster` field of the admin answer (`None` without NATS).
    pub fn as_str(self) -> Option<&'static str> {
        match self {
            Outcome::Off => None,
            Outcome::Stored => Some("stored"),
            Outcome::Pending => Some("pending"),
            Outcome::QueueFull => Some("queue_full"),
        }
    }
}

/// The edge's side of the bucket: the store once it exists, the pending writes.
pub struct ClusterRevocations {
    enabled: bool,
    max_age: Duration,
    nats: NatsConfig,
    /// The connection and the bucket, once the watch task has found or created it.
    kv: Mutex<Option<(async_nats::Client, kv::Store)>>,
    /// Key -> value of writes still to do. A later revocation of the same key replaces the
    /// earlier one (its `at` is later, so it refuses at least as much).
    pending: Mutex<BTreeMap<String, Bytes>>,
    wake: Notify,
    results: prometheus::IntCounterVec,
}

impl std::fmt::Debug for ClusterRevocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterRevocations")
            .field("enabled", &self.enabled)
            .field("max_age", &self.max_age)
            .field("pending", &lock(&self.pending).len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update is one insert, remove or replace: consistent even after a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ClusterRevocations {
    /// Cluster-wide whenever `nats.servers` is set (with or without `nats` feeds); the
    /// bucket's entries live `auth.max_lifetime_s + auth.leeway_s`.
    pub(crate) fn new(config: &Config, metrics: &Metrics) -> Arc<ClusterRevocations> {
        for r in RESULTS {
            metrics.revocations_cluster.with_label_values(&[r]);
        }
        Arc::new(ClusterRevocations {
            enabled: !config.nats.servers.is_empty(),
            max_age: Duration::from_secs(config.auth.max_lifetime_s.saturating_add(config.auth.leeway_s)),
            nats: config.nats.clone(),
            kv: Mutex::new(None),
            pending: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
            results: metrics.revocations_cluster.clone(),
        })
    }

    /// Whether revocations go through the bucket.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn count(&self, result: &str) {
        self.results.with_label_values(&[result]).inc();
    }

    fn connected_kv(&self) -> Option<kv::Store> {
        let g = lock(&self.kv);
        let (client, kv) = g.as_ref()?;
        (client.connection_state() == State::Connected).then(|| kv.clone())
    }

    /// Stores an admin call's revocation (already applied here): one synchronous write
    /// when NATS is up, else queued for the retry task.
    pub(crate) async fn store(&self, rev: &Revocation) -> Outcome {
        if !self.enabled {
            return Outcome::Off;
        }
        let (key, value) = (rev.key(), rev.value());
        if let Some(kv) = self.connected_kv() {
            match tokio::time::timeout(SYNC_WRITE, kv.put(&key, value.clone())).await {
                Ok(Ok(_)) => {
                    self.count("stored");
                    return Outcome::Stored;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "revocation not stored in NATS yet; queued"),
                Err(_) => tracing::warn!("revocation not stored in NATS within 1 s; queued"),
            }
        }
        let mut p = lock(&self.pending);
        if !p.contains_key(&key) && p.len() >= MAX_PENDING {
            drop(p);
            self.count("queue_full");
            tracing::error!(
                max = MAX_PENDING,
                "revocation applied on this edge only: the queue of writes waiting for NATS is full"
            );
            return Outcome::QueueFull;
        }
        p.insert(key, value);
        drop(p);
        self.count("pending");
        self.wake.notify_one();
        Outcome::Pending
    }

    /// Writes queued for NATS.
    pub fn pending(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Looks the bucket up again (creating it when missing) after a failed write.
    async fn reensure(&self) {
        let Some(client) = lock(&self.kv).as_ref().map(|(c, _)| c.clone()) else { return };
        let js = jetstream::new(client.clone());
        if let Ok(Ok(store)) = tokio::time::timeout(RETRY_WRITE, ensure_bucket(&js, &self.nats, self.max_age)).await {
            *lock(&self.kv) = Some((client, store));
        }
    }

    /// Retries the pending writes until each is stored; stops on `cancel`.
    async fn write_pending(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(RETRY_EVERY) => {}
            }
            let Some(kv) = self.connected_kv() else { continue };
            let batch: Vec<(String, Bytes)> = lock(&self.pending).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            for (key, value) in batch {
                match tokio::time::timeout(RETRY_WRITE, kv.put(&key, value.clone())).await {
                    Ok(Ok(_)) => {
                        let mut p = lock(&self.pending);
                        // Replaced meanwhile by a later revocation of the same key: that one
                        // still has to be written.
                        if p.get(&key) == Some(&value) {
                            p.remove(&key);
                        }
                        drop(p);
                        self.count("stored_later");
                        tracing::info!(key = %short(&key), "queued revocation stored in NATS");
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "queued revocation not stored yet; retrying");
                        // The bucket may be gone (a NATS restart loses one kept in memory).
                        self.reensure().await;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
    }

    /// The watch task: the bucket found or created, loaded whole (then `health` says so),
    /// then followed; started over (the bucket read whole again) after a reconnect.
    async fn watch(
        self: Arc<Self>,
        client: async_nats::Client,
        health: Arc<NatsHealth>,
        apply: Apply,
        cancel: CancellationToken,
    ) {
        let js = jetstream::new(client.clone());
        let mut reconnects = health.connected_gen();
        loop {
            // The bucket is looked up (or created) again each time the watch starts over: a
            // NATS restart loses a bucket kept in memory.
            let mut backoff = Duration::from_millis(100);
            let store = loop {
                let r = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = ensure_bucket(&js, &self.nats, self.max_age) => r,
                };
                match r {
                    Ok(s) => {
                        health.set_revocations_refused(None);
                        break s;
                    }
                    Err(BucketError::Contract(why)) => {
                        // Not changed behind the operator's back: said, and looked at again
                        // (every 5 s), so that mending the bucket needs no restart.
                        tracing::error!(bucket = BUCKET, error = %why, "NATS: revocation bucket refused; /readyz stays 503");
                        health.set_revocations_refused(Some(why));
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                        }
                    }
                    Err(BucketError::Nats(why)) => {
                        tracing::warn!(error = %why, retry_ms = backoff.as_millis() as u64,
                            "NATS: revocation bucket not ready yet");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            *lock(&self.kv) = Some((client.clone(), store.clone()));
            self.wake.notify_one();
            reconnects.borrow_and_update();
            // Every start reads the whole bucket again (not from the last revision seen: a
            // bucket re-created after a NATS restart numbers from 1 again). Applying is
            // idempotent, so what was seen before changes nothing.
            let mut watch = match self.start_load(&store, &health).await {
                Ok(w) => w,
                Err(why) => {
                    tracing::warn!(error = %why, "NATS: cannot watch the revocation bucket; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    _ = cancel.cancelled() => return,
                    // Reconnected: the watch's consumer may be gone with the old connection.
                    _ = reconnects.changed() => break,
                    // Still loading and nothing came: the entries counted at the start may
                    // have expired meanwhile; look again.
                    _ = tokio::time::sleep(Duration::from_secs(5)), if !health.revocations_loaded() => break,
                    e = watch.next() => e,
                };
                match next {
                    Some(Ok(entry)) => {
                        if entry.operation == kv::Operation::Put {
                            self.take(&entry.key, &entry.value, &apply).await;
                        }
                        if entry.seen_current || entry.delta == 0 {
                            health.set_revocations_loaded();
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "NATS revocation watch error; starting over");
                        break;
                    }
                    None => break,
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// A watch over every current entry and what follows; an empty bucket is loaded at once.
    async fn start_load(&self, store: &kv::Store, health: &NatsHealth) -> Result<kv::Watch, String> {
        // The watch first, then the count: an entry put in between is delivered anyway.
        let watch = store.watch_with_history(">").await.map_err(|e| e.to_string())?;
        let status = store.status().await.map_err(|e| e.to_string())?;
        if status.values() == 0 {
            health.set_revocations_loaded();
        }
        Ok(watch)
    }

    async fn take(&self, key: &str, value: &[u8], apply: &Apply) {
        let rev = match Revocation::decode(key, value) {
            Ok(r) => r,
            Err(e) => {
                self.count("bad_entry");
                tracing::warn!(key = %short(key), error = %e, "revocation bucket entry skipped");
                return;
            }
        };
        let (at, by) = (rev.at, rev.by.clone());
        let target = rev.target.clone();
        match apply(rev).await {
            Applied::New => {
                self.count("applied_from_cluster");
                let (kind, id) = match &target {
                    Target::Sub(s) => ("sub", s.as_str()),
                    Target::Jti(j) => ("jti", j.as_str()),
                };
                tracing::info!(kind, id, at, admin = %by, "revocation from the cluster applied");
            }
            Applied::Known => {}
            Applied::ListFull => {
                self.count("list_full");
                tracing::error!(key = %short(key), "revocation from the cluster not applied: revocation list full");
            }
        }
    }
}

/// A key cut short for a log line (a bad key may be long).
fn short(key: &str) -> String {
    key.chars().take(64).collect()
}

/// Why the bucket cannot be used.
#[derive(Debug)]
enum BucketError {
    /// NATS trouble: retried.
    Nats(String),
    /// An existing bucket contradicts what revocation needs: refused, never changed.
    Contract(String),
}

/// Checks an existing bucket's stream: its entries must outlive every token they can
/// revoke (`max_age` 0, no limit, or at least `auth.max_lifetime_s + auth.leeway_s`), or a
/// revoked token would be accepted again once its entry expired.
fn check_bucket(cfg: &jetstream::stream::Config, max_age: Duration) -> Result<(), String> {
    if !cfg.max_age.is_zero() && cfg.max_age < max_age {
        return Err(format!(
            "its entries expire after {} s, before the tokens they revoke (auth.max_lifetime_s + auth.leeway_s = {} s): \
             a revoked token would be accepted again; raise the bucket's max_age (stream KV_{BUCKET}) or lower \
             auth.max_lifetime_s",
            cfg.max_age.as_secs(),
            max_age.as_secs()
        ));
    }
    if !cfg.subjects.iter().any(|s| s == &format!("$KV.{BUCKET}.>")) {
        return Err(format!("its stream KV_{BUCKET} does not capture $KV.{BUCKET}.> (subjects {:?})", cfg.subjects));
    }
    Ok(())
}

/// The bucket, created when missing (history 1, `max_age`, storage and replicas from
/// `[nats]`). Two edges creating it at once both succeed (the same configuration); an
/// existing bucket is used when [`check_bucket`] accepts it, and refused otherwise.
///
/// The bucket's stream is created here with the configuration async-nats' own
/// `create_key_value` would give it (`KV_<bucket>`, `$KV.<bucket>.>`, roll-ups allowed,
/// deletes denied, direct gets, discard new): that call first asks for the account's
/// information, whose answer async-nats 0.51 cannot read from nats-server 2.9.
async fn ensure_bucket(js: &jetstream::Context, cfg: &NatsConfig, max_age: Duration) -> Result<kv::Store, BucketError> {
    if let Ok(mut stream) = js.get_stream(format!("KV_{BUCKET}")).await {
        let info = stream.info().await.map_err(|e| BucketError::Nats(format!("bucket {BUCKET}: {e}")))?;
        check_bucket(&info.config, max_age).map_err(BucketError::Contract)?;
        return js.get_key_value(BUCKET).await.map_err(|e| BucketError::Nats(format!("bucket {BUCKET}: {e}")));
    }
    let storage = match cfg.stream_storage {
        NatsStorage::File => jetstream::stream::StorageType::File,
        NatsStorage::Memory => jetstream::stream::StorageType::Memory,
    };
    let config = jetstream::stream::Config {
        name: format!("KV_{BUCKET}"),
        description: Some("tickgate revocations (nats-feeds-v1 §3)".to_owned()),
        subjects: vec![format!("$KV.{BUCKET}.>")],
        max_messages_per_subject: 1,
        max_bytes: -1,
        max_message_size: -1,
        max_age,
        storage,
        num_replicas: cfg.stream_replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        ..jetstream::stream::Config::default()
    };
    match js.create_stream(config).await {
        Ok(_) => tracing::info!(bucket = BUCKET, max_age_s = max_age.as_secs(), "NATS: revocation bucket created"),
        Err(e) => tracing::debug!(error = %e, "NATS: revocation bucket not created (another edge may have)"),
    }
    js.get_key_value(BUCKET).await.map_err(|e| BucketError::Nats(format!("bucket {BUCKET}: {e}")))
}

/// Starts the watch and the pending-write tasks on `tasks` with the connection.
pub(crate) fn spawn(
    revs: &Arc<ClusterRevocations>,
    client: async_nats::Client,
    health: &Arc<NatsHealth>,
    apply: Apply,
    tasks: &tokio_util::task::TaskTracker,
    cancel: &CancellationToken,
) {
    tasks.spawn(revs.clone().write_pending(cancel.clone()));
    tasks.spawn(revs.clone().watch(client, health.clone(), apply, cancel.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An existing bucket is taken when its entries outlive the tokens (or never expire)
    /// and it captures the bucket's subjects; otherwise refused with the numbers.
    #[test]
    fn a_bucket_must_keep_revocations_as_long_as_tokens_live() {
        let need = Duration::from_secs(3630);
        let bucket = |max_age_s: u64, subject: &str| jetstream::stream::Config {
            max_age: Duration::from_secs(max_age_s),
            subjects: vec![subject.to_owned()],
            ..jetstream::stream::Config::default()
        };
        let ours = format!("$KV.{BUCKET}.>");
        assert!(check_bucket(&bucket(0, &ours), need).is_ok(), "no age limit");
        assert!(check_bucket(&bucket(3630, &ours), need).is_ok());
        assert!(check_bucket(&bucket(7200, &ours), need).is_ok());
        let short = check_bucket(&bucket(3629, &ours), need).unwrap_err();
        assert!(short.contains("expire after 3629 s") && short.contains("3630 s"), "{short}");
        assert!(check_bucket(&bucket(0, "other.>"), need).unwrap_err().contains("does not capture"));
    }

    #[test]
    fn keys_and_values_round_trip() {
        let r = Revocation { target: Target::Sub("alice/ü+=".into()), at: 1_700_000_000, by: "root".into() };
        let key = r.key();
        assert!(key.starts_with("sub."), "{key}");
        assert!(!key.contains('=') && !key.contains('+') && !key.contains('/'), "{key}");
        assert_eq!(String::from_utf8(r.value().to_vec()).unwrap(), r#"{"at":1700000000,"by":"root"}"#);
        assert_eq!(Revocation::decode(&key, &r.value()), Ok(r));
        let j = Revocation { target: Target::Jti("j-1".into()), at: 5, by: "x".into() };
        assert_eq!(j.key(), "jti.ai0x");
        assert_eq!(Revocation::decode("jti.ai0x", br#"{"at":5,"by":"x"}"#), Ok(j));
    }

    #[test]
    fn bad_entries_are_errors() {
        let v = br#"{"at":5,"by":"x"}"#;
        for key in ["sub", "sub.", "foo.ai0x", "sub.ai0x=", "sub.!!", "sub._w", "jti.ai0x.more"] {
            assert_eq!(Revocation::decode(key, v), Err(BadEntry::Key), "{key}");
        }
        let long = format!("sub.{}", URL_SAFE_NO_PAD.encode("a".repeat(MAX_ID_LEN + 1)));
        assert_eq!(Revocation::decode(&long, v), Err(BadEntry::Key));
        for value in [&b""[..], b"{}", b"[1]", br#"{"at":"5","by":"x"}"#, br#"{"at":-1,"by":"x"}"#, b"\xff"] {
            assert!(matches!(Revocation::decode("sub.ai0x", value), Err(BadEntry::Value(_))), "{value:?}");
        }
    }
}
