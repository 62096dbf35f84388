//! The gRPC API end to end: a real daemon `State` (audit log, policy, secret store, job service
//! with real cgroups) behind the real gRPC router, served over plaintext HTTP/2 on 127.0.0.1,
//! called by tonic clients.
//!
//! The TLS layer is not here: each listener instead inserts one fixed certificate identity into
//! every request's extensions (the tower layer `axum::Extension`), as the TLS layer does with
//! the verified client certificate. That layer exists only in this test. One listener has no
//! layer at all: its callers have no identity.
//!
//! Job tests need root and cgroups; on a host without them they print `SKIPPED <test>: <why>`
//! and return.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;
use wardend::config::Config;
use wardend::gateway::grpc::pb::{
    self, attach_event::Event, jobs_client::JobsClient, secrets_client::SecretsClient,
    system_client::SystemClient,
};
use wardend::gateway::grpc::{router, CODE_METADATA};
use wardend::gateway::InProcess;
use wardend::identity::CertIdentity;
use wardend::server::state::{Runtime, State};

macro_rules! skip {
    ($name:expr, $($reason:tt)*) => {{
        eprintln!("SKIPPED {}: {}", $name, format!($($reason)*));
        return;
    }};
}

fn cert(cn: &str) -> CertIdentity {
    // An id of the shape `warden_pki::client_identity` gives: 64 hex digits.
    use sha2::Digest;
    CertIdentity {
        id: hex::encode(sha2::Sha256::digest(cn.as_bytes())),
        cn: Some(cn.to_string()),
        sans: Vec::new(),
    }
}

const POLICY: &str = r#"
[policy.roles.runner]
allow = ["jobs:run", "jobs:list", "jobs:status", "jobs:attach", "jobs:stop",
         "secrets:read:app_*", "secrets:write:app_*", "secrets:watch"]

[policy.roles.reader]
allow = ["jobs:run", "jobs:list", "jobs:status", "jobs:attach", "jobs:stop",
         "secrets:read:shared_*"]

[[policy.rules]]
cert_cn = "alice"
roles = ["runner"]

[[policy.rules]]
cert_cn = "bob"
roles = ["reader"]
"#;

/// A daemon state in a temp dir, its gRPC router served on three loopback ports: as `alice`,
/// as `bob` and without identity (`mallory` matches no policy rule).
struct Harness {
    _dir: tempfile::TempDir,
    state: Arc<State>,
    prefix: String,
    alice: String,
    bob: String,
    mallory: String,
    anonymous: String,
}

impl Harness {
    async fn new(name: &str, jobs: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let prefix = format!("warden-grpc-{name}-{}", std::process::id());
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
kdf_memory = "8MiB"
kdf_passes = 1

[jobs]
cgroup_prefix = "{prefix}"
spill_dir = "{d}/spill"
stop_grace = "2s"
{jobs}
{POLICY}"#,
            d = d.display()
        );
        wardend::auth::generate_key_file(&d.join("hmac.key")).unwrap();
        let config = Config::parse(&text, &d.join("warden.toml")).unwrap();
        let master = d.join("master");
        wardend::auth::generate_key_file(&master).unwrap();
        let password = wardend::server::secrets::read_password_file(&master).unwrap();
        wardend::secrets::SecretStore::init(&config.secrets.store_config(), &password).unwrap();
        let audit = wardend::audit::AuditLog::open(config.audit.audit_config()).unwrap();
        let runtime = Runtime::build(config, 1).unwrap();
        let state = Arc::new(State::new(runtime, None, audit, false));
        wardend::server::secrets::start(&state.secrets, Some(&master))
            .await
            .unwrap();

        let app = router(Arc::new(InProcess::new(state.clone())));
        let serve = |layer: Option<CertIdentity>| {
            let app = app.clone();
            async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let url = format!("http://{}", l.local_addr().unwrap());
                let app = match layer {
                    Some(c) => app.layer(axum::Extension(c)),
                    None => app,
                };
                tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
                url
            }
        };
        Harness {
            alice: serve(Some(cert("alice"))).await,
            bob: serve(Some(cert("bob"))).await,
            mallory: serve(Some(cert("mallory"))).await,
            anonymous: serve(None).await,
            state,
            prefix,
            _dir: dir,
        }
    }

    fn cgroups_left(&self) -> Vec<PathBuf> {
        warden_exec::CgroupManager::detect(warden_exec::ManagerOptions {
            prefix: self.prefix.clone(),
            use_v1: true,
            use_v2: true,
        })
        .unwrap()
        .existing_job_dirs()
    }
}

/// A new HTTP/2 connection to `url`.
async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn jobs(url: &str) -> JobsClient<Channel> {
    JobsClient::new(channel(url).await)
}

async fn secrets(url: &str) -> SecretsClient<Channel> {
    SecretsClient::new(channel(url).await)
}

/// The status's code and its warden code (metadata), checked against the message.
fn code_of(s: &tonic::Status) -> (Code, String) {
    let w = s
        .metadata()
        .get(CODE_METADATA)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    if !w.is_empty() {
        assert!(s.message().starts_with(&format!("{w}: ")), "{s:?}");
    }
    (s.code(), w)
}

fn jobs_possible(name: &str) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some(format!("{name} needs root"));
    }
    match warden_exec::CgroupManager::detect(warden_exec::ManagerOptions {
        prefix: "warden-grpc-probe".into(),
        use_v1: true,
        use_v2: true,
    }) {
        Ok(_) => None,
        Err(e) => Some(format!("no cgroups: {e}")),
    }
}

fn sh(script: &str) -> pb::StartRequest {
    pb::StartRequest {
        command: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

/// Everything an attach stream gave: stdout, stderr, and its end; output offsets must be
/// contiguous from `from`.
struct Attached {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    end: pb::AttachEnd,
}

async fn attach_all(c: &mut JobsClient<Channel>, id: &str, from: u64) -> Attached {
    let mut s = c
        .attach(pb::AttachRequest {
            id: id.into(),
            from,
            follow: Some(true),
        })
        .await
        .unwrap()
        .into_inner();
    let (mut stdout, mut stderr, mut at) = (Vec::new(), Vec::new(), from);
    while let Some(ev) = s.message().await.unwrap() {
        match ev.event.unwrap() {
            Event::Output(o) => {
                assert_eq!(o.offset, at, "output is contiguous");
                at += o.data.len() as u64;
                match pb::Stream::try_from(o.stream).unwrap() {
                    pb::Stream::Stdout => stdout.extend_from_slice(&o.data),
                    pb::Stream::Stderr => stderr.extend_from_slice(&o.data),
                    pb::Stream::Unspecified => panic!("output without its stream"),
                }
            }
            Event::Dropped(d) => panic!("nothing should be dropped here: {d:?}"),
            Event::End(end) => {
                assert_eq!(end.end, at, "the end is after the last byte sent");
                assert!(
                    s.message().await.unwrap().is_none(),
                    "end is the last event"
                );
                return Attached {
                    stdout,
                    stderr,
                    end,
                };
            }
        }
    }
    panic!("the stream ended without its end event")
}

fn ended(j: &pb::Job) -> bool {
    j.state == pb::State::Ended as i32
}

async fn wait_ended(c: &mut JobsClient<Channel>, id: &str) -> pb::Job {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = c
            .status(pb::StatusRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if ended(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "the job did not end: {j:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A 0644 file in a 0755 directory under /tmp with every byte value, readable by the job's
/// user (`nobody`).
fn all_bytes_file() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("warden-grpc-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bytes: Vec<u8> = (0..=255u8).collect();
    let f = dir.path().join("bytes");
    std::fs::write(&f, &bytes).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    (dir, f, bytes)
}

fn nobody() -> u32 {
    nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("a `nobody` user")
        .uid
        .as_raw()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_belong_to_the_certificate_and_stream_every_byte_to_each_of_its_connections() {
    let name = "jobs_belong_to_the_certificate";
    if let Some(why) = jobs_possible(name) {
        skip!(name, "{why}");
    }
    let h = Harness::new("share", "").await;
    let (_tmp, file, bytes) = all_bytes_file();
    let f = file.display();
    let mut a1 = jobs(&h.alice).await;
    let mut a2 = jobs(&h.alice).await;
    let mut bob = jobs(&h.bob).await;

    let job = a1
        .start(sh(&format!(
            "cat {f}; sleep 0.5; cat {f} >&2; id -u >&2; cat {f}"
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.owner, format!("cert:{}", cert("alice").id));
    assert_eq!(job.command[0], "sh");
    let id = job.id.clone();

    // Both connections of the certificate follow the same job, concurrently.
    let (x, y) = tokio::join!(attach_all(&mut a1, &id, 0), attach_all(&mut a2, &id, 0));
    let mut want_out = bytes.clone();
    want_out.extend_from_slice(&bytes);
    let mut want_err = bytes.clone();
    want_err.extend_from_slice(format!("{}\n", nobody()).as_bytes());
    for got in [&x, &y] {
        assert_eq!(got.stdout, want_out, "stdout, every byte value, twice");
        assert_eq!(
            got.stderr, want_err,
            "stderr apart, then the job's uid: nobody"
        );
        assert!(got.end.complete);
        let j = got.end.job.as_ref().unwrap();
        assert!(ended(j), "{j:?}");
        let e = j.end.as_ref().unwrap();
        assert_eq!((e.reason.as_str(), e.exit_code), ("exited", Some(0)));
    }
    assert_eq!(x.end, y.end);

    // Resuming from an offset gives the rest.
    let tail = attach_all(&mut a2, &id, 256).await;
    assert!(tail.stdout.len() + tail.stderr.len() == want_out.len() + want_err.len() - 256);

    // The other connection lists it; another certificate does not see it at all.
    let listed = a2
        .list(pb::ListRequest { all: false })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.iter().any(|j| j.id == id));
    let theirs = bob
        .list(pb::ListRequest { all: false })
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.jobs.iter().all(|j| j.id != id), "{theirs:?}");
    let e = bob
        .status(pb::StatusRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), (Code::NotFound, "NOT_FOUND".into()));
    let e = bob
        .stop(pb::StopRequest {
            id: id.clone(),
            grace: None,
        })
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), (Code::NotFound, "NOT_FOUND".into()));
    let e = bob
        .attach(pb::AttachRequest {
            id: id.clone(),
            from: 0,
            follow: Some(true),
        })
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), (Code::NotFound, "NOT_FOUND".into()));
    // Listing everyone's jobs needs jobs:admin.
    let e = bob.list(pb::ListRequest { all: true }).await.unwrap_err();
    assert_eq!(
        code_of(&e),
        (Code::PermissionDenied, "ACCESS_DENIED".into())
    );
    assert!(h.cgroups_left().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_ends_a_running_job_and_only_its_owner_may() {
    let name = "stop_ends_a_running_job";
    if let Some(why) = jobs_possible(name) {
        skip!(name, "{why}");
    }
    let h = Harness::new("stop", "").await;
    let mut a = jobs(&h.alice).await;
    let mut bob = jobs(&h.bob).await;
    let job = a
        .start(sh("trap 'exit 3' TERM; echo up; sleep 100 & wait"))
        .await
        .unwrap()
        .into_inner();
    assert!(!ended(&job));
    let e = bob
        .stop(pb::StopRequest {
            id: job.id.clone(),
            grace: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // The job is running: a follower sees its first output before it is stopped.
    let mut s = a
        .attach(pb::AttachRequest {
            id: job.id.clone(),
            from: 0,
            follow: None,
        })
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(Event::Output(ref o)) if &o.data[..] == b"up\n"));
    let stopped = a
        .stop(pb::StopRequest {
            id: job.id.clone(),
            grace: Some("5s".into()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ended(&stopped), "{stopped:?}");
    let e = stopped.end.unwrap();
    assert!(e.stop_requested);
    assert_eq!((e.reason.as_str(), e.exit_code), ("exited", Some(3)));
    // The follower's stream ends with the job's end.
    let mut last = None;
    while let Some(ev) = s.message().await.unwrap() {
        last = Some(ev);
    }
    match last.and_then(|e| e.event) {
        Some(Event::End(end)) => {
            assert!(end.complete);
            assert!(ended(end.job.as_ref().unwrap()));
        }
        other => panic!("the stream did not end with the job's end: {other:?}"),
    }
    // Bad requests map to INVALID_ARGUMENT with the warden code.
    let e = a.start(pb::StartRequest::default()).await.unwrap_err();
    assert_eq!(
        code_of(&e),
        (Code::InvalidArgument, "VALIDATION_ERROR".into())
    );
    let e = a
        .stop(pb::StopRequest {
            id: job.id.clone(),
            grace: Some("forever".into()),
        })
        .await
        .unwrap_err();
    assert_eq!(
        code_of(&e),
        (Code::InvalidArgument, "VALIDATION_ERROR".into())
    );
    assert!(h.cgroups_left().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_does_not_read_never_holds_the_job_back_and_misses_nothing() {
    let name = "a_client_that_does_not_read";
    if let Some(why) = jobs_possible(name) {
        skip!(name, "{why}");
    }
    let h = Harness::new("slow", "").await;
    let mut a = jobs(&h.alice).await;
    // About 33 MB: far beyond what the stream queues and HTTP/2 windows hold.
    let n = 4_000_000;
    let job = a
        .start(sh(&format!("seq 1 {n}")))
        .await
        .unwrap()
        .into_inner();
    let mut s = a
        .attach(pb::AttachRequest {
            id: job.id.clone(),
            from: 0,
            follow: Some(true),
        })
        .await
        .unwrap()
        .into_inner();
    // Nothing is read from `s` until the job has ended.
    let mut other = jobs(&h.alice).await;
    let done = wait_ended(&mut other, &job.id).await;
    assert_eq!(done.end.unwrap().exit_code, Some(0));
    let want: String = (1..=n).map(|i| format!("{i}\n")).collect();
    let mut got = Vec::with_capacity(want.len());
    let mut end = None;
    while let Some(ev) = s.message().await.unwrap() {
        match ev.event.unwrap() {
            Event::Output(o) => {
                assert_eq!(o.offset, got.len() as u64);
                got.extend_from_slice(&o.data);
            }
            Event::Dropped(d) => panic!("dropped {d:?}"),
            Event::End(e) => end = Some(e),
        }
    }
    assert_eq!(got.len(), want.len());
    assert!(got == want.as_bytes(), "the output differs");
    let end = end.expect("an end event");
    assert!(end.complete);
    assert_eq!(end.end, want.len() as u64);
    assert!(h.cgroups_left().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_user_decides_who_runs_the_jobs_of_certificate_peers() {
    let h = Harness::new("nouser", "remote_user = \"\"").await;
    let mut a = jobs(&h.alice).await;
    let e = a.start(sh("true")).await.unwrap_err();
    assert_eq!(code_of(&e), (Code::Unavailable, "UNAVAILABLE".into()));
    assert!(e.message().contains("remote_user"), "{e:?}");
    let h = Harness::new("nosuch", "remote_user = \"no-such-user-here\"").await;
    let mut a = jobs(&h.alice).await;
    let e = a.start(sh("true")).await.unwrap_err();
    assert_eq!(code_of(&e), (Code::Unavailable, "UNAVAILABLE".into()));
    assert!(e.message().contains("no-such-user-here"), "{e:?}");

    // Another user: its uid and primary gid run the job, which still belongs to the certificate.
    let name = "remote_user_names_the_jobs_user";
    if let Some(why) = jobs_possible(name) {
        skip!(name, "{why}");
    }
    let Some(user) = nix::unistd::User::from_name("daemon").unwrap() else {
        skip!(name, "no `daemon` user here");
    };
    let h = Harness::new("daemonuser", "remote_user = \"daemon\"").await;
    let mut a = jobs(&h.alice).await;
    let job = a.start(sh("id -u; id -g")).await.unwrap().into_inner();
    assert_eq!(job.owner, format!("cert:{}", cert("alice").id));
    let got = attach_all(&mut a, &job.id, 0).await;
    assert_eq!(
        String::from_utf8(got.stdout).unwrap(),
        format!("{}\n{}\n", user.uid, user.gid)
    );
    assert!(h.cgroups_left().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_follow_the_policy_per_name_and_certificate() {
    let h = Harness::new("secrets", "").await;
    let mut a = secrets(&h.alice).await;
    let mut bob = secrets(&h.bob).await;
    let set = |key: &str, value: &str, expected: Option<u64>| pb::SetSecretRequest {
        key: key.into(),
        value: value.into(),
        expected_version: expected,
    };
    let r = a
        .set(set("app_db", "s3cret ü", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.key.as_str(), r.version), ("app_db", 1));
    let r = a
        .set(set("app_db", "second", Some(1)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.version, 2);
    let e = a.set(set("app_db", "third", Some(1))).await.unwrap_err();
    assert_eq!(code_of(&e), (Code::Aborted, "CONFLICT".into()));
    let got = a
        .get(pb::GetSecretRequest {
            key: "app_db".into(),
            version: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.value.as_str(), got.version), ("second", 2));
    let old = a
        .get(pb::GetSecretRequest {
            key: "app_db".into(),
            version: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.value, "s3cret ü");
    let many = a
        .get_many(pb::GetManyRequest {
            keys: vec!["app_db".into(), "app_none".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        many.secrets.get("app_db").map(String::as_str),
        Some("second")
    );
    assert_eq!(many.missing, vec!["app_none".to_string()]);
    let list = a
        .list(pb::ListSecretsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.entries.len(), 1);
    assert_eq!(
        (list.entries[0].key.as_str(), list.entries[0].version),
        ("app_db", 2)
    );

    // Names outside the caller's grants.
    let e = a.set(set("shared_x", "v", None)).await.unwrap_err();
    assert_eq!(
        code_of(&e),
        (Code::PermissionDenied, "ACCESS_DENIED".into())
    );
    let e = bob
        .get(pb::GetSecretRequest {
            key: "app_db".into(),
            version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        code_of(&e),
        (Code::PermissionDenied, "ACCESS_DENIED".into())
    );
    let e = bob
        .get_many(pb::GetManyRequest {
            keys: vec!["app_db".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let theirs = bob
        .list(pb::ListSecretsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.entries.is_empty(), "{theirs:?}");
    let e = bob
        .delete(pb::DeleteSecretRequest {
            key: "app_db".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let d = a
        .delete(pb::DeleteSecretRequest {
            key: "app_db".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.deleted);
    let e = a
        .get(pb::GetSecretRequest {
            key: "app_db".into(),
            version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), (Code::NotFound, "SECRET_NOT_FOUND".into()));
    let e = a
        .get(pb::GetSecretRequest {
            key: "bad name!".into(),
            version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        code_of(&e),
        (Code::InvalidArgument, "VALIDATION_ERROR".into())
    );
    assert_audited(&h.state, &cert("alice").id);
}

/// The audit log names the certificate and the gateway transport for the calls made.
fn assert_audited(state: &State, id: &str) {
    let path: &Path = &state.runtime().config.audit.path;
    let text = std::fs::read_to_string(path).unwrap();
    let hit = text
        .lines()
        .filter(|l| l.contains(id) && l.contains("secrets.set") && l.contains("gateway"))
        .count();
    assert!(hit >= 3, "secrets.set by the certificate audited: {hit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_identity_is_unauthenticated_and_an_unknown_certificate_is_denied() {
    let h = Harness::new("anon", "").await;
    let mut anon = secrets(&h.anonymous).await;
    let e = anon
        .get(pb::GetSecretRequest {
            key: "app_db".into(),
            version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = JobsClient::new(channel(&h.anonymous).await)
        .list(pb::ListRequest { all: false })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = SystemClient::new(channel(&h.anonymous).await)
        .health(pb::HealthRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // A certificate the policy does not know: refused at authentication.
    let e = secrets(&h.mallory)
        .await
        .list(pb::ListSecretsRequest {})
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), (Code::PermissionDenied, "AUTH_DENIED".into()));

    let health = SystemClient::new(channel(&h.alice).await)
        .health(pb::HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
    assert!(!health.sealed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_streams_each_change_and_needs_its_permission() {
    let h = Harness::new("watch", "").await;
    let mut a = secrets(&h.alice).await;
    let mut events = a
        .watch(pb::WatchRequest {
            heartbeat_seconds: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    let first = events.message().await.unwrap().unwrap();
    assert!(!first.sealed);
    a.set(pb::SetSecretRequest {
        key: "app_watched".into(),
        value: "v1".into(),
        expected_version: None,
    })
    .await
    .unwrap();
    let next = events.message().await.unwrap().unwrap();
    assert!(next.generation > first.generation, "{first:?} -> {next:?}");
    // Nothing changes: the heartbeat repeats the generation.
    let beat = events.message().await.unwrap().unwrap();
    assert_eq!(beat.generation, next.generation);
    drop(events);

    // Bob may read some secrets but not watch the store.
    let mut bob = secrets(&h.bob).await;
    let e = bob
        .watch(pb::WatchRequest {
            heartbeat_seconds: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        code_of(&e),
        (Code::PermissionDenied, "ACCESS_DENIED".into())
    );
    let e = a
        .watch(pb::WatchRequest {
            heartbeat_seconds: Some(0),
        })
        .await
        .unwrap_err();
    assert_eq!(code_of(&e).0, Code::InvalidArgument);
}
