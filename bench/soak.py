"""
A soak: minutes of mixed load against one balancer, while its backends
come and go, sampling what would show a leak.

Three nginx backends and the balancer (from this work tree, on the Python
given) on 127.0.0.1; the balancer pinned to core 0, everything else to
core 1.  For the whole run:

- wrk at full rate (`-t1 -c32`), in 10 s slices, each slice one sample;
- slow clients (slowhttptest's slowloris, 100 connections) when Debian's
  slowhttptest is installed;
- a cycle of six slices: backend 2 stopped (nginx's graceful stop), backend
  2 started again, a fourth backend added through the admin API, drained,
  deleted, and nothing;
- SIGHUP every 30 s, after the config file's first backend changed weight.

Each sample: requests/s, client-visible errors (non-2xx and socket errors
of wrk: every request is an idempotent GET, so none is acceptable), RSS,
open file descriptors, and connections open to the backends.  The summary
gives the RSS slope after warm-up (least squares, MiB/min), the change in
file descriptors, and the errors; `--check` exits 1 when any is over its
bound, which is how `.ci/run` runs a short one.  `--plot FILE` draws the
samples (with matplotlib, when it is installed).

    python bench/soak.py --minutes 30 --plot docs/soak-cpython.png
    pypy3 bench/soak.py --minutes 30 --warmup 60    # needs twistd beside pypy3
    python bench/soak.py --minutes 2 --check        # as CI runs it
    python bench/soak.py --minutes 5 --balance p2c  # another policy
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import LB_CPU, LOAD_CPU, Processes, rssMiB, waitListening, waitServing  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SLICE = 10
CYCLE = ("stop", "start", "add", "drain", "delete", "rest")


def freePort() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backend:
    """
    One nginx backend, stopped and started again at will.
    """

    def __init__(self, procs: Processes, out: str, name: str) -> None:
        self.procs = procs
        self.port = freePort()
        self.url = f"http://127.0.0.1:{self.port}"
        self.folder = os.path.join(out, name)
        os.makedirs(self.folder)
        self.conf = os.path.join(self.folder, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(
                f"worker_processes 1; daemon off; pid {self.folder}/nginx.pid;\n"
                f"error_log {self.folder}/error.log;\n"
                "events { worker_connections 4096; }\n"
                "http { access_log off; keepalive_requests 1000000; keepalive_timeout 75s;\n"
                f"  server {{ listen 127.0.0.1:{self.port};\n"
                f'    location / {{ return 200 "{name}\\n"; }} }} }}\n'
            )
        self.process = None

    def start(self) -> None:
        self.process = self.procs.start(
            ["nginx", "-c", self.conf, "-p", self.folder], LOAD_CPU,
            os.path.join(self.folder, "out.log"),
        )
        if not waitListening(f"127.0.0.1:{self.port}", 10):
            raise SystemExit(f"soak: nginx on {self.port} did not start")

    def stop(self) -> None:
        """
        nginx's graceful stop: requests in flight finish, idle connections
        close.
        """
        p, self.process = self.process, None
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGQUIT)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                self.procs.stop(p)
        if p in self.procs.running:
            self.procs.running.remove(p)


def admin(port: int, method: str, path: str, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method,
        headers={"Content-Type": "application/json"} if data else {},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def fdCount(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wrkSlice(port: int, seconds: int):
    return subprocess.Popen(
        ["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c32", f"-d{seconds}s",
         f"http://127.0.0.1:{port}/"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wrkResult(process, seconds: float = SLICE) -> dict:
    out, _ = process.communicate(timeout=seconds + 60)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = int(bad.group(1)) if bad else 0
    if socket:
        # A timeout is wrk's own 2 s bound: a slow answer, not an error seen
        # by the client; the others are.
        errors += sum(int(socket.group(i)) for i in (1, 2, 3))
    return {"rps": float(rps.group(1)) if rps else 0.0, "errors": errors}


def quiet(pid: int, adminPort: int) -> int:
    """
    The balancer's file descriptors other than its connections to the
    backends (which its pools keep as they see fit).
    """
    listing = admin(adminPort, "GET", "/api/backends")["backends"]
    return fdCount(pid) - sum((b.get("connections") or {}).get("open", 0) for b in listing)


def slope(points) -> float:
    """
    The least-squares slope of (minutes, MiB) points.
    """
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def writeConfig(
    path: str, port: int, adminPort: int, backends, weight: int, balance: str = "round-robin"
) -> None:
    with open(path, "w") as f:
        f.write(
            f'port = "tcp:{port}:interface=127.0.0.1"\n'
            f'admin = "tcp:{adminPort}:interface=127.0.0.1"\n'
            f'balance = "{balance}"\n'
            "[health]\ninterval = 1\ntimeout = 1\nrise = 1\nfall = 2\n"
        )
        for n, backend in enumerate(backends):
            f.write(f'[[backend]]\nurl = "{backend.url}"\nweight = {weight if n == 0 else 1}\n')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=30.0,
                        help="seconds of load before the slope is taken (default 30)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on any client error, RSS growth or fd growth")
    parser.add_argument("--max-slope", type=float, default=2.0,
                        help="MiB/min of RSS growth allowed after warm-up (default 2)")
    parser.add_argument("--max-fd-growth", type=int, default=10)
    parser.add_argument("--plot", help="draw the samples into this PNG file")
    parser.add_argument("--json", help="write the samples and the summary to this file")
    parser.add_argument("--plot-from", metavar="JSON",
                        help="only draw the samples a run wrote with --json (into --plot)")
    parser.add_argument("--tree", default=ROOT, help="the rrbalancer tree to run")
    parser.add_argument("--balance", default="round-robin",
                        help="the balancing policy (default round-robin)")
    args = parser.parse_args()
    if args.plot_from:
        with open(args.plot_from) as f:
            saved = json.load(f)
        plot(saved["samples"], args.plot, saved["interpreter"])
        return 0
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"soak: {tool} is missing (apt-get install nginx wrk util-linux)", file=sys.stderr)
            return 2

    out = tempfile.mkdtemp(prefix="rrsoak-")
    procs = Processes()
    samples = []
    try:
        backends = [Backend(procs, out, f"backend{n}") for n in (1, 2, 3)]
        extra = Backend(procs, out, "backend4")
        for backend in backends + [extra]:
            backend.start()
        port, adminPort = freePort(), freePort()
        config = os.path.join(out, "soak.toml")
        weight = 1
        writeConfig(config, port, adminPort, backends, weight, args.balance)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.path.exists(twistd):
            twistd = shutil.which("twistd") or "twistd"
        env = dict(os.environ, PYTHONPATH=args.tree)
        balancer = procs.start(
            [sys.executable, twistd, "-n", "--pidfile=", "rrbalancer", "--config", config],
            LB_CPU, os.path.join(out, "balancer.log"), env=env,
        )
        if not waitServing(port, balancer, 30):
            raise SystemExit(f"soak: the balancer did not start; see {out}/balancer.log")
        warm = wrkSlice(port, int(args.warmup))
        wrkResult(warm, args.warmup)
        # Quiet now: the file descriptors the balancer holds besides its
        # connections to the backends, to compare with the end.
        quietFds = quiet(balancer.pid, adminPort)
        slow = None
        if shutil.which("slowhttptest"):
            slow = procs.start(
                ["slowhttptest", "-H", "-c", "100", "-r", "20", "-i", "10", "-x", "24",
                 "-l", str(int(args.minutes * 60 + args.warmup + 30)),
                 "-u", f"http://127.0.0.1:{port}/"],
                LOAD_CPU, os.path.join(out, "slowhttptest.log"),
            )
        print(f"soak: {sys.implementation.name} {sys.version.split()[0]}, {args.balance}, "
              f"{args.minutes:g} min after {args.warmup:g} s of warm-up; "
              f"slow clients: {'slowhttptest' if slow else 'none (slowhttptest not installed)'}; "
              f"files in {out}", flush=True)
        print(f"{'t (s)':>6} {'action':>7} {'req/s':>8} {'errors':>6} {'RSS MiB':>8} "
              f"{'fds':>5} {'conns':>5}", flush=True)
        started = time.monotonic()
        slices = max(1, int(args.minutes * 60 // SLICE))
        lastHangup = time.monotonic()
        for k in range(slices):
            action = CYCLE[k % len(CYCLE)]
            load = wrkSlice(port, SLICE)
            time.sleep(SLICE / 3)
            if action == "stop":
                backends[1].stop()
            elif action == "start":
                backends[1].start()
            elif action == "add":
                admin(adminPort, "POST", "/api/backends", {"url": extra.url})
            elif action in ("drain", "delete"):
                found = [b for b in admin(adminPort, "GET", "/api/backends")["backends"]
                         if b["url"] == extra.url]
                if found and action == "drain":
                    admin(adminPort, "PATCH", f"/api/backends/{found[0]['id']}", {"state": "draining"})
                elif found:
                    admin(adminPort, "DELETE", f"/api/backends/{found[0]['id']}")
            if time.monotonic() - lastHangup >= 30:
                weight = 3 - weight
                writeConfig(config, port, adminPort, backends, weight, args.balance)
                os.kill(balancer.pid, signal.SIGHUP)
                lastHangup = time.monotonic()
                action += "+HUP"
            result = wrkResult(load)
            listing = admin(adminPort, "GET", "/api/backends")["backends"]
            conns = sum((b.get("connections") or {}).get("open", 0) for b in listing)
            sample = dict(
                t=round(time.monotonic() - started), action=action, rps=result["rps"],
                errors=result["errors"], rss=rssMiB(balancer.pid), fds=fdCount(balancer.pid),
                conns=conns,
            )
            samples.append(sample)
            print(f"{sample['t']:>6} {action:>7} {sample['rps']:>8.0f} {sample['errors']:>6} "
                  f"{sample['rss']:>8.1f} {sample['fds']:>5} {conns:>5}", flush=True)
            if balancer.poll() is not None:
                print("soak: the balancer exited", file=sys.stderr)
                return 1
        if slow is not None:
            procs.stop(slow)
        time.sleep(3)
        endFds = quiet(balancer.pid, adminPort)
    finally:
        procs.stopAll()

    errors = sum(s["errors"] for s in samples)
    growth = slope([(s["t"] / 60, s["rss"]) for s in samples])
    fdGrowth = endFds - quietFds
    print(f"\nsoak: {len(samples)} samples; errors {errors}; RSS {samples[0]['rss']:.1f} -> "
          f"{samples[-1]['rss']:.1f} MiB, slope {growth:+.2f} MiB/min; fds {samples[0]['fds']} "
          f"-> {samples[-1]['fds']} (quiet, without backend connections: {quietFds} -> {endFds}); mean {sum(s['rps'] for s in samples) / len(samples):.0f} req/s")
    interpreter = f"{sys.implementation.name} {sys.version.split()[0]}"
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"interpreter": interpreter, "samples": samples, "errors": errors,
                       "slope": growth, "quietFds": [quietFds, endFds]}, f, indent=1)
    if args.plot:
        plot(samples, args.plot, interpreter)
    if args.check:
        failures = []
        if errors:
            failures.append(f"{errors} client-visible errors")
        if growth > args.max_slope:
            failures.append(f"RSS grows {growth:.2f} MiB/min (bound {args.max_slope:g})")
        if fdGrowth > args.max_fd_growth:
            failures.append(f"{fdGrowth} more file descriptors than at the start")
        if failures:
            print("soak: FAILED: " + "; ".join(failures), file=sys.stderr)
            return 1
        print("soak: passed")
    return 0


def plot(samples, path: str, interpreter: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("soak: matplotlib is not installed; no plot", file=sys.stderr)
        return
    minutes = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    for ax, key, label in zip(
        axes, ("rps", "rss", "fds", "errors"),
        ("requests/s", "RSS (MiB)", "file descriptors", "client errors"),
    ):
        ax.plot(minutes, [s[key] for s in samples])
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.suptitle(f"rrbalancer soak on {interpreter}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"soak: plot in {path}")


if __name__ == "__main__":
    sys.exit(main())
