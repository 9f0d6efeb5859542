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

Redis failover scenarios run against the stack's Redis replica (tests/fault/run.sh starts it:
stack.sh up --redis-replica) and move the daemons the way a managed endpoint does: they are
given the port of a TCP forwarder in this harness (Forwarder), never a server's; at the failover
it closes every connection and forwards new ones to the promoted replica — the DNS name of a
Sentinel-managed, ElastiCache or other managed primary endpoint flipping to the new primary.

Prints one table. Exit 0 when every scenario is clean and every negative control (a
deliberately unsafe build mode) was caught; 1 otherwise; 2 on a setup error (a missing server
is an error: the suite never skips).

  fault.py --build BUILD_DIR [--replicated] [--scenario NAME ...] [--seed N] [--long]

--replicated runs the replicated scenarios (REPLICATED_KAFKA, REPLICATED_PG) instead of the
classic ones, on a stack with three Kafka brokers and a PostgreSQL standby (stack.sh up
--kafka-brokers 3 --pg-standby; tests/fault/run.sh BUILD --replicated); --scenario finds names
in every list.

Replicated PostgreSQL (REPLICATED_PG): a stack with a synchronous streaming standby (stack.sh up
--pg-standby); the daemons get both nodes in one libpq connection string
(target_session_attrs=read-write). The primary is SIGKILLed and the standby promoted, or the
standby is promoted while the old primary runs on (split brain) until it is fenced; the old
primary is then rebuilt as a standby (stack.sh pg-rejoin: pg_rewind).
"""
import argparse
import bisect
import collections
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
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
REDIS_ERROR = re.compile(r"(ERR|WRONGTYPE|NOSCRIPT|READONLY|LOADING|MASTERDOWN|NOAUTH|BUSY|MISCONF|EXECABORT) ")
CLUSTER_RETRY = re.compile(r"(CLUSTERDOWN|TRYAGAIN|LOADING|MASTERDOWN) ")  # a Redis Cluster moving
CLUSTER_ERROR = re.compile(r"(MOVED|ASK|CROSSSLOT) ")
# A store loss (a failover to a replica that missed writes, a FLUSHDB) steps documents back
# until the projector re-applied them; reads within this long after one are not compared
# (a serving instance may still answer a cached pre-loss version until the projector's next
# apply announces the loss). See Run.check.
SETTLE_S = 1.0
RACE_S = 10.0  # dlq-retry-race: how long the damage / repair / retry cycles go on
MSG_TIMEOUT_MS = 5000  # the relay's delivery timeout; Kafka pauses last longer than this


def log(*a):
    print("[fault %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


class SetupError(Exception):
    pass


def free_port():
    """A free port by the test suite's one policy (tests/support/ports.sh): random in
    [20000, 32000), below the ephemeral range (32768+), none of the stack's, binding now."""
    stack = {os.environ.get(v) for v in ("CQRS_PG_PORT", "CQRS_PG_STANDBY_PORT", "CQRS_REDIS_PORT",
                                         "CQRS_REDIS_REPLICA_PORT", "CQRS_KAFKA_PORT", "CQRS_KAFKA_CONTROLLER_PORT",
                                         "CQRS_KAFKA_PORT_2", "CQRS_KAFKA_CONTROLLER_PORT_2",
                                         "CQRS_KAFKA_PORT_3", "CQRS_KAFKA_CONTROLLER_PORT_3")}
    for v in ("CQRS_REDIS_CLUSTER_PORTS", "CQRS_REDIS_CLUSTER_BUS_PORTS"):
        stack.update(os.environ.get(v, "").split())
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


# ---------------------------------------------------------------------------- forwarder ---


class Forwarder:
    """A TCP forwarder in the harness: what a managed Redis endpoint is to its clients.

    The daemons (and cqrsctl) are given its port, never a server's. Each connection is
    forwarded to the current target. `flip(port)` is the endpoint's failover — the DNS name of
    a Sentinel-managed, ElastiCache or other managed primary endpoint now resolving to the
    promoted replica: every open connection is reset (clients see a dropped connection, as
    after a real failover, and reconnect) and new ones reach the new primary. A target that
    refuses (a dead primary before the flip) gets the client's connection closed at once.

    The same forwarder also stands for the network between a primary and its replica: `hold`
    lets nothing more cross (a stalled link: the replica falls behind while the primary goes
    on), `cut` resets every connection (whatever was held back never arrives)."""

    def __init__(self, name, target_port):
        self.name, self.target, self.gen = name, target_port, 0
        self.lock = threading.Lock()
        self.pairs = set()
        self.holding = threading.Event()
        self.closed = False
        self.forwarded = 0  # bytes from the targets to the clients
        while True:
            self.port = free_port()
            self.lsock = socket.socket()
            self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.lsock.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.lsock.close()
        self.lsock.listen(256)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                if self.closed:
                    return
                time.sleep(0.05)
                continue
            with self.lock:
                target, gen = self.target, self.gen
            try:
                u = socket.create_connection(("127.0.0.1", target), timeout=2)
                u.settimeout(None)
            except OSError:
                _reset(c)  # the target is down: so is the endpoint, for now
                continue
            for sk in (c, u):
                sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(self, c, u)
            with self.lock:
                current = gen == self.gen and not self.closed
                if current:
                    self.pairs.add(pair)
            if not current:  # flipped or cut while connecting: this one goes too
                pair.abort()
            pair.start()

    def _reset_all(self, target=None):
        with self.lock:
            if target is not None:
                self.target = target
            self.gen += 1
            pairs = list(self.pairs)
        for pair in pairs:
            pair.abort()
        return len(pairs)

    def flip(self, port):
        """The endpoint now leads to port; every open connection is reset."""
        n = self._reset_all(port)
        log("%s: flipped to 127.0.0.1:%d, %d connections reset" % (self.name, port, n))

    def hold(self):
        self.holding.set()

    def release(self):
        self.holding.clear()

    def cut(self):
        n = self._reset_all()
        log("%s: cut, %d connections reset" % (self.name, n))

    def close(self):
        self.closed = True
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.lsock.close()
        self.release()
        self._reset_all()


def _linger0(sk):
    """A close of sk now sends a TCP reset: nothing still buffered is delivered."""
    sk.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _reset(sk):
    """Close with a TCP reset: nothing still buffered is delivered."""
    try:
        _linger0(sk)
    except OSError:
        pass
    sk.close()


class _Pair:
    """A client connection and its upstream; one pump thread per direction. Sockets are only
    shut down from other threads (which wakes the pumps) and closed by the last pump."""

    def __init__(self, fwd, client, upstream):
        self.fwd, self.socks = fwd, (client, upstream)
        self.lock = threading.Lock()
        self.dead = False
        self.left = 2

    def start(self):
        c, u = self.socks
        for src, dst, down in ((c, u, False), (u, c, True)):
            threading.Thread(target=self._pump, args=(src, dst, down), daemon=True).start()

    def abort(self):
        with self.lock:
            if self.dead:
                return
            self.dead = True
            for sk in self.socks:
                try:
                    _linger0(sk)
                    sk.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _pump(self, src, dst, down):
        try:
            while not self.dead:
                data = src.recv(65536)
                if not data:
                    break
                while self.fwd.holding.is_set() and not self.dead:
                    time.sleep(0.005)  # held: this chunk waits; a cut drops it
                if self.dead:
                    break
                dst.sendall(data)
                if down:
                    self.fwd.forwarded += len(data)
        except OSError:
            pass
        self.abort()
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            for sk in self.socks:
                sk.close()
            with self.fwd.lock:
                self.fwd.pairs.discard(self)


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
        # Kafka nodes (stack.sh up --kafka-brokers 3): node n's client address; node 1 is "kafka".
        self.kafka_nodes = int(os.environ.get("CQRS_KAFKA_BROKER_COUNT") or 1)
        self.kafka_addr = {n: a for n, a in enumerate(self.brokers.split(","), 1)}
        m = re.match(r"redis://([^:/]+):(\d+)", self.redis_url)
        if not m:
            raise SetupError("CQRS_REDIS_URL %r: expected redis://host:port/db" % self.redis_url)
        self.redis_host, self.redis_port = m.group(1), int(m.group(2))
        # The replica (stack.sh up --redis-replica), for the failover scenarios.
        m = re.match(r"redis://[^:/]+:(\d+)", os.environ.get("CQRS_REDIS_REPLICA_URL", ""))
        self.replica_port = int(m.group(1)) if m else None
        # The Redis Cluster (stack.sh up --redis-cluster): node n's client port.
        ports = os.environ.get("CQRS_REDIS_CLUSTER_PORTS", "").split()
        self.cluster_ports = {n: int(p) for n, p in enumerate(ports, 1)} if len(ports) == 6 else {}
        self.cluster_url = os.environ.get("CQRS_REDIS_CLUSTER_URL", "")
        # The PostgreSQL standby (stack.sh up --pg-standby): node 1 on CQRS_PG_PORT in pg/, node 2
        # on CQRS_PG_STANDBY_PORT in pg-standby/; which one is the primary is in pg-ha/primary.
        self.pg_ports = {1: int(os.environ.get("CQRS_PG_PORT", "0") or 0),
                         2: int(os.environ.get("CQRS_PG_STANDBY_PORT", "0") or 0)}
        self.pg_standby = bool(self.pg_ports[2]) and os.path.exists(os.path.join(self.dir, "pg-ha", "primary"))
        out = subprocess.run([STACK_SH, "status"], capture_output=True, text=True)
        if out.returncode != 0:
            raise SetupError("stack.sh status: a server is down:\n" + out.stdout + out.stderr)

    def up(self):
        r = subprocess.run([STACK_SH, "up"], capture_output=True, text=True)
        if r.returncode != 0:
            # stack.sh's own lines (the reason comes first), then the end of the log it quoted
            said = [line for line in r.stderr.splitlines() if line.startswith("[stack]")]
            raise SetupError("stack.sh up failed:\n" + "\n".join(said[-12:]) + "\n…\n" + r.stderr[-1500:])

    def _pid(self, path):
        try:
            with open(path) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def pid(self, server):
        if server == "postgres":  # the current primary
            return self.pg_pid(self.pg_primary())
        return self._pid({"kafka": os.path.join(self.dir, "kafka", "kafka.pid"),
                          "kafka-2": os.path.join(self.dir, "kafka-2", "kafka.pid"),
                          "kafka-3": os.path.join(self.dir, "kafka-3", "kafka.pid"),
                          "redis": os.path.join(self.dir, "redis", "redis.pid")}[server])

    # ---- PostgreSQL nodes (a stack with a standby; node 1 alone otherwise) ----

    def pg_primary(self):
        """The node stack.sh records as the primary (1 without a standby)."""
        try:
            with open(os.path.join(self.dir, "pg-ha", "primary")) as f:
                return 2 if f.read().strip() == "2" else 1
        except OSError:
            return 1

    def pg_data(self, node):
        return os.path.join(self.dir, "pg" if node == 1 else "pg-standby", "data")

    def pg_pid(self, node):
        return self._pid(os.path.join(self.pg_data(node), "postmaster.pid"))

    def pg_kill_node(self, node):
        """SIGKILL to a node's postmaster and every process of it: its backends would linger
        after the postmaster alone is killed. Returns (postmaster pid, processes killed)."""
        pid = self.pg_pid(node)
        if not pid:
            raise SetupError("no postmaster.pid for PostgreSQL node %d" % node)
        victims = {pid}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % d) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid or int(fields[2]) == pid:  # ppid or process group
                    victims.add(int(d))
            except (OSError, IndexError, ValueError):
                continue
        for v in [pid] + sorted(victims - {pid}):
            try:
                os.kill(v, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for v in victims:
            self.wait_gone(v)
        return pid, len(victims)

    def stack_sh(self, *args):
        """stack.sh ARGS; (seconds it took, its log lines)."""
        t0 = time.time()
        r = subprocess.run([STACK_SH, *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise SetupError("stack.sh %s failed:\n%s" % (" ".join(args), r.stderr[-2000:]))
        return time.time() - t0, r.stderr

    def pg_promote(self):
        return self.stack_sh("pg-promote")

    def pg_rejoin(self):
        return self.stack_sh("pg-rejoin")

    def psql_node(self, node, sql, dbname):
        """psql on one node, whatever its role (a short connect timeout; reads only)."""
        dsn = "host=127.0.0.1 port=%d user=cqrs dbname=%s connect_timeout=3" % (self.pg_ports[node], dbname)
        r = subprocess.run([os.path.join(PG_BIN, "psql"), "-XAtq", "-F", "\t", "-d", dsn, "-c", sql],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise SetupError("psql on node %d: %s: %s" % (node, sql[:80], r.stderr.strip()))
        return [line.split("\t") for line in r.stdout.splitlines() if line]

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

    # ------------------------------------------------ Kafka nodes (three-broker stacks) ---

    @staticmethod
    def node_name(n):
        return "kafka" if n == 1 else "kafka-%d" % n

    def kill_node(self, n):
        """SIGKILL Kafka node n and wait until it is gone."""
        pid = self.signal(self.node_name(n), signal.SIGKILL)
        self.wait_gone(pid)

    def signal_node(self, n, sig):
        return self.signal(self.node_name(n), sig)

    def cont_all(self):
        """SIGCONT to every Kafka node (a nemesis that paused one and failed must not leave it so)."""
        for n in range(1, self.kafka_nodes + 1):
            pid = self.pid(self.node_name(n))
            if pid:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass

    def stop_node(self, n):
        """A clean stop (SIGTERM: controlled shutdown) of node n, as in a rolling restart."""
        r = subprocess.run([STACK_SH, "stop", self.node_name(n)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SetupError("stack.sh stop %s failed:\n%s" % (self.node_name(n), r.stderr[-2000:]))

    def start_node(self, n):
        """Node n alone back (the others stay as they are); waits until it is registered."""
        r = subprocess.run([STACK_SH, "start", self.node_name(n)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SetupError("stack.sh start %s failed:\n%s" % (self.node_name(n), r.stderr[-2000:]))

    def metadata(self, topics, avoid=()):
        """kcat -L -J of topics from a node not in avoid: {topic: {partition: (leader, [isr])}}."""
        boot = ",".join(a for n, a in self.kafka_addr.items() if n not in avoid) or self.brokers
        last = ""
        for _ in range(5):
            out = {}
            try:
                for t in topics:
                    r = subprocess.run(["kcat", "-L", "-J", "-m", "5", "-b", boot, "-t", t],
                                       capture_output=True, text=True, timeout=20)
                    j = json.loads(r.stdout) if r.returncode == 0 else None
                    if j and t.startswith("__") and j.get("topics") and \
                            "nknown topic" in str(j["topics"][0].get("error")):
                        continue  # an internal topic made on first use (no group, no transaction yet)
                    if not j or not j.get("topics") or j["topics"][0].get("error"):
                        raise ValueError("kcat -L -t %s: %s" % (t, (r.stderr or r.stdout).strip()[:200]))
                    out[t] = {p["partition"]: (p.get("leader", -1), sorted(i["id"] for i in p.get("isrs", [])))
                              for p in j["topics"][0]["partitions"]}
                return out
            except (ValueError, subprocess.TimeoutExpired) as ex:
                last = str(ex)
                time.sleep(1)
        raise SetupError("metadata of %s: %s" % (", ".join(topics), last))

    def busiest_leader(self, topics, avoid=()):
        """The node leading the most partitions of topics."""
        lead = collections.Counter(leader for parts in self.metadata(topics, avoid).values()
                                   for leader, _ in parts.values() if leader > 0)
        if not lead:
            raise SetupError("no partition of %s has a leader" % ", ".join(topics))
        return lead.most_common(1)[0][0]

    def wait_isr_full(self, topics, seconds=120, avoid=()):
        """Every partition of topics led and with all nodes in its ISR (the cluster healed)."""
        end = time.time() + seconds
        while time.time() < end:
            md = self.metadata(topics, avoid)
            short = [(t, p) for t, parts in md.items() for p, (leader, isr) in parts.items()
                     if leader <= 0 or len(isr) < self.kafka_nodes]
            if not short:
                return True
            time.sleep(1)
        raise SetupError("partitions not fully in sync after %d s: %s" % (seconds, short[:6]))

    def txn_coordinator(self, txn_id):
        """The node hosting txn_id's transaction coordinator: the leader of __transaction_state
        partition abs(txn_id.hashCode()) % its partition count (TransactionStateManager)."""
        h, units = 0, txn_id.encode("utf-16-be")  # String.hashCode: over UTF-16 code units
        for i in range(0, len(units), 2):
            h = (31 * h + (units[i] << 8 | units[i + 1])) & 0xFFFFFFFF
        h = h - (1 << 32) if h >= 1 << 31 else h
        h = 0 if h == -(1 << 31) else abs(h)
        parts = self.metadata(["__transaction_state"])["__transaction_state"]
        return parts[h % len(parts)][0], h % len(parts)

    def kafka_tool(self, cls, *args, timeout=60):
        """A Kafka command-line tool class from the cached jars (stack.sh fetched them)."""
        cache = os.environ.get("CQRS_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cqrs")
        libs = os.path.join(cache, "kafka-4.4.0", "libs")
        java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else "java"
        r = subprocess.run([java, "-Xmx128m", "-Dlog4j2.configurationFile=" +
                            os.path.join(REPO, "deploy", "local", "kafka", "log4j2.xml"),
                            "-Dkafka.logs.dir=" + tempfile.gettempdir(), "-cp", os.path.join(libs, "*"), cls,
                            *args], capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout, r.stderr

    def active_controller(self, avoid=()):
        """The active KRaft controller's node id (kafka-metadata-quorum describe --status)."""
        boot = ",".join(a for n, a in self.kafka_addr.items() if n not in avoid)
        last = ""
        for _ in range(10):
            rc, out, err = self.kafka_tool("org.apache.kafka.tools.MetadataQuorumCommand", "--bootstrap-server",
                                           boot, "describe", "--status")
            m = re.search(r"^LeaderId:\s+(-?\d+)", out, re.M)
            if rc == 0 and m and int(m.group(1)) > 0:
                return int(m.group(1))
            last = (out + err).strip()[-300:]
            time.sleep(1)
        raise SetupError("no active controller: %s" % last)

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
        return self.redis_at(self.redis_port, db, *args)

    def redis_at(self, port, db, *args):
        r = subprocess.run(["redis-cli", "-h", self.redis_host, "-p", str(port), "-n", str(db),
                            *args], capture_output=True, text=True, timeout=30)
        if r.returncode != 0 or REDIS_ERROR.match(r.stdout):  # redis-cli exits 0 on an error reply
            raise SetupError("redis-cli -p %d %s: %s" % (port, args, (r.stderr or r.stdout).strip()))
        return r.stdout

    def hgetall(self, port, db, key):
        out = self.redis_at(port, db, "HGETALL", key).split()
        return dict(zip(out[0::2], out[1::2]))

    def replication(self, port):
        """INFO replication of the server on port, as a dict; {} when it does not answer."""
        r = subprocess.run(["redis-cli", "-h", self.redis_host, "-p", str(port), "INFO", "replication"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            return {}
        return dict(line.strip().split(":", 1) for line in r.stdout.splitlines() if ":" in line)

    def wait_replica_of(self, port, primary, seconds=60):
        """The server on port follows primary with its link up (its first sync done)."""
        end = time.time() + seconds
        while time.time() < end:
            i = self.replication(port)
            if i.get("role") == "slave" and i.get("master_port") == str(primary) and \
                    i.get("master_link_status") == "up":
                return True
            time.sleep(0.2)
        return False

    def redis_topology_reset(self):
        """The stack's Redis pair as stack.sh made it: the primary on CQRS_REDIS_PORT, the
        replica following it directly. Undoes a failover (the promoted replica, the old primary
        made its replica when it came back) by failing back once the two are in sync."""
        if not self.replica_port:
            return
        self.up()
        p, s = self.redis_port, self.replica_port
        ip = self.replication(p)
        if ip.get("role") == "slave":
            primary = int(ip.get("master_port", "0"))
            want = int(self.replication(primary).get("master_repl_offset", "0") or 0)
            end = time.time() + 60
            while time.time() < end:
                ip = self.replication(p)
                if ip.get("master_link_status") == "up" and int(ip.get("slave_repl_offset", "-1")) >= want:
                    break
                time.sleep(0.2)
            else:
                raise SetupError("fail-back: 127.0.0.1:%d did not catch up with 127.0.0.1:%d" % (p, primary))
            self.redis_at(p, 0, "REPLICAOF", "NO", "ONE")
        i = self.replication(s)
        if not (i.get("role") == "slave" and i.get("master_port") == str(p)):
            self.redis_at(s, 0, "REPLICAOF", "127.0.0.1", str(p))
        if not self.wait_replica_of(s, p):
            raise SetupError("the replica 127.0.0.1:%d has no link to the primary 127.0.0.1:%d" % (s, p))

    # ---- the Redis Cluster (stack.sh up --redis-cluster) ----

    def cluster_pid(self, n):
        return self._pid(os.path.join(self.dir, "redis-cluster-%d" % n, "redis.pid"))

    def cluster_node_name(self, port):
        return next(("redis-cluster-%d" % n for n, p in self.cluster_ports.items() if p == port), str(port))

    def cluster_cli(self, *args, port=None, seconds=30):
        """A command on the cluster. Without port: through the first node that answers, with
        redis-cli -c (it follows MOVED and ASK), retried while the cluster answers CLUSTERDOWN or
        TRYAGAIN (a failover, a slot in migration) for up to `seconds`. With port: on that node
        alone, as it is (no redirection followed)."""
        ports = [port] if port else list(self.cluster_ports.values())
        end, last = time.time() + seconds, ""
        while True:
            for p in ports:
                r = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(p)] + ([] if port else ["-c"]) +
                                   list(args), capture_output=True, text=True, timeout=30)
                last = (r.stderr or r.stdout).strip()
                if r.returncode != 0 or "Could not connect" in r.stdout:
                    continue  # that node is down: the next one
                if CLUSTER_RETRY.match(r.stdout):
                    break  # the cluster is moving: again in a moment
                if REDIS_ERROR.match(r.stdout) or CLUSTER_ERROR.match(r.stdout):
                    raise SetupError("redis-cli -p %d %s: %s" % (p, args, r.stdout.strip()))
                return r.stdout
            if port or time.time() > end:
                raise SetupError("redis-cli %s on the cluster: %s" % (args, last))
            time.sleep(0.2)

    def cluster_nodes(self):
        """CLUSTER NODES as the first node that answers sees it: {node id: {"port", "n" (the
        stack's node number), "flags", "master" (its primary's id, replicas), "slots" (a set)}}."""
        out = self.cluster_cli("CLUSTER", "NODES")
        nodes = {}
        for line in out.splitlines():
            f = line.split()
            if len(f) < 8:
                continue
            port = int(f[1].split("@")[0].rsplit(":", 1)[1])
            slots = set()
            for rng in f[8:]:
                if rng.startswith("["):
                    continue  # a slot in migration: still its owner's
                a, _, b = rng.partition("-")
                slots.update(range(int(a), int(b or a) + 1))
            nodes[f[0]] = {"id": f[0], "port": port, "flags": f[2].replace("myself,", ""),
                           "master": None if f[3] == "-" else f[3], "slots": slots,
                           "n": next((n for n, p in self.cluster_ports.items() if p == port), None)}
        return nodes

    def cluster_primaries(self):
        """The primaries that serve slots, by port: [(node, its sorted slots)]."""
        return sorted(((nd, sorted(nd["slots"])) for nd in self.cluster_nodes().values()
                       if "master" in nd["flags"] and "fail" not in nd["flags"] and nd["slots"]),
                      key=lambda x: x[0]["port"])

    def cluster_owner(self, slot, nodes=None):
        nodes = nodes or self.cluster_nodes()
        return next((nd for nd in nodes.values() if slot in nd["slots"] and "master" in nd["flags"]), None)

    def cluster_role(self, port):
        return self.replication(port).get("role")

    def cluster_wait_ok(self, seconds=60):
        """Every running node sees cluster_state:ok with every slot served."""
        end = time.time() + seconds
        while time.time() < end:
            infos = []
            for p in self.cluster_ports.values():
                r = subprocess.run(["redis-cli", "-p", str(p), "CLUSTER", "INFO"], capture_output=True, text=True,
                                   timeout=10)
                if r.returncode == 0 and "cluster_state" in r.stdout:
                    infos.append(r.stdout)
            if infos and all("cluster_state:ok" in i and "cluster_slots_ok:16384" in i for i in infos):
                return True
            time.sleep(0.2)
        return False

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
        self.reads = []  # (reader, kind, id, version, t0, t1) in order per reader
        self.bad_bodies = []  # (reader, kind, id, body): a 200 whose body is not a document
        self.hot = []  # product ids the clients adjust often (a nemesis sets them)
        self.damaged = set()  # ids whose stored document a nemesis damaged: reads not judged
        self.lull = threading.Event()  # set: the clients send nothing new (a quiet moment)
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
            if self.lull.is_set():
                time.sleep(0.01)
                continue
            n += 1
            with self.lock:
                products = list(self.products[-40:])
                hot = list(self.hot)
                order = self.orders.pop(rng.randrange(len(self.orders))) if self.orders and rng.random() < 0.15 else None
            if hot and rng.random() < 0.5:
                p = rng.choice(hot)
                self.command(cid, rng, "adjust", "POST", "/v1/products/%s/stock-adjustments" % p,
                             {"delta": rng.choice([1, 2, 3, -1]), "reason": ""}, None, p)
                if order:
                    with self.lock:
                        self.orders.append(order)
            elif order:
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
            with self.lock:
                damaged = i in self.damaged
            t0 = time.time()
            st, h, raw = http_call(self.run.queryd.port, "GET", "/v1/%s/%s" % (kind, i), timeout=5)
            t1 = time.time()
            if damaged:
                continue
            if st == 200:
                try:
                    v = json.loads(raw)["version"]
                except (ValueError, KeyError, TypeError):
                    with self.lock:
                        self.bad_bodies.append((rid, kind, i, raw[:80]))
                    continue
            elif st == 404:
                v = 0  # absent: version 0 (README "API", min_version)
            else:
                time.sleep(0.05)
                continue
            with self.lock:
                self.reads.append((rid, kind, i, v, t0, t1))
            time.sleep(0.005)


# ------------------------------------------------------------------------------- a run ---


class Run:
    """One scenario: its own database, Redis database, topics; daemons; workload; checker."""

    redis_db_next = 1

    def __init__(self, stack, build, workdir, name, cluster=False):
        self.stack, self.build, self.name = stack, build, name
        self.prefix = "f%s" % uuid.uuid4().hex[:10]
        # On the Redis Cluster (fault.py --cluster) the daemons get the cluster's seed (database
        # 0, the only one a cluster has) and the run's own key prefix, CQRS_REDIS_PREFIX (its
        # topic prefix): runs share the cluster without touching each other's keys.
        self.cluster = cluster
        self.rprefix = self.prefix if cluster else "cqrs"
        self.dbname = "fault_%s" % self.prefix
        self.logdir = os.path.join(workdir, name)
        os.makedirs(self.logdir, exist_ok=True)
        self.redis_db = Run.redis_db_next
        Run.redis_db_next = Run.redis_db_next % 15 + 1
        self.redis_url = "redis://%s:%d/%d" % (stack.redis_host, stack.redis_port, self.redis_db)
        if cluster:
            self.redis_db = 0
            self.redis_url = stack.cluster_url
        self.dsn = stack.dsn + " dbname=" + self.dbname
        self.commandds = []
        self.queryds = []
        self.queryd = None  # the one the readers and the checker read from (the last started)
        self.daemons = []
        self.sup_stop = threading.Event()
        self.problems = []
        self.info = []  # facts worth printing under the table (what a nemesis did and found)
        self.boundaries = []  # times of store losses (Run.check: reads across them)
        self.t_heal = None  # set by a nemesis whose heal is not its return (e.g. a failover)
        self.cleanups = []  # run after the daemons stopped (forwarders, the Redis topology)
        self.teardown_errors = []
        self.wl = None
        self.watchers = []  # watch_readiness threads, stopped when the checker starts
        self.watch_stop = threading.Event()
        self.env_extra = {}  # settings of a scenario for every daemon and cqrsctl (prepare)

    def daemon_env(self):
        return {**self.env_extra, "CQRS_PG_DSN": self.dsn, "CQRS_REDIS_URL": self.redis_url,
                "CQRS_REDIS_PREFIX": self.rprefix, "CQRS_TOPIC_PREFIX": self.prefix,
                "CQRS_CONSUMER_GROUP": self.prefix, "CQRS_RELAY_LEASE_MS": str(LEASE_MS),
                "CQRS_RELAY_POLL_MS": "200", "CQRS_KAFKA_MESSAGE_TIMEOUT_MS": str(MSG_TIMEOUT_MS),
                "CQRS_HTTP_THREADS": "16", "CQRS_PG_POOL_SIZE": "8",
                # FAULT_LOG_LEVEL=info (or debug, with CQRS_KAFKA_DEBUG=cgrp) to investigate a run
                "CQRS_LOG_LEVEL": os.environ.get("FAULT_LOG_LEVEL", "warn")}

    def ctl(self, *args, check=True):
        e = dict(os.environ)
        e.update(self.daemon_env())
        r = subprocess.run([os.path.join(self.build, "cmd", "cqrsctl"), *args], env=e,
                           capture_output=True, text=True, timeout=300)
        if check and r.returncode != 0:
            raise SetupError("cqrsctl %s: %s" % (" ".join(args), (r.stdout + r.stderr)[-2000:]))
        return r

    def redis(self, *args, port=None):
        """A command on the read model's Redis: the database of the run on the single Redis
        (port: another server, e.g. the replica), or the cluster (routed by key; port: that
        node alone)."""
        if self.cluster:
            return self.stack.cluster_cli(*args, port=port)
        return self.stack.redis_at(port or self.stack.redis_port, self.redis_db, *args)

    def setup(self):
        self.stack.psql("CREATE DATABASE %s" % self.dbname)
        if not self.cluster:  # on the cluster the run's prefix is new: nothing to empty
            self.stack.redis(self.redis_db, "FLUSHDB")
        self.ctl("migrate")

    def add(self, kind, failpoints="", env=None, arm=0, start=True):
        d = Daemon(self, kind, "%s%d" % (kind, len(self.daemons) + 1), failpoints, env, arm)
        self.daemons.append(d)
        if kind == "commandd":
            self.commandds.append(d)
        else:
            self.queryds.append(d)
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
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as ex:  # noqa: BLE001 — the next scenarios need the stack back
                log("cleanup: %s" % ex)
                self.teardown_errors.append("cleanup: %s: %s" % (type(ex).__name__, ex))
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
        """The served document's version; 0 when absent; -1 for a 200 whose body is not a
        document; None when the read failed."""
        st, _, raw = http_call(self.queryd.port, "GET", "/v1/%s/%s" % (kind, i), timeout=5)
        if st == 200:
            try:
                return json.loads(raw)["version"]
            except (ValueError, KeyError, TypeError):
                return -1
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

    def held(self):
        """The aggregates held by dead letters (cqrsctl dlq list --json); None on failure."""
        r = self.ctl("dlq", "list", "--json", check=False)
        try:
            return json.loads(r.stdout)["aggregates"] if r.returncode == 0 else None
        except (ValueError, KeyError):
            return None

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
        if self.sc.check_dlq:
            held = self.held()
            if held is None:
                problem("lost", "cqrsctl dlq list failed")
            for a in (held or [])[:5]:
                problem("lost", "%s still held by %d dead letters from v%s (%s)"
                        % (a["aggregate_id"], a["count"], a["first_version"], a["reason"]))
        v = self.ctl("verify", "--json", check=False)
        if v.returncode != 0:
            res["verify"] += 1
            notes.append("cqrsctl verify exit %d: %s" % (v.returncode, (v.stdout + v.stderr).strip()[:600]))
        else:
            for (kind, i), pv in versions.items():
                dv = self.doc_version(kind, i)
                if dv != pv:
                    problem("lost" if (dv or 0) < pv else "duplicated",
                            "%s %s: document version %s, aggregate version %d"
                            % (kind, i, "-1 (not a document)" if dv == -1 else dv, pv))

        # Reads: per reader, a document's version never goes backwards, never beyond PostgreSQL's.
        # A store loss (self.boundaries: a failover to a replica that missed writes, a FLUSHDB)
        # steps documents back until the projector re-applied them — that step back is the loss
        # itself, inherent to an asynchronous replica or an emptied store: reads are compared
        # within the stretch between two losses, a read overlapping the first SETTLE_S seconds
        # after a loss is not compared, and the steps back across a loss are counted (info).
        bounds = sorted(self.boundaries)
        last_read = {}
        across = 0
        for rid, kind, i, ver, t0, t1 in wl.reads:
            if ver > versions.get((kind, i), 0):
                problem("duplicated", "reader %d saw %s %s at v%d, PostgreSQL has v%s"
                        % (rid, kind, i, ver, versions.get((kind, i))))
            epoch = bisect.bisect_right(bounds, t0)
            if any(t0 < b + SETTLE_S and t1 > b for b in bounds):
                continue
            prev = last_read.get((rid, i))
            if prev is not None and ver < prev[1]:
                if prev[0] == epoch:
                    problem("out of order", "reader %d saw %s %s at v%d after v%d" % (rid, kind, i, ver, prev[1]))
                else:
                    across += 1
            last_read[(rid, i)] = (epoch, ver)
        if bounds:
            self.info.append("reads that stepped back across a store loss: %d" % across)
        for rid, kind, i, body in wl.bad_bodies:
            problem("lost", "reader %d: %s %s answered 200 with a body that is not a document: %r"
                    % (rid, kind, i, body))
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
                 nemesis=None, negative=False, unsafe=None, load_s=2.0, bound=None, queryds=1,
                 queryd_env=None, prepare=None, check_dlq=False, commandd_env=None, cluster=False):
        self.name, self.about = name, about
        self.cluster = cluster  # the read model on the stack's Redis Cluster (fault.py --cluster)
        self.commandd_fp, self.queryd_fp, self.arm = commandd_fp, queryd_fp, arm
        self.long_arm = long_arm or arm
        self.commandds, self.nemesis, self.negative, self.unsafe = commandds, nemesis, negative, unsafe
        self.load_s = load_s
        self.bound = bound  # seconds to converge; a negative control that never converges fails fast
        self.queryds = queryds  # cqrs-queryd instances (role both) in one consumer group
        self.queryd_env = queryd_env or {}  # e.g. a CQRS_UNSAFE_* switch of the projector
        self.prepare = prepare  # prepare(run) before the database, daemons and load exist
        self.check_dlq = check_dlq  # the checker also requires that no aggregate is held
        self.commandd_env = commandd_env or {}  # settings of every cqrs-commandd (unsafe ones: `unsafe`)


def nem_failpoint_commandd(run, sc, opts):
    if not wait_deaths(run.commandds[0], sc.arm, 60):
        run.problems.append("the failpoint %s fired %d times, not %d" % (sc.commandd_fp, run.commandds[0].deaths, sc.arm))
    ready_all(run)


def nem_failpoint_queryd(run, sc, opts):
    # A SIGKILLed projector's partitions come back only after the group's session timeout (10 s).
    # The failpoint is armed in the first cqrs-queryd only.
    q = run.queryds[0]
    if not wait_deaths(q, sc.arm, 75 * sc.arm):
        run.problems.append("the failpoint %s fired %d times, not %d" % (sc.queryd_fp, q.deaths, sc.arm))
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
    # something applied in both topics first, or there is nothing to rewind
    wait_offsets_applied(run, run.stack.redis_port, pause=0.5)
    q.stop()
    redelivered = 0  # messages already applied: each must come back as a skipped duplicate
    for t, keys in offsets_keys(run).items():
        key = "%s.%s.events" % (run.prefix, t)
        applied, where = {}, {}
        for k in keys:  # one partition per shard
            for p, o in run.stack.hgetall(run.stack.redis_port, run.redis_db, k).items():
                applied[p], where[p] = o, k
        fields = list(applied)
        redelivered += len(run.stack.kafka_read(key, snapshot={int(p): int(o) for p, o in applied.items()}))
        for f in fields:
            run.stack.redis(run.redis_db, "HSET", where[f], f, "0")
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


def murmur2(data):
    """Kafka's murmur2 (the relay's partitioner; libcqrs/src/keyspace.c)."""
    m, h = 0x5bd1e995, (0x9747b28c ^ len(data)) & 0xffffffff
    n4 = len(data) // 4
    for i in range(n4):
        k = int.from_bytes(data[4 * i:4 * i + 4], "little")
        k = (k * m) & 0xffffffff
        k ^= k >> 24
        k = (k * m) & 0xffffffff
        h = ((h * m) & 0xffffffff) ^ k
    tail = data[4 * n4:]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * m) & 0xffffffff
    h ^= h >> 13
    h = (h * m) & 0xffffffff
    h ^= h >> 15
    return h


def layout(run, t, port=None):
    """The partition count of topic type t that the projector recorded (0: none yet)."""
    topic = "%s.%s.events" % (run.prefix, t)
    v = run.redis("HGET", "%s:layout" % run.rprefix, topic, port=port).strip()
    return int(v) if v.isdigit() else 0


def shard_tag(run, t, p):
    """The hash tag of shard p of topic type t (keyspace.h), without its braces."""
    return "%s:%s.%s.events:%d" % (run.rprefix, run.prefix, t, p)


def shard_prefix(run, tag, port=None):
    """The key prefix of a shard in its current generation (keyspace.h: "{tag}:g<N>:", the
    pointer "{tag}:gen" absent: generation 1)."""
    g = run.redis("GET", "{%s}:gen" % tag, port=port).strip()
    return "{%s}:g%s:" % (tag, g if g.isdigit() else "1")


def shard_of(run, t, agg_id):
    """The key prefix of an aggregate's shard (keyspace.h): its partition's."""
    n = layout(run, t)
    if not n:
        raise SetupError("no layout recorded for %s.%s.events" % (run.prefix, t))
    return shard_prefix(run, shard_tag(run, t, (murmur2(agg_id.encode()) & 0x7fffffff) % n))


def offsets_keys(run, port=None):
    """Every shard's offsets hash of both topics, by topic type."""
    return {t: [shard_prefix(run, shard_tag(run, t, p), port) + "offsets" for p in range(layout(run, t, port))]
            for t in ("product", "order")}


def wait_offsets_applied(run, port, pause, seconds=60):
    """Until the Redis at port (None: the run's, or the cluster) holds applied offsets of both
    topics (bounded)."""
    end = time.time() + seconds
    while time.time() < end and not all(any(run.redis("HLEN", k, port=port).strip() not in ("", "0")
                                            for k in keys)
                                        for keys in offsets_keys(run, port).values()):
        time.sleep(pause)


def store_loss_counted(run):
    """After a store loss: the projectors counted it."""
    regs = [d.metric("cqrs_projector_store_regressions_total") for d in run.queryds]
    resets = [d.metric("cqrs_projector_store_resets_total") for d in run.queryds]
    run.info.append("store regressions counted: %s; store resets counted: %s (per cqrs-queryd)"
                    % (", ".join("—" if v is None else "%d" % v for v in regs),
                       ", ".join("—" if v is None else "%d" % v for v in resets)))
    return regs, resets


def watch_readiness(run, what):
    """From now on, each cqrs-queryd's /readyz for up to 30 s (or until the checker starts): when
    it first failed and when it answered 200 again — while a partition refills, /readyz fails
    (the projector's refill time after the store loss, without the harness's own steps)."""
    t0 = time.time()

    def watch(d):
        failed = back = None
        while time.time() < t0 + 30 and not run.watch_stop.is_set():
            st, _, _ = http_call(d.port, "GET", "/readyz", timeout=2)
            now = time.time() - t0
            if st != 200 and failed is None:
                failed = now
            elif st == 200 and failed is not None:
                back = now
                break
            time.sleep(0.05)
        run.info.append("%s: %s, /readyz %s" % (
            what, d.name, "200 throughout (%.0f s)" % (time.time() - t0) if failed is None else
            "failing from +%.2f s to +%.2f s" % (failed, back) if back is not None else
            "failing from +%.2f s, still %.0f s later" % (failed, time.time() - t0)))
    for d in run.queryds:
        t = threading.Thread(target=watch, args=(d,), daemon=True)
        t.start()
        run.watchers.append(t)


def failover_prepare(run):
    """The scenario's daemons reach Redis through an endpoint forwarder (to the primary), and the
    replica follows the primary through a link forwarder (so that the link can stall)."""
    st = run.stack
    if not st.replica_port:
        raise SetupError("this scenario needs the stack's Redis replica (CQRS_REDIS_REPLICA_URL): "
                         "tests/fault/run.sh starts one (stack.sh up --redis-replica)")
    st.redis_topology_reset()
    run.link = Forwarder("replication link", st.redis_port)
    run.cleanups.append(run.link.close)
    run.cleanups.append(st.redis_topology_reset)  # runs first (reversed): fail back, then close
    st.redis_at(st.replica_port, 0, "REPLICAOF", "127.0.0.1", str(run.link.port))
    if not st.wait_replica_of(st.replica_port, run.link.port, 30):
        raise SetupError("the replica did not link to the primary through the link forwarder")
    run.endpoint = Forwarder("redis endpoint", st.redis_port)
    run.cleanups.append(run.endpoint.close)
    run.redis_url = "redis://127.0.0.1:%d/%d" % (run.endpoint.port, run.redis_db)


def nem_failover(run, sc, opts):
    """Asynchronous failover that loses writes: the replica's link stalls while the load goes
    on, the primary is SIGKILLed, the replica promoted (its link cut first: what it did not
    receive is gone) and the endpoint flipped to it; the old primary comes back as its replica."""
    st = run.stack
    primary, replica = st.redis_port, st.replica_port
    # Load, replicated: the replica holds applied offsets of both topics (on a fresh broker the
    # consumer group takes a few seconds to form), then a little more.
    wait_offsets_applied(run, replica, pause=0.3)
    time.sleep(1.5)
    log("replication link: %d bytes forwarded to the replica so far" % run.link.forwarded)
    run.link.hold()
    log("replication link stalled: the replica stops receiving while the load goes on")
    time.sleep(3)
    shards = [k for keys in offsets_keys(run, primary).values() for k in keys]
    before = {k: st.hgetall(primary, run.redis_db, k) for k in shards}
    p_off = st.replication(primary).get("master_repl_offset")
    pid = st.signal("redis", signal.SIGKILL)
    st.wait_gone(pid)
    run.link.cut()
    st.redis_at(replica, 0, "REPLICAOF", "NO", "ONE")
    r_off = st.replication(replica).get("master_repl_offset")
    after = {k: st.hgetall(replica, run.redis_db, k) for k in shards}
    behind, lost = [], 0
    for k, parts in before.items():
        for part, off in parts.items():
            have = int(after[k].get(part, "0"))
            if have < int(off):
                behind.append("%s[%s] %d < %s" % (k.split("{")[1].rstrip("}"), part, have, off))
                lost += int(off) - have
    msg = ("primary SIGKILLed at replication offset %s, replica promoted at %s: %d partitions' applied "
           "offsets behind the primary's (%d messages in all): %s"
           % (p_off, r_off, len(behind), lost, ", ".join(behind[:4]) + (", …" if len(behind) > 4 else "")))
    log(msg)
    run.info.append(msg)
    if not behind:
        run.problems.append("the promoted replica was not behind the primary's applied offsets: no write was "
                            "lost, the scenario proves nothing")
    run.boundaries.append(time.time())
    run.t_heal = time.time()
    run.endpoint.flip(replica)
    watch_readiness(run, "after the flip")
    # The old primary comes back and follows the new one (what Sentinel does with it).
    st.up()
    st.redis_at(primary, 0, "REPLICAOF", "127.0.0.1", str(replica))
    ready_all(run)


def nem_flush_two(run, sc, opts):
    """Two projectors in one consumer group share the partitions; the read model's Redis database
    is emptied (FLUSHDB) twice. First under full load, where both projectors usually meet the
    empty store at once. Then at a quiet moment — the low-traffic case: the clients pause for a
    second, the flush, then one command, whose event reaches one projector: it meets the empty
    store first; the load resumes as soon as it counted that, so the other projector's next
    events find a store the first one has already started again. (In this order: a flush would
    also wipe what the one before it left wrong.)"""
    def sharing():
        end = time.time() + 60
        while time.time() < end and not all((d.metric("cqrs_projector_partitions_assigned") or 0) > 0
                                            for d in run.queryds):
            time.sleep(0.3)
        shares = [d.metric("cqrs_projector_partitions_assigned") for d in run.queryds]
        log("partitions assigned per projector: %s" % shares)
        if not all((n or 0) > 0 for n in shares):
            run.problems.append("the projectors do not share the partitions: %s" % shares)
    sharing()
    time.sleep(1.5)
    run.boundaries.append(time.time())
    run.stack.redis(run.redis_db, "FLUSHDB")
    log("FLUSHDB 1/2 of Redis database %d under load" % run.redis_db)
    time.sleep(2)
    sharing()  # the projectors' consumer-group changes settled: both consume again
    time.sleep(1.5)
    wl = run.wl
    wl.lull.set()
    time.sleep(1.0)  # in-flight commands end, the relay and the projectors go idle
    resets = [d.metric("cqrs_projector_store_resets_total") or 0 for d in run.queryds]
    run.boundaries.append(time.time())
    run.stack.redis(run.redis_db, "FLUSHDB")
    with wl.lock:
        p = wl.products[-1]
    wl.command(99, random.Random(opts.seed), "adjust", "POST", "/v1/products/%s/stock-adjustments" % p,
               {"delta": 1, "reason": ""}, None, p)
    end = time.time() + 10
    while time.time() < end and [d.metric("cqrs_projector_store_resets_total") or 0 for d in run.queryds] == resets:
        time.sleep(0.02)
    wl.lull.clear()
    watch_readiness(run, "after the second FLUSHDB")
    log("FLUSHDB 2/2 of Redis database %d at a quiet moment, then one command; the load resumed when a "
        "projector had counted the empty store" % run.redis_db)
    run.t_heal = run.boundaries[-1]


CORRUPT_LUA = ("local v = redis.call('HGET', KEYS[1], 'v') local j = redis.call('HGET', KEYS[1], 'json') "
               "if not v or not j then return nil end "
               "redis.call('HSET', KEYS[1], 'json', 'notjson') return {v, j}")
REPAIR_LUA = ("if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then return 0 end "
              "redis.call('HSET', KEYS[1], 'json', ARGV[2]) return 1")


def nem_dlq_retry(run, sc, opts):
    """Dead letters under load, then `cqrsctl dlq retry` racing the live projector. Three hot
    products (the clients keep adjusting them), each in a loop of its own for RACE_S: its stored
    document is damaged (the JSON replaced by 'notjson', atomically, its version kept), so its
    next event is dead-lettered and the following ones parked; then the document is repaired
    (the JSON it held, written back) and `cqrsctl dlq retry` is run again and again until the
    aggregate is released — while its events keep arriving — and the cycle starts over."""
    wl, st = run.wl, run.stack
    hot, end = [], time.time() + 60  # on a fresh broker the consumer group takes seconds to form
    while len(hot) < 3 and time.time() < end:
        time.sleep(1)
        with wl.lock:
            candidates = list(wl.products[-30:])
        hot = [pid for pid in candidates
               if layout(run, "product")
               and st.redis(run.redis_db, "HGET", shard_of(run, "product", pid) + "doc:" + pid, "v").strip()][-3:]
    if len(hot) < 3:
        raise SetupError("fewer than 3 products with a document after 60 s of load")
    with wl.lock:
        wl.hot = hot
        wl.damaged.update(hot)  # reads of them are not judged while they are damaged now and then
    stats = collections.Counter()
    parked = []
    race_end = time.time() + RACE_S

    def race(pid):
        shard = shard_of(run, "product", pid)
        key, dlq = shard + "doc:" + pid, shard + "dlq:" + pid
        while time.time() < race_end:
            out = st.redis(run.redis_db, "EVAL", CORRUPT_LUA, "1", key).split("\n", 1)
            if len(out) < 2 or not out[0].strip():
                raise SetupError("product %s has no stored document to damage" % pid)
            v, doc = out[0].strip(), out[1].strip()
            stats["damaged"] += 1
            end = time.time() + 10
            while time.time() < end:  # its next event meets the damage (or was computed before it)
                if st.redis(run.redis_db, "EXISTS", dlq).strip() == "1":
                    break
                if st.redis(run.redis_db, "HGET", key, "v").strip() != v:
                    break
                time.sleep(0.02)
            time.sleep(0.15)  # more of its events arrive and are parked
            held = st.redis(run.redis_db, "HLEN", dlq).strip()
            if held not in ("", "0"):
                parked.append(int(held) // 2)
            if st.redis(run.redis_db, "EVAL", REPAIR_LUA, "1", key, v, doc).strip() == "1":
                stats["repaired"] += 1
            else:
                stats["moved on before the damage was read"] += 1  # an apply computed earlier overwrote it
            end = time.time() + 30
            while time.time() < end and st.redis(run.redis_db, "EXISTS", dlq).strip() == "1":
                rc = run.ctl("dlq", "retry", pid, check=False).returncode
                stats["retry exit %d" % rc] += 1
            if st.redis(run.redis_db, "EXISTS", dlq).strip() == "1":
                run.problems.append("product %s still held after 30 s of cqrsctl dlq retry" % pid)
                return
            stats["released"] += 1

    errors = []

    def guarded(pid):
        try:
            race(pid)
        except Exception as ex:  # noqa: BLE001
            errors.append("%s: %s" % (type(ex).__name__, ex))
    threads = [threading.Thread(target=guarded, args=(pid,)) for pid in hot]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RACE_S + 120)
    if errors:
        raise SetupError("; ".join(errors))
    with wl.lock:
        wl.damaged.clear()  # repaired and released: reads from now on are judged again
    run.info.append("hot products %s: %s; events held per cycle: %s"
                    % (", ".join(p[:8] for p in hot), ", ".join("%s %d" % kv for kv in sorted(stats.items())),
                       "median %d, max %d" % (sorted(parked)[len(parked) // 2], max(parked)) if parked else "none"))
    if not stats["released"]:
        run.problems.append("no aggregate was held and released: the race did not happen")


# ------------------------------------------------------------------- Redis Cluster ---
# These run only with --cluster, against stack.sh up --redis-cluster (tests/fault/run.sh BUILD
# --cluster): three primaries, three replicas, cluster-node-timeout 2 s. The daemons get the
# cluster's seed (node 1) as CQRS_REDIS_URL and the run's key prefix; there is no endpoint to
# flip: the client follows the cluster itself (MOVED, ASK, TRYAGAIN, CLUSTERDOWN).

RESHARD_MIN_SLOTS = 300  # slots each primary gives away at least, per reshard


def crc16(data):
    """CRC16/XMODEM, the cluster's key hash (libcqrs/src/rcluster.c)."""
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xffff if crc & 0x8000 else (crc << 1) & 0xffff
    return crc


def key_slot(key):
    """The slot of a key: the CRC16 of its hash tag (the first non-empty {…}) or of all of it."""
    a = key.find("{")
    if a >= 0:
        b = key.find("}", a + 1)
        if b > a + 1:
            key = key[a + 1:b]
    return crc16(key.encode()) % 16384


def shard_slots(run):
    """{slot: [shard tags]} of the shards of both topics (every key of a shard is in its slot)."""
    out = collections.defaultdict(list)
    for t in ("product", "order"):
        for p in range(layout(run, t)):
            out[key_slot("{%s}" % shard_tag(run, t, p))].append(shard_tag(run, t, p))
    return out


def cluster_prepare(run):
    st = run.stack
    if not st.cluster_ports or not st.cluster_url:
        raise SetupError("this scenario needs the stack's Redis Cluster (CQRS_REDIS_CLUSTER_URL, _PORTS): "
                         "tests/fault/run.sh BUILD --cluster starts one (stack.sh up --redis-cluster)")
    st.up()
    if not st.cluster_wait_ok(60):
        raise SetupError("the Redis Cluster is not ok (cluster_state, all 16384 slots served)")
    run.cleanups.append(st.up)  # a killed node back, as a replica, for the next scenario


def cluster_wait_load(run):
    """The load reached the cluster: applied offsets of both topics, then a little more."""
    wait_offsets_applied(run, None, pause=0.3)
    time.sleep(1.5)


def busiest_primary(run):
    """The primary serving the most shards in use: (its node, the shard tags it serves)."""
    nodes = run.stack.cluster_nodes()
    served = collections.defaultdict(list)
    for slot, tags in shard_slots(run).items():
        nd = run.stack.cluster_owner(slot, nodes)
        if nd:
            served[nd["id"]] += tags
    if not served:
        raise SetupError("no primary serves a shard in use")
    nid = max(served, key=lambda i: (len(served[i]), -nodes[i]["port"]))
    return nodes[nid], served[nid]


def seed_primary(run):
    """Node 1, the seed the daemons are given (CQRS_REDIS_URL), and the shards in use it serves."""
    nodes = run.stack.cluster_nodes()
    nd = next(x for x in nodes.values() if x["n"] == 1)
    return nd, [t for slot, tags in shard_slots(run).items() if slot in nd["slots"] for t in tags]


def cluster_seed_prepare(run):
    """cluster_prepare, and node 1 (the seed) a primary: when an earlier scenario left it a
    replica, a graceful failover to it first."""
    cluster_prepare(run)
    st = run.stack
    nodes = st.cluster_nodes()
    seed = next(x for x in nodes.values() if x["n"] == 1)
    if "slave" in seed["flags"]:
        st.stack_sh("redis-cluster-failover", str(nodes[seed["master"]]["n"]))
        run.info.append("made redis-cluster-1 (the seed) a primary first (stack.sh redis-cluster-failover %d)"
                        % nodes[seed["master"]]["n"])


def watch_changefeed(run, what):
    """From now on, for up to 30 s: when each cqrs-queryd's change feed (its subscription to the
    change channel) was lost and when it was back (cqrs_changefeed_connected)."""
    t0 = time.time()

    def watch(d):
        down = up = None
        while time.time() < t0 + 30 and not run.watch_stop.is_set():
            v = d.metric("cqrs_changefeed_connected")
            now = time.time() - t0
            if v == 0 and down is None:
                down = now
            elif v == 1 and down is not None:
                up = now
                break
            time.sleep(0.1)
        run.info.append("%s: %s, change feed %s" % (
            what, d.name, "connected throughout" if down is None else
            "lost from +%.1f s to +%.1f s" % (down, up) if up is not None else
            "lost from +%.1f s, still %.0f s later" % (down, time.time() - t0)))
    for d in run.queryds:
        t = threading.Thread(target=watch, args=(d,), daemon=True)
        t.start()
        run.watchers.append(t)


def nem_cluster_reshard(run, sc, opts):
    """Slots moved between the primaries under load with redis-cli --cluster reshard: each
    primary in turn gives another its lowest slots (the ones reshard takes), as many as it
    takes to include the two lowest slots of shards in use that it serves (at least
    RESHARD_MIN_SLOTS), then redis-cli --cluster rebalance evens the slots out again (more
    moves, under load too)."""
    st = run.stack
    cluster_wait_load(run)
    slots = shard_slots(run)
    seed = "127.0.0.1:%d" % st.cluster_ports[1]

    def owners():
        nodes = st.cluster_nodes()
        return {s: st.cluster_owner(s, nodes)["port"] for s in slots}
    first = last = owners()
    touched = set()  # slots of shards in use that some step moved
    moved, steps = 0, []
    t0 = time.time()
    for k in range(4):
        # by their lowest slot: p0 (0-5460 as made), p1, p2
        prim = sorted(st.cluster_primaries(), key=lambda x: x[1][0])
        if k < 3:
            # p1 gives its lowest slots to p0, then p2 to p1, then p0 to p2: a node gives away
            # its lowest slots, and those it received are above its own ones, so every step
            # moves shards of its own (p1 → p0 → p2 in a circle would pass the same on)
            src, src_slots = prim[(k + 1) % len(prim)]
            dst = prim[k % len(prim)][0]
            used = [x for x in src_slots if x in slots][:2]
            n = max(RESHARD_MIN_SLOTS, src_slots.index(used[-1]) + 1 if used else 0)
            n = min(n, len(src_slots) - 1)
            what = "%d slots from %s to %s" % (n, st.cluster_node_name(src["port"]), st.cluster_node_name(dst["port"]))
            args = ["reshard", seed, "--cluster-from", src["id"], "--cluster-to", dst["id"], "--cluster-slots", str(n),
                    "--cluster-yes"]
            logname = "reshard-%d.log" % (k + 1)
        else:  # then the slots evened out again
            what, args, logname = "rebalance", ["rebalance", seed, "--cluster-yes"], "rebalance.log"
        log("%s under load (%s)" % (what, "redis-cli --cluster " + args[0]))
        t1 = time.time()
        r = subprocess.run(["redis-cli", "--cluster", *args], capture_output=True, text=True, timeout=600)
        with open(os.path.join(run.logdir, logname), "w") as f:
            f.write(r.stdout + r.stderr)
        if r.returncode != 0 or "[ERR]" in r.stdout:
            raise SetupError("redis-cli --cluster %s: %s" % (args[0], (r.stdout + r.stderr).strip()[-800:]))
        n = len(re.findall(r"^Moving slot \d+ ", r.stdout, re.M)) if k < 3 else \
            sum(len(line) for line in r.stdout.splitlines() if line and set(line) == {"#"})
        moved += n
        now = owners()
        hit = [x for x in slots if now[x] != last[x]]
        touched.update(hit)
        last = now
        steps.append("%s: %d slots (%d shards in use) in %.1f s" % (what if k < 3 else "rebalance", n,
                                                                   sum(len(slots[x]) for x in hit), time.time() - t1))
        time.sleep(0.5)
    run.t_heal = time.time()
    moved_used = sorted(t for x in touched for t in slots[x])
    changed = sum(len(slots[x]) for x in slots if first[x] != last[x])
    run.info.append("resharded under load in %.1f s, %d slots moved: %s; %d of %d shards in use moved at least "
                    "once (%s), %d serve from another primary than before"
                    % (run.t_heal - t0, moved, "; ".join(steps), len(moved_used), sum(len(v) for v in slots.values()),
                       ", ".join(t.split(":", 1)[1] for t in moved_used[:6]) + (", …" if len(moved_used) > 6 else ""),
                       changed))
    if moved < 300:
        run.problems.append("only %d slots moved" % moved)
    if not moved_used:
        run.problems.append("no slot of a shard in use was moved: the scenario proves nothing")
    ok = subprocess.run(["redis-cli", "--cluster", "check", seed], capture_output=True, text=True, timeout=60)
    if ok.returncode != 0 or "[ERR]" in ok.stdout:
        run.problems.append("redis-cli --cluster check after the reshard: %s" % ok.stdout.strip()[-400:])


def nem_cluster_failover(run, sc, opts):
    """CLUSTER FAILOVER (graceful: the replica first catches up, no write lost) of the primary
    serving the most shards in use, under load (stack.sh redis-cluster-failover N)."""
    st = run.stack
    cluster_wait_load(run)
    nd, tags = busiest_primary(run)
    regs0 = [d.metric("cqrs_projector_store_regressions_total") or 0 for d in run.queryds]
    log("CLUSTER FAILOVER of %s (serves %d shards in use)" % (st.cluster_node_name(nd["port"]), len(tags)))
    t0 = time.time()
    st.stack_sh("redis-cluster-failover", str(nd["n"]))
    run.t_heal = time.time()
    new = st.cluster_owner(key_slot("{%s}" % tags[0]))
    watch_readiness(run, "after the failover")
    regs = [d.metric("cqrs_projector_store_regressions_total") or 0 for d in run.queryds]
    run.info.append("%s (primary of %d shards in use) failed over to %s in %.1f s (stack.sh "
                    "redis-cluster-failover); store regressions counted since: %s (none expected: nothing is lost)"
                    % (st.cluster_node_name(nd["port"]), len(tags), st.cluster_node_name(new["port"]) if new else "?",
                       run.t_heal - t0, ", ".join("%d" % (b - a) for a, b in zip(regs0, regs))))


def nem_cluster_primary_kill(run, sc, opts, seed=False):
    """The primary serving the most shards in use (seed: node 1, the daemons' seed) SIGKILLed
    after its replication link stalled: its replica is SIGSTOPped and its link cut (CLIENT KILL
    TYPE replica on the primary), so what the primary acknowledges in the next 3 s reaches no
    replica (a SIGSTOP alone would not do: the replica's socket buffers would still deliver
    what the primary had sent); then the primary is SIGKILLed and the replica resumed: it
    cannot reconnect, the cluster promotes it (node timeout 2 s) without those writes. The
    killed node comes back as its replica (stack.sh up) 2 s after the promotion."""
    st = run.stack
    cluster_wait_load(run)
    nd, tags = seed_primary(run) if seed else busiest_primary(run)
    if not tags:
        raise SetupError("%s serves no shard in use" % st.cluster_node_name(nd["port"]))
    nodes = st.cluster_nodes()
    reps = [r for r in nodes.values() if r["master"] == nd["id"] and "fail" not in r["flags"]]
    if not reps or not reps[0]["n"]:
        raise SetupError("%s has no replica that is up" % st.cluster_node_name(nd["port"]))
    rep = reps[0]
    rpid = st.cluster_pid(rep["n"])
    name, rname = st.cluster_node_name(nd["port"]), st.cluster_node_name(rep["port"])
    offsets = [shard_prefix(run, t) + "offsets" for t in tags]
    os.kill(rpid, signal.SIGSTOP)
    try:
        killed = st.cluster_cli("CLIENT", "KILL", "TYPE", "replica", port=nd["port"]).strip()
        log("%s SIGSTOPped and its link cut (%s link killed on %s): the primary goes on alone"
            % (rname, killed, name))
        time.sleep(3)
        before = {k: dict(zip(*[iter(st.cluster_cli("HGETALL", k, port=nd["port"]).split())] * 2)) for k in offsets}
        p_off = st.replication(nd["port"]).get("master_repl_offset")
        pid = st.cluster_pid(nd["n"])
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        watch_changefeed(run, "after the kill")
        st.wait_gone(pid)
        run.boundaries.append(t_kill)
    finally:
        os.kill(rpid, signal.SIGCONT)
    log("%s (primary of %d shards in use) SIGKILLed at replication offset %s; %s resumed" % (name, len(tags), p_off,
                                                                                            rname))
    # What the replica holds once it has read what its socket still had and seen its link
    # closed: what it will be promoted with. Read now, while it is a replica (READONLY): once
    # promoted, the projector writes to it at once, and without loss detection it writes the
    # offsets it had reached, hiding the loss from a later look.
    end, i = time.time() + 10, {}
    while time.time() < end:
        i = st.replication(rep["port"])
        if i.get("role") == "master" or i.get("master_link_status") == "down":
            break
        time.sleep(0.02)
    early = i.get("role") != "master"
    r_off = i.get("slave_repl_offset") or i.get("master_repl_offset")
    after = {}
    for k in offsets:
        r = subprocess.run(["redis-cli", "-p", str(rep["port"])], input="READONLY\nHGETALL %s\n" % k,
                           capture_output=True, text=True, timeout=30)
        out = r.stdout.split()[1:] if r.stdout.startswith("OK") else []
        after[k] = dict(zip(out[0::2], out[1::2]))
    end = time.time() + 30
    while time.time() < end and st.cluster_role(rep["port"]) != "master":
        time.sleep(0.05)
    t_prom = time.time()
    if st.cluster_role(rep["port"]) != "master":
        raise SetupError("%s was not promoted in 30 s after %s was killed" % (rname, name))
    run.t_heal = t_prom
    watch_readiness(run, "after the promotion")
    if not early:
        run.info.append("%s was promoted before its data could be read as a replica: the offsets below may include "
                        "the projector's first writes to it" % rname)
    behind, lost = [], 0
    for k, parts in before.items():
        for part, off in parts.items():
            have = int(after[k].get(part, "0"))
            if have < int(off):
                behind.append("%s[%s] %d < %s" % (k.split("{")[1].split("}")[0].split(".", 1)[1], part, have, off))
                lost += int(off) - have
    log("applied offsets of %s's shards, dead primary → promoted replica: %s" % (name, "; ".join(
        "%s %s → %s" % (k.split("{")[1].split("}")[0].split(".", 1)[1], before[k], after[k]) for k in offsets)))
    msg = ("%s SIGKILLed (its replica %s stalled 3 s before), %s promoted %.1f s after the kill at replication "
           "offset %s (the primary was at %s): %d of its %d shards in use behind the dead primary's applied offsets "
           "(%d messages in all): %s" % (name, rname, rname, t_prom - t_kill, r_off, p_off, len(behind), len(tags),
                                         lost, ", ".join(behind[:4]) + (", …" if len(behind) > 4 else "")))
    log(msg)
    run.info.append(msg)
    if not behind:
        run.problems.append("the promoted replica was not behind the primary's applied offsets: no write was "
                            "lost, the scenario proves nothing")
    time.sleep(2)  # load on the new primary, the old one still down
    t0 = time.time()
    st.up()  # the killed node back: it finds itself replaced and follows the new primary
    if st.cluster_role(nd["port"]) != "slave":
        run.problems.append("%s came back as %s, not as a replica" % (name, st.cluster_role(nd["port"])))
    run.info.append("%s back as a replica of %s in %.1f s (stack.sh up)" % (name, rname, time.time() - t0))
    ready_all(run)


# ------------------------------------------------- replicated Kafka (three brokers) ---
# These run only with --replicated, against stack.sh up --kafka-brokers 3 (tests/fault/run.sh
# --replicated): three combined broker+controller nodes, replication factor 3 and
# min.insync.replicas 2 everywhere, unclean leader election off, replica.lag.time.max.ms 10 s.
# Kafka's broker.session.timeout.ms (9 s) is how long a dead or paused node keeps its
# partitions before the controller moves their leadership.


def event_topics(run):
    return ["%s.product.events" % run.prefix, "%s.order.events" % run.prefix]


def relay_txn_id(run):
    return "%s-relay" % run.prefix  # cmd/cqrs-commandd: CQRS_RELAY_TRANSACTIONAL_ID, default <prefix>-relay


def replicated_prepare(run):
    run.cleanups.append(run.stack.cont_all)  # never leave a node paused for the next scenario


def wait_leaders_moved(run, topics, node, seconds=30):
    """Seconds until no partition of topics is led by node (the controller fenced it), or None."""
    t0 = time.time()
    while time.time() - t0 < seconds:
        md = run.stack.metadata(topics, avoid=(node,))
        if not any(leader == node for parts in md.values() for leader, _ in parts.values()):
            return time.time() - t0
        time.sleep(0.5)
    return None


def acked_between(run, t0, t1):
    with run.wl.lock:
        return sum(1 for op in run.wl.ops if op["outcome"] == "ok" and t0 <= op["t1"] <= t1)


def nem_kafka_leader_kill(run, sc, opts):
    """The node leading most of the busy partitions SIGKILLed; restarted once the controller
    moved its partitions; the next round waits for every replica back in sync."""
    topics = event_topics(run)
    moved = []
    for i in range(opts.rounds + 1):
        time.sleep(1.5)
        n = run.stack.busiest_leader(topics)
        log("kafka node %d (leader of the busy partitions) SIGKILL %d/%d" % (n, i + 1, opts.rounds + 1))
        run.stack.kill_node(n)
        m = wait_leaders_moved(run, topics, n)
        moved.append("%.1f" % m if m is not None else "never")
        run.stack.up()
        run.stack.wait_isr_full(topics)
    run.info.append("leadership moved off the killed node after %s s" % ", ".join(moved))


def nem_kafka_rolling_restart(run, sc, opts):
    """Every node in turn stopped cleanly (SIGTERM, controlled shutdown) and started again, the
    next one only when every replica is back in sync."""
    topics = event_topics(run)
    for n in range(1, run.stack.kafka_nodes + 1):
        time.sleep(1.5)
        log("kafka node %d: rolling restart" % n)
        run.stack.stop_node(n)
        time.sleep(1)
        run.stack.up()
        run.stack.wait_isr_full(topics + ["__transaction_state", "__consumer_offsets"])


def nem_kafka_below_min_isr(run, sc, opts):
    """Two of three nodes SIGKILLed: no partition can have two in-sync replicas (and the
    controller quorum has no majority): producing fails, commands must go on into the outbox.
    One node back: the backlog drains in order; the third comes back with the heal."""
    time.sleep(1.5)
    rng = random.Random(opts.seed)
    down = rng.sample(range(1, run.stack.kafka_nodes + 1), 2)
    log("kafka nodes %s SIGKILLed (below min.insync.replicas)" % down)
    t_down = time.time()
    for n in down:
        run.stack.kill_node(n)
    outage = MSG_TIMEOUT_MS / 1000 + 7
    backlog_max = 0
    while time.time() - t_down < outage:
        time.sleep(1)
        backlog_max = max(backlog_max, run.outbox_backlog())
    acked = acked_between(run, t_down, time.time())
    log("one node back: kafka node %d" % down[0])
    run.stack.start_node(down[0])
    t_one = run.t_heal = time.time()
    # The backlog of the outage: the rows in the outbox now (the load goes on adding new ones).
    last = int(run.stack.psql("SELECT coalesce(max(sequence), 0) FROM outbox", run.dbname)[0][0])
    drained = None
    while time.time() - t_one < 150:
        if int(run.stack.psql("SELECT count(*) FROM outbox WHERE sequence <= %d" % last, run.dbname)[0][0]) == 0:
            drained = time.time() - t_one
            break
        time.sleep(0.5)
    run.info.append("%.0f s with nodes %s down: %d commands acknowledged, outbox backlog up to %d; "
                    "with one node back the backlog drained in %s"
                    % (outage, down, acked, backlog_max, "%.1f s" % drained if drained is not None else "— (not in 150 s)"))
    if not acked:
        run.problems.append("no command succeeded while Kafka was below min.insync.replicas")
    if not backlog_max:
        run.problems.append("the outbox never backed up while Kafka was below min.insync.replicas")
    if drained is None:
        run.problems.append("the backlog did not drain with two nodes of three")


def nem_kafka_txn_coordinator_kill(run, sc, opts):
    """The relay holds each transaction open 1 s before committing (failpoint
    relay-before-commit=delay:1000); right after the failpoint fires, the node hosting the
    relay's transaction coordinator is SIGKILLed: the commit meets a dead coordinator."""
    topics = event_topics(run)
    logf = os.path.join(run.logdir, run.commandds[0].name + ".log")

    def fired():
        try:
            with open(logf, errors="replace") as f:
                return f.read().count("failpoint fired")
        except OSError:
            return 0
    notes = []
    for i in range(opts.rounds):
        time.sleep(1.5)
        n, part = run.stack.txn_coordinator(relay_txn_id(run))
        if i == 0:  # the computed coordinator, checked against the broker's answer once
            rc, out, err = run.stack.kafka_tool("org.apache.kafka.tools.TransactionsCommand", "--bootstrap-server",
                                                run.stack.brokers, "describe", "--transactional-id",
                                                relay_txn_id(run))
            rows = [line.split() for line in out.splitlines() if line.strip()]
            said = rows[1][rows[0].index("CoordinatorId")] if rc == 0 and len(rows) > 1 and \
                "CoordinatorId" in rows[0] else "?"
            run.info.append("coordinator of %s: node %d by __transaction_state-%d, node %s by "
                            "TransactionsCommand describe" % (relay_txn_id(run), n, part, said))
            if said != "?" and int(said) != n:
                run.problems.append("computed coordinator %d, Kafka says %s" % (n, said))
        seen = fired()
        end = time.time() + 30
        while fired() == seen and time.time() < end:
            time.sleep(0.02)
        if fired() == seen:
            run.problems.append("relay-before-commit never fired (no relay transaction to interrupt)")
            return
        log("kafka node %d (transaction coordinator of %s, __transaction_state-%d) SIGKILL mid-transaction %d/%d"
            % (n, relay_txn_id(run), part, i + 1, opts.rounds))
        run.stack.kill_node(n)
        m = wait_leaders_moved(run, ["__transaction_state"], n)
        new, _ = run.stack.txn_coordinator(relay_txn_id(run)) if m is not None else (None, None)
        notes.append("node %d → %s after %s s" % (n, new, "%.1f" % m if m is not None else "never"))
        run.stack.up()
        run.stack.wait_isr_full(topics + ["__transaction_state"])
    run.info.append("transaction coordinator moved: %s" % "; ".join(notes))


def nem_kafka_controller_kill(run, sc, opts):
    """The active KRaft controller (also a broker here) SIGKILLed; a new one is elected."""
    topics = event_topics(run)
    notes = []
    for i in range(opts.rounds):
        time.sleep(1.5)
        c = run.stack.active_controller()
        log("kafka node %d (active controller) SIGKILL %d/%d" % (c, i + 1, opts.rounds))
        t0 = time.time()
        run.stack.kill_node(c)
        new = run.stack.active_controller(avoid=(c,))
        notes.append("%d → %d in %.1f s" % (c, new, time.time() - t0))
        time.sleep(1)
        run.stack.up()
        run.stack.wait_isr_full(topics)
    run.info.append("active controller moved: %s" % "; ".join(notes))


def nem_kafka_broker_isolated(run, sc, opts):
    """The node leading most of the busy partitions SIGSTOPped (cut off: its connections stay
    open, nothing answers) until the controller fenced it and no ISR holds it any more, then
    resumed: it must find itself a follower and catch up."""
    topics = event_topics(run)
    watch = topics + ["__transaction_state", "__consumer_offsets"]
    notes = []
    for i in range(max(1, opts.rounds - 1)):
        time.sleep(1.5)
        n = run.stack.busiest_leader(topics)
        log("kafka node %d SIGSTOP until the ISR shrinks %d/%d" % (n, i + 1, max(1, opts.rounds - 1)))
        t0 = time.time()
        run.stack.signal_node(n, signal.SIGSTOP)
        shrunk = None
        try:
            while time.time() - t0 < 60:
                md = run.stack.metadata(watch, avoid=(n,))
                if not any(n in isr or leader == n for parts in md.values() for leader, isr in parts.values()):
                    shrunk = time.time() - t0
                    break
                time.sleep(0.5)
            time.sleep(2)
        finally:
            run.stack.signal_node(n, signal.SIGCONT)
        notes.append("node %d out of every ISR after %s s, paused %.1f s"
                     % (n, "%.1f" % shrunk if shrunk is not None else "— (not in 60 s)", time.time() - t0))
        if shrunk is None:
            run.problems.append("node %d was paused 60 s and still in an ISR" % n)
        run.stack.wait_isr_full(watch)
    run.info.append("; ".join(notes))

def unclean_prepare(run):
    """The scenario's topics made with replication factor 2 (cqrsctl migrate and the relay:
    CQRS_KAFKA_REPLICATION=2), so one paused follower leaves a partition with its leader alone."""
    replicated_prepare(run)
    run.env_extra["CQRS_KAFKA_REPLICATION"] = "2"


def nem_kafka_unclean_election(run, sc, opts):
    """Negative control: the durability a user can switch off. The scenario's topics run with
    replication factor 2, min.insync.replicas=1 and unclean.leader.election.enable=true (altered
    under load, kafka-configs). The follower F of the partitions a node L leads is SIGSTOPped
    until those partitions' ISR is L alone; the relay goes on, acknowledged by L alone; L is
    SIGKILLed, F resumed, and the unclean election the controller would run (every 5 minutes
    in KRaft) is asked for at once (kafka-leader-election --election-type unclean): F leads
    without what L acknowledged meanwhile, and L truncates to F when it comes back. The
    checker must find the events lost (and a read model that never converges)."""
    st = run.stack
    topics = event_topics(run)
    for t in topics:
        rc, out, err = st.kafka_tool("org.apache.kafka.tools.ConfigCommand", "--bootstrap-server", st.brokers,
                                     "--entity-type", "topics", "--entity-name", t, "--alter", "--add-config",
                                     "min.insync.replicas=1,unclean.leader.election.enable=true")
        if rc != 0:
            raise SetupError("kafka-configs --alter %s: %s" % (t, (out + err).strip()[-400:]))
    # (L, F): the leader and the follower of the most partitions of the two topics.
    pairs = collections.defaultdict(list)
    for t in topics:
        r = subprocess.run(["kcat", "-L", "-J", "-m", "5", "-b", st.brokers, "-t", t], capture_output=True,
                           text=True, timeout=20)
        for p in json.loads(r.stdout)["topics"][0]["partitions"]:
            reps = [x["id"] for x in p["replicas"]]
            if len(reps) != 2:
                raise SetupError("%s[%d] has replicas %s, not two" % (t, p["partition"], reps))
            f = [x for x in reps if x != p["leader"]][0]
            pairs[(p["leader"], f)].append((t, p["partition"]))
    (lead, fol), parts = max(pairs.items(), key=lambda kv: len(kv[1]))
    log("NEGATIVE: %d partitions led by node %d, node %d their only follower: SIGSTOP node %d"
        % (len(parts), lead, fol, fol))
    time.sleep(1.5)
    st.signal_node(fol, signal.SIGSTOP)
    t0 = time.time()
    shrunk = None
    while time.time() - t0 < 60:
        md = st.metadata(topics, avoid=(fol,))
        if all(md[t][p][1] == [lead] for t, p in parts):
            shrunk = time.time() - t0
            break
        time.sleep(0.5)
    if shrunk is None:
        st.signal_node(fol, signal.SIGCONT)
        run.problems.append("the ISR of %s did not shrink to node %d alone in 60 s" % (parts, lead))
        return
    # The relay's transactions acknowledged by the leader alone: wait until it committed a few
    # hundred events to Kafka (deleted from the outbox) since (the paused node's partitions
    # move first: the relay's transactions wait for them).
    t_alone = time.time()
    s0 = int(st.psql("SELECT coalesce(max(sequence), 0) FROM events", run.dbname)[0][0])
    published = 0
    while time.time() - t_alone < 40 and published < 300:
        time.sleep(0.5)
        published = int(st.psql("SELECT count(*) FROM events e WHERE e.sequence > %d AND NOT EXISTS "
                                 "(SELECT 1 FROM outbox o WHERE o.sequence = e.sequence)" % s0, run.dbname)[0][0])
    acked = acked_between(run, t_alone, time.time())
    log("NEGATIVE: ISR shrank to node %d after %.1f s; since, %d commands acknowledged, %d events published; "
        "SIGKILL node %d, SIGCONT node %d" % (lead, shrunk, acked, published, lead, fol))
    st.kill_node(lead)
    st.signal_node(fol, signal.SIGCONT)
    elected = set()
    end = time.time() + 90
    while time.time() < end and len(elected) < len(parts):
        for t, p in parts:
            if (t, p) in elected:
                continue
            st.kafka_tool("org.apache.kafka.tools.LeaderElectionCommand", "--bootstrap-server",
                          ",".join(a for n, a in st.kafka_addr.items() if n != lead), "--election-type", "unclean",
                          "--topic", t, "--partition", str(p), timeout=30)
        try:
            md = st.metadata(topics, avoid=(lead,))
        except SetupError:
            continue
        elected |= {(t, p) for t, p in parts if md[t][p][0] == fol}
        time.sleep(1)
    run.info.append("node %d alone in the ISR of %d partitions after %.1f s; while so %d commands acknowledged, "
                    "%d events published (of all partitions); unclean election made node %d leader of %d of them"
                    % (lead, len(parts), shrunk, acked, published, fol, len(elected)))
    if published < 300:
        run.problems.append("the relay published only %d events while node %d was alone in the ISR"
                            % (published, lead))
    if not elected:
        run.problems.append("no unclean election happened")

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
    Scenario("kafka-pause", "Kafka SIGSTOPped longer than the producer timeout and the projector's session "
             "(6 s): the group's session expires while its only broker is unreachable", nemesis=nem_kafka_pause,
             queryd_env={"CQRS_KAFKA_SESSION_TIMEOUT_MS": "6000"}),
    Scenario("postgres-immediate", "PostgreSQL stopped in immediate mode and restarted",
             nemesis=nem_pg_immediate),
    Scenario("projector-kill-after-apply", "projector SIGKILLed after the Redis apply, before the offset (×1; long ×3)",
             queryd_fp="projector-after-apply=kill*1", arm=1, long_arm=3, nemesis=nem_failpoint_queryd),
    Scenario("projector-kill-kip848", "two projectors in a KIP-848 group (group.protocol=consumer, incremental "
             "rebalances); one SIGKILLed after an apply: the other takes its partitions, the restarted one gets a "
             "share back", queryd_fp="projector-after-apply=kill*1", arm=1, long_arm=3, queryds=2,
             queryd_env={"CQRS_KAFKA_GROUP_PROTOCOL": "consumer"}, nemesis=nem_failpoint_queryd),
    Scenario("redis-kill-empty", "Redis SIGKILLed and restarted empty", nemesis=nem_redis_empty),
    Scenario("redelivery-reorder", "applied offsets rewound; a test producer re-sends events newest first",
             nemesis=nem_offsets_and_dups),
    Scenario("random-mix", "seeded random mix of the faults above", commandds=2, nemesis=nem_random),
    Scenario("redis-failover-lost-writes", "Redis replica's link stalled, primary SIGKILLed, replica promoted "
             "behind it, endpoint flipped: the projector must re-apply what the store lost",
             prepare=failover_prepare, nemesis=nem_failover, bound=60, check_dlq=True),
    Scenario("redis-flush-two-projectors", "two projectors sharing the partitions; FLUSHDB of the read model "
             "under load, twice", queryds=2, nemesis=nem_flush_two, bound=60, check_dlq=True),
    Scenario("dlq-retry-race", "hot products' documents damaged: dead letters and parked events under load; "
             "repaired, then cqrsctl dlq retry racing the live projector", nemesis=nem_dlq_retry, bound=60,
             check_dlq=True),
    Scenario("NEGATIVE-ack-uncommitted", "negative control: CQRS_UNSAFE_ACK_UNCOMMITTED=1 and COMMIT failing ×5",
             commandd_fp="command-before-commit=error*5", unsafe={"CQRS_UNSAFE_ACK_UNCOMMITTED": "1"},
             negative=True, nemesis=lambda run, sc, opts: time.sleep(1)),
    Scenario("NEGATIVE-relay-delete-first", "negative control: CQRS_UNSAFE_RELAY_DELETE_FIRST=1 (at most once) and "
             "the relay SIGKILLed after reading the outbox", commandd_fp="relay-after-read=kill*1", arm=2,
             unsafe={"CQRS_UNSAFE_RELAY_DELETE_FIRST": "1"}, negative=True, nemesis=nem_failpoint_commandd,
             bound=20),
    Scenario("relay-delete-lost", "the delete after a Kafka commit lost while the relay's connection lives on "
             "(relay-delete-lost ×3, as an asynchronous delete lost behind a pooler across a failover): the next "
             "record finds the last one unsettled and settles it first", commandd_fp="relay-delete-lost=error*3",
             nemesis=lambda run, sc, opts: time.sleep(3)),
    Scenario("NEGATIVE-relay-record-overwrite", "negative control: relay-delete-lost with "
             "CQRS_UNSAFE_RELAY_RECORD_OVERWRITE=1 (a record written over the unsettled one, as before issue 24)",
             commandd_fp="relay-delete-lost=error*3", unsafe={"CQRS_UNSAFE_RELAY_RECORD_OVERWRITE": "1"},
             negative=True, nemesis=lambda run, sc, opts: time.sleep(3), bound=20),
    Scenario("NEGATIVE-relay-skip-recovery", "negative control: CQRS_UNSAFE_RELAY_SKIP_RECOVERY=1 (a new leader "
             "does not settle the last recorded batch) and the relay SIGKILLed after its Kafka commit, before the "
             "delete", commandd_fp="relay-after-commit=kill*1", arm=2,
             unsafe={"CQRS_UNSAFE_RELAY_SKIP_RECOVERY": "1"}, negative=True, nemesis=nem_failpoint_commandd,
             bound=20),
    Scenario("NEGATIVE-no-loss-detection", "negative control: redis-failover-lost-writes with "
             "CQRS_UNSAFE_NO_LOSS_DETECTION=1 (the projector does not look for store loss)",
             queryd_env={"CQRS_UNSAFE_NO_LOSS_DETECTION": "1"}, negative=True, prepare=failover_prepare,
             nemesis=nem_failover, bound=20),
]

# Three Kafka brokers (fault.py --replicated; tests/fault/run.sh BUILD --replicated): see the
# nemeses above. Each must end with nothing lost, duplicated or out of order.
REPLICATED_KAFKA = [
    Scenario("kafka-leader-kill", "the node leading most busy partitions SIGKILLed, its leadership moved, "
             "restarted; 3 rounds (long 6)", prepare=replicated_prepare, nemesis=nem_kafka_leader_kill),
    Scenario("kafka-rolling-restart", "rolling restart: each node stopped cleanly and started, one at a time",
             prepare=replicated_prepare, nemesis=nem_kafka_rolling_restart),
    Scenario("kafka-below-min-isr", "two of three nodes SIGKILLed (below min.insync.replicas): commands go on "
             "into the outbox; one node back, the backlog drains in order", prepare=replicated_prepare,
             nemesis=nem_kafka_below_min_isr),
    Scenario("kafka-txn-coordinator-kill", "the node hosting the relay's transaction coordinator SIGKILLed while "
             "the relay holds a produced transaction open (relay-before-commit=delay:1000) (×2)",
             commandd_fp="relay-before-commit=delay:1000", prepare=replicated_prepare,
             nemesis=nem_kafka_txn_coordinator_kill),
    Scenario("kafka-controller-kill", "the active KRaft controller SIGKILLed, a new one elected, restarted (×2)",
             prepare=replicated_prepare, nemesis=nem_kafka_controller_kill),
    Scenario("kafka-broker-isolated", "the node leading most busy partitions SIGSTOPped (cut off) until it is "
             "out of every ISR, then resumed", prepare=replicated_prepare, nemesis=nem_kafka_broker_isolated),
    Scenario("NEGATIVE-unclean-election", "negative control: topics with replication factor 2, "
             "min.insync.replicas=1 and unclean.leader.election.enable=true; the follower paused until the leader "
             "is alone in the ISR, the leader SIGKILLed, the stale follower elected", prepare=unclean_prepare,
             negative=True, nemesis=nem_kafka_unclean_election, bound=30),
]


# ------------------------------------------------------------------ replicated PostgreSQL ---
#
# A stack with a synchronous streaming standby (tests/fault/run.sh --replicated: stack.sh up
# --pg-standby). The daemons are given stack.sh's multi-host DSN (both nodes, node 1 first,
# target_session_attrs=read-write): after a failover libpq finds the new primary by itself.

PG_STATEMENT_TIMEOUT_MS = int(os.environ.get("CQRS_PG_STATEMENT_TIMEOUT_MS", "5000") or 5000)
# The split-brain scenarios run the relay with the shortest stall time: its supervisor's cancel
# (PQcancel) is the backstop behind the relay's own bounded statements, within the window.
PG_RELAY_STALL_MS = 10000


def wait_acked(run, n, seconds=60):
    """Until the clients have n acknowledged commands (bounded): the load really runs."""
    end = time.time() + seconds
    while time.time() < end:
        with run.wl.lock:
            if sum(op["outcome"] == "ok" for op in run.wl.ops) >= n:
                return True
        time.sleep(0.2)
    return False


def window_outcomes(run, what, t_a, t_b):
    """After the run (a cleanup, so every command has ended): the commands in flight between
    t_a and t_b, by outcome, and the first acknowledgement of a command sent after t_a."""
    def fact():
        ops = list(run.wl.ops) if run.wl else []
        during = collections.Counter(op["outcome"] for op in ops if op["t0"] < t_b and op["t1"] > t_a)
        first = min((op["t1"] for op in ops if op["outcome"] == "ok" and op["t0"] > t_a), default=None)
        run.info.append("%s (%.1f s): %d commands in flight — ok %d, failed %d, unknown %d; first acknowledgement "
                        "of a command sent after it began: %s"
                        % (what, t_b - t_a, sum(during.values()), during["ok"], during["failed"], during["unknown"],
                           "+%.1f s" % (first - t_a) if first else "none"))
    run.cleanups.append(fact)


def rejoin_fact(run, node, seconds, out):
    how = "a fresh base backup" if "pg_basebackup from" in out else \
        "pg_rewind" if "pg_rewind: Done" in out else "no rewind needed" if "no rewind required" in out else "?"
    run.info.append("old primary (node %d) rejoined as a synchronous standby in %.1f s (%s)" % (node, seconds, how))


def pg_replicated_prepare(run):
    st = run.stack
    if not st.pg_standby:
        raise SetupError("this scenario needs the stack's PostgreSQL standby (CQRS_PG_STANDBY_PORT, stack.sh up "
                         "--pg-standby): tests/fault/run.sh --replicated starts one")
    st.up()
    primary = st.pg_primary()
    run.info.append("PostgreSQL: node %d primary, node %d its synchronous standby" % (primary, 3 - primary))


def pg_node1_primary_prepare(run):
    """pg_replicated_prepare, and node 1 (first in the DSN) the primary: a switchover back to it
    (promote, rejoin) when an earlier scenario left node 2 the primary."""
    pg_replicated_prepare(run)
    st = run.stack
    if st.pg_primary() != 1:
        st.pg_promote()
        st.pg_rejoin()
        run.info.append("switched over to node 1 first (the first host of the DSN)")


def nem_pg_kill_promote(run, sc, opts):
    """The primary SIGKILLed (postmaster and backends) under load, the standby promoted after a
    second (failure detection), the load goes on against it, then the old primary is rebuilt as
    its standby (pg_rewind after the crash) and the new primary waits for it again."""
    st = run.stack
    if not wait_acked(run, 20):
        run.problems.append("fewer than 20 acknowledged commands before the fault")
    time.sleep(1.0)
    old = st.pg_primary()
    t_kill = time.time()
    pid, n = st.pg_kill_node(old)
    log("postgres node %d (primary) SIGKILLed: postmaster %d and %d processes in all" % (old, pid, n))
    time.sleep(1.0)  # failure detection
    seconds, _ = st.pg_promote()
    t_promoted = time.time()
    run.t_heal = t_promoted
    log("standby (node %d) promoted in %.2f s, %.2f s after the kill" % (3 - old, seconds, t_promoted - t_kill))
    run.info.append("primary (node %d) SIGKILLed (%d processes); standby promoted by stack.sh pg-promote in %.2f s, "
                    "writable %.2f s after the kill" % (old, n, seconds, t_promoted - t_kill))
    window_outcomes(run, "from the kill to the promotion", t_kill, t_promoted)
    time.sleep(3.0)  # load on the new primary, which waits for no standby now
    seconds, out = st.pg_rejoin()
    rejoin_fact(run, old, seconds, out)
    ready_all(run)


def nem_pg_split_brain(run, sc, opts):
    """The standby promoted while the old primary keeps running: the daemons' connections stay on
    it (it is first in the DSN and, not in recovery, still read-write). Its commits wait for a
    synchronous standby that no longer follows it; statement_timeout does not end that wait
    (PostgreSQL disables it before the commit), a cancel does — the daemons' own, a second past
    their statement timeout (store.c, cqrs__pg_exec_bounded), and the harness's pg_cancel_backend
    below — and then the COMMIT reports success with a WARNING ("already committed locally"),
    which the daemons count as a failure. After the window the old primary is fenced (SIGKILL,
    as Patroni or a managed service stops it) and rebuilt as the new primary's standby with
    pg_rewind, which throws away whatever it committed alone."""
    st = run.stack
    if not wait_acked(run, 20):
        run.problems.append("fewer than 20 acknowledged commands before the fault")
    time.sleep(1.0)
    old = st.pg_primary()
    new = 3 - old
    old_log = os.path.join(os.path.dirname(st.pg_data(old)), "postgres.log")
    log_from = os.path.getsize(old_log)
    seconds, _ = st.pg_promote()
    t_promoted = time.time()
    # The daemons cancel a COMMIT (and every relay statement) still unanswered a second past
    # their statement timeout (store.c, cqrs__pg_exec_bounded): the window holds three of those
    # and a relay round or two (take the lease, record the batch, commit in Kafka, delete).
    window = max(3 * (PG_STATEMENT_TIMEOUT_MS + 1000), 2 * PG_RELAY_STALL_MS) / 1000.0
    log("standby (node %d) promoted in %.2f s while node %d runs on; fencing it in %.0f s" % (new, seconds, old, window))
    run.info.append("standby (node %d) promoted in %.2f s with the old primary (node %d) running; fenced %.0f s later "
                    "(max(3 × (statement timeout %d ms + 1 s), 2 × relay stall %d ms))"
                    % (new, seconds, old, window, PG_STATEMENT_TIMEOUT_MS, PG_RELAY_STALL_MS))
    # statement_timeout never ends a COMMIT's wait for synchronous replication (PostgreSQL
    # disables it before committing); a cancel does, and the COMMIT then reports success with a
    # WARNING, committed on the old primary alone. The daemons send their own cancels; the
    # harness also cancels the waiting COMMITs now and then, as a client's request deadline, a
    # pooler's query_timeout or an operator would (pg_cancel_backend).
    cancelled, end = 0, time.time() + window
    while time.time() < end:
        time.sleep(min(2.0, max(0.0, end - time.time())))
        try:
            cancelled += int(st.psql_node(old, "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity "
                                               "WHERE wait_event = 'SyncRep'", "postgres")[0][0])
        except (SetupError, subprocess.TimeoutExpired) as ex:
            log("cancel on the old primary: %s" % ex)
    run.info.append("COMMITs waiting for synchronous replication on the old primary cancelled by the harness "
                    "(pg_cancel_backend, every 2 s): %d" % cancelled)
    with open(old_log, errors="replace") as f:
        f.seek(log_from)
        text = f.read()
    run.info.append("old primary's log during the window: %d COMMITs whose synchronous replication wait was cancelled "
                    "(WARNING: canceling wait for synchronous replication … already committed locally), %d by "
                    "statement_timeout" % (text.count("canceling wait for synchronous replication"),
                                           text.count("canceling statement due to statement timeout")))
    # What each node holds at the fence: what the old one committed alone is lost at its rewind.
    q = ("SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM outbox), (SELECT epoch FROM relay_leader), "
         "(SELECT count(*) FROM relay_inflight)")
    try:
        held = {node: st.psql_node(node, q, run.dbname)[0] for node in (old, new)}
        waiting = st.psql_node(old, "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
                               "postgres")[0][0]
        run.info.append("at the fence — old primary: %s events, %s outbox rows, relay epoch %s, %s in-flight records, "
                        "%s sessions waiting for synchronous replication; new primary: %s events, %s outbox rows, "
                        "relay epoch %s, %s in-flight records" % (*held[old], waiting, *held[new]))
    except SetupError as ex:
        run.info.append("at the fence: %s" % ex)
    t_fence = time.time()
    pid, n = st.pg_kill_node(old)
    run.t_heal = time.time()
    log("old primary (node %d) fenced: SIGKILL to %d processes" % (old, n))
    window_outcomes(run, "split-brain window, from the promotion to the fence", t_promoted, t_fence)
    seconds, out = st.pg_rejoin()
    rejoin_fact(run, old, seconds, out)
    ready_all(run)


REPLICATED_PG = [
    Scenario("pg-primary-kill-promote", "PostgreSQL primary SIGKILLed under load, its synchronous standby promoted, "
             "the old primary rewound and rejoined as a standby", prepare=pg_replicated_prepare,
             nemesis=nem_pg_kill_promote, bound=90),
    Scenario("pg-promote-old-primary-alive", "PostgreSQL standby promoted while the old primary runs on and the daemons "
             "stay connected to it (split brain), then the old primary fenced and rewound",
             prepare=pg_node1_primary_prepare, nemesis=nem_pg_split_brain, bound=90,
             commandd_env={"CQRS_RELAY_STALL_MS": str(PG_RELAY_STALL_MS)}),
    Scenario("NEGATIVE-pg-trust-unreplicated-commit", "negative control: pg-promote-old-primary-alive with "
             "CQRS_UNSAFE_TRUST_UNREPLICATED_COMMIT=1 (a COMMIT whose synchronous replication wait was cancelled "
             "counts as done)", prepare=pg_node1_primary_prepare, nemesis=nem_pg_split_brain, bound=60,
             commandd_env={"CQRS_RELAY_STALL_MS": str(PG_RELAY_STALL_MS)},
             unsafe={"CQRS_UNSAFE_TRUST_UNREPLICATED_COMMIT": "1"}, negative=True),
]


def nem_cluster_seed_kill(run, sc, opts):
    nem_cluster_primary_kill(run, sc, opts, seed=True)


# The Redis Cluster (fault.py --cluster; tests/fault/run.sh BUILD --cluster): see the nemeses
# above. The read model of each run is on the cluster under its own key prefix.
CLUSTER = [
    Scenario("redis-cluster-reshard", "slots moved between the primaries under load (redis-cli --cluster reshard "
             "from each primary to the next, including shards in use, then rebalance)", prepare=cluster_prepare,
             nemesis=nem_cluster_reshard, bound=60, check_dlq=True, cluster=True),
    Scenario("redis-cluster-failover", "CLUSTER FAILOVER (graceful) of the primary serving the most shards in use, "
             "under load", prepare=cluster_prepare, nemesis=nem_cluster_failover, bound=60, check_dlq=True,
             cluster=True),
    Scenario("redis-cluster-primary-kill", "the primary serving the most shards in use SIGKILLed after its replica's "
             "link stalled (3 s of writes it never got); the replica promoted by the cluster: the projector must "
             "re-apply what the store lost", prepare=cluster_prepare, nemesis=nem_cluster_primary_kill, bound=60,
             check_dlq=True, cluster=True),
    Scenario("redis-cluster-seed-kill", "redis-cluster-primary-kill of node 1, the seed named in CQRS_REDIS_URL (a "
             "primary: made one first if need be)", prepare=cluster_seed_prepare, nemesis=nem_cluster_seed_kill,
             bound=60, check_dlq=True, cluster=True),
    Scenario("NEGATIVE-cluster-no-loss-detection", "negative control: redis-cluster-primary-kill with "
             "CQRS_UNSAFE_NO_LOSS_DETECTION=1 (the projector does not look for store loss)",
             queryd_env={"CQRS_UNSAFE_NO_LOSS_DETECTION": "1"}, negative=True, prepare=cluster_prepare,
             nemesis=nem_cluster_primary_kill, bound=20, cluster=True),
]


def run_scenario(stack, opts, sc, workdir):
    log("=== %s: %s" % (sc.name, sc.about))
    run = Run(stack, opts.build, workdir, sc.name, cluster=sc.cluster)
    run.sc = sc
    row = {"scenario": sc.name, "commands": 0, "acked": 0, "lost": 0, "duplicated": 0, "out of order": 0,
           "converge": None, "ok": False, "notes": []}
    if opts.long:
        sc.arm = sc.long_arm
    try:
        stack.up()
        if sc.prepare:
            sc.prepare(run)
        run.setup()
        for i in range(sc.commandds):
            fp = sc.commandd_fp if i == 0 else ""
            run.add("commandd", fp, dict(sc.commandd_env, **(sc.unsafe or {})), arm=sc.arm if fp else 0)
            if i == 0 and sc.commandds > 1 and not leader(run, 20):
                raise SetupError("the first commandd did not become the relay leader")
        for i in range(sc.queryds):
            fp = sc.queryd_fp if i == 0 else ""
            run.add("queryd", fp, sc.queryd_env, arm=sc.arm if fp else 0)
        run.supervise()
        wl = Workload(run, seed=opts.seed)
        run.wl = wl
        wl.start()
        time.sleep(1.0)
        sc.nemesis(run, sc, opts)
        stack.up()  # whatever is still down comes back: the heal
        t_heal = run.t_heal or time.time()
        time.sleep(sc.load_s if not opts.long else sc.load_s * 3)  # load after the heal
        wl.stop()
        bound = sc.bound or opts.bound
        conv = run.converge(t_heal, bound)
        run.watch_stop.set()
        for t in run.watchers:
            t.join(5)
        res, notes = run.check(wl, conv)
        if sc.prepare is failover_prepare or sc.nemesis in (nem_flush_two, nem_cluster_primary_kill,
                                                            nem_cluster_seed_kill):  # the store loses writes
            regs, resets = store_loss_counted(run)
            if not sc.negative and any(v is not None for v in regs) and not sum(v or 0 for v in regs + resets):
                run.problems.append("the store lost writes but no projector counted a store regression or reset")
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
            for rid, kind, i, ver, t0, t1 in wl.reads:
                f.write(json.dumps({"reader": rid, "kind": kind, "id": i, "version": ver, "t0": t0, "t1": t1})
                        + "\n")
    except Exception as ex:  # noqa: BLE001 — one broken scenario must not hide the others
        row["notes"].append("setup error: %s: %s" % (type(ex).__name__, ex))
        row["setup_error"] = True
    finally:
        run.teardown()
    if run.teardown_errors:
        row["ok"] = False
        row["notes"] += run.teardown_errors
    row["info"] = run.info
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
    for line in run.info:
        log("%s: %s" % (sc.name, line))
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
    ap.add_argument("--replicated", action="store_true",
                    help="the replicated-server scenarios (REPLICATED_KAFKA, REPLICATED_PG) instead of the classic "
                         "ones; the stack needs the replicas (tests/fault/run.sh BUILD --replicated starts them)")
    ap.add_argument("--cluster", action="store_true",
                    help="the Redis Cluster scenarios (CLUSTER) instead of the classic ones; the stack needs a Redis "
                         "Cluster (tests/fault/run.sh BUILD --cluster starts one)")
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
    every = SCENARIOS + REPLICATED_KAFKA + REPLICATED_PG + CLUSTER
    if opts.scenario:  # by name, from every list
        chosen = [s for s in every if s.name in opts.scenario]
    else:
        chosen = list(REPLICATED_KAFKA + REPLICATED_PG if opts.replicated else CLUSTER if opts.cluster else SCENARIOS)
    if opts.scenario and len(chosen) != len(opts.scenario):
        print("unknown scenario; known: %s" % ", ".join(s.name for s in every), file=sys.stderr)
        return 2
    if any(s in REPLICATED_KAFKA for s in chosen) and stack.kafka_nodes != 3:
        print("fault suite: %s" % SetupError(
            "the replicated-Kafka scenarios need three Kafka brokers, this stack has %d (CQRS_KAFKA_BROKER_COUNT): "
            "stack.sh up --kafka-brokers 3, or tests/fault/run.sh BUILD --replicated" % stack.kafka_nodes),
            file=sys.stderr)
        return 2
    if any(sc in REPLICATED_PG for sc in chosen) and not stack.pg_standby:
        print("fault suite: %s" % SetupError(
            "the replicated PostgreSQL scenarios need a stack with a standby (stack.sh up --pg-standby, "
            "CQRS_PG_STANDBY_PORT): tests/fault/run.sh BUILD --replicated starts one"), file=sys.stderr)
        return 2
    if any(sc.cluster for sc in chosen) and not (stack.cluster_ports and stack.cluster_url):
        print("fault suite: %s" % SetupError(
            "the Redis Cluster scenarios need a stack with a Redis Cluster (stack.sh up --redis-cluster, "
            "CQRS_REDIS_CLUSTER_URL and CQRS_REDIS_CLUSTER_PORTS): tests/fault/run.sh BUILD --cluster starts one"),
            file=sys.stderr)
        return 2
    t0 = time.time()
    rows = [run_scenario(stack, opts, sc, workdir) for sc in chosen]
    out = ["Fault suite, seed %d%s, %d s" % (opts.seed, " (long)" if opts.long else "", time.time() - t0),
           table(rows)]
    for r in rows:
        if r["notes"] and (not r["ok"] or r["scenario"].startswith("NEGATIVE")) or r.get("info"):
            out.append("\n%s (%s):" % (r["scenario"], r.get("detail", "")))
            out += ["  - " + n for n in r["notes"][:12]]
            out += ["  · " + n for n in r.get("info", [])]
    print("\n" + "\n".join(out))
    if opts.table:
        with open(opts.table, "w") as f:
            f.write("\n".join(out) + "\n")
    if any(r.get("setup_error") for r in rows):
        return 2
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
