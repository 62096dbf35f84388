use super::*;
use serde_json::json;

fn ok(frame: &str) -> Request {
    match decode_request(frame.as_bytes()) {
        Ok(req) => req,
        Err(e) => panic!("{frame:.200}: {e:?}"),
    }
}

fn err(frame: &str) -> DecodeFailure {
    match decode_request(frame.as_bytes()) {
        Ok(req) => panic!("{frame:.200} decoded: {req:?}"),
        Err(e) => e,
    }
}

fn error(frame: &str) -> DecodeError {
    err(frame).error
}

const SIG: &str = "1f947e4e0b6db5854a02cfe1aa46448837aebd63ebe58529b00bb2ea415c4d19";

#[test]
fn lumo_ping_decodes_with_its_credential() {
    let req = ok(&format!(
        r#"{{"command":"system.ping","params":{{}},"timestamp":1795000000,"nonce":"n-1","signature":"{SIG}"}}"#
    ));
    assert_eq!(req.dialect, Dialect::Lumo);
    assert_eq!(req.method, "system.ping");
    assert_eq!(req.id, None);
    assert_eq!(req.params, json!({}));
    assert_eq!(req.params_raw.as_deref(), Some("{}"));
    assert_eq!(
        req.credential,
        Credential::Hmac {
            timestamp: 1795000000,
            nonce: "n-1".into(),
            signature: hex::decode(SIG).unwrap(),
        }
    );
}

#[test]
fn lumo_params_raw_keeps_the_exact_bytes_and_absent_params_are_null() {
    let req = ok(r#"{"params" :  { "b" : [1, 2.50] ,"a":"\u00e9"} , "command":"x"}"#);
    assert_eq!(
        req.params_raw.as_deref(),
        Some(r#"{ "b" : [1, 2.50] ,"a":"\u00e9"}"#)
    );
    assert_eq!(req.params, json!({"a": "é", "b": [1, 2.5]}));
    assert_eq!(req.credential, Credential::None);

    let req = ok(r#"{"command":"x"}"#);
    assert_eq!(req.params, Value::Null);
    assert_eq!(req.params_raw, None);
    assert_eq!(req.params_as_sent(), "null");
}

#[test]
fn lumo_signature_accepts_either_hex_case() {
    let upper = SIG.to_uppercase();
    let req = ok(&format!(
        r#"{{"command":"c","timestamp":1,"nonce":"n","signature":"{upper}"}}"#
    ));
    let Credential::Hmac { signature, .. } = req.credential else {
        panic!("no hmac credential")
    };
    assert_eq!(signature, hex::decode(SIG).unwrap());
}

#[test]
fn escaped_strings_are_decoded() {
    let req = ok(r#"{"comm\u0061nd":"sys\"tem\u002eping"}"#);
    assert_eq!(req.method, "sys\"tem.ping");
}

#[test]
fn securityd_request_with_token_params_and_id() {
    let req = ok(r#"{"action":"get_secret","token":"tok","params":{"key":"db"},"id":"r1"}"#);
    assert_eq!(req.dialect, Dialect::Securityd);
    assert_eq!(req.method, "get_secret");
    assert_eq!(req.id, Some(json!("r1")));
    assert_eq!(req.params, json!({"key": "db"}));
    assert_eq!(req.params_raw, None);
    assert_eq!(req.credential, Credential::Token("tok".into()));

    let req = ok(r#"{"action":"health","id":42}"#);
    assert_eq!(req.id, Some(json!(42)));
    assert_eq!(req.params, Value::Null);
    assert_eq!(req.credential, Credential::None);
}

#[test]
fn peer_credential_is_the_word_peer_and_never_beside_a_token() {
    let req = ok(r#"{"action":"jobs.list","credential":"peer","id":1}"#);
    assert_eq!(req.credential, Credential::Peer);
    assert_eq!(format!("{:?}", req.credential), "Peer");
    for frame in [
        r#"{"action":"jobs.list","credential":"token","id":1}"#,
        r#"{"action":"jobs.list","credential":true,"id":1}"#,
        r#"{"action":"jobs.list","credential":"peer","token":"tok","id":1}"#,
    ] {
        assert!(
            matches!(
                error(frame),
                DecodeError::BadField {
                    field: "credential",
                    ..
                }
            ),
            "{frame}"
        );
    }
    // null is absent, as for every field; Lumo's dialect ignores it like any unknown extra.
    assert_eq!(
        ok(r#"{"action":"x","credential":null}"#).credential,
        Credential::None
    );
    let lumo = ok(r#"{"command":"ping","params":{},"credential":"peer"}"#);
    assert_eq!(lumo.credential, Credential::None);
}

#[test]
fn securityd_top_level_key_and_keys_are_merged_into_params() {
    let req = ok(r#"{"action":"get_secret","key":"db","token":"t"}"#);
    assert_eq!(req.params, json!({"key": "db"}));
    let req = ok(r#"{"action":"get_secrets","keys":["a","b"],"params":{"x":1}}"#);
    assert_eq!(req.params, json!({"keys": ["a", "b"], "x": 1}));
}

#[test]
fn securityd_key_both_beside_action_and_in_params_is_a_duplicate() {
    let e = err(r#"{"action":"get_secret","key":"a","params":{"key":"b"},"id":3}"#);
    assert_eq!(e.error, DecodeError::DuplicateKey("key".into()));
    assert_eq!(e.dialect, Some(Dialect::Securityd));
    assert_eq!(e.id, Some(json!(3)));
}

#[test]
fn null_optional_fields_count_as_absent() {
    let req = ok(r#"{"action":"health","token": null ,"params":null,"id":null}"#);
    assert_eq!(req.credential, Credential::None);
    assert_eq!(req.params, Value::Null);
    assert_eq!(req.id, None);
    let req = ok(r#"{"command":"c","timestamp":null,"nonce":null,"signature":null}"#);
    assert_eq!(req.credential, Credential::None);
}

#[test]
fn unknown_fields_are_ignored_in_both_dialects() {
    let req =
        ok(r#"{"command":"c","version":2,"extra":{"deep":[1,{"x":null}]},"token":"t","id":5}"#);
    assert_eq!(req.method, "c");
    assert_eq!(req.id, None, "Lumo has no id");
    assert_eq!(
        req.credential,
        Credential::None,
        "a token means nothing to Lumo"
    );
    let req = ok(r#"{"action":"a","client":"x","nonce":"n","timestamp":1}"#);
    assert_eq!(req.credential, Credential::None);
}

#[test]
fn invalid_utf8_is_not_utf8_wherever_it_is() {
    for frame in [
        &b"{\"command\":\"\xff\"}"[..],
        b"{\"command\":\"c\",\"params\":{\"k\":\"\xc3\x28\"}}",
        b"\xef\xbb\xbf\xff{}",
        b"{\"command\":\"c\"}\xed\xa0\x80",
    ] {
        let e = decode_request(frame).unwrap_err();
        assert_eq!(e.error, DecodeError::NotUtf8);
        assert_eq!(e.dialect, None);
    }
}

#[test]
fn invalid_json_is_not_json_and_the_message_does_not_echo_the_input() {
    for frame in [
        r#"{"command":"secret-stuff"#,
        r#"{"command":"c",}"#,
        r#"{"command":"c"} trailing-secret"#,
        r#"{"command":"c","params":{"a":"\ud800"}}"#,
        r#"{"command":"c","params":{"a":1e999}}"#,
        r#"{"command":"c","params":NaN}"#,
        "",
        "   ",
        "{'command':'c'}",
    ] {
        match error(frame) {
            DecodeError::NotJson(message) => {
                assert!(!message.contains("secret"), "{message}");
                assert!(message.contains("line 1"), "{message}");
            }
            other => panic!("{frame}: {other:?}"),
        }
    }
}

#[test]
fn json_that_is_not_an_object_is_not_object() {
    for frame in [
        "[]",
        "[{\"command\":\"c\"}]",
        "\"command\"",
        "1",
        "-1",
        "1.5",
        "true",
        "null",
    ] {
        assert_eq!(error(frame), DecodeError::NotObject, "{frame}");
    }
}

#[test]
fn a_syntax_error_after_a_non_object_is_still_not_json() {
    assert!(matches!(error("[1,"), DecodeError::NotJson(_)));
}

#[test]
fn duplicate_keys_are_refused_at_every_depth() {
    let cases = [
        (r#"{"command":"a","command":"b"}"#, "command"),
        (r#"{"command":"a","comm\u0061nd":"b"}"#, "command"),
        (r#"{"command":"a","x":1,"x":2}"#, "x"),
        (r#"{"command":"a","params":{"p":1,"p":2}}"#, "p"),
        (
            r#"{"command":"a","params":[{"q":{"r":[{"s":1,"s":1}]}}]}"#,
            "s",
        ),
        (r#"{"command":"a","extra":{"t":1,"t":1}}"#, "t"),
        (r#"{"action":"a","params":{"u":{"v":0,"v":0}}}"#, "v"),
        (r#"{"action":"a","keys":[{"w":0,"w":0}]}"#, "w"),
        (r#"{"action":"a","id":1,"id":2}"#, "id"),
    ];
    for (frame, key) in cases {
        assert_eq!(
            error(frame),
            DecodeError::DuplicateKey(key.into()),
            "{frame}"
        );
    }
}

#[test]
fn a_duplicate_key_in_an_error_is_shortened() {
    let key = "é".repeat(100);
    let e = error(&format!(r#"{{"command":"a","{key}":1,"{key}":2}}"#));
    let DecodeError::DuplicateKey(shown) = e else {
        panic!("{e:?}")
    };
    assert_eq!(shown, format!("{}…", "é".repeat(32)));
}

#[test]
fn a_lumo_request_missing_any_credential_part_is_unsigned() {
    for frame in [
        r#"{"command":"c","nonce":"n","signature":"00"}"#,
        r#"{"command":"c","timestamp":1,"signature":"00"}"#,
        r#"{"command":"c","timestamp":1,"nonce":"n"}"#,
        r#"{"command":"c","timestamp":1,"nonce":"n","signature":null}"#,
        r#"{"command":"c","signature":"00"}"#,
    ] {
        let r = decode_request(frame.as_bytes()).unwrap();
        assert_eq!(r.credential, Credential::None, "{frame}");
    }
}

#[test]
fn a_signature_that_is_not_hex_is_kept_as_one_that_cannot_verify() {
    for sig in ["0g", "abc", "zz"] {
        let frame = format!(r#"{{"command":"c","timestamp":1,"nonce":"n","signature":"{sig}"}}"#);
        match decode_request(frame.as_bytes()).unwrap().credential {
            Credential::Hmac { signature, .. } => assert!(signature.is_empty(), "{sig}"),
            other => panic!("{sig}: {other:?}"),
        }
    }
}

#[test]
fn wrongly_typed_fields_are_bad_field() {
    let cases = [
        (r#"{"command":5}"#, "command"),
        (r#"{"command":null}"#, "command"),
        (r#"{"command":["c"]}"#, "command"),
        (
            r#"{"command":"c","timestamp":1.5,"nonce":"n","signature":"00"}"#,
            "timestamp",
        ),
        (
            r#"{"command":"c","timestamp":-1,"nonce":"n","signature":"00"}"#,
            "timestamp",
        ),
        (
            r#"{"command":"c","timestamp":"1","nonce":"n","signature":"00"}"#,
            "timestamp",
        ),
        (
            r#"{"command":"c","timestamp":1e3,"nonce":"n","signature":"00"}"#,
            "timestamp",
        ),
        (
            r#"{"command":"c","timestamp":18446744073709551616,"nonce":"n","signature":"00"}"#,
            "timestamp",
        ),
        (
            r#"{"command":"c","timestamp":1,"nonce":7,"signature":"00"}"#,
            "nonce",
        ),
        (
            r#"{"command":"c","timestamp":1,"nonce":"n","signature":12}"#,
            "signature",
        ),
        (r#"{"action":true}"#, "action"),
        (r#"{"action":"a","token":1}"#, "token"),
        (r#"{"action":"a","params":[]}"#, "params"),
        (r#"{"action":"a","params":"x"}"#, "params"),
        (r#"{"action":"a","id":true}"#, "id"),
        (r#"{"action":"a","id":{"x":1}}"#, "id"),
    ];
    for (frame, field) in cases {
        match error(frame) {
            DecodeError::BadField { field: got, .. } => assert_eq!(got, field, "{frame}"),
            other => panic!("{frame}: {other:?}"),
        }
    }
}

#[test]
fn u64_max_timestamp_is_accepted() {
    let req =
        ok(r#"{"command":"c","timestamp":18446744073709551615,"nonce":"n","signature":"00"}"#);
    assert!(matches!(
        req.credential,
        Credential::Hmac {
            timestamp: u64::MAX,
            ..
        }
    ));
}

#[test]
fn neither_or_both_dialect_keys_is_unknown_dialect() {
    for frame in [
        r#"{}"#,
        r#"{"params":{}}"#,
        r#"{"command":"c","action":"a"}"#,
    ] {
        let e = err(frame);
        assert_eq!(e.error, DecodeError::UnknownDialect, "{frame}");
        assert_eq!(e.dialect, None);
    }
}

#[test]
fn a_failure_carries_the_dialect_and_id_seen_so_far() {
    let e = err(r#"{"id":"x1","action":"get","token":5}"#);
    assert_eq!(
        (e.dialect, e.id),
        (Some(Dialect::Securityd), Some(json!("x1")))
    );
    let e = err(r#"{"id":9,"action":"get","params":{"#);
    assert!(matches!(e.error, DecodeError::NotJson(_)));
    assert_eq!(
        (e.dialect, e.id),
        (Some(Dialect::Securityd), Some(json!(9)))
    );
    let e = err(r#"{"command":"c","id":9,"params":{"#);
    assert_eq!((e.dialect, e.id), (Some(Dialect::Lumo), None));
    let e = err(r#"{"action":"a","id":[1],"token":3}"#);
    assert_eq!(
        e.error,
        DecodeError::BadField {
            field: "id",
            expected: "a string or a number"
        }
    );
    assert_eq!(e.id, None);
    let e = err(r#"{"other":1,"x""#);
    assert_eq!((e.dialect, e.id), (None, None));
}

#[test]
fn nesting_up_to_the_limit_is_accepted_and_beyond_is_too_deep() {
    let nest = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let req = ok(&format!(
        r#"{{"command":"c","params":{}}}"#,
        nest(crate::MAX_DEPTH)
    ));
    assert_eq!(
        req.params_raw.map(|raw| raw.len()),
        Some(2 * crate::MAX_DEPTH)
    );
    assert_eq!(
        error(&format!(
            r#"{{"command":"c","params":{}}}"#,
            nest(crate::MAX_DEPTH + 1)
        )),
        DecodeError::TooDeep
    );
    // The same limit for any field, and for a top-level value that is not an object.
    ok(&format!(
        r#"{{"action":"a","key":{}}}"#,
        nest(crate::MAX_DEPTH)
    ));
    assert_eq!(
        error(&format!(
            r#"{{"action":"a","key":{}}}"#,
            nest(crate::MAX_DEPTH + 1)
        )),
        DecodeError::TooDeep
    );
    assert_eq!(error(&nest(crate::MAX_DEPTH)), DecodeError::NotObject);
    assert_eq!(error(&nest(crate::MAX_DEPTH + 1)), DecodeError::TooDeep);
}

const DEEP: usize = 100_000;

#[test]
fn deep_nesting_never_overflows_the_stack() {
    let open = "[".repeat(DEEP);
    let close = "]".repeat(DEEP);
    let objects = r#"{"a":"#.repeat(DEEP);
    let object_close = "}".repeat(DEEP);
    let cases = [
        // Closed, inside params, in either dialect, inside other fields, at top level.
        format!(r#"{{"command":"c","params":{open}{close}}}"#),
        format!(r#"{{"action":"c","params":{{"x":{open}{close}}}}}"#),
        format!(r#"{{"action":"c","key":{open}{close}}}"#),
        format!(r#"{{"command":{open}{close}}}"#),
        format!(r#"{{"command":"c","extra":{objects}1{object_close}}}"#),
        format!("{objects}1{object_close}"),
        format!("{open}{close}"),
        // Unclosed, at top level and inside fields.
        open.clone(),
    ];
    for frame in &cases {
        assert_eq!(error(frame), DecodeError::TooDeep, "{:.60}", frame);
    }
    // A field's value is first found by a scan without recursion; unclosed, it ends at EOF.
    for frame in [
        format!(r#"{{"command":"c","params":{open}"#),
        format!(r#"{{"command":"c","params":{objects}"#),
        format!(r#"{{"command":"c","extra":{objects}"#),
        objects.clone(),
    ] {
        assert!(
            matches!(error(&frame), DecodeError::NotJson(_)),
            "{:.60}",
            frame
        );
    }
}

#[test]
fn deep_nesting_errors_say_so() {
    assert_eq!(
        DecodeError::TooDeep.to_string(),
        format!(
            "request nests arrays or objects more than {} levels deep",
            crate::MAX_DEPTH
        )
    );
}

#[test]
fn debug_output_hides_tokens_signatures_and_params() {
    let req = ok(r#"{"action":"secrets.set","token":"tok-SECRET","params":{"value":"pw-SECRET"}}"#);
    let shown = format!("{req:?}");
    assert!(!shown.contains("SECRET"), "{shown}");
    assert!(shown.contains("Token(<redacted>)"), "{shown}");

    let req = ok(&format!(
        r#"{{"command":"db.create_user","params":{{"password":"pw-SECRET"}},"timestamp":1,"nonce":"n","signature":"{SIG}"}}"#
    ));
    let shown = format!("{req:?}");
    assert!(!shown.contains("SECRET"), "{shown}");
    assert!(!shown.contains("1f947e4e"), "{shown}");
    assert!(!shown.contains("31, 148"), "{shown}");
    assert!(shown.contains("signature: <redacted>"), "{shown}");
    assert!(shown.contains("params_raw: Some(<24 bytes>)"), "{shown}");
}

#[test]
fn decode_errors_read_as_advice() {
    assert_eq!(
        DecodeError::BadField {
            field: "nonce",
            expected: "a string"
        }
        .to_string(),
        "field `nonce` must be a string"
    );
    assert_eq!(
        DecodeError::MissingField("nonce").to_string(),
        "missing field `nonce`"
    );
    assert!(DecodeError::UnknownDialect
        .to_string()
        .contains("`command`"));
    assert_eq!(
        DecodeFailure {
            error: DecodeError::NotObject,
            dialect: None,
            id: None
        }
        .to_string(),
        "request must be a JSON object"
    );
}

#[test]
fn signatures_decode_as_hex_or_not_at_all() {
    let sig = "0123456789abcdefABCDEF0123456789abcdef0123456789abcdef0123456789";
    assert_eq!(decode_signature(sig.as_bytes()), hex::decode(sig).unwrap());
    // Not hex, at the fast path's length and at others: empty, so it never verifies.
    assert!(decode_signature(&[b'g'; 64]).is_empty());
    assert!(decode_signature(&sig.as_bytes()[..63]).is_empty());
    assert!(decode_signature(b"zz").is_empty());
    // Other even lengths still decode (and then fail the 32-byte check at verification).
    assert_eq!(decode_signature(b"00ff"), vec![0, 0xff]);
    assert!(decode_signature(b"").is_empty());
    // Every byte value in every position of a 64-digit signature: decoded exactly when it is
    // a hex digit, as the hex crate decodes it.
    for pos in [0, 1, 37, 63] {
        for b in 0..=255u8 {
            let mut digits = sig.as_bytes().to_vec();
            digits[pos] = b;
            assert_eq!(
                decode_signature(&digits),
                hex::decode(&digits).unwrap_or_default(),
                "byte {b:#04x} at {pos}"
            );
        }
    }
}
