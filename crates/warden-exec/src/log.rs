//! The output log of one job: stdout and stderr chunks, addressed by byte offset.
//!
//! Offsets count payload bytes of both streams in the order they were appended; each chunk
//! carries its stream tag. The writer appends under a short lock and never waits for readers:
//! readers pull at their own pace and are woken through a `watch` channel when the log grows
//! or closes, so nobody polls. Memory is bounded: the oldest chunks move to unnamed spill files
//! in a directory (unlinked from the start, so a crash leaves nothing behind), and beyond the
//! spill limit the oldest spilled data is dropped; a reader positioned in dropped data gets one
//! [`LogItem::Dropped`] marker naming the lost range, then continues with what is kept.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Bounds of an [`OutputLog`].
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Bytes kept in memory (newest output).
    pub memory_limit: usize,
    /// Directory for spill files; `None`: output beyond `memory_limit` is dropped at once.
    pub spill_dir: Option<PathBuf>,
    /// Bytes kept in spill files; older spilled output is dropped.
    pub spill_limit: u64,
    /// Size of one spill file; the unit in which spilled output is dropped.
    pub segment_size: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            memory_limit: 4 << 20,
            spill_dir: None,
            spill_limit: 256 << 20,
            segment_size: 16 << 20,
        }
    }
}

/// What a reader gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogItem {
    /// Output bytes of one stream, starting at `offset`.
    Data {
        /// Offset of the first byte.
        offset: u64,
        /// Stream of all these bytes.
        stream: Stream,
        /// The bytes.
        bytes: Bytes,
    },
    /// Output in `from..to` was dropped (beyond the log's bounds) before this reader got it.
    Dropped {
        /// First lost offset.
        from: u64,
        /// First offset after the loss.
        to: u64,
    },
}

/// What [`LogReader::next_piece`] yields: a [`LogItem`], except that output already spilled
/// comes as a range of its spill file rather than read into memory, for a caller that can
/// send a file range on by itself (`sendfile`) without copying it through a buffer.
#[derive(Debug, Clone)]
pub enum LogPiece {
    /// Output bytes held in memory.
    Mem {
        /// Offset of the first byte.
        offset: u64,
        /// Stream of all these bytes.
        stream: Stream,
        /// The bytes.
        bytes: Bytes,
    },
    /// Output bytes in a spill file.
    File {
        /// Offset of the first byte.
        offset: u64,
        /// Stream of all these bytes.
        stream: Stream,
        /// Where they are.
        range: FileRange,
    },
    /// As [`LogItem::Dropped`].
    Dropped {
        /// First lost offset.
        from: u64,
        /// First offset after the loss.
        to: u64,
    },
}

impl LogPiece {
    /// The piece as a [`LogItem`], a file range read into memory. Spilled data is recent
    /// enough to be in the page cache; a failed read is reported as a loss rather than
    /// stalling the reader.
    pub fn into_item(self) -> LogItem {
        match self {
            LogPiece::Mem {
                offset,
                stream,
                bytes,
            } => LogItem::Data {
                offset,
                stream,
                bytes,
            },
            LogPiece::File {
                offset,
                stream,
                range,
            } => match range.read() {
                Ok(bytes) => LogItem::Data {
                    offset,
                    stream,
                    bytes,
                },
                Err(_) => LogItem::Dropped {
                    from: offset,
                    to: offset + range.len() as u64,
                },
            },
            LogPiece::Dropped { from, to } => LogItem::Dropped { from, to },
        }
    }
}

impl From<LogItem> for LogPiece {
    fn from(item: LogItem) -> Self {
        match item {
            LogItem::Data {
                offset,
                stream,
                bytes,
            } => LogPiece::Mem {
                offset,
                stream,
                bytes,
            },
            LogItem::Dropped { from, to } => LogPiece::Dropped { from, to },
        }
    }
}

/// A range of a spill file. While any `FileRange` of a file lives, the log does not write
/// over that file (see [`OutputLog`]'s spare segment), so the bytes stay what they were.
#[derive(Debug, Clone)]
pub struct FileRange {
    file: Arc<File>,
    pos: u64,
    len: usize,
}

impl FileRange {
    /// The spill file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Where the range starts in the file.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads the range into memory (a short file is an error: the log wrote it whole).
    pub fn read(&self) -> std::io::Result<Bytes> {
        read_spilled(&self.file, self.pos, self.len)
    }

    /// Grows this range by `next` when `next` continues it in the same file; `false` (and
    /// unchanged) otherwise.
    pub fn extend(&mut self, next: &FileRange) -> bool {
        if Arc::ptr_eq(&self.file, &next.file) && self.pos + self.len as u64 == next.pos {
            self.len += next.len;
            return true;
        }
        false
    }
}

/// Largest chunk stored; bigger appends are split, so one chunk never dominates the bounds.
const MAX_CHUNK: usize = 64 << 10;
/// Most read back from a spill file at once, for a reader behind the memory window.
const SPILL_READ: usize = 128 << 10;
/// What one in-memory chunk costs beyond its bytes (bookkeeping and allocation), counted
/// against the memory limit so that many tiny writes cannot exceed it.
const CHUNK_OVERHEAD: usize = 64;

#[derive(Debug)]
struct MemChunk {
    offset: u64,
    stream: Stream,
    bytes: Bytes,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: u64,
    stream: Stream,
    pos: u64,
    len: u32,
}

#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    len: u64,
    index: Vec<Entry>,
}

#[derive(Debug, Default)]
struct State {
    /// First offset still kept.
    start: u64,
    /// Offset after the last byte appended.
    end: u64,
    segments: VecDeque<Segment>,
    spilled: u64,
    /// The file of the last segment dropped, kept to be written over by the next segment: its
    /// pages are already in the page cache and its blocks allocated, so spilling into it costs
    /// a copy, where a fresh file costs page allocation, block reservation and, when dropped,
    /// invalidation too. Only a file no reader holds is kept (see [`OutputLog::spill`]).
    spare: Option<Arc<File>>,
    mem: VecDeque<MemChunk>,
    mem_bytes: usize,
    closed: bool,
    /// Set when spilling failed once; from then on, overflow is dropped.
    spill_broken: bool,
}

/// The log. Share it as `Arc<OutputLog>`; one writer side ([`append`](Self::append),
/// [`close`](Self::close)), any number of [`LogReader`]s.
#[derive(Debug)]
pub struct OutputLog {
    cfg: LogConfig,
    state: Mutex<State>,
    tx: watch::Sender<u64>,
}

enum Found {
    Mem(Stream, Bytes, u64),
    File(Arc<File>, Entry, u64),
    Dropped(u64, u64),
    Wait,
    End,
}

impl OutputLog {
    /// An empty log.
    pub fn new(cfg: LogConfig) -> Arc<Self> {
        let (tx, _) = watch::channel(0);
        Arc::new(OutputLog {
            cfg,
            state: Mutex::new(State::default()),
            tx,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent state (every update is one step).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends output. Never waits for readers; may write to a spill file.
    pub fn append(&self, stream: Stream, data: &[u8]) {
        self.append_bytes(stream, Bytes::copy_from_slice(data));
    }

    /// Appends output the caller already holds as [`Bytes`], without copying it. The log
    /// keeps (slices of) it until it is spilled or dropped, so `data` should not be a small
    /// view of a much larger buffer that would then stay allocated.
    pub fn append_bytes(&self, stream: Stream, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let end = {
            let mut st = self.lock();
            if st.closed {
                return;
            }
            let mut at = 0;
            while at < data.len() {
                let part = data.slice(at..(at + MAX_CHUNK).min(data.len()));
                at += part.len();
                let offset = st.end;
                st.end += part.len() as u64;
                st.mem_bytes += part.len() + CHUNK_OVERHEAD;
                st.mem.push_back(MemChunk {
                    offset,
                    stream,
                    bytes: part,
                });
            }
            while st.mem_bytes > self.cfg.memory_limit {
                let Some(c) = st.mem.pop_front() else { break };
                st.mem_bytes -= c.bytes.len() + CHUNK_OVERHEAD;
                self.spill(&mut st, c);
            }
            st.end
        };
        self.tx.send_replace(end);
    }

    fn spill(&self, st: &mut State, c: MemChunk) {
        let end = c.offset + c.bytes.len() as u64;
        let Some(dir) = self.cfg.spill_dir.as_ref().filter(|_| !st.spill_broken) else {
            st.start = end;
            return;
        };
        let seg_size = self
            .cfg
            .segment_size
            .max(1)
            .min(self.cfg.spill_limit.max(1));
        if st.segments.back().is_none_or(|s| s.len >= seg_size) {
            let file = match st.spare.take() {
                Some(f) => f,
                None => match tempfile::tempfile_in(dir) {
                    Ok(f) => Arc::new(f),
                    Err(_) => return Self::spill_failed(st, end),
                },
            };
            st.segments.push_back(Segment {
                file,
                len: 0,
                index: Vec::new(),
            });
        }
        let Some(seg) = st.segments.back_mut() else {
            return;
        };
        if seg.file.write_all_at(&c.bytes, seg.len).is_err() {
            return Self::spill_failed(st, end);
        }
        let len = c.bytes.len() as u32;
        // Spilled chunks of one stream are contiguous in offset and file: one index entry
        // covers a whole run, so the index grows with stream switches, not with writes.
        match seg.index.last_mut() {
            Some(e) if e.stream == c.stream && e.len.checked_add(len).is_some() => e.len += len,
            _ => seg.index.push(Entry {
                offset: c.offset,
                stream: c.stream,
                pos: seg.len,
                len,
            }),
        }
        seg.len += u64::from(len);
        st.spilled += u64::from(len);
        while st.spilled > self.cfg.spill_limit && st.segments.len() > 1 {
            if let Some(old) = st.segments.pop_front() {
                st.spilled -= old.len;
                // Readers clone a segment's file only under the state lock, which is held
                // here: if this is the last handle, no reader is reading it or can start to,
                // and it may be written over.
                if Arc::strong_count(&old.file) == 1 {
                    st.spare = Some(old.file);
                }
            }
            if let Some(first) = st.segments.front().and_then(|s| s.index.first()) {
                st.start = first.offset;
            }
        }
    }

    /// A spill file could not be created or written: from now on overflow is dropped, and
    /// what was spilled goes too (the log stays one contiguous kept range).
    fn spill_failed(st: &mut State, end: u64) {
        st.spill_broken = true;
        st.segments.clear();
        st.spare = None;
        st.spilled = 0;
        st.start = end;
    }

    /// Marks the end of output: readers that reach the end get `None`.
    pub fn close(&self) {
        let end = {
            let mut st = self.lock();
            st.closed = true;
            st.end
        };
        self.tx.send_replace(end);
    }

    /// Offset after the last byte appended so far.
    pub fn end(&self) -> u64 {
        self.lock().end
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Memory currently held by in-memory output (bytes plus per-chunk bookkeeping).
    pub fn memory_bytes(&self) -> usize {
        self.lock().mem_bytes
    }

    /// A reader from offset 0.
    pub fn reader(self: &Arc<Self>) -> LogReader {
        self.reader_from(0)
    }

    /// A reader from `offset` (beyond the end: it waits for output to get there).
    pub fn reader_from(self: &Arc<Self>, offset: u64) -> LogReader {
        LogReader {
            log: self.clone(),
            pos: offset,
            rx: self.tx.subscribe(),
        }
    }

    fn locate(&self, pos: u64) -> Found {
        let st = self.lock();
        if pos < st.start {
            return Found::Dropped(pos, st.start);
        }
        if pos >= st.end {
            return if st.closed { Found::End } else { Found::Wait };
        }
        if let Some(first) = st.mem.front() {
            if pos >= first.offset {
                let i = st.mem.partition_point(|c| c.offset <= pos) - 1;
                let c = &st.mem[i];
                let skip = (pos - c.offset) as usize;
                return Found::Mem(c.stream, c.bytes.slice(skip..), c.offset + skip as u64);
            }
        }
        for seg in &st.segments {
            let (Some(first), Some(last)) = (seg.index.first(), seg.index.last()) else {
                continue;
            };
            if pos >= first.offset && pos < last.offset + u64::from(last.len) {
                // The file is cloned only here, under the lock: `spill` relies on it to tell
                // whether a dropped segment's file can be written over.
                let i = seg.index.partition_point(|e| e.offset <= pos) - 1;
                return Found::File(seg.file.clone(), seg.index[i], pos);
            }
        }
        // Not in memory nor in a kept segment: lost to a spill failure.
        let to = st.mem.front().map_or(st.end, |c| c.offset);
        Found::Dropped(pos, to.max(pos + 1))
    }
}

/// Reads `len` spilled bytes at `pos` into a new buffer (not zeroed first: the read fills it).
fn read_spilled(file: &File, pos: u64, len: usize) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let at = pos + buf.len() as u64;
        if crate::sys::pread_into(file.as_fd(), &mut buf, len, at)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

/// One reader's position in an [`OutputLog`]. Readers are independent: any number, any pace.
#[derive(Debug)]
pub struct LogReader {
    log: Arc<OutputLog>,
    pos: u64,
    rx: watch::Receiver<u64>,
}

impl LogReader {
    /// The offset of the next byte this reader will get.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next item without waiting; `None` if nothing is available yet or the log ended.
    pub fn try_next(&mut self) -> Option<LogItem> {
        self.step().ok().flatten()
    }

    /// The next item, waiting for output if needed; `None` once the log is closed and fully
    /// read.
    pub async fn next(&mut self) -> Option<LogItem> {
        self.wait_for(Self::step).await
    }

    /// As [`Self::try_next`], with spilled output as file ranges ([`LogPiece`]).
    pub fn try_next_piece(&mut self) -> Option<LogPiece> {
        self.step_piece().ok().flatten()
    }

    /// As [`Self::next`], with spilled output as file ranges ([`LogPiece`]).
    pub async fn next_piece(&mut self) -> Option<LogPiece> {
        self.wait_for(Self::step_piece).await
    }

    /// Takes `step` until it has something, waiting for output in between.
    async fn wait_for<T>(
        &mut self,
        mut step: impl FnMut(&mut Self) -> Result<Option<T>, ()>,
    ) -> Option<T> {
        loop {
            // Mark the current version seen before looking, so an append between the look and
            // the wait still wakes us.
            self.rx.borrow_and_update();
            match step(self) {
                Ok(item) => return item,
                Err(()) => {
                    if self.rx.changed().await.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// Waits until the log holds output up to `end` (its end offset is at least `end`) or is
    /// closed. A follower uses it to let output gather into a larger piece before it reads.
    pub async fn wait_for_end(&mut self, end: u64) {
        loop {
            self.rx.borrow_and_update();
            let there = {
                let st = self.log.lock();
                st.end >= end || st.closed
            };
            if there {
                return;
            }
            if self.rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// `Ok(Some)`: an item; `Ok(None)`: the end; `Err`: nothing yet. Spilled output is read
    /// into memory, at most [`SPILL_READ`] at a time.
    fn step(&mut self) -> Result<Option<LogItem>, ()> {
        Ok(self.step_piece()?.map(LogPiece::into_item))
    }

    /// [`Self::step`] without reading spilled output: a spilled entry (the spill joins
    /// consecutive output of one stream, up to a segment's size) comes as a range of its file
    /// at most [`SPILL_READ`] long, so that no piece is much larger than one in memory.
    fn step_piece(&mut self) -> Result<Option<LogPiece>, ()> {
        match self.log.locate(self.pos) {
            Found::Mem(stream, bytes, offset) => {
                self.pos = offset + bytes.len() as u64;
                Ok(Some(LogPiece::Mem {
                    offset,
                    stream,
                    bytes,
                }))
            }
            Found::File(file, e, pos) => {
                let skip = pos - e.offset;
                let len = (u64::from(e.len) - skip).min(SPILL_READ as u64);
                self.pos = pos + len;
                Ok(Some(LogPiece::File {
                    offset: pos,
                    stream: e.stream,
                    range: FileRange {
                        file,
                        pos: e.pos + skip,
                        len: len as usize,
                    },
                }))
            }
            Found::Dropped(from, to) => {
                self.pos = to;
                Ok(Some(LogPiece::Dropped { from, to }))
            }
            Found::Wait => Err(()),
            Found::End => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log that spills into `dir` with these bounds.
    fn spilling_log(
        dir: &tempfile::TempDir,
        memory_limit: usize,
        spill_limit: u64,
        segment_size: u64,
    ) -> Arc<OutputLog> {
        OutputLog::new(LogConfig {
            memory_limit,
            spill_dir: Some(dir.path().to_path_buf()),
            spill_limit,
            segment_size,
        })
    }

    async fn drain(mut r: LogReader) -> (Vec<u8>, Vec<(u64, u64)>) {
        let start = r.position() as usize;
        let mut out = Vec::new();
        let mut dropped = Vec::new();
        while let Some(item) = r.next().await {
            match item {
                LogItem::Data { offset, bytes, .. } => {
                    assert_eq!(offset as usize, start + out.len() + dropped_len(&dropped));
                    out.extend_from_slice(&bytes);
                }
                LogItem::Dropped { from, to } => dropped.push((from, to)),
            }
        }
        (out, dropped)
    }

    #[tokio::test]
    async fn pieces_give_spilled_output_as_file_ranges_holding_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        // Segments larger than SPILL_READ: the spill joins a stream's output into entries
        // that long, and a piece must still be no longer than SPILL_READ.
        let log = spilling_log(&dir, 4096, 4 << 20, 1 << 20);
        let byte = |at: usize| (at * 7 % 256) as u8;
        let data: Vec<u8> = (0..600_000).map(byte).collect();
        for c in data.chunks(3000) {
            log.append(Stream::Stdout, c);
        }
        log.close();
        let mut r = log.reader();
        let (mut out, mut files, mut mems) = (Vec::new(), 0, 0);
        while let Some(piece) = r.next_piece().await {
            match piece {
                LogPiece::Mem { offset, bytes, .. } => {
                    assert_eq!(offset as usize, out.len());
                    out.extend_from_slice(&bytes);
                    mems += 1;
                }
                LogPiece::File { offset, range, .. } => {
                    assert_eq!(offset as usize, out.len());
                    assert!(range.len() <= SPILL_READ, "{} bytes", range.len());
                    out.extend_from_slice(&range.read().unwrap());
                    files += 1;
                }
                LogPiece::Dropped { from, to } => panic!("dropped {from}..{to}"),
            }
        }
        assert_eq!(out, data);
        assert!(
            files > 1 && mems > 0,
            "{files} file pieces, {mems} in memory"
        );
    }

    #[tokio::test]
    async fn a_held_file_range_keeps_its_bytes_while_the_log_moves_on() {
        let dir = tempfile::tempdir().unwrap();
        let log = spilling_log(&dir, 1000, 8192, 4096);
        let byte = |at: usize| (at % 251) as u8;
        let data: Vec<u8> = (0..20_000).map(byte).collect();
        for c in data.chunks(700) {
            log.append(Stream::Stdout, c);
        }
        let start = log.lock().start;
        let mut r = log.reader_from(start);
        let Some(LogPiece::File { offset, range, .. }) = r.try_next_piece() else {
            panic!("the oldest kept output is spilled");
        };
        let want: Vec<u8> = (0..range.len())
            .map(|i| byte(offset as usize + i))
            .collect();
        // Far more output than the log keeps: the range's segment is dropped, and others
        // are written over many times.
        for _ in 0..200 {
            log.append(Stream::Stdout, &[0xee; 700]);
        }
        assert!(log.lock().start > offset + range.len() as u64);
        assert_eq!(&range.read().unwrap()[..], &want[..]);
    }

    #[test]
    fn file_ranges_extend_only_where_they_continue() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(tempfile::tempfile_in(dir.path()).unwrap());
        let other = Arc::new(tempfile::tempfile_in(dir.path()).unwrap());
        let range = |file: &Arc<File>, pos, len| FileRange {
            file: file.clone(),
            pos,
            len,
        };
        let mut a = range(&file, 10, 5);
        assert!(a.extend(&range(&file, 15, 3)));
        assert_eq!((a.pos(), a.len()), (10, 8));
        assert!(!a.extend(&range(&file, 19, 1)), "a gap");
        assert!(!a.extend(&range(&other, 18, 1)), "another file");
        assert_eq!((a.pos(), a.len()), (10, 8));
    }

    fn dropped_len(d: &[(u64, u64)]) -> usize {
        d.iter().map(|(a, b)| (b - a) as usize).sum()
    }

    #[tokio::test]
    async fn two_readers_from_offset_zero_see_identical_bytes_and_all_byte_values() {
        readers_see_identical_bytes(2).await;
    }

    #[tokio::test]
    async fn a_hundred_readers_from_offset_zero_see_identical_bytes() {
        readers_see_identical_bytes(100).await;
    }

    async fn readers_see_identical_bytes(n: usize) {
        let log = OutputLog::new(LogConfig::default());
        let all: Vec<u8> = (0..=255u8).collect();
        let readers: Vec<_> = (0..n).map(|_| tokio::spawn(drain(log.reader()))).collect();
        for _ in 0..100 {
            log.append(Stream::Stdout, &all);
            tokio::task::yield_now().await;
        }
        log.close();
        let late = drain(log.reader()).await;
        for r in readers {
            assert_eq!(r.await.unwrap(), late);
        }
        assert_eq!(late.0.len(), 25_600);
        assert_eq!(&late.0[..256], &all[..]);
    }

    #[tokio::test]
    async fn streams_stay_tagged() {
        let log = OutputLog::new(LogConfig::default());
        log.append(Stream::Stdout, b"out");
        log.append(Stream::Stderr, b"err");
        log.close();
        let mut r = log.reader_from(1);
        assert_eq!(
            r.next().await,
            Some(LogItem::Data {
                offset: 1,
                stream: Stream::Stdout,
                bytes: Bytes::from_static(b"ut")
            })
        );
        assert_eq!(
            r.next().await,
            Some(LogItem::Data {
                offset: 3,
                stream: Stream::Stderr,
                bytes: Bytes::from_static(b"err")
            })
        );
        assert_eq!(r.next().await, None);
    }

    #[tokio::test]
    async fn spills_to_file_and_readers_still_get_everything() {
        let dir = tempfile::tempdir().unwrap();
        let log = spilling_log(&dir, 1000, 1 << 20, 4096);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for c in data.chunks(777) {
            log.append(Stream::Stdout, c);
            assert!(log.memory_bytes() <= 1000);
        }
        log.close();
        let (got, dropped) = drain(log.reader()).await;
        assert!(dropped.is_empty());
        assert_eq!(got, data);
        // Spill files are unnamed: nothing is visible in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn spilled_output_keeps_its_stream_tags_and_tiny_writes_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let log = spilling_log(&dir, 4096, 1 << 30, 1 << 20);
        for i in 0..50_000u32 {
            let s = if i % 3 == 0 {
                Stream::Stderr
            } else {
                Stream::Stdout
            };
            log.append(s, &[(i % 256) as u8]);
            assert!(log.memory_bytes() <= 4096);
        }
        log.close();
        let mut r = log.reader();
        let mut n = 0u32;
        while let Some(item) = r.next().await {
            let LogItem::Data { stream, bytes, .. } = item else {
                panic!("nothing may be dropped here");
            };
            for b in bytes.iter() {
                let want = if n % 3 == 0 {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                };
                assert_eq!((stream, *b), (want, (n % 256) as u8), "byte {n}");
                n += 1;
            }
        }
        assert_eq!(n, 50_000);
    }

    #[tokio::test]
    async fn beyond_the_cap_the_oldest_output_is_dropped_with_a_marker() {
        let dir = tempfile::tempdir().unwrap();
        let log = spilling_log(&dir, 1000, 8192, 4096);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        for c in data.chunks(500) {
            log.append(Stream::Stdout, c);
        }
        log.close();
        let mut r = log.reader();
        let Some(LogItem::Dropped { from: 0, to }) = r.next().await else {
            panic!("expected a drop marker first");
        };
        assert!(to > 0 && to < 100_000);
        let (rest, more) = drain(log.reader_from(to)).await;
        assert!(more.is_empty());
        assert_eq!(&rest[..], &data[to as usize..]);
    }

    #[tokio::test]
    async fn a_dropped_segment_is_written_over_only_when_no_reader_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = spilling_log(&dir, 1000, 8192, 4096);
        let byte = |at: usize| (at % 251) as u8;
        let data: Vec<u8> = (0..200_000).map(byte).collect();
        // A follower reads a little after every write, so it reads spilled segments while the
        // writer keeps dropping and reusing them.
        let mut follower = log.reader();
        let mut followed = 0usize;
        let mut reused = 0;
        for c in data.chunks(700) {
            let had_spare = log.lock().spare.is_some();
            log.append(Stream::Stdout, c);
            if had_spare && log.lock().spare.is_none() {
                reused += 1;
            }
            if let Some(item) = follower.try_next() {
                match item {
                    LogItem::Data { offset, bytes, .. } => {
                        for (i, b) in bytes.iter().enumerate() {
                            assert_eq!(*b, byte(offset as usize + i), "at {}", offset as usize + i);
                        }
                        followed += bytes.len();
                    }
                    LogItem::Dropped { .. } => {}
                }
            }
        }
        assert!(followed > 0);
        assert!(reused > 10, "segments were reused {reused} times");
        // A reader holding a segment's file (found, not yet read) keeps it from being reused.
        let kept = log
            .lock()
            .segments
            .front()
            .map(|s| s.index[0].offset)
            .unwrap();
        let Found::File(held, ..) = log.locate(kept) else {
            panic!("the oldest kept output is in a spill file");
        };
        log.lock().spare = None;
        while log
            .lock()
            .segments
            .front()
            .is_some_and(|s| Arc::ptr_eq(&s.file, &held))
        {
            log.append(Stream::Stdout, &[1u8; 700]);
        }
        assert!(
            log.lock().spare.is_none(),
            "a file a reader holds was kept for reuse"
        );
        drop(held);
        // Whatever the log still keeps reads back exactly as written.
        log.close();
        let start = log.lock().start;
        let (rest, dropped) = drain(log.reader_from(start)).await;
        assert!(dropped.is_empty());
        assert!(rest.len() > 4096, "{} bytes kept", rest.len());
        for (i, b) in rest.iter().enumerate() {
            let at = start as usize + i;
            let want = if at < data.len() { byte(at) } else { 1 };
            assert_eq!(*b, want, "at {at}");
        }
    }

    #[tokio::test]
    async fn without_spill_dir_overflow_is_dropped_and_memory_stays_bounded() {
        let log = OutputLog::new(LogConfig {
            memory_limit: 10_000,
            spill_dir: None,
            ..LogConfig::default()
        });
        for _ in 0..1000 {
            log.append(Stream::Stderr, &[7u8; 1000]);
        }
        assert!(log.memory_bytes() <= 10_000);
        log.close();
        let mut r = log.reader();
        assert!(matches!(
            r.next().await,
            Some(LogItem::Dropped { from: 0, .. })
        ));
    }

    #[tokio::test]
    async fn a_reader_that_stops_reading_does_not_slow_the_writer() {
        let log = OutputLog::new(LogConfig {
            memory_limit: 1 << 20,
            ..LogConfig::default()
        });
        let mut stalled = log.reader();
        log.append(Stream::Stdout, b"first");
        assert!(stalled.next().await.is_some());
        // `stalled` never reads again. The writer must not wait for it.
        let chunk = vec![1u8; 64 << 10];
        let t = std::time::Instant::now();
        for _ in 0..(256 << 20) / chunk.len() {
            log.append(Stream::Stdout, &chunk);
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(20));
        assert!(log.memory_bytes() <= 1 << 20);
        assert_eq!(stalled.position(), 5);
    }

    #[tokio::test]
    async fn a_follower_is_woken_by_new_output_without_polling() {
        let log = OutputLog::new(LogConfig::default());
        let mut r = log.reader();
        let h = tokio::spawn(async move { r.next().await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!h.is_finished());
        log.append(Stream::Stdout, b"x");
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), h)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(got, Some(LogItem::Data { offset: 0, .. })));
    }
}
