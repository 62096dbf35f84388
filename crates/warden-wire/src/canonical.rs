//! Lumo's canonical encoding of `params`: the text its HMAC covers.
//!
//! Lumo (a Python daemon) re-encodes the params before checking the signature, as
//! `json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)` would. A
//! client signing that form must get byte-for-byte the same text from us, so this module
//! reproduces Python's choices exactly, including the ones no other JSON library shares:
//!
//! - object keys sorted at every level, by code point (which is UTF-8 byte order);
//! - non-ASCII characters written raw, `/` not escaped; escaped are only `"`, `\`, and the
//!   control characters U+0000–U+001F (`\n \t \r \b \f` by name, the rest as `\u00xx` with
//!   lowercase hex); DEL (U+007F) is written raw, as Python does;
//! - floats as Python's `repr`: the shortest digits that read back to the same float, in fixed
//!   notation when the decimal exponent is in [-4, 16) (with `.0` on whole numbers), otherwise
//!   as `d.ddde+XX` / `e-XX` with at least two exponent digits; `-0.0` keeps its sign;
//! - integers as they are.
//!
//! The test vectors in `shared/vectors/lumo-hmac.json` were checked against the Lumo daemon.

use std::fmt::Write as _;

use serde_json::{Number, Value};

/// Encodes `params` in Lumo's canonical signing form (see the module docs).
pub fn lumo_canonical(params: &Value) -> String {
    let mut out = String::with_capacity(64);
    write_value(params, &mut out);
    out
}

fn write_value(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // serde_json's map is a BTreeMap and so already sorted, unless some crate in the
            // build enables serde_json's `preserve_order`; sort only if needed.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if !entries.windows(2).all(|w| w[0].0 < w[1].0) {
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_value(item, out);
            }
            out.push('}');
        }
    }
}

fn write_string(s: &str, out: &mut String) {
    out.reserve(s.len() + 2);
    out.push('"');
    let mut clean_from = 0;
    for (i, byte) in s.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[clean_from..i]);
        clean_from = i + 1;
        if escape.is_empty() {
            // Infallible: writing to a String.
            let _ = write!(out, "\\u{byte:04x}");
        } else {
            out.push_str(escape);
        }
    }
    out.push_str(&s[clean_from..]);
    out.push('"');
}

fn write_number(n: &Number, out: &mut String) {
    if let Some(i) = n.as_u64() {
        let _ = write!(out, "{i}");
    } else if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(f) = n.as_f64() {
        write_python_float(f, out);
    }
}

/// Writes a finite float as Python's `repr` does.
fn write_python_float(f: f64, out: &mut String) {
    if !f.is_finite() {
        // Not representable in a serde_json Value; written as Python would, for completeness.
        out.push_str(if f.is_nan() {
            "NaN"
        } else if f > 0.0 {
            "Infinity"
        } else {
            "-Infinity"
        });
        return;
    }
    let mut buffer = ryu::Buffer::new();
    let shortest = buffer.format_finite(f);
    let (digits, exponent) = decompose(shortest);
    if f.is_sign_negative() {
        out.push('-');
    }
    let digits = if digits.is_empty() { "0" } else { &digits };
    // The value is 0.d1d2d3… × 10^exponent; Python's scientific exponent is one less.
    let sci = exponent - 1;
    if (-4..16).contains(&sci) {
        if exponent <= 0 {
            out.push_str("0.");
            for _ in 0..-exponent {
                out.push('0');
            }
            out.push_str(digits);
        } else {
            let point = exponent as usize; // 1..=16
            if digits.len() <= point {
                out.push_str(digits);
                for _ in digits.len()..point {
                    out.push('0');
                }
                out.push_str(".0");
            } else {
                out.push_str(&digits[..point]);
                out.push('.');
                out.push_str(&digits[point..]);
            }
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let sign = if sci < 0 { '-' } else { '+' };
        let _ = write!(out, "e{sign}{:02}", sci.unsigned_abs());
    }
}

/// Splits ryu's output (any of its layouts: `1.5`, `100000.0`, `1e100`, `1.5e-7`, `0.001`)
/// into significant digits without leading or trailing zeros, and the exponent `e` such that
/// the value is `0.DIGITS × 10^e`. Zero gives no digits.
fn decompose(shortest: &str) -> (String, i32) {
    let unsigned = shortest.trim_start_matches('-');
    let (mantissa, exp) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (unsigned, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut digits = String::with_capacity(int_part.len() + frac_part.len());
    digits.push_str(int_part);
    digits.push_str(frac_part);
    let mut exponent = int_part.len() as i32 + exp;
    let leading = digits.len() - digits.trim_start_matches('0').len();
    exponent -= leading as i32;
    let trimmed = digits
        .trim_start_matches('0')
        .trim_end_matches('0')
        .to_owned();
    if trimmed.is_empty() {
        return (trimmed, 0);
    }
    (trimmed, exponent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn float(f: f64) -> String {
        let mut out = String::new();
        write_python_float(f, &mut out);
        out
    }

    #[test]
    fn floats_follow_python_repr() {
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (1.5, "1.5"),
            (-2.25, "-2.25"),
            (0.1, "0.1"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (0.000123, "0.000123"),
            (0.0000123, "1.23e-05"),
            (100000.0, "100000.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1234567890123456.7, "1234567890123456.8"),
            (12345678901234567.0, "1.2345678901234568e+16"),
            (1e100, "1e+100"),
            (-1e-100, "-1e-100"),
            (1e-7, "1e-07"),
            (123.456, "123.456"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (f64::MIN_POSITIVE, "2.2250738585072014e-308"),
            (0.30000000000000004, "0.30000000000000004"),
            (9007199254740993.0, "9007199254740992.0"),
        ];
        for &(f, expected) in cases {
            assert_eq!(float(f), expected, "{f:e}");
        }
    }

    #[test]
    fn keys_sorted_at_every_level_by_code_point() {
        let v =
            json!({"b": {"z": 1, "a": [ {"y": true, "x": null} ]}, "a": 0, "é": 1, "z": 2, "Z": 3});
        assert_eq!(
            lumo_canonical(&v),
            r#"{"Z":3,"a":0,"b":{"a":[{"x":null,"y":true}],"z":1},"z":2,"é":1}"#
        );
    }

    #[test]
    fn strings_escape_like_python_with_ensure_ascii_off() {
        let v =
            json!("q\" b\\ n\n r\r t\t b\u{8} f\u{c} 1\u{1} 1f\u{1f} del\u{7f} / é 😀 \u{2028}");
        assert_eq!(
            lumo_canonical(&v),
            "\"q\\\" b\\\\ n\\n r\\r t\\t b\\b f\\f 1\\u0001 1f\\u001f del\u{7f} / é 😀 \u{2028}\""
        );
    }

    #[test]
    fn integers_are_written_as_they_are() {
        let v = json!([0, -1, i64::MIN, u64::MAX, 12345678901234567890u64]);
        assert_eq!(
            lumo_canonical(&v),
            "[0,-1,-9223372036854775808,18446744073709551615,12345678901234567890]"
        );
    }

    #[test]
    fn scalars_and_empty_containers() {
        assert_eq!(lumo_canonical(&Value::Null), "null");
        assert_eq!(lumo_canonical(&json!(true)), "true");
        assert_eq!(lumo_canonical(&json!({})), "{}");
        assert_eq!(lumo_canonical(&json!([])), "[]");
        assert_eq!(lumo_canonical(&json!([[], {}])), "[[],{}]");
    }
}
