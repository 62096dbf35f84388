//! `wardend`: the daemon (`wardend run`, or `warden daemon run`, which execs this).

/// mimalloc rather than the C library's allocator: the daemon's request path allocates and
/// frees small buffers on several threads, where glibc's per-arena locks and free-list work
/// showed up as several per cent of core's time under load (bench/README.md). The command
/// line keeps the C library's, which costs nothing to set up.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    warden_cmd::daemon_main()
}
