//! Log capture for tests that check what the server logs. All tests share one process and
//! `tracing` has one global subscriber, so it is installed here once, and it records only
//! while some test holds a [`Capture`]: the other tests' servers do not pay for debug-level
//! formatting, and no buffer grows for the whole run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// How many [`Capture`]s are alive. The filter reads it per event (the filter says
/// "sometimes" to every callsite, so `tracing` does not cache a verdict per callsite).
static CAPTURES: AtomicUsize = AtomicUsize::new(0);

/// Everything logged in this process at debug level while it lives (whichever test logged
/// it: a check that something is never logged only gets stronger).
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::ops::Deref for Capture {
    type Target = Mutex<Vec<u8>>;
    fn deref(&self) -> &Mutex<Vec<u8>> {
        &self.0
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        CAPTURES.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Starts capturing (the subscriber is installed on the first call).
pub fn capture() -> Capture {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    let buf = LOGS
        .get_or_init(|| {
            let buf = Arc::new(Mutex::new(Vec::new()));
            let writer = buf.clone();
            let layer = tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || LogWriter(writer.clone()))
                .with_filter(
                    // `dynamic_filter_fn`, not `filter_fn`: a `FilterFn` caches its answer per
                    // callsite (always/never) the first time the callsite is hit, so a log
                    // line first reached while no test captured would stay off for good.
                    tracing_subscriber::filter::dynamic_filter_fn(|m, _| {
                        *m.level() <= tracing::Level::DEBUG && CAPTURES.load(Ordering::SeqCst) > 0
                    })
                    // `trace!` callsites stay disabled outright, capturing or not.
                    .with_max_level_hint(tracing::level_filters::LevelFilter::DEBUG),
                );
            // Nothing else in this binary installs one; were one installed, this capture
            // would record nothing and the test using it would fail, not pass silently.
            let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer));
            buf
        })
        .clone();
    CAPTURES.fetch_add(1, Ordering::SeqCst);
    Capture(buf)
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
