#!/usr/bin/env bash
# Runs the job benchmarks against a dev daemon (release build, rate limits off), in one run so
# the figures sit beside their baselines on a shared machine:
#   - start-to-first-output-byte of `echo x` as a job (cgroup + PID + mount + IPC + UTS
#     namespaces; then with a network namespace too), through the socket and through
#     `warden jobs exec`, beside a raw `unshare --fork --pid --mount-proc [--net] echo x`;
#   - output throughput of `head -c BYTES /dev/zero` to one attached client;
#   - CLIENTS clients following one BYTES stream, with the daemon's memory sampled.
#
#   sudo bash bench/jobs.sh [ITERATIONS] [BYTES] [CLIENTS] [FANOUT_BYTES]
set -euo pipefail
cd "$(dirname "$0")/.."
iters=${1:-200}
bytes=${2:-$((1 << 30))}
clients=${3:-100}
fanout_bytes=${4:-$bytes}
cargo build --release -p warden -p warden-bench >&2
bin=$PWD/target/release
work=$(mktemp -d)
cleanup() {
    kill "${daemon_pid:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true

WARDEN_LOG=warn "$bin/warden" daemon run --dev --state-dir "$work/state" > "$work/daemon.out" 2> "$work/daemon.err" &
daemon_pid=$!
for _ in $(seq 100); do
    grep -q WARDEN_READY=1 "$work/daemon.out" 2>/dev/null && break
    sleep 0.1
done
export WARDEN_SOCKET=$(sed -n 's/^WARDEN_SOCKET=//p' "$work/daemon.out")
# As root, dev mode runs a monitor with core as its child; core holds the jobs and their output.
core_pid=$(pgrep -P "$daemon_pid" -f "internal core" || echo "$daemon_pid")

echo "# $(date -u +%FT%TZ) $(nproc) cores, kernel $(uname -r)"
"$bin/warden-bench" jobs latency --warden "$bin/warden" --iterations "$iters"
"$bin/warden-bench" jobs latency --warden "$bin/warden" --iterations "$iters" --netns
"$bin/warden-bench" jobs throughput --bytes "$bytes"
"$bin/warden-bench" jobs fanout --clients "$clients" --bytes "$fanout_bytes" --pid "$core_pid"
echo "# core's peak RSS over the whole run: $(grep VmHWM /proc/$core_pid/status | awk '{print $2, $3}')"
