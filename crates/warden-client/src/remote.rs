//! Remote mode: the same calls over the mTLS gateway's REST API (HTTPS, HTTP/1.1 keep-alive,
//! TLS 1.3 with a client certificate), for hosts without the daemon's socket.
//!
//! Only the methods the gateway has an endpoint for can be called this way (see
//! `docs/gateway.md`); the others — commands, jobs, streams, Lumo — answer with an error that
//! says so. The identity is the certificate's: the gateway never sees this process's uid.

use crate::ClientError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where the gateway is and the files of this client's certificate.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// `https://host:port`
    pub url: String,
    /// The CA the gateway's certificate chains to (PEM).
    pub ca: PathBuf,
    /// This client's certificate (PEM) and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One keep-alive HTTPS connection to the gateway.
pub struct Https {
    io: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
    host: String,
}

fn bad(what: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol(what.to_string())
}

impl Https {
    pub fn connect(cfg: &RemoteConfig) -> Result<Https, ClientError> {
        let rest = cfg.url.strip_prefix("https://").ok_or_else(|| {
            bad(format!(
                "{:?} is not a gateway URL: expected https://HOST:PORT",
                cfg.url
            ))
        })?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad(format!("{:?}: the port is not a number", cfg.url)))?,
            ),
            _ => (authority, 443),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let file_err = |p: &PathBuf, e: &dyn std::fmt::Display| {
            bad(format!("cannot read {}: {e}", p.display()))
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&cfg.ca).map_err(|e| file_err(&cfg.ca, &e))? {
            let c = c.map_err(|e| file_err(&cfg.ca, &e))?;
            roots.add(c).map_err(|e| file_err(&cfg.ca, &e))?;
        }
        let chain = CertificateDer::pem_file_iter(&cfg.cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| file_err(&cfg.cert, &e))?;
        let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| file_err(&cfg.key, &e))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(bad)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| file_err(&cfg.cert, &e))?;
        let name = ServerName::try_from(host.clone()).map_err(|e| bad(format!("{host}: {e}")))?;
        let conn = rustls::ClientConnection::new(Arc::new(tls), name).map_err(bad)?;
        let tcp =
            TcpStream::connect((host.as_str(), port)).map_err(|error| ClientError::Connect {
                path: PathBuf::from(&cfg.url),
                error,
            })?;
        tcp.set_read_timeout(Some(Duration::from_secs(120)))?;
        let _ = tcp.set_nodelay(true);
        Ok(Https {
            io: BufReader::new(rustls::StreamOwned::new(conn, tcp)),
            host: authority.to_string(),
        })
    }

    pub fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.io.get_ref().sock.set_read_timeout(d)
    }

    /// Calls a warden method through its REST endpoint: the securityd reply envelope (or, for
    /// `system.metrics`, the Prometheus text as a string in `data`).
    pub fn call(
        &mut self,
        method: &str,
        params: Value,
        token: Option<&str>,
    ) -> Result<Value, ClientError> {
        let key = || {
            params
                .get("key")
                .and_then(Value::as_str)
                .map(percent_encode)
                .ok_or_else(|| bad(format!("{method} needs a key")))
        };
        let (verb, path, body) = match method {
            "auth" | "auth.login" => ("POST", "/auth/validate".to_string(), Some(params.clone())),
            "refresh" | "auth.refresh" => ("POST", "/auth/refresh".into(), None),
            "logout" | "auth.logout" => ("POST", "/auth/logout".into(), None),
            "health" | "system.health" => ("GET", "/health".into(), None),
            "metrics" | "system.metrics" => ("GET", "/metrics".into(), None),
            "list_secrets" | "secrets.list" => ("GET", "/secrets".into(), None),
            "get_secret" | "secrets.get" => ("GET", format!("/secrets/{}", key()?), None),
            "get_secrets" | "secrets.get_many" => {
                ("POST", "/secrets/batch".into(), Some(params.clone()))
            }
            "secrets.set" => ("PUT", format!("/secrets/{}", key()?), Some(params.clone())),
            "secrets.delete" => ("DELETE", format!("/secrets/{}", key()?), None),
            "rotate_master" | "secrets.rotate_master" => {
                ("POST", "/admin/rotate".into(), Some(params.clone()))
            }
            "reload" | "daemon.reload" => ("POST", "/admin/reload".into(), None),
            other => {
                return Err(bad(format!(
                    "{other} is not available through the gateway (see docs/gateway.md for what is)"
                )))
            }
        };
        let (status, ctype, body) = self.request(verb, &path, token, body.as_ref())?;
        if ctype.starts_with("text/plain") && status == 200 {
            return Ok(json!({"status": "ok", "data": String::from_utf8_lossy(&body)}));
        }
        serde_json::from_slice(&body)
            .map_err(|e| bad(format!("HTTP {status} with a body that is not JSON: {e}")))
    }

    fn request(
        &mut self,
        verb: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, String, Vec<u8>), ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        let mut head = format!("{verb} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if let Some(t) = token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        let body = body.unwrap_or_default();
        if !body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let w = self.io.get_mut();
        w.write_all(head.as_bytes())?;
        w.write_all(&body)?;
        w.flush()?;

        let mut line = String::new();
        self.io.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("not an HTTP reply: {line:?}")))?;
        let (mut length, mut chunked, mut ctype) = (0usize, false, String::new());
        loop {
            line.clear();
            if self.io.read_line(&mut line)? == 0 {
                return Err(bad("the gateway closed the connection"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let v = v.trim();
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => length = v.parse().map_err(bad)?,
                    "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
                    "content-type" => ctype = v.to_ascii_lowercase(),
                    _ => {}
                }
            }
        }
        let mut out = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.io.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| bad("bad chunk size"))?;
                let start = out.len();
                out.resize(start + n, 0);
                self.io.read_exact(&mut out[start..])?;
                line.clear();
                self.io.read_line(&mut line)?;
                if n == 0 {
                    break;
                }
            }
        } else {
            if length > 64 << 20 {
                return Err(bad("reply too large"));
            }
            out.resize(length, 0);
            self.io.read_exact(&mut out)?;
        }
        Ok((status, ctype, out))
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_percent_encoded_in_paths() {
        assert_eq!(super::percent_encode("app/db pass"), "app%2Fdb%20pass");
        assert_eq!(super::percent_encode("a-b_c.d~"), "a-b_c.d~");
    }
}
