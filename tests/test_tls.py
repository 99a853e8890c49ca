"""
Tests for L{rrbalancer.tls}: several certificates on one C{tls:} port,
chosen by SNI, re-read on SIGHUP, with a TLS version floor — tried with
real clients (curl, openssl s_client) on 127.0.0.1.
"""

import datetime
import os
import shutil

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rrbalancer.settings import ConfigError
from rrbalancer.tls import CertificateStore

from .support import Net, ScriptedBackend, ok, startBalancer

CURL = shutil.which("curl")
OPENSSL = shutil.which("openssl")


def _name(common):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CA:
    """
    A private CA that signs certificates for names.
    """

    def __init__(self, folder):
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name("rrbalancer tls test CA"))
            .issuer_name(_name("rrbalancer tls test CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = os.path.join(folder, "ca.pem")
        with open(self.path, "wb") as f:
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, *names):
        """
        A (key PEM, certificate PEM, serial) for C{names}.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
            .sign(self.key, hashes.SHA256())
        )
        return _pem(key), cert.public_bytes(serialization.Encoding.PEM), serial


def writePair(folder, label, pair, split=False):
    key, cert, serial = pair
    if split:
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        with open(os.path.join(folder, label, "privkey.pem"), "wb") as f:
            f.write(key)
        with open(os.path.join(folder, label, "fullchain.pem"), "wb") as f:
            f.write(cert)
    else:
        with open(os.path.join(folder, label + ".pem"), "wb") as f:
            f.write(key + cert)
    return serial


class StoreTests(SynchronousTestCase):
    def setUp(self):
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.folder, "certs"))
        self.certs = os.path.join(self.folder, "certs")
        self.ca = CA(self.folder)

    def test_namesAndDefault(self):
        a = self.ca.issue("a.example")
        b = self.ca.issue("b.example", "www.b.example")
        w = self.ca.issue("*.w.example")
        writePair(self.certs, "a", a)
        writePair(self.certs, "b", b, split=True)
        writePair(self.certs, "w", w)
        store = CertificateStore(self.certs)
        self.assertIs(store.contextFor("www.b.example"), store.contextFor("b.example"))
        self.assertIsNot(store.contextFor("a.example"), store.contextFor("b.example"))
        self.assertIs(store.contextFor("x.w.example"), store.contextFor("y.w.example"))
        # No name, or an unknown one: the first in name order.
        self.assertIs(store.contextFor(None), store.contextFor("a.example"))
        self.assertIs(store.contextFor("nowhere.example"), store.contextFor("a.example"))
        writePair(self.certs, "default", self.ca.issue("fallback.example"))
        store.load()
        self.assertIs(store.contextFor(None), store.contextFor("fallback.example"))

    def test_emptyFolder(self):
        e = self.assertRaises(ConfigError, CertificateStore, self.certs)
        self.assertIn("holds no certificate", str(e))

    def test_brokenFile(self):
        with open(os.path.join(self.certs, "bad.pem"), "w") as f:
            f.write("not a certificate")
        e = self.assertRaises(ConfigError, CertificateStore, self.certs)
        self.assertIn("bad does not load", str(e))

    def test_reloadKeepsOldOnError(self):
        writePair(self.certs, "a", self.ca.issue("a.example"))
        store = CertificateStore(self.certs)
        before = store.contextFor("a.example")
        with open(os.path.join(self.certs, "a.pem"), "w") as f:
            f.write("broken")
        store.reload()
        self.assertIs(store.contextFor("a.example"), before)
        self.flushLoggedErrors()


class RealClientTests(TestCase):
    """
    curl and openssl s_client against a balancer's tls: port.
    """

    timeout = 30

    # Skipped without them, except under CI (CI set), which installs them.
    if (CURL is None or OPENSSL is None) and not os.environ.get("CI"):
        skip = "curl and openssl are needed"

    @inlineCallbacks
    def setUp(self):
        self.net = Net(self)
        folder = os.path.abspath(self.mktemp())
        self.certs = os.path.join(folder, "certs")
        os.makedirs(self.certs)
        self.ca = CA(folder)
        self.serials = {
            "a.example": writePair(self.certs, "a", self.ca.issue("a.example")),
            "b.example": writePair(self.certs, "b", self.ca.issue("b.example"), split=True),
        }
        backend = ScriptedBackend(self.net, lambda c, r: c.write(ok(b"hello")))
        self.balancer = yield startBalancer(
            self.net, [backend.url], ports=("tls:0:interface=127.0.0.1",), tlsCert=self.certs
        )

    def curl(self, name, *args):
        return getProcessOutputAndValue(
            CURL,
            ["-sS", "--max-time", "5", "--cacert", self.ca.path,
             "--resolve", f"{name}:{self.balancer.port}:127.0.0.1",
             f"https://{name}:{self.balancer.port}/", *args],
            env=dict(os.environ),
        )

    @inlineCallbacks
    def servedSerial(self, name, *args):
        out, err, code = yield getProcessOutputAndValue(
            OPENSSL,
            ["s_client", "-connect", f"127.0.0.1:{self.balancer.port}", "-servername", name,
             *args],
            env=dict(os.environ),
            stdinBytes=b"",
        )
        if code != 0:
            return None
        cert = x509.load_pem_x509_certificate(
            out[out.index(b"-----BEGIN CERTIFICATE-----"):]
        )
        return cert.serial_number

    @inlineCallbacks
    def test_eachNameItsCertificate(self):
        for name in ("a.example", "b.example"):
            out, err, code = yield self.curl(name)
            self.assertEqual((code, out), (0, b"hello"), err)
            serial = yield self.servedSerial(name)
            self.assertEqual(serial, self.serials[name])

    @inlineCallbacks
    def test_reloadOnHangup(self):
        """
        A certificate swapped and SIGHUP'd: new handshakes see it; a
        connection opened before goes on.
        """
        service = self.balancer.service
        self.serials["a.example"] = writePair(self.certs, "a", self.ca.issue("a.example"))
        before = yield self.servedSerial("a.example")
        self.assertNotEqual(before, self.serials["a.example"])
        service.signals.deliver("SIGHUP")
        after = yield self.servedSerial("a.example")
        self.assertEqual(after, self.serials["a.example"])
        out, err, code = yield self.curl("a.example")
        self.assertEqual((code, out), (0, b"hello"), err)

    @inlineCallbacks
    def test_versionFloor(self):
        """
        TLS 1.2 is accepted by default; with tls_min_version 1.3 it is not.
        """
        serial = yield self.servedSerial("a.example", "-tls1_2")
        self.assertEqual(serial, self.serials["a.example"])
        backend = ScriptedBackend(self.net, lambda c, r: c.write(ok(b"hello")))
        self.balancer = yield startBalancer(
            self.net, [backend.url], ports=("tls:0:interface=127.0.0.1",),
            tlsCert=self.certs, tlsMinVersion="1.3",
        )
        refused = yield self.servedSerial("a.example", "-tls1_2")
        self.assertIsNone(refused)
        serial = yield self.servedSerial("a.example", "-tls1_3")
        self.assertEqual(serial, self.serials["a.example"])

    @inlineCallbacks
    def test_http2(self):
        """
        A client that offers HTTP/2 gets it, whatever certificate its name
        moved the handshake to; one that does not gets HTTP/1.1.
        """
        for name in ("a.example", "b.example"):
            out, err, code = yield self.curl(name, "--http2", "-w", "%{http_version}")
            self.assertEqual((code, out), (0, b"hello2"), err)
        out, err, code = yield self.curl("a.example", "--http1.1", "-w", "%{http_version}")
        self.assertEqual((code, out), (0, b"hello1.1"), err)

    @inlineCallbacks
    def test_noHTTP2(self):
        """
        With http2 off, a client that offers HTTP/2 gets HTTP/1.1.
        """
        backend = ScriptedBackend(self.net, lambda c, r: c.write(ok(b"hello")))
        self.balancer = yield startBalancer(
            self.net, [backend.url], ports=("tls:0:interface=127.0.0.1",),
            tlsCert=self.certs, http2=False,
        )
        out, err, code = yield self.curl("a.example", "--http2", "-w", "%{http_version}")
        self.assertEqual((code, out), (0, b"hello1.1"), err)
