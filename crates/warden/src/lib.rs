//! The code behind warden's two binaries: `warden`, the command line, and `wardend`, the
//! daemon.
//!
//! They are two binaries so that the command line stays small: every CLI call is a process
//! start, and a binary that also carried the daemon (its servers, TLS, gRPC) paid for mapping
//! and relocating all of that each time, about a millisecond, more than the request itself.
//! `warden daemon run` hands over to `wardend run` (an exec, so the pid stays); the daemon
//! re-executes itself (`wardend internal core|gateway`) for privilege separation.

pub mod cli;
pub mod daemon_cmd;
mod dev;
pub mod jobs_cmd;
pub mod pki_cmd;
pub mod secrets_cmd;

/// `warden`'s `main`.
pub fn cli_main() -> ! {
    use clap::Parser;
    let args = cli::Cli::parse();
    exit(cli::dispatch(args))
}

/// `wardend`'s `main`.
pub fn daemon_main() -> ! {
    use clap::Parser;
    let args = daemon_cmd::DaemonCli::parse();
    exit(daemon_cmd::dispatch_daemon(args))
}

fn exit(result: anyhow::Result<i32>) -> ! {
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("warden: {e:#}");
            1
        }
    };
    std::process::exit(code)
}
