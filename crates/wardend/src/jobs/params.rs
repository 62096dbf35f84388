//! What a client may ask of a job, checked: the command, its environment and directory, its
//! limits (against the caller's caps) and whether it gets a network.
//!
//! `jobs.start` params (unknown keys are refused):
//!
//! ```json
//! {"command": ["sh", "-c", "echo hi"], "env": {"LANG": "C.UTF-8"}, "cwd": "/tmp",
//!  "limits": {"cpu": 0.5, "memory": 268435456, "pids": 64,
//!             "io": [{"device": "8:0", "read_bps": 10485760}]},
//!  "network": false}
//! ```

use crate::config::JobsSection;
use crate::units::parse_size;
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::Duration;
use warden_exec::{CpuLimit, DeviceNumber, IoLimit, Limits};
use warden_wire::reply::{ErrorBody, ErrorCode};

const MAX_ARGS: usize = 4096;
const MAX_ARG_LEN: usize = 128 << 10;
const MAX_ENV: usize = 1024;

/// The most a caller may ask for; `None`: no cap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Caps {
    pub cpu: Option<f64>,
    pub memory: Option<u64>,
    pub pids: Option<u64>,
}

fn cap_f(v: f64) -> Option<f64> {
    (v > 0.0).then_some(v)
}

fn cap_u(v: u64) -> Option<u64> {
    (v > 0).then_some(v)
}

/// The more generous of two caps (no cap beats any).
fn wider<T: PartialOrd>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if a >= b { a } else { b }),
        _ => None,
    }
}

impl Caps {
    /// The caps for a holder of `roles`: the most generous among the roles that have a
    /// `[jobs.roles.NAME]` entry (each key it leaves out is the `[jobs]` cap), else `[jobs]`'s.
    pub fn for_roles(cfg: &JobsSection, roles: &[&str]) -> Caps {
        let global = Caps {
            cpu: cap_f(cfg.max_cpu),
            memory: cap_u(cfg.max_memory.0),
            pids: cap_u(cfg.max_pids),
        };
        let mut out: Option<Caps> = None;
        for r in roles {
            let Some(c) = cfg.roles.get(*r) else { continue };
            let this = Caps {
                cpu: c.max_cpu.map_or(global.cpu, cap_f),
                memory: c.max_memory.map_or(global.memory, |m| cap_u(m.0)),
                pids: c.max_pids.map_or(global.pids, cap_u),
            };
            out = Some(match out {
                None => this,
                Some(o) => Caps {
                    cpu: wider(o.cpu, this.cpu),
                    memory: wider(o.memory, this.memory),
                    pids: wider(o.pids, this.pids),
                },
            });
        }
        out.unwrap_or(global)
    }
}

/// A checked `jobs.start` request.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub limits: Limits,
    /// `false`: a new network namespace with only `lo`.
    pub network: bool,
}

fn bad(msg: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::ValidationError, msg)
}

fn over(what: &str, asked: String, cap: String) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::AccessDenied,
        format!("{what} {asked} is more than your cap of {cap} (jobs.max_{what}, or your role's in [jobs.roles])"),
    )
}

fn string(v: &Value, what: &str) -> Result<String, ErrorBody> {
    let s = v
        .as_str()
        .ok_or_else(|| bad(format!("{what} must be a string")))?;
    if s.contains('\0') {
        return Err(bad(format!("{what} contains a NUL byte")));
    }
    if s.len() > MAX_ARG_LEN {
        return Err(bad(format!("{what} is longer than {MAX_ARG_LEN} bytes")));
    }
    Ok(s.to_string())
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, ErrorBody> {
    v.as_object()
        .ok_or_else(|| bad(format!("{what} must be an object")))
}

fn only(m: &Map<String, Value>, what: &str, keys: &[&str]) -> Result<(), ErrorBody> {
    match m.keys().find(|k| !keys.contains(&k.as_str())) {
        Some(k) => Err(bad(format!(
            "unknown {what} key `{}`: expected one of {}",
            k.chars().take(64).collect::<String>(),
            keys.join(", ")
        ))),
        None => Ok(()),
    }
}

/// A positive integer, or a size string such as `"256M"` where `size`.
fn count(v: &Value, what: &str, size: bool) -> Result<u64, ErrorBody> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) if size => parse_size(s).ok(),
        _ => None,
    };
    n.filter(|n| *n > 0).ok_or_else(|| {
        bad(format!(
            "{what} must be a positive integer{}",
            if size {
                " or a size such as \"256MiB\""
            } else {
                ""
            }
        ))
    })
}

/// `"MAJOR:MINOR"` of a block device.
fn device(v: &Value) -> Result<DeviceNumber, ErrorBody> {
    let s = v.as_str().unwrap_or("");
    let parsed = s
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    match parsed {
        Some((major, minor)) => Ok(DeviceNumber { major, minor }),
        None => Err(bad(
            "limits.io[].device must be \"MAJOR:MINOR\" of a block device (e.g. \"8:0\")",
        )),
    }
}

fn limits(v: Option<&Value>, caps: &Caps) -> Result<Limits, ErrorBody> {
    let empty = Map::new();
    let m = match v {
        None | Some(Value::Null) => &empty,
        Some(v) => object(v, "limits")?,
    };
    only(m, "limits", &["cpu", "memory", "pids", "io"])?;
    let mut l = Limits::default();
    let cpu = match m.get("cpu") {
        None => caps.cpu,
        Some(v) => {
            let c = v
                .as_f64()
                .filter(|c| c.is_finite() && *c >= 0.01 && *c <= 4096.0)
                .ok_or_else(|| bad("limits.cpu must be a number of CPUs from 0.01 to 4096"))?;
            if let Some(cap) = caps.cpu.filter(|cap| c > *cap) {
                return Err(over("cpu", c.to_string(), cap.to_string()));
            }
            Some(c)
        }
    };
    l.cpu = cpu.map(|c| {
        // At most 1 s periods; more than one CPU per 100 ms period is fine (quota > period).
        let period = Duration::from_millis(100);
        CpuLimit {
            quota: period.mul_f64(c).max(Duration::from_millis(1)),
            period,
        }
    });
    l.memory_max = match m.get("memory") {
        None => caps.memory,
        Some(v) => {
            let n = count(v, "limits.memory", true)?;
            if n < 1 << 20 {
                return Err(bad("limits.memory must be at least 1MiB"));
            }
            if let Some(cap) = caps.memory.filter(|cap| n > *cap) {
                return Err(over("memory", n.to_string(), cap.to_string()));
            }
            Some(n)
        }
    };
    l.pids_max = match m.get("pids") {
        None => caps.pids,
        Some(v) => {
            let n = count(v, "limits.pids", false)?;
            if let Some(cap) = caps.pids.filter(|cap| n > *cap) {
                return Err(over("pids", n.to_string(), cap.to_string()));
            }
            Some(n)
        }
    };
    if let Some(io) = m.get("io") {
        let list = io.as_array().ok_or_else(|| {
            bad("limits.io must be a list of {device, read_bps, write_bps, read_iops, write_iops}")
        })?;
        if list.len() > 64 {
            return Err(bad("limits.io has more than 64 devices"));
        }
        for d in list {
            let o = object(d, "limits.io[]")?;
            only(
                o,
                "limits.io[]",
                &["device", "read_bps", "write_bps", "read_iops", "write_iops"],
            )?;
            let get = |k: &str| -> Result<Option<u64>, ErrorBody> {
                o.get(k)
                    .map(|v| count(v, &format!("limits.io[].{k}"), k.ends_with("bps")))
                    .transpose()
            };
            let lim = IoLimit {
                device: device(o.get("device").unwrap_or(&Value::Null))?,
                read_bps: get("read_bps")?,
                write_bps: get("write_bps")?,
                read_iops: get("read_iops")?,
                write_iops: get("write_iops")?,
            };
            if lim.read_bps.is_none()
                && lim.write_bps.is_none()
                && lim.read_iops.is_none()
                && lim.write_iops.is_none()
            {
                return Err(bad(format!("limits.io for {} sets no limit", lim.device)));
            }
            l.io.push(lim);
        }
    }
    Ok(l)
}

/// Checks `jobs.start` params against the caller's caps.
pub fn parse_start(params: &Value, caps: &Caps) -> Result<StartRequest, ErrorBody> {
    let m = object(params, "params")?;
    only(m, "params", &["command", "env", "cwd", "limits", "network"])?;
    let argv = m
        .get("command")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| bad("`command` must be a non-empty list of strings: [program, args…]"))?;
    if argv.len() > MAX_ARGS {
        return Err(bad(format!("`command` has more than {MAX_ARGS} arguments")));
    }
    let command = argv
        .iter()
        .map(|a| string(a, "a `command` argument"))
        .collect::<Result<Vec<_>, _>>()?;
    if command[0].is_empty() {
        return Err(bad("the program name is empty"));
    }
    let mut env = Vec::new();
    if let Some(e) = m.get("env") {
        let e = object(e, "`env`")?;
        if e.len() > MAX_ENV {
            return Err(bad(format!("`env` has more than {MAX_ENV} variables")));
        }
        for (k, v) in e {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(bad("an `env` name is empty or contains `=` or NUL"));
            }
            env.push((k.clone(), string(v, "an `env` value")?));
        }
    }
    let cwd = match m.get("cwd") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let p = PathBuf::from(string(v, "`cwd`")?);
            if !p.is_absolute() {
                return Err(bad("`cwd` must be an absolute path"));
            }
            Some(p)
        }
    };
    let network = match m.get("network") {
        None => true,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| bad("`network` must be true or false"))?,
    };
    Ok(StartRequest {
        command,
        env,
        cwd,
        limits: limits(m.get("limits"), caps)?,
        network,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::JobCaps;
    use crate::units::ByteSize;
    use serde_json::json;

    fn caps() -> Caps {
        Caps {
            cpu: Some(1.0),
            memory: Some(1 << 30),
            pids: Some(100),
        }
    }

    #[test]
    fn a_job_that_asks_for_nothing_gets_the_caps() {
        let r = parse_start(&json!({"command": ["true"]}), &caps()).unwrap();
        assert_eq!(r.limits.memory_max, Some(1 << 30));
        assert_eq!(r.limits.pids_max, Some(100));
        assert_eq!(r.limits.cpu, Some(CpuLimit::cores(1.0)));
        assert!(r.network);
    }

    #[test]
    fn asking_for_more_than_the_cap_is_denied_and_less_is_kept() {
        for (limits, what) in [
            (json!({"cpu": 1.5}), "cpu"),
            (json!({"memory": "2GiB"}), "memory"),
            (json!({"pids": 101}), "pids"),
        ] {
            let e = parse_start(&json!({"command": ["x"], "limits": limits}), &caps()).unwrap_err();
            assert_eq!(e.code, ErrorCode::AccessDenied, "{what}");
            assert!(e.message.starts_with(what), "{}", e.message);
        }
        let r = parse_start(
            &json!({"command": ["x"], "limits": {"cpu": 0.2, "memory": "256M", "pids": 8,
                "io": [{"device": "8:0", "read_bps": "1M", "write_iops": 5}]}, "network": false}),
            &caps(),
        )
        .unwrap();
        assert_eq!(r.limits.cpu, Some(CpuLimit::cores(0.2)));
        assert_eq!(r.limits.memory_max, Some(256 << 20));
        assert_eq!(r.limits.pids_max, Some(8));
        assert_eq!(r.limits.io[0].read_bps, Some(1 << 20));
        assert_eq!(r.limits.io[0].write_iops, Some(5));
        assert!(!r.network);
    }

    #[test]
    fn malformed_requests_are_refused_with_what_was_expected() {
        for p in [
            json!({}),
            json!({"command": []}),
            json!({"command": "ls"}),
            json!({"command": ["a\u{0}b"]}),
            json!({"command": ["ls"], "cwd": "relative"}),
            json!({"command": ["ls"], "env": {"A=B": "x"}}),
            json!({"command": ["ls"], "limits": {"cpu": -1}}),
            json!({"command": ["ls"], "limits": {"memory": 5}}),
            json!({"command": ["ls"], "limits": {"io": [{"device": "/dev/sda", "read_bps": 1}]}}),
            json!({"command": ["ls"], "limits": {"io": [{"device": "8:0"}]}}),
            json!({"command": ["ls"], "limits": {"swap": 1}}),
            json!({"command": ["ls"], "extra": 1}),
        ] {
            let e = parse_start(&p, &caps()).unwrap_err();
            assert_eq!(e.code, ErrorCode::ValidationError, "{p}");
        }
    }

    #[test]
    fn the_most_generous_role_cap_wins_and_zero_means_no_cap() {
        let mut cfg = JobsSection {
            max_cpu: 1.0,
            max_memory: ByteSize(1 << 30),
            max_pids: 100,
            ..Default::default()
        };
        cfg.roles.insert(
            "big".into(),
            JobCaps {
                max_cpu: Some(4.0),
                max_memory: None,
                max_pids: Some(0),
            },
        );
        cfg.roles.insert(
            "small".into(),
            JobCaps {
                max_cpu: Some(0.5),
                max_memory: Some(ByteSize(2 << 30)),
                max_pids: Some(10),
            },
        );
        assert_eq!(
            Caps::for_roles(&cfg, &["other"]),
            Caps {
                cpu: Some(1.0),
                memory: Some(1 << 30),
                pids: Some(100)
            }
        );
        assert_eq!(
            Caps::for_roles(&cfg, &["small"]),
            Caps {
                cpu: Some(0.5),
                memory: Some(2 << 30),
                pids: Some(10)
            }
        );
        assert_eq!(
            Caps::for_roles(&cfg, &["big", "small"]),
            Caps {
                cpu: Some(4.0),
                memory: Some(2 << 30),
                pids: None
            }
        );
    }
}
