//! Prometheus metrics (spec §9).
//!
//! Hot-path counters are kept per shard in plain integers (`engine::stats::CoreStats`)
//! and added to these shared counters by each shard every 100 ms, so delivering a record
//! never touches a contended atomic. Gauges that describe shard state (connections,
//! queue depth, subscriptions) are read from the shards at scrape time.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Latency buckets from 10 µs to 10 s, roughly ×2.5 apart.
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Every metric the server exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Open stream connections.
    pub connections: IntGauge,
    /// Handshakes by result.
    pub handshakes: IntCounterVec,
    /// Refused tokens by reason.
    pub auth_failures: IntCounterVec,
    /// Ticks taken in, by feed.
    pub ticks_ingested: IntCounterVec,
    /// Records written to sockets, by feed.
    pub records_delivered: IntCounterVec,
    /// WebSocket messages written (binary batches and text).
    pub frames_sent: IntCounter,
    /// Payload bytes written.
    pub bytes_sent: IntCounter,
    /// Socket writes: one per writer wake-up or direct write by the shard (one per
    /// connection per dispatch cycle), however many messages it wrote.
    pub socket_flushes: IntCounter,
    /// Ingest to socket write, per batch (its oldest record).
    pub fanout_latency: Histogram,
    /// Slow-consumer actions.
    pub slow_consumer_events: IntCounterVec,
    /// Connections closed at token expiry.
    pub token_expiries: IntCounter,
    /// In-band refreshes by result.
    pub token_refreshes: IntCounterVec,
    /// Connections closed by revocation.
    pub revocations: IntCounter,
    /// JWKS fetches by result.
    pub jwks_refreshes: IntCounterVec,
    /// Keys in the verification cache.
    pub jwks_keys: IntGauge,
    /// Subscribed (connection, instrument) pairs.
    pub subscriptions: IntGauge,
    /// Ticks waiting in each shard's inbound queue.
    pub shard_queue_depth: IntGaugeVec,
    /// Control-message errors by code.
    pub control_errors: IntCounterVec,
    /// Connection closes by close code.
    pub closes: IntCounterVec,
    /// Ticks a source had to hold back because a shard queue was full.
    pub ingest_backpressure: IntGauge,
    /// Handshake duration (request head to 101 or refusal).
    pub handshake_latency: HistogramVec,
    /// Seq jumps observed in a source.
    pub source_gaps: IntCounter,
    /// Entries in each shard's timer wheel.
    pub timer_wheel_entries: IntGaugeVec,
    /// Entries in the revocation list.
    pub revocation_entries: IntGauge,
    /// Seconds since the last good JWKS fetch (external issuer).
    pub jwks_age: prometheus::Gauge,
    /// Records per binary message written.
    pub batch_records: Histogram,
    /// Duration of a shard dispatch cycle that dispatched at least one tick.
    pub dispatch_cycle: HistogramVec,
    /// Outbound bytes queued (not yet taken by sockets), per shard.
    pub outbound_queued_bytes: IntGaugeVec,
    /// The server-wide outbound budget in force (`limits.max_outbound_total_bytes`).
    pub outbound_budget: IntGauge,
    /// Connections acted on to bring the server back within its outbound budget, by action.
    pub outbound_budget_sheds: IntCounterVec,
    /// CPU time of each shard's thread (its busy ratio is the rate of this).
    pub shard_cpu: prometheus::CounterVec,
    /// The share of the last flush interval each shard's thread spent on the CPU.
    pub shard_busy: prometheus::GaugeVec,
    /// Time each shard took no ticks because it owed writes to connections whose sockets
    /// took data (the server's own overload, turned into backpressure).
    pub intake_paused: prometheus::CounterVec,
    /// How long the last tick a shard dispatched had waited since ingest.
    pub dispatch_lag: prometheus::GaugeVec,
    /// Source lag: ingest time minus the tick's source (scheduled) time, per feed.
    pub ingest_lag: HistogramVec,
    /// Constant 1, labelled with the version.
    pub build_info: IntGaugeVec,
    /// Records not queued to a conflating connection (replaced quotes, dropped trades).
    pub conflated_records: IntCounter,
    /// `gap` messages sent, by reason.
    pub gaps_sent: IntCounterVec,
    /// Updates of throttled subscriptions queued (protocol v1.1 `max_rate`).
    pub throttle_updates: IntCounter,
    /// Quotes of throttled subscriptions replaced by a later quote of the same interval.
    pub throttle_replaced: IntCounter,
    /// Records sent from the resume buffer.
    pub replayed_records: IntCounter,
    /// Resume requests per instrument, by result (`replayed`, `unavailable`).
    pub resumes: IntCounterVec,
    /// Epoch resets dispatched (per shard).
    pub epoch_resets: IntCounter,
    /// Connections closed for not answering pings.
    pub heartbeat_timeouts: IntCounter,
    /// Publish batches refused, by reason.
    pub publish_rejects: IntCounterVec,
    /// Publish handshakes by result.
    pub publish_handshakes: IntCounterVec,
    /// Connected publishers.
    pub publishers: IntGauge,
    /// 1 during a shutdown's lame-duck phase (`server.lame_duck_ms`), else 0.
    pub lame_duck: IntGauge,
    /// `POST /v1/ticket` answers by result.
    pub tickets: IntCounterVec,
    /// `POST /oauth2/token` answers by result (embedded issuer).
    pub token_requests: IntCounterVec,
    /// `POST /admin/revoke` answers by result.
    pub revoke_requests: IntCounterVec,
    /// HTTP requests or connections cut at a deadline, by listener and stage (`head`,
    /// `body`, `idle`).
    pub http_timeouts: IntCounterVec,
    /// Sockets or requests refused at the listener, by listener and reason
    /// (`pending_per_ip`, `fd_reserve`, `body_too_large`).
    pub http_refused: IntCounterVec,
    /// Failed `accept` calls, by listener and kind (`emfile`, `enfile`, `enomem`, `aborted`, `other`).
    pub accept_errors: IntCounterVec,
    /// 1 while the NATS connection is up (nats-feeds-v1 §6; 0 without `nats.servers`).
    pub nats_connected: IntGauge,
    /// NATS messages taken in, by feed (warm start included).
    pub nats_messages: IntCounterVec,
    /// NATS messages dropped for breaking the contract, by feed and reason.
    pub nats_rejects: IntCounterVec,
    /// Now minus the time the newest NATS message of a feed was taken in (s).
    pub nats_last_message_age: prometheus::GaugeVec,
    /// The last stream sequence of `MD_<FEED>` taken in, by feed.
    pub nats_stream_seq: IntGaugeVec,
    /// Times the NATS connection came back after being lost.
    pub nats_reconnects: IntCounter,
    /// Cluster-wide revocations (the `tickgate_revocations` bucket) by result: `stored`,
    /// `pending`, `stored_later`, `queue_full` (admin calls' writes), `applied_from_cluster`,
    /// `bad_entry`, `list_full` (entries seen in the bucket).
    pub revocations_cluster: IntCounterVec,
}

/// Registers a metric, panicking on a programming error (a bad name or a duplicate).
fn reg<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: prometheus::Result<M>) -> M {
    let m = m.unwrap_or_else(|e| panic!("metric definition: {e}"));
    r.register(Box::new(m.clone())).unwrap_or_else(|e| panic!("metric registration: {e}"));
    m
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(r, IntCounterVec::new(Opts::new(name, help), labels))
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    reg(r, IntCounter::new(name, help))
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    reg(r, IntGauge::new(name, help))
}

impl Metrics {
    /// Creates and registers every metric. Names and labels are constants, so a failure
    /// here is a programming error caught by the first test, hence the panics.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Metrics {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = r.register(Box::new(pc));
        }
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            reg(&r, Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)))
        };
        let hist_vec = |name: &str, help: &str, label: &str| {
            reg(&r, HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), &[label]))
        };
        let gauge_vec =
            |name: &str, help: &str, label: &str| reg(&r, IntGaugeVec::new(Opts::new(name, help), &[label]));
        let fanout_latency = hist(
            "tickgate_fanout_latency_seconds",
            "Time from ingest to the socket write of the batch carrying the record",
            LATENCY_BUCKETS.to_vec(),
        );
        let handshake_latency =
            hist_vec("tickgate_handshake_duration_seconds", "Time to answer a stream handshake", "result");
        let shard_queue_depth =
            gauge_vec("tickgate_shard_queue_depth", "Ticks waiting in a shard's inbound queue", "shard");
        let timer_wheel_entries =
            gauge_vec("tickgate_timer_wheel_entries", "Entries in a shard's timer wheel (token expiry)", "shard");
        let jwks_age =
            reg(&r, prometheus::Gauge::new("tickgate_jwks_age_seconds", "Seconds since the last good JWKS fetch"));
        let batch_records = hist(
            "tickgate_batch_records",
            "Records per binary message written",
            vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0],
        );
        let dispatch_cycle = hist_vec("tickgate_dispatch_cycle_seconds", "Duration of a shard dispatch cycle", "shard");
        let outbound_queued_bytes =
            gauge_vec("tickgate_outbound_queued_bytes", "Outbound bytes queued for sockets, per shard", "shard");
        let f64_counter_vec =
            |name: &str, help: &str| reg(&r, prometheus::CounterVec::new(Opts::new(name, help), &["shard"]));
        let f64_gauge_vec =
            |name: &str, help: &str| reg(&r, prometheus::GaugeVec::new(Opts::new(name, help), &["shard"]));
        let outbound_budget = gauge(
            &r,
            "tickgate_outbound_budget_bytes",
            "The server-wide outbound budget: all connections' backlogs together",
        );
        let outbound_budget_sheds = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "tickgate_outbound_budget_sheds_total",
                    "Connections closed (disconnect) or set conflating (conflate) with the server over its outbound budget",
                ),
                &["action"],
            ),
        );
        let shard_cpu = f64_counter_vec("tickgate_shard_cpu_seconds_total", "CPU time of a shard's thread");
        let shard_busy =
            f64_gauge_vec("tickgate_shard_busy_ratio", "Share of the last 100 ms a shard's thread was on the CPU");
        let intake_paused = f64_counter_vec(
            "tickgate_shard_intake_paused_seconds_total",
            "Time a shard took no ticks while it wrote what it owed to connections that keep up",
        );
        let dispatch_lag = f64_gauge_vec(
            "tickgate_dispatch_lag_seconds",
            "How long the last tick a shard dispatched had waited since ingest (0: its queue is empty)",
        );
        let ingest_lag =
            hist_vec("tickgate_ingest_lag_seconds", "Ingest time minus the tick's source time, per feed", "feed");
        let build_info = gauge_vec("tickgate_build_info", "Build information", "version");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let nats_last_message_age = reg(
            &r,
            prometheus::GaugeVec::new(
                Opts::new(
                    "tickgate_nats_last_message_age_seconds",
                    "Now minus the time the newest NATS message was taken in, per feed",
                ),
                &["feed"],
            ),
        );
        Metrics {
            nats_connected: gauge(&r, "tickgate_nats_connected", "1 while the NATS connection is up"),
            nats_messages: counter_vec(
                &r,
                "tickgate_nats_messages_total",
                "NATS messages taken in, by feed",
                &["feed"],
            ),
            nats_rejects: counter_vec(
                &r,
                "tickgate_nats_rejects_total",
                "NATS messages dropped for breaking the feed contract, by feed and reason",
                &["feed", "reason"],
            ),
            nats_last_message_age,
            nats_stream_seq: gauge_vec("tickgate_nats_stream_seq", "Last stream sequence taken in, per feed", "feed"),
            nats_reconnects: counter(&r, "tickgate_nats_reconnects_total", "NATS connections re-established"),
            revocations_cluster: counter_vec(
                &r,
                "tickgate_revocations_cluster_total",
                "Cluster-wide revocations through the NATS bucket, by result",
                &["result"],
            ),
            batch_records,
            dispatch_cycle,
            outbound_budget,
            outbound_budget_sheds,
            shard_cpu,
            shard_busy,
            intake_paused,
            dispatch_lag,
            outbound_queued_bytes,
            ingest_lag,
            build_info,
            jwks_age,
            timer_wheel_entries,
            revocation_entries: gauge(&r, "tickgate_revocation_entries", "Entries in the revocation list"),
            connections: gauge(&r, "tickgate_connections", "Open stream connections"),
            handshakes: counter_vec(&r, "tickgate_handshakes_total", "Stream handshakes by result", &["result"]),
            auth_failures: counter_vec(&r, "tickgate_auth_failures_total", "Refused tokens by reason", &["reason"]),
            ticks_ingested: counter_vec(&r, "tickgate_ticks_ingested_total", "Ticks ingested by feed", &["feed"]),
            records_delivered: counter_vec(
                &r,
                "tickgate_records_delivered_total",
                "Records written to client sockets by feed",
                &["feed"],
            ),
            frames_sent: counter(&r, "tickgate_frames_sent_total", "WebSocket messages written"),
            bytes_sent: counter(&r, "tickgate_bytes_sent_total", "WebSocket payload bytes written"),
            socket_flushes: counter(
                &r,
                "tickgate_socket_flushes_total",
                "Socket writes (one per writer wake-up, or per connection the shard wrote after a dispatch cycle, covering all messages it wrote)",
            ),
            fanout_latency,
            slow_consumer_events: counter_vec(
                &r,
                "tickgate_slow_consumer_events_total",
                "Slow-consumer actions",
                &["action"],
            ),
            token_expiries: counter(&r, "tickgate_token_expiries_total", "Connections closed at token expiry"),
            token_refreshes: counter_vec(
                &r,
                "tickgate_token_refreshes_total",
                "In-band token refreshes by result",
                &["result"],
            ),
            revocations: counter(&r, "tickgate_revocations_total", "Connections closed by revocation"),
            jwks_refreshes: counter_vec(&r, "tickgate_jwks_refreshes_total", "JWKS fetches by result", &["result"]),
            jwks_keys: gauge(&r, "tickgate_jwks_keys", "Keys in the verification cache"),
            subscriptions: gauge(&r, "tickgate_subscriptions", "Subscribed (connection, instrument) pairs"),
            shard_queue_depth,
            control_errors: counter_vec(
                &r,
                "tickgate_control_errors_total",
                "Control messages answered with an error, by code",
                &["code"],
            ),
            closes: counter_vec(&r, "tickgate_closes_total", "Stream closes by close code", &["code"]),
            ingest_backpressure: gauge(
                &r,
                "tickgate_ingest_backpressure_waits",
                "Times a source waited for space in a full shard queue",
            ),
            handshake_latency,
            source_gaps: counter(&r, "tickgate_source_gaps_total", "Seq jumps seen in a source"),
            conflated_records: counter(
                &r,
                "tickgate_conflated_records_total",
                "Records not queued to a conflating connection (replaced quotes, dropped trades)",
            ),
            gaps_sent: counter_vec(&r, "tickgate_gaps_sent_total", "gap messages sent, by reason", &["reason"]),
            throttle_updates: counter(
                &r,
                "tickgate_throttle_updates_total",
                "Updates of throttled subscriptions queued (one per subscriber and interval)",
            ),
            throttle_replaced: counter(
                &r,
                "tickgate_throttle_replaced_quotes_total",
                "Quotes of throttled subscriptions replaced by a later quote of the same interval",
            ),
            replayed_records: counter(&r, "tickgate_replayed_records_total", "Records sent from the resume buffer"),
            resumes: counter_vec(&r, "tickgate_resumes_total", "Resumed instruments by result", &["result"]),
            epoch_resets: counter(&r, "tickgate_epoch_resets_total", "Feed epoch resets applied (per shard)"),
            heartbeat_timeouts: counter(
                &r,
                "tickgate_heartbeat_timeouts_total",
                "Connections closed for not answering pings within two intervals",
            ),
            publish_rejects: counter_vec(
                &r,
                "tickgate_publish_rejects_total",
                "Publish batches refused, by reason",
                &["reason"],
            ),
            publish_handshakes: counter_vec(
                &r,
                "tickgate_publish_handshakes_total",
                "Publish handshakes by result",
                &["result"],
            ),
            publishers: gauge(&r, "tickgate_publishers", "Connected publishers"),
            lame_duck: gauge(
                &r,
                "tickgate_lame_duck",
                "1 while a shutdown spreads its clients' shutdown messages over server.lame_duck_ms",
            ),
            tickets: counter_vec(&r, "tickgate_tickets_total", "POST /v1/ticket answers by result", &["result"]),
            token_requests: counter_vec(
                &r,
                "tickgate_token_requests_total",
                "POST /oauth2/token answers by result (embedded issuer)",
                &["result"],
            ),
            revoke_requests: counter_vec(
                &r,
                "tickgate_revoke_requests_total",
                "POST /admin/revoke answers by result",
                &["result"],
            ),
            http_timeouts: counter_vec(
                &r,
                "tickgate_http_timeouts_total",
                "HTTP requests or connections cut at a deadline, by listener and stage",
                &["listener", "stage"],
            ),
            http_refused: counter_vec(
                &r,
                "tickgate_http_refused_total",
                "Sockets or requests refused at the listener, by listener and reason",
                &["listener", "reason"],
            ),
            accept_errors: counter_vec(
                &r,
                "tickgate_accept_errors_total",
                "Failed accept calls, by listener and kind",
                &["listener", "kind"],
            ),
            registry: r,
        }
    }

    /// Creates every series whose label values are known up front, at zero, so dashboards
    /// and alerts see a series (and a rate of 0) before the first event rather than "no data".
    pub fn init_known_series(&self, feeds: &[&str], shards: usize) {
        self.slow_consumer_events.with_label_values(&["disconnect"]);
        self.slow_consumer_events.with_label_values(&["conflate"]);
        self.slow_consumer_events.with_label_values(&["dropped"]);
        for l in ["public", "admin"] {
            for st in ["head", "body", "idle"] {
                self.http_timeouts.with_label_values(&[l, st]);
            }
            for r in ["pending_per_ip", "body_too_large"] {
                self.http_refused.with_label_values(&[l, r]);
            }
            for k in ["emfile", "enfile"] {
                self.accept_errors.with_label_values(&[l, k]);
            }
        }
        self.http_refused.with_label_values(&["public", "fd_reserve"]);
        // Label sets a layer owns are primed by that layer: `gaps_sent{reason}`,
        // `resumes{result}` and `token_refreshes{result}` by the engine when it starts
        // (`engine::GapReason`, `ResumeResult`, `RefreshResult`), `auth_failures{reason}` by
        // the auth setup (`auth::failure::AuthFailure`), the handshake and ticket results
        // by the server's state (`server::authorize::HandshakeResult`), publish rejects by
        // the publish source (`sources::publish::PublishReject`).
        for r in
            ["ok", "unauthorized", "forbidden", "bad_request", "unsupported_media_type", "too_large", "unavailable"]
        {
            self.revoke_requests.with_label_values(&[r]);
        }
        for r in ["ok", "transport", "http_status", "not_json", "too_large", "bad_json", "empty"] {
            self.jwks_refreshes.with_label_values(&[r]);
        }
        for c in [
            "bad_request",
            "unknown_feed",
            "unknown_symbol",
            "insufficient_scope",
            "invalid_token",
            "rate_limited",
            "limit_exceeded",
            "bad_record",
        ] {
            self.control_errors.with_label_values(&[c]);
        }
        for a in ["disconnect", "conflate"] {
            self.outbound_budget_sheds.with_label_values(&[a]);
        }
        for c in ["1000", "1001", "1002", "1006", "1007", "1008", "4001", "4003", "4008"] {
            self.closes.with_label_values(&[c]);
        }
        for r in ["ok", "refused"] {
            self.handshake_latency.with_label_values(&[r]);
        }
        for f in feeds {
            self.ingest_lag.with_label_values(&[f]);
            self.ticks_ingested.with_label_values(&[f]);
            self.records_delivered.with_label_values(&[f]);
        }
        for i in 0..shards {
            self.shard_queue_depth.with_label_values(&[&i.to_string()]);
            self.timer_wheel_entries.with_label_values(&[&i.to_string()]);
            self.dispatch_cycle.with_label_values(&[&i.to_string()]);
            self.outbound_queued_bytes.with_label_values(&[&i.to_string()]);
            self.shard_cpu.with_label_values(&[&i.to_string()]);
            self.shard_busy.with_label_values(&[&i.to_string()]);
            self.intake_paused.with_label_values(&[&i.to_string()]);
            self.dispatch_lag.with_label_values(&[&i.to_string()]);
        }
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
