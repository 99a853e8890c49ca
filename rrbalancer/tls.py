"""
TLS on the client side: several certificates on one port, chosen by the
name the client asks for (SNI), re-read on SIGHUP without closing a
connection.

A port C{tls:8443} (with C{interface=} as for C{tcp:}) serves the
certificates of C{--tls-cert DIR}.  The folder holds, for each site, either
one PEM file with the private key and the certificate chain, or (as
certbot's C{live/} folder has them) a sub-folder with C{privkey.pem} and
C{fullchain.pem}.  Each certificate serves every DNS name it carries; a
client that names none of them, or no name at all, gets the C{default}
one (a file or folder of that name), else the first in name order.
"""

import os
from typing import Dict, List, Optional, Tuple

from OpenSSL import SSL, crypto
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger

from zope.interface import implementer

from . import _twisted
from .values import ConfigError

MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


def _pairs(folder: str) -> List[Tuple[str, str, str]]:
    """
    (label, key file, certificate file) for each certificate in C{folder}.
    """
    found = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if os.path.isdir(path):
            key = os.path.join(path, "privkey.pem")
            chain = os.path.join(path, "fullchain.pem")
            if os.path.isfile(key) and os.path.isfile(chain):
                found.append((entry, key, chain))
        elif entry.endswith(".pem"):
            found.append((entry[: -len(".pem")], path, path))
    return found


def _names(certificate: crypto.X509) -> List[str]:
    """
    The DNS names a certificate is for: its subject alternative names, or
    its common name when it has none.
    """
    cert = certificate.to_cryptography()
    from cryptography import x509

    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        common = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return [common[0].value.lower()] if common else []
    return [name.lower() for name in sans.value.get_values_for_type(x509.DNSName)]


# Said outright: Twisted warns of a context factory that leaves it to guess.
@implementer(IOpenSSLContextFactory)
class CertificateStore:
    """
    The certificates of one folder, as a TLS context per name.

    @param minVersion: the oldest TLS version offered (C{"1.2"}, C{"1.3"}).
    @param protocols: what ALPN offers, in the server's order of preference
        (C{h2} and C{http/1.1}, or C{http/1.1} only).
    """

    log = Logger()

    def __init__(
        self, folder: str, minVersion: str = "1.2", protocols=(b"h2", b"http/1.1")
    ) -> None:
        self.folder = folder
        self.protocols = tuple(protocols)
        self.minVersion = MIN_VERSIONS[minVersion]
        self._byName: Dict[str, SSL.Context] = {}
        self._wildcards: Dict[str, SSL.Context] = {}
        self._default: Optional[SSL.Context] = None
        self.load()

    def _context(self, key: str, chain: str) -> SSL.Context:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(self.minVersion)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        context.use_certificate_chain_file(chain)
        context.use_privatekey_file(key)
        context.check_privatekey()
        # Each context a name moves a handshake to chooses as the first does.
        context.set_alpn_select_callback(self._selectProtocol)
        # Whatever context a handshake starts with, the name the client
        # asks for moves it to its own.
        context.set_tlsext_servername_callback(self._servername)
        return context

    def _selectProtocol(self, connection, offered):
        return selectProtocol(self.protocols, offered)

    def load(self) -> None:
        """
        Read the folder (again).  A folder that does not load leaves the
        certificates in use as they are.

        @raise ConfigError: the folder has no usable certificate, or one
            does not load.
        """
        try:
            pairs = _pairs(self.folder)
        except OSError as e:
            raise ConfigError(f"tls_cert: cannot read {self.folder}: {e.strerror}") from None
        if not pairs:
            raise ConfigError(
                f"tls_cert: {self.folder} holds no certificate (NAME.pem with key and "
                "chain, or NAME/privkey.pem and NAME/fullchain.pem)"
            )
        byName: Dict[str, SSL.Context] = {}
        wildcards: Dict[str, SSL.Context] = {}
        default = first = None
        for label, key, chain in pairs:
            try:
                context = self._context(key, chain)
                with open(chain, "rb") as f:
                    certificate = crypto.load_certificate(crypto.FILETYPE_PEM, f.read())
            except (OSError, SSL.Error, crypto.Error, ValueError) as e:
                raise ConfigError(f"tls_cert: {label} does not load: {e}") from None
            first = first or context
            if label == "default":
                default = context
            for name in _names(certificate):
                if name.startswith("*."):
                    wildcards.setdefault(name[2:], context)
                else:
                    byName.setdefault(name, context)
        self._byName, self._wildcards = byName, wildcards
        self._default = default or first

    def reload(self) -> None:
        """
        SIGHUP: new handshakes get the certificates as the folder now has
        them; open connections keep theirs.
        """
        try:
            self.load()
        except ConfigError as e:
            self.log.error("TLS certificates not reloaded, the old ones stay: {error}", error=str(e))
        else:
            self.log.info("TLS certificates reloaded from {folder}", folder=self.folder)

    def contextFor(self, name: Optional[str]) -> SSL.Context:
        if name:
            name = name.lower().rstrip(".")
            context = self._byName.get(name)
            if context is not None:
                return context
            parent = name.split(".", 1)[1] if "." in name else None
            if parent is not None and parent in self._wildcards:
                return self._wildcards[parent]
        return self._default

    def _servername(self, connection) -> None:
        name = connection.get_servername()
        context = self.contextFor(name.decode("ascii", "replace") if name else None)
        connection.set_context(context)

    def getContext(self) -> SSL.Context:
        """
        The context a handshake starts with (asked for each connection):
        the default certificate, until the client names another.
        """
        return self._default


def selectProtocol(protocols, offered):
    """
    The first of C{protocols} (the server's order) the client offered.
    """
    for protocol in protocols:
        if protocol in offered:
            return protocol
    return SSL.NO_OVERLAPPING_PROTOCOLS


def offerProtocols(endpoint, protocols) -> None:
    """
    Have an C{ssl:} port's endpoint offer C{protocols} by ALPN.

    Its context is shared by its connections and set up here, once, before
    the first (recent pyOpenSSL refuses to change a context in use).
    """
    if not isinstance(endpoint, SSL4ServerEndpoint):
        return
    protocols = tuple(protocols)
    context = _twisted.sslContextFactory(endpoint).getContext()
    context.set_alpn_select_callback(lambda connection, offered: selectProtocol(protocols, offered))


def tlsEndpoint(reactor, description: str, store: Optional[CertificateStore]):
    """
    The endpoint of a C{tls:PORT[:interface=ADDRESS]} port.

    @raise ConfigError: no C{--tls-cert}, or a malformed description.
    """
    if store is None:
        raise ConfigError(f"port: {description} needs --tls-cert DIR")
    parts = description.split(":")[1:]
    if not parts or not parts[0].isdigit():
        raise ConfigError(f"port: {description!r} is not tls:PORT[:interface=ADDRESS]")
    options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    unknown = set(options) - {"interface", "backlog"}
    if unknown or len(options) != len(parts) - 1:
        raise ConfigError(f"port: {description!r} is not tls:PORT[:interface=ADDRESS]")
    return SSL4ServerEndpoint(
        reactor,
        int(parts[0]),
        store,
        backlog=int(options.get("backlog", 50)),
        interface=options.get("interface", ""),
    )
