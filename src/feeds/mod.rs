//! Feed definitions (`feeds/*.toml`), the catalog built from them, and each feed's log.
//!
//! A feed is loaded once at start into the read-only [`Catalog`]: names, numeric ids and
//! the dense instrument table that the shards index by position, plus the feed's
//! [`FeedLog`] ([`log`]: last seqs and the resume buffer) and its epoch ([`epoch`], kept
//! across restarts). What produces the ticks lives in `crate::sources`.

pub mod epoch;
pub mod log;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::Deserialize;
use thiserror::Error;

use self::log::{FeedLog, RingBounds};

/// The demo feed definition, compiled in so `serve` works from any directory.
pub const EMBEDDED_DEMO: &str = include_str!("../../feeds/demo.toml");

/// A feed definition that could not be loaded.
#[derive(Debug, Error)]
pub enum FeedError {
    /// The folder or a file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not a valid feed definition.
    #[error("invalid feed definition {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Where a feed's ticks come from.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Seeded random walk generated in-process.
    Synthetic,
    /// A recording played back (`[replay]`).
    Replay,
    /// Upstream publishers connect to `GET /v1/publish` (scope `md:publish:<FEED>`).
    Publish,
    /// The feed's JetStream stream `MD_<FEED>` (`[nats]` in the server configuration;
    /// nats-feeds-v1): seqs and epochs come from the feed handler, so every edge numbers
    /// every record alike.
    Nats,
}

/// What happens to a client whose outbound budget is exhausted.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumerPolicy {
    /// Close with 4008.
    #[default]
    Disconnect,
    /// Keep only the latest quote per instrument (flag CONFLATED) and turn trades that
    /// cannot be queued into a `gap` until the client has caught up.
    Conflate,
}

/// `[replay]` section of a feed file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayDef {
    /// The recording, relative to the feed file's folder (or absolute).
    pub file: PathBuf,
    /// Pace: 1.0 is the original pace, 10.0 ten times faster, 0 as fast as the engine
    /// takes it.
    #[serde(default = "default_speed")]
    pub speed: f64,
    /// Start over at the end (each pass is a new epoch: subscribers get `reset`).
    #[serde(default = "default_true", rename = "loop")]
    pub looping: bool,
}

fn default_speed() -> f64 {
    1.0
}

fn default_true() -> bool {
    true
}

/// `[resume]` section of a feed file: the resume buffer's bounds.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeDef {
    /// Most records kept (0 turns resume off for the feed: every resume gets a gap).
    #[serde(default = "default_resume_records")]
    pub records: usize,
    /// Records older than this many seconds are dropped.
    #[serde(default = "default_resume_age")]
    pub max_age_s: u64,
}

fn default_resume_records() -> usize {
    100_000
}

fn default_resume_age() -> u64 {
    300
}

impl Default for ResumeDef {
    fn default() -> Self {
        ResumeDef { records: default_resume_records(), max_age_s: default_resume_age() }
    }
}

/// `[synthetic]` section of a feed file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticDef {
    /// RNG seed: the same seed gives the same tick sequence.
    pub seed: u64,
    /// Ticks per second over all instruments.
    pub rate_per_s: f64,
    /// Fraction of ticks that are quotes (the rest are trades).
    #[serde(default = "default_quote_ratio")]
    pub quote_ratio: f64,
    /// Centre of the instruments' starting mid prices: each starts within $20 of it (at
    /// least $0.10), then walks independently, pulled back towards its own start.
    #[serde(default = "default_start_price")]
    pub start_price: f64,
}

fn default_quote_ratio() -> f64 {
    0.75
}

fn default_start_price() -> f64 {
    100.0
}

/// One feed file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedDef {
    /// Feed name used in scopes and control messages.
    pub name: String,
    /// Numeric id used in records (1..=65535, unique).
    pub id: u16,
    /// The source kind.
    pub source: SourceKind,
    /// Slow-consumer policy.
    #[serde(default)]
    pub policy: SlowConsumerPolicy,
    /// Instrument symbols; instrument ids are their 1-based positions. A replay feed
    /// may leave it out to take the recording's.
    #[serde(default)]
    pub symbols: Vec<String>,
    /// Settings of a synthetic source.
    #[serde(default)]
    pub synthetic: Option<SyntheticDef>,
    /// Settings of a replay source.
    #[serde(default)]
    pub replay: Option<ReplayDef>,
    /// Resume-buffer bounds.
    #[serde(default)]
    pub resume: ResumeDef,
}

/// Whether `s` may name a feed (or a symbol): 1-32 characters of A-Z a-z 0-9 _ - . (so
/// never a space, a comma or a `:`, which scopes and symbol lists use as separators).
pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

impl FeedDef {
    /// Parses and checks one definition.
    pub fn parse(path: &str, text: &str) -> Result<FeedDef, FeedError> {
        let invalid = |message: String| FeedError::Invalid { path: path.to_owned(), message };
        let def: FeedDef = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if !valid_name(&def.name) || def.name == "*" {
            return Err(invalid(format!("feed name `{}` must be 1-32 characters of A-Z a-z 0-9 _ - .", def.name)));
        }
        if def.id == 0 {
            return Err(invalid("feed id must be between 1 and 65535".into()));
        }
        if def.symbols.is_empty() && def.source != SourceKind::Replay {
            return Err(invalid("a feed needs between 1 and 100000 symbols".into()));
        }
        def.check_symbols().map_err(invalid)?;
        if def.resume.records > 10_000_000 {
            return Err(invalid("resume.records must be at most 10000000".into()));
        }
        if def.resume.max_age_s == 0 || def.resume.max_age_s > 86_400 {
            return Err(invalid("resume.max_age_s must be in 1..=86400".into()));
        }
        match (def.source, &def.synthetic, &def.replay) {
            (SourceKind::Synthetic, None, _) => {
                return Err(invalid("source = \"synthetic\" needs a [synthetic] section".into()))
            }
            (SourceKind::Synthetic, Some(s), _) => {
                if !(s.rate_per_s > 0.0 && s.rate_per_s <= 10_000_000.0) {
                    return Err(invalid("synthetic.rate_per_s must be in (0, 10000000]".into()));
                }
                if !(0.0..=1.0).contains(&s.quote_ratio) {
                    return Err(invalid("synthetic.quote_ratio must be in [0, 1]".into()));
                }
                if !(s.start_price > 0.0 && s.start_price < 1e9) {
                    return Err(invalid("synthetic.start_price must be in (0, 1e9)".into()));
                }
            }
            (SourceKind::Replay, _, None) => {
                return Err(invalid("source = \"replay\" needs a [replay] section".into()))
            }
            (SourceKind::Replay, _, Some(r)) => {
                if !(r.speed >= 0.0 && r.speed <= 1_000_000.0) {
                    return Err(invalid("replay.speed must be in [0, 1000000] (0: as fast as possible)".into()));
                }
            }
            (SourceKind::Publish | SourceKind::Nats, _, _) => {}
        }
        if def.source != SourceKind::Synthetic && def.synthetic.is_some() {
            return Err(invalid("a [synthetic] section needs source = \"synthetic\"".into()));
        }
        if def.source != SourceKind::Replay && def.replay.is_some() {
            return Err(invalid("a [replay] section needs source = \"replay\"".into()));
        }
        Ok(def)
    }

    fn check_symbols(&self) -> Result<(), String> {
        if self.symbols.len() > 100_000 {
            return Err("a feed needs between 1 and 100000 symbols".into());
        }
        let mut seen = HashSet::new();
        for s in &self.symbols {
            if !valid_name(s) {
                return Err(format!("symbol `{s}` must be 1-32 characters of A-Z a-z 0-9 _ - ."));
            }
            if !seen.insert(s.as_str()) {
                return Err(format!("symbol `{s}` appears twice"));
            }
        }
        Ok(())
    }

    /// Resolves a replay feed's recording against the folder of its definition, checks
    /// its header and, when the definition lists no symbols, takes the recording's.
    pub fn resolve_replay(&mut self, path: &str, base: &Path) -> Result<(), FeedError> {
        let Some(r) = self.replay.as_mut() else { return Ok(()) };
        if r.file.is_relative() {
            r.file = base.join(&r.file);
        }
        let meta = tickgate_proto::recording::read_meta(&r.file).map_err(|e| FeedError::Invalid {
            path: path.to_owned(),
            message: format!("replay.file {}: {e}", r.file.display()),
        })?;
        if self.symbols.is_empty() {
            self.symbols = meta.symbols;
        } else if self.symbols != meta.symbols {
            return Err(FeedError::Invalid {
                path: path.to_owned(),
                message: "symbols differ from the recording's (leave `symbols` out to use the recording's)".into(),
            });
        }
        self.check_symbols().map_err(|message| FeedError::Invalid { path: path.to_owned(), message })
    }
}

/// A loaded feed: its definition plus the lookup tables the server needs.
#[derive(Debug)]
pub struct Feed {
    /// Dense index of the feed in the catalog (shards index arrays by it).
    pub idx: usize,
    /// The definition.
    pub def: FeedDef,
    /// Current epoch of the feed's numbering (a lock-free copy of the log's, for
    /// `welcome`).
    epoch: AtomicU64,
    symbol_idx: HashMap<String, u32>,
    /// Sequencing state and resume buffer: written by the feed's source, read by shards
    /// serving `resume`.
    log: RwLock<FeedLog>,
    /// Set while a publisher is connected (one at a time, so seqs have one writer).
    publisher: AtomicBool,
}

impl Feed {
    /// Feed name.
    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// Feed id in records.
    pub fn id(&self) -> u16 {
        self.def.id
    }

    /// Current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The slow-consumer policy.
    pub fn policy(&self) -> SlowConsumerPolicy {
        self.def.policy
    }

    /// Reads the log. A writer that panicked cannot leave it half-updated in a way that
    /// matters (every update is a few plain stores), so a poisoned lock is used as is.
    pub fn log(&self) -> RwLockReadGuard<'_, FeedLog> {
        self.log.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the log (the feed's source only).
    pub fn log_mut(&self) -> RwLockWriteGuard<'_, FeedLog> {
        self.log.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a new epoch in the log and in the copy `welcome` reads.
    pub fn start_epoch(&self, epoch: u64) {
        let mut log = self.log_mut();
        log.reset(epoch);
        self.epoch.store(epoch, Ordering::Release);
    }

    /// Claims the publisher slot; false when a publisher is already connected.
    pub fn claim_publisher(&self) -> bool {
        self.publisher.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Gives the publisher slot back.
    pub fn release_publisher(&self) {
        self.publisher.store(false, Ordering::Release);
    }

    /// Number of instruments.
    pub fn instrument_count(&self) -> usize {
        self.def.symbols.len()
    }

    /// Dense instrument index of a symbol.
    pub fn instrument_index(&self, symbol: &str) -> Option<u32> {
        self.symbol_idx.get(symbol).copied()
    }

    /// Symbol of a dense instrument index.
    pub fn symbol(&self, idx: u32) -> &str {
        self.def.symbols.get(idx as usize).map(String::as_str).unwrap_or("")
    }

    /// Instrument id on the wire for a dense index (1-based position).
    pub fn instrument_id(idx: u32) -> u32 {
        idx + 1
    }
}

/// Every feed the server serves, fixed at start-up.
#[derive(Debug)]
pub struct Catalog {
    feeds: Vec<Feed>,
    by_name: HashMap<String, usize>,
    /// Where new epochs come from (absent in unit tests: sources then count up from the
    /// clock without persisting).
    epochs: Option<Arc<epoch::EpochStore>>,
}

impl Catalog {
    /// Builds the catalog; names and ids must be unique. `epoch` is the starting epoch of
    /// every feed (the server takes it from its [`epoch::EpochStore`], so a restarted node
    /// never reuses one).
    pub fn new(defs: Vec<FeedDef>, epoch: u64) -> Result<Catalog, FeedError> {
        let mut feeds = Vec::with_capacity(defs.len());
        let mut by_name = HashMap::new();
        let mut ids = HashSet::new();
        for (idx, def) in defs.into_iter().enumerate() {
            if by_name.insert(def.name.clone(), idx).is_some() {
                return Err(FeedError::Invalid { path: def.name.clone(), message: "feed name defined twice".into() });
            }
            if !ids.insert(def.id) {
                return Err(FeedError::Invalid {
                    path: def.name.clone(),
                    message: format!("feed id {} used twice", def.id),
                });
            }
            let symbol_idx = def.symbols.iter().enumerate().map(|(i, s)| (s.clone(), i as u32)).collect();
            let bounds = RingBounds {
                records: def.resume.records,
                max_age_ns: (def.resume.max_age_s as i64).saturating_mul(1_000_000_000),
            };
            // A NATS feed's epoch is the stream's (nats-feeds-v1 §2): edges never invent
            // one, so before its first message the feed has epoch 0 and no seqs.
            let epoch = if def.source == SourceKind::Nats { 0 } else { epoch };
            let log = RwLock::new(FeedLog::new(def.symbols.len(), epoch, bounds));
            feeds.push(Feed {
                idx,
                def,
                epoch: AtomicU64::new(epoch),
                symbol_idx,
                log,
                publisher: AtomicBool::new(false),
            });
        }
        if feeds.is_empty() {
            return Err(FeedError::Invalid { path: "<catalog>".into(), message: "no feed defined".into() });
        }
        Ok(Catalog { feeds, by_name, epochs: None })
    }

    /// Sets the store that later epochs (a replay's next pass) are taken from.
    pub fn with_epoch_store(mut self, store: Arc<epoch::EpochStore>) -> Catalog {
        self.epochs = Some(store);
        self
    }

    /// A new epoch for a feed whose numbering restarts: above `feed`'s current one and,
    /// with a store, above every epoch this node handed out before (durable when this
    /// returns). A store that cannot be written is logged and the epoch taken from the
    /// clock, so the feed keeps streaming.
    pub async fn next_epoch(&self, feed: &Feed) -> u64 {
        let at_least = feed.epoch().saturating_add(1);
        let fallback = at_least.max(epoch::now_ms());
        let Some(store) = self.epochs.clone() else { return fallback };
        match tokio::task::spawn_blocking(move || store.next(at_least)).await {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                tracing::error!(feed = feed.name(), error = %e, "cannot persist the new epoch; taking it from the clock");
                fallback
            }
            Err(e) => {
                tracing::error!(feed = feed.name(), error = %e, "epoch task failed; taking the epoch from the clock");
                fallback
            }
        }
    }

    /// All feeds in index order.
    pub fn feeds(&self) -> &[Feed] {
        &self.feeds
    }

    /// A feed by dense index.
    pub fn get(&self, idx: usize) -> Option<&Feed> {
        self.feeds.get(idx)
    }

    /// A feed by name.
    pub fn by_name(&self, name: &str) -> Option<&Feed> {
        self.by_name.get(name).and_then(|&i| self.feeds.get(i))
    }
}

/// Where the definitions came from, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefsOrigin {
    /// Files in this folder.
    Folder(String),
    /// The compiled-in demo feed (no `feeds/` folder).
    Embedded,
}

/// Loads every `*.toml` of `dir` in name order. When `dir` does not exist and
/// `allow_embedded` is set (the default `feeds` folder), the compiled-in demo feed is
/// used instead.
pub fn load_defs(dir: &Path, allow_embedded: bool) -> Result<(Vec<FeedDef>, DefsOrigin), FeedError> {
    if !dir.exists() && allow_embedded {
        let def = FeedDef::parse("<embedded demo.toml>", EMBEDDED_DEMO)?;
        return Ok((vec![def], DefsOrigin::Embedded));
    }
    let read_err = |source| FeedError::Read { path: dir.display().to_string(), source };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    let mut defs = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(&f).map_err(|source| FeedError::Read { path: f.display().to_string(), source })?;
        let path = f.display().to_string();
        let mut def = FeedDef::parse(&path, &text)?;
        def.resolve_replay(&path, dir)?;
        defs.push(def);
    }
    if defs.is_empty() {
        return Err(FeedError::Invalid {
            path: dir.display().to_string(),
            message: "no *.toml feed definition in this folder".into(),
        });
    }
    Ok((defs, DefsOrigin::Folder(dir.display().to_string())))
}

/// Why the catalog could not be opened: its definitions, or its epoch state.
#[derive(Debug, Error)]
pub enum OpenError {
    /// Bad feed definitions.
    #[error(transparent)]
    Feeds(#[from] FeedError),
    /// The epoch state (`server.state_dir`) could not be read or written.
    #[error(transparent)]
    Epoch(#[from] epoch::EpochError),
}

/// Opens the catalog the server streams: the definitions of `feeds_dir` (or the
/// compiled-in demo feed, see [`load_defs`]) under a new epoch from the store in
/// `state_dir` ([`epoch::resolve_state_dir`]). Epochs never repeat across restarts
/// (max(last + 1, now in ms)), and the new one is durable in the state folder before this
/// returns, so before anything is served.
pub fn open(feeds_dir: &Path, allow_embedded: bool, state_dir: Option<&Path>) -> Result<Catalog, OpenError> {
    let (defs, origin) = load_defs(feeds_dir, allow_embedded)?;
    match &origin {
        DefsOrigin::Embedded => {
            tracing::warn!("no feeds/ folder here: streaming the compiled-in DEMO feed (set feeds_dir to use your own)")
        }
        DefsOrigin::Folder(dir) => tracing::info!(dir = %dir, feeds = defs.len(), "feed definitions loaded"),
    }
    let state_dir = epoch::resolve_state_dir(state_dir);
    let epochs = Arc::new(epoch::EpochStore::open(&state_dir)?);
    let previous = epochs.last();
    let epoch = epochs.next(0)?;
    tracing::info!(epoch, previous, state = %epochs.path().display(), "feed epoch");
    Ok(Catalog::new(defs, epoch)?.with_epoch_store(epochs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_demo_is_valid() {
        let d = FeedDef::parse("demo", EMBEDDED_DEMO).expect("demo parses");
        assert_eq!(d.name, "DEMO");
        assert!(d.symbols.len() >= 40);
        let c = Catalog::new(vec![d], 1).expect("catalog");
        let f = c.by_name("DEMO").expect("feed");
        assert_eq!(f.instrument_index(&f.def.symbols[3]), Some(3));
        assert_eq!(Feed::instrument_id(3), 4);
    }

    #[test]
    fn bad_definitions_are_explained() {
        let e = FeedDef::parse("x", "name = \"A\"\nid = 0\nsource = \"synthetic\"\nsymbols = [\"X\"]\n").unwrap_err();
        assert!(e.to_string().contains("id"), "{e}");
        let e = FeedDef::parse(
            "x",
            "name = \"A\"\nid = 1\nsource = \"synthetic\"\nsymbols = [\"X\", \"X\"]\n[synthetic]\nseed = 1\nrate_per_s = 1.0\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = FeedDef::parse("x", "name = \"A\"\nid = 1\nsource = \"synthetic\"\nsymbols = [\"X\"]\n").unwrap_err();
        assert!(e.to_string().contains("[synthetic]"), "{e}");
        let e = FeedDef::parse("x", "name = \"A\"\nid = 1\nsource = \"nope\"\nsymbols = [\"X\"]\n").unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn missing_folder_falls_back_only_when_allowed() {
        let p = Path::new("/nonexistent/tickgate-feeds");
        let (defs, origin) = load_defs(p, true).expect("embedded");
        assert_eq!(origin, DefsOrigin::Embedded);
        assert_eq!(defs[0].name, "DEMO");
        assert!(load_defs(p, false).is_err());
    }
}
