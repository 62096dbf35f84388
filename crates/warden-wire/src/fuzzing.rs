//! Property checks shared by the cargo-fuzz targets in `fuzz/` and this crate's fixed-seed
//! tests, so that the properties are exercised on every `cargo test` even where libFuzzer (which
//! needs a nightly compiler) cannot run. Not part of the supported API: compiled only for tests
//! and with the `fuzzing` feature.
//!
//! Every function panics when a property fails; that is how a fuzzer notices.

use bytes::BytesMut;
use serde_json::{json, Map, Value};

use crate::envelope::{decode_request, Credential, DecodeError, Dialect, Request};
use crate::framing::{FrameDecoder, FrameError, Framing};
use crate::{canonical::lumo_canonical, hmac, reply};

/// A tiny deterministic generator (xorshift64*), for split points and generated inputs.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (any value; 0 is replaced).
    pub fn new(seed: u64) -> Self {
        XorShift(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability 1/`n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// What decoding a stream produced.
#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Vec<u8>>,
    error: Option<FrameError>,
    finish: Option<Result<(), FrameError>>,
}

fn decode_stream(max: usize, chunks: &mut dyn Iterator<Item = &[u8]>) -> Outcome {
    let mut decoder = FrameDecoder::new(max);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(!frame.is_empty(), "empty frame returned");
                    assert!(frame.len() <= max, "frame of {} > max {max}", frame.len());
                    frames.push(frame.to_vec());
                }
                Ok(None) => break,
                Err(error) => {
                    return Outcome {
                        frames,
                        error: Some(error),
                        finish: None,
                    }
                }
            }
        }
        // Never more buffered than one frame could need: oversize is caught early.
        let bound = match decoder.framing() {
            Some(Framing::Lines) | None => max + 1,
            Some(Framing::LengthPrefixed) => max + 3,
        };
        assert!(
            buf.len() <= bound,
            "{} bytes buffered, max {max}",
            buf.len()
        );
    }
    Outcome {
        frames,
        error: None,
        finish: Some(decoder.finish(&buf)),
    }
}

/// [`FrameDecoder`] over arbitrary bytes with arbitrary split points: never panics, never
/// returns an empty frame or one larger than the maximum, never buffers more than one frame's
/// worth, and gives the same frames and the same kind of error however the input is split.
pub fn check_decode_frame(data: &[u8]) {
    let [max_byte, seed_hi, seed_lo, stream @ ..] = data else {
        return;
    };
    let max = 1 + usize::from(*max_byte % 64);
    let mut rng = XorShift::new(u64::from(*seed_hi) << 8 | u64::from(*seed_lo));
    let mut chunks = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let n = (1 + rng.below(16)).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        chunks.push(chunk);
        rest = tail;
        if rng.one_in(8) {
            chunks.push(&[]);
        }
    }
    let split = decode_stream(max, &mut chunks.iter().copied());
    let whole = decode_stream(max, &mut std::iter::once(stream));
    let bytewise = decode_stream(max, &mut stream.chunks(1));
    for other in [&whole, &bytewise] {
        assert_eq!(split.frames, other.frames);
        assert_eq!(split.finish, other.finish);
        // A line's length is a lower bound until its end arrives, so compare the kind only.
        assert_eq!(
            split.error.as_ref().map(std::mem::discriminant),
            other.error.as_ref().map(std::mem::discriminant)
        );
    }
    if stream.first() != Some(&b'{') {
        assert_eq!(split.error, whole.error, "length-prefixed errors are exact");
    }
}

/// [`decode_request`] over arbitrary bytes: never panics; a request that decodes re-encodes to
/// one that decodes to the same thing; its canonical params read back to the same value.
pub fn check_decode_request(data: &[u8]) {
    let request = match decode_request(data) {
        Ok(request) => request,
        Err(failure) => {
            let _ = failure.to_string();
            assert_eq!(
                failure.error == DecodeError::NotUtf8,
                std::str::from_utf8(data).is_err()
            );
            if failure.dialect == Some(Dialect::Lumo) {
                assert_eq!(failure.id, None);
            }
            if let Some(id) = &failure.id {
                assert!(id.is_string() || id.is_number());
            }
            return;
        }
    };
    let _ = format!("{request:?}");
    let _ = hmac::verify_lumo(b"k", &request);

    let again = re_encode(&request);
    let decoded = match decode_request(&again) {
        Ok(decoded) => decoded,
        Err(e) => panic!("re-encoded request fails: {e:?}"),
    };
    assert_eq!(decoded.dialect, request.dialect);
    assert_eq!(decoded.method, request.method);
    assert_eq!(decoded.params, request.params);
    assert_eq!(decoded.id, request.id);
    assert_eq!(decoded.credential, request.credential);

    if request.dialect == Dialect::Lumo {
        let canonical = lumo_canonical(&request.params);
        let frame = format!(r#"{{"command":"c","params":{canonical}}}"#);
        let from_canonical = match decode_request(frame.as_bytes()) {
            Ok(r) => r,
            Err(e) => panic!("canonical form {canonical:?} does not decode: {e:?}"),
        };
        assert_eq!(from_canonical.params, request.params, "{canonical}");
        assert_eq!(
            from_canonical.params_raw.as_deref(),
            Some(canonical.as_str())
        );
        assert_eq!(lumo_canonical(&from_canonical.params), canonical);
    }

    // The reply embeds the value as serde_json writes it (compared as text: a value at the
    // depth limit is too deep to parse back once it sits inside a reply).
    let data = serde_json::to_string(&request.params).unwrap_or_default();
    let mut out = Vec::new();
    reply::encode_lumo("r", Ok(&request.params), &mut out);
    assert_eq!(
        out,
        format!(r#"{{"success":true,"request_id":"r","data":{data}}}"#).into_bytes()
    );
    out.clear();
    reply::encode_securityd(None, Ok(&request.params), Some(true), &mut out);
    assert_eq!(
        out,
        format!(r#"{{"status":"ok","data":{data},"stream":true,"final":true}}"#).into_bytes()
    );
    assert!(!out.contains(&b'\n'));
}

fn re_encode(request: &Request) -> Vec<u8> {
    let mut envelope = Map::new();
    match request.dialect {
        Dialect::Lumo => {
            envelope.insert("command".into(), json!(request.method));
            if request.params_raw.is_some() {
                envelope.insert("params".into(), request.params.clone());
            }
        }
        Dialect::Securityd => {
            envelope.insert("action".into(), json!(request.method));
            if let Value::Object(params) = &request.params {
                // `key` and `keys` go back beside `action`, where they may have come from: the
                // depth limit counts from each field's own value, one level less than in params.
                let mut params = params.clone();
                for name in ["key", "keys"] {
                    if let Some(value) = params.remove(name) {
                        envelope.insert(name.into(), value);
                    }
                }
                envelope.insert("params".into(), Value::Object(params));
            }
            if let Some(id) = &request.id {
                envelope.insert("id".into(), id.clone());
            }
        }
    }
    match &request.credential {
        Credential::None => {}
        Credential::Peer => {
            envelope.insert("credential".into(), json!("peer"));
        }
        Credential::Token(token) => {
            envelope.insert("token".into(), json!(token));
        }
        Credential::Hmac {
            timestamp,
            nonce,
            signature,
        } => {
            envelope.insert("timestamp".into(), json!(timestamp));
            envelope.insert("nonce".into(), json!(nonce));
            envelope.insert("signature".into(), json!(hex::encode(signature)));
        }
    }
    serde_json::to_vec(&Value::Object(envelope)).unwrap_or_default()
}

/// Generates a JSON-ish request: usually valid, sometimes broken in the ways that matter
/// (duplicates, deep nesting, bad types, mutated bytes).
pub fn generate_request(rng: &mut XorShift) -> Vec<u8> {
    let mut out = String::from("{");
    let fields = 1 + rng.below(6);
    for i in 0..fields {
        if i > 0 {
            out.push(',');
        }
        const KEYS: [&str; 14] = [
            "command",
            "action",
            "params",
            "params",
            "timestamp",
            "nonce",
            "signature",
            "token",
            "key",
            "keys",
            "id",
            "extra",
            "comm\\u0061nd",
            "\u{e9}",
        ];
        let key = if i == 0 {
            if rng.one_in(2) {
                "command"
            } else {
                "action"
            }
        } else {
            KEYS[rng.below(KEYS.len())]
        };
        out.push('"');
        out.push_str(key);
        out.push_str("\":");
        match key {
            "command" | "action" | "nonce" | "token" if !rng.one_in(8) => {
                generate_string(rng, &mut out)
            }
            "timestamp" if !rng.one_in(8) => out.push_str(&rng.next_u64().to_string()),
            "signature" if !rng.one_in(8) => {
                out.push('"');
                out.push_str(&hex::encode(rng.next_u64().to_be_bytes()));
                out.push('"');
            }
            _ => generate_value(rng, &mut out, 0),
        }
    }
    out.push('}');
    let mut bytes = out.into_bytes();
    if rng.one_in(3) {
        mutate(rng, &mut bytes);
    }
    bytes
}

fn generate_string(rng: &mut XorShift, out: &mut String) {
    const PIECES: [&str; 12] = [
        "a",
        "system.ping",
        "é",
        "😀",
        "\\n",
        "\\\"",
        "\\u0001",
        "\\ud83d\\ude00",
        "/",
        "\\/",
        " ",
        "\\u00e9",
    ];
    out.push('"');
    for _ in 0..rng.below(5) {
        out.push_str(PIECES[rng.below(PIECES.len())]);
    }
    out.push('"');
}

fn generate_value(rng: &mut XorShift, out: &mut String, depth: usize) {
    const SCALARS: [&str; 16] = [
        "null",
        "true",
        "false",
        "0",
        "-0",
        "1.5",
        "-0.0",
        "1e100",
        "1E5",
        "1e-7",
        "123456789012",
        "18446744073709551615",
        "-9223372036854775808",
        "0.1",
        "2.5e-320",
        "12345678901234567890",
    ];
    let kinds = if depth > 4 { 3 } else { 6 };
    match rng.below(kinds) {
        0 => out.push_str(SCALARS[rng.below(SCALARS.len())]),
        1 => generate_string(rng, out),
        2 => {
            let f = f64::from_bits(rng.next_u64());
            if f.is_finite() {
                out.push_str(&format!("{f:e}"));
            } else {
                out.push('7');
            }
        }
        3 => {
            out.push('[');
            for i in 0..rng.below(4) {
                if i > 0 {
                    out.push(',');
                }
                generate_value(rng, out, depth + 1);
            }
            out.push(']');
        }
        4 => {
            out.push('{');
            for i in 0..rng.below(4) {
                if i > 0 {
                    out.push(',');
                }
                const KEYS: [&str; 5] = ["a", "b", "a", "\\u0062", "ü"];
                out.push('"');
                out.push_str(KEYS[rng.below(KEYS.len())]);
                out.push_str("\":");
                generate_value(rng, out, depth + 1);
            }
            out.push('}');
        }
        _ => {
            let levels = [1, 126, 127, 128, 200][rng.below(5)];
            out.push_str(&"[".repeat(levels));
            out.push_str(&"]".repeat(levels));
        }
    }
}

fn mutate(rng: &mut XorShift, bytes: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(3) {
        if bytes.is_empty() {
            return;
        }
        let at = rng.below(bytes.len());
        match rng.below(5) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => {
                bytes.remove(at);
            }
            2 => bytes.truncate(at),
            3 => {
                const TOKENS: [&[u8]; 8] =
                    [b"{", b"}", b"[", b"\"", b"\\", b",", b"\xff", b"\"a\":1,"];
                let token = TOKENS[rng.below(TOKENS.len())];
                bytes.splice(at..at, token.iter().copied());
            }
            _ => {
                let byte = bytes[at];
                bytes.insert(at, byte);
            }
        }
    }
}

/// Generates a byte stream for [`check_decode_frame`]: a max byte, a seed, then frames of
/// either framing mixed with noise.
pub fn generate_stream(rng: &mut XorShift) -> Vec<u8> {
    let mut out = vec![
        rng.below(256) as u8,
        rng.below(256) as u8,
        rng.below(256) as u8,
    ];
    let lines = rng.one_in(2);
    for _ in 0..rng.below(6) {
        let longest = if rng.one_in(4) { 100 } else { 40 };
        let len = rng.below(longest);
        if lines {
            out.push(b'{');
            for _ in 0..len {
                out.push(b"ab\r\"\n }"[rng.below(7)]);
            }
            out.extend_from_slice(if rng.one_in(2) { b"\n" } else { b"\r\n" });
        } else {
            let announced = if rng.one_in(10) { rng.below(300) } else { len };
            out.extend_from_slice(&(announced as u32).to_be_bytes());
            out.extend((0..len).map(|_| rng.below(256) as u8));
        }
    }
    if rng.one_in(4) {
        let keep = rng.below(out.len() + 1).max(3);
        out.truncate(keep);
    }
    if rng.one_in(8) {
        mutate(rng, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_properties_hold_for_generated_streams() {
        let mut rng = XorShift::new(0x5eed_f4a3);
        for _ in 0..4000 {
            check_decode_frame(&generate_stream(&mut rng));
        }
        for _ in 0..1000 {
            let len = rng.below(200);
            let noise: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
            check_decode_frame(&noise);
        }
    }

    #[test]
    fn request_properties_hold_for_generated_requests() {
        let mut rng = XorShift::new(0x5eed_7e57);
        let mut decoded = 0;
        for _ in 0..5000 {
            let input = generate_request(&mut rng);
            decoded += usize::from(decode_request(&input).is_ok());
            check_decode_request(&input);
        }
        // The generator must reach the interesting code, not only the error paths.
        assert!(
            decoded > 1000,
            "only {decoded} of 5000 generated requests decoded"
        );
        for _ in 0..1000 {
            let len = rng.below(64);
            let noise: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
            check_decode_request(&noise);
        }
    }

    #[test]
    fn a_broken_property_is_noticed() {
        // The checks must be able to fail: a re-encoding that differs is caught.
        let result = std::panic::catch_unwind(|| {
            let req = decode_request(br#"{"command":"c","params":{"a":1}}"#).unwrap();
            let mut other = req.clone();
            other.params = json!({"a": 2});
            assert_eq!(
                decode_request(&re_encode(&other)).unwrap().params,
                req.params
            );
        });
        assert!(result.is_err());
    }
}
