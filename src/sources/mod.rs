//! Sources: what produces a feed's ticks and hands them to the engine's
//! [`crate::engine::Ingest`], which appends each one to the feed log before it
//! queues it for the shards (that order is what makes resume exact).
//!
//! | source (`source =` in the feed file) | module |
//! |---|---|
//! | `synthetic`: a seeded random walk of trades and quotes | `synthetic` |
//! | `replay`: a recording played back at its own pace, looping | `replay` |
//! | `publish`: upstream feed handlers on `GET /v1/publish` | [`publish`] (the batch rules, seqs and ingest of one publisher connection; the endpoint and connection task are `server::publish`) |
//! | `nats`: the feed's NATS JetStream stream (scale-out: every edge numbers alike) | `nats` (connection, streams, warm start, live consumption, readiness) |
//!
//! This module sits above both `feeds` (the definitions it reads) and `engine` (the
//! ingest it writes to), which is why sources are not part of `feeds`.

pub mod nats;
pub mod publish;
pub(crate) mod replay;
pub(crate) mod synthetic;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::Ingest;
use crate::feeds::{Catalog, SourceKind};
use crate::metrics::Metrics;

/// Starts one task per synthetic or replay feed on `tasks`; each stops when `cancel`
/// fires. Publish feeds have no task here: their publishers' connections feed them
/// (through [`publish::PublishSource`]); their reject counters are primed here.
pub(crate) fn spawn(
    catalog: &Catalog,
    ingest: &Ingest,
    metrics: &Metrics,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) {
    publish::prime_metrics(metrics);
    for feed in catalog.feeds() {
        let lag = metrics.ingest_lag.with_label_values(&[feed.name()]);
        match (feed.def.source, &feed.def.synthetic, &feed.def.replay) {
            (SourceKind::Synthetic, Some(def), _) => {
                let generator = synthetic::Generator::new(def, feed.idx, feed.id(), feed.instrument_count());
                tasks.spawn(synthetic::run(def.clone(), generator, ingest.clone(), lag, cancel.clone()));
            }
            (SourceKind::Replay, _, Some(def)) => {
                tasks.spawn(replay::run(def.clone(), feed.idx as u16, ingest.clone(), lag, cancel.clone()));
            }
            // Publish feeds are fed by `GET /v1/publish` connections; a definition whose
            // source block is missing was refused when the catalog was loaded.
            _ => {}
        }
    }
}
