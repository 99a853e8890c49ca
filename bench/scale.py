"""
What a balancer's cost does as its backend count grows.

One nginx backend listens on N loopback addresses 127.2.x.y:PORT (never on
0.0.0.0: all of 127.0.0.0/8 reaches loopback on Linux), so that a balancer
sees N distinct servers, each health-checked once a second.  For each N and
each balancer: its idle CPU over a few seconds (health checks only), then
`wrk -t1 -c64 -d8s` throughput and p99 latency through it, and its RSS; each
N is compared with the first.  The balancer is pinned to core 0, wrk and the
backend to core 1.  Everything it starts is stopped on exit.

    python bench/scale.py                          # N = 3,1000,10000; rrbalancer, and haproxy if installed
    python bench/scale.py --counts 3,1000 --targets rrbalancer
    python bench/scale.py --duration 4 --idle 3    # quicker
    python bench/scale.py --rounds 3               # medians of three runs (the machine is shared)
    python bench/scale.py --counts 3,1000 --interval 0   # no health checks: their cost, by difference
    pypy3 bench/scale.py --warmup 60 --duration 30       # PyPy, measured after its JIT warmed up

rrbalancer runs from this work tree (`twistd -n rrbalancer --config FILE`
with PYTHONPATH set to it), with the Python that runs this script.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LB_CPU = "0"
LOAD_CPU = "1"
PORTS = {"rrbalancer": 8200, "haproxy": 8201}


def addresses(n: int, port: int):
    return ["127.2.%d.%d:%d" % (i // 250, i % 250 + 2, port) for i in range(n)]


class Processes:
    """
    Everything the benchmark started, each in a process group of its own,
    so that stopping one stops its children too.
    """

    def __init__(self) -> None:
        self.running = []

    def start(self, argv, cpu, log, env=None):
        with open(log, "ab") as out:
            p = subprocess.Popen(
                ["taskset", "-c", cpu] + argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self.running.append(p)
        return p

    def stop(self, p, grace=10.0) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if p in self.running:
            self.running.remove(p)

    def stopAll(self) -> None:
        for p in list(self.running):
            self.stop(p, grace=5.0)


def cpuSeconds(pid: int) -> float:
    return sum(cpuSplit(pid))


def cpuSplit(pid: int):
    """
    The CPU seconds C{pid} has spent so far: in its own code, and in the
    kernel's (system calls, the network stack).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def rssMiB(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def waitServing(port: int, p, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if p.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.status == 200:
                    return True
        except Exception:
            pass
        time.sleep(0.2)
    return False


def waitListening(address: str, seconds: float) -> bool:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def writeBackend(out: str, addrs) -> str:
    # Every worker holds every listening socket: two workers share the
    # connections when there are many addresses, within the fd limit.
    workers = 2 if len(addrs) > 4000 else 1
    path = os.path.join(out, "backend.conf")
    with open(path, "w") as f:
        f.write(
            f"worker_processes {workers}; daemon off; pid {out}/backend.pid;\n"
            f"error_log {out}/backend.err; worker_rlimit_nofile 19500;\n"
            "events { worker_connections 19000; }\n"
            "http { access_log off; keepalive_requests 1000000; keepalive_timeout 75s;\n"
            "  server {\n"
        )
        f.writelines(f"    listen {a};\n" for a in addrs)
        f.write('    location / { return 200 "ok\\n"; } } }\n')
    return path


def writeRRBalancer(out: str, addrs, interval: float) -> str:
    path = os.path.join(out, "rr.toml")
    with open(path, "w") as f:
        f.write(
            f'port = "tcp:{PORTS["rrbalancer"]}:interface=127.0.0.1"\nadmin = "none"\n'
            + (f'[health]\npath = "/"\ninterval = {interval:g}\n' if interval
               else "[health]\nenabled = false\n")
        )
        f.writelines(f'[[backend]]\nurl = "http://{a}"\n' for a in addrs)
    return path


def writeHAProxy(out: str, addrs, interval: float) -> str:
    path = os.path.join(out, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(
            "global\n maxconn 4000\ndefaults\n mode http\n timeout connect 2s\n"
            " timeout client 30s\n timeout server 30s\nfrontend f\n"
            f" bind 127.0.0.1:{PORTS['haproxy']}\n default_backend b\nbackend b\n"
            " balance roundrobin\n option httpchk GET /\n http-reuse always\n"
        )
        check = f" check inter {int(interval * 1000)}ms" if interval else ""
        f.writelines(f" server s{i} {a}{check}\n" for i, a in enumerate(addrs))
    return path


def runWrk(port: int, seconds: float, connections: int):
    out = subprocess.run(
        [
            "taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}",
            f"-d{seconds:g}s", "--latency", f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\b", out, re.M)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    p99ms = None
    if p99:
        p99ms = float(p99.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p99": p99ms,
        "non2xx": int(bad.group(1)) if bad else 0,
        "errors": errors.group(1).strip() if errors else "",
    }


def measure(procs, target, n, addrs, args, out):
    port = PORTS[target]
    log = os.path.join(out, f"{target}-{n}.log")
    if target == "rrbalancer":
        config = writeRRBalancer(out, addrs, args.interval)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        env = dict(os.environ, PYTHONPATH=args.tree)
        argv = [twistd, "-n", "--pidfile=", "rrbalancer", "--config", config]
        p = procs.start(argv, LB_CPU, log, env=env)
    else:
        config = writeHAProxy(out, addrs, args.interval)
        p = procs.start(["haproxy", "-f", config], LB_CPU, log)
    try:
        if not waitServing(port, p, args.start_timeout):
            return {"error": f"did not serve (see {log})"}
        time.sleep(args.settle)
        if args.warmup:
            # PyPy's JIT compiles under load: what comes before is not its speed.
            runWrk(port, args.warmup, args.connections)
            time.sleep(args.settle)
        before = cpuSeconds(p.pid)
        time.sleep(args.idle)
        idle = (cpuSeconds(p.pid) - before) / args.idle * 100
        idleRSS = rssMiB(p.pid)
        user, system = cpuSplit(p.pid)
        started = time.monotonic()
        result = runWrk(port, args.duration, args.connections)
        elapsed = time.monotonic() - started
        userAfter, systemAfter = cpuSplit(p.pid)
        busy = (userAfter - user + systemAfter - system) / elapsed * 100
        kernel = (systemAfter - system) / elapsed * 100
        result.update(idle=idle, idleRSS=idleRSS, rss=rssMiB(p.pid), busy=busy, kernel=kernel)
        return result
    finally:
        procs.stop(p)


def cpuPerRequest(result, key: str = "busy") -> float:
    return result[key] / 100 / result["rps"] * 1e6 if result["rps"] else 0.0


def median(results):
    """
    The median of each figure over rounds (a round that failed fails all).
    """
    for r in results:
        if "error" in r:
            return r
    merged = dict(results[0])
    for key in ("rps", "p99", "idle", "idleRSS", "rss", "busy", "kernel"):
        values = sorted(r[key] for r in results if r[key] is not None)
        merged[key] = values[len(values) // 2] if values else None
    merged["non2xx"] = sum(r["non2xx"] for r in results)
    merged["errors"] = "; ".join(r["errors"] for r in results if r["errors"])
    return merged


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="3,1000,10000")
    parser.add_argument("--targets", default="rrbalancer,haproxy")
    parser.add_argument("--duration", type=float, default=8.0, help="wrk seconds")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measured")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after start before measuring")
    parser.add_argument(
        "--warmup", type=float, default=0.0,
        help="seconds of wrk load, not measured, before the idle CPU and the measured run (PyPy: 60)",
    )
    parser.add_argument(
        "--interval", type=float, default=1.0,
        help="health check interval; 0 for no checks (what they cost, by difference)",
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="measure each target at each N this many times and print the medians",
    )
    parser.add_argument("--backend-port", type=int, default=9100)
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument(
        "--tree", default=ROOT, help="the rrbalancer source tree to run (default: this one)"
    )
    args = parser.parse_args()
    if args.interval < 0:
        parser.error("--interval must be 0 (no checks) or more")
    if args.warmup < 0:
        parser.error("--warmup must be 0 (none) or more")
    counts = [int(c) for c in args.counts.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    for t in list(targets):
        if t not in PORTS:
            parser.error(f"unknown target {t}")
        if t == "haproxy" and shutil.which("haproxy") is None:
            print("haproxy is not installed: skipped", file=sys.stderr)
            targets.remove(t)
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed")

    out = tempfile.mkdtemp(prefix="scale-")
    procs = Processes()

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    first = {}
    print(f"logs and configs in {out}", file=sys.stderr)
    header = "%-11s %6s %10s %9s %9s %8s %8s %9s %9s %8s %9s %s" % (
        "target", "N", "req/s", "p99-ms", "load-cpu", "cpu-us", "sys-us", "idle-cpu", "idle-rss",
        "rss-MiB", "vs-N" + str(counts[0]), "notes",
    )
    print(header)
    try:
        for n in counts:
            addrs = addresses(n, args.backend_port)
            backend = procs.start(
                ["nginx", "-c", writeBackend(out, addrs)], LOAD_CPU, os.path.join(out, f"backend-{n}.log")
            )
            if not (waitListening(addrs[0], 30) and waitListening(addrs[-1], 30)):
                sys.exit(f"the backend did not start (see {out}/backend.err)")
            for target in targets:
                r = median([measure(procs, target, n, addrs, args, out) for _ in range(args.rounds)])
                if "error" in r:
                    print("%-11s %6d  %s" % (target, n, r["error"]), flush=True)
                    continue
                base = first.setdefault(target, r)
                ratio = "%.2f/%.2f" % (
                    r["rps"] / base["rps"] if base["rps"] else 0,
                    r["p99"] / base["p99"] if base["p99"] else 0,
                )
                notes = []
                if r["non2xx"]:
                    notes.append(f"non-2xx: {r['non2xx']}")
                if r["errors"]:
                    notes.append(f"socket errors: {r['errors']}")
                print(
                    "%-11s %6d %10.0f %9.2f %8.0f%% %8.0f %8.0f %8.1f%% %9.1f %8.1f %9s %s"
                    % (
                        target, n, r["rps"], r["p99"] or 0, r["busy"], cpuPerRequest(r),
                        cpuPerRequest(r, "kernel"), r["idle"], r["idleRSS"], r["rss"], ratio,
                        "; ".join(notes),
                    ),
                    flush=True,
                )
            procs.stop(backend)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        procs.stopAll()
    print(
        "(load-cpu: the balancer's CPU under wrk, 100% being its whole core; cpu-us: its"
        " CPU microseconds per request, health checks included, which a busy machine"
        " moves less than req/s; sys-us: the part of it in the kernel; idle-rss:"
        " RSS in MiB before the load, rss-MiB after it; vs-N: throughput ratio / p99"
        " ratio against the first N)"
    )


if __name__ == "__main__":
    main()
