"""Client for the warden security daemon (Unix socket or the mTLS gateway), standard library
only.

The daemon decides who the caller is from the kernel (uid, pid, executable), so the client
sends no identity of its own: it asks for a token with ``auth``, presents it with each call, and
asks again when the daemon says it expired.

When the daemon is not there (no socket, connection refused) or its store is sealed
(``DAEMON_LOCKED``), reads can fall back to another source: the migration path from secrets in
environment variables or files to the daemon.

Remote mode (``url="https://host:port"`` with ``cert``, ``key`` and ``ca``) speaks the gateway's
REST API over TLS 1.3 with a client certificate; the gateway derives the identity from the
certificate, as the socket does from the kernel.
"""

import http.client
import json
import os
import socket
import ssl
import urllib.parse
import struct
import threading
import time

__all__ = ["Client", "WardenError", "DEFAULT_SOCKET"]

DEFAULT_SOCKET = "/run/warden/warden.sock"
MAX_REPLY = 64 << 20
# Answers after which a new token is obtained and the request sent once more: the request was
# refused before anything ran, so sending it again is safe.
_REAUTH = ("AUTH_EXPIRED", "AUTH_INVALID", "AUTH_REQUIRED")
# The daemon cannot serve secrets right now: a fallback may answer instead.
_UNAVAILABLE = ("DAEMON_LOCKED", "UNAVAILABLE")
# Remote mode: the securityd actions this client sends, as REST endpoints.
_REST = {
    "auth": ("POST", "/auth/validate"),
    "refresh": ("POST", "/auth/refresh"),
    "logout": ("POST", "/auth/logout"),
    "health": ("GET", "/health"),
    "list_secrets": ("GET", "/secrets"),
    "get_secrets": ("POST", "/secrets/batch"),
}


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
    url: ``unix:///path/to/socket`` is the same as ``socket_path``; ``https://host:port`` is
      the mTLS gateway, and needs ``cert``, ``key`` (the client certificate and its key, PEM)
      and ``ca`` (the CA the gateway's certificate chains to).
    timeout: seconds to wait for the daemon on each call.
    cache_ttl: keep values read for this many seconds (0: no cache). Cached values are plain
      Python strings in this process's memory.
    fallback: used when the daemon is unavailable or sealed: a callable ``key -> value or None``,
      or ``"env"`` to read the environment variable named ``fallback_env_prefix + KEY.upper()``.
    """

    def __init__(self, socket_path=None, url=None, timeout=10.0, cache_ttl=0, fallback=None,
                 fallback_env_prefix="", cert=None, key=None, ca=None):
        self._remote = None
        self._tls = None
        if url is not None:
            if url.startswith("https://"):
                if not (cert and key and ca):
                    raise ValueError("an https:// url needs cert=, key= and ca=")
                u = urllib.parse.urlsplit(url)
                self._remote = (u.hostname, u.port or 443)
                ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_3
                ctx.load_cert_chain(cert, key)
                self._tls = ctx
            elif url.startswith("unix://"):
                socket_path = socket_path or url[len("unix://"):]
            else:
                raise ValueError("url must be unix:///path or https://host:port")
        if fallback is not None and fallback != "env" and not callable(fallback):
            raise ValueError('fallback must be a callable or "env"')
        self.socket_path = socket_path or os.environ.get("WARDEN_SOCKET") or DEFAULT_SOCKET
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.fallback = fallback
        self.fallback_env_prefix = fallback_env_prefix
        self._sock = None
        self._token = None
        self._next_id = 1
        self._cache = {}
        self._lock = threading.Lock()

    # -- connection -----------------------------------------------------------------------

    def _connect(self):
        if self._remote is not None:
            host, port = self._remote
            self._sock = http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                                     context=self._tls)
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.socket_path)
        except OSError:
            s.close()
            raise
        self._sock = s

    def close(self):
        """Revokes the token this client obtained and closes the connection."""
        with self._lock:
            if self._sock is not None and self._token is not None:
                try:
                    self._roundtrip("logout", {}, self._token)
                except (OSError, ValueError, WardenError):
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
        if self._remote is not None:
            return self._rest_roundtrip(action, params, token)
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

    def _rest_roundtrip(self, action, params, token):
        if action == "get_secret":
            method, path = "GET", "/secrets/" + urllib.parse.quote(params["key"], safe="")
        elif action in _REST:
            method, path = _REST[action]
        else:
            raise WardenError("UNSUPPORTED", "%s is not available over the REST API" % action)
        headers = {}
        body = None
        if method == "POST":
            body = json.dumps(params, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        if token is not None:
            headers["Authorization"] = "Bearer " + token
        try:
            self._sock.request(method, path, body=body, headers=headers)
            resp = self._sock.getresponse()
            data = resp.read(MAX_REPLY + 1)
            if len(data) > MAX_REPLY:
                raise ValueError("reply too large")
            return json.loads(data)
        except (OSError, ValueError, http.client.HTTPException) as e:
            if self._sock is not None:
                self._sock.close()
            self._sock = None
            if isinstance(e, http.client.HTTPException):
                raise ConnectionError("the gateway's reply is not HTTP: %s" % e) from e
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

    def call(self, action, params=None, idempotent=False):
        """Calls any method with this client's token, authenticating (again) as needed.

        With ``idempotent=True`` a request whose connection broke (a restarted daemon) is sent
        once more on a new connection; otherwise the error is raised, since the request may
        have run.
        """
        params = params or {}
        with self._lock:
            for attempt in (0, 1):
                try:
                    if self._token is None:
                        self._authenticate()
                    reply = self._roundtrip(action, params, self._token)
                except (OSError, ValueError):
                    if attempt or not idempotent:
                        raise
                    # A new daemon does not know the old token.
                    self._token = None
                    continue
                code = (reply.get("error") or {}).get("code")
                if code in _REAUTH and attempt == 0:
                    self._token = None
                    continue
                return self._check(reply)

    def health(self):
        with self._lock:
            return self._check(self._roundtrip("health", {}, None))

    def is_available(self):
        """True when the daemon answers and can serve secrets (its store is unsealed)."""
        try:
            return not self.health().get("sealed", False)
        except (OSError, ValueError, WardenError):
            return False

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

    def clear_cache(self):
        self._cache.clear()

    def _fallback(self, key):
        if self.fallback == "env":
            return os.environ.get(self.fallback_env_prefix + key.upper())
        return self.fallback(key)

    def _read(self, action, params):
        """A read, or ``None`` when the daemon is unavailable and a fallback is configured."""
        try:
            return self.call(action, params, idempotent=True)
        except (OSError, ValueError):
            if self.fallback is None:
                raise
        except WardenError as e:
            if self.fallback is None or e.code not in _UNAVAILABLE:
                raise
        return None

    def get_secret(self, key):
        """The value of ``key`` (a str); ``None`` if the daemon has no such secret. When the
        daemon is unavailable or sealed, the fallback's value (raises without a fallback)."""
        value = self._cached(key)
        if value is not None:
            return value
        try:
            data = self._read("get_secret", {"key": key})
        except WardenError as e:
            if e.code == "SECRET_NOT_FOUND":
                return None
            raise
        if data is None:
            return self._fallback(key)
        value = data["value"]
        self._remember(key, value)
        return value

    def get_secrets(self, keys):
        """``{"secrets": {key: value}, "missing": [keys]}`` (from the fallback when the
        daemon is unavailable or sealed)."""
        keys = list(keys)
        data = self._read("get_secrets", {"keys": keys})
        if data is None:
            found = {k: self._fallback(k) for k in keys}
            return {
                "secrets": {k: v for k, v in found.items() if v is not None},
                "missing": [k for k, v in found.items() if v is None],
            }
        for k, v in data.get("secrets", {}).items():
            self._remember(k, v)
        # A damaged entry (integrity error) is as good as missing to the caller.
        missing = data.get("missing", []) + data.get("damaged", [])
        return {"secrets": data.get("secrets", {}), "missing": missing}

    def list_secrets(self):
        """The names of the secrets this caller may read."""
        return self.call("list_secrets", idempotent=True)["secrets"]
