"""
Tests for L{rrbalancer.settings}: the one table of settings, and that
everything derived from it (the command line, the config file's keys,
L{Config}, the README) agrees with it.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from rrbalancer.config import Config, HealthConfig, buildConfig
from rrbalancer.settings import SETTINGS, ConfigError, markdownTable, settingsIn
from rrbalancer.tap import Options

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
ONE = ["http://127.0.0.1:8081"]


class SchemaTests(SynchronousTestCase):
    def test_namesUnique(self):
        """
        No two settings share a key, a flag, or an attribute of one object.
        """
        keys = [s.key for s in SETTINGS]
        flags = [s.longFlag for s in SETTINGS if s.longFlag]
        shorts = [s.short for s in SETTINGS if s.short]
        self.assertEqual(len(keys), len(set(keys)))
        self.assertEqual(len(flags), len(set(flags)))
        self.assertEqual(len(shorts), len(set(shorts)))
        for table in (None, "health"):
            attrs = [s.attr for s in settingsIn(table)]
            self.assertEqual(len(attrs), len(set(attrs)))

    def test_defaultsAreWhatConfigHolds(self):
        """
        A config built from nothing but a backend holds every setting's
        declared default, so that a default is stated once.
        """
        config = buildConfig({"backend": ONE})
        for s in settingsIn(None):
            if s.key != "backend":
                self.assertEqual(getattr(config, s.attr), s.default, s.key)
        for s in settingsIn("health"):
            self.assertEqual(getattr(config.health, s.attr), s.default, s.key)
        self.assertEqual(Config().ports, ("tcp:8000",))
        self.assertEqual(HealthConfig().interval, 2.0)

    def test_defaultsParse(self):
        """
        Each default, shown in the README, would itself be accepted.
        """
        for s in SETTINGS:
            if s.default not in (None, ()) and s.switch is None and s.shownDefault is None:
                s.parse(s.shown(), s.key)

    def test_everySettingHasAFlagAndAKey(self):
        """
        Every flag of the schema is an option of the command line, and it
        lands on the key the config file uses: giving the default on the
        command line and in a file builds the same config.
        """
        options = Options()
        known = {o[0] for o in options.optParameters} | {o[0] for o in options.optFlags}
        for s in SETTINGS:
            flag = s.longFlag
            if flag is None:
                # TOML only (tables such as [[pool]]).
                self.assertEqual(s.flag, "", s.key)
                continue
            self.assertTrue(
                flag in known or hasattr(options, "opt_" + flag.replace("-", "_")), flag
            )

    def test_flagAndFileAgree(self):
        values = {
            "backend_timeout": "7",
            "health.interval": "3",
            "max_connections": "4",
            "workers": "1",
            "body_timeout": "9",
        }
        argv = ["--backend", ONE[0], "--admin", "none"]
        file = {"backend": ONE, "admin": "none", "health": {}}
        for key, value in values.items():
            setting = next(s for s in SETTINGS if s.key == key)
            argv += ["--" + setting.longFlag, value]
            if setting.table:
                file[setting.table][setting.name] = value
            else:
                file[setting.name] = value
        options = Options()
        options.parseOptions(argv)
        self.assertEqual(options.config, buildConfig(file))

    def test_unknownKeyNamesNearest(self):
        e = self.assertRaises(
            ConfigError, buildConfig, {"backend": ONE, "backend_timout": 3}
        )
        self.assertIn("'backend_timout'", str(e))
        self.assertIn("'backend_timeout'", str(e))


class ReadmeTests(SynchronousTestCase):
    def test_tableMatchesSchema(self):
        """
        The README's settings table is the one the schema makes; when this
        fails, paste the output of C{python -c "from rrbalancer.settings
        import markdownTable; print(markdownTable(), end='')"}.
        """
        with open(README, encoding="utf-8") as f:
            text = f.read()
        start = text.index("-->\n", text.index("<!-- settings table")) + 4
        end = text.index("<!-- end of settings table -->")
        self.assertEqual(text[start:end], markdownTable())


class PackagingTests(SynchronousTestCase):
    def test_everyPackageListed(self):
        """
        setup.cfg lists its packages by hand (find: would miss
        twisted/plugins): every package of rrbalancer must be there, or the
        wheel lacks it.
        """
        root = os.path.dirname(README)
        with open(os.path.join(root, "setup.cfg"), encoding="utf-8") as f:
            text = f.read()
        listed = set(text.split("packages =", 1)[1].split("install_requires", 1)[0].split())
        found = set()
        for folder, _, files in os.walk(os.path.join(root, "rrbalancer")):
            if "__init__.py" in files:
                found.add(os.path.relpath(folder, root).replace(os.sep, "."))
        self.assertEqual(found - listed, set())
