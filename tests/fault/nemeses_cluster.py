"""The nemeses of the Redis Cluster scenarios (fault.py --cluster): reshards, failovers, a
primary or the seed node killed."""

import collections
import os
import re
import signal
import subprocess
import time

from common import SetupError, log
from nemeses import layout, ready_all, shard_prefix, shard_tag, wait_offsets_applied, watch_queryds, watch_readiness

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
    """Each cqrs-queryd's change feed (its subscription to the change channel,
    cqrs_changefeed_connected; watch_queryds): when it was lost and when it was back."""
    watch_queryds(run, what, lambda d: {0: False, 1: True}.get(d.metric("cqrs_changefeed_connected")),
                  0.1, "change feed", lambda _s: "connected throughout", "lost", 1)


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
                       run.t_heal - t0, ", ".join("%d" % (b - a) for a, b in zip(regs0, regs, strict=True))))


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
        before = {}
        for k in offsets:
            kv = st.cluster_cli("HGETALL", k, port=nd["port"]).split()
            before[k] = dict(zip(kv[0::2], kv[1::2], strict=False))
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
        after[k] = dict(zip(out[0::2], out[1::2], strict=False))
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


def nem_cluster_seed_kill(run, sc, opts):
    nem_cluster_primary_kill(run, sc, opts, seed=True)
