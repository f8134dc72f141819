//! The embedded issuer's key maintenance task: rotation every `issuer.key_rotation_s`, and
//! retirement of keys whose tokens have all expired (checked every second).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::issuer::EmbeddedIssuer;

/// Key rotation and retirement of keys whose tokens have all expired, until `cancel`
/// fires. `every` is the rotation period (`None`: keys are never rotated, only retired).
pub(crate) async fn run(iss: Arc<EmbeddedIssuer>, every: Option<Duration>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut next_rotation = every.map(|e| tokio::time::Instant::now() + e);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        iss.retire_expired();
        if let (Some(at), Some(e)) = (next_rotation, every) {
            if tokio::time::Instant::now() >= at {
                if let Err(err) = iss.rotate() {
                    tracing::error!(error = %err, "issuer key rotation failed");
                }
                next_rotation = Some(at + e);
            }
        }
    }
}
