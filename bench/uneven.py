"""
The balancing policies on uneven backends, beside NGINX's and HAProxy's.

Three HTTP/1.1 keep-alive backends on 127.0.0.1 (bench/uneven_backend.py,
one PyPy process), in two scenarios:

- slow: two answer after 2 ms, the third after 20 ms;
- stall: all three answer after 2 ms, but the third stalls for 2 s every
  10 s (what it is asked during a stall is answered when the stall ends).

Each target balances over them in turn, alone on core 0, under the same
`wrk -t2 -c64 --latency` on core 1 (beside the backends), after a few
seconds of unmeasured load; the backends count what each one served.  One
table per scenario: throughput, latency percentiles, errors, the share
each backend served, and the ratios to the best of the NGINX and HAProxy
targets.

    python bench/uneven.py                  # both scenarios, 20 s per run (about 8 minutes)
    python bench/uneven.py --quick          # a smoke run, 3 s per run
    python bench/uneven.py --scenarios slow --targets rr-p2c,haproxy-leastconn --rounds 3
    python bench/uneven.py --pypy           # rr-p2c on PyPy too, after 15 s of warm-up
    python bench/uneven.py --p2c-tree before=/tmp/old-tree   # p2c from another tree too

rrbalancer runs from this work tree (PYTHONPATH) under the twistd of the
Python that runs this script; the backends (and rr-p2c-pypy) under PyPy,
from a venv this script makes under /tmp with the project's dependencies.
Missing Debian packages (nginx, haproxy, wrk, pypy3, pypy3-venv,
util-linux) are installed first.  Everything it starts is stopped on exit.
"""

import argparse
import configparser
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
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from scale import Processes, cpuSeconds, waitListening  # noqa: E402

LB_CPU = "0"
LOAD_CPU = "1"
HOST = "127.0.0.1"
PYPY_VENV = os.environ.get("RRBENCH_UNEVEN_PYPY_VENV", "/tmp/rrbench-uneven-pypy")
DEBIAN = ("nginx", "haproxy", "wrk", "pypy3", "pypy3-venv", "util-linux")

# Each scenario: the three backends as (delay ms, stall) with a stall as
# (every s, for s, first at s) after each reset.
SCENARIOS = {
    "slow": ("two backends answer after 2 ms, one after 20 ms",
             [(2, None), (2, None), (20, None)]),
    "stall": ("three backends answer after 2 ms; the third stalls 2 s every 10 s",
              [(2, None), (2, None), (2, (10.0, 2.0, 4.0))]),
}

# name: (kind, what the config says, on PyPy)
TARGETS = {
    "rr-round-robin": ("rrbalancer", "round-robin", False),
    "rr-least-conn": ("rrbalancer", "least-conn", False),
    "rr-p2c": ("rrbalancer", "p2c", False),
    "rr-p2c-pypy": ("rrbalancer", "p2c", True),
    "nginx-least-conn": ("nginx", "least_conn;", False),
    "nginx-random2": ("nginx", "random two least_conn;", False),
    "haproxy-leastconn": ("haproxy", "leastconn", False),
}
DEFAULT_TARGETS = [t for t in TARGETS if t != "rr-p2c-pypy"]

# wrk calls done() once at the end: the figures this script reads, in
# microseconds, on one line.
WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("UNEVEN %d %d %d %d %d %d %d %d %d %d %d\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""


def say(text):
    print("uneven: " + text, file=sys.stderr, flush=True)


def die(text):
    say(text)
    sys.exit(2)


# ----------------------------------------------------------------- setup --


def installDebian():
    """
    Install the Debian packages that are missing, with no service started.
    """
    missing = [
        p for p in DEBIAN
        if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                          text=True).stdout.find("install ok installed") < 0
    ]
    if not missing:
        return
    if os.geteuid() != 0:
        die("missing Debian packages (install them as root): " + " ".join(missing))
    say("installing Debian packages: " + " ".join(missing))
    policy = "/usr/sbin/policy-rc.d"
    ours = not os.path.exists(policy)
    if ours:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        ok = (subprocess.run(["apt-get", "update", "-qq"], timeout=900).returncode == 0
              and subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends"]
                                 + missing, env=env, timeout=1800).returncode == 0)
    finally:
        if ours:
            os.unlink(policy)
    if not ok:
        die("apt-get install failed")


def projectRequirements(tree):
    """
    install_requires from the tree's setup.cfg, one requirement a line.
    """
    parser = configparser.ConfigParser()
    parser.read(os.path.join(tree, "setup.cfg"))
    lines = parser.get("options", "install_requires").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def pypyVenv(tree):
    """
    A PyPy venv with the project's dependencies (not the project: it runs
    from the tree), made once.
    """
    python = os.path.join(PYPY_VENV, "bin", "python")
    stamp = os.path.join(PYPY_VENV, ".uneven-requirements")
    wanted = "\n".join(projectRequirements(tree))
    if os.path.exists(stamp) and open(stamp).read() == wanted:
        return python
    if not os.path.exists(python):
        say(f"creating {PYPY_VENV}")
        if subprocess.run(["pypy3", "-m", "venv", PYPY_VENV], timeout=300).returncode:
            die(f"could not create {PYPY_VENV}")
    say(f"installing the project's dependencies into {PYPY_VENV}")
    log = os.path.join(PYPY_VENV, "uneven-pip.log")
    with open(log, "w") as out:
        # PyPy 3.9 has wheels of an older cryptography only.
        rc = subprocess.run(
            [python, "-m", "pip", "install", "--only-binary=cryptography"] + wanted.split("\n"),
            stdout=out, stderr=subprocess.STDOUT, timeout=1800,
        ).returncode
    if rc:
        die(f"pip failed (log: {log})")
    with open(stamp, "w") as f:
        f.write(wanted)
    return python


# ---------------------------------------------------------------- configs --


def nginxConfig(out, name, port, method, backends):
    path = os.path.join(out, f"{name}.conf")
    temp = os.path.join(out, "tmp", name)
    os.makedirs(temp, exist_ok=True)
    servers = "".join(f"        server {HOST}:{p};\n" for p in backends)
    with open(path, "w") as f:
        f.write(
            f"worker_processes 1;\ndaemon off;\npid {temp}/nginx.pid;\n"
            f"error_log {out}/{name}.err warn;\nevents {{ worker_connections 4096; }}\n"
            "http {\n    access_log off;\n    keepalive_requests 1000000;\n"
            "    keepalive_timeout 75s;\n"
            + "".join(f"    {k}_temp_path {temp}/{k};\n"
                      for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
            + f"    upstream backends {{\n        {method}\n{servers}"
            "        keepalive 64;\n        keepalive_requests 1000000;\n    }\n"
            f"    server {{\n        listen {HOST}:{port} backlog=4096;\n"
            "        location / {\n            proxy_pass http://backends;\n"
            "            proxy_http_version 1.1;\n"
            '            proxy_set_header Connection "";\n        }\n    }\n}\n'
        )
    return path


def haproxyConfig(out, name, port, method, backends):
    path = os.path.join(out, f"{name}.cfg")
    with open(path, "w") as f:
        f.write(
            "global\n    nbthread 1\n    maxconn 4000\n\n"
            "defaults\n    mode http\n    timeout connect 5s\n    timeout client 60s\n"
            "    timeout server 60s\n    http-reuse safe\n\n"
            f"frontend fe\n    bind {HOST}:{port}\n    default_backend be\n\n"
            f"backend be\n    balance {method}\n"
            + "".join(f"    server b{n} {HOST}:{p}\n" for n, p in enumerate(backends, 1))
        )
    return path


def startTarget(procs, name, port, backends, args, out):
    kind, method, onPyPy = TARGETS[name]
    log = os.path.join(out, f"{name}.log")
    if kind == "rrbalancer":
        if onPyPy:
            twistd = os.path.join(PYPY_VENV, "bin", "twistd")
        else:
            twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        argv = [twistd, "-n", "--pidfile=", "rrbalancer", "--port", f"tcp:{port}:interface={HOST}",
                "--balance", method, "--admin", "none", "--health-path", "/health"]
        for p in backends:
            argv += ["--backend", f"http://{HOST}:{p}"]
        argv += args.rr_args.split()
        tree = args.trees.get(name, args.tree)
        return procs.start(argv, LB_CPU, log, env=dict(os.environ, PYTHONPATH=tree))
    if kind == "nginx":
        config = nginxConfig(out, name, port, method, backends)
        return procs.start(["nginx", "-p", out, "-e", os.path.join(out, f"{name}.err"), "-c", config],
                           LB_CPU, log)
    config = haproxyConfig(out, name, port, method, backends)
    return procs.start(["haproxy", "-db", "-f", config], LB_CPU, log)


# ---------------------------------------------------------------- measure --


def get(port, path, timeout=5.0):
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as r:
        return r.status, r.read()


def waitAnswering(port, p, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if p is not None and p.poll() is not None:
            return False
        try:
            if get(port, "/", timeout=3)[0] == 200:
                return True
        except Exception:
            pass
        time.sleep(0.2)
    return False


def groupCPU(pgid):
    """
    CPU seconds of every process in a process group (nginx's master and
    worker, twistd).
    """
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += cpuSeconds(int(entry))
    return total


def runWrk(port, seconds, args, script, raw=None):
    """
    One wrk run: a dict of its figures (latencies in ms), or None when wrk
    gave none.
    """
    argv = ["taskset", "-c", LOAD_CPU, "wrk", f"-t{args.threads}", f"-c{args.connections}",
            f"-d{seconds:g}s", "--timeout", "30s", "--latency", "-s", script,
            f"http://{HOST}:{port}/"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 90)
    if raw:
        with open(raw, "w") as f:
            f.write(done.stdout + done.stderr)
    for line in done.stdout.splitlines():
        if line.startswith("UNEVEN "):
            n, us, connect, read, write, status, timeout, p50, p99, p999, top = map(int, line.split()[1:])
            return {
                "requests": n, "rps": n / (us / 1e6) if us else 0.0,
                "errors": connect + read + write + status + timeout,
                "p50": p50 / 1000, "p99": p99 / 1000, "p999": p999 / 1000, "max": top / 1000,
            }
    return None


def backendStats(ports):
    return [json.loads(get(p, "/__stats")[1]) for p in ports]


def resetBackends(ports):
    for p in ports:
        get(p, "/__reset")


def measure(procs, name, port, backends, args, out, script, tag):
    p = startTarget(procs, name, port, backends, args, out)
    try:
        if not waitAnswering(port, p, args.start_timeout):
            return {"error": f"did not answer 200 (see {out}/{name}.log)"}
        warmup = args.pypy_warmup if TARGETS[name][2] else args.warmup
        if warmup > 0:
            resetBackends(backends)
            runWrk(port, warmup, args, script)
        resetBackends(backends)
        before = groupCPU(p.pid)
        started = time.monotonic()
        result = runWrk(port, args.duration, args, script, os.path.join(out, f"wrk-{tag}-{name}.txt"))
        elapsed = time.monotonic() - started
        if result is None:
            return {"error": f"wrk gave no figures (see {out}/wrk-{tag}-{name}.txt)"}
        result["cpu"] = (groupCPU(p.pid) - before) / elapsed * 100
        stats = backendStats(backends)
        result["served"] = [s["served"] for s in stats]
        result["in_flight_max"] = [s["in_flight_max"] for s in stats]
        return result
    finally:
        procs.stop(p)




def merge(runs):
    """
    Medians over the rounds; errors and requests served summed.
    """
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    merged = {k: statistics.median([r[k] for r in good]) for k in ("rps", "p50", "p99", "p999", "max", "cpu")}
    merged["errors"] = sum(r["errors"] for r in good)
    merged["served"] = [sum(col) for col in zip(*(r["served"] for r in good))]
    merged["in_flight_max"] = [max(col) for col in zip(*(r["in_flight_max"] for r in good))]
    merged["p99_range"] = (min(r["p99"] for r in good), max(r["p99"] for r in good))
    merged["rounds"] = len(good)
    return merged


def isAnchor(name):
    return TARGETS[name][0] != "rrbalancer"


def table(scenario, results, delays):
    """
    The scenario's table in Markdown, and the goal's verdict.
    """
    anchors = [n for n, r in results.items() if isAnchor(n) and "error" not in r]
    best = min(anchors, key=lambda n: results[n]["p99"]) if anchors else None
    heads = ["target", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "p99 ÷ p50", "errors",
             "share " + " / ".join(delays), "p99 ÷ best anchor", "req/s ÷ best anchor", "balancer CPU"]
    lines = ["| " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(heads) - 1)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} |" + " |" * (len(heads) - 2))
            continue
        total = sum(r["served"]) or 1
        share = " / ".join("%.1f%%" % (100 * s / total) for s in r["served"])
        if best:
            vs = "%.2f" % (r["p99"] / results[best]["p99"])
            vsRate = "%.2f" % (r["rps"] / results[best]["rps"])
        else:
            vs = vsRate = "-"
        p99 = "%.1f" % r["p99"]
        if r["rounds"] > 1:
            p99 += " (%.1f-%.1f)" % r["p99_range"]
        lines.append(
            f"| {name} | {r['rps']:,.0f} | {r['p50']:.2f} | {p99} | {r['p999']:.1f} | "
            f"{r['max']:.0f} | {r['p99'] / r['p50']:.1f} | {r['errors']} | {share} | {vs} | "
            f"{vsRate} | {r['cpu']:.0f}% |"
        )
    verdict = []
    if best:
        verdict.append(f"best anchor by p99: {best} ({results[best]['p99']:.1f} ms)")
        for name in ("rr-p2c", "rr-p2c-pypy"):
            r = results.get(name)
            if r and "error" not in r:
                met = "met" if r["p99"] <= results[best]["p99"] else "not met"
                verdict.append(
                    f"goal ({name} p99 at or below the best anchor's): {met}, "
                    f"{r['p99']:.1f} ms against {results[best]['p99']:.1f} ms"
                )
    return "\n".join(lines), verdict


def toolVersion(argv, pick=lambda s: s.splitlines()[0]):
    """
    What C{argv} prints of its version, read by C{pick}; C{?} when it
    cannot be run.
    """
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return pick(done.stdout + done.stderr)
    except Exception:
        return "?"


def treeAndMachine(tree):
    """
    The lines a bench's report opens with: when, on what machine, and
    which rrbalancer tree (at which commit) on which Python and Twisted.
    """
    git = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    if git.returncode:
        commit = " (not a git checkout)"
    else:
        changed = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--", "rrbalancer"],
                                 capture_output=True, text=True).stdout.strip()
        commit = " at " + git.stdout.strip() + (" plus uncommitted changes" if changed else "")
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import twisted

    return [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %z')}; {os.cpu_count()} CPUs, {model}",
        f"rrbalancer: {tree}{commit}; CPython {sys.version.split()[0]}, "
        f"Twisted {twisted.__version__}",
    ]


def versions(tree):
    first = toolVersion
    return treeAndMachine(tree) + [
        "backends: " + first([
            os.path.join(PYPY_VENV, "bin", "python"), "-c",
            "import sys, twisted; print('PyPy %d.%d.%d' % sys.pypy_version_info[:3],"
            " '(Python', sys.version.split()[0] + '), Twisted', twisted.__version__)",
        ]),
        "nginx " + first(["nginx", "-v"], lambda s: s.strip().rpartition("/")[2])
        + ", HAProxy " + first(["haproxy", "-v"], lambda s: s.split()[2])
        + ", wrk " + first(["wrk", "-v"], lambda s: s.split()[1]),
    ]


def writeReport(out, report, data):
    """
    End a bench's report (Markdown lines) with the load average, write it
    (C{summary.md}) and its figures (C{results.json}) to C{out}, and print
    it.

    @return: the report's path.
    """
    report = report + ["", f"- load average at end: {loadavg()}"]
    path = os.path.join(out, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(report) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(data, f, indent=1)
    print("\n".join(report))
    return path


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="targets: " + ", ".join(TARGETS) + "; scenarios: "
        + "; ".join(f"{k}: {v[0]}" for k, v in SCENARIOS.items()),
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of each measured wrk run")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of unmeasured load first")
    parser.add_argument("--pypy-warmup", type=float, default=15.0, help="the same on PyPy")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 3 s runs, 1 s warm-ups, the stalls scaled to fit")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every target this many times (each round starts one further on)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    parser.add_argument("--pypy", action="store_true", help="add rr-p2c-pypy")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t")
    parser.add_argument("--connections", type=int, default=64, help="wrk -c")
    parser.add_argument("--base-port", type=int, default=9400,
                        help="backends on BASE+1.., the ceiling probe on BASE+9, targets on BASE+11..")
    parser.add_argument("--rr-args", default="", help="more flags for every rrbalancer target")
    parser.add_argument("--tree", default=ROOT, help="the rrbalancer tree to run (default: this one)")
    parser.add_argument(
        "--p2c-tree", action="append", default=[], metavar="NAME=DIR",
        help="add a target rr-p2c-NAME: p2c from another tree (a before and after in one run)",
    )
    parser.add_argument("--out", help="folder for configs, logs and raw output (default: a new one in /tmp)")
    parser.add_argument("--start-timeout", type=float, default=60.0)
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup, args.pypy_warmup = 3.0, 1.0, 5.0
    if args.duration <= 0 or args.rounds < 1 or args.threads < 1 or args.connections < args.threads:
        parser.error("--duration, --rounds, --threads and --connections must be positive "
                     "(and at least as many connections as threads)")
    scenarios = [s for s in args.scenarios.split(",") if s]
    args.trees = {}
    for item in args.p2c_tree:
        label, _, tree = item.partition("=")
        if not label or not os.path.isdir(os.path.join(tree, "rrbalancer")):
            parser.error(f"--p2c-tree {item!r}: expected NAME=DIR, DIR an rrbalancer tree")
        TARGETS["rr-p2c-" + label] = ("rrbalancer", "p2c", False)
        args.trees["rr-p2c-" + label] = os.path.abspath(tree)
    targets = [t for t in args.targets.split(",") if t]
    targets += [t for t in args.trees if t not in targets]
    if args.pypy and "rr-p2c-pypy" not in targets:
        targets.append("rr-p2c-pypy")
    for s in scenarios:
        if s not in SCENARIOS:
            parser.error(f"no scenario {s!r} (have: {', '.join(SCENARIOS)})")
    for t in targets:
        if t not in TARGETS:
            parser.error(f"no target {t!r} (have: {', '.join(TARGETS)})")
    if len(os.sched_getaffinity(0)) < 2 or os.cpu_count() < 2:
        die("needs two cores: the balancer on one, wrk and the backends on the other")
    if importlib.util.find_spec("twisted") is None:
        die(f"{sys.executable} has no Twisted: run this with the project's venv")

    installDebian()
    for tool in ("nginx", "haproxy", "wrk", "taskset", "pypy3"):
        if shutil.which(tool) is None:
            die(f"{tool} is missing")
    pypy = pypyVenv(args.tree)

    backends = [args.base_port + i for i in (1, 2, 3)]
    probe = args.base_port + 9
    ports = {t: args.base_port + 11 + i for i, t in enumerate(TARGETS)}
    for port in backends + [probe] + [ports[t] for t in targets]:
        if waitListening(f"{HOST}:{port}", 0.2):
            die(f"port {port} is taken: choose another --base-port")

    out = args.out or tempfile.mkdtemp(prefix="uneven-")
    os.makedirs(out, exist_ok=True)
    script = os.path.join(out, "figures.lua")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT)
    procs = Processes()

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    header = versions(args.tree)
    for name, tree in args.trees.items():
        header.append(f"{name}: p2c from {tree}" + versions(tree)[1].partition(tree)[2].split(";")[0])
    header.append(f"load average at start: {loadavg()} (the machine may be shared: figures move)")
    header.append(
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency, after "
        f"{args.warmup:g} s of unmeasured load ({args.pypy_warmup:g} s on PyPy); "
        f"{args.rounds} round(s), medians; balancer on core {LB_CPU}, wrk and backends on core {LOAD_CPU}"
    )
    for line in header:
        say(line)
    say(f"configs, logs and raw wrk output in {out}")
    scale = min(1.0, args.duration / 20.0) if args.quick else 1.0
    report = ["# Uneven backends", ""] + ["- " + line for line in header]
    everything = {}
    try:
        for scenario in scenarios:
            description, spec = SCENARIOS[scenario]
            argv = [pypy, os.path.join(HERE, "uneven_backend.py")]
            delays = []
            for port, (delay, stall) in zip(backends, spec):
                item = f"{port}:{delay:g}"
                if stall:
                    item += ":stall=" + "/".join("%g" % (v * scale) for v in stall)
                argv.append(item)
                delays.append(f"{delay:g} ms" + (" + stalls" if stall else ""))
            argv.append(f"{probe}:0")
            backend = procs.start(argv, LOAD_CPU, os.path.join(out, f"backends-{scenario}.log"))
            if not all(waitListening(f"{HOST}:{p}", 30) for p in backends + [probe]):
                die(f"the backends did not start (see {out}/backends-{scenario}.log)")
            say(f"{scenario}: {description}")
            ceiling = {}
            probeSecs = min(args.duration, 8.0)
            runWrk(probe, min(args.pypy_warmup, 10.0), args, script)  # the JIT's warm-up
            for label, port in (("0 ms", probe), (delays[0], backends[0])):
                r = runWrk(port, probeSecs, args, script)
                if r:
                    ceiling[label] = r
                    say(f"{scenario}: backend alone ({label}): {r['rps']:,.0f} req/s, "
                        f"p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, errors {r['errors']}")
            runs = {t: [] for t in targets}
            for rnd in range(args.rounds):
                order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
                for name in order:
                    r = measure(procs, name, ports[name], backends, args, out, script,
                                f"{scenario}-r{rnd + 1}")
                    runs[name].append(r)
                    if "error" in r:
                        say(f"{scenario} [{rnd + 1}/{args.rounds}] {name}: {r['error']}")
                    else:
                        say(f"{scenario} [{rnd + 1}/{args.rounds}] {name}: {r['rps']:,.0f} req/s, "
                            f"p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, p99.9 {r['p999']:.1f} ms, "
                            f"errors {r['errors']}, served {r['served']}, cpu {r['cpu']:.0f}%")
            procs.stop(backend)
            results = {t: merge(runs[t]) for t in targets}
            everything[scenario] = {"runs": runs, "ceiling": ceiling}
            text, verdict = table(scenario, results, delays)
            report += ["", f"## {scenario}: {description}", ""]
            report += [
                "Backends alone (wrk straight to one, same settings): " + "; ".join(
                    f"{label}: {r['rps']:,.0f} req/s, p99 {r['p99']:.1f} ms" for label, r in ceiling.items()
                ),
                "",
                text,
                "",
            ] + ["- " + v for v in verdict]
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        procs.stopAll()
    say("summary: " + writeReport(out, report, everything))
    return 0


if __name__ == "__main__":
    sys.exit(main())
