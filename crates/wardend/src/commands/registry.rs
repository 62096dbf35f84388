//! The [`Command`] trait, the [`Registry`] and the command implementations.
//!
//! A request goes through three steps, each a method of the trait, so the pipeline can act
//! between them (audit the redacted parameters, answer a `dry_run`):
//!
//! 1. [`Command::validate`] parses and checks every parameter against the current
//!    [`CommandsConfig`] and returns a [`Validated`] holding typed values (a [`SafePath`], a
//!    resolved uid) and a redacted copy of the parameters for the audit log;
//! 2. [`Command::plan`] describes what would be done ([`Plan`]: argv lists, files to write);
//! 3. [`Command::execute`] does it.
//!
//! Parameters are a JSON object; unknown keys are refused with the list of known ones, so a typo
//! is not silently ignored.

use super::allowlist::CommandsConfig;
use super::exec::{CommandSpec, Executor, Exit, Plan, Step};
use super::files::{self, Ownership};
use super::service::{self, ServiceAction, ServiceManager};
use super::validate::{self, SafePath};
use super::{codes, CommandError};
use futures_util::future::BoxFuture;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Parameters that passed [`Command::validate`], in typed form.
pub struct Validated {
    command: &'static str,
    args: Box<dyn Any + Send + Sync>,
    audit: Value,
}

impl std::fmt::Debug for Validated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The arguments may hold secrets (file contents): only the redacted view is shown.
        f.debug_struct("Validated")
            .field("command", &self.command)
            .field("audit", &self.audit)
            .finish()
    }
}

impl Validated {
    /// `audit` is what may be logged: secrets and contents replaced by their length.
    pub fn new<T: Any + Send + Sync>(command: &'static str, args: T, audit: Value) -> Self {
        Validated {
            command,
            args: Box::new(args),
            audit,
        }
    }
    pub fn command(&self) -> &'static str {
        self.command
    }
    /// The parameters with secrets and file contents redacted, for the audit log.
    pub fn audit_params(&self) -> &Value {
        &self.audit
    }
    pub fn args<T: Any>(&self) -> Result<&T, CommandError> {
        self.args.downcast_ref::<T>().ok_or_else(|| {
            CommandError::internal(format!(
                "{}: validated arguments of the wrong type",
                self.command
            ))
        })
    }
    pub fn into_args<T: Any>(self) -> Result<T, CommandError> {
        let command = self.command;
        self.args.downcast::<T>().map(|b| *b).map_err(|_| {
            CommandError::internal(format!("{command}: validated arguments of the wrong type"))
        })
    }
}

/// What a command needs to run: the executor with the configured limits. Built from the
/// configuration; rebuilt on reload.
#[derive(Debug, Clone)]
pub struct ExecContext {
    pub executor: Executor,
}

impl ExecContext {
    pub fn from_config(cfg: &CommandsConfig) -> Self {
        ExecContext {
            executor: Executor::new(cfg.exec_limits()),
        }
    }

    /// The context for one command: its own timeout if `command_timeouts` names it.
    pub fn for_command(cfg: &CommandsConfig, command: &str) -> Self {
        let mut limits = cfg.exec_limits();
        limits.timeout = cfg.timeout_for(command);
        ExecContext {
            executor: Executor::new(limits),
        }
    }
}

/// One command. Implementations are stateless; everything they need arrives as arguments.
pub trait Command: Send + Sync {
    /// The canonical name, `group.action`.
    fn name(&self) -> &'static str;
    /// Other names the command answers to (the seed's `file.create_dir` for `file.mkdir`).
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }
    /// One line for `warden commands list`.
    fn description(&self) -> &'static str;
    /// The parameters as a JSON Schema object, for introspection.
    fn schema(&self) -> Value;
    fn validate(&self, params: &Value, cfg: &CommandsConfig) -> Result<Validated, CommandError>;
    fn plan(&self, v: &Validated) -> Result<Plan, CommandError>;
    fn execute<'a>(
        &'a self,
        v: Validated,
        ctx: &'a ExecContext,
    ) -> BoxFuture<'a, Result<Value, CommandError>>;
}

/// A command as introspection shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandInfo {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub description: &'static str,
    pub params: Value,
}

/// All commands, by name and alias.
#[derive(Default)]
pub struct Registry {
    commands: Vec<Arc<dyn Command>>,
    index: HashMap<&'static str, usize>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.commands.iter().map(|c| c.name()))
            .finish()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// The whole Lumo command set (`system.ping` and `system.metrics` are methods of the
    /// pipeline itself, not commands).
    pub fn with_builtin() -> Self {
        let mut r = Registry::new();
        let builtin: Vec<Arc<dyn Command>> = vec![
            Arc::new(FileWrite),
            Arc::new(FileMkdir),
            Arc::new(FileDelete),
            Arc::new(FileChmod),
        ];
        for c in builtin {
            r.register(c).expect("built-in command names are unique");
        }
        for action in ServiceAction::ALL {
            r.register(Arc::new(ServiceCommand::new(action)))
                .expect("built-in command names are unique");
        }
        for c in argv::all().into_iter().chain(sites::all()) {
            r.register(c).expect("built-in command names are unique");
        }
        r
    }

    /// Adds a command; refuses a name or alias already taken.
    pub fn register(&mut self, cmd: Arc<dyn Command>) -> Result<(), String> {
        let names: Vec<&'static str> = std::iter::once(cmd.name())
            .chain(cmd.aliases().iter().copied())
            .collect();
        if let Some(n) = names.iter().find(|n| self.index.contains_key(*n)) {
            return Err(format!("command name `{n}` is already registered"));
        }
        let i = self.commands.len();
        self.commands.push(cmd);
        for n in names {
            self.index.insert(n, i);
        }
        Ok(())
    }

    /// Looks a command up by name or alias.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Command>> {
        self.index.get(name).map(|&i| &self.commands[i])
    }

    /// Names, aliases, descriptions and parameter schemas, sorted by name.
    pub fn list(&self) -> Vec<CommandInfo> {
        let mut v: Vec<CommandInfo> = self
            .commands
            .iter()
            .map(|c| CommandInfo {
                name: c.name(),
                aliases: c.aliases(),
                description: c.description(),
                params: c.schema(),
            })
            .collect();
        v.sort_by_key(|c| c.name);
        v
    }

    /// Looks up and validates: what the pipeline calls before auditing and executing.
    pub fn prepare(
        &self,
        name: &str,
        params: &Value,
        cfg: &CommandsConfig,
    ) -> Result<(Arc<dyn Command>, Validated), CommandError> {
        let cmd = self.get(name).ok_or_else(|| {
            CommandError::validation(format!("unknown command `{}`", validate::shown(name)))
                .with_details(json!({ "field": "command" }))
        })?;
        let v = cmd.validate(params, cfg)?;
        Ok((Arc::clone(cmd), v))
    }

    /// Validates, then either returns the plan (`dry_run`) or executes it under the limits
    /// `cfg` sets for this command.
    pub async fn run(
        &self,
        name: &str,
        params: &Value,
        cfg: &CommandsConfig,
        dry_run: bool,
    ) -> Result<Value, CommandError> {
        let (cmd, v) = self.prepare(name, params, cfg)?;
        if dry_run {
            let plan = cmd.plan(&v)?;
            return Ok(json!({ "dry_run": true, "command": cmd.name(), "plan": plan.to_json() }));
        }
        let ctx = ExecContext::for_command(cfg, cmd.name());
        cmd.execute(v, &ctx).await
    }
}

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

/// A command's parameter object, with its known keys.
struct Params<'a> {
    obj: &'a Map<String, Value>,
}

fn param_error(field: &str, msg: String) -> CommandError {
    CommandError::validation(msg).with_details(json!({ "field": field }))
}

impl<'a> Params<'a> {
    fn new(v: &'a Value, known: &[&str]) -> Result<Self, CommandError> {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        let obj = match v {
            Value::Object(o) => o,
            Value::Null => EMPTY.get_or_init(Map::new),
            _ => return Err(CommandError::validation("`params` must be a JSON object")),
        };
        if let Some(k) = obj.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(param_error(
                k,
                format!(
                    "unknown parameter `{}`; expected one of {known:?}",
                    validate::shown(k)
                ),
            ));
        }
        Ok(Params { obj })
    }

    fn opt_str(&self, key: &'static str) -> Result<Option<&'a str>, CommandError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(param_error(key, format!("`{key}` must be a string"))),
        }
    }

    fn str(&self, key: &'static str) -> Result<&'a str, CommandError> {
        self.opt_str(key)?
            .ok_or_else(|| param_error(key, format!("`{key}` is required")))
    }

    /// A version such as PHP's `8.3`: a string, or a JSON number written the same way (a CLI
    /// user's `version=8.3` arrives as a number).
    fn version(&self, key: &'static str) -> Result<String, CommandError> {
        match self.obj.get(key) {
            Some(Value::Number(n)) => Ok(n.to_string()),
            _ => self.str(key).map(String::from),
        }
    }

    fn opt_bool(&self, key: &'static str) -> Result<Option<bool>, CommandError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(param_error(key, format!("`{key}` must be true or false"))),
        }
    }

    /// An owner or group: a name (string) or a numeric id (integer or digit string).
    fn opt_id(&self, key: &'static str) -> Result<Option<String>, CommandError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(Some(n.to_string())),
            Some(_) => Err(param_error(
                key,
                format!("`{key}` must be a name or a non-negative numeric id"),
            )),
        }
    }

    fn ownership(&self) -> Result<(Ownership, Value), CommandError> {
        let owner = self.opt_id("owner")?;
        let group = self.opt_id("group")?;
        let uid = owner
            .as_deref()
            .map(|s| validate::resolve_user("owner", s))
            .transpose()?;
        let gid = group
            .as_deref()
            .map(|s| validate::resolve_group("group", s))
            .transpose()?;
        Ok((
            Ownership { uid, gid },
            json!({ "owner": owner, "group": group }),
        ))
    }

    fn mode(&self, cfg: &CommandsConfig) -> Result<Option<u32>, CommandError> {
        match self.obj.get("mode") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(cfg.check_mode("mode", s)?)),
            Some(_) => Err(param_error(
                "mode",
                "`mode` must be an octal string like \"0644\"".into(),
            )),
        }
    }
}

/// A JSON Schema object from `(name, type, required, description)` rows.
fn schema(props: &[(&str, Value, bool, &str)]) -> Value {
    let mut p = Map::new();
    let mut required = Vec::new();
    for (name, ty, req, desc) in props {
        let mut entry = match ty {
            Value::String(t) => json!({ "type": t }),
            other => other.clone(),
        };
        entry["description"] = json!(desc);
        p.insert(name.to_string(), entry);
        if *req {
            required.push(json!(name));
        }
    }
    json!({ "type": "object", "properties": p, "required": required, "additionalProperties": false })
}

fn owner_schema() -> Value {
    json!({ "type": ["string", "integer"] })
}

fn mode_str(m: Option<u32>) -> Option<String> {
    m.map(|m| format!("{m:04o}"))
}

fn spawn_fs<T, F>(f: F) -> BoxFuture<'static, Result<T, CommandError>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, CommandError> + Send + 'static,
{
    Box::pin(async move {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| CommandError::internal(format!("file operation task failed: {e}")))?
    })
}

// ---------------------------------------------------------------------------------------------
// file.write
// ---------------------------------------------------------------------------------------------

/// `file.write` (path, content, owner?, group?, mode?): atomic replacement; missing parent
/// directories are created, as in Lumo. Result `{path, bytes_written}`.
#[derive(Debug)]
pub struct FileWrite;

struct FileWriteArgs {
    path: SafePath,
    content: Zeroizing<Vec<u8>>,
    mode: Option<u32>,
    own: Ownership,
}

impl Command for FileWrite {
    fn name(&self) -> &'static str {
        "file.write"
    }
    fn description(&self) -> &'static str {
        "Write a file atomically (temporary file, fsync, rename, directory fsync)."
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
                "content",
                json!("string"),
                true,
                "the file's content (UTF-8)",
            ),
            (
                "owner",
                owner_schema(),
                false,
                "user name or uid; default: unchanged",
            ),
            (
                "group",
                owner_schema(),
                false,
                "group name or gid; default: unchanged",
            ),
            (
                "mode",
                json!("string"),
                false,
                "octal, e.g. \"0644\"; default: unchanged or 0644",
            ),
        ])
    }
    fn validate(&self, params: &Value, cfg: &CommandsConfig) -> Result<Validated, CommandError> {
        let p = Params::new(params, &["path", "content", "owner", "group", "mode"])?;
        let path = cfg.check_path("path", p.str("path")?)?;
        let content = match p.obj.get("content") {
            Some(Value::String(s)) => Zeroizing::new(s.as_bytes().to_vec()),
            None | Some(Value::Null) => {
                return Err(param_error("content", "`content` is required".into()))
            }
            Some(_) => return Err(param_error("content", "`content` must be a string".into())),
        };
        let (own, own_audit) = p.ownership()?;
        let mode = p.mode(cfg)?;
        let audit = json!({
            "path": path, "content": { "bytes": content.len() },
            "owner": own_audit["owner"], "group": own_audit["group"], "mode": mode_str(mode),
        });
        Ok(Validated::new(
            self.name(),
            FileWriteArgs {
                path,
                content,
                mode,
                own,
            },
            audit,
        ))
    }
    fn plan(&self, v: &Validated) -> Result<Plan, CommandError> {
        let a = v.args::<FileWriteArgs>()?;
        Ok(Plan::new(vec![Step::WriteFile {
            path: a.path.to_string(),
            bytes: a.content.len(),
            create_parents: true,
            mode: mode_str(a.mode),
            uid: a.own.uid.map(|u| u.as_raw()),
            gid: a.own.gid.map(|g| g.as_raw()),
        }]))
    }
    fn execute<'a>(
        &'a self,
        v: Validated,
        _ctx: &'a ExecContext,
    ) -> BoxFuture<'a, Result<Value, CommandError>> {
        let args = v.into_args::<FileWriteArgs>();
        spawn_fs(move || {
            let a = args?;
            let out = files::write_atomic(&a.path, &a.content, a.mode, a.own, true)?;
            Ok(json!({ "path": out.path, "bytes_written": out.bytes_written }))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// file.mkdir
// ---------------------------------------------------------------------------------------------

/// `file.mkdir` (alias `file.create_dir`) (path, owner?, group?, mode?, recursive=true). Result
/// `{path, created}` (and `reason` when it already existed), as Lumo.
#[derive(Debug)]
pub struct FileMkdir;

struct MkdirArgs {
    path: SafePath,
    mode: Option<u32>,
    own: Ownership,
    recursive: bool,
}

impl Command for FileMkdir {
    fn name(&self) -> &'static str {
        "file.mkdir"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["file.create_dir"]
    }
    fn description(&self) -> &'static str {
        "Create a directory (and missing parents unless recursive=false)."
    }
    fn schema(&self) -> Value {
        schema(&[
            (
                "path",
                json!("string"),
                true,
                "absolute path below an allowed prefix",
            ),
            ("owner", owner_schema(), false, "user name or uid"),
            ("group", owner_schema(), false, "group name or gid"),
            (
                "mode",
                json!("string"),
                false,
                "octal, e.g. \"0755\"; default 0755",
            ),
            (
                "recursive",
                json!("boolean"),
                false,
                "create missing parents; default true",
            ),
        ])
    }
    fn validate(&self, params: &Value, cfg: &CommandsConfig) -> Result<Validated, CommandError> {
        let p = Params::new(params, &["path", "owner", "group", "mode", "recursive"])?;
        let path = cfg.check_path("path", p.str("path")?)?;
        let (own, own_audit) = p.ownership()?;
        let mode = p.mode(cfg)?;
        let recursive = p.opt_bool("recursive")?.unwrap_or(true);
        let audit = json!({
            "path": path, "owner": own_audit["owner"], "group": own_audit["group"],
            "mode": mode_str(mode), "recursive": recursive,
        });
        Ok(Validated::new(
            self.name(),
            MkdirArgs {
                path,
                mode,
                own,
                recursive,
            },
            audit,
        ))
    }
    fn plan(&self, v: &Validated) -> Result<Plan, CommandError> {
        let a = v.args::<MkdirArgs>()?;
        Ok(Plan::new(vec![Step::Mkdir {
            path: a.path.to_string(),
            recursive: a.recursive,
            mode: mode_str(a.mode),
            uid: a.own.uid.map(|u| u.as_raw()),
            gid: a.own.gid.map(|g| g.as_raw()),
        }]))
    }
    fn execute<'a>(
        &'a self,
        v: Validated,
        _ctx: &'a ExecContext,
    ) -> BoxFuture<'a, Result<Value, CommandError>> {
        let args = v.into_args::<MkdirArgs>();
        spawn_fs(move || {
            let a = args?;
            let out = files::mkdir(&a.path, a.mode, a.own, a.recursive)?;
            let created = out.created.last().map(String::as_str) == Some(out.path.as_str());
            let mut data = json!({ "path": out.path, "created": created });
            if !created {
                data["reason"] = json!("Directory already exists");
            }
            Ok(data)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// file.delete
// ---------------------------------------------------------------------------------------------

/// `file.delete` (path): removes a file or symlink, never a directory. A missing file is not an
/// error: `{path, deleted: false, reason}`, as Lumo.
#[derive(Debug)]
pub struct FileDelete;

impl Command for FileDelete {
    fn name(&self) -> &'static str {
        "file.delete"
    }
    fn description(&self) -> &'static str {
        "Delete a file (not a directory)."
    }
    fn schema(&self) -> Value {
        schema(&[(
            "path",
            json!("string"),
            true,
            "absolute path below an allowed prefix",
        )])
    }
    fn validate(&self, params: &Value, cfg: &CommandsConfig) -> Result<Validated, CommandError> {
        let p = Params::new(params, &["path"])?;
        let path = cfg.check_path("path", p.str("path")?)?;
        let audit = json!({ "path": path });
        Ok(Validated::new(self.name(), path, audit))
    }
    fn plan(&self, v: &Validated) -> Result<Plan, CommandError> {
        Ok(Plan::new(vec![Step::Delete {
            path: v.args::<SafePath>()?.to_string(),
        }]))
    }
    fn execute<'a>(
        &'a self,
        v: Validated,
        _ctx: &'a ExecContext,
    ) -> BoxFuture<'a, Result<Value, CommandError>> {
        let args = v.into_args::<SafePath>();
        spawn_fs(move || {
            let path = args?;
            match files::delete(&path, false) {
                Ok(out) => Ok(json!({ "path": out.path, "deleted": true })),
                Err(e) if e.code == codes::NOT_FOUND => {
                    Ok(json!({ "path": path, "deleted": false, "reason": "File does not exist" }))
                }
                Err(e) => Err(e),
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// file.chmod
// ---------------------------------------------------------------------------------------------

/// `file.chmod` (alias `file.set_permissions`) (path, mode, recursive=false). Result
/// `{path, mode, files_modified}` as Lumo, plus `skipped`.
#[derive(Debug)]
pub struct FileChmod;

struct ChmodArgs {
    path: SafePath,
    mode: u32,
    recursive: bool,
}

impl Command for FileChmod {
    fn name(&self) -> &'static str {
        "file.chmod"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["file.set_permissions"]
    }
    fn description(&self) -> &'static str {
        "Set the mode of a file or directory (recursively without following symlinks)."
    }
    fn schema(&self) -> Value {
        schema(&[
            (
                "path",
                json!("string"),
                true,
                "absolute path below an allowed prefix",
            ),
            ("mode", json!("string"), true, "octal, e.g. \"0644\""),
            (
                "recursive",
                json!("boolean"),
                false,
                "apply below a directory too; default false",
            ),
        ])
    }
    fn validate(&self, params: &Value, cfg: &CommandsConfig) -> Result<Validated, CommandError> {
        let p = Params::new(params, &["path", "mode", "recursive"])?;
        let path = cfg.check_path("path", p.str("path")?)?;
        let mode = p
            .mode(cfg)?
            .ok_or_else(|| param_error("mode", "`mode` is required".into()))?;
        let recursive = p.opt_bool("recursive")?.unwrap_or(false);
        let audit = json!({ "path": path, "mode": format!("{mode:04o}"), "recursive": recursive });
        Ok(Validated::new(
            self.name(),
            ChmodArgs {
                path,
                mode,
                recursive,
            },
            audit,
        ))
    }
    fn plan(&self, v: &Validated) -> Result<Plan, CommandError> {
        let a = v.args::<ChmodArgs>()?;
        Ok(Plan::new(vec![Step::Chmod {
            path: a.path.to_string(),
            mode: format!("{:04o}", a.mode),
            recursive: a.recursive,
        }]))
    }
    fn execute<'a>(
        &'a self,
        v: Validated,
        _ctx: &'a ExecContext,
    ) -> BoxFuture<'a, Result<Value, CommandError>> {
        let args = v.into_args::<ChmodArgs>();
        spawn_fs(move || {
            let a = args?;
            let out = files::chmod(&a.path, a.mode, a.recursive)?;
            Ok(
                json!({ "path": out.path, "mode": out.mode, "files_modified": out.changed, "skipped": out.skipped }),
            )
        })
    }
}

// ---------------------------------------------------------------------------------------------
// service.*
// ---------------------------------------------------------------------------------------------

/// `service.{start,stop,restart,reload,enable,disable,status}` (service): an allowlisted service
/// through the configured [`ServiceManager`]. `status` answers `{service, active}` rather than
/// failing when the service is stopped.
#[derive(Debug)]
pub struct ServiceCommand {
    action: ServiceAction,
}

impl ServiceCommand {
    pub fn new(action: ServiceAction) -> Self {
        ServiceCommand { action }
    }
}

/// The service and the exact argv the configured manager runs for it, fixed at validation so
/// that the plan is what executes.
struct ServiceArgs {
    service: String,
    manager: &'static str,
    spec: CommandSpec,
}

impl Command for ServiceCommand {
    fn name(&self) -> &'static str {
        match self.action {
            ServiceAction::Start => "service.start",
            ServiceAction::Stop => "service.stop",
            ServiceAction::Restart => "service.restart",
            ServiceAction::Reload => "service.reload",
            ServiceAction::Enable => "service.enable",
            ServiceAction::Disable => "service.disable",
            ServiceAction::Status => "service.status",
        }
    }
    fn description(&self) -> &'static str {
        match self.action {
            ServiceAction::Status => "Report whether an allowlisted service is running.",
            _ => "Control an allowlisted service through systemd or SysV init.",
        }
    }
    fn schema(&self) -> Value {
        schema(&[(
            "service",
            json!("string"),
            true,
            "an allowlisted service name, e.g. \"nginx\"",
        )])
    }
    fn validate(&self, params: &Value, cfg: &CommandsConfig) -> Result<Validated, CommandError> {
        let p = Params::new(params, &["service"])?;
        let service = p.str("service")?;
        cfg.check_service(service)?;
        let mgr: Arc<dyn ServiceManager> = service::choose(cfg.service_manager);
        let args = ServiceArgs {
            service: service.to_string(),
            manager: mgr.name(),
            spec: mgr.command(service, self.action),
        };
        Ok(Validated::new(
            self.name(),
            args,
            json!({ "service": service }),
        ))
    }
    fn plan(&self, v: &Validated) -> Result<Plan, CommandError> {
        Ok(Plan::new(vec![Step::from(&v.args::<ServiceArgs>()?.spec)]))
    }
    fn execute<'a>(
        &'a self,
        v: Validated,
        ctx: &'a ExecContext,
    ) -> BoxFuture<'a, Result<Value, CommandError>> {
        Box::pin(async move {
            let a = v.into_args::<ServiceArgs>()?;
            let out = ctx.executor.run(&a.spec).await?;
            if self.action == ServiceAction::Status {
                // LSB and systemctl: 0 running, 3 not running; anything else is a failure.
                return match out.exit {
                    Exit::Code(0) => Ok(json!({ "service": a.service, "active": true })),
                    Exit::Code(3) => Ok(json!({ "service": a.service, "active": false })),
                    _ => out
                        .check(&format!("status of `{}`", a.service))
                        .map(|_| Value::Null),
                };
            }
            out.check(&format!("{} of `{}`", self.action.as_str(), a.service))?;
            Ok(json!({ "service": a.service, "action": self.action, "manager": a.manager }))
        })
    }
}

mod argv;
mod sites;

pub use argv::PRIVILEGED_GROUPS;
pub use sites::{render_template, NGINX_AVAILABLE, NGINX_ENABLED, PHP_INI_NAME, SSL_DIR};

#[cfg(test)]
mod tests;
