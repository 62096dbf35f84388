//! Checking a log: every line parses, `seq` grows by exactly one, every `prev` is the hash of the
//! line before, across files, and the log reaches its head file.
//!
//! Streaming, one line in memory (plus the previous line's hash), so a file of any size is fine.
//! On a log being written, a batch caught half-written shows as a [`Problem::TornLine`] at the
//! end of the live file: run it again.
//!
//! Naming the edited line: an edit of line k's content breaks only the link k → k+1; an edit of
//! line k's `prev` (or a replaced line k) breaks both k-1 → k and k → k+1. So when a link breaks
//! the verifier looks one link further before naming the line; at the end of the log the head
//! file decides, and without it the earlier line is named (the message says it may be either).

use super::format::{self, Hash, Head, ZERO_HASH};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub files: usize,
    pub records: u64,
    /// `seq` of the first record checked; 0 when there was none.
    pub first_seq: u64,
    /// `seq` of the last record checked; 0 when there was none.
    pub last_seq: u64,
    /// Hex SHA-256 of the last line (what the next record's `prev` will be); 64 zeros when
    /// there was no record.
    pub last_hash: String,
    /// Set when the first file does not start the log (`seq` > 1): earlier records were
    /// rotated away, and the chain before this seq was not checked.
    pub continues_from_seq: Option<u64>,
    /// The head file's seq, when a head file was found next to the last file and checked.
    pub head_seq: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {}: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The first line at which the log is not what the writer wrote.
    #[error("{}, line {line}: {problem}", file.display())]
    Broken {
        file: PathBuf,
        /// 1-based line number in `file`.
        line: u64,
        problem: Problem,
    },
}

impl VerifyError {
    /// `(file, line, problem)` for a broken log; `None` for an I/O error.
    pub fn location(&self) -> Option<(&Path, u64, &Problem)> {
        match self {
            VerifyError::Broken {
                file,
                line,
                problem,
            } => Some((file, *line, problem)),
            VerifyError::Io { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("the line was edited: its hash does not match the next record's `prev` or the head file (or the next record's `prev` was edited)")]
    Edited,
    #[error("expected seq {expected}, found {found}: records were removed or reordered here")]
    SeqGap { expected: u64, found: u64 },
    #[error("not an audit record: {0}")]
    BadJson(String),
    #[error("torn line (no final newline): a write cut short by a crash, or a truncated file")]
    TornLine,
    #[error("the first record (seq 1) must have an all-zero `prev`")]
    BadGenesis,
    #[error("the log ends at seq {last_seq} but its head file records seq {head_seq}: records were removed from the end")]
    TailTruncated { head_seq: u64, last_seq: u64 },
    #[error("the head file is unreadable: {0}")]
    BadHead(String),
}

/// Verifies one file (and its head file, if there is one next to it).
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyError> {
    verify_files(&[path.to_owned()])
}

/// Verifies files that continue one another, oldest first (`log.2`, `log.1`, `log`): the chain
/// must run across them without a gap. The head file next to the last one is checked.
pub fn verify_files(paths: &[PathBuf]) -> Result<VerifyReport, VerifyError> {
    let head = match paths.last() {
        Some(p) => read_head(p)?,
        None => None,
    };
    let mut v = Verifier {
        head,
        report: VerifyReport {
            files: paths.len(),
            records: 0,
            first_seq: 0,
            last_seq: 0,
            last_hash: String::new(),
            continues_from_seq: None,
            head_seq: None,
        },
        prev: None,
        suspect: None,
        last_file_lines: 0,
    };
    v.report.head_seq = v.head.as_ref().map(|h| h.seq);
    for path in paths {
        v.file(path)?;
    }
    v.finish(paths.last())
}

fn read_head(log: &Path) -> Result<Option<Head>, VerifyError> {
    let path = format::head_path(log);
    match format::read_head(&path) {
        Ok(None) => Ok(None),
        Ok(Some(Ok(h))) => Ok(Some(h)),
        Ok(Some(Err(reason))) => Err(VerifyError::Broken {
            file: path,
            line: 1,
            problem: Problem::BadHead(reason),
        }),
        Err(source) => Err(VerifyError::Io { file: path, source }),
    }
}

/// Where a line is, with what the chain needs of it.
#[derive(Clone)]
struct Seen {
    file: PathBuf,
    line: u64,
    seq: u64,
    hash: Hash,
}

struct Verifier {
    head: Option<Head>,
    report: VerifyReport,
    prev: Option<Seen>,
    /// A broken link from this line to the one after it (`prev`): which of the two was edited
    /// is decided by the next link or the head.
    suspect: Option<Seen>,
    last_file_lines: u64,
}

fn broken(at: &Seen, problem: Problem) -> VerifyError {
    VerifyError::Broken {
        file: at.file.clone(),
        line: at.line,
        problem,
    }
}

impl Verifier {
    fn file(&mut self, path: &Path) -> Result<(), VerifyError> {
        let io_err = |source| VerifyError::Io {
            file: path.to_owned(),
            source,
        };
        let mut reader = BufReader::with_capacity(256 << 10, File::open(path).map_err(io_err)?);
        let mut buf = Vec::new();
        let mut line_no = 0u64;
        loop {
            buf.clear();
            let n = (&mut reader)
                .take(format::MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(io_err)?;
            if n == 0 {
                break;
            }
            line_no += 1;
            let here = |problem| VerifyError::Broken {
                file: path.to_owned(),
                line: line_no,
                problem,
            };
            let line = match buf.strip_suffix(b"\n") {
                Some(l) => l,
                None if n > format::MAX_LINE => {
                    return Err(self.first(here(Problem::BadJson("line longer than 64 MiB".into()))))
                }
                None => return Err(self.first(here(Problem::TornLine))),
            };
            let fields =
                format::parse_chain(line).map_err(|e| self.first(here(Problem::BadJson(e))))?;
            let current = Seen {
                file: path.to_owned(),
                line: line_no,
                seq: fields.seq,
                hash: format::hash_line(line),
            };
            self.link(current, fields.prev)?;
        }
        self.last_file_lines = line_no;
        Ok(())
    }

    /// An error found at the current line comes after a pending suspect, which is reported
    /// first (it is the earlier line).
    fn first(&mut self, err: VerifyError) -> VerifyError {
        match self.suspect.take() {
            Some(s) => broken(&s, Problem::Edited),
            None => err,
        }
    }

    fn link(&mut self, cur: Seen, prev_field: Hash) -> Result<(), VerifyError> {
        match &self.prev {
            None => {
                if cur.seq == 0 {
                    let zero = Problem::SeqGap {
                        expected: 1,
                        found: 0,
                    };
                    return Err(broken(&cur, zero));
                }
                if cur.seq == 1 {
                    if prev_field != ZERO_HASH {
                        return Err(broken(&cur, Problem::BadGenesis));
                    }
                } else {
                    self.report.continues_from_seq = Some(cur.seq.saturating_sub(1));
                }
                self.report.first_seq = cur.seq;
            }
            Some(p) => {
                let expected = p.seq.saturating_add(1);
                if cur.seq != expected {
                    let gap = broken(
                        &cur,
                        Problem::SeqGap {
                            expected,
                            found: cur.seq,
                        },
                    );
                    return Err(self.first(gap));
                }
                let linked = prev_field == p.hash;
                if let Some(s) = self.suspect.take() {
                    // Link s → p was broken. If p → cur is broken too, p itself was altered.
                    let edited = if linked { s } else { p.clone() };
                    return Err(broken(&edited, Problem::Edited));
                }
                if !linked {
                    self.suspect = Some(p.clone());
                }
            }
        }
        if let Some(h) = &self.head {
            if h.seq == cur.seq {
                if h.hash != cur.hash {
                    // The head vouches for this exact line: whatever else, this one changed.
                    self.suspect = None;
                    return Err(broken(&cur, Problem::Edited));
                }
                if let Some(s) = self.suspect.take() {
                    return Err(broken(&s, Problem::Edited));
                }
            }
        }
        self.report.records += 1;
        self.report.last_seq = cur.seq;
        self.prev = Some(cur);
        Ok(())
    }

    fn finish(mut self, last_file: Option<&PathBuf>) -> Result<VerifyReport, VerifyError> {
        if let Some(s) = self.suspect.take() {
            return Err(broken(&s, Problem::Edited));
        }
        if let (Some(h), Some(file)) = (&self.head, last_file) {
            if self.report.last_seq < h.seq {
                return Err(VerifyError::Broken {
                    file: file.clone(),
                    line: self.last_file_lines + 1,
                    problem: Problem::TailTruncated {
                        head_seq: h.seq,
                        last_seq: self.report.last_seq,
                    },
                });
            }
        }
        let last = self.prev.as_ref().map_or(ZERO_HASH, |p| p.hash);
        self.report.last_hash = format::hex_string(&last);
        Ok(self.report)
    }
}
