"""A run of one scenario: its own PostgreSQL database, Redis database or key prefix and topics;
its daemons, their environment and supervision; cqrsctl; teardown. The checker is mixed in
(checker.Checker)."""

import os
import subprocess
import threading
import time
import uuid

from checker import Checker
from common import LEASE_MS, MSG_TIMEOUT_MS, SetupError, log
from daemons import Daemon


class Run(Checker):
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
        self.boundaries = []  # times of store losses (Checker.check: reads across them)
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
