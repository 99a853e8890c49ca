"""
End-to-end tests of the twistd plugin and of balancer.tac, in real twistd
processes: what an operator sees when starting, misconfiguring and stopping
the balancer.

These tests start subprocesses and wait for them with bounded polling;
they listen on 127.0.0.1 only.
"""

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import TestCase

from rrbalancer.tap import Options

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAC = os.path.join(REPOSITORY, "balancer.tac")

# How long a twistd process may take to start, answer or stop.
STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
RUN_TIMEOUT = 30.0
POLL_STEP = 0.1

if not hasattr(signal, "SIGTERM") or sys.platform == "win32":  # pragma: no cover
    skipReason = "twistd process tests need POSIX signals"
else:
    skipReason = None


def twistdCommand():
    """
    The twistd of the Python running the tests: the script installed next
    to it, or the same entry point run with C{-c}.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [sys.executable, script]
    return [
        sys.executable,
        "-c",
        "import sys; sys.argv[0] = 'twistd'; "
        "from twisted.scripts.twistd import run; run()",
    ]


def noAdmin():
    """
    Command-line flags that keep the admin listener (if this version has
    one) off, so that tests do not fight over its default port.
    """
    return ["--admin", "none"] if "admin" in Options() else []


def noAdminTOML():
    return 'admin = "none"\n'


def get(port, path="/"):
    """
    One GET to the balancer: (status, body), with a bounded wait.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


class TwistdMixin:
    def setUp(self):
        self.cwd = os.path.abspath(self.mktemp())
        os.makedirs(self.cwd)
        self.env = dict(os.environ)
        self.env.pop("RRBALANCER_CONFIG", None)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [REPOSITORY]
            + [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        self.env["PYTHONUNBUFFERED"] = "1"

    def twistd(self, *args, env=None):
        """
        Run twistd to its end: (exit status, stdout, stderr).
        """
        result = subprocess.run(
            twistdCommand() + list(args),
            cwd=self.cwd,
            env=env or self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=RUN_TIMEOUT,
        )
        return (
            result.returncode,
            result.stdout.decode("utf-8", "replace"),
            result.stderr.decode("utf-8", "replace"),
        )

    def plugin(self, *args, env=None):
        return self.twistd("-n", "--pidfile=", "rrbalancer", *args, env=env)

    def assertOneLineError(self, result, *mentions):
        """
        twistd failed, with exactly one line on standard error, starting
        with "rrbalancer:" and naming the problem, and no traceback in any
        of its output.
        """
        code, out, err = result
        context = f"\nexit status: {code}\nstdout:\n{out}\nstderr:\n{err}"
        self.assertNotEqual(code, 0, context)
        self.assertNotIn("Traceback", out + err, context)
        lines = err.splitlines()
        self.assertEqual(len(lines), 1, context)
        self.assertTrue(lines[0].startswith("rrbalancer: "), context)
        for word in mentions:
            self.assertIn(word, lines[0], context)
        self.assertNotIn("Usage:", out + err, context)
        return lines[0]

    def writeConfig(self, text, name="balancer.toml"):
        path = os.path.join(self.cwd, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def busyPort(self):
        """
        A port on 127.0.0.1 that this test holds for its duration.
        """
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        return s.getsockname()[1]

    def start(self, *args, env=None, command=None):
        """
        Start twistd in the background; it is killed at the end of the test
        if it is still running.  Its output goes to files (a pipe nobody
        reads could fill up and block it).

        @param command: what runs C{args} (by default, twistd).
        """
        out = open(os.path.join(self.cwd, "twistd.out"), "w+b")
        err = open(os.path.join(self.cwd, "twistd.err"), "w+b")
        self.addCleanup(out.close)
        self.addCleanup(err.close)
        process = subprocess.Popen(
            (twistdCommand() if command is None else command) + list(args),
            cwd=self.cwd,
            env=env or self.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
        process.outFile = out
        process.errFile = err

        def kill():
            if process.poll() is None:
                process.kill()
                process.wait(STOP_TIMEOUT)

        self.addCleanup(kill)
        return process

    def output(self, process):
        texts = []
        for f in (process.outFile, process.errFile):
            f.flush()
            f.seek(0)
            texts.append(f.read().decode("utf-8", "replace"))
        return texts

    def describe(self, process):
        out, err = self.output(process)
        return f"\nexit status: {process.poll()}\nstdout:\n{out}\nstderr:\n{err}"

    def waitUntilServing(self, process, port):
        """
        Poll, for a bounded time, until the balancer answers on C{port}.
        """
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.poll() is not None:
                self.fail("twistd exited before serving" + self.describe(process))
            try:
                return get(port)
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.fail(
                    f"nothing answered on port {port} within {STARTUP_TIMEOUT}s"
                    + self.describe(process)
                )
            time.sleep(POLL_STEP)

    def listeningPort(self, process, role="client", count=1):
        """
        The port the balancer's listener reports in its log (it listens on
        port 0), once the balancer says it is ready, polled for a bounded
        time.
        """
        deadline = time.monotonic() + STARTUP_TIMEOUT
        pattern = re.compile(role + r" listener on 127\.0\.0\.1:(\d+)")
        while True:
            out, err = self.output(process)
            found = pattern.findall(out + err)
            # Signals are handled as documented once it says it is ready.
            if len(found) >= count and len(re.findall(r"\bready\b", out + err)) >= count:
                return int(found[-1])
            if process.poll() is not None or time.monotonic() > deadline:
                self.fail("no listener in the log" + self.describe(process))
            time.sleep(POLL_STEP)

    def waitForLog(self, process, text, count=1):
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            out, err = self.output(process)
            if (out + err).count(text) >= count:
                return
            if process.poll() is not None or time.monotonic() > deadline:
                self.fail(f"{text!r} not in the log" + self.describe(process))
            time.sleep(POLL_STEP)

    def assertStopsCleanly(self, process, how=signal.SIGTERM):
        """
        On C{how}, twistd stops within a bounded time, with status 0 and no
        traceback.
        """
        process.send_signal(how)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail(f"twistd still running {STOP_TIMEOUT}s after {how!r}" + self.describe(process))
        context = self.describe(process)
        self.assertEqual(process.returncode, 0, context)
        out, err = self.output(process)
        self.assertNotIn("Traceback", out + err, context)

    def assertDemoRotation(self, process, port):
        """
        Three requests in a row are answered by the three demo backends.
        """
        status, body = self.waitUntilServing(process, port)
        self.assertEqual(status, 200, body)
        names = set()
        for _ in range(3):
            status, body = get(port)
            self.assertEqual(status, 200, body)
            match = re.search(r"demo backend (\d+)", body)
            self.assertIsNotNone(match, body)
            names.add(match.group(1))
        self.assertEqual(names, {"1", "2", "3"}, self.describe(process))


class PluginTests(TwistdMixin, TestCase):
    skip = skipReason

    def test_helpListsPlugin(self):
        """
        twistd finds the plugin and lists it among its commands.
        """
        code, out, err = self.twistd("--help")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"(?m)^\s+rrbalancer\s+\S")

    def test_pluginHelp(self):
        code, out, err = self.plugin("--help")
        self.assertEqual(code, 0, err)
        self.assertIn("--backend", out)
        self.assertIn("--health-interval", out)

    def test_unknownOption(self):
        self.assertOneLineError(self.plugin("--bogus"), "--bogus")

    def test_badValue(self):
        self.assertOneLineError(
            self.plugin("--backend", "http://127.0.0.1:1", "--health-interval", "0"),
            "health.interval",
        )
        self.assertOneLineError(
            self.plugin("--backend", "ftp://127.0.0.1:1"), "backend", "ftp://"
        )

    def test_badValueInConfigFile(self):
        path = self.writeConfig('backend = "http://127.0.0.1:1"\n[health]\nfall = 0\n')
        self.assertOneLineError(self.plugin("--config", path), "health.fall")

    def test_missingConfigFile(self):
        self.assertOneLineError(
            self.plugin("--config", "missing.toml"), "no such file", "missing.toml"
        )

    def test_noBackend(self):
        self.assertOneLineError(self.plugin(), "backend", "--demo")

    def test_badEndpoint(self):
        """
        A malformed endpoint description is only found when the service is
        built; it still ends with one line.
        """
        self.assertOneLineError(
            self.plugin(*noAdmin(), "--backend", "http://127.0.0.1:1", "--port", "nosuch:80"),
            "port",
            "nosuch:80",
        )

    def test_portInUse(self):
        port = self.busyPort()
        description = f"tcp:{port}:interface=127.0.0.1"
        self.assertOneLineError(
            self.plugin(
                *noAdmin(),
                "--no-health-checks",
                "--backend", "http://127.0.0.1:1",
                "--port", description,
            ),
            "cannot listen",
            description,
        )

    def test_demo(self):
        """
        --demo serves from three backends in turn, and SIGTERM stops it
        cleanly with status 0.
        """
        process = self.start(
            "-n", "--pidfile=", "rrbalancer", "--demo", *noAdmin(),
            "--port", "tcp:0:interface=127.0.0.1",
        )
        self.assertDemoRotation(process, self.listeningPort(process))
        self.assertStopsCleanly(process, signal.SIGTERM)

    def test_demoInterrupted(self):
        """
        SIGINT (Ctrl-C) stops it cleanly too.
        """
        process = self.start(
            "-n", "--pidfile=", "rrbalancer", "--demo", *noAdmin(),
            "--port", "tcp:0:interface=127.0.0.1",
        )
        self.waitUntilServing(process, self.listeningPort(process))
        self.assertStopsCleanly(process, signal.SIGINT)


class TacTests(TwistdMixin, TestCase):
    skip = skipReason

    def tacEnv(self, path):
        env = dict(self.env)
        env["RRBALANCER_CONFIG"] = path
        return env

    def test_serves(self):
        """
        twistd -ny balancer.tac runs the balancer RRBALANCER_CONFIG
        describes, and stops on SIGTERM with status 0.
        """
        path = self.writeConfig(
            'demo = true\nport = ["tcp:0:interface=127.0.0.1"]\n'
            + noAdminTOML()
            + "[health]\ninterval = 0.5\n"
        )
        process = self.start("-n", "--pidfile=", "-y", TAC, env=self.tacEnv(path))
        self.assertDemoRotation(process, self.listeningPort(process))
        self.assertStopsCleanly(process, signal.SIGTERM)

    def test_invalidConfig(self):
        path = self.writeConfig('demo = true\n[health]\ninterval = -1\n')
        self.assertOneLineError(
            self.twistd("-n", "--pidfile=", "-y", TAC, env=self.tacEnv(path)),
            "health.interval",
        )

    def test_missingConfig(self):
        path = os.path.join(self.cwd, "missing.toml")
        self.assertOneLineError(
            self.twistd("-n", "--pidfile=", "-y", TAC, env=self.tacEnv(path)),
            "no such file",
        )

    def test_portInUse(self):
        port = self.busyPort()
        path = self.writeConfig(
            f'demo = true\nport = ["tcp:{port}:interface=127.0.0.1"]\n'
            + noAdminTOML()
            + "[health]\nenabled = false\n"
        )
        self.assertOneLineError(
            self.twistd("-n", "--pidfile=", "-y", TAC, env=self.tacEnv(path)),
            "cannot listen",
            str(port),
        )


class CheckTests(TwistdMixin, TestCase):
    """
    C{--check}, as a deploy script runs it before a reload.
    """

    def test_valid(self):
        path = self.writeConfig(
            'port = ["tcp:8000:interface=127.0.0.1", "unix:rr.sock"]\n'
            'backend = ["http://127.0.0.1:8081", "http://127.0.0.1:8082"]\n'
        )
        code, out, err = self.plugin("--check", "--config", path)
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(
            out.strip(), "rrbalancer: configuration OK (2 backends, 3 listeners)"
        )
        self.assertFalse(os.path.exists(os.path.join(self.cwd, "rr.sock")))

    def test_nothingBound(self):
        """
        A port already taken is not a configuration mistake: nothing is
        bound by a check.
        """
        port = self.busyPort()
        code, out, err = self.plugin(
            "--check", "--backend", "http://127.0.0.1:1", "--admin", "none",
            "--port", f"tcp:{port}:interface=127.0.0.1",
        )
        self.assertEqual(code, 0, out + err)
        self.assertIn("(1 backend, 1 listener)", out)

    def test_discoveryOnly(self):
        """
        Discovery sources without a backend are a valid configuration; a
        check asks no DNS server.
        """
        code, out, err = self.plugin(
            "--check", "--admin", "none", "--port", "tcp:8000:interface=127.0.0.1",
            "--discover", "dns+srv://_http._tcp.example.com",
            "--discover", "dns+a://web.example.com:8080",
            "--dns-server", "192.0.2.53",
        )
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(
            out.strip(),
            "rrbalancer: configuration OK (0 backends, 2 discovery sources, 1 listener)",
        )

    def test_badDiscovery(self):
        for args, mention in [
            (["--discover", "consul://127.0.0.1:8500/web"], "unknown scheme"),
            (["--discover", "dns+a://web.example.com"], "port"),
            (["--discover", "dns+a://web_.example..com:80"], "empty label"),
        ]:
            self.assertOneLineError(self.plugin("--check", *args), mention)

    def test_invalid(self):
        for args, mention in [
            (["--port", "tcp:nope"], "bad endpoint"),
            (["--admin-token-file", "missing.token"], "admin_token_file"),
            (["--workers", "2", "--port", "ssl:8443"], "cannot be shared"),
            (["--backend", "http://127.0.0.1:1"], "listed twice"),
        ]:
            result = self.plugin("--check", "--backend", "http://127.0.0.1:1", *args)
            self.assertOneLineError(result, mention)
