#!/usr/bin/env bash
# The whole test suite, as CI runs it: unit tests, end-to-end tests against the real binary,
# and the independent Python client's tests. Run from anywhere; needs cargo, python3 and openssl
# (installed with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v python3 >/dev/null; then
    echo "python3 is required for the protocol tests (apt-get install python3)" >&2
    exit 1
fi

# The Python client's packaging test builds it offline with pip, which needs `wheel`.
if ! python3 -c 'import wheel' 2>/dev/null; then
    python3 -m pip install --quiet wheel
fi

# The PKI tests (crates/warden/tests/pki.rs) check what `warden pki` writes with the openssl CLI.
if ! command -v openssl >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi

# The end-to-end tests start many daemons and thousands of connections.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --workspace --all-targets
cargo test --workspace -- --test-threads="${WARDEN_TEST_THREADS:-4}"

# Protocol tests written from PROTOCOLS.md alone, against the real binary.
WARDEN_BIN="$PWD/target/debug/warden" python3 -m unittest discover -s tests/python -v

# The Python client (clients/python) against the real daemon.
WARDEN_BIN="$PWD/target/debug/warden" python3 -m unittest discover -s clients/python/tests -v
