//! [`Error`]: why the server could not start, one variant per part that can refuse.

use thiserror::Error;

use crate::auth::setup::AuthSetupError;
use crate::server::listen::BindError;
use crate::{auth, config, feeds, server};

/// Errors that stop the server from starting.
#[derive(Debug, Error)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Bad feed definitions, or the epoch state (`server.state_dir`) could not be read or
    /// written.
    #[error(transparent)]
    Feeds(#[from] feeds::OpenError),
    /// The embedded issuer could not be built.
    #[error(transparent)]
    Issuer(#[from] auth::issuer::IssuerError),
    /// A listener could not be bound, or a thread not started.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A mode that this build does not serve yet, or a client that could not be built.
    #[error("unsupported configuration: {0}")]
    Unsupported(String),
    /// The TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] server::tls::TlsError),
}

impl From<BindError> for Error {
    fn from(e: BindError) -> Error {
        Error::Io { context: e.context, source: e.source }
    }
}

impl From<AuthSetupError> for Error {
    fn from(e: AuthSetupError) -> Error {
        match e {
            AuthSetupError::Issuer(e) => Error::Issuer(e),
            AuthSetupError::Jwks(e) => Error::Unsupported(format!("JWKS client: {e}")),
        }
    }
}
