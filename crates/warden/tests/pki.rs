//! `warden pki` end to end: the real binary writes the PKI, and the `openssl` command line —
//! an implementation that shares no code with warden — checks what it wrote.

use sha2::{Digest, Sha256};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const DAY: i64 = 86_400;

fn warden(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_warden"))
        .arg("pki")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .env_remove("WARDEN_PKI_DIR")
        .output()
        .expect("run warden")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = warden(dir, args);
    assert!(
        out.status.success(),
        "warden pki {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(dir: &Path, args: &[&str]) -> String {
    let out = warden(dir, args);
    assert!(!out.status.success(), "warden pki {args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl")
}

fn openssl_ok(args: &[&str]) -> String {
    let out = openssl(args);
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn text(cert: &Path) -> String {
    openssl_ok(&["x509", "-in", s(cert), "-noout", "-text"])
}

/// Asserts that the certificate is valid for `days` ± 1 day from now, with openssl's
/// `-checkend` (exit 0 when the certificate does not expire within the given seconds).
fn assert_validity_days(cert: &Path, days: i64) {
    let check = |secs: i64| {
        openssl(&[
            "x509",
            "-in",
            s(cert),
            "-noout",
            "-checkend",
            &secs.to_string(),
        ])
        .status
        .success()
    };
    assert!(
        check((days - 1) * DAY),
        "{} expires before {days} - 1 days",
        cert.display()
    );
    assert!(
        !check((days + 1) * DAY),
        "{} outlives {days} + 1 days",
        cert.display()
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").mode() & 0o777
}

struct Pki {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("pki");
        Pki { _tmp: tmp, dir }
    }
    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }
    fn cert(&self, name: &str) -> PathBuf {
        self.dir.join("issued").join(format!("{name}.pem"))
    }
    fn key(&self, name: &str) -> PathBuf {
        self.dir.join("issued").join(format!("{name}.key"))
    }
    fn verify(&self, name: &str, crl: bool) -> Output {
        let (ca, crl_path, cert) = (self.ca(), self.crl(), self.cert(name));
        let mut args = vec!["verify"];
        if crl {
            args.extend(["-crl_check", "-CRLfile", s(&crl_path)]);
        }
        args.extend(["-CAfile", s(&ca), s(&cert)]);
        openssl(&args)
    }
}

#[test]
fn certificates_are_p384_sha384_with_the_right_extensions_validity_and_modes() {
    let p = Pki::new();
    ok(&p.dir, &["init"]);
    ok(
        &p.dir,
        &[
            "issue",
            "server",
            "web",
            "--san",
            "localhost",
            "--san",
            "127.0.0.1",
            "--san",
            "::1",
        ],
    );
    ok(&p.dir, &["issue", "client", "agent-1"]);
    ok(&p.dir, &["issue", "client", "short", "--days", "7"]);

    for name in ["web", "agent-1", "short"] {
        let v = p.verify(name, true);
        assert!(
            v.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&v.stderr)
        );
    }

    let ca = text(&p.ca());
    let web = text(&p.cert("web"));
    let agent = text(&p.cert("agent-1"));
    for t in [&ca, &web, &agent] {
        assert!(t.contains("Signature Algorithm: ecdsa-with-SHA384"), "{t}");
        assert!(
            t.contains("NIST CURVE: P-384") && t.contains("secp384r1"),
            "{t}"
        );
    }
    assert!(ca.contains("CA:TRUE, pathlen:0"), "{ca}");
    assert!(
        ca.contains("Key Usage: critical\n                Certificate Sign, CRL Sign\n"),
        "{ca}"
    );
    assert!(ca.contains("Subject: CN = warden CA"), "{ca}");

    assert!(
        web.contains("DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1"),
        "{web}"
    );
    assert!(web.contains("TLS Web Server Authentication"), "{web}");
    assert!(!web.contains("TLS Web Client Authentication"), "{web}");
    assert!(web.contains("Digital Signature"), "{web}");
    assert!(web.contains("CA:FALSE"), "{web}");
    assert!(web.contains("Issuer: CN = warden CA"), "{web}");

    assert!(agent.contains("Subject: CN = agent-1"), "{agent}");
    assert!(agent.contains("TLS Web Client Authentication"), "{agent}");
    assert!(!agent.contains("TLS Web Server Authentication"), "{agent}");
    // openssl's own purpose checks agree with the EKUs.
    let purpose = |cert: &Path, purpose: &str| {
        openssl(&[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            s(&p.ca()),
            s(cert),
        ])
        .status
        .success()
    };
    assert!(purpose(&p.cert("web"), "sslserver"));
    assert!(!purpose(&p.cert("web"), "sslclient"));
    assert!(purpose(&p.cert("agent-1"), "sslclient"));
    assert!(!purpose(&p.cert("agent-1"), "sslserver"));

    assert_validity_days(&p.ca(), 3650);
    assert_validity_days(&p.cert("web"), 365);
    assert_validity_days(&p.cert("agent-1"), 90);
    assert_validity_days(&p.cert("short"), 7);

    assert_eq!(mode(&p.dir.join("ca.key")), 0o600);
    assert_eq!(mode(&p.ca()), 0o644);
    for name in ["web", "agent-1", "short"] {
        assert_eq!(mode(&p.key(name)), 0o600, "{name}.key");
        assert_eq!(mode(&p.cert(name)), 0o644, "{name}.pem");
        // The key is a P-384 key and it is the one the certificate certifies.
        let key = openssl_ok(&["pkey", "-in", s(&p.key(name)), "-noout", "-text"]);
        assert!(key.contains("NIST CURVE: P-384"), "{key}");
        let from_key = openssl_ok(&["pkey", "-in", s(&p.key(name)), "-pubout"]);
        let from_cert = openssl_ok(&["x509", "-in", s(&p.cert(name)), "-noout", "-pubkey"]);
        assert_eq!(
            from_key, from_cert,
            "{name}: key and certificate do not match"
        );
    }
    let ca_key = openssl_ok(&["pkey", "-in", s(&p.dir.join("ca.key")), "-pubout"]);
    assert_eq!(
        ca_key,
        openssl_ok(&["x509", "-in", s(&p.ca()), "-noout", "-pubkey"])
    );
}

#[test]
fn a_revoked_client_fails_the_crl_check_while_another_still_verifies() {
    let p = Pki::new();
    ok(&p.dir, &["init"]);
    ok(&p.dir, &["issue", "client", "lost"]);
    ok(&p.dir, &["issue", "client", "kept"]);
    ok(&p.dir, &["issue", "client", "by-serial"]);
    for name in ["lost", "kept", "by-serial"] {
        assert!(
            p.verify(name, true).status.success(),
            "{name} before revocation"
        );
    }

    ok(&p.dir, &["revoke", "lost"]);
    let v = p.verify("lost", true);
    assert!(!v.status.success());
    let said =
        String::from_utf8_lossy(&v.stdout).into_owned() + &String::from_utf8_lossy(&v.stderr);
    assert!(said.contains("certificate revoked"), "{said}");
    assert!(
        p.verify("kept", true).status.success(),
        "an unrevoked client must still verify"
    );
    assert!(
        p.verify("lost", false).status.success(),
        "the chain itself is still intact"
    );

    // Revoking by serial, as openssl prints it (upper case, no leading zeros dropped).
    let serial = openssl_ok(&["x509", "-in", s(&p.cert("by-serial")), "-noout", "-serial"]);
    let serial = serial.trim().trim_start_matches("serial=");
    ok(&p.dir, &["revoke", serial]);
    assert!(!p.verify("by-serial", true).status.success());
    assert!(p.verify("kept", true).status.success());

    let crl = openssl_ok(&["crl", "-in", s(&p.crl()), "-noout", "-text"]);
    assert!(
        crl.contains("Signature Algorithm: ecdsa-with-SHA384"),
        "{crl}"
    );
    assert!(crl.contains("Next Update:"), "{crl}");
    assert!(crl.contains(serial), "{crl}");
    assert!(
        crl.contains("X509v3 CRL Number: \n                3"),
        "{crl}"
    );
    // The CRL is signed by the CA.
    let out = openssl(&["crl", "-in", s(&p.crl()), "-noout", "-CAfile", s(&p.ca())]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("verify OK")
            || String::from_utf8_lossy(&out.stdout).contains("verify OK"),
        "{out:?}"
    );

    // Re-signing keeps every revocation, takes the next number and the asked next-update.
    ok(&p.dir, &["crl", "--days", "2"]);
    let crl = openssl_ok(&["crl", "-in", s(&p.crl()), "-noout", "-text"]);
    assert!(
        crl.contains("X509v3 CRL Number: \n                4"),
        "{crl}"
    );
    assert!(crl.contains(serial), "{crl}");
    assert!(!p.verify("lost", true).status.success());
    assert!(p.verify("kept", true).status.success());
    let next = openssl_ok(&[
        "crl",
        "-in",
        s(&p.crl()),
        "-noout",
        "-lastupdate",
        "-nextupdate",
    ]);
    let dates: Vec<&str> = next
        .lines()
        .filter_map(|l| l.split_once('=').map(|x| x.1))
        .collect();
    assert_eq!(dates.len(), 2, "{next}");
    let day = |d: &str| {
        d.split_whitespace()
            .nth(1)
            .and_then(|x| x.parse::<u32>().ok())
    };
    let (last, next_day) = (day(dates[0]).expect("day"), day(dates[1]).expect("day"));
    assert!(next_day == last + 2 || next_day < last, "{next}"); // + 2 days, or a new month

    // Revoking again, or something unknown, is an error.
    refused(&p.dir, &["revoke", "lost"]);
    refused(&p.dir, &["revoke", "nobody"]);

    let list = ok(&p.dir, &["list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&list).expect("json");
    let revoked = |name: &str| {
        list.as_array()
            .expect("array")
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| !c["revoked_at"].is_null())
    };
    assert_eq!(revoked("lost"), Some(true));
    assert_eq!(revoked("by-serial"), Some(true));
    assert_eq!(revoked("kept"), Some(false));
}

#[test]
fn existing_ca_and_names_are_not_overwritten_without_force() {
    let p = Pki::new();
    ok(&p.dir, &["init"]);
    let ca_before = std::fs::read(p.ca()).expect("ca");
    let e = refused(&p.dir, &["init"]);
    assert!(e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(p.ca()).expect("ca"), ca_before);

    ok(&p.dir, &["issue", "client", "agent"]);
    let before = std::fs::read(p.cert("agent")).expect("cert");
    let key_before = std::fs::read(p.key("agent")).expect("key");
    let e = refused(&p.dir, &["issue", "client", "agent"]);
    assert!(e.contains("already exists"), "{e}");
    // A server of the same name is refused too: names are one namespace.
    refused(&p.dir, &["issue", "server", "agent", "--san", "localhost"]);
    assert_eq!(std::fs::read(p.cert("agent")).expect("cert"), before);
    assert_eq!(std::fs::read(p.key("agent")).expect("key"), key_before);

    ok(&p.dir, &["issue", "client", "agent", "--force"]);
    assert_ne!(std::fs::read(p.cert("agent")).expect("cert"), before);
    assert_ne!(std::fs::read(p.key("agent")).expect("key"), key_before);
    assert!(p.verify("agent", true).status.success());

    ok(&p.dir, &["init", "--force"]);
    assert_ne!(std::fs::read(p.ca()).expect("ca"), ca_before);
    // What the old CA signed no longer verifies under the new one.
    assert!(!p.verify("agent", false).status.success());
    // No temporary file is left behind by any of it.
    for d in [p.dir.clone(), p.dir.join("issued")] {
        for e in std::fs::read_dir(&d).expect("readdir") {
            let name = e.expect("entry").file_name().to_string_lossy().into_owned();
            assert!(!name.ends_with(".tmp"), "left over: {name}");
        }
    }
}

#[test]
fn unsafe_names_and_bad_sans_are_refused_and_create_nothing() {
    let p = Pki::new();
    ok(&p.dir, &["init"]);
    for name in [
        "../evil", "a/b", ".hidden", "-x", "", "a..b", "sp ace", "/tmp/abs",
    ] {
        let e = refused(&p.dir, &["issue", "client", "--", name]);
        assert!(e.contains("invalid"), "{name:?}: {e}");
    }
    for san in ["bad name", "a..b", "x/y", ""] {
        refused(&p.dir, &["issue", "server", "srv", "--san", san]);
    }
    refused(&p.dir, &["issue", "server", "srv"]); // no --san at all
    refused(&p.dir, &["issue", "client", "zero", "--days", "0"]);
    refused(&p.dir, &["issue", "client", "forever", "--days", "4000"]); // outlives the CA
    let issued: Vec<_> = match std::fs::read_dir(p.dir.join("issued")) {
        Ok(rd) => rd.map(|e| e.expect("entry").file_name()).collect(),
        Err(_) => Vec::new(),
    };
    assert!(issued.is_empty(), "{issued:?}");
    assert!(!p.dir.parent().expect("parent").join("evil.pem").exists());
    assert!(!p.dir.join("evil.pem").exists());
    let list: serde_json::Value =
        serde_json::from_str(&ok(&p.dir, &["list", "--json"])).expect("json");
    assert_eq!(list, serde_json::json!([]));
}

/// Reads one DER TLV at `at`: returns (start of contents, end of element).
fn tlv(der: &[u8], at: usize) -> (usize, usize) {
    let len0 = der[at + 1] as usize;
    let (len, start) = if len0 < 0x80 {
        (len0, at + 2)
    } else {
        let n = len0 & 0x7f;
        let len = der[at + 2..at + 2 + n]
            .iter()
            .fold(0usize, |a, b| (a << 8) | *b as usize);
        (len, at + 2 + n)
    };
    (start, start + len)
}

#[test]
fn the_printed_client_identity_is_sha256_over_issuer_der_and_serial() {
    let p = Pki::new();
    ok(&p.dir, &["init", "--cn", "Identity Test CA"]);
    let out = ok(&p.dir, &["issue", "client", "agent-7"]);
    let printed = out
        .lines()
        .find_map(|l| l.strip_prefix("identity: "))
        .expect("identity line")
        .to_string();

    // Independently: the certificate's DER from openssl, walked by hand.
    let der_path = p.dir.join("agent-7.der");
    openssl_ok(&[
        "x509",
        "-in",
        s(&p.cert("agent-7")),
        "-outform",
        "DER",
        "-out",
        s(&der_path),
    ]);
    let der = std::fs::read(&der_path).expect("der");
    let (cert_body, _) = tlv(&der, 0); // Certificate SEQUENCE
    let (tbs_body, _) = tlv(&der, cert_body); // TBSCertificate SEQUENCE
    assert_eq!(der[tbs_body], 0xa0, "version [0]");
    let (_, after_version) = tlv(&der, tbs_body);
    assert_eq!(der[after_version], 0x02, "serialNumber INTEGER");
    let (serial_start, serial_end) = tlv(&der, after_version);
    let (_, after_sigalg) = tlv(&der, serial_end); // signature AlgorithmIdentifier
    assert_eq!(der[after_sigalg], 0x30, "issuer Name");
    let (_, issuer_end) = tlv(&der, after_sigalg);
    let issuer = &der[after_sigalg..issuer_end];
    let serial = &der[serial_start..serial_end];

    // The serial agrees with openssl's, and the issuer is the CA's subject, DER for DER.
    let o = openssl_ok(&["x509", "-in", s(&p.cert("agent-7")), "-noout", "-serial"]);
    assert_eq!(
        o.trim().trim_start_matches("serial="),
        hex::encode_upper(serial).trim_start_matches('0')
    );
    let o = openssl_ok(&["x509", "-in", s(&p.cert("agent-7")), "-noout", "-issuer"]);
    assert!(o.contains("CN = Identity Test CA"), "{o}");

    let mut bytes = issuer.to_vec();
    bytes.extend_from_slice(serial);
    let expected = hex::encode(Sha256::digest(&bytes));
    assert_eq!(printed, expected);

    // `warden pki identity FILE` and `warden pki list` say the same.
    let id = ok(&p.dir, &["identity", s(&p.cert("agent-7"))]);
    assert_eq!(id.trim(), expected);
    let list = ok(&p.dir, &["list"]);
    let row = list
        .lines()
        .find(|l| l.starts_with("agent-7 "))
        .expect("row");
    assert!(row.contains(&expected) && row.contains("client"), "{row}");

    // A second client of the same CA has another identity.
    let out = ok(&p.dir, &["issue", "client", "agent-8"]);
    assert!(!out.contains(&expected));
}

/// An `openssl s_server` on an ephemeral port that requires a client certificate, TLS 1.3 only,
/// serving one connection with its status page (`-www`).
struct TlsServer {
    child: std::process::Child,
    port: u16,
}

impl TlsServer {
    fn start(p: &Pki, server: &str, crl: bool) -> TlsServer {
        use std::io::{BufRead, BufReader};
        let (cert, key, ca, crl_path) = (p.cert(server), p.key(server), p.ca(), p.crl());
        let mut args = vec![
            "s_server",
            "-accept",
            "127.0.0.1:0",
            "-tls1_3",
            "-naccept",
            "1",
            "-www",
            "-cert",
            s(&cert),
            "-key",
            s(&key),
            "-CAfile",
            s(&ca),
            "-Verify",
            "1",
            "-verify_return_error",
        ];
        if crl {
            args.extend(["-crl_check", "-CRL", s(&crl_path)]);
        }
        let mut child = Command::new("openssl")
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start openssl s_server");
        let stdout = child.stdout.take().expect("stdout");
        let mut port = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("read s_server");
            if let Some(addr) = line.strip_prefix("ACCEPT ") {
                port = addr.rsplit(':').next().and_then(|p| p.parse().ok());
                break;
            }
        }
        TlsServer {
            child,
            port: port.expect("s_server printed no ACCEPT line"),
        }
    }

    /// Connects with `client`'s certificate (or none) and says whether the server answered.
    fn served(&self, p: &Pki, client: Option<&str>) -> bool {
        use std::io::Write;
        let connect = format!("127.0.0.1:{}", self.port);
        let (ca, cert, key) = (p.ca(), client.map(|c| p.cert(c)), client.map(|c| p.key(c)));
        let mut args = vec![
            "s_client",
            "-connect",
            &connect,
            "-tls1_3",
            "-CAfile",
            s(&ca),
            "-verify_return_error",
            "-verify_hostname",
            "localhost",
            "-ign_eof",
        ];
        if let (Some(cert), Some(key)) = (&cert, &key) {
            args.extend(["-cert", s(cert), "-key", s(key)]);
        }
        let mut c = Command::new("openssl")
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start openssl s_client");
        let _ = c
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"GET / HTTP/1.0\r\n\r\n");
        let out = c.wait_with_output().expect("s_client");
        let out = String::from_utf8_lossy(&out.stdout);
        out.contains("Verification: OK") && out.contains("HTTP/1.0 200 ok")
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn issued_certificates_complete_a_mutual_tls13_handshake_and_the_crl_is_honoured() {
    let p = Pki::new();
    ok(&p.dir, &["init"]);
    ok(&p.dir, &["issue", "server", "web", "--san", "localhost"]);
    ok(&p.dir, &["issue", "client", "good"]);
    ok(&p.dir, &["issue", "client", "bad"]);
    ok(&p.dir, &["revoke", "bad"]);

    assert!(TlsServer::start(&p, "web", true).served(&p, Some("good")));
    // Refused: no client certificate; a revoked one when the server checks the CRL.
    assert!(!TlsServer::start(&p, "web", true).served(&p, None));
    assert!(!TlsServer::start(&p, "web", true).served(&p, Some("bad")));
    // The same revoked certificate passes a server that ignores the CRL: the refusal above is
    // the CRL's doing.
    assert!(TlsServer::start(&p, "web", false).served(&p, Some("bad")));
    // A client certificate cannot serve: its EKU is clientAuth only.
    ok(&p.dir, &["issue", "client", "localhost"]);
    assert!(!TlsServer::start(&p, "localhost", false).served(&p, Some("good")));
}

#[test]
fn concurrent_issues_all_land_in_the_index_with_distinct_serials() {
    let p = Pki::new();
    ok(&p.dir, &["init"]);
    let children: Vec<_> = (0..6)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_warden"))
                .args([
                    "pki",
                    "--dir",
                    s(&p.dir),
                    "issue",
                    "client",
                    &format!("c{i}"),
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for mut c in children {
        assert!(c.wait().expect("wait").success());
    }
    let list: serde_json::Value =
        serde_json::from_str(&ok(&p.dir, &["list", "--json"])).expect("json");
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 6, "{list:?}");
    let serials: std::collections::HashSet<_> = list
        .iter()
        .map(|c| c["serial"].as_str().expect("serial"))
        .collect();
    assert_eq!(serials.len(), 6);
}

#[test]
fn list_in_a_directory_without_a_ca_is_an_error_not_an_empty_pki() {
    let p = Pki::new();
    let e = refused(&p.dir, &["list"]);
    assert!(e.contains("warden pki init"), "{e}");
}
