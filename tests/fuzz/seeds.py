"""
The hand-written seeds of the fuzz corpus: C{python -m tests.fuzz.seeds
FOLDER} writes them into FOLDER/<target>/.  The committed corpus
(C{tests/fuzz/corpus}) started from these and was grown by the fuzzers,
then minimized (see C{tests/fuzz/run.sh}).
"""

import hashlib
import os
import sys

from tests.fuzz._common import join

GET = b"GET / HTTP/1.1\r\nHost: balancer.example\r\n\r\n"

REQUESTS = [
    GET,
    b"GET /a?b=c HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nX-Request-ID: abc\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n" + GET,
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" + GET,
    b"POST /form HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello" + GET,
    b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n" + GET,
    b"PUT /big HTTP/1.1\r\nHost: h\r\nContent-Length: 2000\r\n\r\nxx",
    b"PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET http://h/abs?q HTTP/1.1\r\nHost: h\r\n"
    b"Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nTE: trailers\r\n"
    b"Upgrade: websocket\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
    b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
    b"DELETE /x HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\n",
    # Past the harness's limits: a long line, many headers, a long body.
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Long: " + b"x" * 600 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-N: n\r\n" * 25 + b"\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"20\r\n" + b"y" * 32 + b"\r\n" + b"30\r\n" + b"z" * 48 + b"\r\n0\r\n\r\n",
]

RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"
    b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nbody until close",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
    b"HTTP/1.1 200\r\nContent-Length: 1\r\n\r\nx",
]

HEADERS = [
    b"\x00\x00\x00\x00\nHost: client.example\nAccept: */*\nX-Multi: a\nX-Multi: b",
    b"\x08\x02\x00\x05\nHost: h\nConnection: keep-alive, X-Secret\nX-Secret: 1\n"
    b"Keep-Alive: timeout=5\nProxy-Connection: keep-alive\nTE: trailers\nTrailer: X-C\n"
    b"Upgrade: websocket\nTransfer-Encoding: chunked\nContent-Length: 5",
    b"\x11\x00\x01\x00\nHost: h:8000\nLocation: http://backend.example/next\n"
    b"Content-Location: /here\nX-Forwarded-For: 10.0.0.1\nX-Forwarded-Host: evil\n"
    b"X-Forwarded-Prefix: /evil",
    b"\x62\x06\x03\x00\nHost: h\nLocation: https://[::1]:443/x?y#z\n"
    b"Connection: host, x-forwarded-for, x-request-id\nX-Request-ID: mine",
    b"\xb3\x03\x02\x00\nLocation: HTTPS://BACKEND.EXAMPLE:8443\nLocation: //other/x\n"
    b"Connection: ,,, close ,\nconnection: Location",
]

_CONFIG_FILES = [
    # The example shipped at the project's root is added by write().
    b'backend = "http://127.0.0.1:8081"\n',
    b'port = [8000, "tcp:8001:interface=127.0.0.1"]\nadmin = "none"\nworkers = "auto"\n'
    b'backend = ["http://a:81,weight=3", "https://b,backup"]\n',
    b'demo = true\nadmin = 9000\naccess_log = "-"\naccess_log_format = "json"\n'
    b'request_id_header = "none"\nmax_body_size = 0\nshutdown_grace = 0\n'
    b'[health]\nenabled = false\npath = "/ping"\ninterval = 0.5\nrise = 1\nfall = 1\n',
    b'[[backend]]\nurl = "http://[::1]:8081"\nweight = 2\n[[backend]]\nurl = "http://x"\n'
    b'backup = true\nhost_header = "backend"\nbackend_timeout = 1.5\n',
    b'backend = "http://a"\nadmin = "tcp:8001:interface=0.0.0.0"\n',
    b'backend = "http://a"\nhealth = 3\n',
    b'backend = "ftp://a"\nbackend_tmeout = 1\n',
]
_COMMAND_LINES = [
    ["--backend", "http://127.0.0.1:8081"],
    ["-b", "http://a", "-b", "http://b,weight=2", "-p", "8000", "-p", "tcp:8001", "--admin", "none"],
    ["--demo", "--no-health-checks", "--workers", "2", "--admin", "none", "--check"],
    ["--backend", "http://a", "--health-interval", "0", "--max-body-size", "-1"],
    ["--config", "missing.toml", "--backend", "http://a"],
    ["-b", "https://backend.example:8443", "-b", "https://[::1]", "--check"],
    ["--version"],
    ["--bogus"],
    ["--backend"],
]


def _configSeeds(root: str):
    seeds = [b"\x00" + text for text in _CONFIG_FILES]
    example = os.path.join(root, "balancer.toml")
    with open(example, "rb") as f:
        seeds.append(b"\x00" + f.read())
    seeds += [b"\x01" + b"\x00".join(a.encode() for a in argv) for argv in _COMMAND_LINES]
    return seeds


def seeds(root: str):
    """
    The seeds of every target, by target.
    """
    requests = []
    for i, data in enumerate(REQUESTS):
        # Whole, byte by byte, and in uneven pieces, with various choices.
        requests.append(join(0, [], data))
        requests.append(join(i % 32, [1], data))
        requests.append(join((i * 7) % 32, [3, 17, 200], data))
    responses = []
    for i, data in enumerate(RESPONSES):
        responses.append(join(0, [], data, extra=1))
        responses.append(join((i * 37) % 8192, [1], data, extra=1))
        responses.append(join((i * 101) % 8192, [5, 2, 11], data, extra=1))
    return {
        "request_head": requests,
        "response": responses,
        "headers": list(HEADERS),
        "config": _configSeeds(root),
    }


def write(folder: str, root: str) -> None:
    for target, inputs in seeds(root).items():
        os.makedirs(os.path.join(folder, target), exist_ok=True)
        for data in inputs:
            name = hashlib.sha1(data).hexdigest()
            with open(os.path.join(folder, target, name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    write(sys.argv[1], os.path.dirname(os.path.dirname(here)))
