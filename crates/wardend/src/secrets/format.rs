//! On-disk formats: the self-checksummed records of the log, the scan that reads them back
//! without letting one damaged record hide the others, and the keyfile.
//!
//! A record is framed as
//!
//! ```text
//! magic "WRC1" (4) | body length u32 LE (4) | header sum (4) | body sum (8) | body
//! ```
//!
//! The header sum (SHA-256 over magic and length, truncated) tells a damaged length from a
//! record torn by a crash: a header that checks out but whose body runs past the end of the
//! file is the one write that was in flight, never acknowledged, and is dropped; a header that
//! does not check out is damage, reported, and the scan resynchronises on the next magic whose
//! header and body both check out. Every body starts and ends with the record's identity
//! (kind, name, version) under its own small checksum, so whichever single byte is damaged, one
//! copy still names the secret and version to report the damage against. Checksums catch
//! accidents; the AEAD on each value catches tampering with values.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::crypto::{KdfParams, KEY_LEN, NONCE_LEN, SALT_LEN, TAG_LEN};
use super::valid_name;

const MAGIC: &[u8; 4] = b"WRC1";
pub const HDR_LEN: usize = 20;
/// Largest body the scan accepts (a value is at most `MAX_VALUE_LEN`).
const MAX_BODY: usize = 2 * 1024 * 1024;

const K_PUT: u8 = 1;
const K_DELETE: u8 = 2;
const K_DESTROY: u8 = 3;
const K_HEAD: u8 = 4;

/// One sealed version of one secret, as stored.
#[derive(Clone)]
pub struct PutRec {
    pub name: String,
    pub version: u64,
    pub created: u64,
    pub key_id: u32,
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext ‖ tag.
    pub sealed: Vec<u8>,
}

pub enum Record {
    Put(PutRec),
    /// Soft delete: hides the name; its versions stay.
    Delete {
        name: String,
    },
    /// Erase the listed versions (all when empty).
    Destroy {
        name: String,
        versions: Vec<u64>,
    },
    /// Written by compaction: the version counter and deleted flag survive even when no
    /// version record is left, so a version number is never reused.
    Head {
        name: String,
        latest: u64,
        deleted: bool,
    },
}

fn sum(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// The identity of a record (kind, name, version) with its own small checksum. Every record
/// carries it twice, at the start and at the end of its body, so that any single damaged byte
/// leaves one readable copy and the damage is reported against the right secret and version.
fn id_sum(kind: u8, name: &str, version: u64) -> [u8; 4] {
    let s = sum(&[
        b"id",
        &[kind, name.len() as u8],
        name.as_bytes(),
        &version.to_le_bytes(),
    ]);
    [s[0], s[1], s[2], s[3]]
}

fn push_head_id(b: &mut Vec<u8>, kind: u8, name: &str, version: u64) {
    b.push(kind);
    b.push(name.len() as u8);
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&id_sum(kind, name, version));
}

fn push_tail_id(b: &mut Vec<u8>, kind: u8, name: &str, version: u64) {
    b.push(kind);
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&version.to_le_bytes());
    b.push(name.len() as u8);
    b.extend_from_slice(&id_sum(kind, name, version));
}

fn id_len(name: &str) -> usize {
    1 + 1 + name.len() + 8 + 4
}

/// Offset of the sealed value inside an encoded Put record (to overwrite it in place).
pub fn put_sealed_offset(name: &str) -> usize {
    HDR_LEN + id_len(name) + 8 + 4 + NONCE_LEN + 4
}

/// Length of an encoded Put record.
pub fn put_len(name: &str, sealed_len: usize) -> usize {
    put_sealed_offset(name) + sealed_len + id_len(name)
}

pub fn encode(rec: &Record) -> Vec<u8> {
    let mut body = Vec::new();
    let (kind, name, version) = match rec {
        Record::Put(p) => {
            push_head_id(&mut body, K_PUT, &p.name, p.version);
            body.extend_from_slice(&p.created.to_le_bytes());
            body.extend_from_slice(&p.key_id.to_le_bytes());
            body.extend_from_slice(&p.nonce);
            body.extend_from_slice(&(p.sealed.len() as u32).to_le_bytes());
            body.extend_from_slice(&p.sealed);
            (K_PUT, &p.name, p.version)
        }
        Record::Delete { name } => {
            push_head_id(&mut body, K_DELETE, name, 0);
            (K_DELETE, name, 0)
        }
        Record::Destroy { name, versions } => {
            push_head_id(&mut body, K_DESTROY, name, 0);
            body.extend_from_slice(&(versions.len() as u32).to_le_bytes());
            for v in versions {
                body.extend_from_slice(&v.to_le_bytes());
            }
            (K_DESTROY, name, 0)
        }
        Record::Head {
            name,
            latest,
            deleted,
        } => {
            push_head_id(&mut body, K_HEAD, name, 0);
            body.extend_from_slice(&latest.to_le_bytes());
            body.push(u8::from(*deleted));
            (K_HEAD, name, 0)
        }
    };
    push_tail_id(&mut body, kind, name, version);
    let len = (body.len() as u32).to_le_bytes();
    let mut out = Vec::with_capacity(HDR_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&len);
    out.extend_from_slice(&sum(&[b"hdr", MAGIC, &len])[..4]);
    out.extend_from_slice(&sum(&[&body])[..8]);
    out.extend_from_slice(&body);
    out
}

/// A little cursor that fails instead of panicking.
struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }
    fn name(&mut self) -> Option<String> {
        let n = self.u8()? as usize;
        let s = std::str::from_utf8(self.take(n)?).ok()?;
        valid_name(s).then(|| s.to_owned())
    }
    /// The identity at the start of a body, if its checksum holds.
    fn head_id(&mut self) -> Option<(u8, String, u64)> {
        let kind = self.u8()?;
        let name = self.name()?;
        let version = self.u64()?;
        (self.take(4)? == id_sum(kind, &name, version)).then_some((kind, name, version))
    }
}

/// The identity at the end of `body`, if its checksum holds.
fn tail_id(body: &[u8]) -> Option<(u8, String, u64)> {
    let n = body.len();
    if n < 14 {
        return None;
    }
    let s = &body[n - 4..];
    let name_len = body[n - 5] as usize;
    let version = u64::from_le_bytes(body[n - 13..n - 5].try_into().ok()?);
    let name_start = (n - 13).checked_sub(name_len)?;
    let kind = *body.get(name_start.checked_sub(1)?)?;
    let name = std::str::from_utf8(&body[name_start..n - 13]).ok()?;
    (valid_name(name) && s == id_sum(kind, name, version)).then(|| (kind, name.to_owned(), version))
}

fn decode_body(body: &[u8]) -> Option<Record> {
    let mut r = Rd(body);
    let (kind, name, version) = r.head_id()?;
    let rec = match kind {
        K_PUT => {
            let created = r.u64()?;
            let key_id = r.u32()?;
            let nonce = r.take(NONCE_LEN)?.try_into().ok()?;
            let n = r.u32()? as usize;
            if n < TAG_LEN {
                return None;
            }
            let sealed = r.take(n)?.to_vec();
            Record::Put(PutRec {
                name: name.clone(),
                version,
                created,
                key_id,
                nonce,
                sealed,
            })
        }
        K_DELETE => Record::Delete { name: name.clone() },
        K_DESTROY => {
            let n = r.u32()? as usize;
            let mut versions = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                versions.push(r.u64()?);
            }
            Record::Destroy {
                name: name.clone(),
                versions,
            }
        }
        K_HEAD => Record::Head {
            name: name.clone(),
            latest: r.u64()?,
            deleted: r.u8()? != 0,
        },
        _ => return None,
    };
    let tail_ok = r.0.len() == id_len(&name) && tail_id(r.0)? == (kind, name, version);
    tail_ok.then_some(rec)
}

/// What a damaged region was: enough to report it against its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    pub name: String,
    /// The version, when the region was a value record.
    pub version: Option<u64>,
}

/// Reads the identity of a damaged record from whichever of its two copies is intact.
fn hint(body: &[u8]) -> Option<Hint> {
    let (kind, name, version) = Rd(body).head_id().or_else(|| tail_id(body))?;
    match kind {
        K_PUT => Some(Hint {
            name,
            version: Some(version),
        }),
        K_DELETE | K_DESTROY | K_HEAD => Some(Hint {
            name,
            version: None,
        }),
        _ => None,
    }
}

pub enum Item {
    Good {
        off: usize,
        /// Record length (the tests use it to tell which record a byte belongs to).
        #[cfg_attr(not(test), allow(dead_code))]
        len: usize,
        rec: Record,
    },
    /// Bytes that are not a valid record; kept verbatim by compaction so the damage stays
    /// visible until the entry is destroyed.
    Bad {
        off: usize,
        len: usize,
        hint: Option<Hint>,
    },
}

pub struct Scan {
    pub items: Vec<Item>,
    /// Length of the log without a torn last write (to truncate to before appending).
    pub clean_len: usize,
}

enum Try {
    Ok(Record, usize),
    /// A valid header whose body runs past the end of the file.
    Torn,
    Bad,
}

/// The body length from the header at `pos`, if the header checks out.
fn header_len(buf: &[u8], pos: usize) -> Option<usize> {
    let rest = buf.get(pos..pos + HDR_LEN)?;
    if &rest[..4] != MAGIC || rest[8..12] != sum(&[b"hdr", MAGIC, &rest[4..8]])[..4] {
        return None;
    }
    let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
    (len <= MAX_BODY).then_some(len)
}

fn try_at(buf: &[u8], pos: usize) -> Try {
    let Some(len) = header_len(buf, pos) else {
        return Try::Bad;
    };
    let rest = &buf[pos..];
    if rest.len() < HDR_LEN + len {
        return Try::Torn;
    }
    let body = &rest[HDR_LEN..HDR_LEN + len];
    if rest[12..20] != sum(&[body])[..8] {
        return Try::Bad;
    }
    match decode_body(body) {
        Some(rec) => Try::Ok(rec, HDR_LEN + len),
        None => Try::Bad,
    }
}

/// Whether the bytes from `pos` to the end are what a crash during one append leaves behind.
fn benign_tail(buf: &[u8], pos: usize) -> bool {
    let rest = &buf[pos..];
    if rest.iter().all(|&b| b == 0) {
        return true;
    }
    if rest.len() < HDR_LEN {
        let n = rest.len().min(4);
        return rest[..n] == MAGIC[..n];
    }
    matches!(try_at(buf, pos), Try::Torn)
}

/// Reads every record of a log. Damage costs only the records it touches.
pub fn scan(buf: &[u8]) -> Scan {
    let mut items = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        match try_at(buf, pos) {
            Try::Ok(rec, len) => {
                items.push(Item::Good { off: pos, len, rec });
                pos += len;
                continue;
            }
            _ if benign_tail(buf, pos) => {
                return Scan {
                    items,
                    clean_len: pos,
                };
            }
            _ => {}
        }
        // Damage: find where the next readable record (or a torn last one) starts.
        let mut next = buf.len();
        let mut q = pos + 1;
        while q + 4 <= buf.len() {
            if &buf[q..q + 4] == MAGIC && !matches!(try_at(buf, q), Try::Bad) {
                next = q;
                break;
            }
            q += 1;
        }
        // The body ends where the header says if the header is intact, else where the next
        // record starts.
        let body_end = match header_len(buf, pos) {
            Some(len) if pos + HDR_LEN + len <= next => pos + HDR_LEN + len,
            _ => next,
        };
        let h = buf.get(pos + HDR_LEN..body_end).and_then(hint);
        items.push(Item::Bad {
            off: pos,
            len: next - pos,
            hint: h,
        });
        pos = next;
    }
    Scan {
        items,
        clean_len: buf.len(),
    }
}

// ---- keyfile ---------------------------------------------------------------------------------

const KEY_MAGIC: &[u8; 8] = b"WKEY1\0\0\0";
pub const WRAPPED_LEN: usize = KEY_LEN + TAG_LEN;

#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub id: u32,
    pub nonce: [u8; NONCE_LEN],
    pub wrapped: [u8; WRAPPED_LEN],
}

/// The small file holding the KDF parameters, the salt and the wrapped data keys. Two copies
/// (`key.a`, `key.b`) are kept; each is replaced atomically, one after the other.
#[derive(Clone, PartialEq, Eq)]
pub struct Keyfile {
    pub generation: u64,
    pub kdf: KdfParams,
    pub salt: [u8; SALT_LEN],
    pub keys: Vec<WrappedKey>,
}

impl Keyfile {
    /// Associated data for wrapping data key `id`: ties it to these KDF parameters and salt.
    pub fn wrap_ad(&self, id: u32) -> Vec<u8> {
        let mut ad = b"warden-keyfile-v1\0".to_vec();
        ad.extend_from_slice(&self.kdf.m_cost_kib.to_le_bytes());
        ad.extend_from_slice(&self.kdf.t_cost.to_le_bytes());
        ad.extend_from_slice(&self.kdf.p_cost.to_le_bytes());
        ad.extend_from_slice(&self.salt);
        ad.extend_from_slice(&id.to_le_bytes());
        ad
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = KEY_MAGIC.to_vec();
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&self.kdf.m_cost_kib.to_le_bytes());
        b.extend_from_slice(&self.kdf.t_cost.to_le_bytes());
        b.extend_from_slice(&self.kdf.p_cost.to_le_bytes());
        b.extend_from_slice(&self.salt);
        b.extend_from_slice(&(self.keys.len() as u32).to_le_bytes());
        for k in &self.keys {
            b.extend_from_slice(&k.id.to_le_bytes());
            b.extend_from_slice(&k.nonce);
            b.extend_from_slice(&k.wrapped);
        }
        let s = sum(&[&b]);
        b.extend_from_slice(&s);
        b
    }

    /// `None`: not a keyfile, or damaged.
    pub fn decode(buf: &[u8]) -> Option<Keyfile> {
        if buf.len() < 32 {
            return None;
        }
        let (data, s) = buf.split_at(buf.len() - 32);
        if sum(&[data]) != s {
            return None;
        }
        let mut r = Rd(data);
        if r.take(8)? != KEY_MAGIC {
            return None;
        }
        let generation = r.u64()?;
        let kdf = KdfParams {
            m_cost_kib: r.u32()?,
            t_cost: r.u32()?,
            p_cost: r.u32()?,
        };
        let salt = r.take(SALT_LEN)?.try_into().ok()?;
        let n = r.u32()? as usize;
        if n > 64 {
            return None;
        }
        let mut keys = Vec::with_capacity(n);
        for _ in 0..n {
            keys.push(WrappedKey {
                id: r.u32()?,
                nonce: r.take(NONCE_LEN)?.try_into().ok()?,
                wrapped: r.take(WRAPPED_LEN)?.try_into().ok()?,
            });
        }
        (r.0.is_empty() && !keys.is_empty()).then_some(Keyfile {
            generation,
            kdf,
            salt,
            keys,
        })
    }
}

// ---- files -----------------------------------------------------------------------------------

pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `dir/name` atomically: write a temporary file, fsync it, rename it over the old
/// one, fsync the directory. After a crash at any point the file is either old or new.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(name))?;
    fsync_dir(dir)
}
