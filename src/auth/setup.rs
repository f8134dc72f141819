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

    /// Where the secret of the built-in `demo` client came from, when that client is served
    /// on a non-loopback `listen` (the start-up then warns): the embedded issuer runs with
    /// no `issuer.clients`, so a `demo` client with `md:read:*` exists, and any host that
    /// reaches the port with its secret reads every feed. `None` on loopback, with an
    /// external issuer or with configured clients.
    pub(crate) fn exposed_demo_client(&self, config: &Config, listen: SocketAddr) -> Option<&'static str> {
        // `to_canonical`: `[::ffff:127.0.0.1]` is loopback too.
        if self.issuer.is_none() || !config.issuer.clients.is_empty() || listen.ip().to_canonical().is_loopback() {
            return None;
        }
        Some(if self.generated_demo_secret.is_some() {
            "generated, printed on standard output"
        } else {
            DEMO_SECRET_ENV
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientConfig;

    #[test]
    fn the_demo_client_is_exposed_only_off_loopback_and_only_when_it_exists() {
        let metrics = Metrics::new();
        let config = Config::default();
        let auth = Auth::build(&config, "127.0.0.1:8080".parse().expect("addr"), &metrics).expect("auth");
        let at = |a: &str| auth.exposed_demo_client(&config, a.parse().expect("addr"));
        for local in ["127.0.0.1:8080", "127.0.0.2:8080", "[::1]:8080", "[::ffff:127.0.0.1]:8080"] {
            assert_eq!(at(local), None, "{local}");
        }
        for exposed in ["0.0.0.0:8080", "[::]:8080", "192.168.1.5:8080", "[2001:db8::1]:8080"] {
            assert!(at(exposed).is_some(), "{exposed}");
        }
        // With the issuer's own clients there is no demo client to warn about.
        let mut own = Config::default();
        own.issuer.clients = vec![ClientConfig {
            id: "app".into(),
            secret: Some("s3cret".into()),
            secret_sha256: None,
            scopes: vec!["md:read:*".into()],
        }];
        let auth = Auth::build(&own, "0.0.0.0:8080".parse().expect("addr"), &metrics).expect("auth");
        assert_eq!(auth.exposed_demo_client(&own, "0.0.0.0:8080".parse().expect("addr")), None);
    }
}
