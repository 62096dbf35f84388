//! `warden`: the daemon's entry points and its command-line interface, in one binary.

mod cli;
mod daemon_cmd;
mod dev;
mod jobs_cmd;
mod pki_cmd;
mod secrets_cmd;

use clap::Parser;

/// mimalloc rather than the C library's allocator: the daemon's request path allocates and
/// frees small buffers on several threads, where glibc's per-arena locks and free-list work
/// showed up as several per cent of core's time under load (bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
