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
import collections
import json
import os
import sys
import tempfile
import time

from common import SetupError, log
from harness import Run
from nemeses import failover_prepare, leader, nem_flush_two, store_loss_counted
from nemeses_cluster import nem_cluster_primary_kill, nem_cluster_seed_kill
from scenarios import CLUSTER, REPLICATED_KAFKA, REPLICATED_PG, SCENARIOS
from stack import Stack
from workload import Workload


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
