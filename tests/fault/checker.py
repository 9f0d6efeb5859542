"""The history checker: loss, duplicates, order and convergence, then `cqrsctl verify`.

Checker is a mixin of harness.Run; it uses the run's stack, dbname, prefix, queryd, sc,
boundaries, info and ctl."""

import bisect
import collections
import json
import time

from common import SetupError, http_call

# A store loss (a failover to a replica that missed writes, a FLUSHDB) steps documents back
# until the projector re-applied them; reads within this long after one are not compared
# (a serving instance may still answer a cached pre-loss version until the projector's next
# apply announces the loss). See Checker.check.
SETTLE_S = 1.0


class Checker:
    """The checker's half of a run (harness.Run): reads PostgreSQL, Kafka and the served
    documents and judges the history."""

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
            for part, _off, key, hdrs, _ in sorted(self.stack.kafka_read(topic)):
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
