//! The PKI directory: its layout, the issued index, and the operations of `warden pki`.
//!
//! ```text
//! DIR/ca.pem          the CA certificate (0644)
//! DIR/ca.key          its private key, PKCS#8 PEM (0600)
//! DIR/crl.pem         the CRL, signed by the CA (0644)
//! DIR/index.json      every certificate issued: name, kind, serial, validity, identity, revocation
//! DIR/issued/NAME.pem an issued certificate (0644)
//! DIR/issued/NAME.key its private key (0600)
//! DIR/.lock           held (flock) by every command that changes the directory
//! ```

use crate::fsutil::write_atomic;
use crate::identity::client_identity;
use crate::names::{validate_name, validate_san, NameError, San};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber, PKCS_ECDSA_P384_SHA384,
};
use serde::{Deserialize, Serialize};
use std::fs::OpenOptions;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

pub const DEFAULT_DIR: &str = "/etc/warden/pki";
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const CRL: &str = "crl.pem";
pub const INDEX: &str = "index.json";
pub const ISSUED_DIR: &str = "issued";
const LOCK: &str = ".lock";

/// Default validity in days: CA ten years, server one year, client 90 days; a CRL is re-signed
/// at every change and promises the next one within 30 days.
pub const CA_DAYS: u32 = 3650;
pub const SERVER_DAYS: u32 = 365;
pub const CLIENT_DAYS: u32 = 90;
pub const CRL_DAYS: u32 = 30;
/// Certificates start this long before now, so a peer whose clock is a little behind accepts
/// them at once.
const BACKDATE: Duration = Duration::minutes(5);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{0} already exists; pass --force to replace it")]
    Exists(PathBuf),
    #[error("no CA in {0}: run `warden pki init` first")]
    NoCa(PathBuf),
    #[error("the CA in {dir} is damaged: {why}")]
    BadCa { dir: PathBuf, why: String },
    #[error("the index {0} is damaged: {1}")]
    BadIndex(PathBuf, String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("a server certificate needs at least one --san (DNS name or IP address)")]
    NoSan,
    #[error("--days must be at least 1")]
    ZeroDays,
    #[error("the certificate would outlive the CA (valid until {0}); pass a smaller --days")]
    OutlivesCa(String),
    #[error("no issued certificate has the name or serial {0:?} (see `warden pki list`)")]
    NotFound(String),
    #[error("{0:?} is already revoked (`warden pki crl` re-signs the CRL from the index)")]
    AlreadyRevoked(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Io { what, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Server,
    Client,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Server => "server",
            Kind::Client => "client",
        }
    }
}

/// One issued certificate, as recorded in `index.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertInfo {
    pub name: String,
    pub kind: Kind,
    /// The serial number's DER contents octets, lowercase hex.
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    pub not_after: String,
    #[serde(default)]
    pub sans: Vec<String>,
    /// [`client_identity`] of the certificate, lowercase hex (recorded for servers too).
    pub identity: String,
    /// RFC 3339 time of revocation, if revoked.
    #[serde(default)]
    pub revoked_at: Option<String>,
    /// The certificate file, relative to the PKI directory.
    pub cert: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Index {
    /// The number of the last CRL signed (RFC 5280 cRLNumber, increasing).
    pub crl_number: u64,
    pub certs: Vec<CertInfo>,
}

/// The CA `init` created.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CaInfo {
    pub cn: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    /// The CA certificate file, relative to the PKI directory.
    pub cert: String,
}

/// What `issue` is asked for.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    pub kind: Kind,
    pub name: String,
    pub sans: Vec<String>,
    /// Validity; the kind's default when `None`.
    pub days: Option<u32>,
    pub force: bool,
}

/// A PKI directory.
pub struct Pki {
    dir: PathBuf,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

fn now() -> OffsetDateTime {
    // Certificates carry whole seconds.
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(0).unwrap_or(t)
}

/// A fresh positive serial of exactly 16 bytes: 126 random bits, first byte in 0x40..=0x7f so
/// the DER encoding is minimal and needs no sign byte (RFC 5280 §4.1.2.2: positive, ≤ 20 octets).
fn random_serial() -> Result<[u8; 16], PkiError> {
    let mut s = [0u8; 16];
    getrandom::getrandom(&mut s).map_err(|e| {
        io("reading the system's random source")(std::io::Error::other(e.to_string()))
    })?;
    s[0] = (s[0] & 0x3f) | 0x40;
    Ok(s)
}

/// Normalizes a serial typed by a user: hex, optional colons, case-insensitive, leading zeros
/// ignored.
fn normalize_serial(s: &str) -> Option<String> {
    let h: String = s.chars().filter(|c| *c != ':').collect();
    if h.is_empty() || !h.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let h = h.to_ascii_lowercase();
    let t = h.trim_start_matches('0');
    Some(if t.is_empty() { "0".into() } else { t.into() })
}

impl Pki {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Pki { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn lock(&self) -> Result<nix::fcntl::Flock<std::fs::File>, PkiError> {
        let created = !self.dir.exists();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.dir)
            .map_err(io(format!("creating {}", self.dir.display())))?;
        if created {
            // 0755 whatever the umask: the gateway reads the CA and the CRL (0644) here after
            // dropping to its unprivileged user; keys stay 0600.
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755))
                .map_err(io(format!("setting the mode of {}", self.dir.display())))?;
        }
        let path = self.path(LOCK);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&path)
            .map_err(io(format!("opening {}", path.display())))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io(format!("locking {}", path.display()))(e.into()))
    }

    /// The issued index (empty when there is none yet).
    pub fn index(&self) -> Result<Index, PkiError> {
        let path = self.path(INDEX);
        match std::fs::read(&path) {
            Ok(b) => {
                serde_json::from_slice(&b).map_err(|e| PkiError::BadIndex(path, e.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(io(format!("reading {}", path.display()))(e)),
        }
    }

    /// Every issued certificate, oldest first. Fails when DIR holds no CA, so that a mistyped
    /// `--dir` is not mistaken for an empty PKI.
    pub fn list(&self) -> Result<Vec<CertInfo>, PkiError> {
        if self.path(CA_CERT).symlink_metadata().is_err() {
            return Err(PkiError::NoCa(self.dir.clone()));
        }
        Ok(self.index()?.certs)
    }

    fn write_index(&self, index: &Index) -> Result<(), PkiError> {
        let mut data = serde_json::to_vec_pretty(index)
            .map_err(|e| PkiError::BadIndex(self.path(INDEX), e.to_string()))?;
        data.push(b'\n');
        write_atomic(&self.dir, INDEX, &data, 0o644).map_err(io(format!("writing {INDEX}")))
    }

    /// `warden pki init`: a new self-signed CA (CN `cn`), an empty index and an empty CRL.
    /// Refuses to replace an existing CA unless `force`; a forced init starts a new index, since
    /// nothing the old CA signed verifies under the new one.
    pub fn init(&self, cn: &str, days: Option<u32>, force: bool) -> Result<CaInfo, PkiError> {
        let _lock = self.lock()?;
        for f in [CA_CERT, CA_KEY] {
            let p = self.path(f);
            if !force && p.symlink_metadata().is_ok() {
                return Err(PkiError::Exists(p));
            }
        }
        if cn.is_empty() || cn.len() > 64 || cn.chars().any(char::is_control) {
            return Err(NameError::Name(cn.to_string()).into());
        }
        let days = days.unwrap_or(CA_DAYS);
        if days == 0 {
            return Err(PkiError::ZeroDays);
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384)?;
        let start = now();
        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "warden");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = start - BACKDATE;
        params.not_after = start + Duration::days(days.into());
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key)?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        write_atomic(&self.dir, CA_KEY, key_pem.as_bytes(), 0o600)
            .map_err(io(format!("writing {CA_KEY}")))?;
        write_atomic(&self.dir, CA_CERT, cert.pem().as_bytes(), 0o644)
            .map_err(io(format!("writing {CA_CERT}")))?;
        let mut index = Index::default();
        let issuer = Issuer::new(params, &key);
        self.publish_crl(&issuer, &mut index, CRL_DAYS)?;
        Ok(CaInfo {
            cn: cn.to_string(),
            serial: hex::encode(serial),
            not_before: rfc3339(start - BACKDATE),
            not_after: rfc3339(start + Duration::days(days.into())),
            cert: CA_CERT.into(),
        })
    }

    /// Loads the CA: its key, its parsed certificate's parameters, and its expiry. Checks that
    /// the key belongs to the certificate, so a mismatched pair is caught here rather than by
    /// every peer that later fails to verify what it signed.
    fn load_ca(&self) -> Result<(Issuer<'static, KeyPair>, OffsetDateTime), PkiError> {
        let bad = |why: String| PkiError::BadCa {
            dir: self.dir.clone(),
            why,
        };
        let cert_path = self.path(CA_CERT);
        let cert_pem = match std::fs::read_to_string(&cert_path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PkiError::NoCa(self.dir.clone()))
            }
            Err(e) => return Err(io(format!("reading {}", cert_path.display()))(e)),
        };
        let key_path = self.path(CA_KEY);
        let key_pem = Zeroizing::new(
            std::fs::read_to_string(&key_path)
                .map_err(io(format!("reading {}", key_path.display())))?,
        );
        let key = KeyPair::from_pkcs8_pem_and_sign_algo(&key_pem, &PKCS_ECDSA_P384_SHA384)
            .map_err(|e| bad(format!("{CA_KEY}: {e}")))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| bad(format!("{CA_CERT}: {e}")))?;
        let (_, x509) =
            X509Certificate::from_der(&pem.contents).map_err(|e| bad(format!("{CA_CERT}: {e}")))?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad(format!("{CA_KEY} is not the key of {CA_CERT}")));
        }
        let not_after = x509.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&pem.contents.as_slice().into(), key)
            .map_err(|e| bad(format!("{CA_CERT}: {e}")))?;
        Ok((issuer, not_after))
    }

    /// `warden pki issue server|client NAME`: a key and a certificate signed by the CA, written
    /// to `issued/NAME.key` (0600) and `issued/NAME.pem`, and recorded in the index.
    pub fn issue(&self, opts: &IssueOptions) -> Result<CertInfo, PkiError> {
        validate_name(&opts.name)?;
        let sans = opts
            .sans
            .iter()
            .map(|s| validate_san(s))
            .collect::<Result<Vec<_>, _>>()?;
        if opts.kind == Kind::Server && sans.is_empty() {
            return Err(PkiError::NoSan);
        }
        let days = opts.days.unwrap_or(match opts.kind {
            Kind::Server => SERVER_DAYS,
            Kind::Client => CLIENT_DAYS,
        });
        if days == 0 {
            return Err(PkiError::ZeroDays);
        }
        let _lock = self.lock()?;
        let (issuer, ca_not_after) = self.load_ca()?;
        let issued = self.path(ISSUED_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&issued)
            .map_err(io(format!("creating {}", issued.display())))?;
        let (cert_file, key_file) = (format!("{}.pem", opts.name), format!("{}.key", opts.name));
        for f in [&cert_file, &key_file] {
            let p = issued.join(f);
            if !opts.force && p.symlink_metadata().is_ok() {
                return Err(PkiError::Exists(p));
            }
        }
        let mut index = self.index()?;
        let serial = loop {
            let s = random_serial()?;
            let h = hex::encode(s);
            if !index.certs.iter().any(|c| c.serial == h) {
                break s;
            }
        };
        let start = now();
        let not_before = start - BACKDATE;
        let not_after = start + Duration::days(days.into());
        if not_after > ca_not_after {
            return Err(PkiError::OutlivesCa(rfc3339(ca_not_after)));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, opts.name.as_str());
        params.is_ca = IsCa::ExplicitNoCa;
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match opts.kind {
            Kind::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Kind::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        let mut san_text = Vec::new();
        for san in sans {
            match san {
                San::Ip(ip) => {
                    san_text.push(ip.to_string());
                    params.subject_alt_names.push(SanType::IpAddress(ip));
                }
                San::Dns(d) => {
                    san_text.push(d.clone());
                    params
                        .subject_alt_names
                        .push(SanType::DnsName(d.try_into()?));
                }
            }
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384)?;
        let cert = params.signed_by(&key, &issuer)?;
        let identity = client_identity(cert.der()).map_err(|e| PkiError::BadCa {
            dir: self.dir.clone(),
            why: format!("the certificate just signed does not parse: {e}"),
        })?;
        let info = CertInfo {
            name: opts.name.clone(),
            kind: opts.kind,
            serial: hex::encode(serial),
            not_before: rfc3339(not_before),
            not_after: rfc3339(not_after),
            sans: san_text,
            identity: identity.to_hex(),
            revoked_at: None,
            cert: format!("{ISSUED_DIR}/{cert_file}"),
        };
        // Order matters for a crash: the key first (a certificate on disk without its key would
        // look usable and is not), then the index, then the certificate, so that no certificate
        // can exist that `revoke` does not know about. A crash leaves at worst an entry for a
        // certificate never written, which is harmless to revoke.
        let key_pem = Zeroizing::new(key.serialize_pem());
        write_atomic(&issued, &key_file, key_pem.as_bytes(), 0o600)
            .map_err(io(format!("writing {ISSUED_DIR}/{key_file}")))?;
        index.certs.push(info.clone());
        self.write_index(&index)?;
        write_atomic(&issued, &cert_file, cert.pem().as_bytes(), 0o644)
            .map_err(io(format!("writing {ISSUED_DIR}/{cert_file}")))?;
        Ok(info)
    }

    /// `warden pki revoke NAME|SERIAL`: marks every unrevoked certificate issued under NAME (a
    /// name replaced with `--force` may have several), or the one with that serial, as revoked,
    /// and re-signs the CRL. A NAME match wins over a serial match. Returns what was revoked.
    pub fn revoke(&self, what: &str) -> Result<Vec<CertInfo>, PkiError> {
        let _lock = self.lock()?;
        let (issuer, _) = self.load_ca()?;
        let mut index = self.index()?;
        let by_name: Vec<usize> = (0..index.certs.len())
            .filter(|&i| index.certs[i].name == what)
            .collect();
        let targets = if !by_name.is_empty() {
            by_name
        } else {
            let want = normalize_serial(what).ok_or_else(|| PkiError::NotFound(what.into()))?;
            (0..index.certs.len())
                .filter(|&i| normalize_serial(&index.certs[i].serial).as_deref() == Some(&want))
                .collect()
        };
        if targets.is_empty() {
            return Err(PkiError::NotFound(what.into()));
        }
        let fresh: Vec<usize> = targets
            .into_iter()
            .filter(|&i| index.certs[i].revoked_at.is_none())
            .collect();
        if fresh.is_empty() {
            return Err(PkiError::AlreadyRevoked(what.into()));
        }
        let when = rfc3339(now());
        for &i in &fresh {
            index.certs[i].revoked_at = Some(when.clone());
        }
        self.publish_crl(&issuer, &mut index, CRL_DAYS)?;
        Ok(fresh.into_iter().map(|i| index.certs[i].clone()).collect())
    }

    /// `warden pki crl`: re-signs the CRL with a new next-update (a CRL past its next-update is
    /// refused by verifiers, so this runs from a timer well within `days`).
    pub fn refresh_crl(&self, days: Option<u32>) -> Result<(), PkiError> {
        let days = days.unwrap_or(CRL_DAYS);
        if days == 0 {
            return Err(PkiError::ZeroDays);
        }
        let _lock = self.lock()?;
        let (issuer, _) = self.load_ca()?;
        let mut index = self.index()?;
        self.publish_crl(&issuer, &mut index, days)
    }

    /// Signs a CRL of every revoked certificate in `index` with the next CRL number, then
    /// writes the index and the CRL, in that order: the index is the record, the CRL is derived
    /// from it. A crash between the two leaves a revocation in the index that the CRL lacks
    /// until the next `revoke` or `warden pki crl` re-signs it; the other order could lose a
    /// revocation that was already published, and reuse a CRL number.
    fn publish_crl(
        &self,
        issuer: &Issuer<'_, impl rcgen::SigningKey>,
        index: &mut Index,
        days: u32,
    ) -> Result<(), PkiError> {
        let mut revoked = Vec::new();
        for c in &index.certs {
            let Some(at) = &c.revoked_at else { continue };
            let serial = hex::decode(&c.serial).map_err(|e| {
                PkiError::BadIndex(self.path(INDEX), format!("serial {}: {e}", c.serial))
            })?;
            let at = OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                .map_err(|e| {
                    PkiError::BadIndex(self.path(INDEX), format!("revoked_at {at}: {e}"))
                })?;
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: at,
                reason_code: None,
                invalidity_date: None,
            });
        }
        index.crl_number += 1;
        let start = now();
        let params = CertificateRevocationListParams {
            this_update: start,
            next_update: start + Duration::days(days.into()),
            crl_number: SerialNumber::from_slice(&index.crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(issuer)?.pem()?;
        self.write_index(index)?;
        write_atomic(&self.dir, CRL, crl.as_bytes(), 0o644).map_err(io(format!("writing {CRL}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_positive_minimal_and_sixteen_bytes() {
        for _ in 0..100 {
            let s = random_serial().unwrap();
            assert!((0x40..=0x7f).contains(&s[0]));
        }
        assert_ne!(random_serial().unwrap(), random_serial().unwrap());
    }

    #[test]
    fn typed_serials_match_whatever_their_spelling() {
        assert_eq!(normalize_serial("4A:0b"), Some("4a0b".into()));
        assert_eq!(normalize_serial("004a0b"), Some("4a0b".into()));
        assert_eq!(normalize_serial("agent"), None);
        assert_eq!(normalize_serial(""), None);
    }

    #[test]
    fn issue_before_init_says_to_run_init() {
        let d = tempfile::tempdir().unwrap();
        let pki = Pki::new(d.path());
        let e = pki
            .issue(&IssueOptions {
                kind: Kind::Client,
                name: "a".into(),
                sans: vec![],
                days: None,
                force: false,
            })
            .unwrap_err();
        assert!(matches!(e, PkiError::NoCa(_)), "{e}");
    }

    #[test]
    fn a_ca_key_that_is_not_the_certificates_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let a = Pki::new(d.path().join("a"));
        let b = Pki::new(d.path().join("b"));
        a.init("A", None, false).unwrap();
        b.init("B", None, false).unwrap();
        std::fs::copy(b.path(CA_KEY), a.path(CA_KEY)).unwrap();
        let e = a.revoke("x").unwrap_err();
        assert!(matches!(e, PkiError::BadCa { .. }), "{e}");
    }

    #[test]
    fn revoke_by_name_or_serial_and_not_twice() {
        let d = tempfile::tempdir().unwrap();
        let pki = Pki::new(d.path());
        pki.init("CA", None, false).unwrap();
        let opts = |name: &str| IssueOptions {
            kind: Kind::Client,
            name: name.into(),
            sans: vec![],
            days: None,
            force: false,
        };
        pki.issue(&opts("a")).unwrap();
        let b = pki.issue(&opts("b")).unwrap();
        assert_eq!(pki.revoke("a").unwrap().len(), 1);
        assert!(matches!(pki.revoke("a"), Err(PkiError::AlreadyRevoked(_))));
        let serial_typed = b.serial.to_uppercase();
        assert_eq!(pki.revoke(&serial_typed).unwrap()[0].name, "b");
        assert!(matches!(pki.revoke("nobody"), Err(PkiError::NotFound(_))));
        let index = pki.index().unwrap();
        assert!(index.certs.iter().all(|c| c.revoked_at.is_some()));
        assert_eq!(index.crl_number, 3, "init, and one CRL per revocation");
    }
}
