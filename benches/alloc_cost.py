#!/usr/bin/env python3
"""What the zeroizing global allocator costs (issue 9, item 17).

Starts two server binaries in turn on loopback (`serve --dev`, fresh keys and
data each): WITH (the normal build) and WITHOUT (the same source with the
`#[global_allocator]` lines of src/main.rs removed), creates one subject,
and drives `GET /v1/subjects/{id}` under `delivery` with wrk (Debian `wrk`)
at C connections for D seconds, alternating WITH, WITHOUT, WITH, WITHOUT so
that the machine's noise falls on both. Prints one JSON line per run and the
ratio of the medians. Not a test: nothing is asserted.

    python3 benches/alloc_cost.py WITH_BINARY WITHOUT_BINARY [SECONDS] [CONNECTIONS]
"""
import json, os, re, socket, ssl, statistics, subprocess, sys, tempfile, time, urllib.request

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with_bin, without_bin = sys.argv[1], sys.argv[2]
secs = int(sys.argv[3]) if len(sys.argv) > 3 else 10
conns = int(sys.argv[4]) if len(sys.argv) > 4 else 16


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def run(binary):
    tmp = tempfile.mkdtemp(prefix="pdvault-alloc-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PDVAULT_PASSPHRASE", "PDVAULT_TOKEN")}
    args = [binary, "--config", os.path.join(root, "config/pdvault.toml"), "--data-dir", f"{tmp}/data",
            "--keys-dir", f"{tmp}/keys", "--listen", f"127.0.0.1:{port}", "serve", "--dev"]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        base = f"https://127.0.0.1:{port}"
        for _ in range(600):
            try:
                ctx = ssl.create_default_context(cafile=f"{tmp}/keys/tls-cert.pem")
                urllib.request.urlopen(f"{base}/v1/health", context=ctx, timeout=2)
                break
            except Exception:
                time.sleep(0.1)
        admin = open(f"{tmp}/keys/admin.token").read().strip()

        def call(method, path, token, purpose, body):
            req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode())
            req.add_header("Authorization", f"Bearer {token}")
            req.add_header("Content-Type", "application/json")
            if purpose:
                req.add_header("X-Purpose", purpose)
            with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
                return json.loads(r.read())

        tok = call("POST", "/v1/admin/tokens", admin, None, {"caller": "order-service", "purposes": ["order", "delivery"],
                   "capabilities": ["read", "write"], "ttl_seconds": 3600})["token"]
        sid = call("POST", "/v1/subjects", tok, "order", {"fields": {"surname": "Ivanova", "given_name": "Aigerim",
                   "phone": "+77015550177", "address": {"country": "KZ", "city": "Almaty", "street": "Abai Ave"}}})["id"]
        out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{secs}s", "-H", f"Authorization: Bearer {tok}",
                              "-H", "X-Purpose: delivery", f"{base}/v1/subjects/{sid}"],
                             capture_output=True, text=True, check=True).stdout
        rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return rps, int(non2xx.group(1)) if non2xx else 0
    finally:
        server.terminate()
        server.wait()
        subprocess.run(["rm", "-rf", tmp])


results = {"with": [], "without": []}
for label, binary in [("with", with_bin), ("without", without_bin)] * 2:
    rps, bad = run(binary)
    results[label].append(rps)
    print(json.dumps({"allocator": "zeroizing" if label == "with" else "system", "read_delivery_rps": rps,
                      "non_2xx": bad, "connections": conns, "seconds": secs}), flush=True)
w, wo = statistics.median(results["with"]), statistics.median(results["without"])
print(json.dumps({"ratio_zeroizing_over_system": round(w / wo, 3), "with_median_rps": w, "without_median_rps": wo}))
