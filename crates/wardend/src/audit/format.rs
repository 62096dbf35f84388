//! The on-disk format shared by the writer, the verifier and the resume logic: how a line starts,
//! what is hashed, how the head file looks, and how to find the last line of a large file
//! without reading all of it.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// SHA-256 of a line's exact bytes, without its `\n`.
pub(crate) type Hash = [u8; 32];

/// The `prev` of the first record of a new log.
pub(crate) const ZERO_HASH: Hash = [0; 32];

/// A line longer than this is not something the writer produced; refusing it bounds the memory
/// the resume logic and the verifier need for a corrupted file.
pub(crate) const MAX_LINE: usize = 64 << 20;

pub(crate) fn hash_line(line: &[u8]) -> Hash {
    Sha256::digest(line).into()
}

pub(crate) fn hex64(hash: &Hash) -> [u8; 64] {
    let mut out = [0u8; 64];
    // Cannot fail: the output is exactly twice the input length.
    let _ = hex::encode_to_slice(hash, &mut out);
    out
}

pub(crate) fn hex_string(hash: &Hash) -> String {
    hex::encode(hash)
}

/// Parses 64 lowercase hex digits (the only spelling the writer produces: an uppercase `prev`
/// would hash differently, so it is refused rather than normalised).
pub(crate) fn parse_hash(s: &str) -> Option<Hash> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// RFC 3339, UTC, microseconds: `2024-05-01T12:34:56.123456Z`.
pub(crate) fn rfc3339_micros(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.microsecond()
    )
}

/// Appends `{"seq":N,"time":"…","prev":"…",` — the chain fields only the writer knows. The
/// caller's pre-serialized body (its object without the opening `{`) follows.
pub(crate) fn push_prefix(buf: &mut Vec<u8>, seq: u64, time: &str, prev: &Hash) {
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = write!(buf, "{{\"seq\":{seq},\"time\":\"");
    buf.extend_from_slice(time.as_bytes());
    buf.extend_from_slice(b"\",\"prev\":\"");
    buf.extend_from_slice(&hex64(prev));
    buf.extend_from_slice(b"\",");
}

/// The two fields of a line the chain depends on. Parsing into this validates the whole line as
/// JSON (serde still reads the fields it ignores).
#[derive(Deserialize)]
struct ChainFieldsRaw<'a> {
    seq: u64,
    #[serde(borrow)]
    prev: &'a str,
}

pub(crate) struct ChainFields {
    pub seq: u64,
    pub prev: Hash,
}

pub(crate) fn parse_chain(line: &[u8]) -> Result<ChainFields, String> {
    let raw: ChainFieldsRaw<'_> = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let prev =
        parse_hash(raw.prev).ok_or_else(|| "`prev` is not 64 lowercase hex digits".to_string())?;
    Ok(ChainFields { seq: raw.seq, prev })
}

/// `<path>.head`: the seq and hash of the last record known durable, rewritten after each batch.
pub(crate) fn head_path(path: &Path) -> PathBuf {
    with_suffix(path, ".head")
}

/// `<path>.N`: the N-th most recent rotated file.
pub(crate) fn rotated_path(path: &Path, n: usize) -> PathBuf {
    with_suffix(path, &format!(".{n}"))
}

pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[derive(Deserialize)]
struct HeadRaw {
    seq: u64,
    hash: String,
}

pub(crate) struct Head {
    pub seq: u64,
    pub hash: Hash,
}

pub(crate) fn head_line(seq: u64, hash: &Hash) -> String {
    format!("{{\"seq\":{seq},\"hash\":\"{}\"}}\n", hex_string(hash))
}

/// Reads a head file: `Ok(None)` when there is none, `Err(reason)` when it is unreadable.
pub(crate) fn read_head(path: &Path) -> io::Result<Option<Result<Head, String>>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let parsed = serde_json::from_slice::<HeadRaw>(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|h| match parse_hash(&h.hash) {
            Some(hash) => Ok(Head { seq: h.seq, hash }),
            None => Err("`hash` is not 64 lowercase hex digits".to_string()),
        });
    Ok(Some(parsed))
}

/// Where a file's complete lines end and what its last complete line is.
pub(crate) struct LastLine {
    /// Length of the file up to and including its last `\n` (0 if it has none). Anything after
    /// it is a torn write.
    pub complete_len: u64,
    /// The last complete line, without its `\n`.
    pub line: Option<Vec<u8>>,
}

const SCAN_CHUNK: u64 = 64 << 10;

/// Finds the last complete line of `file` (of length `len`) by reading backwards in chunks, so
/// resuming a 100 MiB log reads a few KiB.
pub(crate) fn scan_last_line(file: &File, len: u64) -> io::Result<LastLine> {
    let Some(last_nl) = rfind_newline(file, len, len)? else {
        return Ok(LastLine {
            complete_len: 0,
            line: None,
        });
    };
    let start = match rfind_newline(file, last_nl, MAX_LINE as u64)? {
        Some(p) => p + 1,
        None if last_nl <= MAX_LINE as u64 => 0,
        None => return Err(io::Error::other("the last line is longer than 64 MiB")),
    };
    let mut line = vec![0u8; (last_nl - start) as usize];
    file.read_exact_at(&mut line, start)?;
    Ok(LastLine {
        complete_len: last_nl + 1,
        line: Some(line),
    })
}

/// Offset of the last `\n` before `end`, looking back at most `limit` bytes.
pub(crate) fn rfind_newline(file: &File, end: u64, limit: u64) -> io::Result<Option<u64>> {
    let floor = end.saturating_sub(limit);
    let mut hi = end;
    let mut chunk = vec![0u8; SCAN_CHUNK as usize];
    while hi > floor {
        let lo = hi.saturating_sub(SCAN_CHUNK).max(floor);
        let buf = &mut chunk[..(hi - lo) as usize];
        file.read_exact_at(buf, lo)?;
        if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(lo + i as u64));
        }
        hi = lo;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_714_566_896_123_456);
        assert_eq!(rfc3339_micros(t), "2024-05-01T12:34:56.123456Z");
    }

    #[test]
    fn prefix_is_seq_time_prev_in_that_order() {
        let mut buf = Vec::new();
        push_prefix(&mut buf, 7, "T", &ZERO_HASH);
        let s = String::from_utf8(buf).unwrap();
        assert_eq!(
            s,
            format!(
                "{{\"seq\":7,\"time\":\"T\",\"prev\":\"{}\",",
                "0".repeat(64)
            )
        );
    }

    #[test]
    fn hashes_must_be_lowercase_hex() {
        assert!(parse_hash(&"ab".repeat(32)).is_some());
        assert!(parse_hash(&"AB".repeat(32)).is_none());
        assert!(parse_hash("abc").is_none());
    }

    #[test]
    fn last_line_is_found_across_chunk_boundaries_and_torn_tails_are_excluded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut f = File::create(&p).unwrap();
        let long = "x".repeat(200_000);
        write!(f, "first\n{long}\ntorn").unwrap();
        let f = File::open(&p).unwrap();
        let len = f.metadata().unwrap().len();
        let last = scan_last_line(&f, len).unwrap();
        assert_eq!(last.line.unwrap(), long.as_bytes());
        assert_eq!(last.complete_len, len - 4);

        let empty = File::create(dir.path().join("e")).unwrap();
        let last = scan_last_line(&empty, 0).unwrap();
        assert!(last.line.is_none());
        assert_eq!(last.complete_len, 0);
    }
}
