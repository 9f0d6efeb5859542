"""Shared by the modules of the fault suite: the timing constants of the daemons' settings, the
log, SetupError, the port policy and the HTTP call the daemons, clients, readers and checker use."""

import http.client
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
from ports import free_port  # noqa: E402,F401 — the suite's one port policy, re-exported

LEASE_MS = 2000  # the relay's lease (CQRS_RELAY_LEASE_MS of every daemon)
MSG_TIMEOUT_MS = 5000  # the relay's delivery timeout; Kafka pauses last longer than this


def log(*a):
    print("[fault %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


class SetupError(Exception):
    pass




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
