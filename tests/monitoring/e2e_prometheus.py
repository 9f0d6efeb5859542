#!/usr/bin/env python3
"""The operator kit against a real Prometheus (Debian's `prometheus`).

  e2e_prometheus.py <cqrs-commandd> <cqrs-queryd> <cqrsctl>

Starts both daemons against the stack of the environment (CQRS_PG_DSN, CQRS_REDIS_URL,
CQRS_KAFKA_BROKERS; a topic prefix, consumer group and Redis database of its own) with
bearer tokens required, and a Prometheus on a free loopback port that scrapes both every
second with a `metrics`-scoped token and evaluates deploy/monitoring/cqrs.rules.yml every
second. Under a little load (every command, every read, a min_version read and a stream) it
then checks through Prometheus's HTTP API:
  - both targets are up (the token and the scrape work);
  - Prometheus loaded every rule of the file, and each one's last evaluation was healthy
    (no error such as a vector-matching conflict that only real series reveal);
  - every recording rule's expression, run as a query, and the series it recorded return at
    least one sample, each a finite number;
  - every query of the dashboard (deploy/monitoring/cqrs-dashboard.json; Grafana's
    $__rate_interval replaced by 1m, the only variable queries may use) returns at least one
    sample;
  - no alert is pending or firing in this healthy run (what the promtool tests cannot show:
    that real series of a healthy system stay below every threshold).
So a metric renamed in a daemon fails this test, not the dashboard in production.
Missing servers or a missing `prometheus` binary: a failure under CI=true, a skip (77) elsewhere.
"""
import json
import math
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
from ports import free_port  # noqa: E402 — the test suite's one port policy (tests/support/ports.sh)

ROOT = pathlib.Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "monitoring" / "cqrs.rules.yml"
DASHBOARD = ROOT / "deploy" / "monitoring" / "cqrs-dashboard.json"
REDIS_DB = 9  # a database no other test uses (tests/support/redisdb.h)
LOAD_SECONDS = 25
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg, flush=True)


def unavailable(msg):
    if os.environ.get("CI") == "true":
        print(f"FAIL: {msg} (CI=true: a missing server or tool is a failure)", flush=True)
        sys.exit(1)
    print(f"SKIP: {msg}", flush=True)
    sys.exit(77)


class Http:
    def __init__(self, port, token):
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def call(self, method, path, body=None, headers=None, timeout=10):
        h = {"Authorization": f"Bearer {self.token}"}
        h.update(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw) if raw else None
            except ValueError:
                return e.code, None


def wait_ready(port, proc, path="/readyz", seconds=60):
    """Until GET path answers 200 (True), proc exits or the time is up (False)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def prom_get(port, path, **params):
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return json.loads(e.read())
        except ValueError:
            return {"status": "error", "error": f"HTTP {e.code}"}


def query(port, expr):
    """(samples, error): the result of an instant query, as a list of (labels, value)."""
    out = prom_get(port, "/api/v1/query", query=expr)
    if out.get("status") != "success":
        return None, out.get("error", "no error text")
    data = out["data"]
    if data["resultType"] == "vector":
        return [(s["metric"], float(s["value"][1])) for s in data["result"]], None
    if data["resultType"] == "scalar":
        return [({}, float(data["result"][1]))], None
    return None, f"unexpected result type {data['resultType']}"


def load(cmd, qry, stop, counts):
    """Every command and read, round after round, until stop is set."""
    customer = str(uuid.uuid4())
    n = 0
    while not stop.is_set():
        n += 1
        sku = f"MON-{uuid.uuid4().hex[:12]}"
        st, p = cmd.call("POST", "/v1/products", {"sku": sku, "name": f"monitoring {n}",
                                                   "category": "mon", "price_cents": 100 + n,
                                                   "currency": "EUR", "initial_stock": 50})
        counts[st] = counts.get(st, 0) + 1
        if st != 201:
            time.sleep(0.2)
            continue
        pid = p["id"]
        steps = [
            ("POST", f"/v1/products/{pid}/stock-adjustments", {"delta": 5, "reason": "restock"}),
            ("PUT", f"/v1/products/{pid}/price", {"price_cents": 200 + n}),
            ("PATCH", f"/v1/products/{pid}", {"description": "watched by Prometheus"}),
        ]
        version = p["version"]
        for method, path, body in steps:
            st, doc = cmd.call(method, path, body)
            counts[st] = counts.get(st, 0) + 1
            if st == 200:
                version = doc["version"]
        st, _ = qry.call("GET", f"/v1/products/{pid}?min_version={version}&wait_ms=5000")
        counts[st] = counts.get(st, 0) + 1
        st, order = cmd.call("POST", "/v1/orders", {"customer_id": customer,
                                                    "items": [{"product_id": pid, "quantity": 2}]})
        counts[st] = counts.get(st, 0) + 1
        if st == 201:
            oid = order["id"]
            qry.call("GET", f"/v1/orders/{oid}?min_version={order['version']}&wait_ms=5000")
            if n % 3 == 0:
                cmd.call("POST", f"/v1/orders/{oid}/cancel")
        if n % 5 == 0:
            cmd.call("POST", f"/v1/products/{pid}/discontinue")
        for path in ("/v1/products?limit=5", f"/v1/customers/{customer}/orders",
                     "/v1/reports/top-products", "/v1/products?q=monitoring&limit=3"):
            st, _ = qry.call("GET", path)
            counts[st] = counts.get(st, 0) + 1
        if n % 4 == 1:
            # A stream: the current document arrives at once; then the client leaves.
            req = urllib.request.Request(f"{qry.base}/v1/products/{pid}/stream",
                                         headers={"Authorization": f"Bearer {qry.token}",
                                                  "Accept": "text/event-stream"})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    r.readline()
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.05)


def dashboard_queries():
    doc = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(doc.get("panels", []))
    return out


def redis_cli_args(redis_cli, url):
    """redis-cli on the database of url as the operator (the stack's admin user when it has one,
    else the URL's credentials; over TLS with the environment's CA and client certificate for
    rediss://), the password in the environment (REDISCLI_AUTH): (argv, env)."""
    u = urllib.parse.urlsplit(url)
    args = [redis_cli, "-h", u.hostname, "-p", str(u.port or 6379), "-n", u.path.strip("/") or "0"]
    if u.scheme == "rediss":
        args.append("--tls")
        for flag, var in (("--cacert", "CQRS_REDIS_TLS_CA_FILE"), ("--cert", "CQRS_REDIS_TLS_CERT_FILE"),
                          ("--key", "CQRS_REDIS_TLS_KEY_FILE")):
            if os.environ.get(var):
                args += [flag, os.environ[var]]

    def secret(var):
        if os.environ.get(var + "_FILE"):
            return pathlib.Path(os.environ[var + "_FILE"]).read_text().strip()
        return os.environ.get(var)

    user = os.environ.get("CQRS_REDIS_ADMIN_USER")
    password = secret("CQRS_REDIS_ADMIN_PASSWORD") if user else (
        urllib.parse.unquote(u.password) if u.password else secret("CQRS_REDIS_PASSWORD"))
    user = user or (urllib.parse.unquote(u.username) if u.username else None)
    if user:
        args += ["--user", user]
    env = dict(os.environ)
    if password:
        env["REDISCLI_AUTH"] = password
    return args, env


def main():
    if len(sys.argv) != 4:
        print(__doc__)
        return 2
    commandd, queryd, ctl = sys.argv[1:]
    for var in ("CQRS_PG_DSN", "CQRS_REDIS_URL", "CQRS_KAFKA_BROKERS"):
        if not os.environ.get(var):
            unavailable(f"{var} is not set; start the stack: eval \"$(deploy/local/stack.sh env)\"")
    prometheus = shutil.which("prometheus")
    if not prometheus:
        unavailable("no prometheus binary (Debian package prometheus; deploy/local/deps.sh installs it)")
    redis_cli = shutil.which("redis-cli")
    if not redis_cli:
        unavailable("no redis-cli (Debian package redis-tools)")

    work = pathlib.Path(tempfile.mkdtemp(prefix="cqrs-monitoring."))
    prefix = f"mon{random.randrange(10**8)}"
    tok = {"prom": f"prom-{uuid.uuid4().hex}", "app": f"app-{uuid.uuid4().hex}"}
    (work / "tokens").write_text(f"prometheus {tok['prom']} metrics\napp {tok['app']} read,write\n")
    (work / "prom-token").write_text(tok["prom"])
    base = urllib.parse.urlsplit(os.environ["CQRS_REDIS_URL"])
    redis_url = base._replace(path=f"/{REDIS_DB}").geturl()
    env = dict(os.environ, CQRS_TOPIC_PREFIX=prefix, CQRS_CONSUMER_GROUP=prefix,
               CQRS_REDIS_URL=redis_url, CQRS_RELAY_POLL_MS="200", CQRS_LOG_LEVEL="warn",
               CQRS_AUTH_TOKENS_FILE=str(work / "tokens"))
    procs = []

    def stop_all():
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    try:
        r = subprocess.run([ctl, "migrate"], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            unavailable(f"cqrsctl migrate failed ({r.returncode}): {r.stderr.strip()}")
        cli, cli_env = redis_cli_args(redis_cli, redis_url)
        subprocess.run(cli + ["FLUSHDB"], check=True, capture_output=True, env=cli_env)

        cport, qport, pport = free_port(), free_port(), free_port()
        for binary, port, name in ((commandd, cport, "commandd"), (queryd, qport, "queryd")):
            log = open(work / f"{name}.log", "w")
            procs.append(subprocess.Popen([binary], env=dict(env, CQRS_HTTP_PORT=str(port)),
                                          stdout=log, stderr=subprocess.STDOUT))
            if not wait_ready(port, procs[-1]):
                fail(f"cqrs-{name} did not become ready on port {port} (log: {work}/{name}.log)")
                return 1

        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": job, "authorization": {"credentials_file": str(work / "prom-token")},
                 "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                for job, port in (("cqrs-commandd", cport), ("cqrs-queryd", qport))
            ],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        plog = open(work / "prometheus.log", "w")
        procs.append(subprocess.Popen(
            [prometheus, f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{pport}"],
            stdout=plog, stderr=subprocess.STDOUT))
        if not wait_ready(pport, procs[-1], path="/-/ready"):
            if procs[-1].poll() is not None:
                fail(f"prometheus exited {procs[-1].returncode}: {(work / 'prometheus.log').read_text()[-2000:]}")
            else:
                fail("prometheus did not become ready within 60 s")
            return 1
        print(f"ok: prometheus on 127.0.0.1:{pport} scrapes cqrs-commandd :{cport} and "
              f"cqrs-queryd :{qport} (work folder {work})", flush=True)

        stop = threading.Event()
        counts = {}
        cmd, qry = Http(cport, tok["app"]), Http(qport, tok["app"])
        loader = threading.Thread(target=load, args=(cmd, qry, stop, counts), daemon=True)
        loader.start()
        time.sleep(LOAD_SECONDS)
        print(f"ok: load for {LOAD_SECONDS} s, answers by status: {dict(sorted(counts.items()))}",
              flush=True)
        if counts.get(201, 0) < 10:
            fail(f"the load hardly ran: {counts}")

        try:
            check(pport)
        finally:
            stop.set()
            loader.join(timeout=30)
    finally:
        stop_all()
    if failures:
        print(f"{len(failures)} failures (logs in {work})")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    print("e2e_prometheus: all checks passed")
    return 0


def check(pport):
    # The scrapes work (with the metrics-scoped token).
    targets = prom_get(pport, "/api/v1/targets")["data"]["activeTargets"]
    for t in targets:
        if t["health"] != "up":
            fail(f"target {t['labels'].get('job')} is {t['health']}: {t.get('lastError')}")
    if len(targets) != 2:
        fail(f"{len(targets)} active targets, expected 2")

    # Every rule loaded and evaluated without error.
    defined = yaml.safe_load(RULES.read_text())["groups"]
    n_defined = sum(len(g["rules"]) for g in defined)
    loaded = prom_get(pport, "/api/v1/rules")["data"]["groups"]
    n_loaded = sum(len(g["rules"]) for g in loaded)
    if n_loaded != n_defined:
        fail(f"prometheus loaded {n_loaded} rules, {RULES.name} defines {n_defined}")
    for g in loaded:
        for r in g["rules"]:
            if r.get("health") != "ok" or r.get("lastError"):
                fail(f"rule {r.get('name')}: health {r.get('health')}: {r.get('lastError')}")
    print(f"ok: prometheus loaded the {n_loaded} rules, every last evaluation healthy", flush=True)

    # Every recording rule: its expression and the series it recorded.
    n = bad = 0
    for g in defined:
        for r in g["rules"]:
            if "record" not in r:
                continue
            n += 1
            recorded = []
            for what, expr in (("expression", r["expr"]), ("recorded series", r["record"])):
                samples, err = query(pport, expr)
                if what == "recorded series":
                    recorded = samples or []
                if err:
                    fail(f"{r['record']}: the {what} fails: {err}")
                elif not samples:
                    fail(f"{r['record']}: the {what} returns nothing")
                elif not all(math.isfinite(v) for _, v in samples):
                    fail(f"{r['record']}: the {what} returns non-finite values: {samples}")
                else:
                    continue
                bad += 1
            if recorded:
                shown = ", ".join(f"{labels_text(m)}={v:.4g}" for m, v in recorded[:3])
                more = f" (+{len(recorded) - 3})" if len(recorded) > 3 else ""
                print(f"ok: {r['record']}: {shown}{more}", flush=True)
    print(f"{'ok' if not bad else 'FAIL'}: {n} recording rules evaluated, their expression and "
          f"recorded series each returning finite samples{f' ({bad} did not)' if bad else ''}",
          flush=True)

    # Every dashboard query.
    queries = dashboard_queries()
    if not queries:
        fail(f"no queries found in {DASHBOARD.name}")
    good = 0
    for title, expr in queries:
        concrete = expr.replace("$__rate_interval", "1m")
        if "$" in concrete:
            fail(f"dashboard panel {title!r}: a variable this test does not know: {expr}")
            continue
        samples, err = query(pport, concrete)
        if err:
            fail(f"dashboard panel {title!r}: {expr}: {err}")
        elif not samples:
            fail(f"dashboard panel {title!r}: {expr}: returns nothing")
        else:
            good += 1
    print(f"{'ok' if good == len(queries) else 'FAIL'}: {good} of {len(queries)} dashboard "
          "queries return data", flush=True)

    # A healthy system raises nothing.
    alerts = prom_get(pport, "/api/v1/alerts")["data"]["alerts"]
    for a in alerts:
        fail(f"alert {a['labels'].get('alertname')} is {a['state']} in a healthy run: {a['labels']}"
             f" {a['annotations'].get('summary')}")
    if not alerts:
        print("ok: no alert pending or firing", flush=True)


def labels_text(m):
    return "{" + ",".join(f"{k}={v}" for k, v in sorted(m.items()) if k != "__name__") + "}"


if __name__ == "__main__":
    sys.exit(main())
