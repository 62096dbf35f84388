//! Crash safety of the served store: `secrets.set` in a loop against the real daemon, killed
//! with SIGKILL at a random moment, 200 times. After every restart the store opens and unseals,
//! and every write the daemon acknowledged is there.

mod common;
use common::*;
use rand::Rng;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const ROUNDS: usize = 200;
/// Keys overwritten again and again (their dead versions make the store compact now and then).
const HOT: usize = 4;

/// A length-prefixed client that reports a dead daemon instead of panicking.
struct Conn(UnixStream);

impl Conn {
    fn open(path: &Path) -> Conn {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Conn(s)
    }

    fn call(&mut self, v: &Value) -> std::io::Result<Value> {
        let body = serde_json::to_vec(v).unwrap();
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        self.0.write_all(&frame)?;
        let mut len = [0u8; 4];
        self.0.read_exact(&mut len)?;
        let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
        self.0.read_exact(&mut buf)?;
        serde_json::from_slice(&buf).map_err(std::io::Error::other)
    }
}

fn login(c: &mut Conn) -> String {
    let r = c.call(&json!({"action": "auth"})).unwrap();
    r["data"]["token"].as_str().unwrap().to_string()
}

fn get(c: &mut Conn, token: &str, key: &str) -> Value {
    let r = c
        .call(&json!({"action": "secrets.get", "token": token, "params": {"key": key}}))
        .unwrap();
    assert_eq!(r["status"], "ok", "{key}: {r}");
    r["data"].clone()
}

#[test]
fn every_acknowledged_set_survives_sigkill_at_random_moments() {
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &base_config(&format!(
            "{ROOT_ADMIN}\n[secrets]\ndir = \"{{dir}}/secrets\"\nkdf_memory = \"64KiB\"\nkdf_passes = 1\n\n[rate_limits]\nauth = \"off\"\nsecrets = \"off\"\n"
        )),
    );
    let pw = init_store(dir.path(), "crash test");
    let args = ["--master-password-file", pw.to_str().unwrap()];

    let mut rng = rand::thread_rng();
    // Acknowledged writes of unique keys: key -> value.
    let mut acked: Vec<(String, String)> = Vec::new();
    let mut checked = 0;
    // Hot keys: the last acknowledged (version, value), and the write in flight at the kill.
    let mut hot: HashMap<String, (u64, String)> = HashMap::new();
    let mut in_flight: HashMap<String, String> = HashMap::new();
    let mut kills_during_writes = 0;
    for round in 0..ROUNDS {
        // The store opens (and unseals) after every crash, or this panics.
        let mut d = Daemon::configured_at(dir.path(), &args);
        let mut c = Conn::open(&d.socket());
        let token = login(&mut c);
        for (k, v) in &acked[checked..] {
            assert_eq!(
                get(&mut c, &token, k)["value"],
                v.as_str(),
                "round {round}: {k}"
            );
        }
        checked = acked.len();
        for (k, (ver, val)) in &hot {
            let now = get(&mut c, &token, k);
            let got = now["version"].as_u64().unwrap();
            assert!(
                got >= *ver,
                "round {round}: {k} went back from {ver} to {got}"
            );
            if got == *ver {
                assert_eq!(now["value"], val.as_str(), "round {round}: {k}");
            } else {
                assert_eq!(got, ver + 1, "round {round}: {k}");
                assert_eq!(now["value"], in_flight[k].as_str(), "round {round}: {k}");
            }
        }
        // Re-base the hot keys on what survived.
        for k in hot.keys().cloned().collect::<Vec<_>>() {
            let now = get(&mut c, &token, &k);
            hot.insert(
                k,
                (
                    now["version"].as_u64().unwrap(),
                    now["value"].as_str().unwrap().to_string(),
                ),
            );
        }
        in_flight.clear();

        let pid = d.pid();
        let delay = Duration::from_micros(rng.gen_range(0..15_000));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        });
        for i in 0.. {
            let (key, value) = if i % 3 == 2 {
                let k = format!("hot{}", rng.gen_range(0..HOT));
                (k, format!("hot-r{round}-i{i}-{:08x}", rng.gen::<u32>()))
            } else {
                (
                    format!("k{round}-{i}"),
                    format!("v-r{round}-i{i}-{:08x}", rng.gen::<u32>()),
                )
            };
            if key.starts_with("hot") {
                in_flight.insert(key.clone(), value.clone());
            }
            let r = c.call(&json!({"action": "secrets.set", "token": token, "params": {"key": key, "value": value}}));
            match r {
                Ok(r) => {
                    assert_eq!(r["status"], "ok", "{r}");
                    let version = r["data"]["version"].as_u64().unwrap();
                    if key.starts_with("hot") {
                        in_flight.remove(&key);
                        hot.insert(key, (version, value));
                    } else {
                        acked.push((key, value));
                    }
                }
                Err(_) => {
                    kills_during_writes += usize::from(i > 0);
                    break;
                }
            }
        }
        killer.join().unwrap();
        let status = d.wait(Duration::from_secs(10)).expect("the daemon died");
        assert!(!status.success(), "round {round}: {status:?}");
    }
    // Everything acknowledged over all rounds is there at the end.
    let d = Daemon::configured_at(dir.path(), &args);
    let mut c = Conn::open(&d.socket());
    let token = login(&mut c);
    for chunk in acked.chunks(500) {
        let keys: Vec<&str> = chunk.iter().map(|(k, _)| k.as_str()).collect();
        let r = c
            .call(&json!({"action": "get_secrets", "token": token, "params": {"keys": keys}}))
            .unwrap();
        assert_eq!(r["data"]["missing"], json!([]), "{r}");
        for (k, v) in chunk {
            assert_eq!(r["data"]["secrets"][k], v.as_str(), "{k}");
        }
    }
    let r = c.call(&json!({"action": "health"})).unwrap();
    assert_eq!(r["data"]["sealed"], false);
    assert!(
        acked.len() > ROUNDS,
        "too few writes were acknowledged to prove anything: {}",
        acked.len()
    );
    assert!(
        kills_during_writes > ROUNDS / 2,
        "the kill rarely landed during writes: {kills_during_writes}"
    );
    eprintln!(
        "{} acknowledged writes over {ROUNDS} kills ({kills_during_writes} during writes), {} bytes of log",
        acked.len(),
        std::fs::metadata(dir.path().join("secrets/secrets.log")).map(|m| m.len()).unwrap_or(0)
    );
}
