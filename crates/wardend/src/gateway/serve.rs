//! The gateway's network server: accepts TCP connections on an already-bound listener, runs
//! the TLS handshake, and serves HTTP/1.1 (keep-alive) and HTTP/2 on each connection, with the
//! connection's [`CertIdentity`] inserted into every request's extensions.
//!
//! The listener is passed in rather than bound here, so that a process without the privilege
//! to bind the port can serve on one bound for it.
//!
//! What it deliberately does not do: route or decide. The router it is given does that.

use super::config::GatewayConfig;
use super::tls::cert_identity;
use crate::identity::CertIdentity;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tower_service::Service;

/// The limits one gateway listener applies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_body_size: usize,
}

impl Limits {
    pub fn from_config(c: &GatewayConfig) -> Limits {
        Limits {
            max_connections: c.max_connections,
            handshake_timeout: c.handshake_timeout.get(),
            idle_timeout: c.idle_timeout.get(),
            max_body_size: usize::try_from(c.max_body_size.0).unwrap_or(usize::MAX),
        }
    }
}

/// The router the gateway serves: `app` with the body limit applied.
pub fn router(app: Router, limits: &Limits) -> Router {
    app.layer(axum::extract::DefaultBodyLimit::max(limits.max_body_size))
}

/// Serves until `shutdown` turns true, then stops accepting, lets each connection finish the
/// request it is in (HTTP/1.1) or its open streams (HTTP/2), and returns when all are closed.
pub async fn serve(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let app = router(app, &limits);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "gateway accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(max = limits.max_connections, %addr, "gateway connection limit reached; closing a new connection");
                    continue;
                };
                let (acceptor, app, rx) = (acceptor.clone(), app.clone(), shutdown.clone());
                tracker.spawn(async move {
                    connection(tcp, addr, acceptor, app, limits, rx).await;
                    drop(slot);
                });
            }
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    Ok(())
}

async fn connection(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    app: Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%addr, error = %e, "gateway TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(%addr, "gateway TLS handshake timed out");
            return;
        }
    };
    let cert: CertIdentity = match stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| cert_identity(c.as_ref()))
    {
        Some(Ok(id)) => id,
        // The verifier requires a certificate, so this is a certificate it accepted but that
        // cannot be read back: refuse rather than serve without an identity.
        _ => {
            tracing::warn!(%addr, "gateway connection without a readable client certificate");
            return;
        }
    };
    tracing::debug!(%addr, cn = ?cert.cn, id = %cert.id, "gateway connection");
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(cert.clone());
        let mut app = app.clone();
        async move { app.call(req).await }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.idle_timeout))
        .keep_alive_timeout(limits.handshake_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let stopping = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%addr, error = %e, "gateway connection ended");
            }
        }
        _ = stopping => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
