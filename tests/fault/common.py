"""Shared by the modules of the fault suite: the timing constants of the daemons' settings, the
log, SetupError, the port policy and the HTTP call the daemons, clients, readers and checker use."""

import http.client
import json
import os
import random
import socket
import sys
import time

LEASE_MS = 2000  # the relay's lease (CQRS_RELAY_LEASE_MS of every daemon)
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
