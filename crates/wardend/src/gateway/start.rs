//! Starting the gateway from `[gateway]`: bind the address and build the TLS configuration
//! before the daemon announces readiness (so a bad certificate or a taken port stops the start
//! with a clear message), then serve the REST API in the background.

use super::config::GatewayConfig;
use super::{Core, Limits};
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

/// A gateway that is bound and configured, not yet serving.
pub struct Bound {
    pub addr: SocketAddr,
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
}

/// Binds `[gateway] listen`, if set.
pub fn bind(cfg: &GatewayConfig) -> anyhow::Result<Option<Bound>> {
    let Some(addr) = cfg.listen_addr() else {
        return Ok(None);
    };
    // TLS first: a bad certificate is reported before the port is taken.
    let tls = super::tls::server_config(cfg).context("cannot set up the gateway's TLS")?;
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {addr} (gateway.listen)"))?;
    Ok(Some(Bound {
        addr: listener.local_addr()?,
        listener,
        tls,
        limits: Limits::from_config(cfg),
    }))
}

/// A gateway on a listening socket bound by someone else (the monitor, which keeps it open
/// across gateway restarts): the TLS configuration is read now, while the key is readable.
pub fn with_listener(
    cfg: &GatewayConfig,
    listener: std::net::TcpListener,
) -> anyhow::Result<Bound> {
    let tls = super::tls::server_config(cfg).context("cannot set up the gateway's TLS")?;
    Ok(Bound {
        addr: listener.local_addr()?,
        listener,
        tls,
        limits: Limits::from_config(cfg),
    })
}

impl Bound {
    /// The listening socket, for a monitor that hands it to gateway processes.
    pub fn into_listener(self) -> std::net::TcpListener {
        self.listener
    }

    /// Serves the REST and gRPC APIs until `shutdown`, then drains.
    pub async fn run(self, core: Arc<dyn Core>, shutdown: watch::Receiver<bool>) {
        tracing::info!(listen = %self.addr, "gateway is serving");
        let app = super::api(core);
        if let Err(e) = super::serve(self.listener, self.tls, app, self.limits, shutdown).await {
            tracing::error!(error = %e, "the gateway stopped");
        }
    }
}
