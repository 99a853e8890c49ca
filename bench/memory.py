"""
Memory of the balancer under the shapes that hurt proxies:

 - idle: RSS of a freshly started balancer (after a few requests);
 - idle connections: RSS growth with N idle keep-alive client connections;
 - slow reader: RSS growth while one client reads a large response slowly
   from a fast backend (backpressure must hold the backend back);
 - load: RSS sampled under full load (wrk -t1 -c64) for --minutes, its
   slope after the warm-up (MiB per minute) and its steady level: memory
   that grows with the requests served shows here, and only here.

The balancer is the twistd next to --python (CPython or PyPy), with the
rrbalancer installed there.  Everything listens on 127.0.0.1; every phase
is bounded in time.

    python bench/memory.py [--python PYTHON] [--phases idle,connections,slow,load]
                           [--connections 2000] [--size-mib 512] [--rate-mib 2]
                           [--minutes 1] [--sample-secs 5] [--warmup-minutes 2]
                           [--env NAME=VALUE ...]
"""

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
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


NGINX = textwrap.dedent(
    """
    worker_processes 1;
    daemon off;
    pid {folder}/nginx.pid;
    error_log {folder}/nginx.err warn;
    events {{ worker_connections 4096; }}
    http {{
        access_log off;
        keepalive_requests 1000000;
        keepalive_timeout 75s;
        client_body_temp_path {folder}/nginx-body;
        proxy_temp_path {folder}/nginx-proxy;
        fastcgi_temp_path {folder}/nginx-fastcgi;
        uwsgi_temp_path {folder}/nginx-uwsgi;
        scgi_temp_path {folder}/nginx-scgi;
        default_type text/plain;
    {servers}
    }}
    """
)
NGINX_SERVER = '    server {{ listen 127.0.0.1:{port} backlog=4096; return 200 "{body}\\n"; }}'


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


def pinned(cpu: int, argv: list) -> list:
    """
    C{argv} run on one CPU (as bench/run.sh does), when there are two
    CPUs or more and taskset is there; else as it is.
    """
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(cpu)] + argv
    return argv


def interpreter(python: str) -> str:
    return subprocess.run(
        [python, "-c", "import platform, sys, twisted; v = getattr(sys, 'pypy_version_info', None); "
         "print(platform.python_implementation(), "
         "'.'.join(map(str, v[:3])) + ' (Python ' + platform.python_version() + ')' if v "
         "else platform.python_version(), '/ Twisted', twisted.__version__)"],
        capture_output=True, text=True, timeout=60,
    ).stdout.strip()


def slope(samples: list) -> float:
    """
    The least-squares slope of (seconds, KiB) samples, in MiB per minute.
    """
    if len(samples) < 2:
        return float("nan")
    xs = [t for t, _ in samples]
    ys = [kib / 1024 for _, kib in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den * 60 if den else float("nan")


def sustainedLoad(args, lb, lbPort: int, folder: str) -> None:
    """
    wrk at full load for --minutes, the balancer's RSS sampled every
    --sample-secs; then the slope after the warm-up and the steady level.
    """
    wrk = shutil.which("wrk")
    if wrk is None:
        print("load: skipped (no wrk)")
        return
    seconds = max(1, round(args.minutes * 60))
    out = open(os.path.join(folder, "wrk.txt"), "w")
    load = subprocess.Popen(
        pinned(1, [wrk, "-t1", "-c64", f"-d{seconds}s", f"http://127.0.0.1:{lbPort}/"]),
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    start = time.monotonic()
    samples = [(0.0, rssKiB(lb.pid))]
    try:
        while load.poll() is None:
            if time.monotonic() - start > seconds + 60:
                raise SystemExit("load: wrk did not end in time")
            time.sleep(min(args.sample_secs, max(0.1, seconds + 1 - (time.monotonic() - start))))
            if load.poll() is None:
                samples.append((time.monotonic() - start, rssKiB(lb.pid)))
    finally:
        if load.poll() is None:
            os.killpg(load.pid, signal.SIGTERM)
            load.wait(timeout=15)
        out.close()
    with open(os.path.join(folder, "wrk.txt")) as f:
        report = f.read()
    rate = re.search(r"Requests/sec:\s*([\d.]+)", report)
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", report))
    socketErrors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", report
    )
    if socketErrors:
        errors += sum(int(n) for n in socketErrors.groups())
    warmup = min(args.warmup_minutes * 60, seconds / 2)
    steady = [(t, kib) for t, kib in samples if t >= warmup]
    levels = [kib / 1024 for _, kib in steady]
    print(
        f"load: wrk -t1 -c64 for {seconds / 60:g} min: "
        f"{float(rate.group(1)) if rate else 0:,.0f} req/s, {errors} errors"
    )
    shown = samples[:: max(1, len(samples) // 40)]
    print("  RSS MiB at: " + " ".join(f"{t / 60:.1f}m={kib / 1024:.0f}" for t, kib in shown))
    if steady:
        print(
            f"  after {warmup / 60:g} min of warm-up: slope {slope(steady):+.2f} MiB/min, "
            f"steady {statistics.median(levels):.1f} MiB (median; "
            f"min {min(levels):.1f}, max {max(levels):.1f}); "
            f"start {samples[0][1] / 1024:.1f}, end {samples[-1][1] / 1024:.1f}"
        )


def startBackends(folder: str, fallback: int, count: int = 3) -> tuple:
    """
    Backends for the load: three nginx servers on loopback ports, as in
    bench/run.sh; without nginx, the Twisted backend already running on
    port C{fallback} (then it, not the balancer, may be the bottleneck).
    Returns (process or None, ports).
    """
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if nginx is None:
        print("load: no nginx; the Twisted backend serves the load")
        return None, [fallback]
    ports = [freePort() for _ in range(count)]
    servers = "\n".join(
        NGINX_SERVER.format(port=port, body=f"backend {i + 1} " + "=" * 80)
        for i, port in enumerate(ports)
    )
    conf = os.path.join(folder, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX.format(folder=folder, servers=servers))
    return subprocess.Popen(
        pinned(1, [nginx, "-p", folder, "-e", os.path.join(folder, "nginx.err"), "-c", conf]),
        start_new_session=True,
    ), ports


def get(port: int, path: str = "/") -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        while s.recv(65536):
            pass


PHASES = ("idle", "connections", "slow", "load")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable,
                        help="the balancer runs with the twistd next to this interpreter")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"which phases, of {','.join(PHASES)} (idle always runs)")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rate-mib", type=float, default=2.0)
    parser.add_argument("--minutes", type=float, default=1.0, help="length of the load phase")
    parser.add_argument("--sample-secs", type=float, default=5.0)
    parser.add_argument("--warmup-minutes", type=float, default=2.0,
                        help="left out of the slope (at most half the load phase)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="set in the balancer's environment (e.g. PYPY_GC_NURSERY=64MB)")
    args = parser.parse_args()
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    unknown = phases - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    if not 0 < args.minutes <= 120 or not 0 < args.sample_secs <= 600:
        parser.error("--minutes must be in (0, 120] and --sample-secs in (0, 600]")
    environment = dict(os.environ)
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--env: expected NAME=VALUE, got {item!r}")
        environment[name] = value

    # SIGTERM (timeout, kill) ends the run as Ctrl-C does: through the
    # clean-up below, so that no backend or balancer is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    folder = tempfile.mkdtemp(prefix="rrmemory-")
    with open(os.path.join(folder, "backend.py"), "w") as f:
        f.write(BACKEND)
    procs = []
    try:
        backendPort = freePort()
        procs.append(subprocess.Popen(
            pinned(1, [sys.executable, os.path.join(folder, "backend.py"), str(backendPort)]),
            start_new_session=True,
        ))
        waitFor(backendPort)
        print(f"balancer: {interpreter(args.python)}"
              + "".join(f"; {item}" for item in args.env))
        lb, lbPort = startBalancer(args, folder, [backendPort], environment, "lb", procs)
        print(f"idle RSS: {rssKiB(lb.pid) / 1024:.1f} MiB")
        if "connections" in phases:
            idleConnections(args, lb, lbPort)
        if "slow" in phases:
            slowReader(args, lb, lbPort)
        stop(lb)

        if "load" in phases:
            # A balancer of its own, over backends fast enough not to be
            # what is measured.
            backends, ports = startBackends(folder, backendPort)
            if backends is not None:
                procs.append(backends)
            for port in ports:
                waitFor(port)
            lb, lbPort = startBalancer(args, folder, ports, environment, "lb-load", procs)
            print(f"load: {len(ports)} backends; idle RSS before it: "
                  f"{rssKiB(lb.pid) / 1024:.1f} MiB")
            sustainedLoad(args, lb, lbPort, folder)
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(folder, ignore_errors=True)


def startBalancer(args, folder: str, ports: list, environment: dict, name: str, procs: list):
    """
    The balancer on a free loopback port, on CPU 0, after 20 requests and
    4 seconds of rest; added to C{procs} as soon as it runs, so that it is
    stopped however the run ends.  Returns (process, port).
    """
    lbPort = freePort()
    twistd = os.path.join(os.path.dirname(args.python), "twistd")
    command = [twistd, "-n", "--pidfile=", "--logfile", os.path.join(folder, name + ".log"),
               "rrbalancer", "--port", f"tcp:{lbPort}:interface=127.0.0.1",
               "--admin", "none", "--client-timeout", "600"]
    for port in ports:
        command += ["--backend", f"http://127.0.0.1:{port}"]
    # From the temporary folder: twistd puts its working directory on
    # sys.path, and the checkout's rrbalancer must not shadow the one
    # installed beside --python.
    lb = subprocess.Popen(pinned(0, command), start_new_session=True, cwd=folder,
                          env=environment)
    procs.append(lb)
    waitFor(lbPort)
    for _ in range(20):
        get(lbPort)
    time.sleep(4)
    return lb, lbPort


def stop(process) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def idleConnections(args, lb, lbPort: int) -> None:
    idle = rssKiB(lb.pid)
    conns = []
    try:
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
    finally:
        for s in conns:
            s.close()
    time.sleep(1)


def slowReader(args, lb, lbPort: int) -> None:
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


if __name__ == "__main__":
    main()
