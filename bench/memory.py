"""
Memory of the balancer under the shapes that hurt proxies:

 - idle: RSS of a freshly started balancer (after a few requests);
 - idle connections: RSS growth with N idle keep-alive client connections;
 - slow reader: RSS growth while one client reads a large response slowly
   from a fast backend (backpressure must hold the backend back).

Everything listens on 127.0.0.1; every phase is bounded in time.

    python bench/memory.py [--python PYTHON] [--connections 2000]
                           [--size-mib 512] [--rate-mib 2]
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

BACKEND = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site, NOT_DONE_YET

    CHUNK = b"x" * 65536

    class Big(Resource):
        isLeaf = True
        def render_GET(self, request):
            size = int(request.args.get(b"mib", [b"0"])[0]) * 1024 * 1024
            if not size:
                return b"ok\\n"
            request.setHeader(b"content-length", b"%d" % size)
            state = {"left": size}
            class Producer:
                def resumeProducing(self):
                    n = min(len(CHUNK), state["left"])
                    state["left"] -= n
                    request.write(CHUNK[:n])
                    if not state["left"]:
                        request.unregisterProducer()
                        request.finish()
                def stopProducing(self):
                    state["left"] = 0
            request.registerProducer(Producer(), False)
            return NOT_DONE_YET

    site = Site(Big())
    site.log = lambda r: None
    reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
    reactor.run()
    """
)


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rssKiB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def waitFor(port: int, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"nothing answered on port {port}")


def get(port: int, path: str = "/") -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        while s.recv(65536):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rate-mib", type=float, default=2.0)
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="rrmemory-")
    backendPort, lbPort = freePort(), freePort()
    with open(os.path.join(folder, "backend.py"), "w") as f:
        f.write(BACKEND)
    procs = []
    try:
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(folder, "backend.py"), str(backendPort)],
            start_new_session=True,
        ))
        twistd = os.path.join(os.path.dirname(args.python), "twistd")
        lb = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "--logfile", os.path.join(folder, "lb.log"),
             "rrbalancer", "--port", f"tcp:{lbPort}:interface=127.0.0.1",
             "--backend", f"http://127.0.0.1:{backendPort}", "--client-timeout", "600"],
            start_new_session=True, cwd=folder,
        )
        procs.append(lb)
        waitFor(backendPort)
        waitFor(lbPort)
        for _ in range(20):
            get(lbPort)
        idle = rssKiB(lb.pid)
        print(f"idle RSS: {idle / 1024:.1f} MiB")

        conns = []
        for _ in range(args.connections):
            s = socket.create_connection(("127.0.0.1", lbPort), timeout=5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            conns.append(s)
        for s in conns:
            s.recv(4096)
        time.sleep(1)
        withConns = rssKiB(lb.pid)
        print(f"{args.connections} idle keep-alive connections: "
              f"+{(withConns - idle) / 1024:.1f} MiB")
        for s in conns:
            s.close()
        time.sleep(1)

        before = rssKiB(lb.pid)
        peak = before
        s = socket.create_connection(("127.0.0.1", lbPort), timeout=30)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(f"GET /?mib={args.size_mib} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        total = args.size_mib * 1024 * 1024
        got = 0
        rate = args.rate_mib * 1024 * 1024
        start = time.monotonic()
        deadline = start + total / rate * 1.5 + 30
        while got < total and time.monotonic() < deadline:
            data = s.recv(65536)
            if not data:
                break
            got += len(data)
            ahead = got / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
            peak = max(peak, rssKiB(lb.pid))
        s.close()
        print(f"slow reader: {got / 1024 / 1024:.0f} of {args.size_mib} MiB at "
              f"{args.rate_mib:g} MiB/s, RSS growth +{(peak - before) / 1024:.1f} MiB")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
