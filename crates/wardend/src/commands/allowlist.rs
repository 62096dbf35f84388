//! [`CommandsConfig`]: what the commands may touch, and their limits.
//!
//! Defaults are Lumo's built-in lists, so a panel written for Lumo finds the same things allowed.
//! Unlike Lumo, every list here is read from configuration and applied: setting a key *replaces*
//! its default list (write the defaults out and add to them to extend), and a reload that
//! swaps the whole `CommandsConfig` takes effect for the next request.
//!
//! Deliberate differences from Lumo: the protected list also covers `/etc/group`,
//! `/etc/gshadow`, `/etc/sudoers.d/*` and `/root/.ssh/*`; `home_prefixes` defaults to `/home/`
//! and `/var/www/` rather than all of `/var/`; the scratch prefix can be turned off.

use super::exec::ExecLimits;
use super::validate::{self, PathRules, SafePath, ValidationError};
use crate::units::{ByteSize, HumanDuration};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Which service manager `service.*` drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceManagerKind {
    /// systemd if PID 1 is systemd, otherwise SysV `service`.
    #[default]
    Auto,
    Systemd,
    Sysv,
}

/// The `[commands]` configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// Path prefixes file commands may act below; each absolute and ending with `/`.
    pub path_prefixes: Vec<String>,
    /// One more allowed prefix, for tests and scratch work (Lumo: `/tmp/lumo/`); `""` turns it off.
    pub scratch_prefix: String,
    /// Files no command touches: an exact path, or `dir/*` for a directory and all below it.
    pub protected_paths: Vec<String>,
    /// Services `service.*` may control.
    pub services: Vec<String>,
    /// Packages `package.*` may install or remove (the name; any `=version` is allowed), in
    /// addition to `php{version}-{extension}` for allowed versions and extensions.
    pub packages: Vec<String>,
    /// Repositories `package.add_repository` may add.
    pub repositories: Vec<String>,
    pub php_versions: Vec<String>,
    pub php_extensions: Vec<String>,
    /// Login shells `user.create` may set.
    pub shells: Vec<String>,
    /// Prefixes a home directory given to `user.create` must be below.
    pub home_prefixes: Vec<String>,
    /// Timeout for each subprocess; its whole process group is killed when it expires.
    pub command_timeout: HumanDuration,
    /// Per-command timeouts replacing `command_timeout` for the commands named (canonical names):
    /// installing packages takes longer than restarting a service.
    pub command_timeouts: BTreeMap<String, HumanDuration>,
    /// Bytes of stdout and of stderr kept from each subprocess; the rest is discarded and the
    /// truncation noted.
    pub max_output_bytes: ByteSize,
    /// Whether modes with setuid, setgid or sticky bits are accepted.
    pub allow_special_modes: bool,
    pub service_manager: ServiceManagerKind,
    /// Where `file.write_template` finds its templates (absolute, ending with `/`).
    pub templates_dir: String,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            path_prefixes: strings(&[
                "/home/",
                "/var/www/",
                "/var/log/",
                "/etc/nginx/",
                "/etc/php/",
                "/etc/redis/",
                "/etc/supervisor/",
                "/etc/memcached/",
                "/etc/ssl/",
                "/etc/letsencrypt/",
            ]),
            scratch_prefix: "/tmp/lumo/".into(),
            protected_paths: strings(&[
                "/etc/passwd",
                "/etc/shadow",
                "/etc/group",
                "/etc/gshadow",
                "/etc/sudoers",
                "/etc/sudoers.d/*",
                "/etc/hosts",
                "/etc/resolv.conf",
                "/root/.ssh/*",
            ]),
            services: strings(&[
                "nginx",
                "php8.1-fpm",
                "php8.2-fpm",
                "php8.3-fpm",
                "php8.4-fpm",
                "mysql",
                "mariadb",
                "postgresql",
                "redis-server",
                "memcached",
                "supervisor",
                "supervisord",
            ]),
            packages: strings(&[
                "nginx",
                "nginx-extras",
                "nginx-full",
                "redis-server",
                "redis-tools",
                "memcached",
                "libmemcached-tools",
                "postgresql",
                "postgresql-client",
                "postgresql-14",
                "postgresql-15",
                "postgresql-16",
                "postgresql-17",
                "mariadb-server",
                "mariadb-client",
                "mysql-server",
                "mysql-client",
                "supervisor",
                "nodejs",
                "npm",
                "certbot",
                "python3-certbot-nginx",
                "git",
                "unzip",
                "zip",
                "curl",
                "wget",
            ]),
            repositories: strings(&[
                "ppa:ondrej/php",
                "ppa:ondrej/nginx",
                "ppa:ondrej/nginx-mainline",
                "ppa:redislabs/redis",
                "ppa:certbot/certbot",
                "ppa:git-core/ppa",
            ]),
            php_versions: strings(&["8.1", "8.2", "8.3", "8.4"]),
            php_extensions: strings(&[
                "fpm",
                "cli",
                "common",
                "mysql",
                "pgsql",
                "sqlite3",
                "redis",
                "memcached",
                "mongodb",
                "curl",
                "gd",
                "imagick",
                "intl",
                "mbstring",
                "xml",
                "zip",
                "bcmath",
                "soap",
                "opcache",
                "readline",
                "ldap",
                "imap",
                "gmp",
                "xdebug",
                "dev",
                "apcu",
                "igbinary",
                "msgpack",
            ]),
            shells: strings(&[
                "/bin/bash",
                "/bin/sh",
                "/usr/bin/bash",
                "/usr/bin/sh",
                "/bin/zsh",
                "/usr/bin/zsh",
                "/usr/sbin/nologin",
                "/bin/false",
            ]),
            home_prefixes: strings(&["/home/", "/var/www/"]),
            command_timeout: HumanDuration::secs(60),
            command_timeouts: [
                "package.install",
                "package.remove",
                "package.update",
                "package.add_repository",
                "php.install_version",
                "php.remove_version",
                "php.install_extension",
                "php.remove_extension",
                "ssl.request_letsencrypt",
            ]
            .into_iter()
            .map(|c| (c.to_string(), HumanDuration::secs(15 * 60)))
            .collect(),
            max_output_bytes: ByteSize(1 << 20),
            allow_special_modes: false,
            service_manager: ServiceManagerKind::Auto,
            templates_dir: "/etc/warden/templates/".into(),
        }
    }
}

fn not_allowed(field: &'static str, value: &str) -> ValidationError {
    ValidationError::NotAllowed {
        field,
        value: validate::shown(value),
    }
}

impl CommandsConfig {
    /// Checks what serde cannot: prefixes absolute, canonical and ending with `/`, protected
    /// entries absolute, limits non-zero. Returns a message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let prefix_ok = |p: &str| {
            p.len() > 1
                && p.ends_with('/')
                && validate::check_path_syntax("prefix", &p[..p.len() - 1]).is_ok()
        };
        for (key, list) in [
            ("path_prefixes", &self.path_prefixes),
            ("home_prefixes", &self.home_prefixes),
        ] {
            if let Some(p) = list.iter().find(|p| !prefix_ok(p)) {
                return Err(format!(
                    "commands.{key}: `{p}` must be an absolute, canonical directory ending with `/` (not `/` itself)"
                ));
            }
        }
        if !self.scratch_prefix.is_empty() && !prefix_ok(&self.scratch_prefix) {
            return Err(
                "commands.scratch_prefix: must be empty or an absolute directory ending with `/`"
                    .into(),
            );
        }
        for p in &self.protected_paths {
            let base = p.strip_suffix("/*").unwrap_or(p);
            if validate::check_path_syntax("protected", base).is_err() {
                return Err(format!("commands.protected_paths: `{p}` must be an absolute path, optionally ending in `/*`"));
            }
        }
        if let Some(s) = self
            .shells
            .iter()
            .find(|s| validate::check_path_syntax("shell", s).is_err())
        {
            return Err(format!("commands.shells: `{s}` must be an absolute path"));
        }
        if !prefix_ok(&self.templates_dir) {
            return Err(format!(
                "commands.templates_dir: `{}` must be an absolute, canonical directory ending with `/`",
                self.templates_dir
            ));
        }
        if self.command_timeout.get().is_zero() {
            return Err("commands.command_timeout: must be greater than zero".into());
        }
        let registry = super::Registry::with_builtin();
        for (name, t) in &self.command_timeouts {
            match registry.get(name) {
                Some(c) if c.name() == name => {}
                Some(c) => {
                    return Err(format!(
                        "commands.command_timeouts: `{name}` is an alias; use `{}`",
                        c.name()
                    ))
                }
                None => {
                    return Err(format!(
                        "commands.command_timeouts: `{}` is not a command",
                        validate::shown(name)
                    ))
                }
            }
            if t.get().is_zero() {
                return Err(format!(
                    "commands.command_timeouts: `{name}` must be greater than zero"
                ));
            }
        }
        if self.max_output_bytes.0 == 0 {
            return Err("commands.max_output_bytes: must be greater than zero".into());
        }
        Ok(())
    }

    /// All allowed path prefixes: `path_prefixes` plus the scratch prefix if set.
    pub fn all_path_prefixes(&self) -> Vec<String> {
        let mut v = self.path_prefixes.clone();
        if !self.scratch_prefix.is_empty() {
            v.push(self.scratch_prefix.clone());
        }
        v
    }

    /// Validates a path parameter against the prefixes and protected list.
    pub fn check_path(&self, field: &'static str, path: &str) -> Result<SafePath, ValidationError> {
        let prefixes = self.all_path_prefixes();
        validate::validate_path(
            field,
            path,
            PathRules {
                prefixes: &prefixes,
                protected: &self.protected_paths,
            },
        )
    }

    /// [`check_path`](Self::check_path) for a symlink the command itself manages: the last
    /// component may be a symlink (it is replaced or removed, never followed).
    pub fn check_link_path(
        &self,
        field: &'static str,
        path: &str,
    ) -> Result<SafePath, ValidationError> {
        let prefixes = self.all_path_prefixes();
        validate::validate_link_path(
            field,
            path,
            PathRules {
                prefixes: &prefixes,
                protected: &self.protected_paths,
            },
        )
    }

    pub fn check_service(&self, name: &str) -> Result<(), ValidationError> {
        validate::validate_service_name(name)?;
        if self.services.iter().any(|s| s == name) {
            Ok(())
        } else {
            Err(not_allowed("service", name))
        }
    }

    /// A package `name[=version]`: the name must be in `packages` or be `php{V}-{EXT}` with an
    /// allowed version and extension. Returns `(name, version)`.
    pub fn check_package<'a>(
        &self,
        spec: &'a str,
    ) -> Result<(&'a str, Option<&'a str>), ValidationError> {
        let (name, version) = validate::validate_package(spec)?;
        let php_ok = name
            .strip_prefix("php")
            .and_then(|rest| rest.split_once('-'))
            .is_some_and(|(v, ext)| {
                self.php_versions.iter().any(|x| x == v)
                    && self.php_extensions.iter().any(|x| x == ext)
            });
        if php_ok || self.packages.iter().any(|p| p == name) {
            Ok((name, version))
        } else {
            Err(not_allowed("packages", name))
        }
    }

    pub fn check_repository(&self, repo: &str) -> Result<(), ValidationError> {
        validate::validate_repository(repo)?;
        if self.repositories.iter().any(|r| r == repo) {
            Ok(())
        } else {
            Err(not_allowed("repository", repo))
        }
    }

    pub fn check_php_version(&self, v: &str) -> Result<(), ValidationError> {
        validate::validate_php_version(v)?;
        if self.php_versions.iter().any(|x| x == v) {
            Ok(())
        } else {
            Err(not_allowed("version", v))
        }
    }

    pub fn check_php_extension(&self, ext: &str) -> Result<(), ValidationError> {
        validate::validate_php_extension(ext)?;
        if self.php_extensions.iter().any(|x| x == ext) {
            Ok(())
        } else {
            Err(not_allowed("extension", ext))
        }
    }

    pub fn check_shell(&self, shell: &str) -> Result<(), ValidationError> {
        validate::check_path_syntax("shell", shell)?;
        if self.shells.iter().any(|s| s == shell) {
            Ok(())
        } else {
            Err(not_allowed("shell", shell))
        }
    }

    /// A home directory for `user.create`: a canonical path strictly below a `home_prefixes`
    /// entry, with no symlink among its existing components; protected paths are refused too.
    pub fn check_home_dir(&self, dir: &str) -> Result<SafePath, ValidationError> {
        validate::validate_path(
            "home_dir",
            dir,
            PathRules {
                prefixes: &self.home_prefixes,
                protected: &self.protected_paths,
            },
        )
    }

    /// A mode parameter, honouring `allow_special_modes`.
    pub fn check_mode(&self, field: &'static str, mode: &str) -> Result<u32, ValidationError> {
        validate::validate_mode(field, mode, self.allow_special_modes)
    }

    /// The timeout of `command`'s subprocesses: its `command_timeouts` entry, else
    /// `command_timeout`.
    pub fn timeout_for(&self, command: &str) -> Duration {
        self.command_timeouts
            .get(command)
            .unwrap_or(&self.command_timeout)
            .get()
    }

    /// The executor limits these settings imply.
    pub fn exec_limits(&self) -> ExecLimits {
        ExecLimits {
            timeout: self.command_timeout.get(),
            max_output_bytes: usize::try_from(self.max_output_bytes.0).unwrap_or(usize::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn parse(toml_src: &str) -> CommandsConfig {
        let c: CommandsConfig = toml::from_str(toml_src).unwrap();
        c.validate().unwrap();
        c
    }

    #[test]
    fn defaults_are_valid_and_lumo_compatible() {
        let c = CommandsConfig::default();
        c.validate().unwrap();
        c.check_path("path", "/var/www/site/index.html").unwrap();
        c.check_path("path", "/etc/nginx/sites-available/x.conf")
            .unwrap();
        c.check_path("path", "/tmp/lumo/x").unwrap();
        assert!(c.check_path("path", "/etc/passwd").is_err());
        assert!(c.check_path("path", "/etc/cron.d/x").is_err());
        c.check_service("php8.3-fpm").unwrap();
        c.check_package("php8.3-redis=1.0").unwrap();
        c.check_repository("ppa:ondrej/php").unwrap();
        c.check_shell("/usr/sbin/nologin").unwrap();
        assert_eq!(c.exec_limits().timeout, Duration::from_secs(60));
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<CommandsConfig>("additional_services = [\"x\"]").is_err());
    }

    #[test]
    fn path_prefixes_setting_replaces_the_default_list() {
        let c = parse("path_prefixes = [\"/srv/app/\"]\nscratch_prefix = \"\"");
        c.check_path("path", "/srv/app/a").unwrap();
        assert!(matches!(
            c.check_path("path", "/var/www/a"),
            Err(ValidationError::PathNotAllowed { .. })
        ));
    }

    #[test]
    fn scratch_prefix_setting_adds_and_can_be_disabled() {
        let c = parse("scratch_prefix = \"/srv/scratch/\"");
        c.check_path("path", "/srv/scratch/a").unwrap();
        assert!(c.check_path("path", "/tmp/lumo/a").is_err());
        let off = parse("scratch_prefix = \"\"");
        assert!(off.check_path("path", "/tmp/lumo/a").is_err());
    }

    #[test]
    fn protected_paths_setting_protects() {
        let c = parse("protected_paths = [\"/var/www/keep.txt\", \"/var/www/private/*\"]");
        assert!(matches!(
            c.check_path("path", "/var/www/keep.txt"),
            Err(ValidationError::Protected { .. })
        ));
        assert!(c.check_path("path", "/var/www/private/a").is_err());
        // Replacing the list drops the default entries (they are outside the prefixes anyway).
        c.check_path("path", "/var/www/other").unwrap();
    }

    #[test]
    fn services_setting_is_applied() {
        let c = parse("services = [\"my-app\"]");
        c.check_service("my-app").unwrap();
        assert!(matches!(
            c.check_service("nginx"),
            Err(ValidationError::NotAllowed { .. })
        ));
    }

    #[test]
    fn packages_setting_is_applied() {
        let c = parse("packages = [\"htop\"]");
        c.check_package("htop").unwrap();
        assert!(c.check_package("nginx").is_err());
        assert!(CommandsConfig::default().check_package("htop").is_err());
        assert!(CommandsConfig::default()
            .check_package("openssh-server")
            .is_err());
    }

    #[test]
    fn repositories_setting_is_applied() {
        let c = parse("repositories = [\"ppa:me/tools\"]");
        c.check_repository("ppa:me/tools").unwrap();
        assert!(c.check_repository("ppa:ondrej/php").is_err());
    }

    #[test]
    fn php_versions_setting_is_applied_to_versions_and_packages() {
        let c = parse("php_versions = [\"8.5\"]");
        c.check_php_version("8.5").unwrap();
        assert!(c.check_php_version("8.3").is_err());
        c.check_package("php8.5-redis").unwrap();
        assert!(c.check_package("php8.3-redis").is_err());
    }

    #[test]
    fn php_extensions_setting_is_applied_to_extensions_and_packages() {
        let c = parse("php_extensions = [\"swoole\"]");
        c.check_php_extension("swoole").unwrap();
        assert!(c.check_php_extension("redis").is_err());
        c.check_package("php8.3-swoole").unwrap();
        assert!(c.check_package("php8.3-redis").is_err());
    }

    #[test]
    fn shells_setting_is_applied() {
        let c = parse("shells = [\"/usr/bin/fish\"]");
        c.check_shell("/usr/bin/fish").unwrap();
        assert!(c.check_shell("/bin/bash").is_err());
        assert!(CommandsConfig::default().check_shell("/tmp/evil").is_err());
    }

    #[test]
    fn home_prefixes_setting_is_applied() {
        let c = parse("home_prefixes = [\"/srv/homes/\"]");
        c.check_home_dir("/srv/homes/alice").unwrap();
        assert!(c.check_home_dir("/home/alice").is_err());
        assert!(CommandsConfig::default()
            .check_home_dir("/etc/alice")
            .is_err());
        assert!(CommandsConfig::default()
            .check_home_dir("/var/lib/mysql")
            .is_err());
    }

    #[test]
    fn command_timeout_and_max_output_bytes_reach_the_executor() {
        let c = parse("command_timeout = \"5s\"\nmax_output_bytes = \"4KiB\"");
        let l = c.exec_limits();
        assert_eq!(l.timeout, Duration::from_secs(5));
        assert_eq!(l.max_output_bytes, 4096);
    }

    #[test]
    fn command_timeouts_replace_the_default_for_the_commands_named() {
        let c = parse("command_timeout = \"5s\"\n[command_timeouts]\n\"service.restart\" = \"2m\"");
        assert_eq!(c.timeout_for("service.restart"), Duration::from_secs(120));
        assert_eq!(c.timeout_for("service.stop"), Duration::from_secs(5));
        // Setting the table replaces the default one.
        assert_eq!(c.timeout_for("package.install"), Duration::from_secs(5));
        let d = CommandsConfig::default();
        assert_eq!(d.timeout_for("package.install"), Duration::from_secs(900));
        assert_eq!(d.timeout_for("file.write"), Duration::from_secs(60));
        for (src, msg) in [
            (
                "[command_timeouts]\n\"file.nope\" = \"1s\"",
                "not a command",
            ),
            ("[command_timeouts]\n\"file.create_dir\" = \"1s\"", "alias"),
            (
                "[command_timeouts]\n\"file.mkdir\" = \"0s\"",
                "greater than zero",
            ),
        ] {
            let c: CommandsConfig = toml::from_str(src).unwrap();
            let e = c.validate().unwrap_err();
            assert!(e.contains(msg), "{src}: {e}");
        }
    }

    #[test]
    fn allow_special_modes_setting_is_applied() {
        assert!(CommandsConfig::default()
            .check_mode("mode", "4755")
            .is_err());
        let c = parse("allow_special_modes = true");
        assert_eq!(c.check_mode("mode", "4755").unwrap(), 0o4755);
    }

    #[test]
    fn service_manager_setting_parses() {
        assert_eq!(
            parse("service_manager = \"sysv\"").service_manager,
            ServiceManagerKind::Sysv
        );
        assert_eq!(
            parse("service_manager = \"systemd\"").service_manager,
            ServiceManagerKind::Systemd
        );
        assert!(toml::from_str::<CommandsConfig>("service_manager = \"upstart\"").is_err());
    }

    #[test]
    fn bad_settings_are_refused_with_the_key() {
        for (src, key) in [
            ("path_prefixes = [\"/var/www\"]", "path_prefixes"),
            ("path_prefixes = [\"relative/\"]", "path_prefixes"),
            ("path_prefixes = [\"/\"]", "path_prefixes"),
            ("path_prefixes = [\"/var/../etc/\"]", "path_prefixes"),
            ("home_prefixes = [\"/home\"]", "home_prefixes"),
            ("scratch_prefix = \"tmp/\"", "scratch_prefix"),
            ("protected_paths = [\"etc/shadow\"]", "protected_paths"),
            ("shells = [\"bash\"]", "shells"),
            ("command_timeout = \"0s\"", "command_timeout"),
            ("max_output_bytes = 0", "max_output_bytes"),
            ("templates_dir = \"templates\"", "templates_dir"),
        ] {
            let c: CommandsConfig = toml::from_str(src).unwrap();
            let e = c.validate().unwrap_err();
            assert!(e.contains(key), "{src}: {e}");
        }
    }
}
