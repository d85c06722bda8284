#!/usr/bin/env python3
"""Two server builds compared in one session: the load benchmark's chosen parts
run against build A, then B, then A, then B... (`--rounds`), so that both see
the same machine and the same noise; reports each build's median req/s per
scenario and the ratio B / A.

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
            rows[f'{r["scenario"]}@{r["connections"]}'] = r["rps"]
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
            print(json.dumps({"round": i + 1, "build": side, "rps": rows}), flush=True)
    names = sorted(set().union(*[r.keys() for r in got["a"] + got["b"]]))
    for n in names:
        a = statistics.median(r[n] for r in got["a"] if n in r)
        b = statistics.median(r[n] for r in got["b"] if n in r)
        print(json.dumps({"scenario": n, "a_median_rps": round(a, 1), "b_median_rps": round(b, 1),
                          "ratio_b_over_a": round(b / a, 3) if a else None,
                          "a": o.a, "b": o.b, "rounds": o.rounds}))


if __name__ == "__main__":
    main()
