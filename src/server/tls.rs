//! TLS for both listeners (tokio-rustls, aws-lc-rs provider, TLS 1.2 and 1.3), with the
//! certificate reloadable at run time (SIGHUP): new handshakes use the new certificate,
//! established connections keep theirs and are not dropped.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

/// A certificate or key that could not be loaded.
#[derive(Debug, Error)]
pub enum TlsError {
    /// The PEM file could not be read or holds no usable item.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the certificate/key pair.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn pem_err(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::Pem { path: path.to_owned(), message: message.to_string() }
}

/// Builds a server configuration from PEM files.
pub(crate) fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_err(cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(cert, e))?;
    if certs.is_empty() {
        return Err(pem_err(cert, "no CERTIFICATE in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The current TLS configuration of a listener, swapped as a whole on reload.
#[derive(Debug)]
pub struct TlsState {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsState {
    /// Loads the certificate and key.
    pub fn load(cert: &Path, key: &Path) -> Result<TlsState, TlsError> {
        let cfg = server_config(cert, key)?;
        Ok(TlsState { cert: cert.to_owned(), key: key.to_owned(), current: RwLock::new(Arc::new(cfg)) })
    }

    /// The TLS state of `tls.cert` and `tls.key`; `None` when they are not both set.
    pub(crate) fn from_config(tls: &crate::config::TlsConfig) -> Result<Option<Arc<TlsState>>, TlsError> {
        match (&tls.cert, &tls.key) {
            (Some(c), Some(k)) => Ok(Some(Arc::new(TlsState::load(c, k)?))),
            _ => Ok(None),
        }
    }

    /// Re-reads the files. On any error the previous configuration stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let cfg = Arc::new(server_config(&self.cert, &self.key)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = cfg;
        Ok(())
    }

    /// An acceptor over the current configuration (one per accepted socket).
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// Re-reads the certificate and key of `tls` on every SIGHUP, for as long as it runs. The
/// handler is installed with or without TLS, so that SIGHUP never ends the process.
pub(crate) async fn reload_on_hangup(tls: Option<Arc<TlsState>>) {
    #[cfg(unix)]
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        loop {
            hup.recv().await;
            if let Some(t) = &tls {
                match t.reload() {
                    Ok(()) => tracing::info!("TLS certificate reloaded"),
                    Err(e) => tracing::error!(error = %e, "TLS reload failed; the previous certificate stays in use"),
                }
            }
        }
    }
    let _ = tls;
    std::future::pending::<()>().await
}
