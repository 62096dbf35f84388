//! Commands that write files in fixed places or from templates, and check them with a tool:
//! `nginx.*`, `ssl.install_cert`, `php.write_ini`, `file.write_template`.
//!
//! Every path they touch is built here from validated names and then checked against the
//! configured prefixes and protected files like any path parameter, so an operator who removes
//! `/etc/nginx/` from `path_prefixes` turns `nginx.enable_site` off too. The file work goes
//! through [`files`] (directories opened with `O_NOFOLLOW` from `/`).

use super::{
    mode_str, owner_schema, param_error, schema, spawn_fs, FileWrite, FileWriteArgs, Params,
};
use crate::commands::allowlist::CommandsConfig;
use crate::commands::exec::{CommandSpec, Plan, Step};
use crate::commands::files::{self, Ownership};
use crate::commands::service::{self, ServiceAction};
use crate::commands::validate::{self, PathRules, SafePath};
use crate::commands::{Command, CommandError, ExecContext, Validated};
use futures_util::future::BoxFuture;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use zeroize::Zeroizing;

/// Where nginx keeps its sites (Debian's layout).
pub const NGINX_AVAILABLE: &str = "/etc/nginx/sites-available/";
pub const NGINX_ENABLED: &str = "/etc/nginx/sites-enabled/";
/// Where `ssl.install_cert` puts `DOMAIN/{cert,chain,fullchain,privkey}.pem`.
pub const SSL_DIR: &str = "/etc/ssl/warden/";
/// The file `php.write_ini` writes, in `/etc/php/VERSION/fpm/conf.d/`.
pub const PHP_INI_NAME: &str = "99-warden.ini";
/// Largest template read and largest rendering written.
const MAX_TEMPLATE_BYTES: usize = 1 << 20;
/// Work a template may do (minijinja fuel: roughly one unit per instruction).
const TEMPLATE_FUEL: u64 = 200_000;

/// Every command of this module.
pub fn all() -> Vec<Arc<dyn Command>> {
    vec![
        Arc::new(NginxSite { enable: true }),
        Arc::new(NginxSite { enable: false }),
        Arc::new(NginxTest),
        Arc::new(SslInstall),
        Arc::new(PhpWriteIni),
        Arc::new(FileWriteTemplate),
    ]
}

fn nginx_test() -> CommandSpec {
    CommandSpec::new("nginx", ["-t"])
}

/// `nginx -t`; a failure is `CONFIG_INVALID` with nginx's own words in the details.
async fn run_nginx_test(ctx: &ExecContext, spec: &CommandSpec) -> Result<String, CommandError> {
    let out = ctx.executor.run(spec).await?;
    let text = out.stderr_excerpt();
    if out.success() {
        Ok(text)
    } else {
        Err(CommandError::new(
            crate::commands::codes::CONFIG_INVALID,
            "nginx -t rejected the configuration",
        )
        .with_details(json!({ "exit": out.exit, "stderr": text })))
    }
}

// ---------------------------------------------------------------------------------------------
// nginx.enable_site / nginx.disable_site
// ---------------------------------------------------------------------------------------------

/// `nginx.enable_site` / `nginx.disable_site` (site_name): link or unlink
/// `sites-enabled/NAME` → `sites-available/NAME`, check with `nginx -t` (an enabling that fails
/// the check is undone: `CONFIG_INVALID`), then reload nginx through the service manager.
#[derive(Debug)]
pub struct NginxSite {
    enable: bool,
}

struct SiteArgs {
    site: String,
    available: SafePath,
    enabled: SafePath,
    test: CommandSpec,
    reload: CommandSpec,
}

impl Command for NginxSite {
    fn name(&self) -> &'static str {
        if self.enable {
            "nginx.enable_site"
        } else {
            "nginx.disable_site"
        }
    }
    fn description(&self) -> &'static str {
        if self.enable {
            "Enable an nginx site (link it into sites-enabled, nginx -t, reload)."
        } else {
            "Disable an nginx site (remove its sites-enabled link, nginx -t, reload)."
        }
    }
    fn schema(&self) -> Value {
        schema(&[(
            "site_name",
            json!("string"),
            true,
            "a file in /etc/nginx/sites-available",
        )])
    }
    fn validate(&self, params: &Value, cfg: &CommandsConfig) -> Result<Validated, CommandError> {
        let p = Params::new(params, &["site_name"])?;
        let site = p.str("site_name")?;
        validate::validate_site_name(site)?;
        let available = cfg.check_path("site_name", &format!("{NGINX_AVAILABLE}{site}"))?;
        let enabled = cfg.check_link_path("site_name", &format!("{NGINX_ENABLED}{site}"))?;
        let reload = service::choose(cfg.service_manager).command("nginx", ServiceAction::Reload);
        Ok(Validated::new(
            self.name(),
            SiteArgs {
                site: site.to_string(),
                available,
                enabled,
                test: nginx_test(),
                reload,
            },
            json!({ "site_name": site }),
        ))
    }
    fn plan(&self, v: &Validated) -> Result<Plan, CommandError> {
        let a = v.args::<SiteArgs>()?;
        let first = if self.enable {
            Step::Symlink {
                path: a.enabled.to_string(),
                target: a.available.to_string(),
            }
        } else {
            Step::Unlink {
                path: a.enabled.to_string(),
            }
        };
        Ok(Plan::new(vec![
            first,
            Step::from(&a.test),
            Step::from(&a.reload),
        ]))
    }
    fn execute<'a>(
        &'a self,
        v: Validated,
        ctx: &'a ExecContext,
    ) -> BoxFuture<'a, Result<Value, CommandError>> {
        Box::pin(async move {
            let a = Arc::new(v.into_args::<SiteArgs>()?);
            let changed = if self.enable {
                let fs = Arc::clone(&a);
                spawn_fs(move || {
                    if files::kind_of(&fs.available)? != Some("file") {
                        return Err(CommandError::new(
                            crate::commands::codes::SITE_NOT_FOUND,
                            format!("no site `{}` in {NGINX_AVAILABLE}", fs.site),
                        ));
                    }
                    files::symlink(&fs.enabled, &fs.available)
                })
                .await?
            } else {
                let fs = Arc::clone(&a);
                let removed = spawn_fs(move || files::remove_symlink(&fs.enabled)).await?;
                if !removed {
                    return Err(CommandError::new(
                        crate::commands::codes::SITE_NOT_FOUND,
                        format!("site `{}` is not enabled", a.site),
                    ));
                }
                true
            };
            if let Err(e) = run_nginx_test(ctx, &a.test).await {
                if self.enable && changed {
                    let fs = Arc::clone(&a);
                    spawn_fs(move || files::remove_symlink(&fs.enabled)).await?;
                }
                return Err(e);
            }
            ctx.executor
                .run(&a.reload)
                .await?
                .check("reloading nginx")?;
            Ok(json!({ "site_name": a.site, "enabled": self.enable, "changed": changed }))
        })
    }
}

/// `nginx.test_config`: `nginx -t`. `{valid: true, output}`, or `CONFIG_INVALID`.
#[derive(Debug)]
pub struct NginxTest;

impl Command for NginxTest {
    fn name(&self) -> &'static str {
        "nginx.test_config"
    }
    fn description(&self) -> &'static str {
        "Check the nginx configuration (nginx -t)."
    }
    fn schema(&self) -> Value {
        schema(&[])
    }
    fn validate(&self, params: &Value, _cfg: &CommandsConfig) -> Result<Validated, CommandError> {
        Params::new(params, &[])?;
        Ok(Validated::new(self.name(), nginx_test(), json!({})))
    }
    fn plan(&self, v: &Validated) -> Result<Plan, CommandError> {
        Ok(Plan::new(vec![Step::from(v.args::<CommandSpec>()?)]))
    }
    fn execute<'a>(
        &'a self,
        v: Validated,
        ctx: &'a ExecContext,
    ) -> BoxFuture<'a, Result<Value, CommandError>> {
        Box::pin(async move {
            let spec = v.into_args::<CommandSpec>()?;
            let output = run_nginx_test(ctx, &spec).await?;
            Ok(json!({ "valid": true, "output": output }))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// ssl.install_cert
// ---------------------------------------------------------------------------------------------

/// `ssl.install_cert` (domain, certificate, private_key, chain?): checks with `openssl` that the
/// key belongs to the certificate (their public keys are equal; both reach openssl on stdin),
/// then writes `/etc/ssl/warden/DOMAIN/`: `privkey.pem` (0600), `cert.pem`, `chain.pem`,
/// `fullchain.pem` (0644).
#[derive(Debug)]
pub struct SslInstall;

struct SslArgs {
    domain: String,
    cert_pubkey: CommandSpec,
    key_pubkey: CommandSpec,
    /// In writing order: the key first, so a certificate is never in place without it.
    files: Vec<(SafePath, Zeroizing<Vec<u8>>, u32)>,
}

fn with_newline(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

impl Command for SslInstall {
    fn name(&self) -> &'static str {
        "ssl.install_cert"
    }
    fn description(&self) -> &'static str {
        "Install a certificate and its private key (the key must match the certificate)."
    }
    fn schema(&self) -> Value {
        schema(&[
            ("domain", json!("string"), true, "the certificate's domain"),
            ("certificate", json!("string"), true, "PEM certificate"),
            (
                "private_key",
                json!("string"),
                true,
                "PEM private key (unencrypted)",
            ),
            (
                "chain",
                json!("string"),
                false,
                "PEM intermediate certificates",
            ),
        ])
    }
    fn validate(&self, params: &Value, cfg: &CommandsConfig) -> Result<Validated, CommandError> {
        let p = Params::new(params, &["domain", "certificate", "private_key", "chain"])?;
        let domain = validate::validate_domain("domain", p.str("domain")?)?;
        let cert = p.str("certificate")?;
        validate::validate_pem("certificate", cert, "-----BEGIN CERTIFICATE-----")?;
        let key = p.str("private_key")?;
        validate::validate_pem("private_key", key, "PRIVATE KEY-----")?;
        let chain = p.opt_str("chain")?;
        if let Some(c) = chain {
            validate::validate_pem("chain", c, "-----BEGIN CERTIFICATE-----")?;
        }
        let path = |name: &str| cfg.check_path("domain", &format!("{SSL_DIR}{domain}/{name}"));
        let cert = with_newline(cert);
        let mut files = vec![
            (
                path("privkey.pem")?,
                Zeroizing::new(with_newline(key).into_bytes()),
                0o600,
            ),
            (
                path("cert.pem")?,
                Zeroizing::new(cert.clone().into_bytes()),
                0o644,
            ),
        ];
        let mut full = cert.clone();
        if let Some(c) = chain {
            let c = with_newline(c);
            files.push((
                path("chain.pem")?,
                Zeroizing::new(c.clone().into_bytes()),
                0o644,
            ));
            full.push_str(&c);
        }
        files.push((
            path("fullchain.pem")?,
            Zeroizing::new(full.into_bytes()),
            0o644,
        ));
        let audit = json!({
            "domain": domain,
            "certificate": { "bytes": cert.len() },
            "private_key": { "bytes": key.len() },
            "chain": chain.map(|c| json!({ "bytes": c.len() })),
        });
        Ok(Validated::new(
            self.name(),
            SslArgs {
                cert_pubkey: CommandSpec::new("openssl", ["x509", "-noout", "-pubkey"])
                    .stdin(cert.into_bytes()),
                key_pubkey: CommandSpec::new("openssl", ["pkey", "-pubout"])
                    .stdin(key.as_bytes().to_vec()),
                domain,
                files,
            },
            audit,
        ))
    }
    fn plan(&self, v: &Validated) -> Result<Plan, CommandError> {
        let a = v.args::<SslArgs>()?;
        let mut steps = vec![Step::from(&a.cert_pubkey), Step::from(&a.key_pubkey)];
        for (path, bytes, mode) in &a.files {
            steps.push(Step::WriteFile {
                path: path.to_string(),
                bytes: bytes.len(),
                create_parents: true,
                mode: Some(format!("{mode:04o}")),
                uid: None,
                gid: None,
            });
        }
        Ok(Plan::new(steps))
    }
    fn execute<'a>(
        &'a self,
        v: Validated,
        ctx: &'a ExecContext,
    ) -> BoxFuture<'a, Result<Value, CommandError>> {
        Box::pin(async move {
            let a = v.into_args::<SslArgs>()?;
            let cert = ctx.executor.run(&a.cert_pubkey).await?;
            if !cert.success() {
                return Err(param_error(
                    "certificate",
                    "`certificate` is not a readable PEM certificate".into(),
                ));
            }
            let key = ctx.executor.run(&a.key_pubkey).await?;
            if !key.success() {
                return Err(param_error(
                    "private_key",
                    "`private_key` is not a readable, unencrypted PEM private key".into(),
                ));
            }
            if cert.stdout.is_empty() || cert.stdout != key.stdout {
                return Err(param_error(
                    "private_key",
                    "`private_key` does not match the certificate's public key".into(),
                ));
            }
            let domain = a.domain;
            let files = a.files;
            spawn_fs(move || {
                let mut written = Map::new();
                for (path, bytes, mode) in &files {
                    files::write_atomic(path, bytes, Some(*mode), Ownership::default(), true)?;
                    let key = path
                        .as_str()
                        .rsplit('/')
                        .next()
                        .unwrap_or("")
                        .trim_end_matches(".pem")
                        .to_string();
                    written.insert(key, json!(path));
                }
                Ok(json!({ "domain": domain, "installed": true, "files": written }))
            })
            .await
        })
    }
}

// ---------------------------------------------------------------------------------------------
// php.write_ini
// ---------------------------------------------------------------------------------------------

/// `php.write_ini` (version, settings): writes the directives to
/// `/etc/php/VERSION/fpm/conf.d/99-warden.ini` (replacing it whole, atomically). Directives that
/// load code or widen what scripts may reach are refused; values are quoted.
#[derive(Debug)]
pub struct PhpWriteIni;

struct IniArgs {
    path: SafePath,
    content: Vec<u8>,
}

fn ini_value(key: &str, v: &Value) -> Result<String, CommandError> {
    match v {
        Value::Bool(true) => Ok("On".into()),
        Value::Bool(false) => Ok("Off".into()),
        Value::Number(n) => Ok(n.to_string()),
        Value::String(s) => {
            validate::validate_ini_value(s)?;
            Ok(format!("\"{s}\""))
        }
        _ => Err(param_error(
            "settings",
            format!(
                "the value of `{}` must be a string, number or boolean",
                validate::shown(key)
            ),
        )),
    }
}

impl Command for PhpWriteIni {
    fn name(&self) -> &'static str {
        "php.write_ini"
    }
    fn description(&self) -> &'static str {
        "Write php.ini directives for a PHP version's FPM (conf.d/99-warden.ini)."
    }
    fn schema(&self) -> Value {
        schema(&[
            ("version", json!("string"), true, "an allowed PHP version"),
            (
                "settings",
                json!({ "type": "object" }),
                true,
                "directive → value (string, number or boolean); dangerous directives are refused",
            ),
        ])
    }
    fn validate(&self, params: &Value, cfg: &CommandsConfig) -> Result<Validated, CommandError> {
        let p = Params::new(params, &["version", "settings"])?;
        let version = &p.version("version")?;
        cfg.check_php_version(version)?;
        let settings = match p.obj.get("settings") {
            Some(Value::Object(m)) if !m.is_empty() && m.len() <= 100 => m,
            _ => {
                return Err(param_error(
                    "settings",
                    "`settings` must be an object of 1 to 100 directives".into(),
                ))
            }
        };
        let mut content =
            String::from("; Written by warden (php.write_ini); replaced whole on every call.\n");
        for (k, v) in settings {
            validate::validate_ini_key(k)?;
            content.push_str(&format!("{k} = {}\n", ini_value(k, v)?));
        }
        let path = cfg.check_path(
            "version",
            &format!("/etc/php/{version}/fpm/conf.d/{PHP_INI_NAME}"),
        )?;
        let audit = json!({ "version": version, "settings": settings.keys().collect::<Vec<_>>() });
        Ok(Validated::new(
            self.name(),
            IniArgs {
                path,
                content: content.into_bytes(),
            },
            audit,
        ))
    }
    fn plan(&self, v: &Validated) -> Result<Plan, CommandError> {
        let a = v.args::<IniArgs>()?;
        Ok(Plan::new(vec![Step::WriteFile {
            path: a.path.to_string(),
            bytes: a.content.len(),
            create_parents: false,
            mode: Some("0644".into()),
            uid: None,
            gid: None,
        }]))
    }
    fn execute<'a>(
        &'a self,
        v: Validated,
        _ctx: &'a ExecContext,
    ) -> BoxFuture<'a, Result<Value, CommandError>> {
        let args = v.into_args::<IniArgs>();
        spawn_fs(move || {
            let a = args?;
            let out = files::write_atomic(
                &a.path,
                &a.content,
                Some(0o644),
                Ownership::default(),
                false,
            )?;
            Ok(json!({ "path": out.path, "bytes_written": out.bytes_written }))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// file.write_template
// ---------------------------------------------------------------------------------------------

/// `file.write_template` (path, template, context, owner?, group?, mode?): renders a template of
/// the configured templates directory with `context` and writes the result as `file.write`
/// does. The engine (minijinja) has no loader, so a template can neither include nor read any
/// file, and it has no function that runs anything; its work is bounded by fuel. Rendering
/// happens at validation, so the plan shows the exact number of bytes to be written.
#[derive(Debug)]
pub struct FileWriteTemplate;

/// Renders `source` with `context` in a sandboxed environment.
pub fn render_template(name: &str, source: &str, context: &Value) -> Result<String, CommandError> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env.set_fuel(Some(TEMPLATE_FUEL));
    let out = env.render_str(source, context).map_err(|e| {
        param_error(
            "template",
            format!(
                "template `{}` cannot be rendered: {e}",
                validate::shown(name)
            ),
        )
    })?;
    if out.len() > MAX_TEMPLATE_BYTES {
        return Err(param_error(
            "template",
            format!("the rendering is larger than {MAX_TEMPLATE_BYTES} bytes"),
        ));
    }
    Ok(out)
}

impl Command for FileWriteTemplate {
    fn name(&self) -> &'static str {
        "file.write_template"
    }
    fn description(&self) -> &'static str {
        "Render a template of the templates directory with a context and write it atomically."
    }
    fn schema(&self) -> Value {
        schema(&[
            (
                "path",
                json!("string"),
                true,
                "absolute path below an allowed prefix",
            ),
            (
                "template",
                json!("string"),
                true,
                "a file name in the templates directory",
            ),
            (
                "context",
                json!({ "type": "object" }),
                true,
                "the template's variables",
            ),
            ("owner", owner_schema(), false, "user name or uid"),
            ("group", owner_schema(), false, "group name or gid"),
            ("mode", json!("string"), false, "octal, e.g. \"0644\""),
        ])
    }
    fn validate(&self, params: &Value, cfg: &CommandsConfig) -> Result<Validated, CommandError> {
        let p = Params::new(
            params,
            &["path", "template", "context", "owner", "group", "mode"],
        )?;
        let path = cfg.check_path("path", p.str("path")?)?;
        let name = p.str("template")?;
        validate::validate_template_name(name)?;
        let context = match p.obj.get("context") {
            Some(c @ Value::Object(_)) => c,
            None | Some(Value::Null) => &Value::Object(Map::new()),
            Some(_) => return Err(param_error("context", "`context` must be an object".into())),
        };
        let prefixes = [cfg.templates_dir.clone()];
        let template_path = validate::validate_path(
            "template",
            &format!("{}{name}", cfg.templates_dir),
            PathRules {
                prefixes: &prefixes,
                protected: &cfg.protected_paths,
            },
        )?;
        let source = files::read_regular(&template_path, MAX_TEMPLATE_BYTES).map_err(|e| {
            if e.code == crate::commands::codes::NOT_FOUND {
                param_error(
                    "template",
                    format!("no template `{name}` in {}", cfg.templates_dir),
                )
            } else {
                e
            }
        })?;
        let source = String::from_utf8(source)
            .map_err(|_| param_error("template", format!("template `{name}` is not UTF-8")))?;
        let rendered = render_template(name, &source, context)?;
        let (own, own_audit) = p.ownership()?;
        let mode = p.mode(cfg)?;
        let keys: Vec<&String> = context
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        let audit = json!({
            "path": path, "template": name, "context": { "keys": keys },
            "content": { "bytes": rendered.len() },
            "owner": own_audit["owner"], "group": own_audit["group"], "mode": mode_str(mode),
        });
        Ok(Validated::new(
            self.name(),
            FileWriteArgs {
                path,
                content: Zeroizing::new(rendered.into_bytes()),
                mode,
                own,
            },
            audit,
        ))
    }
    fn plan(&self, v: &Validated) -> Result<Plan, CommandError> {
        FileWrite.plan(v)
    }
    fn execute<'a>(
        &'a self,
        v: Validated,
        ctx: &'a ExecContext,
    ) -> BoxFuture<'a, Result<Value, CommandError>> {
        Box::pin(async move {
            let mut out = FileWrite.execute(v, ctx).await?;
            out["template"] = json!(true);
            Ok(out)
        })
    }
}
