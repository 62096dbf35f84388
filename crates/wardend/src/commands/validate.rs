//! Validators, one per kind of parameter. Each returns the value in the form later code relies on
//! (a [`SafePath`], a resolved uid, a parsed mode) or a [`ValidationError`] that names the field
//! and says what was expected.
//!
//! Names are checked against a narrow ASCII alphabet, never against a list of "bad" characters:
//! shell metacharacters, NUL bytes, newlines, look-alike Unicode letters and option-like leading
//! dashes all fall outside it. The specific refusals (NUL, control character, non-ASCII, shell
//! metacharacter) are reported as such so a client learns what it did wrong.
//!
//! Allowlist membership (is this service allowed?) is the job of
//! [`CommandsConfig`](super::CommandsConfig); these functions check shape only, except
//! [`validate_path`] which needs the prefix and protected lists and takes them as arguments.

use super::CommandError;
use nix::unistd::{Gid, Group, Uid, User};
use serde_json::json;
use std::io;
use std::path::Path;

/// Longest path accepted (Linux `PATH_MAX` is 4096 including the NUL).
pub const MAX_PATH_LEN: usize = 4095;
/// Longest single path component (Linux `NAME_MAX`).
pub const MAX_COMPONENT_LEN: usize = 255;

/// Characters a shell would interpret. None of them is valid in any name validated here; they are
/// reported specifically so that an injection attempt is recognisable in the audit log.
const SHELL_META: &[char] = &[
    ';', '|', '&', '$', '`', '(', ')', '{', '}', '[', ']', '<', '>', '*', '?', '!', '~', '#', '"',
    '\'', '\\', ' ', '\t', '=', '%', ',',
];

/// Why a parameter was refused. Every variant names the field; the message says what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("`{field}` is required and must not be empty")]
    Empty { field: &'static str },
    #[error("`{field}` is too long: at most {max} bytes")]
    TooLong { field: &'static str, max: usize },
    #[error("`{field}` contains a NUL byte")]
    Nul { field: &'static str },
    #[error("`{field}` contains a newline or another control character")]
    Control { field: &'static str },
    #[error("`{field}` contains a non-ASCII character; expected {expected}")]
    NonAscii {
        field: &'static str,
        expected: &'static str,
    },
    #[error("`{field}` contains a shell metacharacter {ch:?}; expected {expected}")]
    ShellMeta {
        field: &'static str,
        ch: char,
        expected: &'static str,
    },
    #[error("`{field}` is malformed; expected {expected}")]
    Invalid {
        field: &'static str,
        expected: &'static str,
    },
    #[error("`{field}` must be an absolute path (starting with `/`)")]
    NotAbsolute { field: &'static str },
    #[error("`{field}` must be canonical: {problem}")]
    NotCanonical {
        field: &'static str,
        problem: &'static str,
    },
    #[error("`{field}` must not contain `..`")]
    DotDot { field: &'static str },
    #[error("`{field}`: `{component}` is a symbolic link; symlinks are not followed")]
    Symlink {
        field: &'static str,
        component: String,
    },
    #[error("`{field}`: `{component}` exists and is not a directory")]
    NotADirectory {
        field: &'static str,
        component: String,
    },
    #[error("`{field}`: cannot inspect `{component}`: {reason}")]
    Inaccessible {
        field: &'static str,
        component: String,
        reason: String,
    },
    #[error("`{field}` is outside the allowed prefixes {allowed:?}")]
    PathNotAllowed {
        field: &'static str,
        allowed: Vec<String>,
    },
    #[error("`{field}` is or contains a protected file (`{protected}`)")]
    Protected {
        field: &'static str,
        protected: String,
    },
    #[error("`{field}`: `{value}` is reserved")]
    Reserved { field: &'static str, value: String },
    #[error("`{field}`: `{value}` is not in the allowlist")]
    NotAllowed { field: &'static str, value: String },
    #[error(
        "`{field}`: mode {mode:04o} sets setuid, setgid or sticky bits, which are not allowed"
    )]
    SpecialMode { field: &'static str, mode: u32 },
    #[error("`{field}`: no such {kind} `{value}`")]
    UnknownId {
        field: &'static str,
        kind: &'static str,
        value: String,
    },
}

impl ValidationError {
    /// The parameter at fault.
    pub fn field(&self) -> &'static str {
        use ValidationError::*;
        match self {
            Empty { field }
            | TooLong { field, .. }
            | Nul { field }
            | Control { field }
            | NonAscii { field, .. }
            | ShellMeta { field, .. }
            | Invalid { field, .. }
            | NotAbsolute { field }
            | NotCanonical { field, .. }
            | DotDot { field }
            | Symlink { field, .. }
            | NotADirectory { field, .. }
            | Inaccessible { field, .. }
            | PathNotAllowed { field, .. }
            | Protected { field, .. }
            | Reserved { field, .. }
            | NotAllowed { field, .. }
            | SpecialMode { field, .. }
            | UnknownId { field, .. } => field,
        }
    }
}

impl From<ValidationError> for CommandError {
    fn from(e: ValidationError) -> Self {
        CommandError::validation(e.to_string()).with_details(json!({ "field": e.field() }))
    }
}

/// A printable, bounded rendering of a refused value, for messages (never used for secrets).
pub(crate) fn shown(value: &str) -> String {
    let mut s: String = value
        .chars()
        .take(64)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().count() > 64 {
        s.push('…');
    }
    s
}

/// Common checks for any textual value, in the order a client would want to hear about them.
fn check_text(
    field: &'static str,
    s: &str,
    max: usize,
    expected: &'static str,
) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::Empty { field });
    }
    if s.len() > max {
        return Err(ValidationError::TooLong { field, max });
    }
    if s.contains('\0') {
        return Err(ValidationError::Nul { field });
    }
    if s.chars().any(char::is_control) {
        return Err(ValidationError::Control { field });
    }
    if !s.is_ascii() {
        return Err(ValidationError::NonAscii { field, expected });
    }
    Ok(())
}

/// [`check_text`], then the alphabet: a shell metacharacter is reported as such, any other
/// character outside `allowed` as a malformed value.
fn check_name(
    field: &'static str,
    s: &str,
    max: usize,
    expected: &'static str,
    first: impl Fn(u8) -> bool,
    rest: impl Fn(u8) -> bool,
) -> Result<(), ValidationError> {
    check_text(field, s, max, expected)?;
    if let Some(ch) = s.chars().find(|c| SHELL_META.contains(c)) {
        return Err(ValidationError::ShellMeta {
            field,
            ch,
            expected,
        });
    }
    let b = s.as_bytes();
    if !first(b[0]) || !b[1..].iter().all(|&c| rest(c)) {
        return Err(ValidationError::Invalid { field, expected });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

/// A path that passed [`validate_path`]: absolute, canonical, ASCII, under an allowed prefix, not
/// protected, and with no symlink among its existing components *at validation time*. File
/// operations still open it component by component with `O_NOFOLLOW` ([`super::files`]): this
/// type is the promise about its shape, not about the file system an instant later.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct SafePath(String);

impl SafePath {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }
    /// The components after `/`, all non-empty and none `.` or `..`.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0[1..].split('/')
    }
}

impl std::fmt::Display for SafePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The path rules [`validate_path`] enforces, borrowed from [`CommandsConfig`](super::CommandsConfig).
#[derive(Debug, Clone, Copy)]
pub struct PathRules<'a> {
    /// Allowed prefixes, each absolute and ending with `/`. A path must be strictly below one.
    pub prefixes: &'a [String],
    /// Protected paths: `/etc/shadow` (that file), `/etc/sudoers.d/*` (that directory and
    /// everything in it).
    pub protected: &'a [String],
}

/// Characters refused in paths although a file name may hold them: no tool warden runs needs
/// them, and a panel (or a cron job, or an operator's script) that later pastes such a path into
/// a shell would be injected. Spaces, brackets, `#`, `%`, `+`, `=` and `,` stay allowed.
const PATH_META: &[char] = &[
    ';', '|', '&', '$', '`', '<', '>', '\'', '"', '\\', '*', '?', '!',
];

/// Syntax only: absolute, ASCII, no NUL/control, no shell metacharacter ([`PATH_META`]), no
/// empty, `.` or `..` component, no trailing `/`, bounded lengths.
pub fn check_path_syntax(field: &'static str, s: &str) -> Result<(), ValidationError> {
    const EXP: &str = "an ASCII absolute path";
    check_text(field, s, MAX_PATH_LEN, EXP)?;
    if !s.starts_with('/') {
        return Err(ValidationError::NotAbsolute { field });
    }
    if let Some(ch) = s.chars().find(|c| PATH_META.contains(c)) {
        return Err(ValidationError::ShellMeta {
            field,
            ch,
            expected: EXP,
        });
    }
    if s == "/" {
        return Err(ValidationError::NotCanonical {
            field,
            problem: "`/` itself is not allowed",
        });
    }
    for comp in s[1..].split('/') {
        match comp {
            "" => {
                return Err(ValidationError::NotCanonical {
                    field,
                    problem: "no empty components (`//`) and no trailing `/`",
                })
            }
            "." => {
                return Err(ValidationError::NotCanonical {
                    field,
                    problem: "no `.` components",
                })
            }
            ".." => return Err(ValidationError::DotDot { field }),
            c if c.len() > MAX_COMPONENT_LEN => {
                return Err(ValidationError::TooLong {
                    field,
                    max: MAX_COMPONENT_LEN,
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Does `path` match the protected entry `pat`, or contain it (so that a recursive operation or
/// the removal of a directory would reach it)?
fn protected_hit(path: &str, pat: &str) -> bool {
    let (base, tree) = match pat.strip_suffix("/*") {
        Some(b) => (b, true),
        None => (pat.trim_end_matches('/'), false),
    };
    let under = |outer: &str, inner: &str| {
        inner.len() > outer.len()
            && inner.starts_with(outer)
            && inner.as_bytes()[outer.len()] == b'/'
    };
    path == base || (tree && under(base, path)) || under(path, base)
}

/// Validates a path parameter. See [`SafePath`] for what a success promises.
///
/// The symlink check walks from `/` with `lstat` and stops at the first component that does not
/// exist (a file or directory about to be created); every existing component before it must be a
/// real directory, the last one may be anything but a symlink.
pub fn validate_path(
    field: &'static str,
    s: &str,
    rules: PathRules<'_>,
) -> Result<SafePath, ValidationError> {
    validate_path_inner(field, s, rules, false)
}

/// [`validate_path`] for a path whose last component may itself be a symbolic link: a link the
/// command manages (`sites-enabled/NAME`), which it replaces or removes but never follows. Every
/// directory before it must still be a real directory.
pub fn validate_link_path(
    field: &'static str,
    s: &str,
    rules: PathRules<'_>,
) -> Result<SafePath, ValidationError> {
    validate_path_inner(field, s, rules, true)
}

fn validate_path_inner(
    field: &'static str,
    s: &str,
    rules: PathRules<'_>,
    final_link_ok: bool,
) -> Result<SafePath, ValidationError> {
    check_path_syntax(field, s)?;
    if !rules
        .prefixes
        .iter()
        .any(|p| p.ends_with('/') && s.len() > p.len() && s.starts_with(p.as_str()))
    {
        return Err(ValidationError::PathNotAllowed {
            field,
            allowed: rules.prefixes.to_vec(),
        });
    }
    if let Some(p) = rules.protected.iter().find(|p| protected_hit(s, p)) {
        return Err(ValidationError::Protected {
            field,
            protected: p.clone(),
        });
    }
    match (final_link_ok, s.rsplit_once('/')) {
        (true, Some((parent, _))) if !parent.is_empty() => check_no_symlinks(field, parent)?,
        _ => check_no_symlinks(field, s)?,
    }
    Ok(SafePath(s.to_string()))
}

/// `lstat` every existing component of the (syntactically checked) absolute path `s`.
pub fn check_no_symlinks(field: &'static str, s: &str) -> Result<(), ValidationError> {
    let comps: Vec<&str> = s[1..].split('/').collect();
    let mut end = 0;
    for (i, comp) in comps.iter().enumerate() {
        end += 1 + comp.len();
        let prefix = &s[..end];
        match std::fs::symlink_metadata(prefix) {
            Ok(md) => {
                let ft = md.file_type();
                if ft.is_symlink() {
                    return Err(ValidationError::Symlink {
                        field,
                        component: prefix.to_string(),
                    });
                }
                if i + 1 < comps.len() && !ft.is_dir() {
                    return Err(ValidationError::NotADirectory {
                        field,
                        component: prefix.to_string(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(ValidationError::Inaccessible {
                    field,
                    component: prefix.to_string(),
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

fn lower_digit(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}
fn alnum(c: u8) -> bool {
    c.is_ascii_alphanumeric()
}

/// A service (unit) name: `[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}`, e.g. `nginx`, `php8.3-fpm`.
pub fn validate_service_name(s: &str) -> Result<(), ValidationError> {
    const EXP: &str = "a service name like `nginx` or `php8.3-fpm` ([A-Za-z0-9][A-Za-z0-9_.@-]*)";
    check_name("service", s, 128, EXP, alnum, |c| {
        alnum(c) || b"_.@-".contains(&c)
    })?;
    if s.contains("..") {
        return Err(ValidationError::DotDot { field: "service" });
    }
    Ok(())
}

/// A Debian package with an optional version: `name[=version]`, name `[a-z0-9][a-z0-9+.-]+`,
/// version `[A-Za-z0-9.+~:-]+` (an epoch `1:` allowed). Returns `(name, version)`.
pub fn validate_package(s: &str) -> Result<(&str, Option<&str>), ValidationError> {
    const EXP: &str = "a Debian package name like `nginx` or `php8.3-fpm=8.3.1-1` (name[=version])";
    check_text("packages", s, 256, EXP)?;
    if let Some(ch) = s.chars().find(|c| *c != '=' && SHELL_META.contains(c)) {
        return Err(ValidationError::ShellMeta {
            field: "packages",
            ch,
            expected: EXP,
        });
    }
    let (name, version) = match s.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (s, None),
    };
    let nb = name.as_bytes();
    let name_ok = nb.len() >= 2
        && nb.len() <= 128
        && lower_digit(nb[0])
        && nb[1..]
            .iter()
            .all(|&c| lower_digit(c) || b"+.-".contains(&c));
    if !name_ok {
        return Err(ValidationError::Invalid {
            field: "packages",
            expected: EXP,
        });
    }
    if let Some(v) = version {
        let vb = v.as_bytes();
        let ok = !vb.is_empty()
            && vb.len() <= 128
            && vb[0].is_ascii_digit()
            && vb.iter().all(|&c| alnum(c) || b".+~:-".contains(&c));
        if !ok {
            return Err(ValidationError::Invalid {
                field: "packages",
                expected: EXP,
            });
        }
    }
    Ok((name, version))
}

/// A repository in `ppa:owner/name` form.
pub fn validate_repository(s: &str) -> Result<(), ValidationError> {
    const EXP: &str = "a repository like `ppa:ondrej/php` (ppa:owner/name)";
    check_text("repository", s, 256, EXP)?;
    if let Some(ch) = s.chars().find(|c| SHELL_META.contains(c)) {
        return Err(ValidationError::ShellMeta {
            field: "repository",
            ch,
            expected: EXP,
        });
    }
    let part_ok = |p: &str| {
        let b = p.as_bytes();
        !b.is_empty()
            && b.len() <= 64
            && alnum(b[0])
            && b.iter().all(|&c| alnum(c) || b"._+-".contains(&c))
    };
    match s.strip_prefix("ppa:").and_then(|r| r.split_once('/')) {
        Some((owner, name)) if part_ok(owner) && part_ok(name) => Ok(()),
        _ => Err(ValidationError::Invalid {
            field: "repository",
            expected: EXP,
        }),
    }
}

/// A PHP version: `\d\.\d`, e.g. `8.3`.
pub fn validate_php_version(s: &str) -> Result<(), ValidationError> {
    const EXP: &str = "a PHP version like `8.3` (digit.digit)";
    check_text("version", s, 8, EXP)?;
    let b = s.as_bytes();
    if b.len() == 3 && b[0].is_ascii_digit() && b[1] == b'.' && b[2].is_ascii_digit() {
        Ok(())
    } else {
        Err(ValidationError::Invalid {
            field: "version",
            expected: EXP,
        })
    }
}

/// A PHP extension: `[a-z0-9][a-z0-9_-]{0,63}`.
pub fn validate_php_extension(s: &str) -> Result<(), ValidationError> {
    const EXP: &str = "a PHP extension like `redis` or `mbstring` ([a-z0-9][a-z0-9_-]*)";
    check_name("extension", s, 64, EXP, lower_digit, |c| {
        lower_digit(c) || c == b'_' || c == b'-'
    })
}

/// An nginx site name (a file in `sites-available`): `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`, no `..`.
pub fn validate_site_name(s: &str) -> Result<(), ValidationError> {
    const EXP: &str = "a site name like `example.com` ([A-Za-z0-9][A-Za-z0-9._-]*)";
    check_name("site_name", s, 128, EXP, alnum, |c| {
        alnum(c) || b"._-".contains(&c)
    })?;
    if s.contains("..") {
        return Err(ValidationError::DotDot { field: "site_name" });
    }
    Ok(())
}

/// A template name (a file directly in the templates directory):
/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`, no `..`.
pub fn validate_template_name(s: &str) -> Result<(), ValidationError> {
    const EXP: &str =
        "a template file name like `nginx-site.conf.j2` ([A-Za-z0-9_][A-Za-z0-9_.-]*)";
    check_name(
        "template",
        s,
        128,
        EXP,
        |c| alnum(c) || c == b'_',
        |c| alnum(c) || b"_.-".contains(&c),
    )?;
    if s.contains("..") {
        return Err(ValidationError::DotDot { field: "template" });
    }
    Ok(())
}

/// A database password: 8–128 printable ASCII characters, without `'` and `\\`. The password
/// reaches the database client inside a quoted SQL literal on stdin; refusing the two characters
/// that could end or escape that literal (in either client's lexer, in any SQL mode) makes the
/// quoting trivially correct.
pub fn validate_db_password(s: &str) -> Result<(), ValidationError> {
    const EXP: &str = "8 to 128 printable ASCII characters other than ' and \\";
    if s.len() < 8 {
        return Err(ValidationError::Invalid {
            field: "password",
            expected: EXP,
        });
    }
    check_text("password", s, 128, EXP)?;
    if s.bytes()
        .any(|c| !(0x20..0x7f).contains(&c) || c == b'\'' || c == b'\\')
    {
        return Err(ValidationError::Invalid {
            field: "password",
            expected: EXP,
        });
    }
    Ok(())
}

/// php.ini directives `php.write_ini` refuses: they load code, run programs, or widen what
/// scripts may reach (`open_basedir`, `disable_functions`), so a panel must not set them.
pub const DANGEROUS_INI_KEYS: &[&str] = &[
    "allow_url_include",
    "auto_append_file",
    "auto_prepend_file",
    "disable_classes",
    "disable_functions",
    "doc_root",
    "enable_dl",
    "error_log",
    "extension",
    "extension_dir",
    "ffi.enable",
    "ffi.preload",
    "include_path",
    "mail.log",
    "open_basedir",
    "opcache.preload",
    "opcache.preload_user",
    "sendmail_path",
    "session.save_path",
    "upload_tmp_dir",
    "user_dir",
    "user_ini.filename",
    "zend_extension",
];

/// A php.ini directive name: `[a-z][a-z0-9_.]{0,63}`, not in [`DANGEROUS_INI_KEYS`] (nor under
/// `cgi.` or `fastcgi.`).
pub fn validate_ini_key(s: &str) -> Result<(), ValidationError> {
    const EXP: &str = "a php.ini directive like `memory_limit` ([a-z][a-z0-9_.]*)";
    check_name(
        "settings",
        s,
        64,
        EXP,
        |c| c.is_ascii_lowercase(),
        |c| lower_digit(c) || c == b'_' || c == b'.',
    )?;
    if DANGEROUS_INI_KEYS.contains(&s) || s.starts_with("cgi.") || s.starts_with("fastcgi.") {
        return Err(ValidationError::NotAllowed {
            field: "settings",
            value: s.to_string(),
        });
    }
    Ok(())
}

/// A php.ini value written inside double quotes: at most 256 printable ASCII characters, none of
/// `"`, `\\`, `$` (php.ini expands `${VAR}`), `;` (a comment) or newlines.
pub fn validate_ini_value(s: &str) -> Result<(), ValidationError> {
    const EXP: &str = "a php.ini value like `256M` (printable ASCII, no quote, backslash, $ or ;)";
    if s.is_empty() {
        return Ok(());
    }
    check_text("settings", s, 256, EXP)?;
    if let Some(ch) = s.chars().find(|c| ['"', '\\', '$', ';', '`'].contains(c)) {
        return Err(ValidationError::ShellMeta {
            field: "settings",
            ch,
            expected: EXP,
        });
    }
    Ok(())
}

/// PEM text of the given kind: ASCII, at most 64 KiB, with the `-----BEGIN …` marker.
pub fn validate_pem(
    field: &'static str,
    s: &str,
    marker: &'static str,
) -> Result<(), ValidationError> {
    const EXP: &str = "PEM text (-----BEGIN …-----)";
    if s.is_empty() {
        return Err(ValidationError::Empty { field });
    }
    if s.len() > 64 * 1024 {
        return Err(ValidationError::TooLong {
            field,
            max: 64 * 1024,
        });
    }
    if s.contains('\0') {
        return Err(ValidationError::Nul { field });
    }
    if !s.is_ascii() {
        return Err(ValidationError::NonAscii {
            field,
            expected: EXP,
        });
    }
    if s.chars().any(|c| c.is_control() && c != '\n' && c != '\r') {
        return Err(ValidationError::Control { field });
    }
    if !s.contains(marker) {
        return Err(ValidationError::Invalid {
            field,
            expected: EXP,
        });
    }
    Ok(())
}

/// System accounts that `user.*` never creates or deletes.
pub const RESERVED_USERNAMES: &[&str] = &[
    "root",
    "daemon",
    "bin",
    "sys",
    "sync",
    "games",
    "man",
    "lp",
    "mail",
    "news",
    "uucp",
    "proxy",
    "www-data",
    "backup",
    "list",
    "irc",
    "gnats",
    "nobody",
    "sshd",
    "messagebus",
    "mysql",
    "postgres",
    "redis",
    "memcache",
    "nginx",
    "warden",
    "_apt",
];

/// A login name: `[a-z][a-z0-9_-]{0,31}`, not a reserved system account.
pub fn validate_username(s: &str) -> Result<(), ValidationError> {
    const EXP: &str = "a username like `alice` ([a-z][a-z0-9_-]{0,31})";
    check_name(
        "username",
        s,
        32,
        EXP,
        |c| c.is_ascii_lowercase(),
        |c| lower_digit(c) || c == b'_' || c == b'-',
    )?;
    if RESERVED_USERNAMES.contains(&s) || s.starts_with("systemd-") {
        return Err(ValidationError::Reserved {
            field: "username",
            value: s.to_string(),
        });
    }
    Ok(())
}

/// A group name given to `user.create`: same alphabet as a username, reserved names allowed
/// (adding a user to `www-data` is normal).
pub fn validate_group_name(s: &str) -> Result<(), ValidationError> {
    const EXP: &str = "a group name like `www-data` ([a-z_][a-z0-9_-]{0,31})";
    check_name(
        "groups",
        s,
        32,
        EXP,
        |c| c.is_ascii_lowercase() || c == b'_',
        |c| lower_digit(c) || c == b'_' || c == b'-',
    )
}

/// Database names no command may create, drop or grant on (compared case-insensitively).
pub const RESERVED_DB_NAMES: &[&str] = &[
    "mysql",
    "information_schema",
    "performance_schema",
    "sys",
    "postgres",
    "template0",
    "template1",
    "root",
    "admin",
    "mariadb.sys",
    "pg_catalog",
    "pg_toast",
    "public",
];

/// A database or database-user identifier: `[A-Za-z_]\w{0,63}` (ASCII word characters), not
/// reserved.
pub fn validate_db_identifier(field: &'static str, s: &str) -> Result<(), ValidationError> {
    const EXP: &str = "an identifier like `shop_db` ([A-Za-z_][A-Za-z0-9_]{0,63})";
    let word = |c: u8| alnum(c) || c == b'_';
    check_name(
        field,
        s,
        64,
        EXP,
        |c| c.is_ascii_alphabetic() || c == b'_',
        word,
    )?;
    let lower = s.to_ascii_lowercase();
    if RESERVED_DB_NAMES.contains(&lower.as_str()) || lower.starts_with("pg_") {
        return Err(ValidationError::Reserved {
            field,
            value: s.to_string(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Domains and e-mail
// ---------------------------------------------------------------------------------------------

/// A host name (RFC 1123): at least two labels, each 1–63 of `[A-Za-z0-9-]` not starting or
/// ending with `-`, 253 bytes in total, no trailing dot, a top-level label that is not all digits
/// (that would be an IP address). Internationalised names only as punycode (`xn--…`); any other
/// label with `--` in positions 3–4 is reserved by RFC 5891 and refused. Returned lower-cased.
pub fn validate_domain(field: &'static str, s: &str) -> Result<String, ValidationError> {
    const EXP: &str = "a domain like `example.com` (RFC 1123 labels; IDN as punycode `xn--…`)";
    check_text(field, s, 253, EXP)?;
    if let Some(ch) = s.chars().find(|c| SHELL_META.contains(c)) {
        return Err(ValidationError::ShellMeta {
            field,
            ch,
            expected: EXP,
        });
    }
    let invalid = || ValidationError::Invalid {
        field,
        expected: EXP,
    };
    let labels: Vec<&str> = s.split('.').collect();
    if labels.len() < 2 {
        return Err(invalid());
    }
    for l in &labels {
        let b = l.as_bytes();
        if b.is_empty()
            || b.len() > 63
            || !b.iter().all(|&c| alnum(c) || c == b'-')
            || b[0] == b'-'
            || b[b.len() - 1] == b'-'
        {
            return Err(invalid());
        }
        if b.len() >= 4 && &b[2..4] == b"--" && !l.to_ascii_lowercase().starts_with("xn--") {
            return Err(invalid());
        }
    }
    if labels[labels.len() - 1].bytes().all(|c| c.is_ascii_digit()) {
        return Err(invalid());
    }
    Ok(s.to_ascii_lowercase())
}

/// An e-mail address: `local@domain`, local part `[A-Za-z0-9._%+-]` (1–64, no leading,
/// trailing or doubled dot), domain as [`validate_domain`], 254 bytes in total.
pub fn validate_email(s: &str) -> Result<String, ValidationError> {
    const EXP: &str = "an e-mail address like `admin@example.com`";
    check_text("email", s, 254, EXP)?;
    let (local, domain) = s.rsplit_once('@').ok_or(ValidationError::Invalid {
        field: "email",
        expected: EXP,
    })?;
    let lb = local.as_bytes();
    let local_ok = !lb.is_empty()
        && lb.len() <= 64
        && lb.iter().all(|&c| alnum(c) || b"._%+-".contains(&c))
        && lb[0] != b'.'
        && lb[lb.len() - 1] != b'.'
        && !local.contains("..");
    if !local_ok {
        if let Some(ch) = local.chars().find(|c| SHELL_META.contains(c)) {
            return Err(ValidationError::ShellMeta {
                field: "email",
                ch,
                expected: EXP,
            });
        }
        return Err(ValidationError::Invalid {
            field: "email",
            expected: EXP,
        });
    }
    let domain = validate_domain("email", domain)?;
    Ok(format!("{local}@{domain}"))
}

// ---------------------------------------------------------------------------------------------
// Modes and owners
// ---------------------------------------------------------------------------------------------

/// A permission mode as an octal string: three or four octal digits (`"644"`, `"0755"`), or with
/// an explicit `0o` prefix. Setuid, setgid and sticky bits are refused unless `allow_special`.
pub fn validate_mode(
    field: &'static str,
    s: &str,
    allow_special: bool,
) -> Result<u32, ValidationError> {
    const EXP: &str = "an octal mode string like \"0644\" or \"755\"";
    check_text(field, s, 6, EXP)?;
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if !(3..=4).contains(&digits.len()) || !digits.bytes().all(|c| (b'0'..=b'7').contains(&c)) {
        return Err(ValidationError::Invalid {
            field,
            expected: EXP,
        });
    }
    let mode = u32::from_str_radix(digits, 8).map_err(|_| ValidationError::Invalid {
        field,
        expected: EXP,
    })?;
    if mode & 0o7000 != 0 && !allow_special {
        return Err(ValidationError::SpecialMode { field, mode });
    }
    Ok(mode)
}

/// An account or group name as it may exist on the system (`www-data`, `_apt`, `Debian-exim`).
fn check_account_name(field: &'static str, s: &str) -> Result<(), ValidationError> {
    const EXP: &str = "a user or group name, or a numeric id";
    check_name(
        field,
        s,
        32,
        EXP,
        |c| c.is_ascii_alphabetic() || c == b'_',
        |c| alnum(c) || b"_.-".contains(&c),
    )
}

fn parse_id(field: &'static str, s: &str) -> Result<Option<u32>, ValidationError> {
    if !s.bytes().all(|c| c.is_ascii_digit()) {
        return Ok(None);
    }
    match s.parse::<u32>() {
        // u32::MAX is (uid_t)-1, "leave unchanged" to chown(2): not an owner.
        Ok(id) if id != u32::MAX && s.len() <= 10 => Ok(Some(id)),
        _ => Err(ValidationError::Invalid {
            field,
            expected: "a numeric id below 4294967295",
        }),
    }
}

/// Resolves an owner given by name or numeric id to an existing user.
pub fn resolve_user(field: &'static str, s: &str) -> Result<Uid, ValidationError> {
    check_text(field, s, 32, "a user name or numeric uid")?;
    let found = match parse_id(field, s)? {
        Some(id) => User::from_uid(Uid::from_raw(id)),
        None => {
            check_account_name(field, s)?;
            User::from_name(s)
        }
    };
    match found {
        Ok(Some(u)) => Ok(u.uid),
        Ok(None) => Err(ValidationError::UnknownId {
            field,
            kind: "user",
            value: s.to_string(),
        }),
        Err(e) => Err(ValidationError::Inaccessible {
            field,
            component: s.to_string(),
            reason: format!("user lookup failed: {e}"),
        }),
    }
}

/// Resolves a group given by name or numeric id to an existing group.
pub fn resolve_group(field: &'static str, s: &str) -> Result<Gid, ValidationError> {
    check_text(field, s, 32, "a group name or numeric gid")?;
    let found = match parse_id(field, s)? {
        Some(id) => Group::from_gid(Gid::from_raw(id)),
        None => {
            check_account_name(field, s)?;
            Group::from_name(s)
        }
    };
    match found {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(ValidationError::UnknownId {
            field,
            kind: "group",
            value: s.to_string(),
        }),
        Err(e) => Err(ValidationError::Inaccessible {
            field,
            component: s.to_string(),
            reason: format!("group lookup failed: {e}"),
        }),
    }
}

/// For tests of later stages: a [`SafePath`] checked for syntax only, standing for one that was
/// validated before the file system was tampered with.
#[cfg(test)]
pub(crate) mod tests_support {
    pub(crate) fn unchecked(s: &str) -> super::SafePath {
        super::check_path_syntax("path", s).unwrap();
        super::SafePath(s.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn rules<'a>(prefixes: &'a [String], protected: &'a [String]) -> PathRules<'a> {
        PathRules {
            prefixes,
            protected,
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn path_syntax_refusals_say_what_is_wrong() {
        let p = s(&["/var/www/"]);
        let r = rules(&p, &[]);
        type Pred = fn(&ValidationError) -> bool;
        let cases: &[(&str, Pred)] = &[
            ("", |e| matches!(e, ValidationError::Empty { .. })),
            ("var/www/a", |e| {
                matches!(e, ValidationError::NotAbsolute { .. })
            }),
            ("/var/www/../../etc/passwd", |e| {
                matches!(e, ValidationError::DotDot { .. })
            }),
            ("/var/www/a/..", |e| {
                matches!(e, ValidationError::DotDot { .. })
            }),
            ("/var/www//a", |e| {
                matches!(e, ValidationError::NotCanonical { .. })
            }),
            ("/var/www/a/", |e| {
                matches!(e, ValidationError::NotCanonical { .. })
            }),
            ("/var/www/./a", |e| {
                matches!(e, ValidationError::NotCanonical { .. })
            }),
            ("/var/www/a\0b", |e| {
                matches!(e, ValidationError::Nul { .. })
            }),
            ("/var/www/a\nb", |e| {
                matches!(e, ValidationError::Control { .. })
            }),
            ("/var/www/p\u{0430}sswd", |e| {
                matches!(e, ValidationError::NonAscii { .. })
            }),
            ("/var/wwwx/a", |e| {
                matches!(e, ValidationError::PathNotAllowed { .. })
            }),
            ("/var/www/", |e| {
                matches!(e, ValidationError::NotCanonical { .. })
            }),
            ("/var/www", |e| {
                matches!(e, ValidationError::PathNotAllowed { .. })
            }),
        ];
        for (input, pred) in cases {
            let e = validate_path("path", input, r).unwrap_err();
            assert!(pred(&e), "{input:?} gave {e:?}");
        }
        let long = format!("/var/www/{}", "a".repeat(300));
        assert!(matches!(
            validate_path("path", &long, r),
            Err(ValidationError::TooLong { .. })
        ));
        let huge = format!("/var/www/{}", "a/".repeat(3000));
        assert!(matches!(
            validate_path("path", &huge, r),
            Err(ValidationError::TooLong { .. })
        ));
    }

    #[test]
    fn protected_files_and_their_directories_are_refused() {
        let p = s(&["/etc/", "/root/"]);
        let prot = s(&["/etc/shadow", "/etc/sudoers.d/*", "/root/.ssh/*"]);
        let r = rules(&p, &prot);
        for bad in [
            "/etc/shadow",
            "/etc/sudoers.d/x",
            "/etc/sudoers.d",
            "/root/.ssh",
            "/root/.ssh/authorized_keys",
        ] {
            assert!(
                matches!(
                    validate_path("path", bad, r),
                    Err(ValidationError::Protected { .. })
                ),
                "{bad}"
            );
        }
        // Not a prefix match on the string: /etc/shadowx is a different file.
        assert!(validate_path("path", "/etc/shadow-not-really", r).is_ok());
        // A directory containing a protected file cannot be targeted (recursive chmod, delete).
        let prot2 = s(&["/etc/nginx/secret.key"]);
        let r2 = rules(&p, &prot2);
        assert!(matches!(
            validate_path("path", "/etc/nginx", r2),
            Err(ValidationError::Protected { .. })
        ));
    }

    #[test]
    fn symlink_in_any_existing_component_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap().to_string();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::fs::write(dir.path().join("real/file"), b"x").unwrap();
        symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        symlink("/etc/passwd", dir.path().join("real/pw")).unwrap();
        let p = vec![format!("{base}/")];
        let r = rules(&p, &[]);
        assert!(validate_path("path", &format!("{base}/real/file"), r).is_ok());
        assert!(validate_path("path", &format!("{base}/real/new/deeper"), r).is_ok());
        let e = validate_path("path", &format!("{base}/link/file"), r).unwrap_err();
        assert!(
            matches!(&e, ValidationError::Symlink { component, .. } if component.ends_with("/link"))
        );
        assert!(matches!(
            validate_path("path", &format!("{base}/real/pw"), r),
            Err(ValidationError::Symlink { .. })
        ));
        assert!(matches!(
            validate_path("path", &format!("{base}/real/file/x"), r),
            Err(ValidationError::NotADirectory { .. })
        ));
    }

    #[test]
    fn names_refuse_injection_and_lookalikes() {
        for bad in [
            "nginx; rm -rf /",
            "nginx\n",
            "ngin\u{0445}",
            "../etc",
            "-nginx",
            "a b",
            "",
            "nginx\0",
        ] {
            assert!(validate_service_name(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            validate_service_name("a|b"),
            Err(ValidationError::ShellMeta { ch: '|', .. })
        ));
        assert!(matches!(
            validate_service_name("ngin\u{0445}"),
            Err(ValidationError::NonAscii { .. })
        ));
        assert!(validate_service_name(&"a".repeat(129)).is_err());
        for ok in ["nginx", "php8.3-fpm", "getty@tty1", "redis-server"] {
            validate_service_name(ok).unwrap();
        }
    }

    #[test]
    fn packages_parse_optional_version() {
        assert_eq!(validate_package("nginx").unwrap(), ("nginx", None));
        assert_eq!(
            validate_package("php8.3-fpm=1:8.3.1-1+deb12").unwrap(),
            ("php8.3-fpm", Some("1:8.3.1-1+deb12"))
        );
        for bad in [
            "-o",
            "nginx=",
            "Nginx",
            "ngin;x",
            "nginx=1;2",
            "nginx=$(id)",
            "a",
            "nginx=a1",
            "x/y",
        ] {
            assert!(validate_package(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn repositories_php_and_extensions() {
        validate_repository("ppa:ondrej/php").unwrap();
        for bad in [
            "deb http://x y",
            "ppa:ondrej/php;id",
            "ppa:/php",
            "ppa:ondrej",
            "ppa:a/b/c",
        ] {
            assert!(validate_repository(bad).is_err(), "{bad:?}");
        }
        validate_php_version("8.3").unwrap();
        for bad in ["8", "8.10", "8.3 ", "a.b", "8,3"] {
            assert!(validate_php_version(bad).is_err(), "{bad:?}");
        }
        validate_php_extension("mbstring").unwrap();
        for bad in ["-x", "Redis", "re dis", "redis;"] {
            assert!(validate_php_extension(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn usernames_and_db_identifiers() {
        validate_username("alice_1-b").unwrap();
        validate_username(&format!("a{}", "b".repeat(31))).unwrap();
        assert!(validate_username(&format!("a{}", "b".repeat(32))).is_err());
        for bad in [
            "1alice",
            "Alice",
            "al ice",
            "root",
            "www-data",
            "systemd-network",
            "al\u{0456}ce",
        ] {
            assert!(validate_username(bad).is_err(), "{bad:?}");
        }
        validate_db_identifier("name", "Shop_1").unwrap();
        validate_db_identifier("name", "_x").unwrap();
        for bad in [
            "1db",
            "db-name",
            "db;drop",
            "MySQL",
            "information_schema",
            "template1",
            "pg_x",
            "d\u{00e9}",
        ] {
            assert!(validate_db_identifier("name", bad).is_err(), "{bad:?}");
        }
        assert!(validate_db_identifier("name", &"a".repeat(65)).is_err());
        assert!(matches!(
            validate_db_identifier("name", "ROOT"),
            Err(ValidationError::Reserved { .. })
        ));
    }

    #[test]
    fn domains_follow_rfc1123_and_punycode_only() {
        assert_eq!(
            validate_domain("domain", "WWW.Example.com").unwrap(),
            "www.example.com"
        );
        validate_domain("domain", "xn--bcher-kva.example").unwrap();
        let label = "a".repeat(63);
        let ok = [label.as_str(); 3].join(".") + ".com";
        validate_domain("domain", &ok).unwrap();
        let too_long = [label.as_str(); 4].join(".") + ".com";
        assert!(matches!(
            validate_domain("domain", &too_long),
            Err(ValidationError::TooLong { .. })
        ));
        for bad in [
            "example.com.",
            "localhost",
            "-a.com",
            "a-.com",
            "a..com",
            "bücher.de",
            "ab--c.com",
            "1.2.3.4",
            "a_b.com",
            "a.com;id",
            &format!("{}.com", "a".repeat(64)),
        ] {
            assert!(validate_domain("domain", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn emails() {
        assert_eq!(
            validate_email("Admin+x@Example.com").unwrap(),
            "Admin+x@example.com"
        );
        for bad in [
            "a",
            "@x.com",
            "a@",
            ".a@x.com",
            "a..b@x.com",
            "a b@x.com",
            "a@x",
            "a;id@x.com",
            "a@x.com\n",
        ] {
            assert!(validate_email(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn modes_are_octal_and_special_bits_need_permission() {
        assert_eq!(validate_mode("mode", "644", false).unwrap(), 0o644);
        assert_eq!(validate_mode("mode", "0755", false).unwrap(), 0o755);
        assert_eq!(validate_mode("mode", "0o600", false).unwrap(), 0o600);
        for bad in [
            "",
            "64",
            "0644x",
            "888",
            "07777 ",
            "99999",
            "rwxr-xr-x",
            "-644",
        ] {
            assert!(validate_mode("mode", bad, false).is_err(), "{bad:?}");
        }
        for special in ["4755", "2755", "1777"] {
            assert!(matches!(
                validate_mode("mode", special, false),
                Err(ValidationError::SpecialMode { .. })
            ));
            validate_mode("mode", special, true).unwrap();
        }
    }

    #[test]
    fn owners_resolve_by_name_or_id() {
        assert_eq!(resolve_user("owner", "root").unwrap(), Uid::from_raw(0));
        assert_eq!(resolve_user("owner", "0").unwrap(), Uid::from_raw(0));
        assert_eq!(resolve_group("group", "root").unwrap(), Gid::from_raw(0));
        assert_eq!(resolve_group("group", "0").unwrap(), Gid::from_raw(0));
        assert!(matches!(
            resolve_user("owner", "no-such-user-xyz"),
            Err(ValidationError::UnknownId { .. })
        ));
        assert!(matches!(
            resolve_group("group", "no-such-group-xyz"),
            Err(ValidationError::UnknownId { .. })
        ));
        assert!(resolve_user("owner", "4294967295").is_err());
        assert!(resolve_user("owner", "99999999999").is_err());
        assert!(matches!(
            resolve_user("owner", "root;id"),
            Err(ValidationError::ShellMeta { .. })
        ));
        assert!(resolve_user("owner", "r\u{043e}ot").is_err());
    }

    #[test]
    fn validation_error_becomes_validation_error_code_with_field() {
        let e: CommandError = validate_service_name("a;b").unwrap_err().into();
        assert_eq!(e.code, "VALIDATION_ERROR");
        assert_eq!(e.details.unwrap()["field"], "service");
        assert!(e.message.contains("expected"));
    }
}
