//! Service managers: how `service.*` turns "restart nginx" into an argv.
//!
//! Two backends behind one trait, chosen once from configuration: systemd (`systemctl ACTION
//! NAME`) and SysV (`/usr/sbin/service NAME ACTION`, `update-rc.d` for enable/disable). `auto`
//! picks systemd only when PID 1 is systemd: a machine or container that has systemd installed
//! (even with a leftover `/run/systemd/`) but another init gets SysV, because `systemctl` cannot
//! reach a manager that is not running.

use super::allowlist::ServiceManagerKind;
use super::exec::CommandSpec;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;

/// The `service.*` actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceAction {
    Start,
    Stop,
    Restart,
    Reload,
    Enable,
    Disable,
    Status,
}

impl ServiceAction {
    pub const ALL: [ServiceAction; 7] = [
        ServiceAction::Start,
        ServiceAction::Stop,
        ServiceAction::Restart,
        ServiceAction::Reload,
        ServiceAction::Enable,
        ServiceAction::Disable,
        ServiceAction::Status,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceAction::Start => "start",
            ServiceAction::Stop => "stop",
            ServiceAction::Restart => "restart",
            ServiceAction::Reload => "reload",
            ServiceAction::Enable => "enable",
            ServiceAction::Disable => "disable",
            ServiceAction::Status => "status",
        }
    }
}

/// Builds the argv that performs an action on a (validated, allowlisted) service.
pub trait ServiceManager: Send + Sync + std::fmt::Debug {
    /// `systemd` or `sysv`, reported in results.
    fn name(&self) -> &'static str;
    fn command(&self, service: &str, action: ServiceAction) -> CommandSpec;
}

/// `systemctl ACTION NAME`. Status is `systemctl is-active NAME`: exit 0 means active, 3
/// inactive (systemctl's LSB-compatible codes).
#[derive(Debug, Clone, Copy)]
pub struct Systemd;

impl ServiceManager for Systemd {
    fn name(&self) -> &'static str {
        "systemd"
    }
    fn command(&self, service: &str, action: ServiceAction) -> CommandSpec {
        let verb = if action == ServiceAction::Status {
            "is-active"
        } else {
            action.as_str()
        };
        CommandSpec::new("systemctl", [verb, "--", service])
    }
}

/// `/usr/sbin/service NAME ACTION`; enable and disable through `update-rc.d NAME enable|disable`
/// (the `service` wrapper has no such actions). Status follows LSB: 0 running, 3 not running.
#[derive(Debug, Clone, Copy)]
pub struct SysV;

impl ServiceManager for SysV {
    fn name(&self) -> &'static str {
        "sysv"
    }
    fn command(&self, service: &str, action: ServiceAction) -> CommandSpec {
        match action {
            ServiceAction::Enable | ServiceAction::Disable => {
                CommandSpec::new("/usr/sbin/update-rc.d", [service, action.as_str()])
            }
            _ => CommandSpec::new("/usr/sbin/service", [service, action.as_str()]),
        }
    }
}

/// Whether PID 1 is systemd: its executable is named `systemd` (`/lib/systemd/systemd`,
/// `/usr/lib/systemd/systemd`). Where `/proc/1/exe` cannot be read (another PID namespace's
/// init, no permission), `/proc/1/comm` decides.
pub fn systemd_booted() -> bool {
    pid1_is_systemd(Path::new("/proc/1"))
}

fn pid1_is_systemd(proc1: &Path) -> bool {
    match std::fs::read_link(proc1.join("exe")) {
        Ok(exe) => exe.file_name().is_some_and(|n| n == "systemd"),
        Err(_) => std::fs::read_to_string(proc1.join("comm")).is_ok_and(|c| c.trim() == "systemd"),
    }
}

/// The backend for a configuration choice.
pub fn choose(kind: ServiceManagerKind) -> Arc<dyn ServiceManager> {
    match kind {
        ServiceManagerKind::Systemd => Arc::new(Systemd),
        ServiceManagerKind::Sysv => Arc::new(SysV),
        ServiceManagerKind::Auto if systemd_booted() => Arc::new(Systemd),
        ServiceManagerKind::Auto => Arc::new(SysV),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_argv_is_systemctl_action_name() {
        assert_eq!(
            Systemd.command("nginx", ServiceAction::Restart).argv(),
            ["systemctl", "restart", "--", "nginx"]
        );
        assert_eq!(
            Systemd.command("php8.3-fpm", ServiceAction::Enable).argv(),
            ["systemctl", "enable", "--", "php8.3-fpm"]
        );
        assert_eq!(
            Systemd.command("nginx", ServiceAction::Status).argv(),
            ["systemctl", "is-active", "--", "nginx"]
        );
    }

    #[test]
    fn sysv_argv_is_service_name_action() {
        for a in [
            ServiceAction::Start,
            ServiceAction::Stop,
            ServiceAction::Restart,
            ServiceAction::Reload,
            ServiceAction::Status,
        ] {
            assert_eq!(
                SysV.command("nginx", a).argv(),
                ["/usr/sbin/service", "nginx", a.as_str()]
            );
        }
        assert_eq!(
            SysV.command("nginx", ServiceAction::Disable).argv(),
            ["/usr/sbin/update-rc.d", "nginx", "disable"]
        );
    }

    #[test]
    fn choice_follows_configuration_and_auto_detects() {
        assert_eq!(choose(ServiceManagerKind::Systemd).name(), "systemd");
        assert_eq!(choose(ServiceManagerKind::Sysv).name(), "sysv");
        let expected = if systemd_booted() { "systemd" } else { "sysv" };
        assert_eq!(choose(ServiceManagerKind::Auto).name(), expected);
    }

    #[test]
    fn pid1_detection_reads_the_init_executable_then_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path();
        assert!(!pid1_is_systemd(fake));
        std::fs::write(fake.join("comm"), "systemd\n").unwrap();
        assert!(pid1_is_systemd(fake));
        std::os::unix::fs::symlink("/usr/lib/systemd/systemd", fake.join("exe")).unwrap();
        assert!(pid1_is_systemd(fake));
        std::fs::remove_file(fake.join("exe")).unwrap();
        std::os::unix::fs::symlink("/sbin/tini", fake.join("exe")).unwrap();
        assert!(!pid1_is_systemd(fake), "exe wins over comm");
        // This machine: PID 1 is what /proc says, whatever is installed.
        let comm = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
        if comm.trim() != "systemd" {
            assert!(!systemd_booted());
        }
    }
}
