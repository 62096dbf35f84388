"""The Python client against the real warden daemon.

    WARDEN_BIN=target/debug/warden python3 -m unittest discover -s clients/python/tests -v

Each test class starts its own daemon (dev mode, or a configuration with short sessions) in a
temporary directory and sets its secrets with the `warden` CLI.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from warden_client import Client, WardenError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
WARDEN_BIN = os.environ.get("WARDEN_BIN", os.path.join(REPO, "target", "debug", "warden"))


class Daemon:
    """`warden daemon run` with its announced environment; stopped by `stop()`."""

    def __init__(self, args, env=None):
        self.dir = tempfile.mkdtemp(prefix="warden-py-")
        self.stderr = open(os.path.join(self.dir, "stderr"), "wb")
        full_env = dict(os.environ, WARDEN_LOG="warn")
        full_env.pop("WARDEN_SOCKET", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen([WARDEN_BIN, "daemon", "run"] + args(self.dir),
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=full_env)
        self.env = {}
        deadline = time.monotonic() + 30
        for line in self.proc.stdout:
            line = line.decode().strip()
            if "=" in line:
                k, v = line.split("=", 1)
                self.env[k] = v
            if line == "WARDEN_READY=1" or time.monotonic() > deadline:
                break
        if "WARDEN_READY" not in self.env:
            self.stop()
            raise RuntimeError("the daemon did not start: %s" % open(self.stderr.name).read())

    @property
    def socket(self):
        return self.env["WARDEN_SOCKET"]

    def cli(self, *args, input=None):
        env = dict(os.environ, WARDEN_SOCKET=self.socket)
        return subprocess.run([WARDEN_BIN] + list(args), input=input, env=env,
                              capture_output=True, timeout=30)

    def set(self, key, value):
        out = self.cli("secrets", "set", key, input=value.encode())
        assert out.returncode == 0, out.stderr

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def dev_daemon():
    return Daemon(lambda d: ["--dev", "--state-dir", os.path.join(d, "state")])


class DevModeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = dev_daemon()
        cls.d.set("db_password", "hunter2")
        cls.d.set("api_token", "tok-\u00e9\u00e8")

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()

    def client(self, **kw):
        c = Client(socket_path=self.d.socket, **kw)
        self.addCleanup(c.close)
        return c

    def test_get_secret_and_missing_secret(self):
        c = self.client()
        self.assertEqual(c.get_secret("db_password"), "hunter2")
        self.assertEqual(c.get_secret("api_token"), "tok-\u00e9\u00e8")
        self.assertIsNone(c.get_secret("no_such_secret"))

    def test_get_secrets_reports_missing_keys(self):
        got = self.client().get_secrets(["db_password", "nope", "api_token"])
        self.assertEqual(got["secrets"], {"db_password": "hunter2", "api_token": "tok-\u00e9\u00e8"})
        self.assertEqual(got["missing"], ["nope"])

    def test_list_secrets_and_is_available(self):
        c = self.client()
        names = c.list_secrets()
        self.assertEqual(names, sorted(names))
        self.assertLessEqual({"api_token", "db_password"}, set(names))
        self.assertTrue(c.is_available())

    def test_socket_from_environment_and_unix_url(self):
        old = os.environ.get("WARDEN_SOCKET")
        os.environ["WARDEN_SOCKET"] = self.d.socket
        try:
            c = Client()
            self.addCleanup(c.close)
            self.assertEqual(c.get_secret("db_password"), "hunter2")
        finally:
            if old is None:
                del os.environ["WARDEN_SOCKET"]
            else:
                os.environ["WARDEN_SOCKET"] = old
        c = Client(url="unix://" + self.d.socket)
        self.addCleanup(c.close)
        self.assertEqual(c.get_secret("db_password"), "hunter2")
        with self.assertRaises(ValueError):
            Client(url="https://warden.example:8443")

    def test_cache_keeps_a_value_for_its_ttl_only(self):
        self.d.set("rotating", "first")
        cached = self.client(cache_ttl=0.6)
        plain = self.client()
        self.assertEqual(cached.get_secret("rotating"), "first")
        self.d.set("rotating", "second")
        self.assertEqual(plain.get_secret("rotating"), "second")
        self.assertEqual(cached.get_secret("rotating"), "first")
        time.sleep(0.8)
        self.assertEqual(cached.get_secret("rotating"), "second")

    def test_a_revoked_token_is_replaced_by_itself(self):
        c = self.client()
        self.assertEqual(c.get_secret("db_password"), "hunter2")
        old = c._token
        # Revoke the client's token behind its back (same process, so same principal).
        other = self.client()
        other._roundtrip("logout", {}, old)
        self.assertEqual(c.get_secret("db_password"), "hunter2")
        self.assertNotEqual(c._token, old)


class RestartTest(unittest.TestCase):
    def test_reads_survive_a_daemon_restart(self):
        state = tempfile.mkdtemp(prefix="warden-py-state-")
        self.addCleanup(shutil.rmtree, state, True)
        d = Daemon(lambda _: ["--dev", "--state-dir", state])
        d.set("k", "kept")
        c = Client(socket_path=d.socket)
        self.addCleanup(c.close)
        self.assertEqual(c.get_secret("k"), "kept")
        d.stop()
        d = Daemon(lambda _: ["--dev", "--state-dir", state])
        self.addCleanup(d.stop)
        # The old connection and token are gone; the client reconnects and logs in again.
        self.assertEqual(c.get_secret("k"), "kept")
        self.assertEqual(c.list_secrets(), ["k"])


class FallbackTest(unittest.TestCase):
    def test_env_fallback_when_the_daemon_is_absent(self):
        os.environ["APP_DB_PASSWORD"] = "from-env"
        self.addCleanup(os.environ.pop, "APP_DB_PASSWORD")
        c = Client(socket_path="/nonexistent/warden.sock", fallback="env",
                   fallback_env_prefix="APP_")
        self.assertFalse(c.is_available())
        self.assertEqual(c.get_secret("db_password"), "from-env")
        self.assertIsNone(c.get_secret("other"))
        self.assertEqual(c.get_secrets(["db_password", "other"]),
                         {"secrets": {"db_password": "from-env"}, "missing": ["other"]})

    def test_no_fallback_raises(self):
        c = Client(socket_path="/nonexistent/warden.sock")
        with self.assertRaises(OSError):
            c.get_secret("db_password")

    def test_callable_fallback_when_the_store_is_sealed(self):
        d = dev_daemon()
        self.addCleanup(d.stop)
        d.set("k", "from-daemon")
        asked = []
        c = Client(socket_path=d.socket, fallback=lambda key: asked.append(key) or "from-file")
        self.addCleanup(c.close)
        self.assertEqual(c.get_secret("k"), "from-daemon")
        self.assertEqual(asked, [])
        out = d.cli("seal")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertFalse(c.is_available())
        self.assertEqual(c.get_secret("k"), "from-file")
        self.assertEqual(asked, ["k"])
        strict = Client(socket_path=d.socket)
        self.addCleanup(strict.close)
        with self.assertRaises(WardenError) as e:
            strict.get_secret("k")
        self.assertEqual(e.exception.code, "DAEMON_LOCKED")


CONFIG = """
[daemon]
pid_file = "{d}/warden.pid"
log_file = "{d}/warden.log"
[socket]
path = "{d}/warden.sock"
[audit]
path = "{d}/audit.log"
[auth]
session_ttl = "1s"
[secrets]
dir = "{d}/secrets"
kdf_memory = "64KiB"
kdf_passes = 1
[rate_limits]
auth = "off"
secrets = "off"
[policy.roles.all]
allow = ["*"]
[[policy.rules]]
uid = {uid}
roles = ["all"]
"""


class ExpiryTest(unittest.TestCase):
    def test_the_client_authenticates_again_when_its_token_expires(self):
        def args(d):
            with open(os.path.join(d, "warden.toml"), "w") as f:
                f.write(CONFIG.format(d=d, uid=os.getuid()))
            pw = os.path.join(d, "master")
            fd = os.open(pw, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b"python test")
            os.close(fd)
            cfg = os.path.join(d, "warden.toml")
            subprocess.run([WARDEN_BIN, "init", "--config", cfg, "--password-file", pw],
                           check=True, capture_output=True)
            return ["--config", cfg, "--master-password-file", pw]

        d = Daemon(args)
        self.addCleanup(d.stop)
        d.env["WARDEN_SOCKET"] = os.path.join(d.dir, "warden.sock")
        d.set("k", "v")
        c = Client(socket_path=d.socket)
        self.addCleanup(c.close)
        self.assertEqual(c.get_secret("k"), "v")
        first = c._token
        time.sleep(1.5)
        # The daemon answers AUTH_EXPIRED to the old token; the client logs in again.
        self.assertEqual(c.get_secret("k"), "v")
        self.assertNotEqual(c._token, first)
        with open(os.path.join(d.dir, "audit.log")) as f:
            log = f.read()
        self.assertIn('"code":"AUTH_EXPIRED"', log)


def _have_wheel():
    try:
        import wheel  # noqa: F401
        return True
    except ImportError:
        return False


class PackagingTest(unittest.TestCase):
    @unittest.skipUnless(_have_wheel(), "pip cannot build without the `wheel` package here")
    def test_pip_installs_the_package(self):
        target = tempfile.mkdtemp(prefix="warden-pip-")
        self.addCleanup(shutil.rmtree, target, True)
        src = os.path.dirname(HERE)
        out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                              "--no-build-isolation", "--no-index", "--target", target, src],
                             capture_output=True, timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr.decode())
        out = subprocess.run([sys.executable, "-c",
                              "import warden_client, sys; print(warden_client.__file__)"],
                             capture_output=True, env=dict(os.environ, PYTHONPATH=target),
                             cwd=target, timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr.decode())
        self.assertTrue(out.stdout.decode().startswith(target), out.stdout)


class RemoteTest(unittest.TestCase):
    """The same calls over the mTLS gateway of a dev daemon (`--listen`)."""

    @classmethod
    def setUpClass(cls):
        cls.d = Daemon(lambda d: ["--dev", "--state-dir", os.path.join(d, "state"),
                                  "--listen", "127.0.0.1:0"])
        cls.d.set("db_password", "hunter2")
        cls.d.set("api_token", "tok-\u00e9\u00e8")

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()

    def client(self, **kw):
        e = self.d.env
        args = dict(url="https://" + e["WARDEN_LISTEN"], cert=e["WARDEN_CLIENT_CERT"],
                    key=e["WARDEN_CLIENT_KEY"], ca=e["WARDEN_CA"])
        args.update(kw)
        c = Client(**args)
        self.addCleanup(c.close)
        return c

    def test_reads_over_the_gateway(self):
        c = self.client()
        self.assertEqual(c.get_secret("db_password"), "hunter2")
        self.assertEqual(c.get_secret("api_token"), "tok-\u00e9\u00e8")
        self.assertIsNone(c.get_secret("no_such_secret"))
        got = c.get_secrets(["db_password", "nope"])
        self.assertEqual(got, {"secrets": {"db_password": "hunter2"}, "missing": ["nope"]})
        self.assertLessEqual({"api_token", "db_password"}, set(c.list_secrets()))
        self.assertTrue(c.is_available())

    def test_a_certificate_the_gateway_does_not_know_is_refused(self):
        # A client certificate of another CA.
        other = tempfile.mkdtemp(prefix="warden-py-pki-")
        self.addCleanup(shutil.rmtree, other, True)
        out = subprocess.run([WARDEN_BIN, "pki", "--dir", other, "init", "--cn", "other"],
                             capture_output=True, timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr)
        out = subprocess.run([WARDEN_BIN, "pki", "--dir", other, "issue", "client", "x"],
                             capture_output=True, timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr)
        c = self.client(cert=os.path.join(other, "issued", "x.pem"),
                        key=os.path.join(other, "issued", "x.key"))
        with self.assertRaises(OSError):
            c.get_secret("db_password")
        self.assertEqual(self.client().get_secret("db_password"), "hunter2")


if __name__ == "__main__":
    unittest.main()
