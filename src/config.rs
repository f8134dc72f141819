//! Configuration: TOML file, overridden by command-line flags, over built-in defaults
//! (spec §10). Every section rejects unknown keys so a typo is a start-up error naming
//! the key, not a silently ignored setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// A configuration that could not be loaded or is inconsistent.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error, naming the key and line.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole server configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Public listener: streams, tickets, the embedded issuer, the demo page.
    pub listen: SocketAddr,
    /// Admin listener: metrics, health, `/admin/*`.
    pub admin_listen: SocketAddr,
    /// Folder whose `*.toml` files define the feeds.
    pub feeds_dir: PathBuf,
    /// Token issuer.
    pub issuer: IssuerConfig,
    /// Token handling on the stream.
    pub auth: AuthConfig,
    /// Browser-facing checks.
    pub security: SecurityConfig,
    /// Resource bounds.
    pub limits: LimitsConfig,
    /// Fan-out engine.
    pub engine: EngineConfig,
    /// Connection behaviour.
    pub server: ServerConfig,
    /// Logging.
    pub log: LogConfig,
    /// TLS (off unless `cert` and `key` are set).
    pub tls: TlsConfig,
    /// NATS JetStream, the source of `source = "nats"` feeds (scale-out).
    pub nats: NatsConfig,
}

/// Where JetStream keeps a feed's streams.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NatsStorage {
    /// On disk (survives a NATS restart).
    #[default]
    File,
    /// In memory.
    Memory,
}

/// `[nats]`: the JetStream deployment that feeds `source = "nats"` feeds
/// (nats-feeds-v1 §5). Unused when no feed has that source.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URLs (`nats://host:port`, `tls://host:port`); one or more.
    pub servers: Vec<String>,
    /// Subject prefix of the feeds' records: `<prefix>.<FEED>.<ID>.t|q`; one or more tokens.
    pub subject_prefix: String,
    /// `/readyz` turns 503 once the edge has been cut off from NATS this long (ms).
    pub unready_after_ms: u64,
    /// Replicas of the streams an edge creates (3 in a three-server cluster).
    pub stream_replicas: usize,
    /// Storage of the streams an edge creates.
    pub stream_storage: NatsStorage,
    /// JetStream's duplicate window (`Nats-Msg-Id`) of the streams an edge creates (s).
    pub duplicate_window_s: u64,
    /// How long one connection attempt may take (ms); the edge keeps retrying after it.
    pub connect_timeout_ms: u64,
    /// A NATS credentials file (JWT + NKey seed).
    pub creds_file: Option<PathBuf>,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<String>,
    /// Authentication token.
    pub token: Option<String>,
    /// PEM CA bundle that the NATS servers' certificates are checked against.
    pub tls_ca: Option<PathBuf>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            servers: Vec::new(),
            subject_prefix: "md".to_owned(),
            unready_after_ms: 3_000,
            stream_replicas: 1,
            stream_storage: NatsStorage::File,
            duplicate_window_s: 120,
            connect_timeout_ms: 2_000,
            creds_file: None,
            user: None,
            password: None,
            token: None,
            tls_ca: None,
        }
    }
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a password or token.
        f.debug_struct("NatsConfig")
            .field("servers", &self.servers)
            .field("subject_prefix", &self.subject_prefix)
            .field("unready_after_ms", &self.unready_after_ms)
            .field("stream_replicas", &self.stream_replicas)
            .field("stream_storage", &self.stream_storage)
            .field("duplicate_window_s", &self.duplicate_window_s)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("creds_file", &self.creds_file)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("tls_ca", &self.tls_ca)
            .finish()
    }
}

impl NatsConfig {
    /// Checks the section on its own (whether a feed needs it is checked with the feeds).
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for url in &self.servers {
            let ok = ["nats://", "tls://"].iter().any(|p| url.strip_prefix(p).is_some_and(|rest| !rest.is_empty()));
            if !ok {
                return bad(format!("nats.servers: {url:?} is not a nats://host:port or tls://host:port URL"));
            }
        }
        let token_ok =
            |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>' && b != b'.');
        if !self.subject_prefix.split('.').all(token_ok) {
            return bad(format!(
                "nats.subject_prefix {:?} must be one or more subject tokens (no spaces, wildcards or empty tokens)",
                self.subject_prefix
            ));
        }
        if !(100..=3_600_000).contains(&self.unready_after_ms) {
            return bad("nats.unready_after_ms must be between 100 and 3600000".into());
        }
        if !(1..=5).contains(&self.stream_replicas) {
            return bad("nats.stream_replicas must be between 1 and 5".into());
        }
        if !(1..=86_400).contains(&self.duplicate_window_s) {
            return bad("nats.duplicate_window_s must be between 1 and 86400".into());
        }
        if !(100..=60_000).contains(&self.connect_timeout_ms) {
            return bad("nats.connect_timeout_ms must be between 100 and 60000".into());
        }
        if self.user.is_some() != self.password.is_some() {
            return bad("nats.user and nats.password go together".into());
        }
        let methods = [self.creds_file.is_some(), self.user.is_some(), self.token.is_some()];
        if methods.iter().filter(|m| **m).count() > 1 {
            return bad("nats: use one of creds_file, user/password or token".into());
        }
        Ok(())
    }
}

/// `[tls]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain of the public listener (`wss://`, `https://`).
    pub cert: Option<PathBuf>,
    /// PEM private key matching `cert`.
    pub key: Option<PathBuf>,
    /// Serve the admin listener over TLS too, with the same certificate.
    pub admin: bool,
}

impl TlsConfig {
    /// Whether the public listener uses TLS.
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            feeds_dir: PathBuf::from("feeds"),
            issuer: IssuerConfig::default(),
            auth: AuthConfig::default(),
            security: SecurityConfig::default(),
            limits: LimitsConfig::default(),
            engine: EngineConfig::default(),
            server: ServerConfig::default(),
            log: LogConfig::default(),
            tls: TlsConfig::default(),
            nats: NatsConfig::default(),
        }
    }
}

/// Where tokens come from.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IssuerMode {
    /// tickgate issues tokens itself (client credentials grant).
    Embedded,
    /// An external OAuth2/OIDC server issues tokens; keys come from its JWKS.
    External,
}

/// One client of the embedded issuer.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// `client_id`.
    pub id: String,
    /// `client_secret` in clear (prefer `secret_sha256`).
    #[serde(default)]
    pub secret: Option<String>,
    /// Hex SHA-256 of the secret.
    #[serde(default)]
    pub secret_sha256: Option<String>,
    /// Scopes this client may request.
    pub scopes: Vec<String>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("ClientConfig").field("id", &self.id).field("scopes", &self.scopes).finish_non_exhaustive()
    }
}

/// `[issuer]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IssuerConfig {
    /// `embedded` or `external`.
    pub mode: IssuerMode,
    /// Embedded: the clients allowed to use `/oauth2/token`. Empty: the `demo` client.
    pub clients: Vec<ClientConfig>,
    /// Embedded: access token lifetime.
    pub token_ttl_s: u64,
    /// The `iss` value. Embedded: defaults to `http(s)://<listen>`.
    pub issuer: Option<String>,
    /// The `aud` value tokens must carry.
    pub audience: String,
    /// External: where the JWK Set is fetched.
    pub jwks_url: Option<String>,
    /// Embedded: PEM files of the EC P-256 signing keys, shared by every node of a
    /// cluster. The last one signs; all are published and verify. Empty: a key generated
    /// at start and rotated every `key_rotation_s`. With files, `key_rotation_s` must be 0.
    pub signing_key_files: Vec<PathBuf>,
    /// Embedded: rotate the signing key this often (seconds; 0: never).
    pub key_rotation_s: u64,
    /// Embedded: a new key is published this long before it signs (seconds).
    pub key_publish_ahead_s: u64,
    /// External: regular JWKS refresh period (seconds).
    pub jwks_refresh_s: u64,
    /// External: least time between two refetches triggered by unknown `kid`s (seconds).
    pub jwks_cooldown_s: u64,
    /// External: keys are dropped (not ready) after this long without a good fetch (seconds).
    pub jwks_max_stale_s: u64,
    /// External: timeout of one JWKS request (1000-5000 ms).
    pub jwks_timeout_ms: u64,
    /// External: largest JWKS body accepted (bytes).
    pub jwks_max_bytes: usize,
    /// Embedded: failed client authentications at `/oauth2/token` tolerated in a burst,
    /// per source address and per client id, before 429.
    pub client_auth_failure_burst: u32,
    /// Embedded: failed client authentications per minute that the burst refills by.
    pub client_auth_failures_per_min: u32,
}

impl Default for IssuerConfig {
    fn default() -> Self {
        IssuerConfig {
            mode: IssuerMode::Embedded,
            clients: Vec::new(),
            token_ttl_s: 900,
            issuer: None,
            audience: "tickgate".to_owned(),
            jwks_url: None,
            signing_key_files: Vec::new(),
            key_rotation_s: 86_400,
            key_publish_ahead_s: 300,
            jwks_refresh_s: 600,
            jwks_cooldown_s: 30,
            jwks_max_stale_s: 86_400,
            jwks_timeout_ms: 3_000,
            jwks_max_bytes: 1 << 20,
            client_auth_failure_burst: 10,
            client_auth_failures_per_min: 10,
        }
    }
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// In-band `auth` window; 0 disables credential-less upgrades.
    pub inband_timeout_ms: u64,
    /// The only slack after `exp`: tokens are refused, and connections closed, from
    /// `exp` + this (milliseconds) on.
    pub expiry_grace_ms: u64,
    /// Clock-skew leeway for `nbf` and `iat` (never for `exp`).
    pub leeway_s: u64,
    /// Tokens longer than this are refused before any parsing.
    pub max_token_bytes: usize,
    /// Longest accepted token lifetime (`exp - min(iat, now)`).
    pub max_lifetime_s: u64,
    /// Required JWT `typ` header (RFC 9068: `at+jwt`). Empty: not checked.
    pub required_typ: String,
    /// Minimum time between two in-band refreshes on one connection.
    pub min_refresh_interval_ms: u64,
    /// Revoked `jti`s and subjects remembered at most (each until it can no longer matter).
    pub max_revocations: usize,
    /// Benchmark only: accept streams without any token. Refused unless `listen` is a
    /// loopback address; exists to measure what authorization costs.
    pub insecure_no_auth: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            inband_timeout_ms: 0,
            expiry_grace_ms: 0,
            leeway_s: 30,
            max_token_bytes: 8192,
            max_lifetime_s: 24 * 3600,
            required_typ: "at+jwt".to_owned(),
            min_refresh_interval_ms: 1_000,
            max_revocations: 100_000,
            insecure_no_auth: false,
        }
    }
}

/// `[security]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Allowed `Origin` values; empty: not checked.
    pub allowed_origins: Vec<String>,
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Outbound bytes queued per connection before the slow-consumer policy applies.
    pub max_outbound_bytes: usize,
    /// How long a connection's socket must stay full (its writer blocked on a write the
    /// kernel does not take) while its backlog is over `max_outbound_bytes` before it is a
    /// slow consumer (ms). A backlog the shard built while the socket was taking data is
    /// the server's own overload: the shard holds back intake instead.
    pub slow_consumer_stall_ms: u64,
    /// All outbound backlogs of the server together (bytes); past it, the largest are
    /// handled first under their feeds' policies. 0: a quarter of the machine's memory.
    pub max_outbound_total_bytes: usize,
    /// Trades (and source gaps) one update of a throttled subscription carries at most
    /// (protocol v1.1 `max_rate`); later trades of the interval are named by a `gap`
    /// (reason `throttled`).
    pub max_trades_per_update: usize,
    /// Largest control message accepted (bytes).
    pub max_control_bytes: usize,
    /// Largest binary message a publisher may send on `/v1/publish` (bytes).
    pub max_publish_bytes: usize,
    /// Subscribed instruments per connection.
    pub max_subscriptions: usize,
    /// Open stream connections, server-wide.
    pub max_connections: usize,
    /// Control messages per second per connection (token bucket rate).
    pub control_rate_per_s: u32,
    /// Control message burst per connection (token bucket size).
    pub control_burst: u32,
    /// Bad or rate-limited control messages tolerated before close 1008.
    pub max_strikes: u32,
    /// Open stream connections per token subject.
    pub max_connections_per_subject: usize,
    /// Open stream connections per source IP address.
    pub max_connections_per_ip: usize,
    /// Stream handshakes per second per source IP (token bucket rate).
    pub connect_rate_per_ip: u32,
    /// Stream handshake burst per source IP (token bucket size).
    pub connect_burst_per_ip: u32,
    /// One-time tickets outstanding at once.
    pub max_tickets: usize,
    /// One-time tickets outstanding at once for one token subject.
    pub max_tickets_per_subject: usize,
    /// Largest HTTP request body accepted on either listener (bytes); larger ones get 413.
    pub max_body_bytes: usize,
    /// Connections per source address, per listener, that have not completed a request;
    /// further sockets from that address are closed at once.
    pub max_pending_per_ip: usize,
    /// Descriptors kept free for the admin listener and the process: public sockets are
    /// refused once the open descriptors reach the soft limit minus this (0: no reserve).
    pub fd_reserve: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_outbound_bytes: 1_048_576,
            slow_consumer_stall_ms: 1000,
            max_outbound_total_bytes: 0,
            max_trades_per_update: 256,
            max_control_bytes: 65_536,
            max_publish_bytes: 1_048_576,
            max_subscriptions: 10_000,
            max_connections: 50_000,
            control_rate_per_s: 20,
            control_burst: 50,
            max_strikes: 20,
            max_connections_per_subject: 20_000,
            max_connections_per_ip: 20_000,
            connect_rate_per_ip: 2_000,
            connect_burst_per_ip: 5_000,
            max_tickets: 100_000,
            max_tickets_per_subject: 100,
            max_body_bytes: 16_384,
            max_pending_per_ip: 256,
            fd_reserve: 64,
        }
    }
}

/// Upper bound of `engine.write_delay_us`: beyond 100 ms a market-data stream is no longer live.
pub const MAX_WRITE_DELAY_US: u64 = 100_000;

/// `[engine]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Shard threads; 0: one per core.
    pub shards: usize,
    /// Capacity of each shard's inbound tick queue.
    pub queue_capacity: usize,
    /// A batch is sealed at this size and a new one begun (bounded frame size).
    pub max_batch_bytes: usize,
    /// Resolution of the per-shard timer wheel (token expiry), 10-50 ms.
    pub timer_tick_ms: u64,
    /// Least time between two socket writes of one connection, in microseconds (0: write
    /// as soon as there is something to send). Almost all of the fan-out's CPU is the
    /// kernel's per-`send` cost (docs/benchmarks.md §9), so holding a busy connection's
    /// records for a few milliseconds trades that much latency for fewer, larger writes.
    /// An idle connection's first message is never held, nor a close, nor a backlog of
    /// `max_batch_bytes` (or a quarter of `limits.max_outbound_bytes`).
    pub write_delay_us: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            shards: 0,
            queue_capacity: 65_536,
            max_batch_bytes: 65_536,
            timer_tick_ms: 10,
            write_delay_us: 0,
        }
    }
}

/// The longest lame-duck phase `server.lame_duck_ms` may ask for.
const MAX_LAME_DUCK_MS: u64 = 300_000;

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// WebSocket ping interval; two missed pongs close the connection.
    pub heartbeat_ms: u64,
    /// How long shutdown waits for connections to close.
    pub drain_ms: u64,
    /// Time allowed for the HTTP request head (slow headers are cut off), and for an idle
    /// keep-alive connection to start its next request.
    pub handshake_timeout_ms: u64,
    /// Time allowed for a whole HTTP request, head and body, on either listener (408 or a
    /// close when missed); WebSocket connections are not bound by it after the upgrade.
    pub request_timeout_ms: u64,
    /// Kernel send buffer per connection (bytes; 0: system default).
    pub send_buffer_bytes: usize,
    /// Upper bound of the jittered `reconnect_after_ms` in `shutdown`.
    pub reconnect_after_max_ms: u64,
    /// The lame-duck phase of a shutdown (SIGTERM, `Server::shutdown`), in milliseconds:
    /// the node reports not ready at once but keeps streaming, and sends each connection
    /// its `shutdown` (then close 1001) at its own moment spread over this window, so a
    /// rolling restart behind a load balancer does not move every client to the other
    /// nodes in the same second. At most 300000 (5 minutes).
    ///
    /// Default 0 (no lame duck: every connection is told at once, after the sources
    /// stopped): a single node, or one without a load balancer in front, gains nothing
    /// from a slower stop, and a supervisor's stop timeout (systemd `TimeoutStopSec`,
    /// Kubernetes `terminationGracePeriodSeconds`) must allow for it. A node behind a load
    /// balancer sets it (docs/operations.md, "Rolling restarts": at least the balancer's
    /// time to take the node out, e.g. HAProxy `inter` × `fall`, and a few times that).
    pub lame_duck_ms: u64,
    /// Folder of the node's durable state (the last epoch handed out, so epochs never
    /// repeat across restarts). Unset: systemd's `$STATE_DIRECTORY`, else `state`.
    pub state_dir: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            heartbeat_ms: 15_000,
            drain_ms: 5_000,
            handshake_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
            send_buffer_bytes: 262_144,
            reconnect_after_max_ms: 5_000,
            lame_duck_ms: 0,
            state_dir: None,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Config {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.to_owned(), source },
            other => other,
        })
    }

    /// Parses TOML text and validates it.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: PathBuf::from("<string>"), source: Box::new(e) })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges and cross-field consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        self.nats.validate()?;
        if self.limits.max_outbound_bytes < 4096 {
            return bad("limits.max_outbound_bytes must be at least 4096");
        }
        if self.limits.max_outbound_total_bytes != 0
            && self.limits.max_outbound_total_bytes < self.limits.max_outbound_bytes
        {
            return bad("limits.max_outbound_total_bytes must be 0 (a quarter of the memory) or at least limits.max_outbound_bytes");
        }
        if !(50..=60_000).contains(&self.limits.slow_consumer_stall_ms) {
            return bad("limits.slow_consumer_stall_ms must be between 50 and 60000");
        }
        if !(1..=65_536).contains(&self.limits.max_trades_per_update) {
            return bad("limits.max_trades_per_update must be between 1 and 65536");
        }
        if self.limits.max_control_bytes < 256 || self.limits.max_control_bytes > 1 << 20 {
            return bad("limits.max_control_bytes must be between 256 and 1048576");
        }
        if self.limits.max_publish_bytes < 4096 || self.limits.max_publish_bytes > 16 << 20 {
            return bad("limits.max_publish_bytes must be between 4096 and 16777216");
        }
        if self.limits.max_connections == 0 || self.limits.max_subscriptions == 0 {
            return bad("limits.max_connections and limits.max_subscriptions must be positive");
        }
        if self.limits.max_connections_per_subject == 0
            || self.limits.max_connections_per_ip == 0
            || self.limits.connect_rate_per_ip == 0
            || self.limits.connect_burst_per_ip == 0
            || self.limits.max_tickets == 0
            || self.limits.max_tickets_per_subject == 0
        {
            return bad("limits.max_connections_per_subject, max_connections_per_ip, connect_rate_per_ip, connect_burst_per_ip, max_tickets and max_tickets_per_subject must be positive");
        }
        if self.limits.control_rate_per_s == 0 || self.limits.control_burst == 0 {
            return bad("limits.control_rate_per_s and limits.control_burst must be positive");
        }
        if self.engine.queue_capacity < 16 {
            return bad("engine.queue_capacity must be at least 16");
        }
        if self.engine.shards > 1024 {
            return bad("engine.shards must be at most 1024");
        }
        if self.engine.max_batch_bytes < 1024 || self.engine.max_batch_bytes > 16 << 20 {
            return bad("engine.max_batch_bytes must be between 1024 and 16777216");
        }
        if self.engine.write_delay_us > MAX_WRITE_DELAY_US {
            return bad("engine.write_delay_us must be at most 100000 (100 ms)");
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad("tls.cert and tls.key go together");
        }
        if self.tls.admin && self.tls.cert.is_none() {
            return bad("tls.admin needs tls.cert and tls.key");
        }
        if !(10..=50).contains(&self.engine.timer_tick_ms) {
            return bad("engine.timer_tick_ms must be between 10 and 50");
        }
        if self.auth.max_revocations == 0 {
            return bad("auth.max_revocations must be positive");
        }
        if self.auth.insecure_no_auth && !self.listen.ip().is_loopback() {
            return bad("auth.insecure_no_auth is for benchmarks only and needs a loopback listen address");
        }
        if self.server.heartbeat_ms < 100 {
            return bad("server.heartbeat_ms must be at least 100");
        }
        if self.server.handshake_timeout_ms == 0 {
            return bad("server.handshake_timeout_ms must be positive");
        }
        if !(100..=300_000).contains(&self.server.request_timeout_ms) {
            return bad("server.request_timeout_ms must be between 100 and 300000");
        }
        if self.server.lame_duck_ms > MAX_LAME_DUCK_MS {
            return bad(
                "server.lame_duck_ms must be at most 300000 (5 minutes): a shutdown takes lame_duck_ms + drain_ms + a \
                 few seconds, and a supervisor kills a node that takes longer than its stop timeout",
            );
        }
        if !(1_024..=1 << 20).contains(&self.limits.max_body_bytes) {
            return bad("limits.max_body_bytes must be between 1024 and 1048576");
        }
        if self.limits.max_pending_per_ip == 0 {
            return bad("limits.max_pending_per_ip must be positive");
        }
        if self.auth.max_token_bytes < 256 || self.auth.max_token_bytes > 65_536 {
            return bad("auth.max_token_bytes must be between 256 and 65536");
        }
        if self.auth.leeway_s > 300 {
            return bad("auth.leeway_s must be at most 300");
        }
        if self.issuer.audience.is_empty() {
            return bad("issuer.audience must not be empty");
        }
        if self.issuer.client_auth_failure_burst == 0 || self.issuer.client_auth_failures_per_min == 0 {
            return bad("issuer.client_auth_failure_burst and issuer.client_auth_failures_per_min must be positive");
        }
        if self.issuer.token_ttl_s == 0 || self.issuer.token_ttl_s > self.auth.max_lifetime_s {
            return bad("issuer.token_ttl_s must be positive and at most auth.max_lifetime_s");
        }
        match self.issuer.mode {
            IssuerMode::External => {
                if self.issuer.jwks_url.is_none() || self.issuer.issuer.is_none() {
                    return bad("issuer.mode = \"external\" needs issuer.jwks_url and issuer.issuer");
                }
                if let Some(u) = &self.issuer.jwks_url {
                    if !(u.starts_with("https://") || u.starts_with("http://")) {
                        return bad("issuer.jwks_url must be an http(s) URL");
                    }
                }
                if !(1_000..=5_000).contains(&self.issuer.jwks_timeout_ms) {
                    return bad("issuer.jwks_timeout_ms must be between 1000 and 5000");
                }
                if !(1_024..=16 << 20).contains(&self.issuer.jwks_max_bytes) {
                    return bad("issuer.jwks_max_bytes must be between 1024 and 16777216");
                }
                if self.issuer.jwks_refresh_s == 0 || self.issuer.jwks_max_stale_s < self.issuer.jwks_refresh_s {
                    return bad("issuer.jwks_refresh_s must be positive and at most issuer.jwks_max_stale_s");
                }
                if !self.issuer.signing_key_files.is_empty() {
                    return bad("issuer.signing_key_files is for issuer.mode = \"embedded\"; an external issuer's keys come from issuer.jwks_url");
                }
            }
            IssuerMode::Embedded => {
                if let Some(i) = self.issuer.signing_key_files.iter().position(|p| p.as_os_str().is_empty()) {
                    return Err(ConfigError::Invalid(format!(
                        "issuer.signing_key_files[{i}] is empty: give the path of a PEM key file"
                    )));
                }
                if !self.issuer.signing_key_files.is_empty() && self.issuer.key_rotation_s != 0 {
                    return bad("issuer.signing_key_files is set, so keys change with the files, not by themselves: set issuer.key_rotation_s = 0");
                }
                // The default `iss` is the node's own address, which differs between nodes:
                // node B would refuse node A's tokens as "wrong issuer" despite the shared key.
                if !self.issuer.signing_key_files.is_empty() && self.issuer.issuer.is_none() {
                    return bad("issuer.signing_key_files needs issuer.issuer: the one `iss` every node issues and accepts (e.g. the load balancer's URL)");
                }
                if self.issuer.key_rotation_s > 0 && self.issuer.key_rotation_s <= self.issuer.key_publish_ahead_s {
                    return bad("issuer.key_rotation_s must be 0 (never) or longer than issuer.key_publish_ahead_s");
                }
                for c in &self.issuer.clients {
                    if c.id.is_empty() {
                        return bad("issuer.clients[].id must not be empty");
                    }
                    match (&c.secret, &c.secret_sha256) {
                        (Some(_), None) => {}
                        (None, Some(h)) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {}
                        (None, Some(_)) => {
                            return Err(ConfigError::Invalid(format!(
                                "issuer.clients `{}`: secret_sha256 must be 64 hex digits",
                                c.id
                            )))
                        }
                        _ => {
                            return Err(ConfigError::Invalid(format!(
                                "issuer.clients `{}` needs exactly one of secret, secret_sha256",
                                c.id
                            )))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The budget of all outbound backlogs together: `limits.max_outbound_total_bytes`, or
    /// when that is 0 a quarter of the machine's memory (`MemTotal` of `/proc/meminfo`;
    /// 1 GiB where it cannot be read), never below one connection's budget.
    pub fn outbound_total_bytes(&self) -> usize {
        if self.limits.max_outbound_total_bytes > 0 {
            return self.limits.max_outbound_total_bytes;
        }
        let mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            let kb = m.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().strip_suffix("kB")?.trim();
            kb.parse::<usize>().ok().map(|kb| kb.saturating_mul(1024))
        });
        (mem.unwrap_or(4 << 30) / 4).max(self.limits.max_outbound_bytes)
    }

    /// Shards to run: the configured count, or one per available core.
    pub fn shard_count(&self) -> usize {
        if self.engine.shards > 0 {
            self.engine.shards
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_spec_defaults() {
        let c = Config::from_toml("").expect("empty config is valid");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:8081");
        assert_eq!(c.feeds_dir, PathBuf::from("feeds"));
        assert_eq!(c.issuer.mode, IssuerMode::Embedded);
        assert_eq!(c.issuer.token_ttl_s, 900);
        assert_eq!(c.limits.max_outbound_bytes, 1_048_576);
        assert_eq!(c.auth.inband_timeout_ms, 0);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::from_toml("[limits]\nmax_outbound_byte = 5\n").unwrap_err();
        assert!(e.to_string().contains("max_outbound_byte"), "{e}");
    }

    /// `server.lame_duck_ms` is bounded (a supervisor's stop timeout must cover it), and
    /// the bound itself is accepted.
    #[test]
    fn lame_duck_is_bounded() {
        let e = Config::from_toml("[server]\nlame_duck_ms = 300001\n").unwrap_err();
        assert!(e.to_string().contains("server.lame_duck_ms must be at most 300000"), "{e}");
        assert_eq!(
            Config::from_toml("[server]\nlame_duck_ms = 300000\n").map(|c| c.server.lame_duck_ms).ok(),
            Some(300_000)
        );
        assert_eq!(Config::default().server.lame_duck_ms, 0, "no lame duck unless asked for");
    }

    #[test]
    fn inconsistent_values_are_refused() {
        let e = Config::from_toml("[issuer]\nmode = \"external\"\n").unwrap_err();
        assert!(e.to_string().contains("jwks_url"), "{e}");
        let e = Config::from_toml("[limits]\nmax_outbound_bytes = 10\n").unwrap_err();
        assert!(e.to_string().contains("max_outbound_bytes"), "{e}");
        let e = Config::from_toml("listen = \"0.0.0.0:8080\"\n[auth]\ninsecure_no_auth = true\n").unwrap_err();
        assert!(e.to_string().contains("loopback"), "{e}");
        assert!(Config::from_toml("listen = \"127.0.0.1:8080\"\n[auth]\ninsecure_no_auth = true\n").is_ok());
        let e = Config::from_toml("[engine]\ntimer_tick_ms = 100\n").unwrap_err();
        assert!(e.to_string().contains("timer_tick_ms"), "{e}");
        let e = Config::from_toml("[engine]\nwrite_delay_us = 100001\n").unwrap_err();
        assert!(e.to_string().contains("write_delay_us"), "{e}");
        assert_eq!(
            Config::from_toml("[engine]\nwrite_delay_us = 5000\n").map(|c| c.engine.write_delay_us).ok(),
            Some(5000)
        );
        let e = Config::from_toml("[[issuer.clients]]\nid = \"a\"\nscopes = []\n").unwrap_err();
        assert!(e.to_string().contains("exactly one"), "{e}");
    }

    #[test]
    fn signing_key_files_need_rotation_off_and_no_empty_entry() {
        let iss = "issuer = \"https://md.example.com\"\n";
        let e = Config::from_toml(&format!("[issuer]\n{iss}signing_key_files = [\"/k/a.pem\"]\n")).unwrap_err();
        assert!(e.to_string().contains("key_rotation_s = 0"), "{e}");
        let e = Config::from_toml("[issuer]\nsigning_key_files = [\"/k/a.pem\"]\nkey_rotation_s = 0\n").unwrap_err();
        assert!(e.to_string().contains("needs issuer.issuer"), "{e}");
        let ok = Config::from_toml(&format!(
            "[issuer]\n{iss}signing_key_files = [\"/k/a.pem\", \"/k/b.pem\"]\nkey_rotation_s = 0\n"
        ))
        .expect("valid");
        assert_eq!(ok.issuer.signing_key_files, [PathBuf::from("/k/a.pem"), PathBuf::from("/k/b.pem")]);
        let e = Config::from_toml(&format!(
            "[issuer]\n{iss}signing_key_files = [\"/k/a.pem\", \"\"]\nkey_rotation_s = 0\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("issuer.signing_key_files[1] is empty"), "{e}");
        let e = Config::from_toml(
            "[issuer]\nmode = \"external\"\nissuer = \"https://idp\"\njwks_url = \"https://idp/jwks\"\nsigning_key_files = [\"/k/a.pem\"]\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("embedded"), "{e}");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// Keys of tickgate.example.toml: `(section, key, line)` for every `key = value` line,
    /// set or commented out (`# key = value`, the file's way of showing an optional key),
    /// with `line` the setting without its leading `# `. A set line whose comment says
    /// `# example` shows a value other than the default on purpose.
    fn example_keys(text: &str) -> Vec<(String, String, String, bool)> {
        let mut section = String::new();
        let mut keys = Vec::new();
        for raw in text.lines() {
            let line = raw.trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_string();
                continue;
            }
            let (commented, body) = match line.strip_prefix("# ") {
                Some(b) => (true, b),
                None => (false, line),
            };
            let Some((key, _)) = body.split_once(" = ") else { continue };
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
                continue;
            }
            keys.push((section.clone(), key.to_string(), body.to_string(), commented));
        }
        keys
    }

    fn one_key_config(section: &str, line: &str) -> Result<Config, ConfigError> {
        let doc = if section.is_empty() { format!("{line}\n") } else { format!("[{section}]\n{line}\n") };
        Config::from_toml(&doc)
    }

    /// The file documents the built-in defaults: every key it sets, alone in a config,
    /// gives exactly `Config::default()` (compared through `Debug`, which shows every field),
    /// unless the line says `# example`. Defaults therefore live in one place (the `Default`
    /// impls above) and the file cannot drift from them.
    #[test]
    fn example_file_sets_only_defaults() {
        let text = include_str!("../tickgate.example.toml");
        Config::from_toml(text).expect("example config is valid");
        let default = format!("{:?}", Config::default());
        let mut checked = 0;
        for (section, key, line, commented) in example_keys(text) {
            if commented || line.contains("# example") {
                continue;
            }
            let c = one_key_config(&section, &line).unwrap_or_else(|e| panic!("[{section}] {key}: {e}"));
            assert_eq!(format!("{c:?}"), default, "[{section}] {key} in tickgate.example.toml is not the default");
            checked += 1;
        }
        assert!(checked > 50, "only {checked} keys found: is the parser above still reading the file?");
    }

    /// Every key the schema knows appears in the example file (set, or shown commented out),
    /// and nothing there is unknown: a key added to the schema without documenting it, or
    /// one removed but still documented, fails here.
    #[test]
    fn example_file_names_every_key() {
        let text = include_str!("../tickgate.example.toml");
        for (section, key, line, commented) in example_keys(text) {
            // A commented-out value spread over several lines (the clients table) is shown
            // for reading, not parsed.
            if commented && line.ends_with('[') {
                continue;
            }
            // Optional keys are commented out with an example value: they must parse too.
            if let Err(e) = one_key_config(&section, &line) {
                // Values that only make sense with others (external issuer, TLS key pair)
                // are refused by validation, not by the schema: that is still a known key.
                assert!(matches!(e, ConfigError::Invalid(_)), "[{section}] {key}: {e}");
            }
        }
        // The other direction: the schema's keys, from serde's own list of fields.
        let documented: std::collections::HashSet<(String, String)> =
            example_keys(text).into_iter().map(|(s, k, _, _)| (s, k)).collect();
        for (section, key) in schema_keys() {
            assert!(
                documented.contains(&(section.to_string(), key.to_string())),
                "[{section}] {key} is not in tickgate.example.toml"
            );
        }
    }

    /// `(section, key)` for every field of the schema, found by asking the deserializer:
    /// an unknown key is refused with the list of expected fields, which serde takes from
    /// the struct definitions themselves.
    fn schema_keys() -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for section in ["", "issuer", "auth", "security", "limits", "engine", "server", "tls", "log", "nats"] {
            let doc = if section.is_empty() {
                "zz_unknown_key = 1\n".to_string()
            } else {
                format!("[{section}]\nzz_unknown_key = 1\n")
            };
            let msg = match Config::from_toml(&doc) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("[{section}] accepted an unknown key"),
            };
            let list = msg
                .split("unknown field `zz_unknown_key`, expected ")
                .nth(1)
                .unwrap_or_else(|| panic!("no field list in: {msg}"));
            // "`a`" or "one of `a`, `b`, ...": the names are the backtick-quoted words.
            for name in list.lines().next().unwrap_or("").split('`').skip(1).step_by(2) {
                if name.is_empty() {
                    continue;
                }
                let is_section = section.is_empty()
                    && ["issuer", "auth", "security", "limits", "engine", "server", "tls", "log", "nats"]
                        .contains(&name);
                if !is_section {
                    out.push((section, name.to_string()));
                }
            }
        }
        assert!(out.len() > 60, "field lists not found: {out:?}");
        out
    }
}
