//! How policy globs are compiled, and which patterns can reach names under a prefix.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// Which kind of string a glob is matched against.
#[derive(Clone, Copy, Debug)]
pub(crate) enum GlobKind {
    /// Permissions (`secrets:read:db_*`) and names (units, CNs): `*` matches any characters.
    Text,
    /// Executable paths: `*` stays within one path component and `**` crosses them, so
    /// `/opt/app/*` does not reach `/opt/app/uploads/evil`.
    Path,
}

pub(crate) fn glob(pattern: &str, kind: GlobKind) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern)
        .literal_separator(matches!(kind, GlobKind::Path))
        .backslash_escape(true)
        .build()
}

/// One set for a list of patterns; the error carries the offending pattern.
pub(crate) fn glob_set(
    patterns: &[String],
    kind: GlobKind,
) -> Result<GlobSet, (String, globset::Error)> {
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        builder.add(glob(p, kind).map_err(|e| (p.clone(), e))?);
    }
    builder.build().map_err(|e| (patterns.join(", "), e))
}

fn is_meta(c: char) -> bool {
    matches!(c, '*' | '?' | '[' | '{' | '\\')
}

/// The part of `pattern` that applies to names under `prefix`, as a pattern over those names:
/// `secrets:read:db_*` under `secrets:read:` gives `db_*`. A wildcard that reaches into the
/// prefix (`*`, `secrets:*`, `secrets:{read,list}:x`) gives `*`: it may match any name, and the
/// caller filters each concrete name with `decide` anyway. `None`: it can match no name there.
pub(crate) fn suffix_under(pattern: &str, prefix: &str) -> Option<String> {
    let mut rest = pattern.chars();
    for want in prefix.chars() {
        match rest.next() {
            Some(c) if is_meta(c) => return Some("*".to_string()),
            Some(c) if c == want => {}
            _ => return None,
        }
    }
    let suffix = rest.as_str();
    (!suffix.is_empty()).then(|| suffix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, kind: GlobKind, s: &str) -> bool {
        glob(pattern, kind).unwrap().compile_matcher().is_match(s)
    }

    #[test]
    fn text_star_crosses_colons_dots_and_slashes() {
        assert!(matches("admin:*", GlobKind::Text, "admin:reload"));
        assert!(matches(
            "commands:service.*",
            GlobKind::Text,
            "commands:service.restart"
        ));
        assert!(matches("*", GlobKind::Text, "secrets:read:a/b.c"));
        assert!(matches(
            "secrets:*:db_*",
            GlobKind::Text,
            "secrets:read:db_main"
        ));
        assert!(!matches(
            "commands:service.*",
            GlobKind::Text,
            "commands:services"
        ));
        assert!(!matches("admin:*", GlobKind::Text, "administrator"));
    }

    #[test]
    fn path_star_stays_in_one_component() {
        assert!(matches(
            "/usr/bin/php-fpm*",
            GlobKind::Path,
            "/usr/bin/php-fpm8.2"
        ));
        assert!(!matches(
            "/opt/app/*",
            GlobKind::Path,
            "/opt/app/uploads/evil"
        ));
        assert!(matches(
            "/opt/app/**",
            GlobKind::Path,
            "/opt/app/uploads/evil"
        ));
    }

    #[test]
    fn suffixes_under_a_prefix() {
        let cases = [
            ("secrets:read:db_*", Some("db_*")),
            ("secrets:read:api_key", Some("api_key")),
            ("secrets:read:", None),
            ("secrets:write:db_*", None),
            ("secrets:rea", None),
            ("secrets:*", Some("*")),
            ("*", Some("*")),
            ("secrets:{read,list}:x", Some("*")),
            ("secrets:r?ad:x", Some("*")),
            ("system:*", None),
        ];
        for (pattern, want) in cases {
            assert_eq!(
                suffix_under(pattern, "secrets:read:").as_deref(),
                want,
                "{pattern}"
            );
        }
    }
}
