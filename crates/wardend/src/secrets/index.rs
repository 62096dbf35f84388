//! The in-memory index of the store: every kept version of every secret (its ciphertext, and
//! its decrypted value while unsealed), damaged regions kept byte for byte, and the keys while
//! unsealed. Replaying the log's records in order (`State::apply`) rebuilds it; live changes
//! go through the same functions after their record is durable.

use std::collections::HashMap;
use std::sync::Arc;

use super::crypto::NONCE_LEN;
use super::format::{self, Hint, Keyfile, PutRec, Record};
use super::memory::SecretBytes;
use super::StoreError;

pub(super) enum Body {
    Sealed {
        key_id: u32,
        nonce: [u8; NONCE_LEN],
        sealed: Box<[u8]>,
        /// Decrypted value while unsealed.
        plain: Option<Arc<SecretBytes>>,
        /// It did not decrypt at the last unseal.
        bad: bool,
    },
    /// A record that failed its checksum, kept byte for byte.
    Damaged { raw: Box<[u8]> },
}

pub(super) struct Version {
    pub(super) created: u64,
    /// Offset of the record in the current log.
    pub(super) off: u64,
    pub(super) body: Body,
}

impl Version {
    pub(super) fn disk_len(&self, name: &str) -> u64 {
        match &self.body {
            Body::Sealed { sealed, .. } => format::put_len(name, sealed.len()) as u64,
            Body::Damaged { raw } => raw.len() as u64,
        }
    }
}

/// The kept versions of one secret, ascending. A sorted `Vec`: there are at most
/// `keep_versions` of them, and a map node per secret would cost ~1 KB × 100 000 secrets.
#[derive(Default)]
pub(super) struct Versions(Vec<(u64, Version)>);

impl Versions {
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn find(&self, v: u64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&v, |(k, _)| *k)
    }
    pub(super) fn contains_key(&self, v: &u64) -> bool {
        self.find(*v).is_ok()
    }
    pub(super) fn get_key_value(&self, v: &u64) -> Option<(&u64, &Version)> {
        self.find(*v).ok().map(|i| (&self.0[i].0, &self.0[i].1))
    }
    pub(super) fn get_mut(&mut self, v: &u64) -> Option<&mut Version> {
        self.find(*v).ok().map(|i| &mut self.0[i].1)
    }
    pub(super) fn last_key_value(&self) -> Option<(&u64, &Version)> {
        self.0.last().map(|(k, v)| (k, v))
    }
    pub(super) fn insert(&mut self, k: u64, v: Version) -> Option<Version> {
        match self.find(k) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, v)),
            Err(i) => {
                self.0.insert(i, (k, v));
                None
            }
        }
    }
    pub(super) fn remove(&mut self, v: &u64) -> Option<Version> {
        self.find(*v).ok().map(|i| self.0.remove(i).1)
    }
    pub(super) fn pop_first(&mut self) -> Option<(u64, Version)> {
        (!self.0.is_empty()).then(|| self.0.remove(0))
    }
    pub(super) fn keys(&self) -> impl Iterator<Item = &u64> {
        self.0.iter().map(|(k, _)| k)
    }
    pub(super) fn iter(&self) -> impl Iterator<Item = (&u64, &Version)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&u64, &mut Version)> {
        self.0.iter_mut().map(|(k, v)| (&*k, v))
    }
    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut Version> {
        self.0.iter_mut().map(|(_, v)| v)
    }
}

#[derive(Default)]
pub(super) struct Entry {
    pub(super) versions: Versions,
    /// Highest version ever written (never reused, even after destroy).
    pub(super) latest: u64,
    pub(super) deleted: bool,
}

/// Unreadable bytes not attributable to a kept version.
pub(super) struct Orphan {
    pub(super) off: u64,
    pub(super) raw: Box<[u8]>,
    pub(super) hint: Option<Hint>,
}

pub(super) struct Unsealed {
    pub(super) kek: SecretBytes,
    /// The keyfile the KEK opened (its KDF parameters and salt go with the KEK).
    pub(super) keyfile: Keyfile,
    pub(super) keys: HashMap<u32, SecretBytes>,
    pub(super) current: u32,
}

pub(super) struct State {
    pub(super) entries: HashMap<String, Entry>,
    pub(super) orphans: Vec<Orphan>,
    /// The two keyfile copies as read (None: missing or damaged).
    pub(super) keyfiles: [Option<Keyfile>; 2],
    pub(super) unsealed: Option<Unsealed>,
    /// Bytes of the log that compaction would keep.
    pub(super) live_bytes: u64,
    pub(super) keep: usize,
}

impl State {
    fn prune(&mut self, name: &str) {
        let keep = self.keep;
        if let Some(e) = self.entries.get_mut(name) {
            while e.versions.len() > keep {
                if let Some((_, v)) = e.versions.pop_first() {
                    self.live_bytes = self.live_bytes.saturating_sub(v.disk_len(name));
                }
            }
        }
    }

    fn insert_version(&mut self, name: &str, version: u64, v: Version) {
        self.live_bytes += v.disk_len(name);
        let e = self.entries.entry(name.to_owned()).or_default();
        e.latest = e.latest.max(version);
        if let Some(old) = e.versions.insert(version, v) {
            self.live_bytes = self.live_bytes.saturating_sub(old.disk_len(name));
            if let Body::Damaged { raw } = old.body {
                self.live_bytes += raw.len() as u64;
                self.orphans.push(Orphan {
                    off: old.off,
                    raw,
                    hint: Some(Hint {
                        name: name.to_owned(),
                        version: Some(version),
                    }),
                });
            }
        }
        self.prune(name);
    }

    pub(super) fn apply_put(&mut self, p: PutRec, off: u64, plain: Option<Arc<SecretBytes>>) {
        if let Some(e) = self.entries.get_mut(&p.name) {
            e.deleted = false;
        }
        let v = Version {
            created: p.created,
            off,
            body: Body::Sealed {
                key_id: p.key_id,
                nonce: p.nonce,
                sealed: p.sealed.into_boxed_slice(),
                plain,
                bad: false,
            },
        };
        self.insert_version(&p.name, p.version, v);
    }

    pub(super) fn apply_damaged(&mut self, off: u64, raw: &[u8], hint: Option<Hint>) {
        if let Some(Hint {
            name,
            version: Some(version),
        }) = &hint
        {
            let free = self
                .entries
                .get(name)
                .is_none_or(|e| !e.versions.contains_key(version));
            if free {
                let v = Version {
                    created: 0,
                    off,
                    body: Body::Damaged { raw: raw.into() },
                };
                let name = name.clone();
                self.insert_version(&name, *version, v);
                return;
            }
        }
        self.live_bytes += raw.len() as u64;
        self.orphans.push(Orphan {
            off,
            raw: raw.into(),
            hint,
        });
    }

    pub(super) fn apply_destroy(&mut self, name: &str, versions: &[u64]) {
        if let Some(e) = self.entries.get_mut(name) {
            let doomed: Vec<u64> = if versions.is_empty() {
                e.versions.keys().copied().collect()
            } else {
                versions.to_vec()
            };
            for v in doomed {
                if let Some(old) = e.versions.remove(&v) {
                    self.live_bytes = self.live_bytes.saturating_sub(old.disk_len(name));
                }
            }
        }
        let before: u64 = self.orphans.iter().map(|o| o.raw.len() as u64).sum();
        self.orphans.retain(|o| match &o.hint {
            Some(Hint {
                name: n,
                version: Some(v),
            }) => n != name || !(versions.is_empty() || versions.contains(v)),
            Some(Hint {
                name: n,
                version: None,
            }) => n != name || !versions.is_empty(),
            None => true,
        });
        let after: u64 = self.orphans.iter().map(|o| o.raw.len() as u64).sum();
        self.live_bytes = self.live_bytes.saturating_sub(before - after);
    }

    pub(super) fn apply(&mut self, rec: Record, off: u64) {
        match rec {
            Record::Put(p) => self.apply_put(p, off, None),
            Record::Delete { name } => self.entries.entry(name).or_default().deleted = true,
            Record::Destroy { name, versions } => self.apply_destroy(&name, &versions),
            Record::Head {
                name,
                latest,
                deleted,
            } => {
                let e = self.entries.entry(name).or_default();
                e.latest = e.latest.max(latest);
                e.deleted = deleted;
            }
        }
    }

    pub(super) fn visible(&self, name: &str) -> Result<&Entry, StoreError> {
        match self.entries.get(name) {
            Some(e) if !e.deleted && !e.versions.is_empty() => Ok(e),
            _ => Err(StoreError::NotFound {
                name: name.to_owned(),
                version: None,
            }),
        }
    }

    /// Whether a delete, destroy or head record of `name` is damaged: its state is uncertain.
    pub(super) fn marker_damaged(&self, name: &str) -> bool {
        self.orphans.iter().any(|o| {
            o.hint
                .as_ref()
                .is_some_and(|h| h.name == name && h.version.is_none())
        })
    }

    pub(super) fn unsealed(&self) -> Result<&Unsealed, StoreError> {
        self.unsealed.as_ref().ok_or(StoreError::Sealed)
    }

    pub(super) fn wipe(&mut self) {
        self.unsealed = None;
        for e in self.entries.values_mut() {
            for v in e.versions.values_mut() {
                if let Body::Sealed { plain, bad, .. } = &mut v.body {
                    *plain = None;
                    *bad = false;
                }
            }
        }
    }
}
