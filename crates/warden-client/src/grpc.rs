//! The gRPC client of warden's mTLS gateway (`warden.v1`, see docs/grpc.md): TLS 1.3 only,
//! rustls on aws-lc-rs, the server verified against the given CA and this client presenting
//! its certificate. The gateway identifies the caller by that certificate alone.
//!
//! ```no_run
//! # async fn f() -> Result<(), warden_client::grpc::GrpcError> {
//! use warden_client::grpc::{pb, GrpcClient};
//! let c = GrpcClient::connect(
//!     "https://warden.example:8443",
//!     "ca.pem".as_ref(),
//!     "client.pem".as_ref(),
//!     "client.key".as_ref(),
//! )
//! .await?;
//! let jobs = c.jobs().list(pb::ListRequest { all: false }).await?.into_inner();
//! # Ok(()) }
//! ```
//!
//! What it deliberately does not do: retry, reconnect on its own beyond what the channel does,
//! or accept anything older than TLS 1.3.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tonic::transport::{Channel, Endpoint, Uri};

/// The generated messages and clients of `proto/warden/v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("warden.v1");
}

pub use pb::jobs_client::JobsClient;
pub use pb::secrets_client::SecretsClient;
pub use pb::system_client::SystemClient;
pub use tonic::{Code, Status};

/// The metadata key of warden's own error code beside a gRPC status.
pub const CODE_METADATA: &str = "warden-code";

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("the remote `{0}` is not a URL such as https://host:8443: {1}")]
    Url(String, String),
    #[error("cannot read {what} {path}: {err}")]
    Read {
        what: &'static str,
        path: PathBuf,
        err: String,
    },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error(transparent)]
    Status(#[from] tonic::Status),
}

/// The warden error code of a status (`ACCESS_DENIED`, …) when the gateway gave one.
pub fn warden_code(s: &tonic::Status) -> Option<&str> {
    s.metadata().get(CODE_METADATA)?.to_str().ok()
}

fn read<T>(
    what: &'static str,
    path: &Path,
    parse: impl FnOnce(&Path) -> Result<T, String>,
) -> Result<T, GrpcError> {
    parse(path).map_err(|err| GrpcError::Read {
        what,
        path: path.to_path_buf(),
        err,
    })
}

/// The client side of the mutual TLS 1.3 handshake.
fn tls_config(ca: &Path, cert: &Path, key: &Path) -> Result<ClientConfig, GrpcError> {
    let roots = read("the CA certificate", ca, |p| {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(p).map_err(|e| e.to_string())? {
            roots
                .add(c.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        if roots.is_empty() {
            return Err("no PEM certificate in it".into());
        }
        Ok(roots)
    })?;
    let chain = read("the client certificate", cert, |p| {
        let c = CertificateDer::pem_file_iter(p)
            .map_err(|e| e.to_string())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        if c.is_empty() {
            return Err("no PEM certificate in it".into());
        }
        Ok(c)
    })?;
    let key = read("the client key", key, |p| {
        PrivateKeyDer::from_pem_file(p).map_err(|e| e.to_string())
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| GrpcError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| GrpcError::Tls(format!("the client certificate and key: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A connection to the gateway's gRPC API; cheap to clone, one HTTP/2 connection shared by
/// every call.
#[derive(Clone)]
pub struct GrpcClient {
    channel: Channel,
}

impl GrpcClient {
    /// Connects to `url` (`https://host:port`) over TLS 1.3, verifying the server against the
    /// CA certificate(s) in `ca` (PEM) and presenting `cert` (PEM chain) with `key` (PEM).
    pub async fn connect(
        url: &str,
        ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<GrpcClient, GrpcError> {
        let bad = |why: &str| GrpcError::Url(url.to_string(), why.to_string());
        let uri: Uri = url
            .parse()
            .map_err(|e: http_uri_error::E| bad(&e.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the scheme must be https"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| bad(&format!("the host is no DNS name or IP address: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config(ca, cert, key)?));
        // The connector does TLS itself (TLS 1.3 only, this crate's configuration); the
        // endpoint's own URI is only where to connect.
        let endpoint = Endpoint::from_shared(format!("http://{}", authority(&host, port)))
            .map_err(|e| bad(&e.to_string()))?
            .origin(uri.clone())
            // Job output streams in: windows large enough that flow control does not pace it
            // (the 64 KiB default allows one window per round trip).
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20));
        let addr = authority(&host, port);
        let connector = tower::service_fn(move |_: Uri| {
            let tls = tls.clone();
            let addr = addr.clone();
            let name = server_name.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                let s = tls.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        });
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| GrpcError::Connect(url.to_string(), error_chain(&e)))?;
        Ok(GrpcClient { channel })
    }

    /// A client over an already made channel (another transport, tests).
    pub fn from_channel(channel: Channel) -> GrpcClient {
        GrpcClient { channel }
    }

    pub fn jobs(&self) -> JobsClient<Channel> {
        JobsClient::new(self.channel.clone())
    }

    pub fn secrets(&self) -> SecretsClient<Channel> {
        SecretsClient::new(self.channel.clone())
    }

    pub fn system(&self) -> SystemClient<Channel> {
        SystemClient::new(self.channel.clone())
    }
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An error with its causes, which name the real problem (a refused certificate, …).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

mod http_uri_error {
    pub type E = tonic::codegen::http::uri::InvalidUri;
}
