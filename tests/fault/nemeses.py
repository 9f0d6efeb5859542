"""The nemeses of the classic scenarios (failpoints, servers killed or paused, Redis emptied,
Redis failover through the forwarder, dead-letter retry race) and the helpers the other nemesis
modules share."""

import collections
import random
import signal
import subprocess
import threading
import time

from common import LEASE_MS, MSG_TIMEOUT_MS, SetupError, http_call, log
from forwarder import Forwarder

RACE_S = 10.0  # dlq-retry-race: how long the damage / repair / retry cycles go on


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


def nem_failpoint_commandd(run, sc, opts):
    if not wait_deaths(run.commandds[0], sc.arm, 60):
        run.problems.append("the failpoint %s fired %d times, not %d"
                            % (sc.commandd_fp, run.commandds[0].deaths, sc.arm))
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
    for msgs in list(by_key.values())[:8]:
        if len(msgs) < 2:
            continue
        for part, _off, k, hdrs, payload in sorted(msgs, key=lambda m: -m[1])[:2]:
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


def watch_queryds(run, what, probe, period, name, steady, bad, digits):
    """From now on, for up to 30 s (or until the checker starts), each cqrs-queryd's probe(d) —
    True (fine), False (not), None (no answer either way) — every period seconds: when it was
    first not fine and when it was fine again, as a line of run.info: "<what>: <queryd>, <name>
    <steady(seconds)>" when it stayed fine, else "<name> <bad> from +x s to +y s" (digits
    decimals) or "…, still n s later"."""
    t0 = time.time()

    def watch(d):
        down = up = None
        while time.time() < t0 + 30 and not run.watch_stop.is_set():
            ok = probe(d)
            now = time.time() - t0
            if ok is False and down is None:
                down = now
            elif ok is True and down is not None:
                up = now
                break
            time.sleep(period)
        span = "+%.{0}f s".format(digits)
        run.info.append("%s: %s, %s %s" % (
            what, d.name, name, steady(time.time() - t0) if down is None else
            ("%s from " + span + " to " + span) % (bad, down, up) if up is not None else
            ("%s from " + span + ", still %.0f s later") % (bad, down, time.time() - t0)))
    for d in run.queryds:
        t = threading.Thread(target=watch, args=(d,), daemon=True)
        t.start()
        run.watchers.append(t)


def watch_readiness(run, what):
    """Each cqrs-queryd's /readyz (watch_queryds): when it first failed and when it answered 200
    again — while a partition refills, /readyz fails (the projector's refill time after the store
    loss, without the harness's own steps)."""
    watch_queryds(run, what, lambda d: http_call(d.port, "GET", "/readyz", timeout=2)[0] == 200, 0.05,
                  "/readyz", lambda s: "200 throughout (%.0f s)" % s, "failing", 2)


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
