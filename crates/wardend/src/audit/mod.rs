//! # audit — the hash-chained, durable audit log
//!
//! One JSON line per decision of the daemon, written and `fdatasync`ed *before* the reply: if
//! the record cannot be made durable within [`AuditConfig::write_timeout`], the request fails.
//!
//! ## A line
//!
//! ```text
//! {"seq":42,"time":"2024-05-01T12:34:56.123456Z","prev":"<sha256 hex>","request_id":"…",
//!  "principal":{…},"method":"secrets.get","resource":"db_password","result":"ok","code":null,
//!  "latency_us":180,"transport":"unix","params":{…}}
//! ```
//!
//! `seq` starts at 1 and continues across rotated files; `prev` is the SHA-256 of the previous
//! line's exact bytes (without its `\n`), 64 zeros for the first record of a new log. Editing,
//! removing or reordering a line therefore breaks the chain at that line, which [`verify()`]
//! reports. `time` is the time the batch was committed (one timestamp per batch). `params` has
//! gone through [`sanitize()`]: no secret value, password or key material is ever written.
//!
//! ## Writing: one thread, group commit
//!
//! [`AuditLog`] is a cheap handle. [`AuditLog::record`] sanitizes and serializes the record on
//! the caller's task (spread over cores), then queues it to a dedicated writer thread, which
//! takes everything queued, prefixes the chain fields, writes the batch with one `write`, syncs
//! it with one `fdatasync` and acknowledges every caller. The throughput therefore scales with
//! the number of concurrent callers, not with the disk's sync latency: each caller waits for
//! one sync, so N callers that each wait for their record get at most N records per sync time.
//! When fewer records are queued than the last batch held, the writer lingers (up to half a
//! sync) for the callers it has just answered, so that they share the next sync instead of
//! splitting into two groups that each wait for a full one.
//!
//! A caller that is not acknowledged within the write timeout gets
//! [`AuditError::Timeout`] and never hangs, whatever the disk does. The writer skips records
//! whose caller already gave up, so the log does not claim an outcome that was never replied;
//! the only remaining race is the opposite, harmless direction (a record written just as its
//! caller timed out: the log shows a request that in fact failed). After an I/O error the
//! writer cuts what the failed batch left in the file and keeps trying on later batches.
//!
//! ## Rotation
//!
//! When a line would take the current file past [`AuditConfig::max_file_size`], the writer
//! renames `audit.log` → `audit.log.1` (`.1` → `.2` …, the oldest beyond
//! [`AuditConfig::keep_files`] deleted), syncs the directory and opens a fresh `audit.log`. The
//! chain does not restart: the new file's first line has the next `seq` and the hash of the
//! previous file's last line, so `verify_files(&[log.2, log.1, log])` checks end to end.
//!
//! ## Crash recovery: torn lines
//!
//! A crash in the middle of a write can leave bytes after the last `\n`. Those bytes were never
//! acknowledged (acknowledgement follows the sync of whole lines). On [`AuditLog::open`] they are
//! copied to `<path>.torn-<unix time>` (synced), then cut from the log, and the chain continues
//! from the last complete line. The evidence is kept byte for byte, and the log stays a chain
//! with no exceptions for the verifier to allow. (Renaming the whole file aside instead would put
//! a torn line in the middle of the chain, which `verify_files` would have to special-case.)
//!
//! ## The head file, and what the chain cannot prove
//!
//! A chain alone cannot show that lines were removed from its *end*. The writer therefore keeps
//! `<path>.head` = `{"seq":N,"hash":"…"}`, naming a record that is already durable. It is
//! rewritten (temp file + rename) at most every 20 ms while records flow and 20 ms after the
//! last one, and synced on rotation and on close. (Rewriting it after every batch put the
//! rename's metadata into every journal commit the log's `fdatasync` forces, and cost a third
//! of the throughput.) [`verify()`] reports [`Problem::TailTruncated`] when the log ends before
//! the head, and [`Problem::Edited`] when the record at the head's seq hashes differently. If the
//! head is ahead of the log when the daemon starts, the chain continues from the head, so the
//! gap stays visible instead of being papered over.
//!
//! Limits, honestly: the records of the last ~20 ms (and, after a power loss, whatever head
//! update the page cache had not written) can be cut from the end without detection. Anyone who
//! can write both the log and the head (root on this host) can rebuild a consistent chain from
//! any point: the chain detects accidents and tampering by someone who cannot; against root it
//! only helps if head hashes are copied off the host (e.g. to a remote log) as they are written.
//!
//! What this module does not do: compress, ship or expire logs by age; decide *what* is audited
//! (the pipeline does); trust a caller to have sanitized its parameters.

mod format;
mod queue;
mod sanitize;
mod tail;
mod verify;
mod writer;

#[cfg(test)]
mod tests;

pub use sanitize::{sanitize, MAX_CHARS, SENSITIVE};
pub use tail::{tail, Tail};
pub use verify::{verify, verify_files, Problem, VerifyError, VerifyReport};

use parking_lot::Mutex;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Callers waiting beyond this many queued records wait (within their timeout) for room, which
/// bounds memory when the disk stalls.
const QUEUE: usize = 65_536;

/// Where and how the audit log is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The live file; rotated files are `<path>.1` … `<path>.<keep_files>`, the head file
    /// `<path>.head`.
    pub path: PathBuf,
    /// A file is rotated before a line would take it past this size (bytes). A single line
    /// larger than this gets a file of its own.
    pub max_file_size: u64,
    /// Rotated files kept (at least 1).
    pub keep_files: usize,
    /// How long [`AuditLog::record`] waits for durability before failing the request.
    pub write_timeout: Duration,
    /// Mode of files this module creates (log, rotated, head).
    pub file_mode: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            path: PathBuf::from("/var/log/warden/audit.log"),
            max_file_size: 100 << 20,
            keep_files: 10,
            write_timeout: Duration::from_secs(5),
            file_mode: 0o600,
        }
    }
}

impl AuditConfig {
    fn validate(&self) -> Result<(), AuditError> {
        let bad = |m: &str| Err(AuditError::Config(m.to_string()));
        if self.path.file_name().is_none() {
            return bad("audit.path must name a file");
        }
        if self.max_file_size == 0 {
            return bad("audit.max_file_size must be more than 0");
        }
        if self.keep_files == 0 {
            return bad("audit.keep_files must be at least 1: 0 would delete the audit trail at each rotation");
        }
        if self.write_timeout.is_zero() {
            return bad("audit.write_timeout must be more than 0");
        }
        if self.file_mode & !0o777 != 0 {
            return bad("audit.file_mode may only hold permission bits (e.g. 0o600)");
        }
        Ok(())
    }
}

/// One decision of the daemon, as the pipeline knows it. The chain fields are added by the log.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub request_id: String,
    /// Who asked: uid, gid, pid, user, exe, unit, certificate identity … as the caller has it.
    pub principal: AuditPrincipal,
    pub method: String,
    pub resource: Option<String>,
    pub result: AuditResult,
    /// The error code when `result` is not `ok`.
    pub code: Option<String>,
    pub latency_us: u64,
    /// `"unix"`, `"lumo"`, `"https"`, `"grpc"` …
    pub transport: &'static str,
    /// The request's parameters; [`AuditLog::record`] sanitizes them.
    pub params: serde_json::Value,
}

/// A principal's summary for the audit log, encoded once (when a connection is accepted) and
/// shared by every record of that connection: it is the same for all of them, and encoding it
/// again per request was a measurable part of a small request's cost.
#[derive(Debug, Clone)]
pub struct AuditPrincipal(Arc<serde_json::value::RawValue>);

impl From<serde_json::Value> for AuditPrincipal {
    fn from(v: serde_json::Value) -> Self {
        let raw = serde_json::value::to_raw_value(&v).expect("a JSON value always encodes as JSON");
        AuditPrincipal(Arc::from(raw))
    }
}

impl Serialize for AuditPrincipal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditResult {
    Ok,
    Denied,
    Error,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log at {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the audit log {} cannot be continued: {reason}; run `warden audit verify` on it, then move it aside to start a new file",
        path.display()
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("invalid audit configuration: {0}")]
    Config(String),
    #[error("the audit record could not be written: {0}")]
    Write(#[source] Arc<std::io::Error>),
    #[error("the audit record was not durable within {0:?} (disk full or stuck?)")]
    Timeout(Duration),
    #[error("the audit log is closed")]
    Closed,
    #[error("the audit record could not be encoded: {0}")]
    Encode(String),
}

/// Counters for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Records written and acknowledged since open.
    pub records: u64,
    /// Batches committed (one write each, per file).
    pub batches: u64,
    /// `fdatasync`s of the log: one per batch with a waiting caller, fewer for probes.
    pub syncs: u64,
    pub bytes: u64,
    pub rotations: u64,
    /// Failed writes, syncs, rotations and head updates.
    pub write_errors: u64,
    /// Records not written because their caller had already timed out.
    pub abandoned: u64,
    /// `seq` of the last durable record.
    pub last_seq: u64,
    pub last_error: Option<String>,
}

/// State shared by the handles and the writer thread: live settings and counters.
pub(crate) struct Shared {
    max_file_size: AtomicU64,
    keep_files: AtomicUsize,
    file_mode: AtomicU32,
    write_timeout_us: AtomicU64,
    records: AtomicU64,
    batches: AtomicU64,
    syncs: AtomicU64,
    bytes: AtomicU64,
    rotations: AtomicU64,
    write_errors: AtomicU64,
    abandoned: AtomicU64,
    last_seq: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    fn apply(&self, cfg: &AuditConfig) {
        self.max_file_size.store(cfg.max_file_size, Relaxed);
        self.keep_files.store(cfg.keep_files, Relaxed);
        self.file_mode.store(cfg.file_mode, Relaxed);
        let us = u64::try_from(cfg.write_timeout.as_micros()).unwrap_or(u64::MAX);
        self.write_timeout_us.store(us, Relaxed);
    }
}

/// A handle to the audit log; clone it freely. The writer thread stops when [`AuditLog::close`]
/// is called or the last handle is dropped (both flush and sync first).
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    queue: Arc<queue::Queue>,
    shared: Arc<Shared>,
}

impl Drop for Inner {
    /// The last handle is gone: the writer writes what is queued, syncs and stops.
    fn drop(&mut self) {
        self.queue.finish();
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the log (creating a missing parent directory 0700 and the file with
    /// `file_mode`, refusing symlinks and non-regular files), resumes the chain from the last
    /// complete line (read from the end: a 100 MiB file is not read whole), handles a torn last
    /// line as described in the [module documentation](self), and starts the writer thread.
    pub fn open(cfg: AuditConfig) -> Result<AuditLog, AuditError> {
        cfg.validate()?;
        let shared = Arc::new(Shared {
            max_file_size: AtomicU64::new(0),
            keep_files: AtomicUsize::new(0),
            file_mode: AtomicU32::new(0),
            write_timeout_us: AtomicU64::new(0),
            records: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            rotations: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        shared.apply(&cfg);
        let w = writer::Writer::open(&cfg, Arc::clone(&shared))?;
        shared.last_seq.store(w.last_seq(), Relaxed);
        let queue = Arc::new(queue::Queue::new(QUEUE));
        let writer_queue = Arc::clone(&queue);
        std::thread::Builder::new()
            .name("warden-audit".into())
            .spawn(move || w.run(writer_queue))
            .map_err(|source| AuditError::Open {
                path: cfg.path.clone(),
                source,
            })?;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                path: cfg.path,
                queue,
                shared,
            }),
        })
    }

    /// Sanitizes `rec.params`, appends the record and returns once it is durable (written and
    /// `fdatasync`ed). Fails — never hangs — if that does not happen within the write timeout;
    /// the caller must then fail the request.
    pub async fn record(&self, mut rec: AuditRecord) -> Result<(), AuditError> {
        sanitize::sanitize_in_place(&mut rec.params);
        let body = serde_json::to_vec(&rec).map_err(|e| AuditError::Encode(e.to_string()))?;
        let timeout = self.write_timeout();
        let (ack, done) = oneshot::channel();
        let durable = async {
            let msg = writer::Msg::Record(writer::Pending {
                body,
                ack: Some(ack),
            });
            self.inner
                .queue
                .send(msg)
                .await
                .map_err(|_| AuditError::Closed)?;
            done.await.map_err(|_| AuditError::Closed)?
        };
        match tokio::time::timeout(timeout, durable).await {
            Ok(r) => r,
            Err(_) => Err(AuditError::Timeout(timeout)),
        }
    }

    /// Appends the record to the chain without waiting for the disk: it is ordered like any
    /// other and synced with the batch it lands in (within a sync time), but the caller goes on
    /// once it is queued. For requests that change nothing and reveal nothing (`system.ping`,
    /// `health`), whose reply need not wait for a disk flush. Fails only if the queue stays full
    /// for the whole write timeout (a stuck disk), so that even probes stop when the log does.
    pub async fn record_queued(&self, mut rec: AuditRecord) -> Result<(), AuditError> {
        sanitize::sanitize_in_place(&mut rec.params);
        let body = serde_json::to_vec(&rec).map_err(|e| AuditError::Encode(e.to_string()))?;
        let msg = writer::Msg::Record(writer::Pending { body, ack: None });
        // The queue almost always has room: then no timeout needs setting up.
        let msg = match self.inner.queue.try_send(msg) {
            Ok(()) => return Ok(()),
            Err((_, queue::TrySendError::Closed)) => return Err(AuditError::Closed),
            Err((msg, queue::TrySendError::Full)) => msg,
        };
        let timeout = self.write_timeout();
        match tokio::time::timeout(timeout, self.inner.queue.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(AuditError::Closed),
            Err(_) => Err(AuditError::Timeout(timeout)),
        }
    }

    /// The live file's path (as opened; it does not change while the log is open).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn stats(&self) -> AuditStats {
        let s = &self.inner.shared;
        AuditStats {
            records: s.records.load(Relaxed),
            batches: s.batches.load(Relaxed),
            syncs: s.syncs.load(Relaxed),
            bytes: s.bytes.load(Relaxed),
            rotations: s.rotations.load(Relaxed),
            write_errors: s.write_errors.load(Relaxed),
            abandoned: s.abandoned.load(Relaxed),
            last_seq: s.last_seq.load(Relaxed),
            last_error: s.last_error.lock().clone(),
        }
    }

    /// Applies a reloaded configuration: `max_file_size` and `keep_files` from the next batch
    /// (a lowered `keep_files` deletes the surplus files at the next rotation), `write_timeout`
    /// from the next record, `file_mode` for files created from now on. A different `path` is
    /// refused with nothing applied: moving the live log needs a restart.
    pub fn reopen(&self, cfg: AuditConfig) -> Result<(), AuditError> {
        cfg.validate()?;
        if cfg.path != self.inner.path {
            return Err(AuditError::Config(format!(
                "audit.path changed from {} to {}: restart the daemon to move the audit log",
                self.inner.path.display(),
                cfg.path.display()
            )));
        }
        self.inner.shared.apply(&cfg);
        Ok(())
    }

    /// What a configuration reload wants: [`reopen`](Self::reopen) with everything but the
    /// path (the reload reports a path change as needing a restart). An invalid setting is
    /// logged and nothing is applied.
    pub fn reconfigure(&self, cfg: AuditConfig) {
        let cfg = AuditConfig {
            path: self.inner.path.clone(),
            ..cfg
        };
        if let Err(e) = self.reopen(cfg) {
            tracing::warn!("audit settings not reloaded: {e}");
        }
    }

    /// Writes what is queued, syncs the file, writes the head durably and stops the writer.
    /// Later [`record`](Self::record) calls fail with [`AuditError::Closed`]. Bounded by the
    /// write timeout; a failure is logged (there is no one left to report it to at shutdown).
    pub async fn close(&self) {
        let (ack, done) = oneshot::channel();
        let timeout = self.write_timeout();
        let closed = async {
            let msg = writer::Msg::Control(writer::Control::Close(ack));
            if self.inner.queue.send(msg).await.is_ok() {
                let _ = done.await;
            }
        };
        if tokio::time::timeout(timeout, closed).await.is_err() {
            tracing::error!(path = %self.inner.path.display(), "the audit log did not close within {timeout:?}");
        }
    }

    fn write_timeout(&self) -> Duration {
        Duration::from_micros(self.inner.shared.write_timeout_us.load(Relaxed))
    }

    #[cfg(test)]
    pub(crate) async fn inject(&self, fault: writer::Fault) {
        let (ack, done) = oneshot::channel();
        let msg = writer::Msg::Control(writer::Control::Fault(fault, ack));
        if self.inner.queue.send(msg).await.is_ok() {
            let _ = done.await;
        }
    }
}
