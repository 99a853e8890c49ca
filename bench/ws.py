"""
WebSocket echo through rrbalancer, beside NGINX, and straight to the
backend.

One echo backend (bench/ws_peers.py, under PyPy when there is one) on
127.0.0.1 and core 1, with the load client; each front alone on core 0:
rrbalancer (this tree, twistd of the Python that runs this script, default
settings) and NGINX (one worker, configured for WebSocket as its
documentation says: proxy_http_version 1.1, the Upgrade header passed,
Connection "upgrade").  Every target is first checked with the
C{websockets} library (a text echo); then, in interleaved rounds:

- handshakes: new connections, each an upgrade, one 32-byte message
  echoed and a close both ways, C{--concurrency} at once;
- messages: C{--connections} open WebSockets, each sending a 32-byte
  message and waiting for its echo, again and again.

Each run is bounded in time (C{--seconds}, after C{--warmup} unmeasured)
and in count (C{--limit}).  One table per run kind: exchanges per second,
latency p50/p99 (medians over the rounds), errors, the front's CPU (share
of its core, and microseconds per exchange), and the ratios to NGINX and
to the backend alone (direct).  Direct shows what the client and the
backend can do on their core: a front near it is held back by them, not
by itself; its CPU per exchange then still compares.

    python bench/ws.py                    # 3 rounds of 8 s (about 3 minutes)
    python bench/ws.py --quick            # a smoke run
    python bench/ws.py --pypy             # rrbalancer on PyPy too (15 s warm-up)

Everything it starts is stopped on exit.
"""

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scale import Processes, waitListening  # noqa: E402
# The same layout as uneven.py's: the fronts on core 0, the rest on core 1.
from uneven import (  # noqa: E402
    HERE, HOST, LB_CPU, LOAD_CPU, ROOT, groupCPU, loadavg, toolVersion, treeAndMachine,
    writeReport,
)
from ws_peers import Histogram  # noqa: E402

PEERS = os.path.join(HERE, "ws_peers.py")
# name: (kind, on PyPy)
TARGETS = {
    "direct": ("direct", False),
    "rrbalancer": ("rrbalancer", False),
    "rr-pypy": ("rrbalancer", True),
    "nginx": ("nginx", False),
}
KINDS = {
    "handshakes": "handshakes/s (connect, upgrade, one echo, close)",
    "messages": "messages/s (echoes over open connections)",
}


def say(text):
    print("wsbench: " + text, file=sys.stderr, flush=True)


def die(text):
    say(text)
    sys.exit(2)


def nginxConfig(out, port, backend):
    path = os.path.join(out, "nginx.conf")
    temp = os.path.join(out, "tmp")
    os.makedirs(temp, exist_ok=True)
    with open(path, "w") as f:
        f.write(
            f"worker_processes 1;\ndaemon off;\npid {temp}/nginx.pid;\n"
            f"error_log {out}/nginx.err warn;\nevents {{ worker_connections 4096; }}\n"
            "http {\n    access_log off;\n"
            + "".join(f"    {k}_temp_path {temp}/{k};\n"
                      for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
            + f"    server {{\n        listen {HOST}:{port} backlog=4096;\n"
            "        location / {\n"
            f"            proxy_pass http://{HOST}:{backend};\n"
            "            proxy_http_version 1.1;\n"
            "            proxy_set_header Upgrade $http_upgrade;\n"
            '            proxy_set_header Connection "upgrade";\n'
            "            proxy_read_timeout 3600s;\n"
            "        }\n    }\n}\n"
        )
    return path


def startTarget(procs, name, port, backend, args, out):
    kind, onPyPy = TARGETS[name]
    log = os.path.join(out, f"{name}.log")
    if kind == "rrbalancer":
        if onPyPy:
            from uneven import pypyVenv

            twistd = os.path.join(os.path.dirname(pypyVenv(args.tree)), "twistd")
        else:
            twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        argv = [twistd, "-n", "--pidfile=", "rrbalancer", "--port", f"tcp:{port}:interface={HOST}",
                "--backend", f"http://{HOST}:{backend}", "--admin", "none"]
        argv += args.rr_args.split()
        return procs.start(argv, LB_CPU, log, env=dict(os.environ, PYTHONPATH=args.tree))
    config = nginxConfig(out, port, backend)
    return procs.start(["nginx", "-p", out, "-e", os.path.join(out, "nginx.err"), "-c", config],
                       LB_CPU, log)


def check(port):
    """
    A text message echoed through C{port} by the C{websockets} library's
    client: None, or what went wrong.
    """
    from websockets.sync.client import connect

    try:
        with connect(f"ws://{HOST}:{port}/check", open_timeout=10, close_timeout=10,
                     proxy=None) as ws:
            ws.send("héllo through")
            answer = ws.recv(timeout=10)
        return None if answer == "héllo through" else f"echoed {answer!r}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def load(kind, port, args, seconds, warmup, raw=None):
    """
    One run of C{args.clients} client processes at once: their figures
    added up (a rate, latencies in ms), or a dict with an C{error}.
    """
    n = args.clients
    if kind == "handshakes":
        shares = [args.concurrency // n + (i < args.concurrency % n) for i in range(n)]
        extra = lambda share: ["--concurrency", str(share)]  # noqa: E731
    else:
        shares = [args.connections // n + (i < args.connections % n) for i in range(n)]
        extra = lambda share: ["--connections", str(share), "--size", str(args.size)]  # noqa: E731
    limit = max(1, args.limit // n)
    clients = [
        subprocess.Popen(
            ["taskset", "-c", LOAD_CPU, args.peer_python, PEERS, kind, str(port),
             "--seconds", f"{seconds:g}", "--warmup", f"{warmup:g}", "--limit", str(limit)]
            + extra(share),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for share in shares if share
    ]
    reports, problems = [], []
    for p in clients:
        try:
            stdout, stderr = p.communicate(timeout=warmup + seconds + 120)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        if raw:
            with open(raw, "a") as f:
                f.write(stdout + stderr)
        try:
            reports.append(json.loads(stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            problems.append((stderr.strip().splitlines() or ["no output"])[-1])
    if problems:
        return {"error": "client failed: " + problems[0]}
    histogram = Histogram()
    for r in reports:
        histogram.merge(Histogram({int(k): v for k, v in r["histogram"].items()}))
    return {
        "rate": sum(r["count"] / r["seconds"] for r in reports),
        "count": sum(r["count"] for r in reports),
        "all": sum(r["all"] for r in reports),
        "errors": sum(r["errors"] for r in reports),
        "p50": histogram.percentile(50),
        "p99": histogram.percentile(99),
    }


def measure(kind, name, port, pgid, args, out, tag):
    before = groupCPU(pgid) if pgid else 0.0
    started = time.monotonic()
    r = load(kind, port, args, args.seconds, args.client_warmup,
             raw=os.path.join(out, "raw", f"{tag}-{kind}-{name}.txt"))
    if pgid and "error" not in r:
        cpu = groupCPU(pgid) - before
        r["cpu"] = 100 * cpu / (time.monotonic() - started)
        r["cpuPer"] = 1e6 * cpu / max(r["all"], 1)
    return r


def merge(runs):
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    merged = {k: statistics.median([r[k] for r in good]) for k in ("rate", "p50", "p99")}
    for k in ("cpu", "cpuPer"):
        if all(k in r for r in good):
            merged[k] = statistics.median([r[k] for r in good])
    merged["errors"] = sum(r["errors"] for r in good)
    merged["range"] = (min(r["rate"] for r in good), max(r["rate"] for r in good))
    merged["rounds"] = len(good)
    return merged


def table(results):
    heads = ["target", "per s", "min-max", "p50 ms", "p99 ms", "÷ NGINX", "÷ direct", "errors",
             "front CPU", "CPU µs each", "CPU ÷ NGINX's"]
    lines = ["| " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(heads) - 1)]
    nginx, direct = results.get("nginx", {}), results.get("direct", {})

    def ratio(r, anchor, key="rate"):
        if key in r and key in anchor and "error" not in anchor and anchor[key]:
            return "%.2f" % (r[key] / anchor[key])
        return "-"

    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} |" + " |" * (len(heads) - 2))
            continue
        cpu = f"{r['cpu']:.0f}%" if "cpu" in r else "-"
        each = f"{r['cpuPer']:.0f}" if "cpuPer" in r else "-"
        lines.append(
            f"| {name} | {r['rate']:,.0f} | {r['range'][0]:,.0f}-{r['range'][1]:,.0f} | "
            f"{r['p50']:.2f} | {r['p99']:.2f} | {ratio(r, nginx)} | {ratio(r, direct)} | "
            f"{r['errors']} | {cpu} | {each} | {ratio(r, nginx, 'cpuPer')} |"
        )
    return "\n".join(lines)


def versions(args):
    import websockets

    peer = toolVersion([args.peer_python, "-c", "import platform; print("
                        "platform.python_implementation(), platform.python_version())"])
    return treeAndMachine(args.tree) + [
        f"backend and client: bench/ws_peers.py on {peer}, core {LOAD_CPU}; "
        f"checked with websockets {websockets.__version__}",
        "nginx " + toolVersion(["nginx", "-v"], lambda s: s.strip().rpartition("/")[2])
        + f", one worker; each front alone on core {LB_CPU}",
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds of each run")
    parser.add_argument("--client-warmup", type=float, default=1.0,
                        help="unmeasured seconds at the start of each run")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds of unmeasured load per target and kind before round 1")
    parser.add_argument("--pypy-warmup", type=float, default=15.0, help="the same on PyPy")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 2 s")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--targets", default="direct,rrbalancer,nginx")
    parser.add_argument("--pypy", action="store_true", help="add rr-pypy")
    parser.add_argument("--concurrency", type=int, default=16, help="handshakes under way at once")
    parser.add_argument("--connections", type=int, default=64, help="open WebSockets")
    parser.add_argument("--size", type=int, default=32, help="bytes per message (< 126)")
    parser.add_argument("--limit", type=int, default=5_000_000,
                        help="at most this many exchanges per run")
    parser.add_argument("--clients", type=int, default=1, help="client processes per run")
    parser.add_argument("--peer-python", default=shutil.which("pypy3") or sys.executable,
                        help="runs the backend and the client (default: pypy3 when there is one)")
    parser.add_argument("--base-port", type=int, default=9500,
                        help="the backend on BASE+1, the targets on BASE+11..")
    parser.add_argument("--rr-args", default="", help="more flags for rrbalancer")
    parser.add_argument("--tree", default=ROOT, help="the rrbalancer tree to run (default: this one)")
    parser.add_argument("--out", help="folder for configs, logs and raw output (default: a new one in /tmp)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.warmup, args.pypy_warmup = 1, 2.0, 1.0, 5.0
    kinds = [k for k in args.kinds.split(",") if k]
    targets = [t for t in args.targets.split(",") if t]
    if args.pypy and "rr-pypy" not in targets:
        targets.insert(targets.index("nginx") if "nginx" in targets else len(targets), "rr-pypy")
    for k in kinds:
        if k not in KINDS:
            parser.error(f"no kind {k!r} (have: {', '.join(KINDS)})")
    for t in targets:
        if t not in TARGETS:
            parser.error(f"no target {t!r} (have: {', '.join(TARGETS)})")
    if args.rounds < 1 or args.seconds <= 0 or args.clients < 1 or not 0 < args.size < 126:
        parser.error("--rounds, --seconds and --clients must be positive, --size from 1 to 125")
    if len(os.sched_getaffinity(0)) < 2 or os.cpu_count() < 2:
        die("needs two cores: the fronts on one, the backend and the client on the other")
    for module in ("twisted", "websockets"):
        if importlib.util.find_spec(module) is None:
            die(f"{sys.executable} has no {module}: run this with the project's venv "
                "(pip install '.[test]')")
    for tool in ("nginx", "taskset"):
        if shutil.which(tool) is None:
            die(f"{tool} is missing (apt-get install nginx util-linux)")

    backend = args.base_port + 1
    ports = {t: args.base_port + 11 + i for i, t in enumerate(TARGETS)}
    ports["direct"] = backend
    for port in [backend] + [ports[t] for t in targets]:
        if waitListening(f"{HOST}:{port}", 0.2):
            die(f"port {port} is taken: choose another --base-port")
    out = args.out or tempfile.mkdtemp(prefix="wsbench-")
    os.makedirs(os.path.join(out, "raw"), exist_ok=True)
    procs = Processes()
    # Stopped as by Ctrl-C: what was started is stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    header = versions(args)
    header.append(f"load average at start: {loadavg()} (the machine may be shared: figures move)")
    header.append(
        f"handshakes: {args.concurrency} at once; messages: {args.connections} connections, "
        f"{args.size}-byte messages; {args.clients} client process(es); {args.rounds} round(s) "
        f"of {args.seconds:g} s after {args.client_warmup:g} s, medians"
    )
    for line in header:
        say(line)
    say(f"configs, logs and raw output in {out}")
    report = ["# WebSocket echo", ""] + ["- " + line for line in header]
    runs = {k: {t: [] for t in targets} for k in kinds}
    try:
        procs.start([args.peer_python, PEERS, "serve", str(backend)], LOAD_CPU,
                             os.path.join(out, "backend.log"))
        if not waitListening(f"{HOST}:{backend}", 30):
            die(f"the backend did not start (see {out}/backend.log)")
        fronts = {}
        for name in targets:
            if name != "direct":
                fronts[name] = startTarget(procs, name, ports[name], backend, args, out)
        failed = {}
        for name in targets:
            p = fronts.get(name)
            if not waitListening(f"{HOST}:{ports[name]}", 60) or (p and p.poll() is not None):
                failed[name] = "did not start"
                continue
            problem = None
            for _ in range(50):
                # rrbalancer takes a backend once its first check passed.
                problem = check(ports[name])
                if problem is None:
                    break
                time.sleep(0.2)
            if problem:
                failed[name] = f"no echo: {problem}"
        for name, why in failed.items():
            say(f"{name}: {why}; left out")
        live = [t for t in targets if t not in failed]
        for name in live:
            warm = args.pypy_warmup if TARGETS[name][1] else args.warmup
            for kind in kinds:
                load(kind, ports[name], args, warm, 0.0)
        for rnd in range(args.rounds):
            order = live[rnd % len(live):] + live[:rnd % len(live)]
            for kind in kinds:
                for name in order:
                    p = fronts.get(name)
                    r = measure(kind, name, ports[name], p.pid if p else None, args, out,
                                f"r{rnd + 1}")
                    runs[kind][name].append(r)
                    if "error" in r:
                        say(f"[{rnd + 1}/{args.rounds}] {kind} {name}: {r['error']}")
                    else:
                        say(f"[{rnd + 1}/{args.rounds}] {kind} {name}: {r['rate']:,.0f}/s, "
                            f"p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, errors {r['errors']}"
                            + (f", cpu {r['cpu']:.0f}%, {r['cpuPer']:.0f} µs each"
                               if "cpu" in r else ""))
        for kind in kinds:
            results = {t: merge(runs[kind][t]) for t in live}
            results.update({t: {"error": why} for t, why in failed.items()})
            report += ["", f"## {KINDS[kind]}", "", table(results)]
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        procs.stopAll()
    say("summary: " + writeReport(out, report, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
