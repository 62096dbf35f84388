//! `warden jobs … --remote`: the real CLI against the gRPC router behind a real mutual TLS 1.3
//! listener, with certificates from `warden pki`.
//!
//! The listener here stands in for the gateway's TLS layer, which is not part of this test:
//! it verifies the client certificate against the CA (rustls, TLS 1.3 only), computes its
//! identity with `warden_pki::client_identity` and inserts it into each request's extensions.
//! Behind it: the gRPC router on a real daemon state (policy, audit, jobs in real cgroups).
//! Needs root and cgroups; elsewhere it prints `SKIPPED <test>: <why>` and returns.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use tokio_rustls::rustls::{self, pki_types::pem::PemObject, pki_types::CertificateDer};
use wardend::config::Config;
use wardend::identity::CertIdentity;
use wardend::server::state::{Runtime, State};

fn warden() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_warden"));
    for v in [
        "WARDEN_REMOTE",
        "WARDEN_CA",
        "WARDEN_CLIENT_CERT",
        "WARDEN_CLIENT_KEY",
        "WARDEN_SOCKET",
        "WARDEN_CONFIG",
    ] {
        c.env_remove(v);
    }
    c
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn pki(dir: &Path, args: &[&str]) {
    let out = warden()
        .arg("pki")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .unwrap();
    ok(&out);
}

fn id_of(pem: &Path) -> String {
    warden_pki::client_identity_pem(&std::fs::read(pem).unwrap())
        .unwrap()
        .to_hex()
}

/// A daemon state with `alice` and `bob` (by certificate id) allowed the jobs methods, and the
/// gRPC router on it behind mutual TLS 1.3 on a loopback port.
async fn serve(dir: &Path, pki_dir: &Path, prefix: &str) -> (Arc<State>, String) {
    let d = dir.display();
    let text = format!(
        r#"[daemon]
pid_file = "{d}/warden.pid"
log_file = "{d}/warden.log"
[socket]
path = "{d}/warden.sock"
[auth]
hmac_key_file = "{d}/hmac.key"
[audit]
path = "{d}/audit.log"
[secrets]
dir = "{d}/secrets"
[jobs]
cgroup_prefix = "{prefix}"
spill_dir = "{d}/spill"
stop_grace = "2s"
[policy.roles.runner]
allow = ["jobs:run", "jobs:list", "jobs:status", "jobs:attach", "jobs:stop"]
[[policy.rules]]
cert_id = ["{alice}", "{bob}"]
roles = ["runner"]
"#,
        alice = id_of(&pki_dir.join("issued/alice.pem")),
        bob = id_of(&pki_dir.join("issued/bob.pem")),
    );
    wardend::auth::generate_key_file(&dir.join("hmac.key")).unwrap();
    let config = Config::parse(&text, &dir.join("warden.toml")).unwrap();
    let audit = wardend::audit::AuditLog::open(config.audit.audit_config()).unwrap();
    let state = Arc::new(State::new(
        Runtime::build(config, 1).unwrap(),
        None,
        audit,
        false,
    ));
    let app =
        wardend::gateway::grpc::router(Arc::new(wardend::gateway::InProcess::new(state.clone())));

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki_dir.join("ca.pem")).unwrap())
        .unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .unwrap();
    let chain = CertificateDer::pem_file_iter(pki_dir.join("issued/gw.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_file(pki_dir.join("issued/gw.key")).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                let cert = CertIdentity {
                    id: warden_pki::client_identity(&peer).unwrap().to_hex(),
                    cn: None,
                    sans: Vec::new(),
                };
                let svc =
                    hyper_util::service::TowerToHyperService::new(app.layer(axum::Extension(cert)));
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
            });
        }
    });
    (state, url)
}

/// `warden jobs ARGS…` against the remote `url` with `who`'s certificate from `pki_dir`.
fn remote_cmd(url: &str, pki_dir: &Path, who: &str, args: &[&str]) -> Command {
    let mut c = warden();
    c.arg("jobs")
        .args(args)
        .env("WARDEN_REMOTE", url)
        .env("WARDEN_CA", pki_dir.join("ca.pem"))
        .env(
            "WARDEN_CLIENT_CERT",
            pki_dir.join(format!("issued/{who}.pem")),
        )
        .env(
            "WARDEN_CLIENT_KEY",
            pki_dir.join(format!("issued/{who}.key")),
        );
    c
}

async fn remote(url: &str, pki_dir: &Path, who: &str, args: &[&str]) -> Output {
    let mut c = remote_cmd(url, pki_dir, who, args);
    tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap()
}

/// `exec` interrupted by SIGINT once the job's first line is out: its exit code and stderr.
async fn interrupted_exec(url: &str, pki_dir: &Path, rm: bool) -> (Option<i32>, String) {
    let mut args = vec!["exec"];
    if rm {
        args.push("--rm");
    }
    args.extend(["--", "sh", "-c", "echo started; sleep 100"]);
    let mut c = remote_cmd(url, pki_dir, "alice", &args);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || {
        let mut child = c.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "started\n");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remote_jobs_commands_go_through_mutual_tls_as_the_certificate() {
    let name = "remote_jobs_commands_go_through_mutual_tls_as_the_certificate";
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED {name}: needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki_dir: PathBuf = tmp.path().join("pki");
    pki(&pki_dir, &["init"]);
    pki(&pki_dir, &["issue", "server", "gw", "--san", "127.0.0.1"]);
    pki(&pki_dir, &["issue", "client", "alice"]);
    pki(&pki_dir, &["issue", "client", "bob"]);
    let other = tmp.path().join("other-pki");
    pki(&other, &["init"]);
    pki(&other, &["issue", "client", "alice"]);
    let state_dir = tmp.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    let prefix = format!("warden-grpc-remote-{}", std::process::id());
    let (_state, url) = serve(&state_dir, &pki_dir, &prefix).await;

    // exec streams both outputs and exits with the job's code.
    let out = remote(
        &url,
        &pki_dir,
        "alice",
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "printf out; printf err >&2; exit 7",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(out.stdout, b"out");
    assert_eq!(out.stderr, b"err");

    // A detached job: listed and stoppable by its certificate only.
    let out = remote(
        &url,
        &pki_dir,
        "alice",
        &[
            "exec",
            "--detach",
            "--",
            "sh",
            "-c",
            "trap 'exit 5' TERM; sleep 100 & wait",
        ],
    )
    .await;
    let id = ok(&out).trim().to_string();
    let list: serde_json::Value =
        serde_json::from_str(&ok(
            &remote(&url, &pki_dir, "alice", &["list", "--json"]).await
        ))
        .unwrap();
    let mine = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id.as_str())
        .expect("the detached job is listed")
        .clone();
    assert!(mine["owner"].as_str().unwrap().starts_with("cert:"));
    assert_eq!(mine["state"], "running");
    let theirs = ok(&remote(&url, &pki_dir, "bob", &["list"]).await);
    assert!(!theirs.contains(&id), "{theirs}");
    let out = remote(&url, &pki_dir, "bob", &["stop", &id]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"),
        "{out:?}"
    );
    let out = ok(&remote(&url, &pki_dir, "alice", &["stop", &id]).await);
    assert_eq!(out.trim(), format!("{id}: exited 5"));
    let out = remote(&url, &pki_dir, "alice", &["attach", &id]).await;
    assert_eq!(out.status.code(), Some(5), "{out:?}");

    // Ctrl-C detaches and leaves the job running; with --rm it stops the job.
    let (code, err) = interrupted_exec(&url, &pki_dir, false).await;
    assert_eq!(code, Some(130), "{err}");
    let id = err
        .split("detached; job ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no job id in {err:?}"))
        .to_string();
    let status = ok(&remote(&url, &pki_dir, "alice", &["status", "--json", &id]).await);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["state"], "running", "{status}");
    ok(&remote(&url, &pki_dir, "alice", &["stop", &id]).await);
    let (_, err) = interrupted_exec(&url, &pki_dir, true).await;
    assert!(err.contains(" stopped: "), "{err}");
    let list = ok(&remote(&url, &pki_dir, "alice", &["list"]).await);
    assert!(!list.contains("running"), "{list}");

    // A client certificate of another CA is refused by the server, a server certificate of
    // another CA by the client: nothing is listed either way.
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir_all(foreign.join("issued")).unwrap();
    std::fs::copy(pki_dir.join("ca.pem"), foreign.join("ca.pem")).unwrap();
    for f in ["alice.pem", "alice.key"] {
        std::fs::copy(other.join("issued").join(f), foreign.join("issued").join(f)).unwrap();
    }
    let out = remote(&url, &foreign, "alice", &["list"]).await;
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty());
    let out = remote(&url, &other, "alice", &["list"]).await;
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid peer certificate"),
        "{out:?}"
    );
    // --remote without the rest of mutual TLS is a usage error naming what is missing.
    let out = warden()
        .args(["jobs", "list", "--remote", &url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ca"),
        "{out:?}"
    );
    let left = warden_exec::CgroupManager::detect(warden_exec::ManagerOptions {
        prefix,
        use_v1: true,
        use_v2: true,
    })
    .unwrap()
    .existing_job_dirs();
    assert!(left.is_empty(), "{left:?}");
}
