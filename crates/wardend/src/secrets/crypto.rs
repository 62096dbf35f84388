//! The two keys and the one AEAD: Argon2id turns the master password into a key-encryption key
//! (KEK); the KEK wraps each random 256-bit data key; the data key seals every value with
//! XChaCha20-Poly1305 (192-bit random nonces, so random nonces never collide in practice).
//!
//! Associated data binds every ciphertext to where it belongs: a value to its secret's name,
//! version and creation time; a wrapped data key to the KDF parameters, salt and key id of the
//! keyfile. Moving either elsewhere makes it fail to open.
//!
//! Key material only ever lives in [`SecretBytes`]; the cipher object made for one operation
//! holds a copy of the key on the stack for that operation and zeroizes it when dropped.

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};

use super::memory::SecretBytes;
use super::StoreError;

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
pub const SALT_LEN: usize = 16;

/// Argon2id cost parameters, recorded in the keyfile so a store opens with the parameters it
/// was created with, whatever the configuration says later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Passes over the memory.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// 128 MiB, 4 passes, 1 lane: about 0.4 s per derivation on the development machine (an
    /// AMD EPYC core, release build), so unsealing stays well under 1.5 s on slower hosts while
    /// each password guess costs an attacker the same 128 MiB and time.
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 128 * 1024,
            t_cost: 4,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// Refuses parameters that are too weak to be meant or so large that a tampered keyfile
    /// could make unseal exhaust the machine.
    pub fn validate(&self) -> Result<(), StoreError> {
        let ok = (1..=16).contains(&self.p_cost)
            && (1..=64).contains(&self.t_cost)
            && self.m_cost_kib >= 8 * self.p_cost
            && self.m_cost_kib <= 4 * 1024 * 1024;
        if ok {
            Ok(())
        } else {
            Err(StoreError::InvalidKdf)
        }
    }

    /// Cheap parameters for tests only: no protection against guessing.
    #[cfg(test)]
    pub fn insecure_for_tests() -> Self {
        KdfParams {
            m_cost_kib: 8,
            t_cost: 1,
            p_cost: 1,
        }
    }
}

pub fn random<const N: usize>() -> Result<[u8; N], StoreError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|_| StoreError::Random)?;
    Ok(b)
}

pub fn random_key() -> Result<SecretBytes, StoreError> {
    let mut k = SecretBytes::zeroed(KEY_LEN)?;
    getrandom::getrandom(k.as_mut_slice()).map_err(|_| StoreError::Random)?;
    Ok(k)
}

/// Argon2id(password, salt) → KEK, written straight into locked memory.
pub fn derive_kek(
    password: &[u8],
    salt: &[u8; SALT_LEN],
    p: &KdfParams,
) -> Result<SecretBytes, StoreError> {
    p.validate()?;
    let params = Params::new(p.m_cost_kib, p.t_cost, p.p_cost, Some(KEY_LEN))
        .map_err(|_| StoreError::InvalidKdf)?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let mut kek = SecretBytes::zeroed(KEY_LEN)?;
    argon
        .hash_password_into(password, salt, kek.as_mut_slice())
        .map_err(|_| StoreError::InvalidKdf)?;
    Ok(kek)
}

fn cipher(key: &SecretBytes) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(Key::from_slice(key.as_slice()))
}

/// Encrypts `plain` under `key`; returns ciphertext ‖ tag. The plaintext is copied only into
/// locked scratch memory, encrypted there, and the scratch is wiped on drop.
pub fn seal(
    key: &SecretBytes,
    nonce: &[u8; NONCE_LEN],
    ad: &[u8],
    plain: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let mut scratch = SecretBytes::from_slice(plain)?;
    let tag = cipher(key)
        .encrypt_in_place_detached(XNonce::from_slice(nonce), ad, scratch.as_mut_slice())
        .map_err(|_| StoreError::Crypto)?;
    let mut out = Vec::with_capacity(plain.len() + TAG_LEN);
    out.extend_from_slice(scratch.as_slice());
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Decrypts ciphertext ‖ tag straight into locked memory. `None`: it does not open under this
/// key, nonce and associated data (tampered, corrupted, moved or wrong key).
pub fn open(
    key: &SecretBytes,
    nonce: &[u8; NONCE_LEN],
    ad: &[u8],
    sealed: &[u8],
) -> Result<Option<SecretBytes>, StoreError> {
    if sealed.len() < TAG_LEN {
        return Ok(None);
    }
    let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
    let mut out = SecretBytes::from_slice(ct)?;
    let ok = cipher(key)
        .decrypt_in_place_detached(
            XNonce::from_slice(nonce),
            ad,
            out.as_mut_slice(),
            Tag::from_slice(tag),
        )
        .is_ok();
    Ok(ok.then_some(out))
}

/// Associated data of a value: domain, name, version and creation time.
pub fn value_ad(name: &str, version: u64, created: u64) -> Vec<u8> {
    let mut ad = Vec::with_capacity(32 + name.len());
    ad.extend_from_slice(b"warden-secret-value-v1\0");
    ad.push(name.len() as u8);
    ad.extend_from_slice(name.as_bytes());
    ad.extend_from_slice(&version.to_be_bytes());
    ad.extend_from_slice(&created.to_be_bytes());
    ad
}
