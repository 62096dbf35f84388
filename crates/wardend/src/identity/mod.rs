//! Who is on the other end of a connection.
//!
//! For a local peer, [`Attestor::attest_unix`] asks the kernel (`SO_PEERCRED`, `SO_PEERGROUPS`,
//! `SO_PEERPIDFD`) who connected, reads the process's executable, its hash, its parent chain and
//! its systemd unit from `/proc`, then checks that the process it read is still the one that
//! connected: a pid that was recycled, or a process that exited or exec'd while it was being read,
//! gives [`IdentityError::PeerGone`] instead of a [`Principal`]. Certificate peers are identified
//! by the gateway, which fills [`Principal::cert`].
//!
//! What it deliberately does not do:
//! - trust anything the client *says*: a pid, an executable or a user name in a payload is never
//!   an input here, only the kernel's view of the socket;
//! - decide anything: a [`Principal`] is a description; `policy` turns it into roles;
//! - keep anything unbounded: the only state is a bounded cache of executable hashes, keyed by
//!   inode identity and timestamps so a rewritten file is hashed again.

mod attest;
mod exe;
pub(crate) mod procfs;
mod sys;

pub use attest::{Attestor, MAX_HASHED_EXE_BYTES, MAX_PARENTS};

use serde::Serialize;
use serde_json::{json, Map, Value};
use std::path::PathBuf;

/// How a principal reached warden.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The local Unix socket; identity from the kernel and `/proc`.
    Unix,
    /// Forwarded by the gateway; identity from a verified client certificate.
    Gateway,
}

/// One ancestor of the peer process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParentProcess {
    pub pid: i32,
    /// The ancestor's executable, when `/proc` shows it (kernel threads and exiting processes
    /// have none). A deleted file's " (deleted)" suffix is removed.
    pub exe: Option<PathBuf>,
    /// The kernel's short command name (`/proc/PID/stat`), always present.
    pub comm: String,
}

/// The identity of a certificate peer, filled by the gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CertIdentity {
    /// Hex SHA-256 of the issuer DN (DER) followed by the serial number's contents octets:
    /// `warden_pki::client_identity`, defined exactly in docs/pki.md.
    pub id: String,
    pub cn: Option<String>,
    pub sans: Vec<String>,
}

/// Everything warden knows about a caller. Built by [`Attestor`] (local peers) or the gateway
/// (certificate peers), never from what a client claims.
#[derive(Clone, Debug, Serialize)]
pub struct Principal {
    pub uid: u32,
    pub gid: u32,
    /// `None` when the kernel gave no pid (a peer in a pid namespace warden cannot see).
    pub pid: Option<i32>,
    /// Supplementary groups: from `SO_PEERGROUPS` (as they were at connect time), else from
    /// `/proc/PID/status`.
    pub groups: Vec<u32>,
    pub user: Option<String>,
    /// Names of the primary group, then of the supplementary groups that have one.
    pub group_names: Vec<String>,
    /// The executable the process runs (`/proc/PID/exe`), without a " (deleted)" suffix.
    pub exe: Option<PathBuf>,
    /// The executable was deleted or replaced on disk after the process started it.
    pub exe_deleted: bool,
    /// Hex SHA-256 of the executable's content (`None` when it could not be read or is too large).
    pub exe_sha256: Option<String>,
    /// Parent, grandparent, … up to pid 1, at most [`MAX_PARENTS`].
    pub parents: Vec<ParentProcess>,
    /// The cgroup path (the v2 one, else the v1 `name=systemd` one).
    pub cgroup: Option<String>,
    /// The systemd unit (`*.service` or `*.scope`) the cgroup path names, if any.
    pub unit: Option<String>,
    pub cert: Option<CertIdentity>,
    pub transport: Transport,
}

impl Principal {
    /// The key tokens, rate limits and audit use: `cert:<id>` for a certificate peer, `uid:<uid>`
    /// otherwise. Two connections of the same user share one key on purpose: a user's limits
    /// cannot be escaped by opening more connections.
    pub fn key(&self) -> String {
        match &self.cert {
            Some(cert) => format!("cert:{}", cert.id),
            None => format!("uid:{}", self.uid),
        }
    }

    /// A compact summary for the audit log; absent facts are left out rather than written as null.
    pub fn audit_json(&self) -> Value {
        let mut m = Map::new();
        if self.transport == Transport::Unix {
            m.insert("uid".into(), json!(self.uid));
            m.insert("gid".into(), json!(self.gid));
        } else {
            m.insert("transport".into(), json!(self.transport));
        }
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        };
        put("pid", self.pid.map(Value::from));
        put("user", self.user.clone().map(Value::from));
        put(
            "exe",
            self.exe
                .as_ref()
                .map(|e| Value::from(e.to_string_lossy().into_owned())),
        );
        put(
            "exe_sha256",
            self.exe_sha256
                .as_ref()
                .map(|h| Value::from(h.get(..16).unwrap_or(h))),
        );
        put("unit", self.unit.clone().map(Value::from));
        put(
            "cert",
            self.cert
                .as_ref()
                .map(|c| json!({ "id": c.id, "cn": c.cn })),
        );
        Value::Object(m)
    }

    /// A principal with only a uid and gid: no process, no names. For tests and internal callers.
    pub fn synthetic(uid: u32, gid: u32) -> Principal {
        Principal {
            uid,
            gid,
            pid: None,
            groups: Vec::new(),
            user: None,
            group_names: Vec::new(),
            exe: None,
            exe_deleted: false,
            exe_sha256: None,
            parents: Vec::new(),
            cgroup: None,
            unit: None,
            cert: None,
            transport: Transport::Unix,
        }
    }
}

/// Why a peer could not be identified.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The process exited, was replaced (its pid recycled) or exec'd another program while it
    /// was being identified. Nothing about it can be trusted; the connection should be closed.
    #[error("peer process {pid} exited or was replaced while it was being identified; the client should reconnect")]
    PeerGone { pid: i32 },
    /// `/proc` hides the process from warden.
    #[error("cannot read {path} of peer process {pid}: /proc is probably mounted with hidepid=; run warden as root (or with CAP_SYS_PTRACE), or mount /proc with a gid= warden belongs to")]
    ProcNotPermitted { pid: i32, path: PathBuf },
    /// The descriptor is not a connected Unix socket, or the kernel refused the credentials.
    #[error("cannot read the peer credentials of the socket ({0}); is it a connected Unix stream socket?")]
    Socket(#[source] nix::Error),
    #[error("{pid} is not a process id")]
    InvalidPid { pid: i32 },
    #[error("reading {path} failed: {source}")]
    Proc {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_uid_for_local_and_cert_id_for_certificate_peers() {
        let mut p = Principal::synthetic(1000, 1000);
        assert_eq!(p.key(), "uid:1000");
        p.cert = Some(CertIdentity {
            id: "ab12".into(),
            cn: Some("agent-1".into()),
            sans: vec![],
        });
        p.transport = Transport::Gateway;
        assert_eq!(p.key(), "cert:ab12");
    }

    #[test]
    fn audit_json_is_compact_and_shortens_the_hash() {
        let mut p = Principal::synthetic(33, 33);
        p.pid = Some(42);
        p.exe = Some("/usr/sbin/php-fpm".into());
        p.exe_sha256 = Some("0123456789abcdef".repeat(4));
        p.unit = Some("php-fpm.service".into());
        assert_eq!(
            p.audit_json(),
            json!({"uid": 33, "gid": 33, "pid": 42, "exe": "/usr/sbin/php-fpm",
                   "exe_sha256": "0123456789abcdef", "unit": "php-fpm.service"})
        );
        let mut c = Principal::synthetic(0, 0);
        c.transport = Transport::Gateway;
        c.cert = Some(CertIdentity {
            id: "ff".into(),
            cn: Some("agent-7".into()),
            sans: vec!["a.example".into()],
        });
        assert_eq!(
            c.audit_json(),
            json!({"transport": "gateway", "cert": {"id": "ff", "cn": "agent-7"}})
        );
    }

    #[test]
    fn principal_serializes_transport_in_lowercase() {
        let v = serde_json::to_value(Principal::synthetic(1, 2)).unwrap();
        assert_eq!(v["transport"], "unix");
    }
}
