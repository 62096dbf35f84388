"""Independent protocol checks for warden (written from PROTOCOLS.md).

Run from the repository root:
    WARDEN_BIN=/work/main/target/debug/warden python3 -m unittest discover -s tests/python -v
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import sys
import time
import unittest
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import wardenproto as wp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.environ.get("WARDEN_VECTORS", "/work/shared/vectors/lumo-hmac.json")
WARDEN_BIN = wp.default_bin()
# an explicit WARDEN_BIN must work (fail, never skip); the default path may be absent
HAVE_BIN = "WARDEN_BIN" in os.environ or os.access(WARDEN_BIN, os.X_OK)
SKIP_MSG = f"warden binary not found at {WARDEN_BIN} (set WARDEN_BIN)"

RFC3339 = __import__("re").compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
SD_AUTH_CODES = {"AUTH_REQUIRED", "AUTH_INVALID", "AUTH_EXPIRED", "AUTH_DENIED"}


def _shape(reply) -> str:
    return json.dumps(reply, ensure_ascii=False)[:600]


# ==========================================================================
# 1. Test vectors (pure, no daemon)
# ==========================================================================

class TestVectors(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(VECTORS, "rb") as f:
            cls.doc = wp.loads_strict(f.read())
        cls.key = cls.doc["key_utf8"].encode("utf-8")

    def test_vectors_present(self):
        self.assertGreaterEqual(len(self.doc["vectors"]), 10)

    def test_canonical_params(self):
        for v in self.doc["vectors"]:
            with self.subTest(nonce=v["nonce"]):
                self.assertEqual(wp.canonical_from_text(v["params_as_sent"]), v["canonical_params"])

    def test_signing_string(self):
        for v in self.doc["vectors"]:
            with self.subTest(nonce=v["nonce"]):
                s = wp.signing_string(v["command"], wp.canonical_from_text(v["params_as_sent"]),
                                      v["timestamp"], v["nonce"])
                self.assertEqual(s, v["signing_string"])

    def test_canonical_signature(self):
        for v in self.doc["vectors"]:
            with self.subTest(nonce=v["nonce"]):
                sig = wp.sign(self.key, v["command"], wp.canonical_from_text(v["params_as_sent"]),
                              v["timestamp"], v["nonce"])
                self.assertEqual(sig, v["canonical_signature"])

    def test_as_sent_signature(self):
        for v in self.doc["vectors"]:
            with self.subTest(nonce=v["nonce"]):
                sig = wp.sign(self.key, v["command"], v["params_as_sent"], v["timestamp"], v["nonce"])
                self.assertEqual(sig, v["as_sent_signature"])

    def test_request_builder_embeds_params_verbatim(self):
        for v in self.doc["vectors"]:
            for form, want in (("canonical", v["canonical_signature"]),
                               ("as_sent", v["as_sent_signature"])):
                with self.subTest(nonce=v["nonce"], form=form):
                    raw = wp.lumo_request(v["command"], key=self.key, params_raw=v["params_as_sent"],
                                          form=form, timestamp=v["timestamp"], nonce=v["nonce"])
                    self.assertIn(b'"params":' + v["params_as_sent"].encode() + b",", raw)
                    req = wp.loads_strict(raw)
                    self.assertEqual(req["signature"], want)
                    self.assertEqual(req["timestamp"], v["timestamp"])

    def test_duplicate_keys_detected_locally(self):
        with self.assertRaises(wp.DuplicateKeyError):
            wp.loads_strict(b'{"a":1,"a":2}')


# ==========================================================================
# Daemon-backed tests
# ==========================================================================

@unittest.skipUnless(HAVE_BIN, SKIP_MSG)
class DaemonCase(unittest.TestCase):
    daemon: wp.DevDaemon = None

    @classmethod
    def setUpClass(cls):
        cls.daemon = wp.DevDaemon(WARDEN_BIN)
        cls.addClassCleanup(cls._stop_daemon)
        cls.key = cls.daemon.hmac_key()
        cls.sock = cls.daemon.socket_path

    @classmethod
    def _stop_daemon(cls):
        if cls.daemon is not None:
            cls.daemon.stop()
            shutil.rmtree(cls.daemon.tmp, ignore_errors=True)
            cls.daemon = None

    # ---- helpers -------------------------------------------------------
    def conn(self, framing="lp", timeout=5.0) -> wp.Connection:
        c = wp.Connection(self.sock, framing, timeout)
        self.addCleanup(c.close)
        return c

    def lumo(self, command="system.ping", framing="lp", **kw) -> dict:
        kw.setdefault("key", self.key)
        c = self.conn(framing)
        return c.request(wp.lumo_request(command, **kw))

    def assertLumoOk(self, reply):
        self.assertIs(reply.get("success"), True, _shape(reply))
        self.assertIsInstance(reply.get("request_id"), str, _shape(reply))
        self.assertNotIn("error", reply, _shape(reply))

    def assertLumoError(self, reply, code):
        self.assertIs(reply.get("success"), False, _shape(reply))
        self.assertIsInstance(reply.get("error"), dict, _shape(reply))
        self.assertEqual(reply["error"].get("code"), code, _shape(reply))
        self.assertIsInstance(reply["error"].get("message"), str, _shape(reply))

    def assertSdOk(self, reply) -> dict:
        self.assertEqual(reply.get("status"), "ok", _shape(reply))
        data = reply.get("data")
        self.assertIsInstance(data, dict, _shape(reply))
        return data

    def assertSdError(self, reply, code):
        self.assertEqual(reply.get("status"), "error", _shape(reply))
        self.assertIsInstance(reply.get("error"), dict, _shape(reply))
        if isinstance(code, str):
            self.assertEqual(reply["error"].get("code"), code, _shape(reply))
        else:
            self.assertIn(reply["error"].get("code"), code, _shape(reply))
        self.assertIsInstance(reply["error"].get("message"), str, _shape(reply))

    def sd(self, action, framing="nl", **kw) -> dict:
        c = self.conn(framing)
        return c.request(wp.sd_request(action, **kw))

    def token(self, framing="nl") -> str:
        data = self.assertSdOk(self.sd("auth", framing))
        self.assertIsInstance(data.get("token"), str)
        self.assertTrue(data["token"])
        return data["token"]


# --------------------------------------------------------------------------
# 2. Lumo dialect
# --------------------------------------------------------------------------

class TestLumo(DaemonCase):
    def test_key_file_permissions(self):
        st = os.stat(self.daemon.info["WARDEN_HMAC_KEY_FILE"])
        self.assertEqual(st.st_mode & 0o077, 0, oct(st.st_mode))
        self.assertGreater(len(self.key), 0)

    def _check_ping(self, reply):
        self.assertLumoOk(reply)
        data = reply.get("data")
        self.assertIsInstance(data, dict, _shape(reply))
        self.assertIs(data.get("pong"), True, _shape(reply))
        self.assertIn("request_id", data, _shape(reply))
        self.assertIn("timestamp", data, _shape(reply))

    def test_ping_length_prefixed(self):
        self._check_ping(self.lumo(framing="lp"))

    def test_ping_newline(self):
        self._check_ping(self.lumo(framing="nl"))

    def test_ping_several_on_one_connection_both_framings(self):
        for framing in ("lp", "nl"):
            with self.subTest(framing=framing):
                c = self.conn(framing)
                for _ in range(3):
                    self._check_ping(c.request(wp.lumo_request("system.ping", key=self.key)))

    def test_signature_forms(self):
        # params whose as-sent bytes differ from the canonical encoding
        raw = '{ "zeta" : 1, "alpha" : {"y":[{"b":2,"a":1}], "x":"\u00e9/\\u00fc"} }'
        self.assertNotEqual(raw, wp.canonical_from_text(raw))
        for framing in ("lp", "nl"):
            for form in ("canonical", "as_sent"):
                for upper in (False, True):
                    with self.subTest(framing=framing, form=form, upper=upper):
                        self._check_ping(self.lumo(framing=framing, params_raw=raw,
                                                   form=form, uppercase=upper))

    def test_signature_over_neither_form_refused(self):
        raw = '{"b":1,"a":2}'
        ts, nonce = int(time.time()), wp.new_nonce()
        # sign a *different* encoding (pretty-printed) -> matches neither accepted form
        sig = wp.sign(self.key, "system.ping", '{"b": 1, "a": 2}', ts, nonce)
        self.assertLumoError(self.lumo(params_raw=raw, signature=sig, timestamp=ts, nonce=nonce),
                             "AUTH_ERROR")

    def test_uppercase_hex(self):
        self._check_ping(self.lumo(uppercase=True))

    def test_replayed_nonce(self):
        nonce = wp.new_nonce()
        req = wp.lumo_request("system.ping", key=self.key, nonce=nonce)
        c1 = self.conn("lp")
        self._check_ping(c1.request(req))
        # same bytes again: on the same connection and on a new one, in both framings
        self.assertLumoError(c1.request(req), "AUTH_ERROR")
        self.assertLumoError(self.conn("lp").request(req), "AUTH_ERROR")
        self.assertLumoError(self.conn("nl").request(req), "AUTH_ERROR")
        # a fresh nonce still works afterwards on the same connection
        self._check_ping(c1.request(wp.lumo_request("system.ping", key=self.key)))

    def test_timestamps(self):
        now = int(time.time())
        for ts in (now - 120, now + 120, 0):
            with self.subTest(ts_offset=ts - now):
                self.assertLumoError(self.lumo(timestamp=ts), "AUTH_ERROR")
        for off in (-30, 30):
            with self.subTest(ts_offset=off):
                self._check_ping(self.lumo(timestamp=now + off))

    def test_bad_signature_does_not_burn_nonce(self):
        # nonce is stored only after the signature verifies: a refused bad-key
        # request must not burn the nonce.
        nonce = wp.new_nonce()
        self.assertLumoError(self.lumo(key=b"not-the-key", nonce=nonce), "AUTH_ERROR")
        self._check_ping(self.lumo(nonce=nonce))

    def test_wrong_key(self):
        self.assertLumoError(self.lumo(key=self.key + b"x"), "AUTH_ERROR")
        self.assertLumoError(self.lumo(key=b"warden-test-vector-key", framing="nl"), "AUTH_ERROR")

    def test_unsigned(self):
        for framing in ("lp", "nl"):
            with self.subTest(framing=framing, what="no signature field"):
                self.assertLumoError(self.lumo(framing=framing, omit_signature=True), "AUTH_ERROR")
            with self.subTest(framing=framing, what="empty signature"):
                self.assertLumoError(self.lumo(framing=framing, signature=""), "AUTH_ERROR")
            with self.subTest(framing=framing, what="non-hex signature"):
                self.assertLumoError(self.lumo(framing=framing, signature="zz" * 32), "AUTH_ERROR")

    def test_unknown_extra_fields_ignored(self):
        self._check_ping(self.lumo(extra={"client": "py-test", "x_extra": [1, 2]}))

    def test_metrics(self):
        c = self.conn("lp")
        r1 = c.request(wp.lumo_request("system.metrics", key=self.key))
        self.assertLumoOk(r1)
        d = r1.get("data")
        self.assertIsInstance(d, dict, _shape(r1))
        for f in ("uptime_seconds", "requests_total", "requests_failed",
                  "active_connections", "nonce_store_size", "version"):
            self.assertIn(f, d, _shape(r1))
        for f in ("uptime_seconds", "requests_total", "requests_failed",
                  "active_connections", "nonce_store_size"):
            self.assertIsInstance(d[f], (int, float), f)
            self.assertNotIsInstance(d[f], bool, f)
            self.assertGreaterEqual(d[f], 0, f)
        self.assertIsInstance(d["version"], str)
        self.assertGreaterEqual(d["active_connections"], 1)
        self.assertGreaterEqual(d["nonce_store_size"], 1)
        # one more authenticated request, then metrics again
        c.request(wp.lumo_request("system.ping", key=self.key))
        r2 = c.request(wp.lumo_request("system.metrics", key=self.key))
        self.assertLumoOk(r2)
        self.assertGreater(r2["data"]["requests_total"], d["requests_total"], _shape(r2))
        self.assertGreaterEqual(r2["data"]["nonce_store_size"], d["nonce_store_size"] + 1)

    def test_unknown_command(self):
        r = self.lumo(command="system.no_such_command")
        self.assertIs(r.get("success"), False, _shape(r))
        self.assertEqual(r["error"]["code"], "VALIDATION_ERROR", _shape(r))


# --------------------------------------------------------------------------
# 3. securityd dialect
# --------------------------------------------------------------------------

class TestSecurityd(DaemonCase):
    def _health(self, reply):
        d = self.assertSdOk(reply)
        for f in ("daemon", "version", "uptime_seconds", "secrets_loaded",
                  "active_sessions", "last_access"):
            self.assertIn(f, d, _shape(reply))
        return d

    def test_health_without_token_both_framings(self):
        for framing in ("nl", "lp"):
            with self.subTest(framing=framing):
                self._health(self.sd("health", framing))

    def test_auth_both_framings(self):
        for framing in ("nl", "lp"):
            with self.subTest(framing=framing):
                d = self.assertSdOk(self.sd("auth", framing,
                                            params={"pid": 1, "exe": "/bin/false", "cmdline": "x"}))
                self.assertIsInstance(d.get("token"), str)
                self.assertTrue(d["token"])
                self.assertIsInstance(d.get("expires_at"), str)
                self.assertRegex(d["expires_at"], RFC3339)
                self.assertIsInstance(d.get("allowed_secrets"), list, _shape(d))

    def test_call_without_token(self):
        for framing in ("nl", "lp"):
            for action in ("system.ping", "system.metrics", "daemon.status",
                           "refresh", "auth.refresh", "logout", "auth.logout"):
                with self.subTest(framing=framing, action=action):
                    self.assertSdError(self.sd(action, framing), "AUTH_REQUIRED")

    def test_bogus_token(self):
        self.assertSdError(self.sd("system.ping", token="not-a-real-token"), "AUTH_INVALID")

    def test_token_works(self):
        for framing in ("nl", "lp"):
            with self.subTest(framing=framing):
                t = self.token(framing)
                self.assertSdOk(self.sd("system.ping", framing, token=t))
                self.assertSdOk(self.sd("daemon.status", framing, token=t))
                self.assertSdOk(self.sd("system.metrics", framing, token=t))

    def test_refresh(self):
        for framing in ("nl", "lp"):
            with self.subTest(framing=framing):
                old = self.token(framing)
                d = self.assertSdOk(self.sd("refresh", framing, token=old))
                new = d.get("token")
                self.assertIsInstance(new, str)
                self.assertNotEqual(new, old)
                self.assertRegex(d.get("expires_at", ""), RFC3339)
                self.assertSdOk(self.sd("system.ping", framing, token=new))
                self.assertSdError(self.sd("system.ping", framing, token=old), "AUTH_INVALID")
                self.assertSdError(self.sd("refresh", framing, token=old), "AUTH_INVALID")

    def test_logout(self):
        for framing in ("nl", "lp"):
            with self.subTest(framing=framing):
                t = self.token(framing)
                d = self.assertSdOk(self.sd("logout", framing, token=t))
                self.assertIn("message", d)
                self.assertSdError(self.sd("system.ping", framing, token=t), SD_AUTH_CODES)
                self.assertSdError(self.sd("daemon.status", framing, token=t), SD_AUTH_CODES)
                self.assertSdError(self.sd("refresh", framing, token=t), SD_AUTH_CODES)

    def test_dotted_aliases(self):
        self._health(self.sd("system.health"))
        d = self.assertSdOk(self.sd("auth.login"))
        t = d["token"]
        d2 = self.assertSdOk(self.sd("auth.refresh", token=t))
        t2 = d2["token"]
        self.assertSdOk(self.sd("daemon.status", token=t2))
        self.assertSdOk(self.sd("auth.logout", token=t2))
        self.assertSdError(self.sd("daemon.status", token=t2), SD_AUTH_CODES)

    def _skip_if_unknown(self, reply, action):
        err = reply.get("error") or {}
        if err.get("code") == "VALIDATION_ERROR" and "unknown method" in str(err.get("message")):
            self.skipTest(f"daemon does not implement securityd action `{action}` yet: {_shape(reply)}")

    def test_secret_actions_need_token(self):
        for action in ("list_secrets", "get_secret", "get_secrets"):
            with self.subTest(action=action):
                r = self.sd(action)
                self._skip_if_unknown(r, action)
                self.assertSdError(r, "AUTH_REQUIRED")

    def test_list_secrets(self):
        r = self.sd("list_secrets", token=self.token())
        self._skip_if_unknown(r, "list_secrets")
        d = self.assertSdOk(r)
        self.assertIsInstance(d.get("secrets"), list, _shape(d))
        self.assertIn("count", d)

    def test_get_secret_key_in_both_places(self):
        t = self.token()
        name = "no-such-secret-" + uuid.uuid4().hex[:8]
        r1 = self.sd("get_secret", token=t, params={"key": name})
        self._skip_if_unknown(r1, "get_secret")
        r2 = self.sd("get_secret", token=t, key=name)
        self.assertSdError(r1, "SECRET_NOT_FOUND")
        self.assertSdError(r2, "SECRET_NOT_FOUND")

    def test_one_connection_per_request_client(self):
        p = self.sock
        self._health(wp.one_shot_line(p, wp.sd_request("health")))
        d = self.assertSdOk(wp.one_shot_line(p, wp.sd_request("auth")))
        t = d["token"]
        self.assertSdOk(wp.one_shot_line(p, wp.sd_request("daemon.status", token=t)))
        # variant: client half-closes after its line (nc -U / socat style)
        self._health(wp.one_shot_line(p, wp.sd_request("health"), shut_wr=True))
        self.assertSdOk(wp.one_shot_line(p, wp.sd_request("daemon.status", token=t), shut_wr=True))
        # many short-lived connections in a row
        for _ in range(20):
            self._health(wp.one_shot_line(p, wp.sd_request("health")))

    def test_many_requests_one_connection(self):
        c = self.conn("nl")
        t = self.assertSdOk(c.request(wp.sd_request("auth")))["token"]
        for _ in range(5):
            self.assertSdOk(c.request(wp.sd_request("system.ping", token=t)))
            self._health(c.request(wp.sd_request("health")))


# --------------------------------------------------------------------------
# 4. warden dialect: ids, pipelining
# --------------------------------------------------------------------------

class TestWardenDialect(DaemonCase):
    def _pipeline(self, framing, n=50):
        c = self.conn(framing, timeout=10)
        t = self.assertSdOk(c.request(wp.sd_request("auth")))["token"]
        ids = [(i if i % 2 else f"req-{i}") for i in range(n)]
        c.send_raw(b"".join(c.encode(wp.sd_request("system.ping", token=t, id=i)) for i in ids))
        seen = []
        for _ in range(n):
            r = c.recv()
            self.assertEqual(r.get("status"), "ok", _shape(r))
            self.assertIn("id", r, _shape(r))
            seen.append(r["id"])
        # ids echoed with their JSON type (number stays number, string stays string)
        self.assertCountEqual([json.dumps(x) for x in seen], [json.dumps(x) for x in ids])

    def test_50_pipelined_pings_length_prefixed(self):
        self._pipeline("lp")

    def test_50_pipelined_pings_newline(self):
        self._pipeline("nl")

    def test_id_echoed_on_error(self):
        c = self.conn("lp")
        r = c.request(wp.sd_request("system.ping", id="e-1"))
        self.assertSdError(r, "AUTH_REQUIRED")
        self.assertEqual(r.get("id"), "e-1", _shape(r))

    def test_no_id_no_id(self):
        r = self.sd("health", "lp")
        self.assertEqual(r.get("status"), "ok", _shape(r))
        self.assertNotIn("id", r, _shape(r))


# --------------------------------------------------------------------------
# 5. Unparsable frames
# --------------------------------------------------------------------------

class TestBadFrames(DaemonCase):
    def _ping_other(self, other: wp.Connection):
        r = other.request(wp.lumo_request("system.ping", key=self.key))
        self.assertLumoOk(r)

    def _bad(self, framing, raw: bytes, shape: str, shut_wr=False):
        other = self.conn("lp")
        self._ping_other(other)
        c = self.conn(framing)
        try:
            c.send_raw(raw)
            if shut_wr:
                c.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon may close before taking all of an oversized frame
        r = c.recv()
        if shape == "lumo":
            self.assertLumoError(r, "VALIDATION_ERROR")
        else:
            self.assertSdError(r, "VALIDATION_ERROR")
        self.assertTrue(c.at_eof(3.0), "connection not closed after bad frame")
        self._ping_other(other)  # the other connection keeps working
        return r

    @staticmethod
    def lp(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    def test_not_json_length_prefixed(self):
        self._bad("lp", self.lp(b"hello, not json"), "lumo")

    def test_not_json_newline(self):
        self._bad("nl", b"{this is not json\n", "securityd")

    def test_invalid_utf8_length_prefixed(self):
        self._bad("lp", self.lp(b'{"command":"system.ping\xff\xfe","params":{}}'), "lumo")

    def test_invalid_utf8_newline(self):
        self._bad("nl", b'{"action":"health","x":"\xc3\x28"}\n', "securityd")

    def test_oversized_length_prefix(self):
        self._bad("lp", struct.pack(">I", 2 * 1024 * 1024) + b'{"command":', "lumo")

    def test_oversized_line(self):
        line = b'{"action":"health","pad":"' + b"a" * (1024 * 1024 + 100) + b'"}\n'
        self._bad("nl", line, "securityd")

    def test_duplicate_keys_lumo(self):
        ts, nonce = int(time.time()), wp.new_nonce()
        sig = wp.sign(self.key, "system.ping", "{}", ts, nonce)
        raw = (b'{"command":"system.ping","command":"system.ping","params":{},"timestamp":%d,'
               b'"nonce":"%s","signature":"%s"}' % (ts, nonce.encode(), sig.encode()))
        self._bad("lp", self.lp(raw), "lumo")

    def test_duplicate_keys_nested_params(self):
        ts, nonce = int(time.time()), wp.new_nonce()
        params = '{"a":1,"a":2}'
        sig = wp.sign(self.key, "system.ping", params, ts, nonce)
        raw = wp.lumo_request("system.ping", params_raw=params, signature=sig, timestamp=ts, nonce=nonce)
        self._bad("lp", self.lp(raw), "lumo")

    def test_duplicate_keys_securityd_newline(self):
        self._bad("nl", b'{"action":"health","action":"health"}\n', "securityd")

    def test_truncated_length_prefixed(self):
        self._bad("lp", struct.pack(">I", 100) + b'{"command":"sys', "lumo", shut_wr=True)

    def test_not_an_object(self):
        self._bad("lp", self.lp(b"[1,2,3]"), "lumo")


# --------------------------------------------------------------------------
# 6. Audit log: chain intact, replay recorded as denied
# --------------------------------------------------------------------------

@unittest.skipUnless(HAVE_BIN, SKIP_MSG)
class TestAudit(unittest.TestCase):
    def setUp(self):
        self.daemon = wp.DevDaemon(WARDEN_BIN)
        self.addCleanup(shutil.rmtree, self.daemon.tmp, True)

    def tearDown(self):
        self.daemon.stop()

    def test_audit_chain_and_replay_denied(self):
        d = self.daemon
        key = d.hmac_key()
        replay_nonce = wp.new_nonce()
        req = wp.lumo_request("system.ping", key=key, nonce=replay_nonce)
        with d.connect("lp") as c:
            self.assertIs(c.request(req)["success"], True)
            r = c.request(req)
            self.assertEqual(r["error"]["code"], "AUTH_ERROR")
            replay_rid = r.get("request_id")
            c.request(wp.lumo_request("system.metrics", key=key))
        with d.connect("nl") as c:
            t = c.request(wp.sd_request("auth"))["data"]["token"]
            c.request(wp.sd_request("system.ping", token=t))
            c.request(wp.sd_request("daemon.status"))          # AUTH_REQUIRED
        with d.connect("nl") as c:
            c.send_raw(b"{garbage\n")
            c.recv()
        rc = d.stop()
        self.assertEqual(rc, 0, "SIGTERM exit status; stderr tail: " + d.stderr_text()[-1500:])

        with open(d.audit_log, "rb") as f:
            raw_lines = [ln for ln in f.read().split(b"\n") if ln]
        self.assertGreaterEqual(len(raw_lines), 6)
        recs = [wp.loads_strict(ln) for ln in raw_lines]
        for i, rec in enumerate(recs):
            for fld in ("method", "result", "code", "seq", "prev", "principal"):
                self.assertIn(fld, rec, f"line {i}: {rec}")
            self.assertIn(rec["result"], ("ok", "denied", "error"), rec)
            self.assertIn("uid", rec["principal"], rec)
        # seq strictly increasing by one; prev is sha256 of the previous line
        for i in range(1, len(recs)):
            self.assertEqual(recs[i]["seq"], recs[i - 1]["seq"] + 1, (recs[i - 1], recs[i]))
            self.assertEqual(recs[i]["prev"], hashlib.sha256(raw_lines[i - 1]).hexdigest(),
                             f"line {i}: prev is not sha256 of line {i - 1}")

        denied_pings = [r for r in recs if r["result"] == "denied" and r["method"] == "system.ping"]
        self.assertTrue(denied_pings, "no denied system.ping record for the replay:\n"
                        + "\n".join(json.dumps(r) for r in recs))
        self.assertEqual(denied_pings[0]["principal"]["uid"], os.getuid())
        if "request_id" in recs[0]:
            mine = [x for x in recs if x.get("request_id") == replay_rid]
            self.assertEqual(len(mine), 1, f"audit records for replay request_id {replay_rid}")
            self.assertEqual((mine[0]["method"], mine[0]["result"]), ("system.ping", "denied"), mine[0])
        oks = [r for r in recs if r["result"] == "ok" and r["method"] == "system.ping"]
        self.assertTrue(oks)

        v = d.cli("audit", "verify", d.audit_log)
        self.assertEqual(v.returncode, 0, f"audit verify: {v.stdout!r} {v.stderr!r}")

        # tamper with a copy: flip "ok" -> "denied" in the first ok record
        tampered = os.path.join(d.tmp, "tampered.log")
        idx = next(i for i, r in enumerate(recs) if r["result"] == "ok")
        rec = dict(recs[idx], result="denied")
        lines = list(raw_lines)
        lines[idx] = json.dumps(rec, separators=(",", ":")).encode()
        with open(tampered, "wb") as f:
            f.write(b"\n".join(lines) + b"\n")
        v2 = d.cli("audit", "verify", tampered)
        self.assertNotEqual(v2.returncode, 0, "audit verify accepted a tampered log")
        # truncation of the last line is not something verify can always detect;
        # deleting a middle line must be
        cut = os.path.join(d.tmp, "cut.log")
        with open(cut, "wb") as f:
            f.write(b"\n".join(raw_lines[:2] + raw_lines[3:]) + b"\n")
        v3 = d.cli("audit", "verify", cut)
        self.assertNotEqual(v3.returncode, 0, "audit verify accepted a log with a line removed")


if __name__ == "__main__":
    unittest.main(verbosity=2)
