"""Client for the warden security daemon (Unix socket), standard library only.

The daemon decides who the caller is from the kernel (uid, pid, executable), so the client
sends no identity of its own: it asks for a token with ``auth``, presents it with each call, and
asks again when the daemon says it expired.
"""

import json
import os
import socket
import struct
import threading
import time

__all__ = ["Client", "WardenError", "DEFAULT_SOCKET"]

DEFAULT_SOCKET = "/run/warden/warden.sock"
MAX_REPLY = 64 << 20


class WardenError(Exception):
    """An error answered by the daemon (``code`` is its error code) or met on the way."""

    def __init__(self, code, message, details=None):
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message
        self.details = details


class Client:
    """A connection to warden.

    socket_path: the daemon's socket (default ``$WARDEN_SOCKET``, else /run/warden/warden.sock).
    url: reserved for the daemon's remote (mTLS) mode; only the Unix socket is supported here.
    timeout: seconds to wait for the daemon on each call.
    cache_ttl: keep values read for this many seconds (0: no cache).
    fallback: used when the daemon is unavailable: a callable ``key -> value or None``, or
      ``"env"`` to read the environment variable named like the key in upper case.
    """

    def __init__(self, socket_path=None, url=None, timeout=10.0, cache_ttl=0, fallback=None):
        if url is not None:
            raise WardenError("UNSUPPORTED", "remote (mTLS) mode is not available in this client yet")
        self.socket_path = socket_path or os.environ.get("WARDEN_SOCKET") or DEFAULT_SOCKET
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.fallback = fallback
        self._sock = None
        self._token = None
        self._next_id = 1
        self._cache = {}
        self._lock = threading.Lock()

    # -- connection -----------------------------------------------------------------------

    def _connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.socket_path)
        self._sock = s

    def close(self):
        """Revokes the token this client obtained and closes the connection."""
        with self._lock:
            if self._sock is not None and self._token is not None:
                try:
                    self._roundtrip("logout", {}, self._token)
                except (OSError, WardenError):
                    pass
            self._token = None
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _roundtrip(self, action, params, token):
        if self._sock is None:
            self._connect()
        req_id = self._next_id
        self._next_id += 1
        req = {"action": action, "id": req_id, "params": params}
        if token is not None:
            req["token"] = token
        body = json.dumps(req, separators=(",", ":")).encode()
        try:
            self._sock.sendall(struct.pack(">I", len(body)) + body)
            while True:
                reply = self._read_frame()
                if reply.get("id") == req_id:
                    return reply
        except (OSError, ValueError):
            # A broken connection is not reused.
            if self._sock is not None:
                self._sock.close()
            self._sock = None
            raise

    def _read_frame(self):
        header = self._read_exact(4)
        (length,) = struct.unpack(">I", header)
        if length > MAX_REPLY:
            raise ValueError("reply too large")
        return json.loads(self._read_exact(length))

    def _read_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            buf += chunk
        return bytes(buf)

    # -- calls ------------------------------------------------------------------------------

    def _authenticate(self):
        reply = self._roundtrip("auth", {}, None)
        data = self._check(reply)
        self._token = data["token"]

    @staticmethod
    def _check(reply):
        if reply.get("status") == "ok":
            return reply.get("data")
        err = reply.get("error") or {}
        raise WardenError(err.get("code", "UNKNOWN"), err.get("message", ""), err.get("details"))

    def call(self, action, params=None):
        """Calls any method with this client's token, authenticating (again) as needed."""
        params = params or {}
        with self._lock:
            if self._token is None:
                self._authenticate()
            reply = self._roundtrip(action, params, self._token)
            code = (reply.get("error") or {}).get("code")
            if code in ("AUTH_EXPIRED", "AUTH_INVALID", "AUTH_REQUIRED"):
                self._authenticate()
                reply = self._roundtrip(action, params, self._token)
            return self._check(reply)

    def is_available(self):
        """True when the daemon answers ``health``."""
        try:
            with self._lock:
                return self._roundtrip("health", {}, None).get("status") == "ok"
        except (OSError, ValueError):
            return False

    def health(self):
        with self._lock:
            return self._check(self._roundtrip("health", {}, None))

    # -- secrets ----------------------------------------------------------------------------

    def _cached(self, key):
        hit = self._cache.get(key)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        self._cache.pop(key, None)
        return None

    def _remember(self, key, value):
        if self.cache_ttl > 0:
            self._cache[key] = (value, time.monotonic() + self.cache_ttl)

    def _fallback(self, key):
        if self.fallback is None:
            return None
        if self.fallback == "env":
            return os.environ.get(key.upper())
        return self.fallback(key)

    def get_secret(self, key):
        """The value of ``key`` (a str), or the fallback's when the daemon is unavailable."""
        value = self._cached(key)
        if value is not None:
            return value
        try:
            data = self.call("get_secret", {"key": key})
        except (OSError, ValueError):
            value = self._fallback(key)
            if value is None:
                raise
            return value
        value = data["value"]
        self._remember(key, value)
        return value

    def get_secrets(self, keys):
        """``{"secrets": {key: value}, "missing": [keys]}``."""
        keys = list(keys)
        try:
            data = self.call("get_secrets", {"keys": keys})
        except (OSError, ValueError):
            if self.fallback is None:
                raise
            found = {k: self._fallback(k) for k in keys}
            return {
                "secrets": {k: v for k, v in found.items() if v is not None},
                "missing": [k for k, v in found.items() if v is None],
            }
        for k, v in data.get("secrets", {}).items():
            self._remember(k, v)
        return data

    def list_secrets(self):
        """The names of the secrets this caller may read."""
        return self.call("list_secrets")["secrets"]
