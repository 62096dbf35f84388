//! The Lumo HMAC test vectors (`shared/vectors/lumo-hmac.json`, copied to `tests/vectors/` so
//! that a fresh clone has them), run through the public API as the daemon uses it.

use std::path::Path;

use serde_json::Value;
use warden_wire::{
    decode_request, lumo_canonical, sign_hex, signing_string, verify_lumo, verify_lumo_with,
    HmacKey,
};

const COPY: &str = "tests/vectors/lumo-hmac.json";
const SHARED: &str = "../../../shared/vectors/lumo-hmac.json";

fn load(relative: &str) -> Option<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    let text = std::fs::read_to_string(path).ok()?;
    Some(serde_json::from_str(&text).expect("vector file is JSON"))
}

struct Vector<'a> {
    command: &'a str,
    params_as_sent: &'a str,
    timestamp: u64,
    nonce: &'a str,
    canonical_params: &'a str,
    signing_string: &'a str,
    canonical_signature: &'a str,
    as_sent_signature: &'a str,
}

fn vectors(file: &Value) -> (Vec<u8>, Vec<Vector<'_>>) {
    let key = file["key_utf8"].as_str().unwrap().as_bytes().to_vec();
    fn s<'v>(v: &'v Value, k: &str) -> &'v str {
        v[k].as_str().unwrap_or_else(|| panic!("{k}"))
    }
    let list = file["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| Vector {
            command: s(v, "command"),
            params_as_sent: s(v, "params_as_sent"),
            timestamp: v["timestamp"].as_u64().unwrap(),
            nonce: s(v, "nonce"),
            canonical_params: s(v, "canonical_params"),
            signing_string: s(v, "signing_string"),
            canonical_signature: s(v, "canonical_signature"),
            as_sent_signature: s(v, "as_sent_signature"),
        })
        .collect();
    (key, list)
}

fn request_frame(v: &Vector<'_>, signature: &str) -> String {
    format!(
        r#"{{"command":{},"params":{},"timestamp":{},"nonce":{},"signature":"{signature}"}}"#,
        Value::from(v.command),
        v.params_as_sent,
        v.timestamp,
        Value::from(v.nonce),
    )
}

fn check(file: &Value) {
    let (key, list) = vectors(file);
    assert!(list.len() >= 10, "the vector file lost vectors");
    let hmac_key = HmacKey::new(&key);
    for v in &list {
        let req = decode_request(request_frame(v, v.canonical_signature).as_bytes())
            .unwrap_or_else(|e| panic!("{}: {e:?}", v.params_as_sent));
        assert_eq!(req.params_raw.as_deref(), Some(v.params_as_sent));
        assert_eq!(
            lumo_canonical(&req.params),
            v.canonical_params,
            "{}",
            v.params_as_sent
        );
        assert_eq!(
            signing_string(v.command, v.canonical_params, v.timestamp, v.nonce),
            v.signing_string.as_bytes()
        );
        assert_eq!(
            sign_hex(&key, v.command, v.canonical_params, v.timestamp, v.nonce),
            v.canonical_signature
        );
        assert_eq!(
            hmac_key.sign_hex(v.command, v.params_as_sent, v.timestamp, v.nonce),
            v.as_sent_signature
        );

        for signature in [v.canonical_signature, v.as_sent_signature] {
            let req = decode_request(request_frame(v, signature).as_bytes()).unwrap();
            assert!(verify_lumo(&key, &req), "{}", v.params_as_sent);
            assert!(verify_lumo_with(&hmac_key, &req), "{}", v.params_as_sent);
            assert!(!verify_lumo(b"another key", &req), "{}", v.params_as_sent);

            let mut flipped = hex::decode(signature).unwrap();
            for i in [0, 17, 31] {
                flipped[i] ^= 0x01;
                let req =
                    decode_request(request_frame(v, &hex::encode(&flipped)).as_bytes()).unwrap();
                assert!(!verify_lumo_with(&hmac_key, &req), "flipped byte {i}");
                flipped[i] ^= 0x01;
            }
            let truncated = &signature[..signature.len() - 2];
            let req = decode_request(request_frame(v, truncated).as_bytes()).unwrap();
            assert!(!verify_lumo_with(&hmac_key, &req), "truncated");
            let extended = format!("{signature}00");
            let req = decode_request(request_frame(v, &extended).as_bytes()).unwrap();
            assert!(!verify_lumo_with(&hmac_key, &req), "extended");

            // The signature covers the nonce, the timestamp and the command too.
            for frame in [
                request_frame(v, signature).replacen(v.nonce, "other-nonce", 1),
                request_frame(v, signature).replacen(&v.timestamp.to_string(), "1", 1),
                request_frame(v, signature).replacen(v.command, "system.metrics", 1),
            ] {
                let req = decode_request(frame.as_bytes()).unwrap();
                assert!(!verify_lumo_with(&hmac_key, &req), "{frame}");
            }
        }
    }
}

#[test]
fn every_vector_verifies_in_both_forms_and_tampering_fails() {
    check(&load(COPY).expect("tests/vectors/lumo-hmac.json is missing"));
}

#[test]
fn the_copied_vectors_match_the_shared_ones_when_present() {
    let Some(shared) = load(SHARED) else {
        return; // a fresh clone without the shared/ folder beside it
    };
    assert_eq!(
        load(COPY),
        Some(shared.clone()),
        "shared/vectors/lumo-hmac.json changed: copy it to crates/warden-wire/tests/vectors/"
    );
    check(&shared);
}
