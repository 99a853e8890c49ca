"""
Markdown tables from bench/run.sh's results.tsv.

    python summarize.py RESULTS.tsv "target1 target2 ..." CONNS TPUT_SECS LIGHT_SECS
"""

import csv
import statistics
import sys
from collections import defaultdict


def main():
    path, order, conns, tsecs, lsecs = sys.argv[1:6]
    order = order.split()
    runs = defaultdict(dict)  # (target, shape) -> {round: row}
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            runs[row["target"], row["shape"]][int(row["round"])] = row
    rounds = max((r for byround in runs.values() for r in byround), default=0)

    def med(values):
        values = [v for v in values if v == v]  # drop NaN
        return statistics.median(values) if values else float("nan")

    def ratio(target, shape, base):
        mine, theirs = runs[target, shape], runs[base, shape]
        values = [float(mine[r]["rps"]) / float(theirs[r]["rps"])
                  for r in mine if r in theirs and float(theirs[r]["rps"]) > 0]
        return f"{med(values):.2f}" if values else "-"

    shapes = [
        ("throughput", f"Throughput: `wrk -t1 -c{conns} -d{tsecs}s --latency`"),
        ("light", f"Light load: `wrk -t1 -c1 -d{lsecs}s --latency`"),
    ]
    for shape, title in shapes:
        print(f"\n### {title}, median of {rounds} round{'s' if rounds != 1 else ''}\n")
        head = ["target", "req/s", "req/s min-max", "x naive", "x direct", "p50 ms", "p99 ms"]
        if shape == "throughput":
            head.append("peak RSS MB")
        head.append("errors")
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for target in order:
            byround = runs.get((target, shape))
            if not byround:
                continue
            rows = list(byround.values())
            rps = [float(r["rps"]) for r in rows]
            cells = [
                target,
                f"{med(rps):.0f}",
                f"{min(rps):.0f}-{max(rps):.0f}",
                ratio(target, shape, "naive"),
                ratio(target, shape, "direct"),
                f"{med([float(r['p50_ms']) for r in rows]):.2f}",
                f"{med([float(r['p99_ms']) for r in rows]):.2f}",
            ]
            if shape == "throughput":
                rss = [int(r["peak_rss_kb"]) for r in rows if r["peak_rss_kb"] != "-"]
                cells.append(f"{max(rss) / 1024:.1f}" if rss else "-")
            cells.append(str(sum(int(r["errors"]) for r in rows)))
            print("| " + " | ".join(cells) + " |")
    print(
        "\nreq/s, p50, p99: medians over rounds. x naive, x direct: median over rounds of"
        " (req/s / the naive design's or one backend's req/s in the same round)."
        "\npeak RSS: VmHWM summed over the balancer's processes, reset before each"
        " throughput run; the highest over rounds (direct: not measured)."
        "\nerrors: non-2xx/3xx responses + socket errors, summed over rounds."
    )


if __name__ == "__main__":
    main()
