//! What a certificate NAME and a subject alternative name may be.
//!
//! A NAME becomes a file name (`issued/NAME.pem`) and a common name, so it is held to a small,
//! safe alphabet: no path separators, no `..`, no leading dot or dash (hidden files, options),
//! no control characters, at most 64 bytes (the X.520 upper bound for a common name).

use std::net::IpAddr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("name {0:?} is invalid: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit, without '..'")]
    Name(String),
    #[error("subject alternative name {0:?} is neither an IP address nor a DNS name (letters, digits, '-', dots between labels, optionally a leading '*.')")]
    San(String),
}

/// Accepts `[A-Za-z0-9][A-Za-z0-9._-]{0,63}` without `..` and not ending in `.`.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let bad = || NameError::Name(name.to_string());
    let bytes = name.as_bytes();
    let first_ok = bytes.first().is_some_and(u8::is_ascii_alphanumeric);
    if !first_ok
        || bytes.len() > 64
        || name.contains("..")
        || name.ends_with('.')
        || !bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad());
    }
    Ok(())
}

/// What a SAN becomes: an IP address, or a DNS name (RFC 1035 labels, a leading `*.` allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum San {
    Ip(IpAddr),
    Dns(String),
}

pub fn validate_san(s: &str) -> Result<San, NameError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(San::Ip(ip));
    }
    let bad = || NameError::San(s.to_string());
    let rest = s.strip_prefix("*.").unwrap_or(s);
    if rest.is_empty() || s.len() > 253 {
        return Err(bad());
    }
    for label in rest.split('.') {
        let b = label.as_bytes();
        if b.is_empty()
            || b.len() > 63
            || b[0] == b'-'
            || b[b.len() - 1] == b'-'
            || !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        {
            return Err(bad());
        }
    }
    Ok(San::Dns(s.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_safe_file_names_are_accepted() {
        for n in [
            "web",
            "agent-01",
            "db.example.com",
            "a",
            "A_b-c.d",
            &"x".repeat(64),
        ] {
            assert_eq!(validate_name(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn names_that_could_escape_the_directory_or_confuse_are_refused() {
        for n in [
            "",
            "..",
            "../ca",
            "a/b",
            "/etc/passwd",
            ".hidden",
            "-rf",
            "a..b",
            "a.",
            "sp ace",
            "new\nline",
            "nul\0",
            "tab\t",
            "é",
            "a\\b",
            &"x".repeat(65),
        ] {
            assert!(validate_name(n).is_err(), "{n:?} accepted");
        }
    }

    #[test]
    fn sans_are_ip_addresses_or_dns_names() {
        assert_eq!(
            validate_san("127.0.0.1"),
            Ok(San::Ip("127.0.0.1".parse().unwrap()))
        );
        assert_eq!(validate_san("::1"), Ok(San::Ip("::1".parse().unwrap())));
        assert_eq!(validate_san("LocalHost"), Ok(San::Dns("localhost".into())));
        assert_eq!(
            validate_san("*.example.com"),
            Ok(San::Dns("*.example.com".into()))
        );
        for s in [
            "", "a..b", "-a.com", "a-.com", "a b", "*", "*.", "a.*.com", "x/y", "a_b.com",
        ] {
            assert!(validate_san(s).is_err(), "{s:?} accepted");
        }
    }
}
