//! The `[gateway]` configuration section: where the mTLS gateway listens, its certificate, the
//! CA and CRL its clients are verified against, and which client certificates it admits at all.
//!
//! The gateway is off unless `listen` is set. Reading the files is left to [`super::tls`]; this
//! module only checks what can be checked without them.

use crate::units::{ByteSize, HumanDuration};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// `host:port` to listen on (e.g. `"0.0.0.0:8443"`); the gateway is off when unset.
    pub listen: Option<String>,
    /// The server certificate chain, PEM (`warden pki issue server` writes `issued/NAME.pem`).
    pub cert: Option<PathBuf>,
    /// Its private key, PEM (`issued/NAME.key`).
    pub key: Option<PathBuf>,
    /// The CA client certificates must chain to (`ca.pem` of the PKI directory).
    pub client_ca: Option<PathBuf>,
    /// The CRL (`crl.pem`); re-read when the file changes.
    pub crl: Option<PathBuf>,
    /// Globs a client certificate's CN or one of its SANs must match.
    pub allowed_names: Vec<String>,
    /// If not empty, only client certificates with one of these SHA-256 fingerprints.
    pub pinned_fingerprints: Vec<String>,
    /// Connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Time a client has to complete the TLS handshake.
    pub handshake_timeout: HumanDuration,
    /// Time a client has to send a request's headers, including while a keep-alive connection
    /// waits for its next request (HTTP/1.1); HTTP/2 connections are pinged after this long.
    pub idle_timeout: HumanDuration,
    /// Largest request body accepted.
    pub max_body_size: ByteSize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: None,
            cert: None,
            key: None,
            client_ca: None,
            crl: None,
            allowed_names: vec!["*".into()],
            pinned_fingerprints: Vec::new(),
            max_connections: 1024,
            handshake_timeout: HumanDuration::secs(10),
            idle_timeout: HumanDuration::secs(60),
            max_body_size: ByteSize(1 << 20),
        }
    }
}

impl GatewayConfig {
    /// The listen address, if the gateway is on.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.as_deref().and_then(|s| s.parse().ok())
    }

    /// Checks the section: `Err((key, what is expected))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(l) = &self.listen {
            if l.parse::<SocketAddr>().is_err() {
                return Err((
                    "gateway.listen",
                    format!("{l:?} is not an address: expected IP:PORT, e.g. \"0.0.0.0:8443\" or \"[::]:8443\""),
                ));
            }
            for (key, v) in [
                ("gateway.cert", &self.cert),
                ("gateway.key", &self.key),
                ("gateway.client_ca", &self.client_ca),
            ] {
                if v.is_none() {
                    return Err((key, "is required when gateway.listen is set".into()));
                }
            }
        }
        if self.allowed_names.is_empty() {
            return Err((
                "gateway.allowed_names",
                "is empty, so no certificate could connect: list globs such as \"agent-*\", or \"*\" for every certificate the CA signed".into(),
            ));
        }
        for n in &self.allowed_names {
            globset::Glob::new(n).map_err(|e| ("gateway.allowed_names", format!("{n:?}: {e}")))?;
        }
        for p in &self.pinned_fingerprints {
            super::tls::parse_fingerprint(p).map_err(|m| ("gateway.pinned_fingerprints", m))?;
        }
        if self.max_connections == 0 {
            return Err(("gateway.max_connections", "must be at least 1".into()));
        }
        for (key, d) in [
            ("gateway.handshake_timeout", self.handshake_timeout),
            ("gateway.idle_timeout", self.idle_timeout),
        ] {
            if d.get().is_zero() {
                return Err((key, "must be longer than 0s".into()));
            }
        }
        if !(1024..=(64 << 20)).contains(&self.max_body_size.0) {
            return Err((
                "gateway.max_body_size",
                format!(
                    "{} is out of range: expected between 1KiB and 64MiB",
                    self.max_body_size
                ),
            ));
        }
        Ok(())
    }
}
