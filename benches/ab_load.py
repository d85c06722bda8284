#!/usr/bin/env python3
"""Two server builds compared in one session: the load benchmark's chosen parts
run against build A, then B, then A, then B... (`--rounds`), so that both see
the same machine and the same noise; reports each build's median req/s and
median p99 latency per scenario, and their ratios B / A.

    cargo bench --bench load --no-run          # the load driver
    python3 benches/ab_load.py OLD_BIN NEW_BIN [--only read_delivery] [--rounds 3] [--secs 10]

Keep a build aside with `cp target/release/pdvault /tmp/pdvault-before`
before changing the code, then build again. Nothing is asserted.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(binary, only, secs):
    env = dict(os.environ, PDVAULT_LOAD_BIN=binary, PDVAULT_LOAD_ONLY=only,
               PDVAULT_LOAD_POSTGRES="0", PDVAULT_LOAD_SECS=str(secs))
    out = subprocess.run(["cargo", "bench", "-q", "--bench", "load"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"load bench failed for {binary}:\n{out.stderr[-2000:]}")
    rows = {}
    for line in out.stdout.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "scenario" in r and "rps" in r:
            rows[f'{r["scenario"]}@{r["connections"]}'] = (r["rps"], r.get("p99_ms"))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--only", default="read_delivery")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=float, default=10)
    o = ap.parse_args()
    got = {"a": [], "b": []}
    for i in range(o.rounds):
        for side in ("a", "b"):
            rows = run(getattr(o, side), o.only, o.secs)
            got[side].append(rows)
            print(json.dumps({"round": i + 1, "build": side,
                              "rps": {n: v[0] for n, v in rows.items()},
                              "p99_ms": {n: v[1] for n, v in rows.items()}}), flush=True)
    names = sorted(set().union(*[r.keys() for r in got["a"] + got["b"]]))
    def median(side, n, i):
        vals = [r[n][i] for r in got[side] if n in r and r[n][i] is not None]
        return statistics.median(vals) if vals else None

    def ratio(a, b):
        return round(b / a, 3) if a and b is not None else None

    for n in names:
        a, b = median("a", n, 0), median("b", n, 0)
        a99, b99 = median("a", n, 1), median("b", n, 1)
        print(json.dumps({"scenario": n, "a_median_rps": round(a, 1), "b_median_rps": round(b, 1),
                          "ratio_b_over_a": ratio(a, b),
                          "a_median_p99_ms": a99, "b_median_p99_ms": b99, "p99_ratio_b_over_a": ratio(a99, b99),
                          "a": o.a, "b": o.b, "rounds": o.rounds}))


if __name__ == "__main__":
    main()
