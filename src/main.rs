//! The `tickgate` command line: `serve`, `token`, `subscribe`, `record`, `load`, `keygen`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tickgate_bench::cli::{int_in, record_seconds};
use tickgate_client as client;

// mimalloc instead of glibc malloc: the dispatch path allocates one batch per connection per
// cycle and frees them all once written; glibc trims and re-faults those pages every cycle
// (page faults were the top of the dispatch profile), mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tickgate::config::{Config, LogFormat};

#[derive(Parser)]
#[command(name = "tickgate", version, about = "Market-data streaming server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Public listener address (overrides the file).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Admin listener address (overrides the file).
        #[arg(long)]
        admin_listen: Option<std::net::SocketAddr>,
        /// Feed definitions folder (overrides the file).
        #[arg(long)]
        feeds_dir: Option<PathBuf>,
        /// Folder of the node's durable state, e.g. the last epoch (overrides the file).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Log as JSON lines.
        #[arg(long)]
        log_json: bool,
        /// Benchmark only: accept streams without a token (refused unless listening on loopback).
        #[arg(long)]
        insecure_no_auth: bool,
    },
    /// Get an access token with the client credentials grant and print it.
    Token {
        /// Issuer base URL.
        #[arg(long)]
        issuer: String,
        /// Client id.
        #[arg(long)]
        client_id: String,
        /// Client secret.
        #[arg(long, env = "TICKGATE_CLIENT_SECRET", hide_env_values = true)]
        client_secret: String,
        /// Scopes, separated by spaces or commas.
        #[arg(long)]
        scope: Option<String>,
        /// Trust this CA certificate (PEM) for an https:// issuer.
        #[arg(long)]
        ca_cert: Option<PathBuf>,
    },
    /// Subscribe and print one JSON line per record or message.
    Subscribe {
        #[command(flatten)]
        stream: StreamArgs,
        /// Comma-separated symbols, or '*'.
        #[arg(long)]
        symbols: String,
        /// Ask for the last trade and quote first.
        #[arg(long)]
        snapshot: bool,
        /// JSON lines (the only output format; kept for the documented command line).
        #[arg(long)]
        json: bool,
        /// Stop after this many records.
        #[arg(long, allow_negative_numbers = true, value_parser = int_in::<u64>(1, i64::MAX))]
        limit: Option<u64>,
        /// Resume from the last seqs stored in this file (if it exists and is for this
        /// feed), and keep it up to date after every message.
        #[arg(long)]
        resume_file: Option<PathBuf>,
        #[command(flatten)]
        tokens: TokenArgs,
        /// Connect again after a close by the server (shutdown, dropped connection, slow
        /// consumer, or an expired token when tokens can be fetched), honouring its
        /// `reconnect_after_ms`, and resume with no gap.
        #[arg(long)]
        reconnect: bool,
    },
    /// Capture a live stream into a recording file (the format `replay` feeds play).
    Record {
        #[command(flatten)]
        stream: StreamArgs,
        /// Comma-separated symbols, or '*'.
        #[arg(long, default_value = "*")]
        symbols: String,
        /// Output file (*.tgrec).
        #[arg(long)]
        out: PathBuf,
        /// Stop after this many seconds (above 0, at most a year).
        // allow_hyphen_values: `-1` and `-inf` reach the parser and get its range message
        // instead of clap's "unexpected argument".
        #[arg(long, allow_hyphen_values = true, value_parser = record_seconds)]
        seconds: Option<f64>,
        /// Stop after this many records.
        #[arg(long, allow_negative_numbers = true, value_parser = int_in::<u64>(1, i64::MAX))]
        limit: Option<u64>,
    },
    /// Operate a running server through its admin API (a `tickgate:admin` token).
    Admin {
        /// Admin listener base URL.
        #[arg(long, default_value = "http://127.0.0.1:8081")]
        admin: String,
        /// Admin token (or fetch one: --issuer with --client-id).
        #[arg(long, env = "TICKGATE_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Issuer base URL for --client-id.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        issuer: String,
        /// Fetch an admin token as this client (its scopes must include `tickgate:admin`).
        #[arg(long, conflicts_with = "token")]
        client_id: Option<String>,
        /// Its secret.
        #[arg(long, env = "TICKGATE_CLIENT_SECRET", hide_env_values = true)]
        client_secret: Option<String>,
        #[command(subcommand)]
        op: AdminOp,
    },
    /// Check a configuration and its feed files without starting anything; print the
    /// effective settings (secrets redacted) and the feeds. Exit 1 with the error otherwise.
    CheckConfig {
        /// TOML configuration file (default: the built-in defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Feed definitions folder (overrides the file).
        #[arg(long)]
        feeds_dir: Option<PathBuf>,
    },
    /// Write a new EC P-256 signing key (PKCS#8 PEM, mode 0600) for `issuer.signing_key_files`.
    Keygen {
        /// The key file to create (it must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Feed handler: publish a feed's synthetic source, or a recording, into NATS JetStream
    /// (nats-feeds-v1): streams created when missing, a new epoch, every message acknowledged.
    Publish {
        /// NATS server URL (nats://host:port); repeat for a cluster. Overrides `[nats] servers`.
        #[arg(long, required = true)]
        nats: Vec<String>,
        /// The feed (its definition is read from --feeds-dir).
        #[arg(long)]
        feed: String,
        /// Feed definitions folder (the same files as the edges').
        #[arg(long, default_value = "feeds")]
        feeds_dir: PathBuf,
        /// TOML configuration whose `[nats]` section gives the prefix, stream settings and
        /// credentials (the edges' file).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Publish records in the recording format from standard input instead of the
        /// feed's own source.
        #[arg(long, conflicts_with = "recording")]
        stdin: bool,
        /// Publish this recording file instead of the feed's own source.
        #[arg(long)]
        recording: Option<PathBuf>,
        /// Synthetic source: stop after this many ticks (default: until Ctrl-C / SIGTERM).
        #[arg(long, allow_negative_numbers = true, value_parser = int_in::<u64>(1, i64::MAX))]
        count: Option<u64>,
        /// Messages waiting for their JetStream ack at once.
        #[arg(long, default_value_t = 256, allow_negative_numbers = true, value_parser = int_in::<usize>(1, 65_536))]
        max_in_flight: usize,
    },
    /// Load generator: tickgate or NATS subscribers (latency histogram, delivered records/s), or a publisher.
    Load(Box<tickgate_bench::load::LoadArgs>),
}

/// Where `subscribe` and `record` connect, and as whom.
#[derive(clap::Args)]
struct StreamArgs {
    /// Stream URL (ws://host:port/v1/stream).
    #[arg(long)]
    url: String,
    /// Access token (`subscribe` can fetch its own instead: --client-id or --token-command).
    #[arg(long, env = "TICKGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Feed name.
    #[arg(long)]
    feed: String,
    /// Trust this CA certificate (PEM) for a wss:// URL.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
}

impl StreamArgs {
    /// The library's view of these arguments, with the comma-separated symbols. Without
    /// `--token` the token is left empty for a token source to fill (`fetched`), else it
    /// is an error.
    fn target(self, symbols: &str, fetched: bool) -> anyhow::Result<client::tools::StreamTarget> {
        let StreamArgs { url, token, feed, ca_cert } = self;
        let token = match token {
            Some(t) => t,
            None if fetched => String::new(),
            None => bail!(
                "give --token (or TICKGATE_TOKEN); subscribe can also fetch its own: --client-id or --token-command"
            ),
        };
        Ok(client::tools::StreamTarget { url, token, feed, symbols: split_symbols(symbols), ca_file: ca_cert })
    }
}

/// `tickgate admin` operations.
#[derive(Subcommand)]
enum AdminOp {
    /// Close the matching streams and publishers with 4003 and refuse the token(s) from
    /// now on (cluster-wide with NATS); prints the server's answer.
    Revoke {
        /// Every token of this subject.
        #[arg(long, required_unless_present = "jti", conflicts_with = "jti")]
        sub: Option<String>,
        /// The token with this id.
        #[arg(long)]
        jti: Option<String>,
    },
    /// List every stream connection (all pages), one JSON object per line.
    Connections,
}

/// A `--scope` value as the token request wants it: `md:read:A,md:read:B` (or with spaces)
/// means two scopes, sent space-separated.
fn scope_list(s: &str) -> String {
    s.split([',', ' ']).filter(|p| !p.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Where `subscribe` gets fresh tokens for in-band refresh (and its first token when
/// `--token` is not given).
#[derive(clap::Args)]
struct TokenArgs {
    /// Issuer base URL for --client-id (default: the stream URL's host, http(s)).
    #[arg(long)]
    issuer: Option<String>,
    /// Fetch tokens with the client credentials grant as this client.
    #[arg(long, requires = "client_secret", conflicts_with = "token_command")]
    client_id: Option<String>,
    /// Its secret.
    #[arg(long, env = "TICKGATE_CLIENT_SECRET", hide_env_values = true)]
    client_secret: Option<String>,
    /// Scopes to ask for (space- or comma-separated; default: the client's own).
    #[arg(long)]
    scope: Option<String>,
    /// A shell command that prints a fresh token on standard output.
    #[arg(long)]
    token_command: Option<String>,
}

impl TokenArgs {
    /// The token source these arguments name, if any. The issuer defaults to the stream's
    /// own host (the embedded issuer serves `/oauth2/token` on the stream listener).
    fn source(self, stream_url: &str, ca_file: Option<&PathBuf>) -> anyhow::Result<Option<client::tools::TokenSource>> {
        if let Some(cmd) = self.token_command {
            return Ok(Some(client::tools::TokenSource::Command(cmd)));
        }
        let Some(client_id) = self.client_id else { return Ok(None) };
        let client_secret =
            self.client_secret.context("--client-id needs --client-secret (or TICKGATE_CLIENT_SECRET)")?;
        let issuer = match self.issuer {
            Some(i) => i,
            None => {
                let uri: http::Uri = stream_url.parse().with_context(|| format!("bad --url {stream_url}"))?;
                let scheme = if uri.scheme_str() == Some("wss") { "https" } else { "http" };
                let auth = uri.authority().map(|a| a.as_str().to_owned()).context("--url has no host")?;
                format!("{scheme}://{auth}")
            }
        };
        let scope = self.scope.as_deref().map(scope_list);
        Ok(Some(client::tools::TokenSource::ClientCredentials {
            issuer,
            client_id,
            client_secret,
            scope,
            ca_file: ca_file.cloned(),
        }))
    }
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: redirected logs (files, journald, CI) stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// The shutdown signals (SIGTERM, SIGINT / Ctrl-C), counted: the first future resolves at
/// the first (a graceful shutdown starts), the second at the second (an operator who does
/// not want to wait cuts the lame-duck phase short). The handlers are installed here, at
/// once, so a signal that comes right after the start-up line is not missed.
fn shutdown_signals() -> (impl std::future::Future<Output = ()>, impl std::future::Future<Output = ()>) {
    let (count_tx, count_rx) = tokio::sync::watch::channel(0u32);
    #[cfg(unix)]
    let mut streams = {
        use tokio::signal::unix::{signal, SignalKind};
        (signal(SignalKind::terminate()).ok(), signal(SignalKind::interrupt()).ok())
    };
    tokio::spawn(async move {
        loop {
            #[cfg(unix)]
            {
                // A handler that could not be installed never fires.
                async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                    match s {
                        Some(s) => {
                            s.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                }
                let (term, int) = (&mut streams.0, &mut streams.1);
                tokio::select! {
                    _ = next(term) => {},
                    _ = next(int) => {},
                }
            }
            #[cfg(not(unix))]
            {
                let _ = tokio::signal::ctrl_c().await;
            }
            let mut n = 0;
            count_tx.send_modify(|c| {
                *c += 1;
                n = *c;
            });
            match n {
                1 => tracing::info!("shutdown requested"),
                2 => tracing::info!("second shutdown signal: cutting the lame-duck phase short"),
                _ => tracing::info!("shutdown already under way"),
            }
        }
    });
    let nth = |n: u32| {
        let mut rx = count_rx.clone();
        async move {
            // An error means the counting task is gone, which it never is while the
            // runtime runs; waiting forever is the answer then.
            if rx.wait_for(|c| *c >= n).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    (nth(1), nth(2))
}

fn split_symbols(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The main runtime runs acceptors, feeds and the admin listener; the shards run on
    // threads of their own, so one worker is enough and leaves the cores to the shards.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(match &cli.cmd {
            Cmd::Serve { .. } => 1,
            _ => 2,
        })
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    match rt.block_on(async_main(cli)) {
        // The reader of our output went away (`tickgate check-config | head`): end quietly with
        // the status a shell gives a command killed by SIGPIPE, as other Unix tools do (Rust
        // ignores SIGPIPE, so the write fails instead of killing the process).
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            std::process::exit(141)
        }
        r => r,
    }
}

async fn async_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve { config, listen, admin_listen, feeds_dir, state_dir, log_json, insecure_no_auth } => {
            let mut cfg = match &config {
                Some(p) => Config::from_file(p)?,
                None => Config::default(),
            };
            if let Some(a) = listen {
                cfg.listen = a;
            }
            if let Some(a) = admin_listen {
                cfg.admin_listen = a;
            }
            if let Some(d) = feeds_dir {
                cfg.feeds_dir = d;
            }
            if let Some(d) = state_dir {
                cfg.server.state_dir = Some(d);
            }
            if insecure_no_auth {
                cfg.auth.insecure_no_auth = true;
            }
            init_logs(log_json || cfg.log.format == LogFormat::Json);
            let (shutdown, hurry) = shutdown_signals();
            tickgate::run(cfg, shutdown, hurry).await?;
        }
        Cmd::Token { issuer, client_id, client_secret, scope, ca_cert } => {
            let scope = scope.as_deref().map(scope_list);
            let t =
                client::fetch_token_with_ca(&issuer, &client_id, &client_secret, scope.as_deref(), ca_cert.as_deref())
                    .await?;
            println!("{t}");
        }
        Cmd::Subscribe { stream, symbols, snapshot, json: _, limit, resume_file, tokens, reconnect } => {
            let token_source = tokens.source(&stream.url, stream.ca_cert.as_ref())?;
            let opts = client::tools::SubscribeOptions {
                stream: stream.target(&symbols, token_source.is_some())?,
                snapshot,
                limit,
                resume_file,
                token_source,
                reconnect,
            };
            // Distinct exit codes per way of ending (client::tools::exit, docs/protocol.md
            // §16), so that a script can branch on them; the reason goes to stderr.
            let summary = match client::tools::subscribe(&opts, std::io::stdout().lock()).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(client::tools::exit_code_of_error(&e).into());
                }
            };
            if summary.violations > 0 {
                eprintln!("error: {} delivery violations", summary.violations);
            }
            let code = summary.exit_code();
            if code != client::tools::exit::OK {
                if summary.end != client::tools::SubscribeEnd::Limit {
                    eprintln!("error: {}", summary.end.describe());
                }
                std::process::exit(code.into());
            }
        }
        Cmd::Record { stream, symbols, out, seconds, limit } => {
            if seconds.is_none() && limit.is_none() {
                bail!("give --seconds or --limit (a recording must end)");
            }
            let opts = client::tools::RecordOptions {
                stream: stream.target(&symbols, false)?,
                out,
                duration: seconds.map(Duration::from_secs_f64),
                limit,
            };
            let summary = client::tools::record(&opts).await?;
            if summary.gaps_seen > 0 || summary.resets_seen > 0 {
                eprintln!(
                    "warning: {} gaps and {} resets while recording: the capture is not the whole stream",
                    summary.gaps_seen, summary.resets_seen
                );
            }
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        Cmd::Admin { admin, token, issuer, client_id, client_secret, op } => {
            let token = match (token, client_id) {
                (Some(t), _) => t,
                (None, Some(id)) => {
                    let secret =
                        client_secret.context("--client-id needs --client-secret (or TICKGATE_CLIENT_SECRET)")?;
                    client::fetch_token(&issuer, &id, &secret, Some("tickgate:admin")).await?
                }
                (None, None) => bail!("give --token (or TICKGATE_ADMIN_TOKEN), or --client-id with its secret"),
            };
            let api = client::admin::AdminClient::new(&admin, &token)?;
            let mut o = std::io::stdout().lock();
            match op {
                AdminOp::Revoke { sub, jti } => {
                    let target = match (sub, jti) {
                        (Some(s), _) => client::admin::RevokeTarget::Sub(s),
                        (None, Some(j)) => client::admin::RevokeTarget::Jti(j),
                        (None, None) => bail!("give --sub or --jti"),
                    };
                    writeln!(o, "{}", serde_json::to_string_pretty(&api.revoke(&target).await?)?)?;
                }
                AdminOp::Connections => {
                    for c in api.connections().await? {
                        writeln!(o, "{c}")?;
                    }
                }
            }
        }
        Cmd::CheckConfig { config, feeds_dir } => {
            let mut cfg = match &config {
                Some(p) => Config::from_file(p)?,
                None => Config::default(),
            };
            if let Some(d) = feeds_dir {
                cfg.feeds_dir = d;
            }
            let defs = tickgate::check_config(&cfg)?;
            let from = config.as_ref().map_or("built-in defaults".to_owned(), |p| p.display().to_string());
            let mut o = std::io::stdout().lock();
            writeln!(o, "configuration OK ({from}); effective settings:\n{cfg:#?}")?;
            writeln!(o, "feeds ({}):", defs.len())?;
            for d in &defs {
                let (name, id, source, policy, n) = (&d.name, d.id, d.source, d.policy, d.symbols.len());
                writeln!(o, "  {name} id {id} source {source:?} policy {policy:?}: {n} symbols")?;
            }
        }
        Cmd::Keygen { out } => {
            let kid = tickgate::auth::keyfile::write_new_key_file(&out)?;
            println!("wrote {} (kid {kid})", out.display());
        }
        Cmd::Publish { nats, feed, feeds_dir, config, stdin, recording, count, max_in_flight } => {
            use tickgate::sources::nats::handler::{self, HandlerInput};
            init_logs(false);
            let mut cfg = match &config {
                Some(p) => Config::from_file(p)?,
                None => Config::default(),
            };
            cfg.nats.servers = nats;
            cfg.validate()?;
            let (defs, _) = tickgate::feeds::load_defs(&feeds_dir, false)?;
            let Some(def) = defs.into_iter().find(|d| d.name == feed) else {
                bail!("no feed {feed:?} in {}", feeds_dir.display());
            };
            let input = if stdin {
                HandlerInput::Recording(Box::new(std::io::stdin()))
            } else if let Some(path) = recording {
                let file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
                HandlerInput::Recording(Box::new(file))
            } else if def.synthetic.is_some() {
                HandlerInput::Synthetic { count }
            } else {
                bail!("feed {feed} has no [synthetic] section: give --recording FILE or --stdin");
            };
            let cancel = tokio_util::sync::CancellationToken::new();
            let stop = cancel.clone();
            let (first, _second) = shutdown_signals();
            tokio::spawn(async move {
                first.await;
                stop.cancel();
            });
            let stats = handler::run(&cfg.nats, &def, input, max_in_flight, &cancel).await?;
            println!(
                "{}",
                serde_json::json!({"feed": def.name, "epoch": stats.epoch, "messages": stats.messages,
                    "records": stats.records, "retries": stats.retries})
            );
        }
        Cmd::Load(args) => {
            let argv: Vec<String> = std::env::args().skip(1).collect();
            let report = tickgate_bench::load::execute(*args, argv).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(())
}
