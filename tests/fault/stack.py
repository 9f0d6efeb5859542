"""Stack control: the servers of deploy/local/stack.sh from the environment (PostgreSQL, Redis,
Redis Cluster, Kafka), killed, paused and restarted by the nemeses; psql, redis-cli and Kafka
tool helpers."""

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from common import SetupError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STACK_SH = os.path.join(REPO, "deploy", "local", "stack.sh")
PG_BIN = os.environ.get("CQRS_PG_BIN", "/usr/lib/postgresql/15/bin")
REDIS_ERROR = re.compile(r"(ERR|WRONGTYPE|NOSCRIPT|READONLY|LOADING|MASTERDOWN|NOAUTH|BUSY|MISCONF|EXECABORT) ")
CLUSTER_RETRY = re.compile(r"(CLUSTERDOWN|TRYAGAIN|LOADING|MASTERDOWN) ")  # a Redis Cluster moving
CLUSTER_ERROR = re.compile(r"(MOVED|ASK|CROSSSLOT) ")


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
        return dict(zip(out[0::2], out[1::2], strict=False))

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
