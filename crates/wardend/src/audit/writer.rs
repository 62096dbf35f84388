//! The writer thread: the only owner of the log file.
//!
//! Callers hand it pre-serialized bodies over a bounded channel. It takes everything queued
//! (group commit), gives each record its `seq`, one timestamp for the batch and the `prev` hash,
//! writes the whole batch with one `write`, makes it durable with one `fdatasync`, and only then
//! acknowledges the callers (a batch of probes nobody waits for is synced a little later, see
//! [`PROBE_SYNC_DELAY`]). The chain fields are the only per-record work done here, because
//! this thread is the one part that cannot be spread over cores.

use super::format::{self, Hash, Head, ZERO_HASH};
use super::queue::{Queue, Take};
use super::{AuditConfig, AuditError, Shared};
use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::oneshot;

/// A batch stops growing at this many bytes or records, which bounds one write and the latency
/// of the callers at its front; what is left waits for the next batch.
const MAX_BATCH_BYTES: usize = 4 << 20;
const MAX_BATCH_RECORDS: usize = 16_384;

/// Bounds of the group-commit linger (see [`Writer::run`]). Below the minimum, waiting costs
/// more than the sync it would share.
const MIN_LINGER: Duration = Duration::from_micros(20);
const MAX_LINGER: Duration = Duration::from_micros(500);

/// The head file is rewritten at most this often while records flow, and this long after the
/// last one. Rewriting it after every batch (create + rename) put extra metadata into every
/// journal commit the log's `fdatasync` forces, and cost a third of the throughput.
const HEAD_EVERY: Duration = Duration::from_millis(20);

/// A batch whose callers all go on without waiting for the disk (probes: `system.ping`,
/// `health`) is written at once but synced at most this long after, by the next batch that has
/// a waiting caller or by this deadline. Once written, a crash of the daemon loses none of it
/// (the bytes are in the page cache); a power cut may lose the last few milliseconds of probe
/// records (the chain stays verifiable: a torn tail is set aside at the next start). Syncing every probe batch
/// made `fdatasync` 60 % of the writer's time under a stream of pings.
pub(crate) const PROBE_SYNC_DELAY: Duration = Duration::from_millis(10);

/// How long the writer waits to gather probe records into one write while no caller waits
/// (see [`Queue::take`]): under a stream of pings, one write and one wake-up of this thread per
/// few hundred records instead of per handful.
const PROBE_LINGER: Duration = Duration::from_millis(1);

pub(crate) enum Msg {
    Record(Pending),
    Control(Control),
}

/// Messages that end a batch: everything queued before them is written first.
pub(crate) enum Control {
    /// Flush, sync, write the head durably, stop.
    Close(oneshot::Sender<()>),
    #[cfg(test)]
    Fault(Fault, oneshot::Sender<()>),
}

pub(crate) struct Pending {
    /// The record serialized as a JSON object; the writer drops its leading `{`.
    pub body: Vec<u8>,
    /// `None` for a record whose caller does not wait for the disk (see
    /// [`super::AuditLog::record_queued`]): it is chained in order and synced with its batch.
    pub ack: Option<oneshot::Sender<Result<(), AuditError>>>,
}

/// Test-only ways to make the disk misbehave.
#[cfg(test)]
pub(crate) enum Fault {
    /// Write to this file from now on (e.g. `/dev/full`, then the log again to recover).
    UseFile(File),
    /// Block the writer, as a stuck device would.
    Stall(Duration),
    /// Make every sync this much slower, to measure against a given disk latency.
    SlowSync(Duration),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Chain {
    seq: u64,
    hash: Hash,
}

pub(crate) struct Writer {
    path: PathBuf,
    dir: PathBuf,
    file: File,
    /// Length of the current file written whole: durable, except for probe records awaiting
    /// their deferred sync.
    size: u64,
    /// A failed batch may have left bytes past `size`; they are cut before the next write.
    dirty: bool,
    chain: Chain,
    head_seq: u64,
    head_written: Instant,
    shared: Arc<Shared>,
    buf: Vec<u8>,
    last_error_log: Option<Instant>,
    /// Moving average of what one write + sync costs.
    sync_cost: Duration,
    /// Since when the file holds written records that are not synced yet (probe batches, see
    /// [`PROBE_SYNC_DELAY`]).
    unsynced_since: Option<Instant>,
    #[cfg(test)]
    slow_sync: Duration,
}

fn open_err(path: &Path, source: io::Error) -> AuditError {
    AuditError::Open {
        path: path.to_owned(),
        source,
    }
}

impl Writer {
    /// Opens the log and finds where the chain stands. See the module documentation of
    /// [`super`] for what happens to a torn last line and to a head file that is ahead of the log.
    pub(crate) fn open(cfg: &AuditConfig, shared: Arc<Shared>) -> Result<Writer, AuditError> {
        let path = cfg.path.clone();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| open_err(&dir, e))?;
        }
        let (file, created) =
            open_log_file(&path, cfg.file_mode).map_err(|e| open_err(&path, e))?;
        if created {
            sync_dir(&dir).map_err(|e| open_err(&dir, e))?;
        }
        let meta = file.metadata().map_err(|e| open_err(&path, e))?;
        if !meta.file_type().is_file() {
            return Err(open_err(
                &path,
                io::Error::other("not a regular file (the audit log must be a plain file)"),
            ));
        }
        let mut size = meta.len();
        let last =
            format::scan_last_line(&file, size).map_err(|e| corrupt(&path, e.to_string()))?;
        if last.complete_len < size {
            preserve_torn_tail(&file, &path, &dir, last.complete_len, size, cfg.file_mode)?;
            size = last.complete_len;
        }
        let on_disk = match last.line {
            Some(line) => Some(chain_after(&line).map_err(|r| corrupt(&path, r))?),
            None => previous_file_chain(&path)?,
        };
        let head = match format::read_head(&format::head_path(&path)) {
            Ok(Some(Ok(h))) => Some(h),
            Ok(Some(Err(reason))) => {
                tracing::warn!(path = %path.display(), %reason, "ignoring an unreadable audit head file");
                None
            }
            Ok(None) => None,
            Err(e) => return Err(open_err(&format::head_path(&path), e)),
        };
        let chain = choose_resume_point(&path, on_disk, head);
        Ok(Writer {
            path,
            dir,
            file,
            size,
            dirty: false,
            chain,
            // Unknown: the first batch (or close) rewrites the head.
            head_seq: u64::MAX,
            head_written: Instant::now(),
            shared,
            buf: Vec::with_capacity(1 << 20),
            last_error_log: None,
            sync_cost: Duration::ZERO,
            unsynced_since: None,
            #[cfg(test)]
            slow_sync: Duration::ZERO,
        })
    }

    pub(crate) fn last_seq(&self) -> u64 {
        self.chain.seq
    }

    pub(crate) fn run(mut self, queue: Arc<Queue>) {
        // The linger below is tens of microseconds; the default 50 µs timer slack would
        // double it. Only this thread is affected; failing to set it only costs precision.
        let _ = nix::sys::prctl::set_timerslack(1_000);
        let mut taken: Vec<Msg> = Vec::new();
        let mut batch: Vec<Pending> = Vec::new();
        // The callers answered by the last batch are likely to be back with their next record
        // within microseconds; starting the next batch without them would split the callers
        // into two cohorts that each wait for a full sync. So the writer lingers for them, up
        // to half a sync (nothing on a disk whose sync costs nothing).
        let mut target = 1;
        loop {
            let linger = self.sync_cost / 2;
            let linger = if linger < MIN_LINGER {
                Duration::ZERO
            } else {
                linger.min(MAX_LINGER)
            };
            let head_stale = self.head_seq != self.chain.seq;
            let head_due = head_stale.then(|| self.head_written + HEAD_EVERY);
            let sync_due = self.unsynced_since.map(|t| t + PROBE_SYNC_DELAY);
            let idle_until = head_due.into_iter().chain(sync_due).min();
            match queue.take(&mut taken, target, linger, PROBE_LINGER, idle_until) {
                Take::Messages => {}
                Take::Idle => {
                    self.sync_if_due();
                    if head_due.is_some_and(|t| Instant::now() >= t) {
                        self.update_head();
                    }
                    continue;
                }
                Take::Closed => {
                    // Every handle is gone: the daemon is shutting down without `close`.
                    self.shutdown();
                    queue.close();
                    return;
                }
            }
            let n = taken.len();
            // Callers in this batch that wait for the disk: the cohort the next linger expects
            // back (probes do not come back sooner for being written).
            let mut waiters = 0;
            let mut bytes = 0;
            let mut msgs = taken.drain(..);
            for msg in msgs.by_ref() {
                match msg {
                    Msg::Record(p) => {
                        if batch.is_empty() {
                            bytes = 0;
                        }
                        waiters += usize::from(p.ack.is_some());
                        bytes += p.body.len();
                        batch.push(p);
                        if bytes >= MAX_BATCH_BYTES || batch.len() >= MAX_BATCH_RECORDS {
                            self.commit(&mut batch);
                        }
                    }
                    Msg::Control(control) => {
                        if !batch.is_empty() {
                            self.commit(&mut batch);
                        }
                        match control {
                            Control::Close(ack) => {
                                self.shutdown();
                                // What was queued after the close fails with `Closed`.
                                drop(msgs);
                                drop(queue.close());
                                let _ = ack.send(());
                                return;
                            }
                            #[cfg(test)]
                            Control::Fault(fault, ack) => {
                                let _ = ack.send(());
                                match fault {
                                    Fault::UseFile(f) => self.file = f,
                                    Fault::Stall(d) => std::thread::sleep(d),
                                    Fault::SlowSync(d) => self.slow_sync = d,
                                }
                            }
                        }
                    }
                }
            }
            drop(msgs);
            if !batch.is_empty() {
                self.commit(&mut batch);
            }
            queue.release(n);
            target = waiters.max(1);
            self.sync_if_due();
            if self.head_written.elapsed() >= HEAD_EVERY {
                self.update_head();
            }
        }
    }

    /// Syncs the probe records written since the last sync once they have waited
    /// [`PROBE_SYNC_DELAY`].
    fn sync_if_due(&mut self) {
        if self
            .unsynced_since
            .is_some_and(|t| t.elapsed() >= PROBE_SYNC_DELAY)
        {
            self.sync_deferred();
        }
    }

    /// Syncs the probe records written since the last sync.
    fn sync_deferred(&mut self) {
        if self.unsynced_since.is_none() {
            return;
        }
        match self.sync() {
            Ok(()) => self.unsynced_since = None,
            Err(e) => {
                // The records are written and chained; the next sync (of a batch with a
                // waiting caller) tries again and fails that batch if the disk is still bad.
                self.unsynced_since = Some(Instant::now());
                self.note_error(&format!("audit log sync failed: {e}"));
            }
        }
    }

    fn update_head(&mut self) {
        // The head must never name records the disk may not have.
        self.sync_deferred();
        if let Err(e) = self.write_head(false) {
            // Retry after the interval, not in a loop.
            self.head_written = Instant::now();
            self.note_error(&format!("cannot update the audit head file: {e}"));
        }
    }

    /// Writes one batch and acknowledges every caller in it.
    fn commit(&mut self, batch: &mut Vec<Pending>) {
        // A caller whose deadline passed has already failed its request: writing its record
        // would log a decision that was never answered that way.
        let before = batch.len();
        batch.retain(|p| p.ack.as_ref().is_none_or(|a| !a.is_closed()));
        self.shared
            .abandoned
            .fetch_add((before - batch.len()) as u64, Relaxed);
        if batch.is_empty() {
            return;
        }
        if self.dirty {
            if let Err(e) = self.recover() {
                self.fail(batch.drain(..), e);
                return;
            }
        }

        // Lay the batch out, noting where the file must rotate: before a line that would take a
        // non-empty file past the limit.
        let max = self.shared.max_file_size.load(Relaxed);
        let time = format::rfc3339_micros(SystemTime::now());
        self.buf.clear();
        let mut segments: Vec<Segment> = Vec::with_capacity(1);
        let mut projected = self.size;
        let mut chain = self.chain;
        for (i, p) in batch.iter().enumerate() {
            let start = self.buf.len();
            format::push_prefix(&mut self.buf, chain.seq + 1, &time, &chain.hash);
            self.buf
                .extend_from_slice(p.body.get(1..).unwrap_or_default());
            let hash = format::hash_line(&self.buf[start..]);
            self.buf.push(b'\n');
            let len = (self.buf.len() - start) as u64;
            if projected > 0 && projected.saturating_add(len) > max {
                segments.push(Segment {
                    end: start,
                    records: i,
                    chain,
                });
                projected = 0;
            }
            projected += len;
            chain = Chain {
                seq: chain.seq + 1,
                hash,
            };
        }
        segments.push(Segment {
            end: self.buf.len(),
            records: batch.len(),
            chain,
        });

        // Nobody waits for a probe-only batch that stays in one file: written now, synced
        // within PROBE_SYNC_DELAY. Anything else syncs (which covers earlier probe records too),
        // and a file is always synced before it is rotated away.
        let defer = segments.len() == 1 && batch.iter().all(|p| p.ack.is_none());
        let mut durable = 0; // records acknowledged as written
        let mut offset = 0;
        let mut failure = None;
        for (k, seg) in segments.iter().enumerate() {
            if k > 0 {
                if let Err(e) = self.rotate() {
                    // Keep writing to the current file: an oversized file beats failed requests.
                    self.note_error(&format!("audit log rotation failed: {e}"));
                }
            }
            if seg.end > offset {
                let bytes = &self.buf[offset..seg.end];
                let written = if defer {
                    let w = self.file.write_all(bytes);
                    if w.is_ok() && self.unsynced_since.is_none() {
                        self.unsynced_since = Some(Instant::now());
                    }
                    w
                } else {
                    let started = Instant::now();
                    let w = self.file.write_all(bytes).and_then(|()| self.sync());
                    self.sync_cost = (self.sync_cost * 7 + started.elapsed()) / 8;
                    if w.is_ok() {
                        self.unsynced_since = None;
                    }
                    w
                };
                if let Err(e) = written {
                    self.dirty = true;
                    failure = Some(e);
                    break;
                }
                self.size += bytes.len() as u64;
                self.shared.bytes.fetch_add(bytes.len() as u64, Relaxed);
            }
            self.chain = seg.chain;
            durable = seg.records;
            offset = seg.end;
        }

        let mut rest = batch.drain(..);
        for p in rest.by_ref().take(durable) {
            if let Some(ack) = p.ack {
                let _ = ack.send(Ok(()));
            }
        }
        self.shared.records.fetch_add(durable as u64, Relaxed);
        self.shared.batches.fetch_add(1, Relaxed);
        self.shared.last_seq.store(self.chain.seq, Relaxed);
        if let Some(e) = failure {
            self.fail(rest, e);
        } else {
            drop(rest);
        }
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()?;
        self.shared.syncs.fetch_add(1, Relaxed);
        #[cfg(test)]
        if !self.slow_sync.is_zero() {
            std::thread::sleep(self.slow_sync);
        }
        Ok(())
    }

    fn fail(&mut self, pending: impl Iterator<Item = Pending>, e: io::Error) {
        self.note_error(&format!("audit write failed: {e}"));
        let e = Arc::new(e);
        for p in pending {
            if let Some(ack) = p.ack {
                let _ = ack.send(Err(AuditError::Write(Arc::clone(&e))));
            }
        }
    }

    fn note_error(&mut self, msg: &str) {
        self.shared.write_errors.fetch_add(1, Relaxed);
        *self.shared.last_error.lock() = Some(msg.to_owned());
        // A broken disk fails every batch; one log line a second is enough to say so.
        let now = Instant::now();
        if self
            .last_error_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.last_error_log = Some(now);
            tracing::error!(path = %self.path.display(), "{msg}");
        }
    }

    /// Cuts what a failed batch may have left behind, so the next record follows the last
    /// acknowledged one. Those bytes were never acknowledged: their requests failed.
    fn recover(&mut self) -> io::Result<()> {
        self.file.set_len(self.size)?;
        self.file.sync_all()?;
        self.dirty = false;
        Ok(())
    }

    /// `audit.log` → `audit.log.1` → … → `audit.log.<keep>`, the oldest deleted, then a fresh
    /// `audit.log`. The current file is already durable (each segment is synced before this).
    fn rotate(&mut self) -> io::Result<()> {
        let keep = self.shared.keep_files.load(Relaxed).max(1);
        let mode = self.shared.file_mode.load(Relaxed);
        // If a previous rotation renamed our file but could not create the new one, the file we
        // hold is already `.1`: only the creation is left to do.
        if same_file(&self.file, &self.path)? {
            remove_if_exists(&format::rotated_path(&self.path, keep))?;
            // Files past a `keep_files` that was lowered by a reload.
            let mut n = keep + 1;
            while remove_if_exists(&format::rotated_path(&self.path, n))? {
                n += 1;
            }
            for i in (1..keep).rev() {
                let from = format::rotated_path(&self.path, i);
                match std::fs::rename(&from, format::rotated_path(&self.path, i + 1)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            std::fs::rename(&self.path, format::rotated_path(&self.path, 1))?;
            sync_dir(&self.dir)?;
        }
        let (file, _) = open_log_file(&self.path, mode)?;
        sync_dir(&self.dir)?;
        self.file = file;
        self.size = 0;
        self.dirty = false;
        self.shared.rotations.fetch_add(1, Relaxed);
        self.write_head(true)
    }

    /// Rewrites `<path>.head` (temp file + rename), only ever after the records it names are
    /// durable. `durable` also syncs it, for rotation and close; otherwise it is left to the
    /// page cache, which is enough for a lower bound.
    fn write_head(&mut self, durable: bool) -> io::Result<()> {
        if !durable && self.head_seq == self.chain.seq {
            return Ok(());
        }
        let head = format::head_path(&self.path);
        let tmp = format::with_suffix(&head, ".tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(self.shared.file_mode.load(Relaxed))
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(format::head_line(self.chain.seq, &self.chain.hash).as_bytes())?;
        if durable {
            f.sync_all()?;
        }
        drop(f);
        std::fs::rename(&tmp, &head)?;
        if durable {
            sync_dir(&self.dir)?;
        }
        self.head_seq = self.chain.seq;
        self.head_written = Instant::now();
        Ok(())
    }

    fn shutdown(&mut self) {
        if self.dirty {
            if let Err(e) = self.recover() {
                self.note_error(&format!("audit log not cleaned up on close: {e}"));
            }
        }
        if let Err(e) = self.file.sync_all() {
            self.note_error(&format!("audit log not synced on close: {e}"));
        }
        if let Err(e) = self.write_head(true) {
            self.note_error(&format!("cannot write the audit head file on close: {e}"));
        }
    }
}

struct Segment {
    /// End of this segment in the batch buffer.
    end: usize,
    /// Records of the batch written once this segment is durable.
    records: usize,
    /// The chain after this segment's last line.
    chain: Chain,
}

fn corrupt(path: &Path, reason: String) -> AuditError {
    AuditError::Corrupt {
        path: path.to_owned(),
        reason,
    }
}

fn chain_after(line: &[u8]) -> Result<Chain, String> {
    let fields = format::parse_chain(line)
        .map_err(|e| format!("its last line is not an audit record: {e}"))?;
    Ok(Chain {
        seq: fields.seq,
        hash: format::hash_line(line),
    })
}

/// The chain at the end of `<path>.1`, for a current file that is empty (a crash right after a
/// rotation, or an operator who moved the file away).
fn previous_file_chain(path: &Path) -> Result<Option<Chain>, AuditError> {
    let prev = format::rotated_path(path, 1);
    let file = match File::open(&prev) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(open_err(&prev, e)),
    };
    let len = file.metadata().map_err(|e| open_err(&prev, e))?.len();
    let last = format::scan_last_line(&file, len).map_err(|e| corrupt(&prev, e.to_string()))?;
    match last.line {
        Some(line) => Ok(Some(chain_after(&line).map_err(|r| corrupt(&prev, r))?)),
        None => Ok(None),
    }
}

/// The log is the record; the head file only says how far it reached. When the head is ahead
/// of the log (records removed while the daemon was stopped) or disagrees about the last record
/// (it was edited), the chain continues from the head, so the next record carries the evidence:
/// `verify` then reports the gap or the edit instead of a silently rebuilt chain.
fn choose_resume_point(path: &Path, on_disk: Option<Chain>, head: Option<Head>) -> Chain {
    let genesis = Chain {
        seq: 0,
        hash: ZERO_HASH,
    };
    match (on_disk, head) {
        (Some(d), Some(h)) if h.seq > d.seq || (h.seq == d.seq && h.hash != d.hash) => {
            tracing::error!(
                path = %path.display(),
                log_seq = d.seq,
                head_seq = h.seq,
                "the audit log does not reach its head file: records were removed or edited; \
                 continuing the chain from the head so that `warden audit verify` shows where"
            );
            Chain {
                seq: h.seq,
                hash: h.hash,
            }
        }
        (Some(d), _) => d,
        (None, Some(h)) => {
            if h.seq > 0 {
                tracing::warn!(
                    path = %path.display(),
                    head_seq = h.seq,
                    "the audit log is empty but its head file records seq {}; continuing from it",
                    h.seq
                );
            }
            Chain {
                seq: h.seq,
                hash: h.hash,
            }
        }
        (None, None) => genesis,
    }
}

/// Copies a torn tail (bytes after the last `\n`, from a write cut short by a crash) to
/// `<path>.torn-<unix time>`, then cuts it from the log. Nothing is lost: the fragment is kept
/// byte for byte, and the log itself stays a clean chain that `verify` can check without
/// exceptions. The fragment was never acknowledged (acknowledgements follow `fdatasync` of whole
/// lines), so no request was answered on the strength of it.
fn preserve_torn_tail(
    file: &File,
    path: &Path,
    dir: &Path,
    complete_len: u64,
    len: u64,
    mode: u32,
) -> Result<(), AuditError> {
    use std::os::unix::fs::FileExt;
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut n = 0;
    let (aside_path, mut aside) = loop {
        let candidate = if n == 0 {
            format::with_suffix(path, &format!(".torn-{secs}"))
        } else {
            format::with_suffix(path, &format!(".torn-{secs}.{n}"))
        };
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&candidate)
        {
            Ok(f) => break (candidate, f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(open_err(&candidate, e)),
        }
    };
    let mut copy = || -> io::Result<()> {
        let mut pos = complete_len;
        let mut chunk = vec![0u8; 1 << 20];
        while pos < len {
            let n = ((len - pos) as usize).min(chunk.len());
            file.read_exact_at(&mut chunk[..n], pos)?;
            aside.write_all(&chunk[..n])?;
            pos += n as u64;
        }
        aside.sync_all()?;
        sync_dir(dir)?;
        file.set_len(complete_len)?;
        file.sync_all()
    };
    copy().map_err(|e| open_err(path, e))?;
    tracing::warn!(
        path = %path.display(),
        aside = %aside_path.display(),
        bytes = len - complete_len,
        "the audit log ended in a torn line (a write cut short by a crash); \
         moved the fragment aside and continued from the last complete record"
    );
    Ok(())
}

/// Opens (or creates, with exactly `mode`) the log for appending. `O_NOFOLLOW`: a symlink
/// planted at the log's path must not redirect a root daemon's writes.
fn open_log_file(path: &Path, mode: u32) -> io::Result<(File, bool)> {
    let mut opts = OpenOptions::new();
    opts.read(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode);
    match opts.clone().create_new(true).open(path) {
        Ok(f) => {
            // The umask must not loosen or tighten the configured mode.
            f.set_permissions(Permissions::from_mode(mode))?;
            Ok((f, true))
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok((opts.open(path)?, false)),
        Err(e) => Err(e),
    }
}

fn same_file(file: &File, path: &Path) -> io::Result<bool> {
    let ours = file.metadata()?;
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(m.dev() == ours.dev() && m.ino() == ours.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn remove_if_exists(path: &Path) -> io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Makes a rename or a creation in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
