#!/usr/bin/env python3
"""Instructions per request, counted by valgrind's callgrind: a cost measure
that does not move with this noisy machine's load (issue 11).

    python3 benches/cost.py                      # target/release/pdvault, 8,192 requests a scenario
    python3 benches/cost.py --quick              # 300 requests, batch 2x (CI smoke; nothing asserted)
    python3 benches/cost.py --bin target/debug/pdvault --requests 1000

It starts `pdvault serve --dev` under `valgrind --tool=callgrind` (fresh
temporary data and keys, a copy of config/pdvault.toml, log level warn), makes
a token and 200 subjects, then for each scenario zeroes the counters
(`callgrind_control -z`), sends the requests over `--connections` keep-alive
HTTPS connections, and dumps the counters (`callgrind_control -d`). The
server's instructions (user space, every thread) divided by the requests are
the scenario's cost:

- `health`: `GET /v1/health` (the floor: TLS, HTTP, routing);
- `read_delivery`: `GET /v1/subjects/{id}` under purpose delivery;
- `create`: `POST /v1/subjects` with the six fields;
- `batch_create_1000`: `POST /v1/subjects:batchCreate` of 1,000 subjects,
  reported per subject.

Each result is a JSON line on standard output, and the ratios to `health` close
the run. The client is this script (Python's http.client): its own cost is not
counted, only the server process's. Callgrind serialises the server's threads,
so the counts, not the times, are what to compare.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SUBJECT = {
    "surname": "Ivanova",
    "given_name": "Aigerim",
    "patronymic": "Serikovna",
    "phone": "+77015550177",
    "email": "aigerim.k@example.kz",
    "address": {"country": "KZ", "city": "Almaty", "street": "Abai Ave", "building": "10", "postal_code": "050000"},
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Vault:
    def __init__(self, binary, tmp, port):
        self.tmp, self.port = tmp, port
        cfg = os.path.join(tmp, "pdvault.toml")
        shutil.copy(os.path.join(ROOT, "config", "pdvault.toml"), cfg)
        self.out = os.path.join(tmp, "callgrind.out")
        env = dict(os.environ, PDVAULT_LOG="warn")
        for k in [k for k in env if k.startswith("PDVAULT_") and k != "PDVAULT_LOG"]:
            del env[k]
        self.proc = subprocess.Popen(
            [
                # --fair-sched: sled's lazy thread pool spins while another
                # thread initialises it, which valgrind's default lock can
                # starve for minutes.
                "valgrind", "--tool=callgrind", "--callgrind-out-file=" + self.out,
                "--dump-instr=no", "--dump-line=no", "--vgdb=yes", "--fair-sched=yes",
                binary, "--config", cfg, "--data-dir", os.path.join(tmp, "data"),
                "--keys-dir", os.path.join(tmp, "keys"), "--listen", f"127.0.0.1:{port}", "serve", "--dev",
            ],
            env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "server.log"), "wb"),
        )
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                sys.exit("the server stopped: " + open(os.path.join(tmp, "server.log")).read()[-2000:])
            try:
                if self.request("GET", "/v1/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                sys.exit("the server did not answer within 300 s")
            time.sleep(1)
        self.admin = open(os.path.join(tmp, "keys", "admin.token")).read().strip()

    def context(self):
        ctx = ssl.create_default_context(cafile=os.path.join(self.tmp, "keys", "tls-cert.pem"))
        return ctx

    def connect(self):
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context(), timeout=600)

    def request(self, method, path, token=None, purpose=None, body=None, conn=None):
        own = conn is None
        c = conn or self.connect()
        headers = {}
        if token:
            headers["Authorization"] = "Bearer " + token
        if purpose:
            headers["X-Purpose"] = purpose
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        c.request(method, path, body=data, headers=headers)
        r = c.getresponse()
        payload = r.read()
        if own:
            c.close()
        return r.status, payload

    def control(self, flag):
        out = subprocess.run(
            ["callgrind_control", flag, str(self.proc.pid)], capture_output=True, text=True, timeout=300
        )
        if out.returncode != 0:
            sys.exit(f"callgrind_control {flag}: {out.stdout}{out.stderr}")

    def counted(self, run):
        """Instructions of the server while `run()` ran."""
        before = set(os.listdir(self.tmp))
        self.control("-z")
        run()
        self.control("-d")
        dumps = sorted(set(os.listdir(self.tmp)) - before)
        total = 0
        for d in dumps:
            if not d.startswith("callgrind.out"):
                continue
            text = open(os.path.join(self.tmp, d), errors="replace").read()
            m = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.M)
            if m:
                total += int(m.group(1))
        return total

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def drive(vault, n, conns, make):
    """`n` requests over `conns` keep-alive connections; `make(i)` gives
    (method, path, token, purpose, body, expected status)."""
    errors = []

    def worker(k):
        c = vault.connect()
        for i in range(k, n, conns):
            method, path, token, purpose, body, want = make(i)
            status, payload = vault.request(method, path, token, purpose, body, conn=c)
            if status != want:
                errors.append(f"{method} {path}: {status} {payload[:200]!r}")
        c.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        sys.exit(f"{len(errors)} requests failed, e.g. {errors[0]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "pdvault"))
    # Two of the access index's batches (4,096 writes) inside the count:
    # with fewer, the index writes a read causes may fall outside it.
    ap.add_argument("--requests", type=int, default=8192)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--batches", type=int, default=5, help="batch_create_1000 requests")
    ap.add_argument("--quick", action="store_true", help="300 requests, 2 batches")
    ap.add_argument("--keep", action="store_true",
                    help="keep the callgrind dumps (one per scenario) for callgrind_annotate, and say where")
    a = ap.parse_args()
    if a.quick:
        a.requests, a.batches = 300, 2
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        sys.exit("needs valgrind (Debian's valgrind package)")
    tmp = tempfile.mkdtemp(prefix="pdvault-cost-")
    vault = Vault(a.bin, tmp, free_port())
    try:
        status, body = vault.request(
            "POST", "/v1/admin/tokens", vault.admin, None,
            {"caller": "cost-bench", "purposes": ["order", "delivery"], "capabilities": ["read", "write"],
             "ttl_seconds": 86400},
        )
        assert status == 201, body
        token = json.loads(body)["token"]
        ids = []
        for _ in range(200):
            status, body = vault.request("POST", "/v1/subjects", token, "order", {"fields": SUBJECT})
            assert status == 201, body
            ids.append(json.loads(body)["id"])
        batch = {"subjects": [{"fields": SUBJECT} for _ in range(1000)]}
        scenarios = [
            ("health", a.requests, 1, lambda i: ("GET", "/v1/health", None, None, None, 200)),
            ("read_delivery", a.requests, 1,
             lambda i: ("GET", f"/v1/subjects/{ids[i % len(ids)]}", token, "delivery", None, 200)),
            ("create", a.requests, 1, lambda i: ("POST", "/v1/subjects", token, "order", {"fields": SUBJECT}, 201)),
            ("batch_create_1000", a.batches, 1000,
             lambda i: ("POST", "/v1/subjects:batchCreate", token, "order", batch, 200)),
        ]
        results = {}
        for name, n, per, make in scenarios:
            drive(vault, min(n, 20), a.connections, make)  # warm the paths first
            total = vault.counted(lambda: drive(vault, n, a.connections, make))
            per_unit = total / (n * per)
            results[name] = per_unit
            if a.keep:
                dumps = sorted(d for d in os.listdir(tmp) if d.startswith("callgrind.out."))
                if dumps:
                    os.rename(os.path.join(tmp, dumps[-1]), os.path.join(tmp, f"{name}.callgrind"))
            line = {"scenario": name, "requests": n, "instructions": total,
                    "per_request" if per == 1 else "per_subject": round(per_unit)}
            print(json.dumps(line), flush=True)
        ratios = {f"{k}/health": round(v / results["health"], 2) for k, v in results.items() if k != "health"}
        print(json.dumps({"ratios": ratios, "binary": a.bin, "connections": a.connections}), flush=True)
    finally:
        vault.stop()
        if a.keep:
            print(json.dumps({"dumps": tmp}), flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
