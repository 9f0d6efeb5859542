#!/usr/bin/env python3
"""tests/fault/fault.py — fault-injection suite with a history checker (issue #11).

Each scenario runs the real daemons of a failpoint build against a real stack (PostgreSQL,
Redis, Kafka from deploy/local/stack.sh, taken from the environment: eval "$(stack.sh env)"),
in a PostgreSQL database, Redis database and topic prefix of its own. Client threads issue
commands (CreateProduct, AdjustStock, PlaceOrder, CancelOrder) with an Idempotency-Key each and
retry on timeouts, connection loss and 5xx with the same key; every command ends in the history
as ok (2xx), failed (4xx) or unknown (no final answer before its deadline). Reader threads read
documents back and log the versions they saw. Meanwhile a nemesis injects the scenario's
faults, then heals them. After the heal the checker waits (bounded) until the system is quiet
and the read model caught up, and then judges the history:

  lost        an ok command whose effect is not in PostgreSQL; an event of the PostgreSQL log
              that is not in Kafka; a document behind its aggregate after the wait
  duplicated  a command whose effect is in PostgreSQL more than once; an (aggregate, version)
              more than once in Kafka; a failed command whose effect is there anyway
  out of order
              an aggregate's events out of version order in its partition; a reader that saw a
              document's version go backwards
  converge    seconds from the heal until the outbox is empty and every document in Redis has
              its aggregate's version; then `cqrsctl verify` must pass

Prints one table. Exit 0 when every scenario is clean and every negative control (a
deliberately unsafe build mode) was caught; 1 otherwise; 2 on a setup error (a missing server
is an error: the suite never skips).

  fault.py --build BUILD_DIR [--scenario NAME ...] [--seed N] [--long]
"""
import argparse
import collections
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STACK_SH = os.path.join(REPO, "deploy", "local", "stack.sh")
PG_BIN = os.environ.get("CQRS_PG_BIN", "/usr/lib/postgresql/15/bin")
LEASE_MS = 2000
MSG_TIMEOUT_MS = 5000  # the relay's delivery timeout; Kafka pauses last longer than this


def log(*a):
    print("[fault %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


class SetupError(Exception):
    pass


def free_port():
    """A port below the ephemeral range (32768+), where no outgoing connection can take it."""
    stack = {os.environ.get(v) for v in ("CQRS_PG_PORT", "CQRS_REDIS_PORT", "CQRS_KAFKA_PORT",
                                         "CQRS_KAFKA_CONTROLLER_PORT")}
    while True:
        p = random.SystemRandom().randrange(20000, 32000)
        if str(p) in stack:  # a server of the stack may be down right now (a fault)
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
            return p
        except OSError:
            continue
        finally:
            s.close()


# ------------------------------------------------------------------------------ servers ---


class Stack:
    """The servers from the environment; the nemesis kills and restarts them."""

    def __init__(self):
        missing = [v for v in ("CQRS_STACK_DIR", "CQRS_PG_DSN", "CQRS_REDIS_URL", "CQRS_KAFKA_BROKERS")
                   if not os.environ.get(v)]
        if missing:
            raise SetupError("%s not set: the fault suite needs a running stack (tests/fault/run.sh "
                             "starts one; or eval \"$(deploy/local/stack.sh env)\")" % ", ".join(missing))
        self.dir = os.environ["CQRS_STACK_DIR"]
        self.dsn = os.environ["CQRS_PG_DSN"]
        self.redis_url = os.environ["CQRS_REDIS_URL"]
        self.brokers = os.environ["CQRS_KAFKA_BROKERS"]
        m = re.match(r"redis://([^:/]+):(\d+)", self.redis_url)
        if not m:
            raise SetupError("CQRS_REDIS_URL %r: expected redis://host:port/db" % self.redis_url)
        self.redis_host, self.redis_port = m.group(1), int(m.group(2))
        out = subprocess.run([STACK_SH, "status"], capture_output=True, text=True)
        if out.returncode != 0:
            raise SetupError("stack.sh status: a server is down:\n" + out.stdout + out.stderr)

    def up(self):
        r = subprocess.run([STACK_SH, "up"], capture_output=True, text=True)
        if r.returncode != 0:
            raise SetupError("stack.sh up failed:\n" + r.stderr[-2000:])

    def _pid(self, path):
        try:
            with open(path) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def pid(self, server):
        return self._pid({"kafka": os.path.join(self.dir, "kafka", "kafka.pid"),
                          "redis": os.path.join(self.dir, "redis", "redis.pid"),
                          "postgres": os.path.join(self.dir, "pg", "data", "postmaster.pid")}[server])

    def signal(self, server, sig):
        pid = self.pid(server)
        if not pid:
            raise SetupError("no pid for %s" % server)
        os.kill(pid, sig)
        return pid

    def wait_gone(self, pid, seconds=30):
        end = time.time() + seconds
        while time.time() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)

    def kill_kafka(self):
        pid = self.signal("kafka", signal.SIGKILL)
        self.wait_gone(pid)

    def pg_immediate(self):
        # SIGQUIT to the postmaster is `pg_ctl stop -m immediate`: no checkpoint, crash recovery
        # at the next start.
        pid = self.signal("postgres", signal.SIGQUIT)
        self.wait_gone(pid)

    def kill_redis_empty(self):
        pid = self.signal("redis", signal.SIGKILL)
        self.wait_gone(pid)
        rdir = os.path.join(self.dir, "redis")
        for name in os.listdir(rdir):
            if name.startswith("appendonly") or name.endswith(".rdb"):
                p = os.path.join(rdir, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)

    def redis(self, db, *args):
        r = subprocess.run(["redis-cli", "-h", self.redis_host, "-p", str(self.redis_port), "-n", str(db),
                            *args], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise SetupError("redis-cli %s: %s" % (args, r.stderr))
        return r.stdout

    def psql(self, sql, dbname=None):
        dsn = self.dsn + (" dbname=%s" % dbname if dbname else "")
        r = subprocess.run([os.path.join(PG_BIN, "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", "-F", "\t",
                            "-d", dsn, "-c", sql], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise SetupError("psql: %s: %s" % (sql[:80], r.stderr.strip()))
        return [line.split("\t") for line in r.stdout.splitlines() if line]

    def kafka_read(self, topic, snapshot=None):
        """Every committed message of topic: [(partition, offset, key, headers, payload)].

        Without snapshot: up to the end of every partition (kcat -e), for the checker once the
        system is quiet. Under load the end keeps moving and an open relay transaction holds a
        read_committed reader back, so a reader there takes a snapshot instead: snapshot is
        {partition: offset}, and the read stops once it has every message below those offsets
        (each offset - 1 is a message the projector applied, so it exists), or, with {}, after
        3 s without a message or 5 s in all."""
        p = subprocess.Popen(["kcat", "-C", "-b", self.brokers, "-t", topic, "-o", "beginning", "-e", "-q",
                              "-X", "isolation.level=read_committed", "-f", "%p\t%o\t%k\t%h\t%s\n"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines, state, high = [], {"t": time.time()}, {}

        def pump():
            for line in p.stdout:
                lines.append(line)
                state["t"] = time.time()
                part, off = line.split("\t", 2)[:2]
                high[int(part)] = max(high.get(int(part), -1), int(off))
        t = threading.Thread(target=pump, daemon=True)
        t.start()
        start = time.time()
        while p.poll() is None:
            if snapshot is None and time.time() - state["t"] > 60:
                p.kill()
                raise SetupError("kcat -C %s: no end of the topic after 60 s without messages" % topic)
            if snapshot is not None:
                if snapshot and all(high.get(part, -1) >= off - 1 for part, off in snapshot.items() if off > 0):
                    break
                if not snapshot and (time.time() - state["t"] > 3 or time.time() - start > 5):
                    break
                if time.time() - start > 90:
                    p.kill()
                    raise SetupError("kcat -C %s: offsets %s not reached in 90 s" % (topic, snapshot))
            time.sleep(0.1)
        if p.poll() is None:
            p.kill()
        elif p.returncode != 0:
            raise SetupError("kcat -C %s: %s" % (topic, p.stderr.read().strip()))
        p.wait()
        t.join(10)
        msgs = []
        for line in list(lines):
            parts = line.rstrip("\n").split("\t", 4)
            if len(parts) != 5:
                continue
            hdrs = dict(h.split("=", 1) for h in parts[3].split(",") if "=" in h)
            m = (int(parts[0]), int(parts[1]), parts[2], hdrs, parts[4])
            if not snapshot or m[1] < snapshot.get(m[0], 0):
                msgs.append(m)
        return msgs


# ------------------------------------------------------------------------------ daemons ---


class Daemon:
    """One cqrs-commandd or cqrs-queryd. A supervised daemon that dies (a failpoint killed it,
    or the nemesis did) is started again; `arm` restarts keep their failpoints."""

    def __init__(self, run, kind, name, failpoints="", env=None, arm=0):
        self.run, self.kind, self.name = run, kind, name
        self.port = free_port()
        self.failpoints, self.extra_env, self.arm = failpoints, env or {}, arm
        self.proc = None
        self.exit_code = None  # of the last process, when stopped by SIGTERM
        self.deaths = 0
        self.supervised = True
        self.lock = threading.Lock()

    def env(self, armed):
        e = dict(os.environ)
        e.update(self.run.daemon_env())
        e["CQRS_HTTP_PORT"] = str(self.port)
        e.update(self.extra_env)
        e.pop("CQRS_FAILPOINTS", None)
        if armed and self.failpoints:
            e["CQRS_FAILPOINTS"] = self.failpoints
        return e

    def start(self, armed=True, wait=True):
        binary = os.path.join(self.run.build, "cmd", "cqrs-" + self.kind)
        logf = open(os.path.join(self.run.logdir, self.name + ".log"), "a")
        self.proc = subprocess.Popen([binary], env=self.env(armed), stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, seconds=60):
        end = time.time() + seconds
        while time.time() < end:
            if self.proc.poll() is not None and not self.supervised:
                raise SetupError("%s exited (%s) during start-up" % (self.name, self.proc.returncode))
            st, _, _ = http_call(self.port, "GET", "/readyz", timeout=2)
            if st == 200:
                return True
            time.sleep(0.1)
        return False

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def supervise_once(self):
        """Restart when dead; returns True when it restarted."""
        with self.lock:
            if not self.supervised or self.alive():
                return False
            self.deaths += 1
            armed = self.deaths < self.arm
            log("%s: %s died (%s); restarting%s" % (self.run.name, self.name, self.proc.returncode, " armed" if armed else ""))
            self.start(armed=armed, wait=False)
            return True

    def signal(self, sig):
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self):
        with self.lock:
            self.supervised = False
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.exit_code = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.exit_code = "a hang (SIGKILLed after 30 s)"

    def state(self):
        try:
            with open("/proc/%d/stat" % self.proc.pid) as f:
                return f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return "?"

    def metric(self, name):
        st, _, body = http_call(self.port, "GET", "/metrics", timeout=3)
        if st != 200:
            return None
        for line in body.decode(errors="replace").splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.split()[-1])
        return None


def http_call(port, method, path, body=None, headers=None, timeout=8.0):
    """(status, headers, body); status None on a timeout or connection failure."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        data = None if body is None else json.dumps(body).encode()
        h = dict(headers or {})
        if data is not None:
            h["Content-Type"] = "application/json"
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        out = (r.status, dict(r.getheaders()), r.read())
        c.close()
        return out
    except (OSError, http.client.HTTPException):
        return None, {}, b""


# ----------------------------------------------------------------------------- workload ---


class Workload:
    """Clients (commands) and readers (queries) running until stopped; the history."""

    def __init__(self, run, clients=4, readers=2, seed=0, op_deadline=25.0):
        self.run = run
        self.rng = random.Random(seed)
        self.ops = []
        self.reads = []  # (reader, kind, id, version) in order per reader
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.products = []  # acked product ids
        self.orders = []  # acked order ids not yet picked for cancelling
        self.all_orders = []  # every acked order id
        self.clients, self.readers = clients, readers
        self.op_deadline = op_deadline
        self.threads = []

    def cports(self):
        return [d.port for d in self.run.commandds]

    def start(self):
        for i in range(self.clients):
            t = threading.Thread(target=self.client, args=(i, random.Random(self.rng.random())), daemon=True)
            t.start()
            self.threads.append(t)
        for i in range(self.readers):
            t = threading.Thread(target=self.reader, args=(i, random.Random(self.rng.random())), daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(self.op_deadline + 15)

    def command(self, cid, rng, kind, method, path, body, marker, target=None):
        key = str(uuid.uuid4())
        if kind == "adjust":
            body["reason"] = key  # the effect's marker in the event log
        op = {"client": cid, "kind": kind, "key": key, "path": path, "marker": marker or key,
              "target": target, "outcome": "unknown", "status": None, "id": None, "version": None,
              "attempts": 0, "t0": time.time()}
        deadline = time.time() + self.op_deadline
        ports = self.cports()
        n = rng.randrange(len(ports))
        while time.time() < deadline:
            op["attempts"] += 1
            port = ports[(n + op["attempts"]) % len(ports)]  # a retry may go to another instance
            st, _, raw = http_call(port, method, path, body, {"Idempotency-Key": key})
            op["status"] = st
            if st is not None and 200 <= st < 300:
                j = json.loads(raw)
                op.update(outcome="ok", id=j.get("id"), version=j.get("version"))
                break
            if st is not None and 400 <= st < 500 and st != 409 or (st == 409 and b"in-flight" not in raw):
                op["outcome"] = "failed"
                op["problem"] = raw.decode(errors="replace")[:200]
                break
            time.sleep(min(0.05 * 2 ** min(op["attempts"], 5), 1.0))
        op["t1"] = time.time()
        with self.lock:
            self.ops.append(op)
        return op

    def client(self, cid, rng):
        n = 0
        while not self.stop_ev.is_set():
            n += 1
            with self.lock:
                products = list(self.products[-40:])
                order = self.orders.pop(rng.randrange(len(self.orders))) if self.orders and rng.random() < 0.15 else None
            if order:
                self.command(cid, rng, "cancel", "POST", "/v1/orders/%s/cancel" % order, None, order, order)
            elif len(products) < 4 or rng.random() < 0.12:
                sku = "F-%s" % uuid.uuid4().hex[:16]
                op = self.command(cid, rng, "create", "POST", "/v1/products",
                                  {"sku": sku, "name": "Fault %d.%d" % (cid, n), "category": "fault",
                                   "price_cents": 100 + rng.randrange(1000), "currency": "EUR",
                                   "initial_stock": 50}, sku)
                if op["outcome"] == "ok":
                    with self.lock:
                        self.products.append(op["id"])
            elif rng.random() < 0.6:
                p = rng.choice(products)
                delta = rng.choice([1, 2, 3, 5, -1])
                self.command(cid, rng, "adjust", "POST", "/v1/products/%s/stock-adjustments" % p,
                             {"delta": delta, "reason": ""}, None, p)
            else:
                lines = rng.sample(products, rng.choice([1, 1, 2]))
                customer = str(uuid.uuid4())
                op = self.command(cid, rng, "place", "POST", "/v1/orders",
                                  {"customer_id": customer,
                                   "items": [{"product_id": p, "quantity": rng.choice([1, 2, 1, 2, 60])} for p in lines]},
                                  customer, lines)
                if op["outcome"] == "ok":
                    with self.lock:
                        self.orders.append(op["id"])
                        self.all_orders.append(op["id"])
            time.sleep(0.01)

    def reader(self, rid, rng):
        while not self.stop_ev.is_set():
            with self.lock:
                pool = [("products", p) for p in self.products[-60:]] + \
                    [("orders", o) for o in self.all_orders[-30:]]
            if not pool:
                time.sleep(0.05)
                continue
            kind, i = rng.choice(pool)
            st, h, raw = http_call(self.run.queryd.port, "GET", "/v1/%s/%s" % (kind, i), timeout=5)
            if st == 200:
                v = json.loads(raw).get("version")
            elif st == 404:
                v = 0  # absent: version 0 (SPEC, min_version)
            else:
                time.sleep(0.05)
                continue
            with self.lock:
                self.reads.append((rid, kind, i, v))
            time.sleep(0.005)


# ------------------------------------------------------------------------------- a run ---


class Run:
    """One scenario: its own database, Redis database, topics; daemons; workload; checker."""

    redis_db_next = 1

    def __init__(self, stack, build, workdir, name):
        self.stack, self.build, self.name = stack, build, name
        self.prefix = "f%s" % uuid.uuid4().hex[:10]
        self.dbname = "fault_%s" % self.prefix
        self.logdir = os.path.join(workdir, name)
        os.makedirs(self.logdir, exist_ok=True)
        self.redis_db = Run.redis_db_next
        Run.redis_db_next = Run.redis_db_next % 15 + 1
        self.redis_url = "redis://%s:%d/%d" % (stack.redis_host, stack.redis_port, self.redis_db)
        self.dsn = stack.dsn + " dbname=" + self.dbname
        self.commandds = []
        self.queryd = None
        self.daemons = []
        self.sup_stop = threading.Event()
        self.problems = []

    def daemon_env(self):
        return {"CQRS_PG_DSN": self.dsn, "CQRS_REDIS_URL": self.redis_url, "CQRS_TOPIC_PREFIX": self.prefix,
                "CQRS_CONSUMER_GROUP": self.prefix, "CQRS_RELAY_LEASE_MS": str(LEASE_MS),
                "CQRS_RELAY_POLL_MS": "200", "CQRS_KAFKA_MESSAGE_TIMEOUT_MS": str(MSG_TIMEOUT_MS),
                "CQRS_HTTP_THREADS": "16", "CQRS_PG_POOL_SIZE": "8", "CQRS_LOG_LEVEL": "warn"}

    def ctl(self, *args, check=True):
        e = dict(os.environ)
        e.update(self.daemon_env())
        r = subprocess.run([os.path.join(self.build, "cmd", "cqrsctl"), *args], env=e,
                           capture_output=True, text=True, timeout=300)
        if check and r.returncode != 0:
            raise SetupError("cqrsctl %s: %s" % (" ".join(args), (r.stdout + r.stderr)[-2000:]))
        return r

    def setup(self):
        self.stack.psql("CREATE DATABASE %s" % self.dbname)
        self.stack.redis(self.redis_db, "FLUSHDB")
        self.ctl("migrate")

    def add(self, kind, failpoints="", env=None, arm=0, start=True):
        d = Daemon(self, kind, "%s%d" % (kind, len(self.daemons) + 1), failpoints, env, arm)
        self.daemons.append(d)
        if kind == "commandd":
            self.commandds.append(d)
        else:
            self.queryd = d
        if start:
            d.start()
            if not d.wait_ready():
                raise SetupError("%s not ready; see %s" % (d.name, self.logdir))
        return d

    def supervise(self):
        def loop():
            while not self.sup_stop.is_set():
                for d in self.daemons:
                    try:
                        d.supervise_once()
                    except Exception as ex:  # noqa: BLE001 — keep supervising the others
                        log("restart of %s failed: %s" % (d.name, ex))
                time.sleep(0.2)
        threading.Thread(target=loop, daemon=True).start()

    def teardown(self):
        self.sup_stop.set()
        for d in self.daemons:
            d.stop()
        try:
            self.stack.psql("DROP DATABASE IF EXISTS %s" % self.dbname)
        except SetupError as ex:
            log("drop database: %s" % ex)

    # ------------------------------------------------------------------- checker ---

    def pg_versions(self):
        rows = self.stack.psql("SELECT 'products', id, version FROM products UNION ALL "
                               "SELECT 'orders', id, version FROM orders", self.dbname)
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def outbox_backlog(self):
        return int(self.stack.psql("SELECT count(*) FROM outbox", self.dbname)[0][0])

    def doc_version(self, kind, i):
        st, _, raw = http_call(self.queryd.port, "GET", "/v1/%s/%s" % (kind, i), timeout=5)
        if st == 200:
            return json.loads(raw).get("version")
        return 0 if st == 404 else None

    def behind(self, versions):
        """Documents whose version differs from PostgreSQL's (first few), and their count."""
        bad = []
        for (kind, i), v in versions.items():
            dv = self.doc_version(kind, i)
            if dv != v:
                bad.append((kind, i, v, dv))
                if len(bad) > 3:
                    break
        return bad

    def converge(self, t_heal, bound):
        """Seconds from the heal to convergence, or None when the bound ran out."""
        end = t_heal + bound
        while time.time() < end:
            try:
                if self.outbox_backlog() == 0:
                    versions = self.pg_versions()
                    if not self.behind(versions):
                        return time.time() - t_heal
            except SetupError:
                pass  # PostgreSQL still recovering
            time.sleep(0.5)
        return None

    def check(self, wl, converge_s):
        ops = wl.ops
        res = collections.Counter()
        notes = []

        def problem(col, text):
            res[col] += 1
            if len(notes) < 12:
                notes.append("%s: %s" % (col, text))

        # A / N: commands against PostgreSQL.
        products = {r[0]: r[1] for r in self.stack.psql("SELECT sku, id FROM products", self.dbname)}
        adjusted = collections.defaultdict(list)
        for r in self.stack.psql("SELECT data->>'reason', version, aggregate_id FROM events"
                                 " WHERE data ? 'reason' AND data ? 'delta'", self.dbname):
            adjusted[r[0]].append((int(r[1]), r[2]))
        placed = collections.defaultdict(list)
        for r in self.stack.psql("SELECT customer_id, id FROM orders", self.dbname):
            placed[r[0]].append(r[1])
        cancelled = {r[0] for r in self.stack.psql("SELECT id FROM orders WHERE status = 'cancelled'",
                                                   self.dbname)}
        for op in ops:
            k, m = op["kind"], op["marker"]
            if k == "create":
                found = [products[m]] if m in products else []
            elif k == "adjust":
                found = adjusted.get(m, [])
            elif k == "place":
                found = placed.get(m, [])
            else:
                found = [m] if m in cancelled else []
            desc = "%s %s key %s" % (k, op["path"], op["key"])
            if len(found) > 1:
                problem("duplicated", "%s applied %d times" % (desc, len(found)))
            if op["outcome"] == "ok":
                if not found:
                    problem("lost", "%s acknowledged (%s) but not in PostgreSQL" % (desc, op["status"]))
                elif k == "create" and found[0] != op["id"] or k == "place" and found[0] != op["id"]:
                    problem("lost", "%s acknowledged id %s, PostgreSQL has %s" % (desc, op["id"], found[0]))
                elif k == "adjust" and found[0][0] != op["version"]:
                    problem("lost", "%s acknowledged version %s, its event is version %s"
                            % (desc, op["version"], found[0][0]))
            elif op["outcome"] == "failed" and found:
                problem("duplicated", "%s failed (%s) but is in PostgreSQL" % (desc, op["status"]))

        # Kafka: every event of the log exactly once, in version order per aggregate.
        events = {r[0]: (r[1], int(r[2])) for r in self.stack.psql(
            "SELECT event_id, aggregate_id, version FROM events", self.dbname)}
        seen = collections.Counter()
        last = {}
        for topic in ("%s.product.events" % self.prefix, "%s.order.events" % self.prefix):
            for part, off, key, hdrs, _ in sorted(self.stack.kafka_read(topic)):
                if hdrs.get("fault_injected") == "1":
                    continue  # the nemesis's own duplicates
                eid = hdrs.get("ce_id")
                ver = int(hdrs.get("ce_aggregateversion", "0"))
                seen[eid] += 1
                seen[(key, ver)] += 1
                if seen[eid] > 1 or seen[(key, ver)] > 1:
                    problem("duplicated", "event %s (%s v%d) twice in %s" % (eid, key, ver, topic))
                    continue
                if eid not in events:
                    problem("duplicated", "event %s in %s is not in the PostgreSQL log" % (eid, topic))
                elif events[eid] != (key, ver):
                    problem("out of order", "event %s in %s as %s v%d, PostgreSQL has %s v%d"
                            % (eid, topic, key, ver, *events[eid]))
                prev = last.get(key)
                if prev is not None and ver <= prev:
                    problem("out of order", "%s v%d after v%d in %s[%d]" % (key, ver, prev, topic, part))
                last[key] = max(ver, prev or 0)
        for eid, (agg, ver) in events.items():
            if seen[eid] == 0:
                problem("lost", "event %s (%s v%d) not in Kafka" % (eid, agg, ver))

        # C / D: the read model.
        versions = self.pg_versions()
        if converge_s is None:
            for kind, i, v, dv in self.behind(versions):
                problem("lost", "%s %s: document version %s, aggregate version %d" % (kind, i, dv, v))
        v = self.ctl("verify", "--json", check=False)
        if v.returncode != 0:
            res["verify"] += 1
            notes.append("cqrsctl verify exit %d: %s" % (v.returncode, (v.stdout + v.stderr).strip()[:600]))
        else:
            for (kind, i), pv in versions.items():
                dv = self.doc_version(kind, i)
                if dv != pv:
                    problem("lost" if (dv or 0) < pv else "duplicated",
                            "%s %s: document version %s, aggregate version %d" % (kind, i, dv, pv))

        # Reads: per reader, a document's version never goes backwards, never beyond PostgreSQL's.
        last_read = {}
        for rid, kind, i, ver in wl.reads:
            prev = last_read.get((rid, i))
            if prev is not None and ver < prev:
                problem("out of order", "reader %d saw %s %s at v%d after v%d" % (rid, kind, i, ver, prev))
            last_read[(rid, i)] = ver
            if ver > versions.get((kind, i), 0):
                problem("duplicated", "reader %d saw %s %s at v%d, PostgreSQL has v%s"
                        % (rid, kind, i, ver, versions.get((kind, i))))
        return res, notes


# ----------------------------------------------------------------------------- nemeses ---


def wait_deaths(d, n, seconds):
    end = time.time() + seconds
    while time.time() < end and d.deaths < n:
        time.sleep(0.2)
    return d.deaths >= n


def leader(run, seconds=20):
    end = time.time() + seconds
    while time.time() < end:
        leaders = [d for d in run.commandds if d.alive() and d.state() != "T" and d.metric("cqrs_relay_leader") == 1]
        if len(leaders) == 1:
            return leaders[0]
        time.sleep(0.2)
    return None


def ready_all(run, seconds=90):
    for d in run.daemons:
        if not d.wait_ready(seconds):
            raise SetupError("%s not ready after the heal" % d.name)


class Scenario:
    def __init__(self, name, about, commandd_fp="", queryd_fp="", arm=3, long_arm=None, commandds=1,
                 nemesis=None, negative=False, unsafe=None, load_s=2.0, bound=None):
        self.name, self.about = name, about
        self.commandd_fp, self.queryd_fp, self.arm = commandd_fp, queryd_fp, arm
        self.long_arm = long_arm or arm
        self.commandds, self.nemesis, self.negative, self.unsafe = commandds, nemesis, negative, unsafe
        self.load_s = load_s
        self.bound = bound  # seconds to converge; a negative control that never converges fails fast


def nem_failpoint_commandd(run, sc, opts):
    if not wait_deaths(run.commandds[0], sc.arm, 60):
        run.problems.append("the failpoint %s fired %d times, not %d" % (sc.commandd_fp, run.commandds[0].deaths, sc.arm))
    ready_all(run)


def nem_failpoint_queryd(run, sc, opts):
    # A SIGKILLed projector's partitions come back only after the group's session timeout (45 s).
    if not wait_deaths(run.queryd, sc.arm, 75 * sc.arm):
        run.problems.append("the failpoint %s fired %d times, not %d" % (sc.queryd_fp, run.queryd.deaths, sc.arm))
    ready_all(run)


def nem_relay_pause(run, sc, opts):
    """The first commandd leads with relay-before-commit=pause*1: it stops holding a produced,
    recorded batch; the second takes the lease over; then the first is resumed (fenced)."""
    paused = run.commandds[0]
    end = time.time() + 30
    while time.time() < end and paused.state() != "T":
        time.sleep(0.1)
    if paused.state() != "T":
        run.problems.append("the relay leader never paused at relay-before-commit")
        return
    other = leader(run, 30)
    if other is not paused and other is not None:
        time.sleep(LEASE_MS / 1000.0 * 2)
    else:
        run.problems.append("no other relay took the lease over")
    paused.signal(signal.SIGCONT)


def nem_kafka_kill(run, sc, opts):
    for i in range(opts.rounds):
        time.sleep(1.5)
        log("kafka SIGKILL %d/%d" % (i + 1, opts.rounds))
        run.stack.kill_kafka()
        time.sleep(2)
        run.stack.up()


def nem_kafka_pause(run, sc, opts):
    for i in range(opts.rounds):
        time.sleep(1.5)
        log("kafka SIGSTOP %d/%d for %.1f s" % (i + 1, opts.rounds, MSG_TIMEOUT_MS / 1000 + 3))
        run.stack.signal("kafka", signal.SIGSTOP)
        time.sleep(MSG_TIMEOUT_MS / 1000 + 3)
        run.stack.signal("kafka", signal.SIGCONT)


def nem_pg_immediate(run, sc, opts):
    for i in range(max(1, opts.rounds - 1)):
        time.sleep(1.5)
        log("postgres immediate stop %d" % (i + 1))
        run.stack.pg_immediate()
        time.sleep(2)
        run.stack.up()
    ready_all(run)


def nem_redis_empty(run, sc, opts):
    time.sleep(2)
    log("redis SIGKILL, restarted empty")
    run.stack.kill_redis_empty()
    time.sleep(1)
    run.stack.up()


def nem_offsets_and_dups(run, sc, opts):
    """Duplicate delivery twice over: the applied offsets in Redis (the projector's position)
    rewound to 0, so every event is delivered again; and a test producer re-sending events of
    some aggregates, newest first (an older version after a newer one), into their partitions."""
    time.sleep(2)
    # SIGTERM, not SIGKILL: a clean leave of the consumer group (a killed member holds its
    # partitions for the group's session timeout, 45 s; projector-kill-after-apply covers kills).
    q = run.queryd
    keys = ["cqrs:offsets:{%s.%s.events}" % (run.prefix, t) for t in ("product", "order")]
    end = time.time() + 60  # something applied in both topics first, or there is nothing to rewind
    while time.time() < end and not all(run.stack.redis(run.redis_db, "HLEN", k).strip() not in ("", "0")
                                        for k in keys):
        time.sleep(0.5)
    q.stop()
    redelivered = 0  # messages already applied: each must come back as a skipped duplicate
    for t in ("product", "order"):
        key = "cqrs:offsets:{%s.%s.events}" % (run.prefix, t)
        applied = dict(zip(*[iter(run.stack.redis(run.redis_db, "HGETALL", key).split())] * 2))
        fields = list(applied)
        redelivered += len(run.stack.kafka_read("%s.%s.events" % (run.prefix, t),
                                                snapshot={int(p): int(o) for p, o in applied.items()}))
        for f in fields:
            run.stack.redis(run.redis_db, "HSET", key, f, "0")
        log("rewound %d partitions of %s to offset 0" % (len(fields), key))
        if not fields:
            run.problems.append("no applied offsets in Redis under %s" % key)
    q.supervised = True
    q.start()
    if not q.wait_ready():
        run.problems.append("queryd not ready after the rewind")
    time.sleep(1)
    # the test producer: per aggregate, its two newest events again, newest first
    topic = "%s.product.events" % run.prefix
    by_key = collections.defaultdict(list)
    for m in run.stack.kafka_read(topic, snapshot={}):
        by_key[m[2]].append(m)
    sent = 0
    for key, msgs in list(by_key.items())[:8]:
        if len(msgs) < 2:
            continue
        for part, off, k, hdrs, payload in sorted(msgs, key=lambda m: -m[1])[:2]:
            args = ["kcat", "-P", "-b", run.stack.brokers, "-t", topic, "-p", str(part), "-k", k,
                    "-H", "fault_injected=1"]
            for hn, hv in hdrs.items():
                args += ["-H", "%s=%s" % (hn, hv)]
            r = subprocess.run(args, input=payload, text=True, capture_output=True, timeout=60)
            if r.returncode != 0:
                raise SetupError("kcat -P: " + r.stderr)
            sent += 1
    log("test producer re-sent %d events out of order" % sent)
    if sent == 0:
        run.problems.append("the test producer found nothing to re-send")
    # The projector saw them all again and skipped them (its counter restarted with it).
    want, got, end = redelivered + sent, None, time.time() + opts.bound
    while time.time() < end:
        got = q.metric("cqrs_projector_duplicates_skipped_total")
        if got is not None and got >= want:
            break
        time.sleep(0.5)
    log("duplicates skipped by the projector: %s of at least %d" % (got, want))
    if got is None or got < want:
        run.problems.append("the projector skipped %s duplicates, expected at least %d" % (got, want))


def nem_random(run, sc, opts):
    rng = random.Random(opts.seed)
    kinds = ["kafka-kill", "kafka-pause", "pg-immediate", "redis-empty", "commandd-kill", "queryd-kill",
             "relay-pause"]
    for i in range(opts.random_faults):
        time.sleep(rng.uniform(0.5, 2.5))
        k = rng.choice(kinds)
        log("random fault %d/%d (seed %d): %s" % (i + 1, opts.random_faults, opts.seed, k))
        if k == "kafka-kill":
            run.stack.kill_kafka()
            time.sleep(rng.uniform(0.5, 3))
            run.stack.up()
        elif k == "kafka-pause":
            run.stack.signal("kafka", signal.SIGSTOP)
            time.sleep(rng.uniform(1, MSG_TIMEOUT_MS / 1000 + 3))
            run.stack.signal("kafka", signal.SIGCONT)
        elif k == "pg-immediate":
            run.stack.pg_immediate()
            time.sleep(rng.uniform(0.5, 3))
            run.stack.up()
        elif k == "redis-empty":
            run.stack.kill_redis_empty()
            time.sleep(rng.uniform(0.5, 2))
            run.stack.up()
        elif k == "commandd-kill":
            rng.choice(run.commandds).signal(signal.SIGKILL)
        elif k == "queryd-kill":
            run.queryd.signal(signal.SIGKILL)
        elif k == "relay-pause":
            ld = leader(run, 10)
            if ld:
                ld.signal(signal.SIGSTOP)
                time.sleep(rng.uniform(0.5, 2 * LEASE_MS / 1000 + 1))
                ld.signal(signal.SIGCONT)
    ready_all(run)


SCENARIOS = [
    Scenario("commandd-kill-before-commit", "SIGKILL after the writes, before COMMIT (×3)",
             commandd_fp="command-before-commit=kill*1", nemesis=nem_failpoint_commandd),
    Scenario("commandd-kill-after-commit", "SIGKILL after COMMIT, before the reply (×3); retried keys",
             commandd_fp="command-after-commit=kill*1", nemesis=nem_failpoint_commandd),
    Scenario("relay-kill-after-read", "relay SIGKILLed after reading the outbox, before producing (×3)",
             commandd_fp="relay-after-read=kill*1", nemesis=nem_failpoint_commandd),
    Scenario("relay-kill-after-delivery", "relay SIGKILLed with every delivery report in, its Kafka transaction "
             "open (×3)", commandd_fp="relay-after-delivery=kill*1", nemesis=nem_failpoint_commandd),
    Scenario("relay-kill-after-ack", "relay SIGKILLed after Kafka's ack, before deleting the rows (×3)",
             commandd_fp="relay-after-commit=kill*1", nemesis=nem_failpoint_commandd),
    Scenario("relay-pause-takeover", "relay leader SIGSTOPped past the lease, another takes over, resumed",
             commandd_fp="relay-before-commit=pause*1", commandds=2, nemesis=nem_relay_pause),
    Scenario("kafka-kill", "Kafka SIGKILLed and restarted under load", nemesis=nem_kafka_kill),
    Scenario("kafka-pause", "Kafka SIGSTOPped longer than the producer timeout", nemesis=nem_kafka_pause),
    Scenario("postgres-immediate", "PostgreSQL stopped in immediate mode and restarted",
             nemesis=nem_pg_immediate),
    Scenario("projector-kill-after-apply", "projector SIGKILLed after the Redis apply, before the offset (×1; long ×3)",
             queryd_fp="projector-after-apply=kill*1", arm=1, long_arm=3, nemesis=nem_failpoint_queryd),
    Scenario("redis-kill-empty", "Redis SIGKILLed and restarted empty", nemesis=nem_redis_empty),
    Scenario("redelivery-reorder", "applied offsets rewound; a test producer re-sends events newest first",
             nemesis=nem_offsets_and_dups),
    Scenario("random-mix", "seeded random mix of the faults above", commandds=2, nemesis=nem_random),
    Scenario("NEGATIVE-ack-uncommitted", "negative control: CQRS_UNSAFE_ACK_UNCOMMITTED=1 and COMMIT failing ×5",
             commandd_fp="command-before-commit=error*5", unsafe={"CQRS_UNSAFE_ACK_UNCOMMITTED": "1"},
             negative=True, nemesis=lambda run, sc, opts: time.sleep(1)),
    Scenario("NEGATIVE-relay-delete-first", "negative control: CQRS_UNSAFE_RELAY_DELETE_FIRST=1 (at most once) and "
             "the relay SIGKILLed after reading the outbox", commandd_fp="relay-after-read=kill*1", arm=2,
             unsafe={"CQRS_UNSAFE_RELAY_DELETE_FIRST": "1"}, negative=True, nemesis=nem_failpoint_commandd,
             bound=20),
]


def run_scenario(stack, opts, sc, workdir):
    log("=== %s: %s" % (sc.name, sc.about))
    run = Run(stack, opts.build, workdir, sc.name)
    row = {"scenario": sc.name, "commands": 0, "acked": 0, "lost": 0, "duplicated": 0, "out of order": 0,
           "converge": None, "ok": False, "notes": []}
    if opts.long:
        sc.arm = sc.long_arm
    try:
        stack.up()
        run.setup()
        for i in range(sc.commandds):
            fp = sc.commandd_fp if i == 0 else ""
            run.add("commandd", fp, sc.unsafe, arm=sc.arm if fp else 0)
            if i == 0 and sc.commandds > 1 and not leader(run, 20):
                raise SetupError("the first commandd did not become the relay leader")
        run.add("queryd", sc.queryd_fp, arm=sc.arm if sc.queryd_fp else 0)
        run.supervise()
        wl = Workload(run, seed=opts.seed)
        wl.start()
        time.sleep(1.0)
        sc.nemesis(run, sc, opts)
        stack.up()  # whatever is still down comes back: the heal
        t_heal = time.time()
        time.sleep(sc.load_s if not opts.long else sc.load_s * 3)  # load after the heal
        wl.stop()
        bound = sc.bound or opts.bound
        conv = run.converge(t_heal, bound)
        res, notes = run.check(wl, conv)
        row.update(commands=len(wl.ops), acked=sum(op["outcome"] == "ok" for op in wl.ops),
                   lost=res["lost"], duplicated=res["duplicated"], **{"out of order": res["out of order"]},
                   converge=conv)
        outcomes = collections.Counter(op["outcome"] for op in wl.ops)
        row["detail"] = "ok %d, failed %d, unknown %d; reads %d" % (outcomes["ok"], outcomes["failed"],
                                                                  outcomes["unknown"], len(wl.reads))
        bad = res["lost"] + res["duplicated"] + res["out of order"] + res["verify"] + (conv is None)
        row["notes"] = notes + run.problems + ([] if conv is not None else ["no convergence within %d s" % bound])
        if sc.negative:
            row["ok"] = bad > 0 and not run.problems
            row["notes"].insert(0, "negative control: the checker %s" % ("caught it" if bad else "MISSED IT"))
        else:
            row["ok"] = bad == 0 and not run.problems and wl.ops and row["acked"] > 0
        with open(os.path.join(run.logdir, "history.jsonl"), "w") as f:
            for op in wl.ops:
                f.write(json.dumps(op) + "\n")
        with open(os.path.join(run.logdir, "reads.jsonl"), "w") as f:
            for rid, kind, i, ver in wl.reads:
                f.write(json.dumps({"reader": rid, "kind": kind, "id": i, "version": ver}) + "\n")
    except Exception as ex:  # noqa: BLE001 — one broken scenario must not hide the others
        row["notes"].append("setup error: %s: %s" % (type(ex).__name__, ex))
        row["setup_error"] = True
    finally:
        run.teardown()
    # A sanitizer report or a non-zero exit on SIGTERM is a bug found under faults too.
    for d in run.daemons:
        if d.exit_code not in (None, 0):
            row["ok"] = sc.negative and row["ok"]
            row["notes"].append("%s exited %s on SIGTERM (see %s)" % (d.name, d.exit_code, run.logdir))
    for name in sorted(os.listdir(run.logdir)):
        if name.endswith(".log"):
            with open(os.path.join(run.logdir, name), errors="replace") as f:
                text = f.read()
            for pat in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:"):
                if pat in text:
                    row["ok"] = False
                    row["notes"].append("%s in %s/%s" % (pat, run.logdir, name))
    log("%s: %s %s" % (sc.name, "PASS" if row["ok"] else "FAIL", "; ".join(row["notes"][:6])))
    return row


def table(rows):
    head = ["scenario", "commands", "acknowledged", "lost", "duplicated", "out of order", "s to converge", "result"]
    lines = []
    for r in rows:
        conv = "%.1f" % r["converge"] if r["converge"] is not None else "—"
        lines.append([r["scenario"], str(r["commands"]), str(r["acked"]), str(r["lost"]), str(r["duplicated"]),
                      str(r["out of order"]), conv,
                      ("caught" if r["ok"] else "MISSED") if r["scenario"].startswith("NEGATIVE")
                      else ("pass" if r["ok"] else "FAIL")])
    w = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = ["| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(head)) + " |",
           "|" + "|".join("-" * (x + 2) for x in w) + "|"]
    for line in lines:
        out.append("| " + " | ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(line)) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", required=True, help="build folder of a -DCQRS_ENABLE_FAILPOINTS=ON build")
    ap.add_argument("--scenario", action="append", help="run only these (repeatable)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the workload and the random mix")
    ap.add_argument("--long", action="store_true", default=os.environ.get("CQRS_FAULT_LONG") == "1",
                    help="more rounds and longer load (also CQRS_FAULT_LONG=1)")
    ap.add_argument("--bound", type=int, default=180, help="seconds allowed to converge after the heal")
    ap.add_argument("--table", default=None, help="also write the results (table and problems) to this file")
    ap.add_argument("--workdir", default=None, help="logs and histories (default: a temp folder)")
    opts = ap.parse_args()
    opts.build = os.path.abspath(opts.build)
    if opts.seed is None:
        opts.seed = int.from_bytes(os.urandom(4), "little")
    opts.rounds = 5 if opts.long else 2
    opts.random_faults = 12 if opts.long else 5
    workdir = opts.workdir or tempfile.mkdtemp(prefix="cqrs-fault-")
    os.makedirs(workdir, exist_ok=True)
    log("seed %d (replay: --seed %d); logs and histories in %s" % (opts.seed, opts.seed, workdir))
    try:
        stack = Stack()
    except SetupError as ex:
        print("fault suite: %s" % ex, file=sys.stderr)
        return 2
    chosen = [s for s in SCENARIOS if not opts.scenario or s.name in opts.scenario]
    if opts.scenario and len(chosen) != len(opts.scenario):
        print("unknown scenario; known: %s" % ", ".join(s.name for s in SCENARIOS), file=sys.stderr)
        return 2
    t0 = time.time()
    rows = [run_scenario(stack, opts, sc, workdir) for sc in chosen]
    out = ["Fault suite, seed %d%s, %d s" % (opts.seed, " (long)" if opts.long else "", time.time() - t0),
           table(rows)]
    for r in rows:
        if r["notes"] and (not r["ok"] or r["scenario"].startswith("NEGATIVE")):
            out.append("\n%s (%s):" % (r["scenario"], r.get("detail", "")))
            out += ["  - " + n for n in r["notes"][:12]]
    print("\n" + "\n".join(out))
    if opts.table:
        with open(opts.table, "w") as f:
            f.write("\n".join(out) + "\n")
    if any(r.get("setup_error") for r in rows):
        return 2
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
