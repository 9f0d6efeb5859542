"""The Python side of the test suite's one port policy (tests/support/ports.sh): used by the fault
suite, the schemathesis runner and the Prometheus e2e test."""
import os
import random
import socket


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
