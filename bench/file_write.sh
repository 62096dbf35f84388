#!/usr/bin/env bash
# file.write of a small file through warden (dev daemon, signed Lumo requests) against
# `sudo -n tee` writing the same file, in one run:
#
#   bash bench/file_write.sh [ITERATIONS] [BYTES]
#
# Needs root (sudo -n must not ask for a password); installs sudo if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
iterations=${1:-300}
size=${2:-256}
if ! command -v sudo >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q sudo >&2
fi
cargo build --release -p warden -p warden-bench >&2
bin=target/release
work=$(mktemp -d)
cleanup() {
    kill "${daemon_pid:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work" "${shm:-}"
}
trap cleanup EXIT

# One run with the daemon's state (its audit log and the files written) on the disk, where each
# of warden's three fsyncs (file, directory, audit record) costs what the disk makes it cost,
# and one on tmpfs, where what is measured is the mechanism: a signed request to a running
# daemon against starting sudo (and tee) for every write.
run() {
    local state=$1
    WARDEN_LOG=warn "$bin/warden" daemon run --dev --state-dir "$state" > "$work/daemon.out" 2> "$work/daemon.err" &
    daemon_pid=$!
    for _ in $(seq 100); do
        grep -q WARDEN_READY=1 "$work/daemon.out" 2>/dev/null && break
        sleep 0.1
    done
    export WARDEN_SOCKET WARDEN_HMAC_KEY_FILE WARDEN_FILES_DIR
    WARDEN_SOCKET=$(sed -n 's/^WARDEN_SOCKET=//p' "$work/daemon.out")
    WARDEN_HMAC_KEY_FILE=$(sed -n 's/^WARDEN_HMAC_KEY_FILE=//p' "$work/daemon.out")
    WARDEN_FILES_DIR=$(sed -n 's/^WARDEN_FILES_DIR=//p' "$work/daemon.out")
    echo "# $(date -u +%FT%TZ) $(nproc) cores, state and files on $(findmnt -no FSTYPE -T "$WARDEN_FILES_DIR" 2>/dev/null | head -n 1)"
    "$bin/warden-bench" file-write --iterations "$iterations" --size "$size"
    kill "$daemon_pid"
    wait "$daemon_pid" 2>/dev/null || true
    daemon_pid=
}
run "$work/state"
if [ "$(findmnt -no FSTYPE -T /dev/shm 2>/dev/null | head -n 1)" = tmpfs ]; then
    shm=$(mktemp -d -p /dev/shm warden-bench-XXXXXX)
    run "$shm/state"
fi
