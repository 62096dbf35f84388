//! `warden`: the daemon's entry points and its command-line interface, in one binary.

mod cli;
mod daemon_cmd;
mod dev;
mod jobs_cmd;
mod pki_cmd;
mod secrets_cmd;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    let code = match cli::dispatch(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("warden: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
