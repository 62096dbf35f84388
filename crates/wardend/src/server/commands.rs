//! Privileged commands in the pipeline: `commands.run`, `commands.list`, and every Lumo command
//! name (`file.write`, `service.restart`, …) sent directly, in either dialect.
//!
//! The pipeline has authenticated the caller and counted the request against the `commands`
//! rate class before it gets here. This module then, for one command:
//!
//! 1. looks the name up in the [`Registry`] (an unknown name is a `VALIDATION_ERROR`);
//! 2. authorizes `commands:<canonical name>` (so a policy may grant `commands:file.*`, and an
//!    alias is authorized as the command it names);
//! 3. validates the parameters against the running `[commands]` configuration, off the async
//!    runtime (validation `lstat`s path components and resolves user names);
//! 4. either returns the plan (`dry_run: true`) or executes it;
//! 5. hands the pipeline the registry's redacted parameters for the audit record: never file
//!    contents, passwords or keys, only their length.
//!
//! `dry_run` may be given inside a command's parameters (a Lumo client has nowhere else to put
//! it) or beside `command` in `commands.run`; it is not passed on to the command.

use super::methods::{self, MethodSpec};
use super::pipeline::{err, Ctx};
use crate::audit::sanitize;
use crate::commands::{codes, CommandError, ExecContext, Registry};
use serde_json::{json, Map, Value};
use std::sync::{Arc, OnceLock};
use warden_wire::envelope::{Dialect, Request};
use warden_wire::reply::{ErrorBody, ErrorCode};

/// The built-in commands. They are stateless; the configuration they check against is the
/// running one, passed per request.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::with_builtin)
}

/// The method a request names when the method table has no row for it: a command name known to
/// the registry (in either dialect), or, in the Lumo dialect, any name at all, so that an
/// unknown Lumo command is answered by the registry (`VALIDATION_ERROR`, after authentication).
pub fn route(req: &Request) -> Option<&'static MethodSpec> {
    if req.dialect == Dialect::Lumo || registry().get(&req.method).is_some() {
        methods::lookup("commands.run")
    } else {
        None
    }
}

/// A command's error as the caller's dialect spells it. Codes both dialects know map onto
/// theirs; `NOT_FOUND` and the command-specific codes (`FILE_EXISTS`, `SITE_NOT_FOUND`, …) are
/// spelled as the command gave them (securityd's own `SECRET_NOT_FOUND` would mislead).
pub fn error_body(e: CommandError) -> ErrorBody {
    let code = match e.code {
        codes::VALIDATION_ERROR => ErrorCode::ValidationError,
        codes::EXECUTION_ERROR => ErrorCode::ExecutionError,
        codes::TIMEOUT => ErrorCode::Timeout,
        codes::INTERNAL_ERROR => ErrorCode::InternalError,
        codes::NOT_FOUND => ErrorCode::NotFound,
        other => ErrorCode::Custom(other),
    };
    ErrorBody {
        code,
        message: e.message,
        details: e.details,
    }
}

/// What a request asks for, once `commands.run`'s wrapping is taken off.
struct Call {
    name: String,
    params: Value,
    dry_run: bool,
}

fn dry_run_flag(v: Option<&Value>) -> Result<bool, ErrorBody> {
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(err(
            ErrorCode::ValidationError,
            "`dry_run` must be true or false",
        )),
    }
}

/// Takes `dry_run` out of a command's parameters: it is warden's, not the command's.
fn take_dry_run(params: &mut Value) -> Result<bool, ErrorBody> {
    match params {
        Value::Object(map) => dry_run_flag(map.remove("dry_run").as_ref()),
        _ => Ok(false),
    }
}

fn parse_call(req: &Request) -> Result<Call, ErrorBody> {
    let is_run = methods::lookup(&req.method).is_some_and(|m| m.name == "commands.run");
    if !is_run {
        let mut params = req.params.clone();
        let dry_run = take_dry_run(&mut params)?;
        return Ok(Call {
            name: req.method.clone(),
            params,
            dry_run,
        });
    }
    let bad = |m: &str| err(ErrorCode::ValidationError, m.to_string());
    let Value::Object(outer) = &req.params else {
        return Err(bad(
            "`commands.run` takes an object: {\"command\": NAME, \"params\": {…}, \"dry_run\"?: bool}",
        ));
    };
    if let Some(k) = outer
        .keys()
        .find(|k| !["command", "params", "dry_run"].contains(&k.as_str()))
    {
        return Err(bad(&format!(
            "unknown parameter `{}` of commands.run; expected command, params, dry_run",
            k.chars().take(64).collect::<String>()
        )));
    }
    let name = outer
        .get("command")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("`command` (a command name such as \"file.write\") is required"))?
        .to_string();
    let mut params = outer
        .get("params")
        .cloned()
        .unwrap_or(Value::Object(Map::new()));
    let inner = take_dry_run(&mut params)?;
    let outer_dry = dry_run_flag(outer.get("dry_run"))?;
    Ok(Call {
        name,
        params,
        dry_run: inner || outer_dry,
    })
}

/// `commands.run` and direct command names. `ctx.resource` becomes the audit record's resource
/// (`commands:<name>`); `ctx.audit_params` its parameters.
pub async fn run(ctx: &mut Ctx<'_>, req: &Request) -> Result<Value, ErrorBody> {
    let call = parse_call(req)?;
    // Until validation succeeds the audit record shows the parameters sanitized by key name.
    ctx.audit_params = Some(json!({
        "command": call.name.chars().take(128).collect::<String>(),
        "params": sanitize(&call.params),
        "dry_run": call.dry_run,
    }));
    let cmd = registry().get(&call.name).cloned().ok_or_else(|| {
        error_body(
            CommandError::validation(format!(
                "unknown command `{}`; `commands.list` lists them",
                call.name.chars().take(128).collect::<String>()
            ))
            .with_details(json!({ "field": "command" })),
        )
    })?;
    let permission = format!("commands:{}", cmd.name());
    ctx.resource = Some(permission.clone());
    ctx.authorize(&permission)?;

    let config = ctx.rt.config.clone();
    let validating = Arc::clone(&cmd);
    let params = call.params;
    let validated =
        tokio::task::spawn_blocking(move || validating.validate(&params, &config.commands))
            .await
            .map_err(|e| {
                err(
                    ErrorCode::InternalError,
                    format!("validation task failed: {e}"),
                )
            })?
            .map_err(error_body)?;
    ctx.audit_params = Some(json!({
        "command": cmd.name(),
        "params": validated.audit_params(),
        "dry_run": call.dry_run,
    }));
    if call.dry_run {
        let plan = cmd.plan(&validated).map_err(error_body)?;
        return Ok(json!({ "dry_run": true, "command": cmd.name(), "plan": plan.to_json() }));
    }
    let exec = ExecContext::for_command(&ctx.rt.config.commands, cmd.name());
    cmd.execute(validated, &exec).await.map_err(error_body)
}

/// `commands.list`: every command with its aliases, description and parameter schema.
pub fn list() -> Value {
    json!({ "commands": registry().list() })
}
