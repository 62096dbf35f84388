//! The mTLS gateway end to end: the real daemon serves HTTPS, `curl` and `openssl s_client`
//! (implementations that share no code with warden) are its clients, and certificates come
//! from `warden pki`, from another CA, or are forged expired with rcgen.

mod common;

use common::{base_config, Daemon, ROOT_ADMIN};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A client certificate and its key.
#[derive(Clone)]
struct Client {
    cert: PathBuf,
    key: PathBuf,
}

struct Reply {
    status: u16,
    headers: String,
    body: Value,
    text: String,
}

fn dev_gateway() -> (Daemon, Client) {
    let d = Daemon::dev_with(&["--listen", "127.0.0.1:0"]);
    let c = Client {
        cert: d.env["WARDEN_CLIENT_CERT"].clone().into(),
        key: d.env["WARDEN_CLIENT_KEY"].clone().into(),
    };
    (d, c)
}

fn pki(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_warden"))
        .arg("pki")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .env_remove("WARDEN_PKI_DIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "warden pki {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn issue_client(dir: &Path, name: &str) -> Client {
    pki(dir, &["issue", "client", name]);
    Client {
        cert: dir.join(format!("issued/{name}.pem")),
        key: dir.join(format!("issued/{name}.key")),
    }
}

/// One HTTPS request with curl; `None` when the TLS handshake (or connection) failed.
fn curl(
    d: &Daemon,
    c: Option<&Client>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Option<Reply> {
    let url = format!("https://{}{path}", d.env["WARDEN_LISTEN"]);
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-i", "--max-time", "20", "-X", method, "--cacert"])
        .arg(&d.env["WARDEN_CA"]);
    if let Some(c) = c {
        cmd.arg("--cert").arg(&c.cert).arg("--key").arg(&c.key);
    }
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let tmp = tempfile::NamedTempFile::new().unwrap();
    if let Some(b) = body {
        std::fs::write(tmp.path(), b).unwrap();
        if b.len() > 1 << 20 {
            // Over the limit, sent whole without waiting for `100 Continue`: the gateway must
            // read and discard the body before its 413, or the client, still sending, sees a
            // reset connection instead of the reply.
            cmd.args(["--http1.1", "-H", "Expect:"]);
        }
        cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(format!("@{}", tmp.path().display()));
    }
    let out = cmd.arg(&url).output().unwrap();
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("headers and body");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    Some(Reply {
        status,
        headers: head.to_ascii_lowercase(),
        body: serde_json::from_str(body).unwrap_or(Value::Null),
        text: body.to_string(),
    })
}

fn ok(
    d: &Daemon,
    c: &Client,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Value {
    let r = curl(d, Some(c), method, path, token, body).expect("handshake");
    assert_eq!(r.status, 200, "{method} {path}: {}", r.text);
    assert_eq!(r.body["status"], "ok", "{}", r.text);
    r.body["data"].clone()
}

/// `GET /health` through `openssl s_client` with extra options: did it get an answer?
fn s_client(d: &Daemon, c: &Client, extra: &[&str]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let req = dir.path().join("request");
    std::fs::write(
        &req,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let out = Command::new("timeout")
        .args([
            "20",
            "openssl",
            "s_client",
            "-quiet",
            "-connect",
            &d.env["WARDEN_LISTEN"],
            "-CAfile",
        ])
        .arg(&d.env["WARDEN_CA"])
        .arg("-cert")
        .arg(&c.cert)
        .arg("-key")
        .arg(&c.key)
        .args(extra)
        .stdin(std::fs::File::open(&req).unwrap())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("\"daemon\":\"warden\"")
}

fn login(d: &Daemon, c: &Client, admin: bool) -> String {
    let body = if admin {
        r#"{"client_id":"t","type":"admin"}"#
    } else {
        r#"{"client_id":"t","metadata":{}}"#
    };
    let data = ok(d, c, "POST", "/auth/validate", None, Some(body));
    data["token"].as_str().unwrap().to_string()
}

#[test]
fn rest_api_with_a_valid_client_certificate() {
    let (d, c) = dev_gateway();
    let health = ok(&d, &c, "GET", "/health", None, None);
    assert_eq!(health["daemon"], "warden");

    let t = login(&d, &c, false);
    let t = t.as_str();
    ok(
        &d,
        &c,
        "PUT",
        "/secrets/db_password",
        Some(t),
        Some(r#"{"value":"hunter2"}"#),
    );
    ok(
        &d,
        &c,
        "PUT",
        "/secrets/api_key",
        Some(t),
        Some(r#"{"value":"k-1"}"#),
    );
    let got = ok(&d, &c, "GET", "/secrets/db_password", Some(t), None);
    assert_eq!(got["value"], "hunter2");
    let batch = ok(
        &d,
        &c,
        "POST",
        "/secrets/batch",
        Some(t),
        Some(r#"{"keys":["db_password","api_key","nope"]}"#),
    );
    assert_eq!(batch["secrets"]["api_key"], "k-1");
    assert_eq!(batch["missing"], json!(["nope"]));
    let list = ok(&d, &c, "GET", "/secrets", Some(t), None);
    assert_eq!(list["count"], 2, "{list}");
    ok(&d, &c, "DELETE", "/secrets/api_key", Some(t), None);
    let gone = curl(&d, Some(&c), "GET", "/secrets/api_key", Some(t), None).unwrap();
    assert_eq!(gone.status, 404, "{}", gone.text);
    assert_eq!(gone.body["error"]["code"], "SECRET_NOT_FOUND");

    // Error codes become statuses.
    let none = curl(&d, Some(&c), "GET", "/secrets/db_password", None, None).unwrap();
    assert_eq!(
        (none.status, none.body["error"]["code"].as_str()),
        (401, Some("AUTH_REQUIRED"))
    );
    let bad = curl(
        &d,
        Some(&c),
        "GET",
        "/secrets/db_password",
        Some("wdn_forged"),
        None,
    )
    .unwrap();
    assert_eq!(bad.status, 401, "{}", bad.text);
    let not_admin = curl(&d, Some(&c), "POST", "/admin/reload", Some(t), None).unwrap();
    assert_eq!(not_admin.status, 403, "{}", not_admin.text);
    let admin = login(&d, &c, true);
    // With an admin token the request reaches the reload itself, which dev mode refuses
    // (there is no file to re-read).
    let r = curl(&d, Some(&c), "POST", "/admin/reload", Some(&admin), None).unwrap();
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("dev mode"), "{}", r.text);

    // Bad input gets a JSON error.
    let r = curl(
        &d,
        Some(&c),
        "POST",
        "/secrets/batch",
        Some(t),
        Some("{not json"),
    )
    .unwrap();
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (400, Some("VALIDATION_ERROR"))
    );
    let r = curl(&d, Some(&c), "GET", "/no/such/route", Some(t), None).unwrap();
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    let big = format!(r#"{{"value":"{}"}}"#, "x".repeat(2 << 20));
    let r = curl(&d, Some(&c), "PUT", "/secrets/big", Some(t), Some(&big)).unwrap();
    assert_eq!(r.status, 413, "{}", r.text);
    assert_eq!(r.body["status"], "error");
    assert_eq!(r.body["error"]["code"], "PAYLOAD_TOO_LARGE", "{}", r.text);
    // The same over HTTP/2: the refusal arrives as a reply, not as a reset stream.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &big).unwrap();
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
        ])
        .args(["--max-time", "20", "-X", "PUT", "--cacert"])
        .arg(&d.env["WARDEN_CA"])
        .arg("--cert")
        .arg(&c.cert)
        .arg("--key")
        .arg(&c.key)
        .args(["-H", &format!("Authorization: Bearer {t}")])
        .args(["-H", "Content-Type: application/json", "--data-binary"])
        .arg(format!("@{}", file.path().display()))
        .arg(format!("https://{}/secrets/big", d.env["WARDEN_LISTEN"]))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "413 2",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Metrics in the Prometheus text format.
    let m = curl(&d, Some(&c), "GET", "/metrics", Some(t), None).unwrap();
    assert_eq!(m.status, 200, "{}", m.text);
    assert!(
        m.headers.contains("content-type: text/plain"),
        "{}",
        m.headers
    );
    assert!(
        m.text.contains("\nwarden_requests_total ") || m.text.starts_with("# TYPE"),
        "{}",
        m.text
    );
    assert!(m.text.contains("warden_requests_total "), "{}", m.text);

    // Logout ends the token.
    ok(&d, &c, "POST", "/auth/logout", Some(t), None);
    let after = curl(&d, Some(&c), "GET", "/secrets", Some(t), None).unwrap();
    assert_eq!(after.status, 401, "{}", after.text);

    // The audit log shows the certificate identity and the gateway transport.
    let id = pki(
        Path::new(&format!("{}/pki", d.env["WARDEN_STATE_DIR"])),
        &["identity", c.cert.to_str().unwrap()],
    );
    let id = id
        .split_whitespace()
        .find(|w| w.len() == 64)
        .unwrap()
        .to_string();
    let rec = d.wait_audit(|r| r["method"] == "secrets.get" && r["result"] == "ok");
    let p = rec["principal"].to_string();
    assert!(p.contains("gateway"), "{rec}");
    assert!(p.contains(&id), "{rec} lacks {id}");
}

#[test]
fn tls_refusals_leave_the_daemon_serving() {
    let (d, c) = dev_gateway();
    let dir = tempfile::tempdir().unwrap();

    // No certificate: the handshake fails.
    assert!(curl(&d, None, "GET", "/health", None, None).is_none());
    // A certificate of another CA.
    let other = dir.path().join("other");
    pki(&other, &["init", "--cn", "other CA"]);
    let stranger = issue_client(&other, "dev-client");
    assert!(curl(&d, Some(&stranger), "GET", "/health", None, None).is_none());
    // TLS 1.2 only, X25519 only: refused; P-521 only and P-384 only: served.
    assert!(!s_client(&d, &c, &["-tls1_2"]));
    assert!(!s_client(&d, &c, &["-groups", "X25519"]));
    assert!(s_client(&d, &c, &["-groups", "P-521"]));
    assert!(s_client(&d, &c, &["-groups", "P-384"]));

    // Revoked: served before, refused after `warden pki revoke`, without a restart.
    let state_pki = PathBuf::from(format!("{}/pki", d.env["WARDEN_STATE_DIR"]));
    let soon = issue_client(&state_pki, "soon-revoked");
    assert!(curl(&d, Some(&soon), "GET", "/health", None, None).is_some());
    pki(&state_pki, &["revoke", "soon-revoked"]);
    assert!(curl(&d, Some(&soon), "GET", "/health", None, None).is_none());

    // Expired: signed by the right CA, validity over.
    let expired = forge_expired(&state_pki, dir.path());
    assert!(curl(&d, Some(&expired), "GET", "/health", None, None).is_none());

    // Still serving the good certificate.
    assert_eq!(ok(&d, &c, "GET", "/health", None, None)["daemon"], "warden");
}

/// A client certificate signed by the dev CA that expired yesterday.
fn forge_expired(pki_dir: &Path, out: &Path) -> Client {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(pki_dir.join("ca.key")).unwrap()).unwrap();
    let ca_pem = std::fs::read_to_string(pki_dir.join("ca.pem")).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "dev-expired");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(30);
    p.not_after = now - time::Duration::days(1);
    let cert = p.signed_by(&key, &issuer).unwrap();
    let c = Client {
        cert: out.join("expired.pem"),
        key: out.join("expired.key"),
    };
    std::fs::write(&c.cert, cert.pem()).unwrap();
    std::fs::write(&c.key, key.serialize_pem()).unwrap();
    c
}

#[test]
fn allowlist_pins_and_rate_limit_headers_from_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pki");
    pki(&p, &["init", "--cn", "gw test CA"]);
    pki(&p, &["issue", "server", "gw", "--san", "127.0.0.1"]);
    let agent1 = issue_client(&p, "agent-1");
    let agent2 = issue_client(&p, "agent-2");
    let outsider = issue_client(&p, "backup-1");
    let fp_of = |c: &Client| {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(&c.cert)
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        s.trim().rsplit('=').next().unwrap().to_string()
    };
    let extra = format!(
        r#"{ROOT_ADMIN}
[rate_limits]
system = "5/1m"

[gateway]
listen = "127.0.0.1:0"
cert = "{p}/issued/gw.pem"
key = "{p}/issued/gw.key"
client_ca = "{p}/ca.pem"
crl = "{p}/crl.pem"
allowed_names = ["agent-*"]
pinned_fingerprints = ["{fp1}", "{fp3}"]
max_body_size = "1KiB"
handshake_timeout = "1s"
"#,
        p = p.display(),
        fp1 = fp_of(&agent1),
        fp3 = fp_of(&outsider),
    );
    let mut d = Daemon::configured(&base_config(&extra));
    d.env
        .insert("WARDEN_CA".into(), p.join("ca.pem").display().to_string());

    // Allowed name and pinned: served, with the rate-limit headers.
    let r = curl(&d, Some(&agent1), "GET", "/health", None, None).expect("agent-1 admitted");
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.headers.contains("x-ratelimit-limit: 5"), "{}", r.headers);
    assert!(
        r.headers.contains("x-ratelimit-remaining: "),
        "{}",
        r.headers
    );
    assert!(r.headers.contains("x-ratelimit-reset: "), "{}", r.headers);
    assert!(r.body.get("rate_limit").is_none(), "{}", r.text);
    // Pinned but its CN is outside the allowlist; allowed name but not pinned.
    assert!(curl(&d, Some(&outsider), "GET", "/health", None, None).is_none());
    assert!(curl(&d, Some(&agent2), "GET", "/health", None, None).is_none());
    // A body over max_body_size.
    let body = format!(r#"{{"value":"{}"}}"#, "x".repeat(2048));
    let r = curl(&d, Some(&agent1), "PUT", "/secrets/x", None, Some(&body)).unwrap();
    assert_eq!(r.status, 413, "{}", r.text);
    // A client that never starts its handshake is closed after handshake_timeout.
    {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(&d.env["WARDEN_LISTEN"]).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).unwrap(), 0, "closed without a word");
    }
    // Past the limit: 429 with Retry-After.
    let mut last = 200;
    for _ in 0..6 {
        last = curl(&d, Some(&agent1), "GET", "/health", None, None)
            .unwrap()
            .status;
    }
    assert_eq!(last, 429);
    let r = curl(&d, Some(&agent1), "GET", "/health", None, None).unwrap();
    assert_eq!(r.status, 429);
    assert!(r.headers.contains("retry-after: "), "{}", r.headers);
    assert!(
        r.headers.contains("x-ratelimit-remaining: 0"),
        "{}",
        r.headers
    );
    // SIGTERM drains the gateway with the socket, and the daemon exits cleanly.
    assert!(d.stop().success());
}

#[test]
fn gateway_configuration_errors_name_the_key() {
    for (toml, key) in [
        ("[gateway]\nlisten = \"nowhere\"\n", "gateway.listen"),
        ("[gateway]\nlisten = \"127.0.0.1:0\"\n", "gateway.cert"),
        (
            "[gateway]\npinned_fingerprints = [\"abc\"]\n",
            "gateway.pinned_fingerprints",
        ),
        ("[gateway]\nallowed_names = []\n", "gateway.allowed_names"),
        (
            "[gateway]\nmax_connections = 0\n",
            "gateway.max_connections",
        ),
        (
            "[gateway]\nhandshake_timeout = \"0s\"\n",
            "gateway.handshake_timeout",
        ),
        ("[gateway]\nlistne = \"127.0.0.1:1\"\n", "listne"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = common::write_config(dir.path(), &base_config(toml));
        let (status, _, err) = common::run_bounded(
            Command::new(common::warden_bin())
                .args(["daemon", "run", "--config"])
                .arg(&cfg),
            std::time::Duration::from_secs(20),
        );
        assert!(
            status.is_some_and(|s| !s.success()),
            "{toml} accepted: {err}"
        );
        assert!(err.contains(key), "{toml}: {err}");
    }
}

#[test]
fn cli_secrets_commands_work_remotely() {
    let (d, c) = dev_gateway();
    let remote = |args: &[&str], input: &[u8]| {
        use std::io::Write;
        let mut child = Command::new(common::warden_bin())
            .args(args)
            .env_remove("WARDEN_SOCKET")
            .env("WARDEN_SOCKET", "/nonexistent/warden.sock")
            .env(
                "WARDEN_REMOTE",
                format!("https://{}", d.env["WARDEN_LISTEN"]),
            )
            .env("WARDEN_CA", &d.env["WARDEN_CA"])
            .env("WARDEN_CLIENT_CERT", &c.cert)
            .env("WARDEN_CLIENT_KEY", &c.key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok1, _, err) = remote(&["secrets", "set", "app.db-pass"], b"s3cret");
    assert!(ok1, "{err}");
    let (ok2, out, err) = remote(&["secrets", "get", "app.db-pass"], b"");
    assert!(ok2, "{err}");
    assert_eq!(out, "s3cret\n");
    let (ok3, out, err) = remote(&["secrets", "list"], b"");
    assert!(ok3 && out.contains("app.db-pass"), "{out}{err}");
    let (ok4, _, err) = remote(&["secrets", "delete", "app.db-pass"], b"");
    assert!(ok4, "{err}");
    let (ok5, _, err) = remote(&["secrets", "get", "app.db-pass"], b"");
    assert!(!ok5 && err.contains("SECRET_NOT_FOUND"), "{err}");
    // The writes went through the gateway under the certificate's identity.
    let rec = d.wait_audit(|r| r["method"] == "secrets.set");
    assert!(rec["principal"].to_string().contains("gateway"), "{rec}");
    // A method the gateway has no endpoint for says so.
    let (ok6, _, err) = remote(&["secrets", "versions", "x"], b"");
    assert!(
        !ok6 && err.contains("not available through the gateway"),
        "{err}"
    );
}

#[test]
fn grpc_and_rest_share_the_dev_daemons_port() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped grpc_and_rest_share_the_dev_daemons_port: jobs need root");
        return;
    }
    let (d, c) = dev_gateway();
    let run = |args: &[&str]| {
        let out = Command::new(common::warden_bin())
            .args(args)
            .env("WARDEN_SOCKET", "/nonexistent/warden.sock")
            .env(
                "WARDEN_REMOTE",
                format!("https://{}", d.env["WARDEN_LISTEN"]),
            )
            .env("WARDEN_CA", &d.env["WARDEN_CA"])
            .env("WARDEN_CLIENT_CERT", &c.cert)
            .env("WARDEN_CLIENT_KEY", &c.key)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // gRPC on the daemon's own port: a job runs and streams its output back.
    let (code, out, err) = run(&[
        "jobs",
        "exec",
        "--cwd",
        "/",
        "--",
        "/bin/sh",
        "-c",
        "echo over-grpc; exit 3",
    ]);
    assert_eq!(code, Some(3), "{out}{err}");
    assert_eq!(out, "over-grpc\n", "{err}");
    let (code, out, err) = run(&["jobs", "list", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("over-grpc"), "{out}");
    // REST on the same port, unknown routes still answered as REST.
    let r = curl(&d, Some(&c), "GET", "/health", None, None).expect("curl answers");
    assert_eq!(r.status, 200, "{}", r.text);
    let r = curl(&d, Some(&c), "GET", "/no/such/endpoint", None, None).expect("curl answers");
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "NOT_FOUND", "{}", r.text);
    // The job ran through the pipeline under the certificate.
    let rec = d.wait_audit(|r| r["method"] == "jobs.start");
    assert!(rec["principal"].to_string().contains("gateway"), "{rec}");
}

#[test]
fn the_gateways_connection_limit_closes_new_connections_until_one_ends() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pki");
    pki(&p, &["init", "--cn", "gw limit CA"]);
    pki(&p, &["issue", "server", "gw", "--san", "127.0.0.1"]);
    let agent = issue_client(&p, "agent-1");
    let extra = format!(
        r#"{ROOT_ADMIN}
[gateway]
listen = "127.0.0.1:0"
cert = "{p}/issued/gw.pem"
key = "{p}/issued/gw.key"
client_ca = "{p}/ca.pem"
max_connections = 2
"#,
        p = p.display(),
    );
    let mut d = Daemon::configured(&base_config(&extra));
    d.env
        .insert("WARDEN_CA".into(), p.join("ca.pem").display().to_string());
    let r = curl(&d, Some(&agent), "GET", "/health", None, None).expect("served under the limit");
    assert_eq!(r.status, 200, "{}", r.text);
    // Two connections held open (not even handshaking) fill the limit. The gateway may still
    // be finishing the connection of the request above when they arrive, and then closes one
    // of them at accept: such a one is replaced until both are really held.
    let hold = || {
        let s = std::net::TcpStream::connect(&d.env["WARDEN_LISTEN"]).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    };
    let closed = |s: &std::net::TcpStream| !matches!(s.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    let mut held: Vec<_> = (0..2).map(|_| hold()).collect();
    let refused = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        for s in held.iter_mut() {
            if closed(s) {
                *s = hold();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        held.iter().all(|s| !closed(s))
            && curl(&d, Some(&agent), "GET", "/health", None, None).is_none()
    });
    assert!(
        refused,
        "a third connection was served past max_connections = 2; gateway pid {:?}; log:\n{}",
        d.component_pid("gateway"),
        d.stderr()
    );
    // Once they are gone, new connections are served again.
    drop(held);
    let served = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        curl(&d, Some(&agent), "GET", "/health", None, None).is_some_and(|r| r.status == 200)
    });
    assert!(served, "the limit was not given back");
    assert!(d.stop().success());
}
