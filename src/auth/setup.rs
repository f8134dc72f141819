//! Building the authentication side from the configuration: the key store, the embedded
//! issuer (with an embedded issuer) or the JWKS cache (with an external one and a
//! `jwks_url`), and the validator over them; and starting their background tasks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::issuer::{EmbeddedIssuer, IssuerError, DEMO_SECRET_ENV};
use super::jwks::{JwksCache, JwksError, JwksSettings};
use super::keys::KeyStore;
use super::validate::Validator;
use crate::config::{Config, IssuerMode};
use crate::metrics::Metrics;

/// Why the authentication side could not be built.
#[derive(Debug, Error)]
pub enum AuthSetupError {
    /// The embedded issuer could not be built.
    #[error(transparent)]
    Issuer(#[from] IssuerError),
    /// The JWKS client could not be built.
    #[error("JWKS client: {0}")]
    Jwks(JwksError),
}

/// The authentication side of a server.
#[derive(Debug)]
pub(crate) struct Auth {
    /// The embedded issuer, when `issuer.mode = "embedded"`.
    pub issuer: Option<Arc<EmbeddedIssuer>>,
    /// The demo client's secret when it was generated (not taken from the environment).
    pub generated_demo_secret: Option<String>,
    /// The JWKS cache, with an external issuer and a `jwks_url`.
    pub jwks: Option<Arc<JwksCache>>,
    /// Token validation over the key store (and the JWKS cache).
    pub validator: Arc<Validator>,
}

impl Auth {
    /// Builds the key store, issuer or JWKS cache, and validator. `addr` is the bound public
    /// address: the embedded issuer's default `iss` is `http(s)://{addr}`.
    pub(crate) fn build(config: &Config, addr: SocketAddr, metrics: &Metrics) -> Result<Auth, AuthSetupError> {
        super::failure::prime_metrics(metrics);
        let keys = Arc::new(KeyStore::new());
        let (issuer, generated_demo_secret, iss_name) = match config.issuer.mode {
            IssuerMode::Embedded => {
                let scheme = if config.tls.enabled() { "https" } else { "http" };
                let iss_name = config.issuer.issuer.clone().unwrap_or_else(|| format!("{scheme}://{addr}"));
                let demo_secret = std::env::var(DEMO_SECRET_ENV).ok();
                let (iss, generated) = EmbeddedIssuer::new(&config.issuer, iss_name.clone(), &keys, demo_secret)?;
                // A token is accepted until exp + expiry_grace_ms: keep its key that long.
                let margin =
                    Duration::from_secs(config.auth.leeway_s) + Duration::from_millis(config.auth.expiry_grace_ms);
                let iss = iss.with_retire_margin(margin).with_request_counter(metrics.token_requests.clone());
                (Some(Arc::new(iss)), generated, iss_name)
            }
            IssuerMode::External => (None, None, config.issuer.issuer.clone().unwrap_or_default()),
        };
        let jwks = match (config.issuer.mode, &config.issuer.jwks_url) {
            (IssuerMode::External, Some(url)) => {
                let settings = JwksSettings {
                    url: url.clone(),
                    refresh: Duration::from_secs(config.issuer.jwks_refresh_s),
                    cooldown: Duration::from_secs(config.issuer.jwks_cooldown_s),
                    max_stale: Duration::from_secs(config.issuer.jwks_max_stale_s),
                    timeout: Duration::from_millis(config.issuer.jwks_timeout_ms),
                    max_bytes: config.issuer.jwks_max_bytes,
                };
                let cache = JwksCache::new(settings, keys.clone(), metrics.clone()).map_err(AuthSetupError::Jwks)?;
                Some(Arc::new(cache))
            }
            _ => None,
        };
        let mut validator = Validator::new(keys, iss_name, config.issuer.audience.clone(), &config.auth);
        if let Some(cache) = &jwks {
            validator = validator.with_jwks(cache.clone());
        }
        Ok(Auth { issuer, generated_demo_secret, jwks, validator: Arc::new(validator) })
    }

    /// Starts the background tasks on `tasks`, each stopping when `cancel` fires: the
    /// issuer's key rotation and retirement ([`super::rotation`]), the JWKS refresh.
    pub(crate) fn spawn_tasks(&self, config: &Config, tasks: &TaskTracker, cancel: &CancellationToken) {
        if let Some(iss) = &self.issuer {
            let every = (config.issuer.key_rotation_s > 0).then(|| Duration::from_secs(config.issuer.key_rotation_s));
            tasks.spawn(super::rotation::run(iss.clone(), every, cancel.clone()));
        }
        if let Some(cache) = &self.jwks {
            tasks.spawn(cache.clone().run(cancel.clone()));
        }
    }
}
