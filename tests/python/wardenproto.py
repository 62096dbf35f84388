"""Minimal, independent client for warden's local-socket protocols.

Written from /work/shared/PROTOCOLS.md only (not from the Rust sources), so
that the test-suite checks the daemon against the specification rather than
against itself.  Standard library only.

Framing (sniffed per connection by the server from the first byte):
  * ``{``          -> newline-delimited JSON, one object per ``\\n``-ended line
  * anything else  -> 4-byte big-endian length prefix + that many JSON bytes

Dialects:
  * Lumo      ``{"command", "params", "timestamp", "nonce", "signature"}``
              HMAC-SHA256 over ``command:params_json:timestamp:nonce``
  * securityd ``{"action", "token"?, "params"?}`` -> ``{"status", "data"?, "error"?}``
  * warden    securityd envelope + optional ``id`` echoed in the reply
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid

MAX_FRAME = 1 << 20          # 1 MiB, Lumo's default maximum message size
DEFAULT_TIMEOUT = 5.0


# --------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------

class DuplicateKeyError(ValueError):
    pass


def _reject_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise DuplicateKeyError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


def loads_strict(data):
    """Parse JSON strictly: UTF-8 only, no duplicate keys."""
    if isinstance(data, (bytes, bytearray)):
        data = bytes(data).decode("utf-8")  # raises on invalid UTF-8
    return json.loads(data, object_pairs_hook=_reject_duplicates)


def dumps_compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# --------------------------------------------------------------------------
# Lumo signing
# --------------------------------------------------------------------------

def canonical_params(params) -> str:
    """Lumo's canonical params encoding: compact, keys sorted at every level,
    non-ASCII raw, '/' unescaped (Python never escapes '/')."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)


def canonical_from_text(params_text: str) -> str:
    return canonical_params(loads_strict(params_text))


def signing_string(command: str, params_json: str, timestamp: int, nonce: str) -> str:
    return f"{command}:{params_json}:{timestamp}:{nonce}"


def sign(key: bytes, command: str, params_json: str, timestamp: int, nonce: str) -> str:
    msg = signing_string(command, params_json, timestamp, nonce).encode("utf-8")
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def new_nonce() -> str:
    return str(uuid.uuid4())


def lumo_request(command: str, params=None, key: bytes | None = None, *,
                 params_raw: str | None = None, form: str = "canonical",
                 timestamp: int | None = None, nonce: str | None = None,
                 uppercase: bool = False, signature: str | None = None,
                 omit_signature: bool = False, extra: dict | None = None) -> bytes:
    """Build the bytes of one Lumo request (without framing).

    ``params_raw`` (a JSON text) is put on the wire byte for byte; otherwise
    ``params`` is serialised compactly in its own (insertion) key order.
    ``form`` selects what is signed: "canonical" (sorted re-encoding) or
    "as_sent" (the exact params text).
    """
    if params_raw is None:
        params_raw = dumps_compact({} if params is None else params)
    if timestamp is None:
        timestamp = int(time.time())
    if nonce is None:
        nonce = new_nonce()
    if signature is None and not omit_signature:
        if key is None:
            raise ValueError("key required to sign")
        if form == "canonical":
            pj = canonical_from_text(params_raw)
        elif form == "as_sent":
            pj = params_raw
        else:
            raise ValueError(form)
        signature = sign(key, command, pj, timestamp, nonce)
        if uppercase:
            signature = signature.upper()
    parts = [
        '"command":' + dumps_compact(command),
        '"params":' + params_raw,
        '"timestamp":' + str(int(timestamp)),
        '"nonce":' + dumps_compact(nonce),
    ]
    if not omit_signature:
        parts.append('"signature":' + dumps_compact(signature))
    for k, v in (extra or {}).items():
        parts.append(dumps_compact(k) + ":" + dumps_compact(v))
    return ("{" + ",".join(parts) + "}").encode("utf-8")


# --------------------------------------------------------------------------
# securityd / warden dialect
# --------------------------------------------------------------------------

def sd_request(action: str, token: str | None = None, params: dict | None = None,
               id=None, **extra) -> bytes:
    obj = {"action": action}
    if token is not None:
        obj["token"] = token
    if params is not None:
        obj["params"] = params
    if id is not None:
        obj["id"] = id
    obj.update(extra)
    return dumps_compact(obj).encode("utf-8")


# --------------------------------------------------------------------------
# Connection with either framing
# --------------------------------------------------------------------------

class Connection:
    """One Unix-socket connection; ``framing`` is "lp" (length prefix) or
    "nl" (newline-delimited)."""

    def __init__(self, path: str, framing: str = "lp", timeout: float = DEFAULT_TIMEOUT):
        if framing not in ("lp", "nl"):
            raise ValueError(framing)
        self.framing = framing
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buf = b""

    # context manager
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def settimeout(self, t):
        self.sock.settimeout(t)

    # sending
    def send_raw(self, data: bytes):
        self.sock.sendall(data)

    def encode(self, payload: bytes) -> bytes:
        if self.framing == "lp":
            return struct.pack(">I", len(payload)) + payload
        if payload[:1] != b"{" or b"\n" in payload:
            raise ValueError("newline framing needs a single line starting with '{'")
        return payload + b"\n"

    def send(self, payload: bytes):
        self.sock.sendall(self.encode(payload))

    # receiving
    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self._buf += chunk
        return True

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not self._fill():
                raise EOFError(f"EOF after {len(self._buf)} of {n} bytes")
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def recv_frame(self) -> bytes:
        if self.framing == "lp":
            (n,) = struct.unpack(">I", self._read_exact(4))
            if n > 16 * MAX_FRAME:
                raise ValueError(f"reply length {n} implausible")
            return self._read_exact(n)
        while b"\n" not in self._buf:
            if not self._fill():
                raise EOFError(f"EOF with {len(self._buf)} bytes of partial line")
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def recv(self) -> dict:
        frame = self.recv_frame()
        obj = loads_strict(frame)
        if not isinstance(obj, dict):
            raise ValueError(f"reply is not an object: {frame!r}")
        return obj

    def request(self, payload: bytes) -> dict:
        self.send(payload)
        return self.recv()

    def at_eof(self, timeout: float = 2.0) -> bool:
        """True if the peer closed the connection (no more bytes) within timeout.
        Leftover bytes count as *not* EOF."""
        if self._buf:
            return False
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        finally:
            self.sock.settimeout(old)


def one_shot_line(path: str, payload: bytes, timeout: float = DEFAULT_TIMEOUT,
                  shut_wr: bool = False) -> dict:
    """securityd example-client style: connect, send one line, read one line, close."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(payload + b"\n")
        if shut_wr:
            s.shutdown(socket.SHUT_WR)
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        line = buf.split(b"\n", 1)[0]
        return loads_strict(line)
    finally:
        s.close()


# --------------------------------------------------------------------------
# Dev daemon fixture
# --------------------------------------------------------------------------

def default_bin() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.environ.get("WARDEN_BIN") or os.path.join(here, "..", "..", "target", "debug", "warden")


class DevDaemon:
    """``warden daemon run --dev --state-dir DIR`` in the foreground."""

    def __init__(self, binary: str | None = None, ready_timeout: float = 20.0):
        self.binary = binary or default_bin()
        self.tmp = tempfile.mkdtemp(prefix="wdn-")
        self.state_dir = os.path.join(self.tmp, "state")
        os.mkdir(self.state_dir, 0o700)
        self.stderr_path = os.path.join(self.tmp, "stderr.log")
        self.info: dict[str, str] = {}
        self.extra_stdout: list[str] = []
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [self.binary, "daemon", "run", "--dev", "--state-dir", self.state_dir],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr)
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        # keep draining stdout so the daemon never blocks on a full pipe
        self._drain = threading.Thread(target=self._drain_stdout, daemon=True)
        self._drain.start()

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"daemon not ready in {timeout}s; stdout={buf!r} "
                                   f"stderr={self.stderr_text()[-2000:]!r}")
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                rc = self.proc.wait(5)
                raise RuntimeError(f"daemon exited (rc={rc}) before WARDEN_READY; "
                                   f"stdout={buf!r} stderr={self.stderr_text()[-2000:]!r}")
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode("utf-8", "replace").strip()
                if "=" in text and text.startswith("WARDEN_"):
                    k, v = text.split("=", 1)
                    self.info[k] = v
                    if k == "WARDEN_READY" and v == "1":
                        self._leftover = buf
                        for need in ("WARDEN_SOCKET", "WARDEN_HMAC_KEY_FILE", "WARDEN_AUDIT_LOG"):
                            if need not in self.info:
                                raise RuntimeError(f"daemon READY without {need}: {self.info}")
                        return
                elif text:
                    self.extra_stdout.append(text)

    def _drain_stdout(self):
        try:
            while self.proc.stdout.read(4096):
                pass
        except (OSError, ValueError):
            pass

    @property
    def socket_path(self) -> str:
        return self.info["WARDEN_SOCKET"]

    @property
    def audit_log(self) -> str:
        return self.info["WARDEN_AUDIT_LOG"]

    def hmac_key(self) -> bytes:
        with open(self.info["WARDEN_HMAC_KEY_FILE"], "rb") as f:
            return f.read()

    def connect(self, framing="lp", timeout=DEFAULT_TIMEOUT) -> Connection:
        return Connection(self.socket_path, framing, timeout)

    def stderr_text(self) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code (kills if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                self._close_files()
                return -999
        self._close_files()
        return self.proc.returncode

    def _close_files(self):
        for f in (self.proc.stdout, self._stderr):
            try:
                f.close()
            except Exception:
                pass

    def cli(self, *args, timeout: float = 15.0) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, *args], capture_output=True, timeout=timeout)
