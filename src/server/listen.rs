//! The two listeners of a server: bound at start (so their addresses are known before
//! anything else is built), then served on the main runtime: the public one by
//! [`super::accept_loop`] (which hands sockets to the shards), the admin one by
//! [`super::serve_listener`].

use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{tls::TlsState, AppState, HttpLimits};
use crate::config::Config;
use crate::engine::handle::AcceptedSocket;

/// A listener that could not be bound.
#[derive(Debug, Error)]
#[error("{context}: {source}")]
pub struct BindError {
    /// What was being done.
    pub context: String,
    /// The I/O error.
    pub source: std::io::Error,
}

/// The bound public and admin listeners.
#[derive(Debug)]
pub(crate) struct Listeners {
    public: TcpListener,
    admin: TcpListener,
    /// The bound public address.
    pub addr: SocketAddr,
    /// The bound admin address.
    pub admin_addr: SocketAddr,
}

/// Binds `addr` (the configuration key `key`).
async fn bind(addr: SocketAddr, key: &str) -> Result<(TcpListener, SocketAddr), BindError> {
    let err = |context: String| move |source| BindError { context, source };
    let listener = TcpListener::bind(addr).await.map_err(err(format!("cannot bind {key} address {addr}")))?;
    let bound = listener.local_addr().map_err(err(format!("{key} address")))?;
    Ok((listener, bound))
}

impl Listeners {
    /// Binds `listen` and `admin_listen`.
    pub(crate) async fn bind(config: &Config) -> Result<Listeners, BindError> {
        let (public, addr) = bind(config.listen, "listen").await?;
        let (admin, admin_addr) = bind(config.admin_listen, "admin_listen").await?;
        Ok(Listeners { public, admin, addr, admin_addr })
    }

    /// Serves both listeners on `tasks` until `cancel` fires: public sockets go to the
    /// shards through `sockets`; the admin listener serves the admin routes itself (over
    /// TLS when `tls.admin`).
    pub(crate) fn spawn(
        self,
        app: &Arc<AppState>,
        sockets: Vec<mpsc::Sender<AcceptedSocket>>,
        tls: Option<Arc<TlsState>>,
        tasks: &TaskTracker,
        cancel: &CancellationToken,
    ) {
        tasks.spawn(super::accept_loop(self.public, app.clone(), sockets, cancel.clone()));
        tasks.spawn(super::serve_listener(
            self.admin,
            super::admin::router(app.clone()),
            if app.config.tls.admin { tls } else { None },
            Arc::new(HttpLimits::new("admin", &app.config, app.metrics.clone())),
            app.edge.admin_pending.clone(),
            cancel.clone(),
        ));
    }
}
