"""The nemeses of the replicated-server scenarios (fault.py --replicated): three Kafka brokers
(leader, controller, transaction coordinator killed; isolation; unclean election) and a
PostgreSQL primary with a synchronous standby (kill and promote; split brain)."""

import collections
import json
import os
import random
import signal
import subprocess
import time

from common import MSG_TIMEOUT_MS, SetupError, log
from nemeses import ready_all

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
                    % (outage, down, acked, backlog_max,
                       "%.1f s" % drained if drained is not None else "— (not in 150 s)"))
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
    log("standby (node %d) promoted in %.2f s while node %d runs on; fencing it in %.0f s"
        % (new, seconds, old, window))
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
