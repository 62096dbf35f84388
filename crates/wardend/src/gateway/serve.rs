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
    let max = limits.max_body_size;
    app.layer(axum::extract::DefaultBodyLimit::max(max))
        .layer(axum::middleware::from_fn(move |req, next| {
            refuse_declared_oversize(max, req, next)
        }))
}

/// A body declared (`Content-Length`) larger than this is refused without reading it.
const DRAIN_MAX: u64 = 64 << 20;
/// How long the rest of a refused body may take to arrive.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Answers a REST request whose `Content-Length` is over `max` with `413` — after reading and
/// discarding the body it declared (up to [`DRAIN_MAX`], within [`DRAIN_TIME`]). Answering
/// first and closing with the body still unread makes the kernel reset the connection, and a
/// client still sending then loses the `413` it was sent and sees only "connection reset".
/// gRPC requests pass through: their limits are gRPC's own.
async fn refuse_declared_oversize(
    max: usize,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{header, HeaderValue, Version};
    use futures_util::StreamExt;
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(declared) = declared.filter(|n| !grpc && *n > max as u64) else {
        return next.run(req).await;
    };
    let http1 = req.version() < Version::HTTP_2;
    if declared <= DRAIN_MAX {
        let mut body = req.into_body().into_data_stream();
        let drain = async {
            let mut seen = 0u64;
            while let Some(Ok(chunk)) = body.next().await {
                seen += chunk.len() as u64;
                if seen >= declared {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
    }
    let mut r = super::rest::error(
        axum::http::StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
        &format!("the body is {declared} bytes; this gateway takes at most {max} (gateway.max_body_size)"),
    );
    if http1 {
        // The connection is not reused after a refused body.
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
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
