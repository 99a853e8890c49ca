"""
Tests for L{rrbalancer.tap.Options}: the command line, mapped onto a
L{Config}, and every user mistake ending in one line.
"""

import io
import os
import sys

from twisted.trial.unittest import TestCase

from rrbalancer.config import BackendConfig, HealthConfig
from rrbalancer.tap import Options

BACKEND = ["--backend", "http://127.0.0.1:8081"]


class CapturedOutput:
    """
    Replace sys.stdout and sys.stderr for one test, so that whatever
    the options print can be checked (there should be nothing).
    """

    def __init__(self, testCase):
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        testCase.patch(sys, "stdout", self.stdout)
        testCase.patch(sys, "stderr", self.stderr)


def parse(*argv):
    options = Options()
    options.parseOptions(list(argv))
    return options.config


class OptionsMappingTests(TestCase):
    def test_minimal(self):
        config = parse(*BACKEND)
        self.assertEqual(config.backends, (BackendConfig("http://127.0.0.1:8081"),))
        self.assertEqual(config.ports, ("tcp:8000",))
        self.assertEqual(config.health, HealthConfig())
        self.assertFalse(config.demo)

    def test_portRepeats(self):
        config = parse(
            *BACKEND,
            "--port", "8080",
            "--port", "tcp:8081:interface=127.0.0.1",
            "-p", "8082",
        )
        self.assertEqual(
            config.ports, ("tcp:8080", "tcp:8081:interface=127.0.0.1", "tcp:8082")
        )

    def test_backendRepeats(self):
        config = parse(
            "--backend", "http://127.0.0.1:8081,weight=3",
            "--backend=http://127.0.0.1:8082",
            "-b", "http://127.0.0.1:8083,backup",
        )
        self.assertEqual(
            config.backends,
            (
                BackendConfig("http://127.0.0.1:8081", 3, False),
                BackendConfig("http://127.0.0.1:8082", 1, False),
                BackendConfig("http://127.0.0.1:8083", 1, True),
            ),
        )

    def test_healthFlags(self):
        config = parse(
            *BACKEND,
            "--health-path", "/healthz",
            "--health-interval", "0.5",
            "--health-timeout", "0.25",
            "--rise", "4",
            "--fall", "5",
        )
        self.assertEqual(
            config.health,
            HealthConfig(
                enabled=True,
                path="/healthz",
                interval=0.5,
                timeout=0.25,
                rise=4,
                fall=5,
            ),
        )

    def test_noHealthChecks(self):
        config = parse(*BACKEND, "--no-health-checks")
        self.assertFalse(config.health.enabled)
        self.assertEqual(config.health.path, "/")

    def test_demo(self):
        config = parse("--demo")
        self.assertTrue(config.demo)
        self.assertEqual(config.backends, ())

    def test_otherFlags(self):
        config = parse(
            *BACKEND,
            "--backend-timeout", "12",
            "--connect-timeout", "2.5",
            "--shutdown-grace", "0",
            "--client-timeout", "30",
            "--max-body-size", "1024",
            "--host-header", "backend",
        )
        self.assertEqual(config.backendTimeout, 12.0)
        self.assertEqual(config.connectTimeout, 2.5)
        self.assertEqual(config.shutdownGrace, 0.0)
        self.assertEqual(config.clientTimeout, 30.0)
        self.assertEqual(config.maxBodySize, 1024)
        self.assertEqual(config.hostHeader, "backend")

    def test_hostHeaderDefault(self):
        self.assertEqual(parse(*BACKEND).hostHeader, "client")
        self.assertEqual(parse(*BACKEND, "--host-header", "client").hostHeader, "client")

    def test_accessLogStdout(self):
        self.assertEqual(parse(*BACKEND, "--access-log", "-").accessLog, "-")
        self.assertIsNone(parse(*BACKEND).accessLog)

    def test_accessLogRelativeToWorkingDirectory(self):
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        here = os.getcwd()
        os.chdir(folder)
        self.addCleanup(os.chdir, here)
        self.assertEqual(
            parse(*BACKEND, "--access-log", "access.log").accessLog,
            os.path.join(folder, "access.log"),
        )

    def test_backendCA(self):
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        ca = os.path.join(folder, "ca.pem")
        with open(ca, "w") as f:
            f.write("")
        self.assertEqual(parse(*BACKEND, "--backend-ca", ca).backendCA, ca)


class ConfigFileOptionTests(TestCase):
    def setUp(self):
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.path = os.path.join(self.folder, "balancer.toml")
        with open(self.path, "w") as f:
            f.write(
                'port = ["tcp:8000:interface=127.0.0.1"]\n'
                'host_header = "backend"\n'
                'access_log = "access.log"\n'
                "[health]\n"
                'path = "/ping"\n'
                "interval = 5\n"
                "fall = 4\n"
                "[[backend]]\n"
                'url = "http://127.0.0.1:8081"\n'
                "weight = 2\n"
                "[[backend]]\n"
                'url = "http://127.0.0.1:8082"\n'
                "backup = true\n"
            )

    def test_fileAlone(self):
        config = parse("--config", self.path)
        self.assertEqual(config.ports, ("tcp:8000:interface=127.0.0.1",))
        self.assertEqual(config.hostHeader, "backend")
        self.assertEqual(config.accessLog, os.path.join(self.folder, "access.log"))
        self.assertEqual(config.health, HealthConfig(path="/ping", interval=5, fall=4))
        self.assertEqual(
            config.backends,
            (
                BackendConfig("http://127.0.0.1:8081", 2, False),
                BackendConfig("http://127.0.0.1:8082", 1, True),
            ),
        )

    def test_flagsOverrideFile(self):
        """
        Flags win over the file; health settings merge key by key.
        """
        config = parse(
            "-c", self.path,
            "--port", "9000",
            "--health-interval", "1",
            "--host-header", "client",
            "--access-log", "-",
        )
        self.assertEqual(config.ports, ("tcp:9000",))
        self.assertEqual(config.health, HealthConfig(path="/ping", interval=1, fall=4))
        self.assertEqual(config.hostHeader, "client")
        self.assertEqual(config.accessLog, "-")
        self.assertEqual(len(config.backends), 2)

    def test_backendFlagReplacesFileBackends(self):
        config = parse("--config", self.path, "--backend", "http://127.0.0.1:9999")
        self.assertEqual(config.backends, (BackendConfig("http://127.0.0.1:9999"),))

    def test_noHealthChecksOverridesFile(self):
        config = parse("--config", self.path, "--no-health-checks")
        self.assertFalse(config.health.enabled)
        self.assertEqual(config.health.path, "/ping")


class OptionsMistakeTests(TestCase):
    """
    Every mistake ends in SystemExit with one line starting with
    "rrbalancer:", and nothing printed (no usage text, no traceback).
    """

    def assertMistake(self, argv, *mentions):
        output = CapturedOutput(self)
        options = Options()
        e = self.assertRaises(SystemExit, options.parseOptions, list(argv))
        message = e.code
        self.assertIsInstance(message, str, f"exit code {message!r} for {argv}")
        self.assertTrue(message.startswith("rrbalancer: "), message)
        self.assertNotIn("\n", message.rstrip("\n"))
        self.assertNotIn("Traceback", message)
        self.assertNotIn("Usage", message)
        for word in mentions:
            self.assertIn(word, message)
        self.assertEqual(output.stdout.getvalue(), "")
        self.assertEqual(output.stderr.getvalue(), "")
        # The exception is not chained to another, which Python would print.
        self.assertTrue(e.__suppress_context__ or e.__context__ is None)
        return message

    def test_unknownFlag(self):
        self.assertMistake(["--bogus"], "--bogus")
        self.assertMistake([*BACKEND, "--prot", "80"], "--prot")
        self.assertMistake(["-x"], "-x")

    def test_flagWithoutValue(self):
        self.assertMistake([*BACKEND, "--port"], "port")
        self.assertMistake(["--backend"], "backend")

    def test_valueForFlag(self):
        self.assertMistake([*BACKEND, "--demo=yes"], "demo")

    def test_extraArguments(self):
        self.assertMistake([*BACKEND, "http://127.0.0.1:8082"])

    def test_noBackend(self):
        self.assertMistake([], "backend", "--demo")
        self.assertMistake(["--port", "8080"], "--demo")

    def test_badBackend(self):
        self.assertMistake(["--backend", "ftp://a"], "backend", "ftp://a")
        self.assertMistake(["--backend", "127.0.0.1:8081"], "backend")
        self.assertMistake(["--backend", "http://a/app"], "backend")
        self.assertMistake(["--backend", "http://u:p@a"], "credentials")
        self.assertMistake(["--backend", "http://a,weight=0"], "weight")
        self.assertMistake(["--backend", "http://a,weight=x"], "weight")
        self.assertMistake(["--backend", "http://a,heavy"], "heavy")
        self.assertMistake(["-b", "http://a", "-b", "http://a"], "twice")

    def test_badPort(self):
        self.assertMistake([*BACKEND, "--port", "70000"], "port")
        self.assertMistake([*BACKEND, "--port", "eighty"], "port")

    def test_badHealth(self):
        self.assertMistake([*BACKEND, "--health-interval", "0"], "health.interval")
        self.assertMistake([*BACKEND, "--health-interval", "-1"], "health.interval")
        self.assertMistake([*BACKEND, "--health-interval", "often"], "health.interval")
        self.assertMistake([*BACKEND, "--health-timeout", "0"], "health.timeout")
        self.assertMistake([*BACKEND, "--rise", "0"], "health.rise")
        self.assertMistake([*BACKEND, "--fall", "0"], "health.fall")
        self.assertMistake([*BACKEND, "--fall", "1.5"], "health.fall")
        self.assertMistake([*BACKEND, "--health-path", "ping"], "health.path")

    def test_badOthers(self):
        self.assertMistake([*BACKEND, "--backend-timeout", "0"], "backend_timeout")
        self.assertMistake([*BACKEND, "--connect-timeout", "x"], "connect_timeout")
        self.assertMistake([*BACKEND, "--shutdown-grace", "-1"], "shutdown_grace")
        self.assertMistake([*BACKEND, "--client-timeout", "0"], "client_timeout")
        self.assertMistake([*BACKEND, "--max-body-size", "-1"], "max_body_size")
        self.assertMistake([*BACKEND, "--host-header", "both"], "host_header")
        missing = os.path.abspath(self.mktemp())
        self.assertMistake([*BACKEND, "--backend-ca", missing], "backend_ca")
        self.assertMistake(
            [*BACKEND, "--access-log", os.path.join(missing, "a.log")], "access_log"
        )

    def test_missingConfigFile(self):
        missing = os.path.abspath(self.mktemp())
        self.assertMistake(["--config", missing], "config", missing)

    def test_invalidConfigFile(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("[health\n")
        self.assertMistake(["--config", path], "config", "TOML")

    def test_badValueInConfigFile(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('backend = "http://a"\n[health]\nrise = 0\n')
        self.assertMistake(["--config", path], "health.rise")
        with open(path, "w") as f:
            f.write('backend = "http://a"\nprot = 80\n')
        self.assertMistake(["--config", path], "'prot'")

    def test_flagFixesFile(self):
        """
        A flag can fix what the file got wrong, since it replaces it.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('backend = "http://a"\n[health]\nrise = 0\n')
        self.assertEqual(parse("--config", path, "--rise", "1").health.rise, 1)


class VersionTests(TestCase):
    def test_version(self):
        output = CapturedOutput(self)
        e = self.assertRaises(SystemExit, Options().parseOptions, ["--version"])
        self.assertIn(e.code, (0, None))
        self.assertTrue(output.stdout.getvalue().startswith("rrbalancer "))
