#!/usr/bin/env bash
# Runs the benchmarks: HMAC-signed system.ping in the Lumo dialect against a dev daemon, a raw
# length-prefixed echo server as the baseline, token pings and token get_secret reads (audited
# durably) in the securityd dialect — all in one run, so that the ratios mean something on a
# shared machine — then unseal timings of a store with the default KDF.
#
# With a Redis on 127.0.0.1:6379 (or $WARDEN_BENCH_REDIS), a second dev daemon keeps its nonces
# and sessions there ([cluster] redis_url), and the same pings run against it, beside the
# in-memory ones.
#
# With a PostgreSQL on 127.0.0.1:5432 (or $WARDEN_BENCH_POSTGRES, the URL of a database whose
# user may create databases), a third dev daemon keeps its secret store there (--postgres, in a
# database of its own, dropped at the end), and get_secret runs against it and against the
# embedded-store daemon, alternating, in the same run.
#
#   bash bench/run.sh [SECONDS] [CONNECTIONS] [SECRETS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
conns=${2:-16}
secrets=${3:-100000}
cargo build --release -p warden -p warden-bench >&2
bin=target/release
work=$(mktemp -d)
cleanup() {
    kill "${daemon_pid:-}" "${echo_pid:-}" "${echo_threads_pid:-}" "${redis_daemon_pid:-}" "${pg_daemon_pid:-}" 2>/dev/null || true
    if [ -n "${redis_prefix:-}" ]; then
        redis-cli -u "$redis_url" --scan --pattern "${redis_prefix}*" | xargs -r -n 1000 redis-cli -u "$redis_url" del >/dev/null || true
    fi
    wait 2>/dev/null || true
    if [ -n "${pg_db:-}" ]; then
        psql "$pg_admin" -qc "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

"$bin/warden-bench" echo-server --socket "$work/echo.sock" > "$work/echo.out" &
echo_pid=$!
"$bin/warden-bench" echo-server --driver threads --socket "$work/echo-threads.sock" > "$work/echo-threads.out" &
echo_threads_pid=$!
WARDEN_LOG=warn "$bin/warden" daemon run --dev --state-dir "$work/state" > "$work/daemon.out" 2> "$work/daemon.err" &
daemon_pid=$!
for _ in $(seq 100); do
    grep -q WARDEN_READY=1 "$work/daemon.out" 2>/dev/null && grep -q ECHO_READY=1 "$work/echo.out" 2>/dev/null \
        && grep -q ECHO_READY=1 "$work/echo-threads.out" 2>/dev/null && break
    sleep 0.1
done
socket=$(sed -n 's/^WARDEN_SOCKET=//p' "$work/daemon.out")
key=$(sed -n 's/^WARDEN_HMAC_KEY_FILE=//p' "$work/daemon.out")
redis_url=${WARDEN_BENCH_REDIS:-redis://127.0.0.1:6379}
redis_socket=
if redis-cli -u "$redis_url" ping >/dev/null 2>&1; then
    redis_prefix="warden-bench:$$:"
    WARDEN_LOG=warn "$bin/warden" daemon run --dev --state-dir "$work/state-redis" --redis "$redis_url" \
        --redis-key-prefix "$redis_prefix" --hmac-key-file "$key" > "$work/daemon-redis.out" 2> "$work/daemon-redis.err" &
    redis_daemon_pid=$!
    for _ in $(seq 100); do
        grep -q WARDEN_READY=1 "$work/daemon-redis.out" 2>/dev/null && break
        sleep 0.1
    done
    redis_socket=$(sed -n 's/^WARDEN_SOCKET=//p' "$work/daemon-redis.out")
fi
pg_admin=${WARDEN_BENCH_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}
pg_socket=
if psql "$pg_admin" -qAtc 'SELECT 1' >/dev/null 2>&1; then
    pg_db="warden_bench_$$"
    psql "$pg_admin" -qc "CREATE DATABASE $pg_db"
    WARDEN_LOG=warn "$bin/warden" daemon run --dev --state-dir "$work/state-pg" --postgres "${pg_admin%/*}/$pg_db" \
        > "$work/daemon-pg.out" 2> "$work/daemon-pg.err" &
    pg_daemon_pid=$!
    for _ in $(seq 100); do
        grep -q WARDEN_READY=1 "$work/daemon-pg.out" 2>/dev/null && break
        sleep 0.1
    done
    pg_socket=$(sed -n 's/^WARDEN_SOCKET=//p' "$work/daemon-pg.out")
fi

echo "# $(date -u +%FT%TZ) $(nproc) cores, $secs s per run, $conns connections"
short=$((secs / 4 > 5 ? secs / 4 : 5))
"$bin/warden-bench" load --socket "$work/echo.sock" --workload echo --connections "$conns" --duration "$secs" --label "raw echo baseline"
"$bin/warden-bench" load --socket "$socket" --workload lumo-ping --key "$key" --connections "$conns" --duration "$secs" --label "warden lumo ping (HMAC)"
# The same two with a blocking thread per connection on the client side, and for the echo on
# the server side too: how clients like a pool of PHP workers load the machine.
"$bin/warden-bench" load --driver threads --socket "$work/echo-threads.sock" --workload echo --connections "$conns" --duration "$short" --label "raw echo baseline, blocking threads"
"$bin/warden-bench" load --driver threads --socket "$socket" --workload lumo-ping --key "$key" --connections "$conns" --duration "$short" --label "warden lumo ping (HMAC), blocking client threads"
"$bin/warden-bench" load --socket "$socket" --workload token-ping --connections "$conns" --duration "$short" --label "warden securityd ping (token)"
"$bin/warden-bench" load --socket "$socket" --workload lumo-ping --key "$key" --connections "$conns" --pipeline 8 --duration "$short" --label "warden lumo ping (HMAC), 8 pipelined"
if [ -n "$redis_socket" ]; then
    "$bin/warden-bench" load --socket "$socket" --workload lumo-ping --key "$key" --connections "$conns" --duration "$short" --label "warden lumo ping (HMAC), nonces in memory"
    "$bin/warden-bench" load --socket "$redis_socket" --workload lumo-ping --key "$key" --connections "$conns" --duration "$short" --label "warden lumo ping (HMAC), nonces in Redis"
    "$bin/warden-bench" load --socket "$redis_socket" --workload token-ping --connections "$conns" --duration "$short" --label "warden securityd ping (token), sessions in Redis"
fi
"$bin/warden-bench" load --socket "$socket" --workload get-secret --connections "$conns" --duration "$secs" --label "warden securityd get_secret (token, audited)"
"$bin/warden-bench" load --socket "$socket" --workload get-secret --connections 1 --duration "$short" --label "warden securityd get_secret (token, audited), 1 connection"
if [ -n "$pg_socket" ]; then
    for round in 1 2; do
        "$bin/warden-bench" load --socket "$socket" --workload get-secret --connections "$conns" --duration "$short" --label "warden securityd get_secret (token, audited), embedded store, round $round"
        "$bin/warden-bench" load --socket "$pg_socket" --workload get-secret --connections "$conns" --duration "$short" --label "warden securityd get_secret (token, audited), PostgreSQL store, round $round"
    done
fi
"$bin/warden-bench" unseal --dir "$work/unseal-empty" --secrets 0 --rounds 5
"$bin/warden-bench" unseal --dir "$work/unseal-full" --secrets "$secrets" --rounds 3
echo "# audit records in the kept log files: $(cat "$work/state"/audit.log "$work/state"/audit.log.[0-9]* 2>/dev/null | wc -l)"
# As root, dev mode runs a monitor and core as its child: core holds the nonces and sessions.
for pid in "$daemon_pid" $(pgrep -P "$daemon_pid" || true); do
    echo "# peak RSS of $(tr '\0' ' ' < /proc/$pid/cmdline | cut -c1-60): $(grep VmHWM /proc/$pid/status | awk '{print $2, $3}')"
done
