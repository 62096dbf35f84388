//! Lumo signatures: HMAC-SHA256 over `{command}:{params_json}:{timestamp}:{nonce}`.
//!
//! Pure functions, shared by the daemon (verifying), the CLI and client (signing) and the
//! benchmark. Whether the timestamp is fresh and the nonce unused is the daemon's to check; this
//! module only answers whether the signature is right.
//!
//! Which params text is signed: Lumo signs its canonical re-encoding ([`lumo_canonical`]); its
//! shipped bash client signs compact JSON in its own key order, i.e. the bytes it sends. warden
//! accepts either (`PROTOCOLS.md`), trying the bytes as sent first since they need no
//! re-encoding.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::canonical::lumo_canonical;
use crate::envelope::{Credential, Dialect, Request};

type HmacSha256 = Hmac<Sha256>;

/// The string Lumo signs: `{command}:{params_json}:{timestamp}:{nonce}`, as UTF-8 bytes.
pub fn signing_string(command: &str, params_json: &str, timestamp: u64, nonce: &str) -> Vec<u8> {
    format!("{command}:{params_json}:{timestamp}:{nonce}").into_bytes()
}

/// Signs with a raw key. To sign or verify many messages with one key, use [`HmacKey`], which
/// does the key schedule once.
pub fn sign(key: &[u8], command: &str, params_json: &str, timestamp: u64, nonce: &str) -> [u8; 32] {
    HmacKey::new(key).sign(command, params_json, timestamp, nonce)
}

/// [`sign`], as lowercase hex (what goes in a request's `signature`).
pub fn sign_hex(
    key: &[u8],
    command: &str,
    params_json: &str,
    timestamp: u64,
    nonce: &str,
) -> String {
    hex::encode(sign(key, command, params_json, timestamp, nonce))
}

/// Verifies a Lumo request's signature with a raw key; see [`verify_lumo_with`].
pub fn verify_lumo(key: &[u8], req: &Request) -> bool {
    verify_lumo_with(&HmacKey::new(key), req)
}

/// Verifies a Lumo request's signature: over the params bytes as sent (or `null` when the
/// request had none) first, then over the canonical encoding of the params. The comparison is
/// constant-time. `false` for anything but a Lumo request with an HMAC credential, and for a
/// signature that is not 32 bytes long.
pub fn verify_lumo_with(key: &HmacKey, req: &Request) -> bool {
    let Credential::Hmac {
        timestamp,
        nonce,
        signature,
    } = &req.credential
    else {
        return false;
    };
    if req.dialect != Dialect::Lumo || signature.len() != 32 {
        return false;
    }
    let as_sent = req.params_as_sent();
    let matches = |params_json: &str| -> bool {
        let expected = key.sign(&req.method, params_json, *timestamp, nonce);
        bool::from(expected.ct_eq(signature.as_slice()))
    };
    if matches(as_sent) {
        return true;
    }
    let canonical = lumo_canonical(&req.params);
    canonical != as_sent && matches(&canonical)
}

/// An HMAC-SHA256 key with its key schedule done once: cloning it per message saves hashing the
/// key pads each time, which is most of the cost of signing a small message.
///
/// It holds the hash states after the key pads, not the key bytes, and `Debug` prints neither.
/// (Those states would let their holder sign, but the `hmac` crate offers no way to wipe them.)
#[derive(Clone)]
pub struct HmacKey {
    mac: HmacSha256,
}

impl HmacKey {
    /// Prepares a key (any length; HMAC hashes keys longer than a block). The caller keeps, and
    /// should wipe, its own copy of the bytes.
    pub fn new(key: &[u8]) -> Self {
        // HMAC is defined for keys of every length (longer ones are hashed first), and the
        // `hmac` crate's constructor never fails for it.
        let mac =
            <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
        HmacKey { mac }
    }

    /// Signs `{command}:{params_json}:{timestamp}:{nonce}` without building the string.
    pub fn sign(&self, command: &str, params_json: &str, timestamp: u64, nonce: &str) -> [u8; 32] {
        let mut mac = self.mac.clone();
        let mut digits = [0u8; 20];
        mac.update(command.as_bytes());
        mac.update(b":");
        mac.update(params_json.as_bytes());
        mac.update(b":");
        mac.update(decimal(timestamp, &mut digits));
        mac.update(b":");
        mac.update(nonce.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// [`HmacKey::sign`], as lowercase hex.
    pub fn sign_hex(
        &self,
        command: &str,
        params_json: &str,
        timestamp: u64,
        nonce: &str,
    ) -> String {
        hex::encode(self.sign(command, params_json, timestamp, nonce))
    }
}

impl fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HmacKey(<redacted>)")
    }
}

/// `n` in decimal, in the tail of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[start..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::decode_request;

    #[test]
    fn decimal_writes_every_width() {
        let mut buf = [0u8; 20];
        for n in [0, 7, 10, 1795000000, u64::MAX] {
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes());
        }
    }

    #[test]
    fn keyed_signing_matches_the_signing_string() {
        let mut reference = <HmacSha256 as Mac>::new_from_slice(b"k").unwrap();
        reference.update(&signing_string("system.ping", "{}", 5, "n"));
        let expected: [u8; 32] = reference.finalize().into_bytes().into();
        assert_eq!(sign(b"k", "system.ping", "{}", 5, "n"), expected);
        assert_eq!(
            signing_string("a.b", "{\"x\":1}", 12, "n-1"),
            b"a.b:{\"x\":1}:12:n-1"
        );
    }

    #[test]
    fn keys_longer_than_a_block_and_empty_keys_work() {
        let long = [7u8; 200];
        assert_ne!(sign(&long, "c", "{}", 1, "n"), sign(b"", "c", "{}", 1, "n"));
        assert_eq!(sign_hex(b"", "c", "{}", 1, "n").len(), 64);
    }

    #[test]
    fn debug_of_a_key_shows_no_key_material() {
        let key = HmacKey::new(b"super-secret");
        assert_eq!(format!("{key:?}"), "HmacKey(<redacted>)");
    }

    fn lumo(params: &str, signature: &str) -> Request {
        let frame = format!(
            r#"{{"command":"c","params":{params},"timestamp":9,"nonce":"n","signature":"{signature}"}}"#
        );
        decode_request(frame.as_bytes()).unwrap()
    }

    #[test]
    fn verification_accepts_as_sent_and_canonical_forms_and_nothing_else() {
        let params = r#"{"b":1,"a":2}"#;
        let as_sent = sign_hex(b"k", "c", params, 9, "n");
        let canonical = sign_hex(b"k", "c", r#"{"a":2,"b":1}"#, 9, "n");
        assert!(verify_lumo(b"k", &lumo(params, &as_sent)));
        assert!(verify_lumo(b"k", &lumo(params, &canonical)));
        assert!(verify_lumo(b"k", &lumo(params, &canonical.to_uppercase())));
        assert!(!verify_lumo(b"other", &lumo(params, &as_sent)));
        let other_order = sign_hex(b"k", "c", r#"{"b":1,"a":2}"#, 9, "n");
        assert!(!verify_lumo(
            b"k",
            &lumo(r#"{"a":2, "b":1}"#, &format!("{other_order}00"))
        ));
        assert!(!verify_lumo(b"k", &lumo(params, &as_sent[..62])));
        assert!(!verify_lumo(b"k", &lumo(params, "")));
    }

    #[test]
    fn absent_params_are_signed_as_null() {
        let sig = sign_hex(b"k", "c", "null", 9, "n");
        let frame = format!(r#"{{"command":"c","timestamp":9,"nonce":"n","signature":"{sig}"}}"#);
        assert!(verify_lumo(
            b"k",
            &decode_request(frame.as_bytes()).unwrap()
        ));
    }

    #[test]
    fn requests_without_an_hmac_credential_never_verify() {
        let req = decode_request(br#"{"command":"c","params":{}}"#).unwrap();
        assert!(!verify_lumo(b"k", &req));
        let sig = sign(b"k", "c", "null", 0, "");
        let mut forged = decode_request(br#"{"action":"c","token":"t"}"#).unwrap();
        forged.credential = Credential::Hmac {
            timestamp: 0,
            nonce: String::new(),
            signature: sig.to_vec(),
        };
        assert!(
            !verify_lumo(b"k", &forged),
            "securityd requests are not HMAC-signed"
        );
    }
}
