//! `tail [-f]` for any line-oriented file: the audit log (`warden audit tail -f`) and the
//! daemon's own log (`warden daemon logs --follow`).
//!
//! Following polls the file every [`POLL`]: simple, works on every filesystem (inotify does not
//! see writes made through NFS or from another mount namespace), and costs one `stat` per poll.
//! Rotation is followed by name, like `tail -F`: when the path names a different file, the rest
//! of the old one is read to its end, then the new one from its start. A file truncated in
//! place is read again from its start.

use super::format;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// How often a followed file is checked for new lines.
pub const POLL: Duration = Duration::from_millis(100);

/// A line not terminated after this many bytes is handed out as it is, to bound memory.
const MAX_PENDING: usize = 1 << 20;

/// Calls `out` with each of the last `lines` lines of `path` (without their `\n`), then, with
/// `follow`, with every line appended later, following rotation. Without `follow` it returns at
/// the end of the file; with it, it runs until the returned future is dropped. Bytes that are
/// not UTF-8 are shown as U+FFFD.
///
/// The file is read on a blocking thread; `out` runs on the caller's task.
pub async fn tail(
    path: &Path,
    lines: usize,
    follow: bool,
    mut out: impl FnMut(&str),
) -> io::Result<()> {
    let mut t = Tail::start(path, lines, follow);
    while let Some(batch) = t.next_batch().await {
        for line in &batch {
            out(line);
        }
    }
    t.finish().await
}

/// [`tail`] for a consumer that waits between lines (a flow-controlled stream): the lines come
/// in batches, and the file is read ahead by at most a few batches.
pub struct Tail {
    rx: mpsc::Receiver<Vec<String>>,
    reader: tokio::task::JoinHandle<io::Result<()>>,
}

impl Tail {
    /// Starts reading, on a blocking thread, as [`tail`] does.
    pub fn start(path: &Path, lines: usize, follow: bool) -> Tail {
        let (tx, rx) = mpsc::channel::<Vec<String>>(16);
        let path = path.to_owned();
        let reader =
            tokio::task::spawn_blocking(move || Tailer::open(path, lines)?.run(follow, &tx));
        Tail { rx, reader }
    }

    /// The next lines; `None` at the end (never, when following).
    pub async fn next_batch(&mut self) -> Option<Vec<String>> {
        self.rx.recv().await
    }

    /// Stops reading (if it has not ended) and reports whether reading failed.
    pub async fn finish(self) -> io::Result<()> {
        drop(self.rx);
        self.reader.await.map_err(io::Error::other)?
    }
}

struct Tailer {
    path: PathBuf,
    file: File,
    id: (u64, u64),
    pos: u64,
    partial: Vec<u8>,
}

impl Tailer {
    fn open(path: PathBuf, lines: usize) -> io::Result<Tailer> {
        let file = File::open(&path)?;
        let meta = file.metadata()?;
        let pos = start_of_last_lines(&file, meta.len(), lines)?;
        Ok(Tailer {
            path,
            file,
            id: (meta.dev(), meta.ino()),
            pos,
            partial: Vec::new(),
        })
    }

    /// Returns when done (no follow), or when the receiving side is gone.
    fn run(mut self, follow: bool, tx: &mpsc::Sender<Vec<String>>) -> io::Result<()> {
        if !self.drain(tx)? {
            return Ok(());
        }
        if !follow {
            self.flush_partial(tx);
            return Ok(());
        }
        loop {
            if tx.is_closed() {
                return Ok(());
            }
            std::thread::sleep(POLL);
            if !self.drain(tx)? {
                return Ok(());
            }
            match std::fs::metadata(&self.path) {
                Ok(m) if (m.dev(), m.ino()) != self.id => {
                    // Rotated or replaced: whatever was appended to the old file before it was
                    // renamed comes first.
                    if !self.drain(tx)? || !self.flush_partial(tx) {
                        return Ok(());
                    }
                    match File::open(&self.path) {
                        Ok(f) => {
                            let m = f.metadata()?;
                            self.file = f;
                            self.id = (m.dev(), m.ino());
                            self.pos = 0;
                        }
                        // Gone again between stat and open: try at the next poll.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(m) if m.len() < self.pos => {
                    self.pos = 0;
                    self.partial.clear();
                }
                // Same file, or no file for a moment during a rotation.
                _ => {}
            }
        }
    }

    /// Reads from `pos` to the end of the file and sends the complete lines. `false` when the
    /// receiver is gone.
    fn drain(&mut self, tx: &mpsc::Sender<Vec<String>>) -> io::Result<bool> {
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let n = self.file.read_at(&mut chunk, self.pos)?;
            if n == 0 {
                return Ok(true);
            }
            self.pos += n as u64;
            let mut out = Vec::new();
            let mut rest = &chunk[..n];
            while let Some(i) = rest.iter().position(|&b| b == b'\n') {
                self.partial.extend_from_slice(&rest[..i]);
                out.push(String::from_utf8_lossy(&self.partial).into_owned());
                self.partial.clear();
                rest = &rest[i + 1..];
            }
            self.partial.extend_from_slice(rest);
            if self.partial.len() > MAX_PENDING {
                out.push(String::from_utf8_lossy(&self.partial).into_owned());
                self.partial.clear();
            }
            if !out.is_empty() && tx.blocking_send(out).is_err() {
                return Ok(false);
            }
        }
    }

    fn flush_partial(&mut self, tx: &mpsc::Sender<Vec<String>>) -> bool {
        if self.partial.is_empty() {
            return true;
        }
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        tx.blocking_send(vec![line]).is_ok()
    }
}

/// Offset where the last `n` lines of the file start. A final line without `\n` counts as a line.
fn start_of_last_lines(file: &File, len: u64, n: usize) -> io::Result<u64> {
    if n == 0 || len == 0 {
        return Ok(len);
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)?;
    // The `\n` ending the last line does not start a line.
    let mut end = if last[0] == b'\n' { len - 1 } else { len };
    let mut found = 0;
    while let Some(i) = format::rfind_newline(file, end, end)? {
        found += 1;
        if found == n {
            return Ok(i + 1);
        }
        end = i;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    fn collect(path: &Path, n: usize) -> Vec<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut got = Vec::new();
        rt.block_on(tail(path, n, false, |l| got.push(l.to_string())))
            .unwrap();
        got
    }

    #[test]
    fn prints_the_last_n_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "a\nb\nc\n").unwrap();
        assert_eq!(collect(&p, 2), ["b", "c"]);
        assert_eq!(collect(&p, 10), ["a", "b", "c"]);
        assert!(collect(&p, 0).is_empty());
        std::fs::write(&p, "a\nb\npartial").unwrap();
        assert_eq!(collect(&p, 2), ["b", "partial"]);
        std::fs::write(&p, "").unwrap();
        assert!(collect(&p, 3).is_empty());
    }

    #[test]
    fn finds_lines_far_back_in_a_large_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut f = File::create(&p).unwrap();
        for i in 0..50_000 {
            writeln!(f, "line {i} {}", "x".repeat(i % 50)).unwrap();
        }
        drop(f);
        let got = collect(&p, 3000);
        assert_eq!(got.len(), 3000);
        assert!(got[0].starts_with("line 47000 "));
        assert!(got[2999].starts_with("line 49999 "));
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let err = rt
            .block_on(tail(Path::new("/nonexistent/x"), 1, false, |_| {}))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    async fn wait_for(got: &Arc<Mutex<Vec<String>>>, n: usize) {
        for _ in 0..100 {
            if got.lock().unwrap().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("only {:?} after 5 s", got.lock().unwrap());
    }

    #[tokio::test]
    async fn follow_prints_appended_lines_and_follows_rotation_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("daemon.log");
        std::fs::write(&p, "old1\nold2\n").unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&got);
        let path = p.clone();
        let task = tokio::spawn(async move {
            tail(&path, 1, true, |l| sink.lock().unwrap().push(l.to_string())).await
        });
        wait_for(&got, 1).await;

        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"new1\nhalf").unwrap();
        wait_for(&got, 2).await;
        f.write_all(b" done\n").unwrap();
        wait_for(&got, 3).await;

        // Rotation: a last line lands in the renamed file, then a new file appears.
        std::fs::rename(&p, dir.path().join("daemon.log.1")).unwrap();
        f.write_all(b"late\n").unwrap();
        std::fs::write(&p, "fresh1\n").unwrap();
        wait_for(&got, 5).await;

        // Truncation in place (copytruncate).
        std::fs::write(&p, "").unwrap();
        tokio::time::sleep(POLL * 3).await;
        std::fs::write(&p, "again\n").unwrap();
        wait_for(&got, 6).await;

        task.abort();
        assert_eq!(
            *got.lock().unwrap(),
            ["old2", "new1", "half done", "late", "fresh1", "again"]
        );
    }
}
