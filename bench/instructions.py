"""
What a request costs in CPU instructions, counted by valgrind: the one
figure of the request path that a busy or shared machine does not move.

wrk's requests per second on a shared two-core machine move by 10-20%
from one run to the next, more than a small change costs.  Here each
balancer config runs under `valgrind --tool=cachegrind --cache-sim=no`
twice, once serving a few hundred requests and once a few thousand more,
on one keep-alive connection from a plain socket client; the difference
of the two totals, divided by the difference of the counts, is the
instructions of one request, with the start and the stop taken out.
Health checks are turned off in every config, so that only requests are
counted.  The backends are three nginx servers on 127.0.0.1.

    python bench/instructions.py                  # plain, one route, one limit, both
    python bench/instructions.py --configs plain,both --requests 500,3500
    python bench/instructions.py --checks 20,60   # a health check's cost instead

With `--checks`, the plain balancer serves no request and checks its three
backends every 20 ms, for the first and then the second number of
seconds; the difference of the totals over the difference of the checks
done (read from `/metrics` just before each stop) is the instructions of
one check, timer and bookkeeping included.

Each config is a TOML file of this folder's `configs/`; the first is the
baseline the others are compared with.  Needs valgrind and nginx (Debian's
packages; installed if missing).
"""

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = os.path.join(HERE, "configs")
BACKEND_PORTS = (9601, 9602, 9603)
BALANCER_PORT = 9600
ADMIN_PORT = 9609
CHECK_INTERVAL = 0.02
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def ensurePackages() -> None:
    missing = [p for p, tool in (("valgrind", "valgrind"), ("nginx", "nginx"))
               if shutil.which(tool) is None and not os.path.exists("/usr/sbin/" + tool)]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-q"] + missing, check=True)


def startBackends(out: str) -> subprocess.Popen:
    conf = os.path.join(out, "nginx.conf")
    listens = "".join(f" listen 127.0.0.1:{p};" for p in BACKEND_PORTS)
    with open(conf, "w") as f:
        f.write(
            f"worker_processes 1; daemon off; pid {out}/nginx.pid; error_log {out}/nginx.err;\n"
            "events { worker_connections 1024; }\n"
            "http { access_log off; keepalive_requests 1000000;\n"
            f"  server {{{listens} location / {{ return 200 \"ok\\n\"; }} }} }}\n"
        )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return subprocess.Popen([nginx, "-c", conf, "-p", out], stdin=subprocess.DEVNULL)


def writeConfig(name: str, out: str) -> str:
    """
    The named config, on the bench's ports, with health checks off.
    """
    with open(os.path.join(CONFIGS, name + ".toml")) as f:
        body = f.read()
    path = os.path.join(out, name + ".toml")
    backends = "".join(f'[[backend]]\nurl = "http://127.0.0.1:{p}"\n' for p in BACKEND_PORTS)
    with open(path, "w") as f:
        f.write(
            f'port = "tcp:{BALANCER_PORT}:interface=127.0.0.1"\nadmin = "none"\n'
            f"{backends}{body}\n[health]\nenabled = false\n"
        )
    return path


def serve(count: int, seconds: float = 300.0) -> None:
    """
    C{count} requests one after the other on one connection, once the
    balancer listens (valgrind takes a while to start it).
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", BALANCER_PORT), timeout=60)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("instructions: the balancer did not listen")
            time.sleep(0.5)
    with sock:
        for _ in range(count):
            sock.sendall(REQUEST)
            data = b""
            while not data.endswith(b"ok\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise SystemExit("instructions: the balancer closed the connection")
                data += chunk


def instructions(config: str, count: int, out: str, warmup: int) -> int:
    """
    The instructions a balancer ran from its start to its stop, having
    served C{warmup} and then C{count} requests.
    """
    log = os.path.join(out, f"valgrind-{os.path.basename(config)}-{count}.log")
    env = dict(os.environ, PYTHONPATH=ROOT)
    with open(os.path.join(out, "balancer.log"), "ab") as output:
        balancer = subprocess.Popen(valgrind(log) + [config], env=env, stdout=output,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        serve(warmup)
        serve(count)
    finally:
        balancer.terminate()
        balancer.wait(120)
    return instructionsIn(log)


def valgrind(log: str) -> List[str]:
    """
    The command that runs the balancer under cachegrind, counting
    instructions only; its config file comes last.
    """
    out = os.path.dirname(log)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return [
        "valgrind", "--tool=cachegrind", "--cache-sim=no",
        f"--cachegrind-out-file={out}/cachegrind.%p", f"--log-file={log}",
        sys.executable, twistd, "-n", "--pidfile=", "rrbalancer", "--config",
    ]


def instructionsIn(log: str) -> int:
    with open(log) as f:
        match = re.search(r"I\s+refs:\s+([\d,]+)", f.read())
    if match is None:
        raise SystemExit(f"instructions: no count in {log}")
    return int(match.group(1).replace(",", ""))


def checkConfig(out: str) -> str:
    """
    The plain config, checking its backends every L{CHECK_INTERVAL}, with
    the admin API on for its metrics.
    """
    path = os.path.join(out, "checks.toml")
    backends = "".join(f'[[backend]]\nurl = "http://127.0.0.1:{p}"\n' for p in BACKEND_PORTS)
    with open(path, "w") as f:
        f.write(
            f'port = "tcp:{BALANCER_PORT}:interface=127.0.0.1"\n'
            f'admin = "tcp:{ADMIN_PORT}:interface=127.0.0.1"\n'
            f'{backends}[health]\npath = "/"\ninterval = {CHECK_INTERVAL}\n'
        )
    return path


def checksDone(wait: float = 0.0) -> int:
    """
    The checks counted so far, from the admin API's metrics (waiting up to
    C{wait} seconds for it to answer).
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN_PORT}/metrics", timeout=60) as r:
                text = r.read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("instructions: the admin API did not answer")
            time.sleep(0.5)
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("rrbalancer_health_checks_total{")
    )


def checkInstructions(seconds: float, out: str) -> Tuple[int, int]:
    """
    The instructions a balancer ran from its start to its stop, checking
    for C{seconds} once it answered, and the checks it counted.
    """
    log = os.path.join(out, f"valgrind-checks-{seconds:g}.log")
    balancer = subprocess.Popen(
        valgrind(log) + [checkConfig(out)], env=dict(os.environ, PYTHONPATH=ROOT),
        stdout=open(os.path.join(out, "balancer.log"), "ab"), stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        checksDone(wait=300)
        time.sleep(seconds)
        checks = checksDone()
    finally:
        balancer.terminate()
        balancer.wait(120)
    return instructionsIn(log), checks


def measureChecks(spans: str, out: str) -> None:
    short, long = (float(s) for s in spans.split(","))
    if long <= short:
        raise SystemExit("instructions: --checks: the second span must be longer")
    i1, c1 = checkInstructions(short, out)
    i2, c2 = checkInstructions(long, out)
    print("| health checks | instructions a check |")
    print("|---:|---:|")
    print(f"| {c2 - c1:,} | {(i2 - i1) / (c2 - c1):,.0f} |")
    print(
        f"\n(valgrind cachegrind; three backends checked every {CHECK_INTERVAL * 1000:g} ms,"
        f" {short:g} s and {long:g} s; output in {out})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="plain,route,limit,both",
                        help="names of configs/*.toml, the first the baseline")
    parser.add_argument("--requests", default="500,3500",
                        help="the two request counts whose difference is measured")
    parser.add_argument("--warmup", type=int, default=200, help="requests before either count")
    parser.add_argument("--checks", metavar="S,S",
                        help="measure a health check instead, over these two spans (seconds)")
    args = parser.parse_args()
    if args.checks:
        ensurePackages()
        out = tempfile.mkdtemp(prefix="instructions-")
        backends = startBackends(out)
        try:
            measureChecks(args.checks, out)
        finally:
            backends.terminate()
            backends.wait(10)
        return
    low, high = (int(n) for n in args.requests.split(","))
    if high <= low:
        parser.error("--requests: the second count must be larger")
    ensurePackages()
    out = tempfile.mkdtemp(prefix="instructions-")
    backends = startBackends(out)
    try:
        results = []
        for name in args.configs.split(","):
            config = writeConfig(name, out)
            first = instructions(config, low, out, args.warmup)
            second = instructions(config, high, out, args.warmup)
            results.append((name, (second - first) / (high - low)))
            print(f"instructions: {name}: {results[-1][1]:,.0f} a request", file=sys.stderr)
    finally:
        backends.terminate()
        backends.wait(10)
    base = results[0][1]
    print(f"| config | instructions a request | vs {results[0][0]} |")
    print("|---|---:|---:|")
    for name, per in results:
        print(f"| {name} | {per:,.0f} | {per / base - 1:+.1%} |")
    print(f"\n(valgrind cachegrind; {high - low} requests between the two runs; output in {out})")


if __name__ == "__main__":
    main()
