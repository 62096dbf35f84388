//! The gateway's TLS layer: TLS 1.3 only, ECDHE on P-384 or P-521 only, ALPN `h2` and
//! `http/1.1`, and client certificates required.
//!
//! A client certificate is accepted when it chains to the configured CA, is within its validity,
//! is not on the CRL (re-read when the file changes, so `warden pki revoke` takes effect at the
//! next handshake), names an allowed CN or SAN, and — when fingerprints are pinned — has one of
//! them. All of it is checked inside the verifier, so a refused certificate fails the handshake
//! itself: no HTTP request is ever read from such a peer.
//!
//! rustls's aws-lc-rs provider has no secp521r1 key exchange, so [`SECP521R1`] implements it on
//! `aws_lc_rs::agreement::ECDH_P521`.
//!
//! What it deliberately does not do: decide what a certificate may do. That is core's policy
//! (the `cert_cn` and `cert_id` selectors) on the [`CertIdentity`] this module derives.

use super::config::GatewayConfig;
use crate::identity::CertIdentity;
use aws_lc_rs::agreement;
use globset::{Glob, GlobSet, GlobSetBuilder};
use parking_lot::Mutex;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{ActiveKeyExchange, CryptoProvider, SharedSecret, SupportedKxGroup};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, NamedGroup, PeerMisbehaved,
    RootCertStore, ServerConfig, SignatureScheme,
};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// ECDHE over secp521r1 (NIST P-521), uncompressed points, on aws-lc-rs.
#[derive(Debug)]
pub struct Secp521r1;

/// The secp521r1 key-exchange group, for a provider's `kx_groups`.
pub static SECP521R1: &dyn SupportedKxGroup = &Secp521r1;

impl SupportedKxGroup for Secp521r1 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let priv_key = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P521, &rng)
            .map_err(|_| Error::FailedToGetRandomBytes)?;
        let pub_key = priv_key
            .compute_public_key()
            .map_err(|_| Error::General("computing a P-521 public key failed".into()))?;
        Ok(Box::new(P521Exchange { priv_key, pub_key }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::secp521r1
    }
}

struct P521Exchange {
    priv_key: agreement::EphemeralPrivateKey,
    pub_key: agreement::PublicKey,
}

impl ActiveKeyExchange for P521Exchange {
    fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, Error> {
        // TLS 1.3 allows only the uncompressed form (RFC 8446 §4.2.8.2); aws-lc checks that the
        // point is on the curve.
        if peer.first() != Some(&0x04) {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        let peer_key = agreement::UnparsedPublicKey::new(&agreement::ECDH_P521, peer);
        agreement::agree_ephemeral(
            self.priv_key,
            peer_key,
            Error::from(PeerMisbehaved::InvalidKeyShare),
            |secret| Ok(SharedSecret::from(secret)),
        )
    }

    fn pub_key(&self) -> &[u8] {
        self.pub_key.as_ref()
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::secp521r1
    }
}

/// aws-lc-rs with TLS 1.3 cipher suites only and key exchange on P-384 and P-521 only.
pub fn provider() -> CryptoProvider {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS13);
    p.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::SECP384R1, SECP521R1];
    p
}

/// A gateway TLS configuration that cannot be built: which file, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct TlsError {
    pub what: String,
    pub message: String,
}

fn tls_err(what: impl Into<String>) -> impl FnOnce(String) -> TlsError {
    let what = what.into();
    move |message| TlsError { what, message }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls_err(path.display().to_string())(e.to_string()))?;
    if certs.is_empty() {
        return Err(tls_err(path.display().to_string())(
            "no certificate in it: expected a PEM `CERTIFICATE`".into(),
        ));
    }
    Ok(certs)
}

/// The server side of the gateway's TLS, from `[gateway]`.
pub fn server_config(cfg: &GatewayConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let (Some(cert), Some(key), Some(ca)) = (&cfg.cert, &cfg.key, &cfg.client_ca) else {
        return Err(tls_err("[gateway]")(
            "`cert`, `key` and `client_ca` are needed when `listen` is set".into(),
        ));
    };
    let provider = Arc::new(provider());
    let verifier = Arc::new(ClientVerifier::new(cfg, ca, provider.clone())?);
    let chain = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        tls_err(key.display().to_string())(format!("{e}: expected a PEM private key"))
    })?;
    let mut sc = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("TLS")(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls_err(cert.display().to_string())(e.to_string()))?;
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(sc))
}

/// The webpki verifier (chain, validity, CRL) plus warden's name allowlist and pins.
#[derive(Debug)]
struct ClientVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    crl: Option<CrlFile>,
    /// The CRL file's modification time the current inner verifier was built with.
    inner: Mutex<(Option<SystemTime>, Arc<dyn ClientCertVerifier>)>,
    names: GlobSet,
    pins: Vec<[u8; 32]>,
    hints: Vec<DistinguishedName>,
}

impl ClientVerifier {
    fn new(
        cfg: &GatewayConfig,
        ca: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<ClientVerifier, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in read_certs(ca)? {
            roots
                .add(c)
                .map_err(|e| tls_err(ca.display().to_string())(e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let mut names = GlobSetBuilder::new();
        for n in &cfg.allowed_names {
            names.add(Glob::new(n).map_err(|e| tls_err("gateway.allowed_names")(e.to_string()))?);
        }
        let names = names
            .build()
            .map_err(|e| tls_err("gateway.allowed_names")(e.to_string()))?;
        let pins = cfg
            .pinned_fingerprints
            .iter()
            .map(|p| parse_fingerprint(p).map_err(tls_err("gateway.pinned_fingerprints")))
            .collect::<Result<Vec<_>, _>>()?;
        let crl = cfg.crl.as_deref().map(CrlFile::open).transpose()?;
        let (mtime, inner) = build_inner(&roots, crl.as_ref(), &provider)?;
        let hints = inner.root_hint_subjects().to_vec();
        Ok(ClientVerifier {
            roots,
            provider,
            crl,
            inner: Mutex::new((mtime, inner)),
            names,
            pins,
            hints,
        })
    }

    /// The inner verifier, rebuilt first if the CRL file changed. A CRL that cannot be read
    /// any more keeps the last good one (and says so) rather than accepting everyone.
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        let mut g = self.inner.lock();
        if let Some(crl) = &self.crl {
            let now = crl.modified();
            if now.is_some() && now != g.0 {
                match build_inner(&self.roots, Some(crl), &self.provider) {
                    Ok(fresh) => *g = fresh,
                    Err(e) => {
                        tracing::error!(error = %e, "the CRL changed but cannot be used; keeping the previous one")
                    }
                }
            }
        }
        g.1.clone()
    }
}

/// The CRL file, reached through a handle on its directory opened at start. The gateway reads
/// it again whenever it changes (`warden pki revoke` replaces it), long after it dropped its
/// privileges: the directory handle still works where the path would not (a state directory
/// only root may enter), and a replaced file is found by name in the same directory.
#[derive(Debug)]
pub(crate) struct CrlFile {
    dir: std::fs::File,
    name: std::ffi::OsString,
    path: PathBuf,
}

impl CrlFile {
    pub(crate) fn open(path: &Path) -> Result<CrlFile, TlsError> {
        let e = |m: String| tls_err(path.display().to_string())(m);
        let name = path
            .file_name()
            .ok_or_else(|| e("not a file name".into()))?
            .to_os_string();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let dir = std::fs::File::open(dir).map_err(|x| e(format!("its directory: {x}")))?;
        Ok(CrlFile {
            dir,
            name,
            path: path.to_path_buf(),
        })
    }

    fn modified(&self) -> Option<SystemTime> {
        let st = nix::sys::stat::fstatat(
            &self.dir,
            self.name.as_os_str(),
            nix::fcntl::AtFlags::empty(),
        )
        .ok()?;
        let nanos = u32::try_from(st.st_mtime_nsec).ok()?;
        let secs = u64::try_from(st.st_mtime).ok()?;
        Some(SystemTime::UNIX_EPOCH + std::time::Duration::new(secs, nanos))
    }

    pub(crate) fn read(&self) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let fd = nix::fcntl::openat(
            &self.dir,
            self.name.as_os_str(),
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        let mut out = Vec::new();
        std::fs::File::from(fd).read_to_end(&mut out)?;
        Ok(out)
    }
}

fn build_inner(
    roots: &Arc<RootCertStore>,
    crl: Option<&CrlFile>,
    provider: &Arc<CryptoProvider>,
) -> Result<(Option<SystemTime>, Arc<dyn ClientCertVerifier>), TlsError> {
    let mut b = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
    let mut mtime = None;
    if let Some(crl) = crl {
        let path = &crl.path;
        mtime = crl.modified();
        let crls = crl
            .read()
            .and_then(|bytes| {
                CertificateRevocationListDer::pem_slice_iter(&bytes)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(std::io::Error::other)
            })
            .map_err(|e| tls_err(path.display().to_string())(e.to_string()))?;
        if crls.is_empty() {
            return Err(tls_err(path.display().to_string())(
                "no CRL in it: expected a PEM `X509 CRL` as `warden pki crl` writes it".into(),
            ));
        }
        b = b.with_crls(crls).only_check_end_entity_revocation();
    }
    let v = b
        .build()
        .map_err(|e| tls_err("gateway.client_ca")(e.to_string()))?;
    Ok((mtime, v))
}

/// A SHA-256 fingerprint as `openssl x509 -fingerprint -sha256` prints it, or plain hex.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let h: String = s.chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(&h, &mut out).map_err(|_| {
        format!("{s:?} is not a SHA-256 fingerprint: expected 64 hex digits (colons allowed)")
    })?;
    Ok(out)
}

fn refuse(why: &str) -> Error {
    tracing::info!(reason = why, "client certificate refused");
    Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .current()
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| tracing::info!(error = %e, "client certificate refused"))?;
        if !self.pins.is_empty() {
            let fp: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
            if !self.pins.contains(&fp) {
                return Err(refuse("fingerprint not pinned"));
            }
        }
        let id = cert_identity(end_entity).map_err(|_| refuse("unparsable certificate"))?;
        let allowed = id
            .cn
            .iter()
            .chain(id.sans.iter())
            .any(|n| self.names.is_match(n));
        if !allowed {
            return Err(refuse("no CN or SAN in gateway.allowed_names"));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// The identity of a verified client certificate: `warden_pki::client_identity`, the subject's
/// CN and the SANs (DNS names, IP addresses, URIs and e-mail addresses, as text).
pub fn cert_identity(der: &[u8]) -> Result<CertIdentity, String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let id = warden_pki::client_identity(der).map_err(|e| e.to_string())?;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
                    sans.push(s.to_string())
                }
                GeneralName::IPAddress(b) => match b.len() {
                    4 => sans.push(
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap()).to_string(),
                    ),
                    16 => sans.push(
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap()).to_string(),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(CertIdentity {
        id: id.to_hex(),
        cn,
        sans,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p521_both_sides_agree_and_bad_points_are_refused() {
        let a = SECP521R1.start().unwrap();
        let b = SECP521R1.start().unwrap();
        assert_eq!(a.pub_key().len(), 133, "uncompressed P-521 point");
        let (apub, bpub) = (a.pub_key().to_vec(), b.pub_key().to_vec());
        let s1 = a.complete(&bpub).unwrap();
        let s2 = b.complete(&apub).unwrap();
        assert_eq!(s1.secret_bytes(), s2.secret_bytes());
        assert_eq!(s1.secret_bytes().len(), 66);
        let mut bad = apub.clone();
        bad[0] = 0x02;
        assert!(SECP521R1.start().unwrap().complete(&bad).is_err());
        let mut off_curve = apub;
        off_curve[70] ^= 1;
        assert!(SECP521R1.start().unwrap().complete(&off_curve).is_err());
    }

    #[test]
    fn provider_offers_only_tls13_and_the_two_nist_groups() {
        let p = provider();
        assert!(p
            .cipher_suites
            .iter()
            .all(|s| s.version() == &rustls::version::TLS13));
        let groups: Vec<_> = p.kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(groups, [NamedGroup::secp384r1, NamedGroup::secp521r1]);
    }

    /// A PKI in a temporary directory, the gateway's configuration for it, and a client
    /// certificate chain and key.
    fn pki() -> (
        tempfile::TempDir,
        GatewayConfig,
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
    ) {
        use warden_pki::{IssueOptions, Kind, Pki};
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path().join("pki"));
        pki.init("test CA", None, false).unwrap();
        let issue = |kind, name: &str, sans: &[&str]| {
            pki.issue(&IssueOptions {
                kind,
                name: name.into(),
                sans: sans.iter().map(|s| s.to_string()).collect(),
                days: None,
                force: false,
            })
            .unwrap()
        };
        let server = issue(Kind::Server, "gw", &["localhost"]);
        let client = issue(Kind::Client, "agent-1", &[]);
        let cfg = GatewayConfig {
            listen: Some("127.0.0.1:0".into()),
            cert: Some(pki.path(&server.cert)),
            key: Some(pki.path(&server.cert).with_extension("key")),
            client_ca: Some(pki.path(warden_pki::CA_CERT)),
            crl: Some(pki.path(warden_pki::CRL)),
            ..GatewayConfig::default()
        };
        let chain = read_certs(&pki.path(&client.cert)).unwrap();
        let key =
            PrivateKeyDer::from_pem_file(pki.path(&client.cert).with_extension("key")).unwrap();
        (dir, cfg, chain, key)
    }

    /// A handshake in memory with a client offering only `groups`: the group negotiated, or
    /// the error.
    fn handshake(groups: Vec<&'static dyn SupportedKxGroup>) -> Result<NamedGroup, String> {
        let (_dir, cfg, chain, key) = pki();
        let server = server_config(&cfg).unwrap();
        let mut roots = RootCertStore::empty();
        for c in read_certs(cfg.client_ca.as_ref().unwrap()).unwrap() {
            roots.add(c).unwrap();
        }
        let mut p = rustls::crypto::aws_lc_rs::default_provider();
        p.kx_groups = groups;
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(p))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (a, b) = tokio::io::duplex(1 << 16);
            let acceptor = tokio_rustls::TlsAcceptor::from(server);
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let (s, c) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
            let c = c.map_err(|e| e.to_string())?;
            let s = s.map_err(|e| e.to_string())?;
            let g = s
                .get_ref()
                .1
                .negotiated_key_exchange_group()
                .unwrap()
                .name();
            assert_eq!(
                c.get_ref()
                    .1
                    .negotiated_key_exchange_group()
                    .unwrap()
                    .name(),
                g
            );
            Ok(g)
        })
    }

    #[test]
    fn a_client_offering_only_p521_completes_the_handshake() {
        assert_eq!(handshake(vec![SECP521R1]), Ok(NamedGroup::secp521r1));
        assert_eq!(
            handshake(vec![rustls::crypto::aws_lc_rs::kx_group::SECP384R1]),
            Ok(NamedGroup::secp384r1)
        );
    }

    #[test]
    fn a_client_offering_only_x25519_or_p256_is_refused() {
        assert!(handshake(vec![rustls::crypto::aws_lc_rs::kx_group::X25519]).is_err());
        assert!(handshake(vec![rustls::crypto::aws_lc_rs::kx_group::SECP256R1]).is_err());
    }

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex64 = "ab".repeat(32);
        assert_eq!(parse_fingerprint(&hex64).unwrap(), [0xab; 32]);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&colons).unwrap(), [0xab; 32]);
        assert!(parse_fingerprint("abcd").is_err());
    }
}
