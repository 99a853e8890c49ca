"""
What a file, a reload and the admin API do with a large set of backends,
while clients are served.

The shape of `bench/scale.py`: one nginx backend listens on loopback
addresses 127.2.x.y:PORT, and the balancer (pinned to core 0) checks each
of its backends once a second.  This script (on core 1):

0. starts the balancer from a file of N + 1 backends, and times it to
   serving; sends it SIGHUP with a tenth of them swapped for others, and
   checks that a backend that stays keeps its id, state and history; then
   SIGHUP with the file down to one backend;

Then, through the admin API:

1. adds the other N backends one call at a time (`POST /api/backends`, on
   one kept-alive connection), and waits for their first checks to pass;
2. reads a page of the listing (`GET /api/backends?limit=500`, from the
   middle), a filtered page (`?state=down&limit=50`), the status and
   `/metrics`;
3. removes all N in one bulk call, and waits until they are gone;
4. adds all N again in one bulk call, waits for them to pass their
   checks, and reads the page and `/metrics` again.

It prints each step's time beside the goal it has, and what the clients
saw.  A client asks for a page through the balancer 50 times a second
throughout (`--probe-rate`), on one kept-alive connection: each of its
requests must be answered 200, and its slowest answer says how long the
balancer stalled.  `--load N` adds `wrk -t1 -cN` for the whole run (every
request it makes must be answered 2xx too): then each admin call also
waits for its turn in a loop busy with N clients.

    python bench/admin.py                  # N = 10,000
    python bench/admin.py --count 2000     # quicker
    python bench/admin.py --load 4         # and wrk's 4 connections

rrbalancer runs from this work tree (`twistd -n rrbalancer --config FILE`
with PYTHONPATH set to it), with the Python that runs this script.  nginx
and wrk are needed; everything started is stopped on exit.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import quote

from scale import (
    LB_CPU,
    LOAD_CPU,
    ROOT,
    Processes,
    addresses,
    rssMiB,
    waitListening,
    waitServing,
    writeBackend,
)

PORT = 8202
ADMIN = 8203


class Admin:
    """
    One kept-alive connection to the admin API, timing each call.
    """

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(self, method: str, path: str, body=None):
        """
        (status, parsed JSON or raw bytes, seconds, size in bytes).
        """
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        self.connection.request(method, path, body=data, headers=headers)
        response = self.connection.getresponse()
        raw = response.read()
        elapsed = time.perf_counter() - started
        content = raw
        if response.getheader("Content-Type", "").startswith("application/json"):
            content = json.loads(raw)
        return response.status, content, elapsed, len(raw)

    def expect(self, status: int, method: str, path: str, body=None):
        got, content, elapsed, size = self.call(method, path, body)
        if got != status:
            raise SystemExit(f"{method} {path}: {got}, expected {status}: {content!r:.300}")
        return content, elapsed, size

    def counts(self):
        content, _, _ = self.expect(200, "GET", "/api/backends?limit=1")
        return content["total"], content["counts"]

    def waitFor(self, what: str, test, seconds: float) -> float:
        """
        Poll the counts until C{test(total, counts)}, for at most C{seconds};
        how long it took.
        """
        started = time.monotonic()
        while True:
            total, counts = self.counts()
            if test(total, counts):
                return time.monotonic() - started
            if time.monotonic() - started > seconds:
                raise SystemExit(f"{what}: not within {seconds:g} s ({total} backends, {counts})")
            time.sleep(0.2)


def writeConfig(path: str, backends) -> str:
    with open(path, "w") as f:
        f.write(
            f'port = "tcp:{PORT}:interface=127.0.0.1"\n'
            f'admin = "tcp:{ADMIN}:interface=127.0.0.1"\n'
            '[health]\npath = "/"\ninterval = 1\n'
        )
        f.writelines(f'[[backend]]\nurl = "http://{a}"\n' for a in backends)
    return path


def startWrk(connections: int, seconds: float, log: str):
    return subprocess.Popen(
        ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s",
         f"http://127.0.0.1:{PORT}/"],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )


def stopWrk(wrk, log: str):
    """
    Stop wrk (it prints its totals on SIGINT) and read them.
    """
    if wrk.poll() is None:
        wrk.send_signal(signal.SIGINT)
    wrk.wait(timeout=30)
    with open(log) as f:
        text = f.read()
    def number(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    errors = re.search(r"Socket errors: (.*)", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    return {
        "requests": number(r"(\d+) requests in"),
        "non2xx": number(r"Non-2xx or 3xx responses:\s+(\d+)"),
        "errors": errors.group(1).strip() if errors else "",
        "rps": float(rps.group(1)) if rps else 0.0,
    }


class Probe(threading.Thread):
    """
    A client asking for a page through the balancer C{rate} times a
    second, counting what failed and timing the slowest answer.
    """

    def __init__(self, port: int, rate: float) -> None:
        threading.Thread.__init__(self, daemon=True)
        self.port = port
        self.every = 1.0 / rate
        self.requests = 0
        self.failed = 0
        self.slowest = 0.0
        self.worst = 0.0  # the slowest since the last mark()
        self.lastFailure = ""
        self._stopping = threading.Event()

    def run(self) -> None:
        connection = None
        due = time.monotonic()
        while not self._stopping.is_set():
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            started = time.perf_counter()
            try:
                connection.request("GET", "/")
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
                if not ok:
                    self.lastFailure = f"HTTP {response.status}"
            except (OSError, http.client.HTTPException) as e:
                ok = False
                self.lastFailure = str(e) or type(e).__name__
                connection.close()
                connection = None
            elapsed = time.perf_counter() - started
            self.slowest = max(self.slowest, elapsed)
            self.worst = max(self.worst, elapsed)
            self.requests += 1
            self.failed += not ok
            due += self.every
            self._stopping.wait(max(0.0, due - time.monotonic()))
        if connection is not None:
            connection.close()

    def mark(self) -> float:
        """
        The slowest answer since the last mark.
        """
        worst, self.worst = self.worst, 0.0
        return worst

    def stop(self) -> None:
        self._stopping.set()
        self.join(30)


HEADER = "%-50s %8s %8s %7s %9s  %s" % (
    "step (the probe served throughout)", "seconds", "goal", "", "probe ms", "detail"
)


def row(probe: Probe, step: str, seconds: float, goal=None, detail: str = "") -> bool:
    """
    Print a step: its time, its goal if it has one, and the probe's slowest
    answer while it ran.
    """
    met = goal is None or seconds < goal
    verdict = "" if goal is None else ("met" if met else "MISSED")
    goalText = "" if goal is None else f"< {goal:g} s"
    print(
        "%-50s %8.3f %8s %7s %9.0f  %s"
        % (step, seconds, goalText, verdict, probe.mark() * 1000, detail),
        flush=True,
    )
    return met


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10000, help="backends added (N)")
    parser.add_argument("--probe-rate", type=float, default=50.0,
                        help="the probing client's requests a second")
    parser.add_argument("--load", type=int, default=0,
                        help="wrk's connections, for load beside the probe (0: none)")
    parser.add_argument("--backend-port", type=int, default=9100)
    parser.add_argument("--start-timeout", type=float, default=60.0)
    parser.add_argument("--tree", default=ROOT, help="the rrbalancer source tree to run")
    args = parser.parse_args()
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.probe_rate <= 0 or args.load < 0:
        parser.error("--probe-rate must be more than 0, and --load 0 or more")
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed")
    for port in (PORT, ADMIN):
        if waitListening(f"127.0.0.1:{port}", 0):
            sys.exit(f"port {port} is taken: is a balancer of an earlier run still running?")
    os.sched_setaffinity(0, {int(LOAD_CPU)})

    out = tempfile.mkdtemp(prefix="admin-")
    print(f"logs and configs in {out}", file=sys.stderr)
    procs = Processes()

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    n = args.count
    # A tenth of the file's backends are swapped for others in the reload.
    swap = max(n // 10, 1)
    addrs = addresses(n + 1 + swap, args.backend_port)
    first, rest, others = addrs[0], addrs[1 : n + 1], addrs[n + 1 :]
    urls = [f"http://{a}" for a in rest]
    config = os.path.join(out, "rr.toml")
    wrk = probe = None
    wrkLog = os.path.join(out, "wrk.log")
    results = []
    try:
        backend = procs.start(
            ["nginx", "-c", writeBackend(out, addrs)], LOAD_CPU, os.path.join(out, "backend.log")
        )
        if not (waitListening(addrs[0], 30) and waitListening(addrs[-1], 30)):
            sys.exit(f"the backend did not start (see {out}/backend.err)")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        lbLog = os.path.join(out, "rrbalancer.log")
        writeConfig(config, [first] + rest)
        started = time.monotonic()
        lb = procs.start(
            [twistd, "-n", "--pidfile=", "rrbalancer", "--config", config],
            LB_CPU, lbLog, env=dict(os.environ, PYTHONPATH=args.tree),
        )
        if not waitServing(PORT, lb, args.start_timeout):
            sys.exit(f"the balancer did not serve (see {lbLog})")
        startup = time.monotonic() - started
        admin = Admin(ADMIN)
        probe = Probe(PORT, args.probe_rate)
        probe.start()
        if args.load:
            wrk = startWrk(args.load, 3600, wrkLog)
        allUp = lambda total, counts: total == n + 1 and counts.get("up") == n + 1  # noqa: E731
        print(HEADER)
        probe.mark()

        # The file, read at start and again on SIGHUP.
        results.append(row(probe, f"start with {n + 1:,} backends in the file, to serving",
                           startup, 2.0, "twistd's own start included"))
        row(probe, "  until all pass their first check", admin.waitFor("start", allUp, 60))
        time.sleep(2)
        stays = f"http://{rest[-1]}"
        before = admin.expect(200, "GET", f"/api/backends?q={quote(stays)}")[0]["backends"][0]
        writeConfig(config, [first] + rest[swap:] + others)
        started = time.monotonic()
        os.kill(lb.pid, signal.SIGHUP)

        def swapped(total, counts):
            if not allUp(total, counts):
                return False
            path = f"/api/backends?q={quote('http://' + others[-1])}&limit=1"
            return admin.expect(200, "GET", path)[0]["matched"] == 1

        admin.waitFor("reload", swapped, 60)
        after = admin.expect(200, "GET", f"/api/backends?q={quote(stays)}")[0]["backends"][0]
        kept = (after["id"], after["state"], after["last_change"]) == (
            before["id"], "up", before["last_change"]
        )
        results.append(kept)
        row(probe, f"SIGHUP swapping {swap:,} of them, until all are up",
            time.monotonic() - started, None,
            "a backend that stays keeps its id, state and history: "
            + ("yes" if kept else f"NO ({before} -> {after})"))
        writeConfig(config, [first])
        started = time.monotonic()
        os.kill(lb.pid, signal.SIGHUP)
        admin.waitFor("emptying", lambda total, counts: total == 1, 60)
        row(probe, f"SIGHUP leaving one: {n:,} removed", time.monotonic() - started)
        time.sleep(2)
        probe.mark()

        slowest = 0.0
        started = time.perf_counter()
        thousands = []
        mark = started
        for i, url in enumerate(urls, 1):
            _, elapsed, _ = admin.expect(201, "POST", "/api/backends", {"url": url})
            slowest = max(slowest, elapsed)
            if i % 1000 == 0:
                now = time.perf_counter()
                thousands.append(now - mark)
                mark = now
        total = time.perf_counter() - started
        spread = ""
        if len(thousands) >= 2:
            spread = f"; first 1,000 {thousands[0]:.2f} s, last 1,000 {thousands[-1]:.2f} s"
        results.append(row(probe, f"add {n:,} one call at a time", total, 10.0,
                           f"slowest call {slowest * 1000:.1f} ms{spread}"))
        row(probe, "  until all pass their first check", admin.waitFor("adds", allUp, 60))

        def reads(label: str) -> None:
            middle = max((n + 1) // 2 - 250, 0)
            for name, path in (
                (f"a page of 500 from {middle:,}", f"/api/backends?limit=500&offset={middle}"),
                ("state=down, a page of 50", "/api/backends?state=down&limit=50"),
                ("/api/status", "/api/status"),
                ("/metrics", "/metrics"),
            ):
                worst, size = 0.0, 0
                for _ in range(3):
                    _, _, elapsed, size = admin.call("GET", path)
                    worst = max(worst, elapsed)
                goal = 1.0 if name.startswith("a page") or name == "/metrics" else None
                results.append(row(probe, f"{label}: {name} (slowest of 3)", worst, goal,
                                   f"{size / 1024:.0f} KiB"))

        reads(f"at {n + 1:,}")
        _, elapsed, _ = admin.expect(200, "POST", "/api/backends/bulk", {"remove": urls})
        row(probe, f"remove {n:,} in one bulk call", elapsed)
        row(probe, "  until they are gone", admin.waitFor("removal", lambda t, c: t == 1, 60))
        _, elapsed, _ = admin.expect(200, "POST", "/api/backends/bulk",
                                     {"add": [{"url": u} for u in urls]})
        results.append(row(probe, f"add {n:,} in one bulk call", elapsed, 1.0))
        row(probe, "  until all pass their first check", admin.waitFor("bulk add", allUp, 60))
        reads("again")
        rss = rssMiB(lb.pid)
        probe.stop()
        print(
            f"probe: {probe.requests:,} requests, {probe.failed} failed"
            + (f" (the last: {probe.lastFailure})" if probe.failed else "")
            + f", the slowest answered in {probe.slowest * 1000:.0f} ms;"
            f" balancer RSS {rss:.0f} MiB"
        )
        results.append(probe.failed == 0)
        if wrk is not None:
            clients = stopWrk(wrk, wrkLog)
            wrk = None
            print(
                f"wrk -c{args.load}: {clients['requests']:,} requests at {clients['rps']:,.0f}"
                f" req/s, {clients['non2xx']} not 2xx"
                + (f", socket errors: {clients['errors']}" if clients["errors"] else "")
            )
            results.append(clients["non2xx"] == 0 and not clients["errors"])
        procs.stop(backend)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        results.append(False)
    finally:
        if probe is not None and probe.is_alive():
            probe.stop()
        if wrk is not None and wrk.poll() is None:
            wrk.kill()
            wrk.wait()
        procs.stopAll()
    print("every goal met" if results and all(results) else "a goal was missed")
    sys.exit(0 if results and all(results) else 1)


if __name__ == "__main__":
    main()
