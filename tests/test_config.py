"""
Tests for L{rrbalancer.config}: every rule a setting must follow, and the
one-line L{ConfigError} that names the setting when it does not.
"""

import os
from urllib.parse import urlsplit

from twisted.trial.unittest import TestCase

from rrbalancer.config import (
    BackendConfig,
    Config,
    ConfigError,
    HealthConfig,
    buildConfig,
    loadConfig,
    mergeSettings,
    parseBackendSpec,
    parseBackendURL,
    parsePort,
    readConfigFile,
)

ONE = {"backend": ["http://127.0.0.1:8081"]}


def settings(**extra):
    """
    Valid settings (one backend) with C{extra} laid over them.
    """
    s = dict(ONE)
    s.update(extra)
    return s


class ConfigErrorMixin:
    def assertConfigError(self, f, *args, mentions=(), **kwargs):
        """
        C{f(*args, **kwargs)} raises a L{ConfigError} with a one-line
        message containing each of C{mentions}; the message is returned.
        """
        e = self.assertRaises(ConfigError, f, *args, **kwargs)
        message = str(e)
        self.assertTrue(message, "empty ConfigError message")
        self.assertNotIn("\n", message)
        self.assertNotIn("\r", message)
        self.assertNotIn("Traceback", message)
        for word in (mentions if isinstance(mentions, (tuple, list)) else [mentions]):
            self.assertIn(word, message)
        return message

    def assertSettingsError(self, s, mentions=()):
        return self.assertConfigError(buildConfig, s, mentions=mentions)


class BackendURLTests(ConfigErrorMixin, TestCase):
    def test_accepted(self):
        """
        http and https URLs naming a server, with or without a port or a
        trailing slash, are kept as scheme://host[:port], host lower-cased.
        """
        self.assertEqual(parseBackendURL("http://127.0.0.1:8081"), "http://127.0.0.1:8081")
        self.assertEqual(parseBackendURL("http://Example.COM/"), "http://example.com")
        self.assertEqual(parseBackendURL(" https://a.example:8443 "), "https://a.example:8443")
        self.assertEqual(parseBackendURL("http://[::1]:8080"), "http://[::1]:8080")

    def test_noScheme(self):
        for url in ["127.0.0.1:8080", "localhost:8080", "example.com", "//example.com"]:
            self.assertConfigError(
                parseBackendURL, url, mentions=["backend", "http://"]
            )

    def test_otherScheme(self):
        for url in ["ftp://example.com", "ws://example.com", "file:///etc/passwd"]:
            self.assertConfigError(
                parseBackendURL, url, mentions=["backend", url, "http://"]
            )

    def test_pathOrQuery(self):
        for url in [
            "http://example.com/app",
            "http://example.com/?x=1",
            "http://example.com?x=1",
            "http://example.com#frag",
        ]:
            self.assertConfigError(
                parseBackendURL, url, mentions=["backend", "path, query or fragment"]
            )

    def test_credentials(self):
        for url in ["http://user:secret@example.com", "http://user@example.com"]:
            self.assertConfigError(
                parseBackendURL, url, mentions=["backend", "credentials"]
            )

    def test_noHost(self):
        self.assertConfigError(parseBackendURL, "http://", mentions=["backend", "no host"])
        self.assertConfigError(parseBackendURL, "http://:80", mentions=["backend", "no host"])

    def test_badPort(self):
        self.assertConfigError(parseBackendURL, "http://a:99999", mentions="backend")
        self.assertConfigError(parseBackendURL, "http://a:x", mentions="backend")
        self.assertConfigError(parseBackendURL, "http://a:0", mentions=["backend", "port 0"])

    def test_notAString(self):
        self.assertConfigError(parseBackendURL, 8080, mentions="backend")
        self.assertConfigError(
            parseBackendURL, "http://a\n.example", mentions=["backend", "LF"]
        )

    def test_httpsHostTLSCannotVerify(self):
        """
        An https backend's host name must be one the certificate check can
        encode (IDNA); any other used to pass, and building the balancer
        then raised an IDNA error.  Addresses are not names, and plain
        http does no such check.
        """
        for url in ["https://-a-", "https://a_b", "https://a..b", "https://xn--zz"]:
            self.assertConfigError(
                parseBackendURL, url, mentions=["backend", url, "not a host name TLS can verify"]
            )
        for url in ["https://a--b.example", "https://xn--9ca.example", "https://10.0.0.1",
                    "https://[::1]:8443", "https://a.example.", "http://a_b"]:
            parseBackendURL(url)

    def test_nameIsUsed(self):
        """
        The caller's setting name is the one a message names.
        """
        self.assertConfigError(parseBackendURL, "ftp://a", "peer", mentions="peer:")


class BackendSpecTests(ConfigErrorMixin, TestCase):
    def test_urlOnly(self):
        self.assertEqual(
            parseBackendSpec("http://127.0.0.1:8081"),
            BackendConfig(url="http://127.0.0.1:8081", weight=1, backup=False),
        )

    def test_urlReadOnce(self):
        """
        A backend's URL is split once, however often its server, host and
        port are asked for, and what is kept of it is no part of its
        equality.
        """
        from rrbalancer import values

        splits = []
        self.patch(values, "urlsplit", lambda url: splits.append(url) or urlsplit(url))
        backend = BackendConfig(url="http://a")
        for _ in range(3):
            self.assertEqual(backend.server, ("http", "a", 80))
            self.assertEqual((backend.scheme, backend.host, backend.port), ("http", "a", 80))
        self.assertEqual(splits, ["http://a"])
        self.assertEqual(backend, BackendConfig(url="http://a"))
        self.assertEqual(hash(backend), hash(BackendConfig(url="http://a")))

    def test_weightAndBackup(self):
        """
        The command line's C{URL,weight=N,backup}, in either order.
        """
        expected = BackendConfig(url="http://a:81", weight=3, backup=True)
        self.assertEqual(parseBackendSpec("http://a:81,weight=3,backup"), expected)
        self.assertEqual(parseBackendSpec("http://a:81,backup,weight=3"), expected)
        self.assertEqual(parseBackendSpec("http://a:81, weight = 3 , backup"), expected)
        self.assertEqual(
            parseBackendSpec("http://a:81,weight=2"),
            BackendConfig(url="http://a:81", weight=2),
        )
        self.assertEqual(
            parseBackendSpec("http://a:81,backup"),
            BackendConfig(url="http://a:81", backup=True),
        )

    def test_table(self):
        """
        A TOML table with url, weight and backup.
        """
        self.assertEqual(
            parseBackendSpec({"url": "http://a:81", "weight": 4, "backup": True}),
            BackendConfig(url="http://a:81", weight=4, backup=True),
        )
        self.assertEqual(
            parseBackendSpec({"url": "http://a:81"}), BackendConfig(url="http://a:81")
        )

    def test_unknownOption(self):
        for spec in [
            "http://a,wieght=3",
            "http://a,backup=yes",
            "http://a,weight",
            "http://a,",
            "http://a,down",
        ]:
            self.assertConfigError(
                parseBackendSpec, spec, mentions=["backend", "unknown option"]
            )

    def test_unknownTableKey(self):
        self.assertConfigError(
            parseBackendSpec,
            {"url": "http://a", "wieght": 2},
            mentions=["backend", "'wieght'"],
        )

    def test_tableWithoutURL(self):
        self.assertConfigError(
            parseBackendSpec, {"weight": 2}, mentions=["backend", "url"]
        )

    def test_weightZero(self):
        self.assertConfigError(
            parseBackendSpec, "http://a,weight=0", mentions=["http://a", "weight", "at least 1"]
        )
        self.assertConfigError(
            parseBackendSpec, {"url": "http://a", "weight": 0}, mentions=["weight", "at least 1"]
        )

    def test_weightNegative(self):
        self.assertConfigError(
            parseBackendSpec, "http://a,weight=-2", mentions=["weight", "at least 1"]
        )
        self.assertConfigError(
            parseBackendSpec, {"url": "http://a", "weight": -1}, mentions="weight"
        )

    def test_weightNotAnInteger(self):
        for weight in ["1.5", "three", "", "1e3"]:
            self.assertConfigError(
                parseBackendSpec,
                f"http://a,weight={weight}",
                mentions=["weight", "whole number"],
            )
        for weight in [1.5, True, "x", [1]]:
            self.assertConfigError(
                parseBackendSpec,
                {"url": "http://a", "weight": weight},
                mentions=["weight", "whole number"],
            )

    def test_badBackup(self):
        self.assertConfigError(
            parseBackendSpec, {"url": "http://a", "backup": "maybe"}, mentions="backup"
        )

    def test_badURLInSpec(self):
        self.assertConfigError(
            parseBackendSpec, "ftp://a,weight=2", mentions=["backend", "ftp://a"]
        )


class PortTests(ConfigErrorMixin, TestCase):
    def test_bareNumber(self):
        """
        A bare port number means TCP on every interface.
        """
        self.assertEqual(parsePort("8000"), "tcp:8000")
        self.assertEqual(parsePort(" 8000 "), "tcp:8000")
        self.assertEqual(parsePort(8000), "tcp:8000")
        self.assertEqual(parsePort("1"), "tcp:1")
        self.assertEqual(parsePort("65535"), "tcp:65535")

    def test_outOfRange(self):
        for port in ["0", "65536", "99999", 0, 70000]:
            self.assertConfigError(parsePort, port, mentions=["port", "1-65535"])

    def test_endpointKept(self):
        """
        Endpoint descriptions are kept as they are; the endpoint parser
        checks them when the service is built.
        """
        for description in [
            "tcp:8000:interface=127.0.0.1",
            "tcp6:8000:interface=\\:\\:1",
            "ssl:8443:privateKey=key.pem",
            "unix:/tmp/rr.sock",
            "haproxy:tcp:8000",
            "tcp:0",
        ]:
            self.assertEqual(parsePort(description), description)

    def test_neither(self):
        for port in ["", "eighty", "-1", "80.5"]:
            self.assertConfigError(parsePort, port, mentions="port")

    def test_notAString(self):
        self.assertConfigError(parsePort, 80.5, mentions="port")
        self.assertConfigError(parsePort, True, mentions="port")


class BuildConfigTests(ConfigErrorMixin, TestCase):
    def test_defaults(self):
        config = buildConfig(ONE)
        self.assertIsInstance(config, Config)
        self.assertEqual(config.backends, (BackendConfig(url="http://127.0.0.1:8081"),))
        self.assertEqual(config.ports, ("tcp:8000",))
        self.assertEqual(config.health, HealthConfig())
        self.assertEqual(config.hostHeader, "client")
        self.assertIsNone(config.accessLog)
        self.assertIsNone(config.backendCA)
        self.assertFalse(config.demo)

    def test_backendsInOrder(self):
        config = buildConfig(
            {
                "backend": [
                    "http://a:1,weight=5",
                    {"url": "http://b:2", "backup": True},
                    "http://c:3",
                ]
            }
        )
        self.assertEqual(
            config.backends,
            (
                BackendConfig("http://a:1", 5, False),
                BackendConfig("http://b:2", 1, True),
                BackendConfig("http://c:3", 1, False),
            ),
        )

    def test_singleBackendNotInAList(self):
        self.assertEqual(
            buildConfig({"backend": "http://a:1"}).backends, (BackendConfig("http://a:1"),)
        )

    def test_singleBackendTable(self):
        """
        A TOML C{[backend]} table (rather than C{[[backend]]}) is refused
        with the spelling that works.
        """
        self.assertSettingsError(
            {"backend": {"url": "http://a:1"}}, mentions=["[backend]", "[[backend]]"]
        )

    def test_noBackend(self):
        """
        Without a backend (and without --demo) there is nothing to balance;
        the message points a new user at --demo.
        """
        for s in [{}, {"backend": []}, {"port": "8000"}]:
            self.assertSettingsError(s, mentions=["backend", "--demo"])

    def test_demoNeedsNoBackend(self):
        config = buildConfig({"demo": True})
        self.assertTrue(config.demo)
        self.assertEqual(config.backends, ())

    def test_duplicateBackend(self):
        self.assertSettingsError(
            {"backend": ["http://a:1", "http://b:1", "http://a:1,weight=2"]},
            mentions=["backend", "http://a:1", "twice"],
        )

    def test_duplicateBackendSpelledDifferently(self):
        """
        Two spellings of one server (case, default port, trailing slash)
        are one backend listed twice.
        """
        for pair in [
            ["http://a", "http://a:80"],
            ["http://A:81", "http://a:81/"],
            ["https://a", "https://a:443"],
        ]:
            self.assertSettingsError({"backend": pair}, mentions=["backend", "twice"])
        # Same host and port, other scheme: a different server.
        buildConfig({"backend": ["http://a:8000", "https://a:8000"]})

    def test_unknownTopLevelKey(self):
        self.assertSettingsError(settings(prot=8000), mentions=["unknown setting", "'prot'"])
        self.assertSettingsError(settings(Backend=[]), mentions="'Backend'")

    def test_unknownHealthKey(self):
        self.assertSettingsError(
            settings(health={"intervall": 2}), mentions=["health", "'intervall'"]
        )

    def test_healthNotATable(self):
        self.assertSettingsError(settings(health=3), mentions="health")

    def test_health(self):
        config = buildConfig(
            settings(
                health={
                    "enabled": False,
                    "path": "/ping",
                    "interval": 0.5,
                    "timeout": "0.25",
                    "rise": 1,
                    "fall": "4",
                }
            )
        )
        self.assertEqual(
            config.health,
            HealthConfig(
                enabled=False, path="/ping", interval=0.5, timeout=0.25, rise=1, fall=4
            ),
        )

    def test_intervalZeroOrNegative(self):
        for value in [0, -1, "0", "-0.5"]:
            self.assertSettingsError(
                settings(health={"interval": value}),
                mentions=["health.interval", "greater than 0"],
            )

    def test_intervalNotANumber(self):
        for value in ["soon", "nan", "inf", True, [2]]:
            self.assertSettingsError(
                settings(health={"interval": value}), mentions="health.interval"
            )

    def test_timeoutZeroOrNegative(self):
        for value in [0, -3]:
            self.assertSettingsError(
                settings(health={"timeout": value}), mentions="health.timeout"
            )

    def test_riseFallBelowOne(self):
        for key in ["rise", "fall"]:
            for value in [0, -1, "0"]:
                self.assertSettingsError(
                    settings(health={key: value}),
                    mentions=[f"health.{key}", "at least 1"],
                )
            self.assertSettingsError(
                settings(health={key: 1.5}), mentions=[f"health.{key}", "whole number"]
            )

    def test_healthPath(self):
        for path in ["ping", "", "/a b"]:
            self.assertSettingsError(
                settings(health={"path": path}), mentions="health.path"
            )
        self.assertSettingsError(settings(health={"path": "/a\r\nX: y"}), mentions="health.path")

    def test_healthEnabled(self):
        self.assertSettingsError(settings(health={"enabled": "sometimes"}), mentions="health.enabled")
        self.assertFalse(buildConfig(settings(health={"enabled": "off"})).health.enabled)

    def test_ports(self):
        self.assertEqual(buildConfig(settings(port=8080)).ports, ("tcp:8080",))
        self.assertEqual(
            buildConfig(settings(port=["8080", "tcp:8081:interface=127.0.0.1"])).ports,
            ("tcp:8080", "tcp:8081:interface=127.0.0.1"),
        )
        self.assertSettingsError(settings(port=[]), mentions="port")
        self.assertSettingsError(settings(port=["8080", "70000"]), mentions=["port", "70000"])

    def test_hostHeader(self):
        self.assertEqual(buildConfig(settings(host_header="backend")).hostHeader, "backend")
        self.assertSettingsError(settings(host_header="server"), mentions="host_header")

    def test_numbers(self):
        """
        Each numeric top-level setting is named when it is wrong.
        """
        for key in [
            "backend_timeout",
            "connect_timeout",
            "client_timeout",
            "pool_idle_timeout",
        ]:
            for value in [0, -1, "x"]:
                self.assertSettingsError(settings(**{key: value}), mentions=key)
        self.assertSettingsError(settings(shutdown_grace=-1), mentions="shutdown_grace")
        self.assertEqual(buildConfig(settings(shutdown_grace=0)).shutdownGrace, 0)
        for key in ["max_body_size", "max_idle_per_backend"]:
            for value in [-1, "x", 1.5]:
                self.assertSettingsError(settings(**{key: value}), mentions=key)
            self.assertEqual(getattr(buildConfig(settings(**{key: "0"})), {
                "max_body_size": "maxBodySize",
                "max_idle_per_backend": "maxIdlePerBackend",
            }[key]), 0)

    def test_demoBoolean(self):
        self.assertSettingsError({"demo": "perhaps"}, mentions="demo")

    def test_accessLog(self):
        base = self.mktemp()
        os.makedirs(base)
        self.assertEqual(buildConfig(settings(access_log="-")).accessLog, "-")
        self.assertEqual(
            buildConfig(settings(access_log="a.log"), baseDir=base).accessLog,
            os.path.join(base, "a.log"),
        )
        self.assertSettingsError(
            settings(access_log=os.path.join(base, "missing", "a.log")),
            mentions=["access_log", "no such folder"],
        )

    def test_backendCA(self):
        base = self.mktemp()
        os.makedirs(base)
        with open(os.path.join(base, "ca.pem"), "w") as f:
            f.write("")
        self.assertEqual(
            buildConfig(settings(backend_ca="ca.pem"), baseDir=base).backendCA,
            os.path.join(base, "ca.pem"),
        )
        self.assertSettingsError(
            settings(backend_ca=os.path.join(base, "nope.pem")),
            mentions=["backend_ca", "no such file"],
        )


class MergeSettingsTests(TestCase):
    def test_commandLineWins(self):
        merged = mergeSettings(
            {"port": ["8000"], "backend": ["http://a"], "host_header": "client"},
            {"port": ["9000"], "host_header": "backend"},
        )
        self.assertEqual(
            merged,
            {"port": ["9000"], "backend": ["http://a"], "host_header": "backend"},
        )

    def test_nestedHealthMerge(self):
        """
        --health-interval leaves the file's health.path alone.
        """
        base = {"health": {"path": "/ping", "interval": 5, "rise": 3}}
        override = {"health": {"interval": "1", "enabled": False}}
        merged = mergeSettings(base, override)
        self.assertEqual(
            merged["health"],
            {"path": "/ping", "interval": "1", "rise": 3, "enabled": False},
        )
        # Neither input is changed.
        self.assertEqual(base, {"health": {"path": "/ping", "interval": 5, "rise": 3}})
        self.assertEqual(override, {"health": {"interval": "1", "enabled": False}})

    def test_healthOnlyOnOneSide(self):
        self.assertEqual(mergeSettings({}, {"health": {"rise": 1}}), {"health": {"rise": 1}})
        self.assertEqual(mergeSettings({"health": {"rise": 1}}, {}), {"health": {"rise": 1}})


class ConfigFileTests(ConfigErrorMixin, TestCase):
    def write(self, text, name="balancer.toml"):
        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_load(self):
        path = self.write(
            'port = ["tcp:8000:interface=127.0.0.1", 8001]\n'
            "backend_timeout = 12\n"
            'host_header = "backend"\n'
            "[health]\n"
            'path = "/ping"\n'
            "interval = 0.5\n"
            "rise = 1\n"
            "[[backend]]\n"
            'url = "http://127.0.0.1:8081"\n'
            "weight = 3\n"
            "[[backend]]\n"
            'url = "http://127.0.0.1:8082"\n'
            "backup = true\n"
        )
        config = loadConfig(path)
        self.assertEqual(config.ports, ("tcp:8000:interface=127.0.0.1", "tcp:8001"))
        self.assertEqual(config.backendTimeout, 12)
        self.assertEqual(config.hostHeader, "backend")
        self.assertEqual(
            config.health, HealthConfig(path="/ping", interval=0.5, rise=1)
        )
        self.assertEqual(
            config.backends,
            (
                BackendConfig("http://127.0.0.1:8081", 3, False),
                BackendConfig("http://127.0.0.1:8082", 1, True),
            ),
        )

    def test_overrides(self):
        """
        Command-line settings replace the file's, and health tables merge.
        """
        path = self.write(
            'port = 8000\nbackend = ["http://a:1"]\n'
            '[health]\npath = "/ping"\ninterval = 5\n'
        )
        config = loadConfig(
            path, {"port": ["9000"], "health": {"interval": "1"}, "backend": ["http://b:2"]}
        )
        self.assertEqual(config.ports, ("tcp:9000",))
        self.assertEqual(config.health.path, "/ping")
        self.assertEqual(config.health.interval, 1.0)
        self.assertEqual(config.backends, (BackendConfig("http://b:2"),))

    def test_relativePaths(self):
        """
        Relative file names in the file are found beside the file, not in
        the working directory.
        """
        path = self.write(
            'backend = "https://a"\naccess_log = "logs/access.log"\n'
            'backend_ca = "ca.pem"\n'
        )
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(os.path.join(folder, "logs"))
        with open(os.path.join(folder, "ca.pem"), "w") as f:
            f.write("")
        config = loadConfig(path)
        self.assertEqual(config.accessLog, os.path.join(folder, "logs", "access.log"))
        self.assertEqual(config.backendCA, os.path.join(folder, "ca.pem"))
        self.assertTrue(os.path.isabs(config.accessLog))

    def test_absoluteOverrideKept(self):
        path = self.write('backend = "http://a"\naccess_log = "a.log"\n')
        elsewhere = os.path.abspath(self.mktemp())
        os.makedirs(elsewhere)
        config = loadConfig(path, {"access_log": os.path.join(elsewhere, "b.log")})
        self.assertEqual(config.accessLog, os.path.join(elsewhere, "b.log"))

    def test_missingFile(self):
        missing = os.path.abspath(self.mktemp())
        self.assertConfigError(loadConfig, missing, mentions=["config", "no such file", missing])
        self.assertConfigError(readConfigFile, missing, mentions="config")

    def test_folderInsteadOfFile(self):
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        self.assertConfigError(loadConfig, folder, mentions=["config", folder])

    def test_invalidTOML(self):
        for text in ["port = \n", "[health\ninterval = 2\n", 'backend = "http://a\n', "x = 1\nx = 2\n"]:
            path = self.write(text)
            self.assertConfigError(
                loadConfig, path, mentions=["config", path, "not valid TOML", "line"]
            )

    def test_validationNamesSetting(self):
        path = self.write('backend = ["http://a"]\n[health]\nfall = 0\n')
        self.assertConfigError(loadConfig, path, mentions="health.fall")
        path = self.write('backend = ["http://a"]\nbogus = 1\n')
        self.assertConfigError(loadConfig, path, mentions="'bogus'")
        path = self.write('[[backend]]\nurl = "http://a"\nweight = 0\n')
        self.assertConfigError(loadConfig, path, mentions="weight")
        path = self.write('[[backend]]\nurl = "http://a"\ncolour = "red"\n')
        self.assertConfigError(loadConfig, path, mentions="'colour'")
        path = self.write("port = 8000\n")
        self.assertConfigError(loadConfig, path, mentions="--demo")

    def test_shippedExample(self):
        """
        The balancer.toml in the repository is a valid configuration.
        """
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        config = loadConfig(os.path.join(here, "balancer.toml"))
        self.assertEqual(len(config.backends), 3)
        self.assertEqual([b.backup for b in config.backends], [False, False, True])
        self.assertEqual([(p.name, len(p.backends)) for p in config.pools], [("api", 2)])
        self.assertEqual([(r.pathPrefix, r.pool) for r in config.routes], [("/api", "api")])


class FileLineTests(ConfigErrorMixin, TestCase):
    def test_unknownKeyNamesItsLine(self):
        """
        An unknown key in a file is reported with its line and the nearest
        valid key.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('backend = ["http://127.0.0.1:8081"]\n\n[health]\nintervall = 3\n')
        message = self.assertConfigError(loadConfig, path, mentions=["line 4", "'intervall'", "'interval'"])
        self.assertTrue(message.startswith(path + ", line 4: health: unknown setting"), message)
        with open(path, "w") as f:
            f.write('backend = ["http://127.0.0.1:8081"]\nbakend_timeout = 3\n')
        self.assertConfigError(loadConfig, path, mentions=["line 2", "'backend_timeout'"])
