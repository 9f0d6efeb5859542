"""The workload: client threads issuing commands with idempotency keys and retries, reader
threads reading documents back; together they record the history the checker judges."""

import json
import random
import threading
import time
import uuid

from common import http_call


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
                pick = bool(self.orders) and rng.random() < 0.15
                order = self.orders.pop(rng.randrange(len(self.orders))) if pick else None
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
                                   "items": [{"product_id": p, "quantity": rng.choice([1, 2, 1, 2, 60])}
                                             for p in lines]},
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
