#!/usr/bin/env python3
"""What a core dump of the live server holds (issue 9, item 17).

Starts `pdvault serve --dev` (the binary given, default target/debug/pdvault)
on a free loopback port with fresh keys and data, creates N subjects with
distinct surnames and phones, reads each once under `delivery` (5,500 requests
in all with N = 2,500), takes a core dump of the running process with gdb's
`gcore`, and counts how many distinct field values and how many copies of the
caller's bearer token are in it. Needs gdb (Debian `gdb`) and root or ptrace
rights. Prints one JSON line.

    python3 benches/core_dump.py [BINARY] [N]       (READS=... overrides the read count)
"""
import json, os, random, re, secrets, socket, ssl, string, subprocess, sys, tempfile, time, urllib.request
from concurrent.futures import ThreadPoolExecutor

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "target/debug/pdvault")
n = int(sys.argv[2]) if len(sys.argv) > 2 else 2500

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

tmp = tempfile.mkdtemp(prefix="pdvault-core-")
port = free_port()
args = [binary, "--config", os.path.join(root, "config/pdvault.toml"), "--data-dir", f"{tmp}/data",
        "--keys-dir", f"{tmp}/keys", "--listen", f"127.0.0.1:{port}"]
env = {k: v for k, v in os.environ.items() if k not in ("PDVAULT_PASSPHRASE", "PDVAULT_TOKEN")}
server = subprocess.Popen(args + ["serve", "--dev"], stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/server.log", "w"), env=env)
try:
    for _ in range(600):
        if os.path.exists(f"{tmp}/keys/admin.token"):
            try:
                ctx = ssl.create_default_context(cafile=f"{tmp}/keys/tls-cert.pem")
                urllib.request.urlopen(f"https://127.0.0.1:{port}/v1/health", context=ctx, timeout=2)
                break
            except Exception:
                pass
        time.sleep(0.1)
    admin = open(f"{tmp}/keys/admin.token").read().strip()
    base = f"https://127.0.0.1:{port}"

    def call(method, path, token, purpose=None, body=None):
        req = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode())
        req.add_header("Authorization", f"Bearer {token}")
        req.add_header("Content-Type", "application/json")
        if purpose:
            req.add_header("X-Purpose", purpose)
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return json.loads(r.read())

    tok = call("POST", "/v1/admin/tokens", admin, None, {"caller": "order-service", "purposes": ["order", "delivery"],
               "capabilities": ["read", "write"], "ttl_seconds": 3600})["token"]
    rnd = random.Random(7)
    surnames = ["Zq" + "".join(rnd.choice(string.ascii_lowercase) for _ in range(10)) for _ in range(n)]
    phones = ["+7701%07d" % rnd.randrange(10**7) for _ in range(n)]
    ids = []
    for i in range(0, n, 500):
        body = {"subjects": [{"fields": {"surname": s, "phone": p}} for s, p in zip(surnames[i:i + 500], phones[i:i + 500])]}
        ids += [r["id"] for r in call("POST", "/v1/subjects:batchCreate", tok, "order", body)["results"]]
    reads = int(os.environ.get("READS", 5500 - n // 500 - 1))
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda k: call("GET", f"/v1/subjects/{ids[k % n]}", tok, "delivery"), range(reads)))
    core = f"{tmp}/core"
    subprocess.run(["gcore", "-o", core, str(server.pid)], check=True, capture_output=True)
    data = open(f"{core}.{server.pid}", "rb").read()
    # One pass per pattern over the dump, then a set intersection.
    seen_names = set(re.findall(rb"Zq[a-z]{10}", data))
    seen_phones = set(re.findall(rb"\+7701[0-9]{7}", data))
    surnames_found = sum(1 for s in surnames if s.encode() in seen_names)
    phones_found = sum(1 for p in phones if p.encode() in seen_phones)
    print(json.dumps({"binary": binary, "subjects": n, "requests": reads + n // 500 + 1, "core_bytes": len(data),
                      "surnames_in_core": surnames_found, "phones_in_core": phones_found,
                      "token_copies_in_core": data.count(tok.encode()),
                      "admin_token_copies_in_core": data.count(admin.encode())}))
finally:
    server.kill()
    server.wait()
    subprocess.run(["rm", "-rf", tmp])
