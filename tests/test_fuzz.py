"""
The fuzz harnesses of L{tests.fuzz} without atheris: every file of each
target's committed corpus replayed through its C{check}, and what the
fuzzers found, each as a test of its own.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from rrbalancer.config import ConfigError, buildConfig, loadConfig, parseBackendURL
from rrbalancer.tap import Options

from .fuzz import fuzz_config, fuzz_headers, fuzz_request_head, fuzz_response
from .fuzz._common import corpus, join, split
from .support import MemoryBalancer, parseResponse


class SplitTests(SynchronousTestCase):
    """
    How the harnesses read their input.
    """

    def test_roundTrip(self):
        for choices, sizes, stream, extra in [
            (0, [], b"abc", 0),
            (31, [1], b"abcd", 0),
            (8191, [2, 3], b"abcdefghij", 1),
            (5, [256], b"x" * 300, 0),
        ]:
            got, pieces = split(join(choices, sizes, stream, extra), extra)
            self.assertEqual(got, choices)
            self.assertEqual(b"".join(pieces), stream)
        self.assertEqual(split(join(0, [2, 3], b"abcdefgh")), (0, [b"ab", b"cde", b"fg", b"h"]))

    def test_short(self):
        self.assertEqual(split(b""), (0, []))
        self.assertEqual(split(b"\x03\x01"), (0, []))


class CorpusTests(SynchronousTestCase):
    """
    Every committed corpus file still passes its harness.
    """

    def replay(self, target, check):
        files = corpus(target)
        self.assertTrue(files, f"no corpus for {target}")
        for path in files:
            with open(path, "rb") as f:
                data = f.read()
            try:
                check(data)
            except AssertionError as e:
                self.fail(f"{os.path.basename(path)} ({data[:200]!r}...): {e}")

    def test_requestHead(self):
        self.replay("request_head", fuzz_request_head.check)

    def test_response(self):
        self.replay("response", fuzz_response.check)

    def test_headers(self):
        self.replay("headers", fuzz_headers.check)

    def test_config(self):
        self.replay("config", fuzz_config.check)


class FoundTests(SynchronousTestCase):
    """
    What the fuzzers found, each with the input that found it.
    """

    def test_configFileNotUTF8(self):
        """
        A config file that is not UTF-8 is a ConfigError, not the
        UnicodeDecodeError tomllib lets out.
        """
        fuzz_config.check(b"\x00backt\nhea*lth =\xa03\n")
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(b'backend = "http://a"\nport = "\xa08000"\n')
        e = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(str(e), f"config: {path} is not valid TOML: not UTF-8 (byte 30)")

    def test_lineBreakInArgumentIsOneLine(self):
        """
        An argument holding a line break, quoted in the message that
        refuses it, leaves that message one line long.
        """
        fuzz_config.check(b"\x01--v\n\x00sion")
        for argv, message in [
            (["--v\n"], "rrbalancer: option --v\\n not recognized (see --help)"),
            (["--config", "a\r\nb"], "rrbalancer: config: no such file: a\\r\\nb"),
        ]:
            e = self.assertRaises(SystemExit, Options().parseOptions, argv)
            self.assertEqual(e.code, message)

    def test_nonASCIIBackendHost(self):
        """
        A backend whose host is not ASCII (here bytes that are not UTF-8,
        as argv gives them) is refused as a setting; it used to pass, and
        building the balancer then raised UnicodeEncodeError.
        """
        fuzz_config.check(b"\x01-b\x00http://\xad\xad\x00--check")
        for url in ["http://\udcad", "http://\u00e9.example", "https://a\udcad:81"]:
            e = self.assertRaises(ConfigError, parseBackendURL, url)
            self.assertIn("write the host in ASCII", str(e))
        self.assertEqual(parseBackendURL("http://xn--9ca.example"), "http://xn--9ca.example")

    def test_portOfOtherDigits(self):
        """
        A port or admin port of characters str.isdigit() takes for digits
        but int() does not (a superscript two) is a ConfigError, not the
        ValueError int() raised.
        """
        fuzz_config.check(
            b"\x01-b\x00http://a\x00-b\x00http://b,weight=2\x00-p\x008000\xc2\xb2"
            b"\x00-p\x00tcp:8000\x00--admin\x00none"
        )
        for settings in [{"port": "8000\u00b2"}, {"admin": "\u00b2"}]:
            e = self.assertRaises(
                ConfigError, buildConfig, dict(settings, backend="http://a")
            )
            self.assertIn("is not a TCP port number", str(e))

    def test_noSecondAnswerAfter413InChunkedBody(self):
        """
        A chunked body refused with 413 part way through data that goes on
        malformed gets that one answer; Twisted's decoder used to read on
        and add its own 400 after it, on the closing connection.
        """
        data = (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"20\r\n" + b"y" * 32 + b"\r\n30\r\n" + b"z" * 27 + b"\xff" * 77 + b"z" * 21
            + b"\r\n0\r\n\r\n"
        )
        fuzz_request_head.check(join(0, [], data))
        balancer = MemoryBalancer(maxBodySize=64)
        channel, transport = balancer.client()
        # A real transport lets its producer be unregistered twice.
        transport.unregisterProducer = lambda: None
        channel.dataReceived(data)
        response, rest = parseResponse(transport.value(), closed=True)
        self.assertEqual((response.code, rest), (413, b""))
