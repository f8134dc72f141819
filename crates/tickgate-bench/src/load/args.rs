//! The `tickgate load` command line and what it runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Serialize;

use super::publish::{PublishOptions, PublishSink, PublishSummary};
use super::{multi, LoadError, LoadOptions, LoadSummary, SubscribeTarget};
use crate::cli::{child_slot, int_in, ticks_per_second};
use tickgate_client as client;

/// Which side of the benchmark this process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Open subscribers and measure (the default).
    Subscriber,
    /// Publish ticks on a fixed open-loop schedule.
    Publisher,
    /// Hold connections through a balancer, kill an edge (`--kill-pid`), and measure how
    /// its clients reconnect and resume on the others ([`super::failover`]).
    Failover,
    /// Serve subscribers as a bare epoll writer on `--listen` (one write per connection
    /// per tick): the per-write floor `benches/floor.sh` compares tickgate with
    /// ([`super::floor`]).
    Floor,
}

/// Which server (and protocol) the role talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// tickgate: subscribers on `--url` (`/v1/stream`), the publisher on its publish
    /// endpoint (`--publish-url`, default `/v1/publish?feed=FEED` on `--url`'s host).
    Tickgate,
    /// NATS: subscribers over WebSocket on `--nats-url` (ws://), the publisher on
    /// `--nats-url` (nats:// or ws://). Subjects `md.<FEED>.<SYMBOL>`, one record per message.
    Nats,
}

/// `tickgate load`: a load generator for tickgate and, for comparison, nats-server.
///
/// Subscriber role (default): N subscribers, HDR latency against each record's scheduled
/// time, seq checks, delivered records/s; a progress line every second on stderr and the
/// JSON summary on stdout. Publisher role (`--role publisher`): M ticks/s round robin over
/// the `--symbols`, open loop, each tick stamped with its scheduled time; runs `--seconds`
/// (0: until `--count` ticks or SIGINT/SIGTERM) and prints its JSON summary on stdout.
/// Failover role (`--role failover`): `--connections` subscribers on `--url` (a balancer),
/// `--warmup` seconds of steady streaming, then SIGKILL to `--kill-pid`, then `--seconds` of
/// watching the killed edge's clients reconnect with resume; the JSON summary has the
/// reconnect curve. Floor role (`--role floor`): a bare epoll WebSocket writer on
/// `--listen` that serves subscribers `--rate` ticks/s over `--symbols` (feed `--feed`,
/// id `--feed-id`), one write per connection per tick; runs `--seconds` (0: until
/// SIGINT/SIGTERM), answers `GET /counters`, and prints its JSON summary on stdout.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Subscriber (default), publisher or failover.
    #[arg(long, value_enum, default_value_t = Role::Subscriber)]
    pub role: Role,
    /// Server to load: tickgate (default) or nats.
    #[arg(long, value_enum, default_value_t = Target::Tickgate)]
    pub target: Target,
    /// Stream URL (tickgate).
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/stream")]
    pub url: String,
    /// NATS server URL: ws://HOST:PORT for subscribers (WebSocket listener); the publisher
    /// takes nats:// or ws://.
    #[arg(long, default_value = "ws://127.0.0.1:4223")]
    pub nats_url: String,
    /// tickgate publish endpoint for `--role publisher --target tickgate` (default: `--url`'s
    /// scheme, host and port with `/v1/publish?feed=FEED`).
    #[arg(long)]
    pub publish_url: Option<String>,
    /// Access token (or give --issuer with client credentials).
    #[arg(long, env = "TICKGATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Issuer base URL to fetch a token from.
    #[arg(long)]
    pub issuer: Option<String>,
    /// Client id for --issuer.
    #[arg(long, default_value = "demo")]
    pub client_id: String,
    /// Client secret for --issuer.
    #[arg(long, env = "TICKGATE_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: Option<String>,
    /// Subscribers (all processes together).
    #[arg(long, default_value_t = 100, allow_negative_numbers = true, value_parser = int_in::<usize>(1, 1_000_000))]
    pub connections: usize,
    /// Feed.
    #[arg(long, default_value = "DEMO")]
    pub feed: String,
    /// Comma-separated symbols, or '*' (subscribers). The publisher needs an explicit list:
    /// instrument id = position in the list + 1.
    #[arg(long, default_value = "*")]
    pub symbols: String,
    /// Measured seconds (subscribers); run time of the publisher (0: until --count or a signal).
    #[arg(long, default_value_t = 10, allow_negative_numbers = true, value_parser = int_in::<u64>(0, 604_800))]
    pub seconds: u64,
    /// Warm-up seconds.
    #[arg(long, default_value_t = 2, allow_negative_numbers = true, value_parser = int_in::<u64>(0, 3_600))]
    pub warmup: u64,
    /// Source addresses 127.0.0.1 ..= 127.0.0.N (tickgate subscribers; async-nats binds no
    /// source address on WebSocket connections).
    #[arg(long, default_value_t = 8, allow_negative_numbers = true, value_parser = int_in::<u8>(1, 254))]
    pub source_ips: u8,
    /// Admin base URL of the server (for CPU and frame counters).
    #[arg(long)]
    pub admin: Option<String>,
    /// Server process id on this machine: CPU seconds (/proc/PID/stat) over the window and
    /// resident memory per connection (/proc/PID/status, before and after connecting).
    #[arg(long, value_name = "PID", allow_negative_numbers = true, value_parser = int_in::<u32>(1, 4_194_304))]
    pub server_pid: Option<u32>,
    /// Connection i subscribes only to the i-th symbol (round robin) of --symbols.
    #[arg(long)]
    pub spread: bool,
    /// Connection i subscribes to K symbols of --symbols: (i*K + j) mod len, j < K.
    #[arg(long, value_name = "K", conflicts_with = "spread", allow_negative_numbers = true, value_parser = int_in::<usize>(1, 100_000))]
    pub symbols_per_conn: Option<usize>,
    /// Throttled subscriptions (protocol v1.1): at most this many updates per second per
    /// instrument (0.01-1000).
    #[arg(long, value_name = "PER_S", allow_negative_numbers = true, value_parser = crate::cli::updates_per_second)]
    pub max_rate: Option<f64>,
    /// Refresh every connection's token in-band every SECS seconds (needs --issuer).
    #[arg(long, value_name = "SECS", allow_negative_numbers = true, value_parser = int_in::<u64>(1, 86_400))]
    pub refresh_every: Option<u64>,
    /// Present no token (for a server in the benchmark-only --insecure-no-auth mode).
    #[arg(long)]
    pub no_token: bool,
    /// Handshakes in flight at once while connecting.
    #[arg(long, default_value_t = 256, allow_negative_numbers = true, value_parser = int_in::<usize>(1, 65_536))]
    pub connect_concurrency: usize,
    /// Spread the subscribers over P child processes (each with connections/P subscribers
    /// and its own slice of source addresses); their summaries are merged.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = int_in::<usize>(1, 256))]
    pub processes: usize,
    /// Publisher: ticks per second, all instruments together.
    // allow_hyphen_values: `-1` and `-inf` reach the parser and get its range message.
    #[arg(long, default_value_t = 1000.0, allow_hyphen_values = true, value_parser = ticks_per_second)]
    pub rate: f64,
    /// Publisher: stop after this many ticks.
    #[arg(long, allow_negative_numbers = true, value_parser = int_in::<u64>(1, i64::MAX))]
    pub count: Option<u64>,
    /// Publisher: feed id written into the records.
    #[arg(long, default_value_t = 100, allow_negative_numbers = true, value_parser = int_in::<u16>(1, 65_535))]
    pub feed_id: u16,
    /// Publisher: send seq 0 and let the server assign sequence numbers (tickgate only).
    #[arg(long)]
    pub server_seq: bool,
    /// Failover: the edge process to SIGKILL after the steady window (without it, the
    /// first connection close is taken as the moment of the kill).
    #[arg(long, value_name = "PID", allow_negative_numbers = true, value_parser = int_in::<u32>(1, 4_194_304))]
    pub kill_pid: Option<u32>,
    /// Failover: a closed connection's first reconnect comes after a random delay below
    /// this many ms (unless the server's `shutdown` gave `reconnect_after_ms`).
    #[arg(long, default_value_t = 250, allow_negative_numbers = true, value_parser = int_in::<u64>(1, 600_000))]
    pub reconnect_jitter_ms: u64,
    /// Failover: each failed attempt doubles the jitter window, up to this many ms.
    #[arg(long, default_value_t = 4_000, allow_negative_numbers = true, value_parser = int_in::<u64>(1, 600_000))]
    pub reconnect_max_ms: u64,
    /// Floor: the address the bare writer listens on.
    #[arg(long, default_value = "127.0.0.1:9390")]
    pub listen: std::net::SocketAddr,
    /// Internal: this process is child INDEX/PROCESSES of a `--processes` run.
    #[arg(long, hide = true, value_name = "INDEX/PROCESSES", value_parser = child_slot)]
    pub child: Option<String>,
}

/// What `tickgate load` prints.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum LoadReport {
    /// Subscriber role.
    Subscribers(Box<LoadSummary>),
    /// Publisher role.
    Publisher(PublishSummary),
    /// Failover role.
    Failover(Box<super::failover::FailoverSummary>),
    /// Floor role.
    Floor(super::floor::FloorSummary),
}

fn split_symbols(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// Resolves the access token: none, the given one, or one from the issuer.
async fn token(a: &LoadArgs) -> Result<String, LoadError> {
    if a.no_token {
        return Ok(String::new());
    }
    match (&a.token, &a.issuer) {
        (Some(t), _) => Ok(t.clone()),
        (None, Some(iss)) => {
            let secret =
                a.client_secret.clone().ok_or_else(|| LoadError::Args("--issuer needs --client-secret".into()))?;
            Ok(client::fetch_token(iss, &a.client_id, &secret, None).await?)
        }
        (None, None) => Err(LoadError::Args("give --token, --issuer with --client-secret, or --no-token".into())),
    }
}

/// For refreshes: a task fetches a new token every half period and publishes it.
fn refresh_tokens(a: &LoadArgs, first: &str) -> Result<Option<tokio::sync::watch::Receiver<String>>, LoadError> {
    match (a.refresh_every, &a.issuer) {
        (Some(secs), Some(iss)) => {
            let secret = a
                .client_secret
                .clone()
                .ok_or_else(|| LoadError::Args("--refresh-every needs --client-secret".into()))?;
            let (tx, rx) = tokio::sync::watch::channel(first.to_owned());
            let (iss, id) = (iss.clone(), a.client_id.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs((secs / 2).max(1))).await;
                    match client::fetch_token(&iss, &id, &secret, None).await {
                        Ok(t) => {
                            if tx.send(t).is_err() {
                                return;
                            }
                        }
                        Err(e) => eprintln!("token refresh fetch failed: {e}"),
                    }
                }
            });
            Ok(Some(rx))
        }
        (Some(_), None) => Err(LoadError::Args("--refresh-every needs --issuer".into())),
        _ => Ok(None),
    }
}

/// Runs `tickgate load` with its parsed arguments. `argv` is the process's own command line
/// without the program name (re-used for the child processes of `--processes`).
pub async fn execute(a: LoadArgs, argv: Vec<String>) -> Result<LoadReport, LoadError> {
    let symbols = split_symbols(&a.symbols);
    if a.role == Role::Publisher {
        let sink = match a.target {
            Target::Nats => PublishSink::Nats { url: a.nats_url.clone() },
            // The token (--token, or from --issuer with every scope the client is allowed)
            // must carry md:publish:<FEED>.
            Target::Tickgate => PublishSink::Tickgate {
                url: a.publish_url.clone().unwrap_or_else(|| client::publisher::publish_url(&a.url, &a.feed, None)),
                token: token(&a).await?,
            },
        };
        let summary = super::publish::run(PublishOptions {
            sink,
            feed: a.feed.clone(),
            feed_id: a.feed_id,
            symbols,
            rate: a.rate,
            duration: (a.seconds > 0).then(|| Duration::from_secs(a.seconds)),
            count: a.count,
            server_seq: a.server_seq,
            progress: true,
        })
        .await?;
        return Ok(LoadReport::Publisher(summary));
    }

    if a.role == Role::Floor {
        let opts = super::floor::FloorOptions {
            listen: a.listen,
            feed: a.feed.clone(),
            feed_id: a.feed_id,
            symbols,
            rate: a.rate,
            duration: (a.seconds > 0).then(|| Duration::from_secs(a.seconds)),
            max_pending: super::floor::MAX_PENDING,
            progress: true,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let server = tokio::task::spawn_blocking(move || super::floor::run(opts, flag));
        tokio::pin!(server);
        let joined = tokio::select! {
            r = &mut server => r,
            _ = super::publish::stop_signal() => {
                stop.store(true, Ordering::Relaxed);
                server.await
            }
        };
        let summary = joined.map_err(|e| LoadError::Args(format!("floor server thread: {e}")))??;
        return Ok(LoadReport::Floor(summary));
    }

    if a.role == Role::Failover {
        if a.target != Target::Tickgate {
            return Err(LoadError::Args("--role failover needs --target tickgate".into()));
        }
        let summary = super::failover::run(super::failover::FailoverOptions {
            url: a.url.clone(),
            token: token(&a).await?,
            connections: a.connections,
            feed: a.feed.clone(),
            symbols,
            steady: Duration::from_secs(a.warmup),
            after: Duration::from_secs(a.seconds),
            kill_pid: a.kill_pid,
            source_ips: a.source_ips,
            connect_concurrency: a.connect_concurrency,
            reconnect_jitter_ms: a.reconnect_jitter_ms,
            reconnect_max_ms: a.reconnect_max_ms,
            progress: true,
        })
        .await?;
        return Ok(LoadReport::Failover(Box::new(summary)));
    }

    if a.processes > 1 && a.child.is_none() {
        let summary = multi::run(multi::MultiOptions {
            processes: a.processes,
            argv,
            admin: a.admin.clone(),
            server_pid: a.server_pid,
            progress: true,
        })
        .await?;
        return Ok(LoadReport::Subscribers(Box::new(summary)));
    }
    let (child, connections, index_base, source_ip_base, source_ips) = match &a.child {
        Some(c) => {
            let (i, p) = multi::parse_child(c)?;
            let (n, first) = multi::share(a.connections, p, i);
            let (ip0, ips) = multi::ip_slice(a.source_ips, p, i);
            (Some(i), n, first, ip0, ips)
        }
        None => (None, a.connections, 0, 1, a.source_ips),
    };
    let (target, token, refresh) = match a.target {
        Target::Nats => (SubscribeTarget::Nats { url: a.nats_url.clone() }, String::new(), None),
        Target::Tickgate => {
            let t = token(&a).await?;
            let r = refresh_tokens(&a, &t)?;
            (SubscribeTarget::Tickgate, t, r)
        }
    };
    let summary = super::run(LoadOptions {
        target,
        url: a.url.clone(),
        token,
        connections,
        index_base,
        feed: a.feed.clone(),
        symbols,
        duration: Duration::from_secs(a.seconds),
        warmup: Duration::from_secs(a.warmup),
        source_ips,
        source_ip_base,
        admin: a.admin.clone(),
        server_pid: a.server_pid,
        progress: true,
        symbols_per_conn: if a.spread { Some(1) } else { a.symbols_per_conn },
        max_rate: a.max_rate,
        refresh_every: a.refresh_every.map(Duration::from_secs),
        refresh_tokens: refresh,
        connect_concurrency: a.connect_concurrency,
        child,
    })
    .await?;
    Ok(LoadReport::Subscribers(Box::new(summary)))
}
