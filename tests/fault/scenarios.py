"""The scenario table: Scenario and the lists SCENARIOS (classic), REPLICATED_KAFKA,
REPLICATED_PG (fault.py --replicated) and CLUSTER (fault.py --cluster)."""

import time

from nemeses import (
    failover_prepare,
    nem_dlq_retry,
    nem_failover,
    nem_failpoint_commandd,
    nem_failpoint_queryd,
    nem_flush_two,
    nem_kafka_kill,
    nem_kafka_pause,
    nem_offsets_and_dups,
    nem_pg_immediate,
    nem_random,
    nem_redis_empty,
    nem_relay_pause,
)
from nemeses_cluster import (
    cluster_prepare,
    cluster_seed_prepare,
    nem_cluster_failover,
    nem_cluster_primary_kill,
    nem_cluster_reshard,
    nem_cluster_seed_kill,
)
from nemeses_replicated import (
    PG_RELAY_STALL_MS,
    nem_kafka_below_min_isr,
    nem_kafka_broker_isolated,
    nem_kafka_controller_kill,
    nem_kafka_leader_kill,
    nem_kafka_rolling_restart,
    nem_kafka_txn_coordinator_kill,
    nem_kafka_unclean_election,
    nem_pg_kill_promote,
    nem_pg_split_brain,
    pg_node1_primary_prepare,
    pg_replicated_prepare,
    replicated_prepare,
    unclean_prepare,
)


class Scenario:
    def __init__(self, name, about, commandd_fp="", queryd_fp="", arm=3, long_arm=None, commandds=1,
                 nemesis=None, negative=False, unsafe=None, load_s=2.0, bound=None, queryds=1,
                 queryd_env=None, prepare=None, check_dlq=False, commandd_env=None, cluster=False):
        self.name, self.about = name, about
        self.cluster = cluster  # the read model on the stack's Redis Cluster (fault.py --cluster)
        self.commandd_fp, self.queryd_fp, self.arm = commandd_fp, queryd_fp, arm
        self.long_arm = long_arm or arm
        self.commandds, self.nemesis, self.negative, self.unsafe = commandds, nemesis, negative, unsafe
        self.load_s = load_s
        self.bound = bound  # seconds to converge; a negative control that never converges fails fast
        self.queryds = queryds  # cqrs-queryd instances (role both) in one consumer group
        self.queryd_env = queryd_env or {}  # e.g. a CQRS_UNSAFE_* switch of the projector
        self.prepare = prepare  # prepare(run) before the database, daemons and load exist
        self.check_dlq = check_dlq  # the checker also requires that no aggregate is held
        self.commandd_env = commandd_env or {}  # settings of every cqrs-commandd (unsafe ones: `unsafe`)


SCENARIOS = [
    Scenario("commandd-kill-before-commit", "SIGKILL after the writes, before COMMIT (×3)",
             commandd_fp="command-before-commit=kill*1", nemesis=nem_failpoint_commandd),
    Scenario("commandd-kill-after-commit", "SIGKILL after COMMIT, before the reply (×3); retried keys",
             commandd_fp="command-after-commit=kill*1", nemesis=nem_failpoint_commandd),
    Scenario("relay-kill-after-read", "relay SIGKILLed after reading the outbox, before producing (×3)",
             commandd_fp="relay-after-read=kill*1", nemesis=nem_failpoint_commandd),
    Scenario("relay-kill-after-delivery", "relay SIGKILLed with every delivery report in, its Kafka transaction "
             "open (×3)", commandd_fp="relay-after-delivery=kill*1", nemesis=nem_failpoint_commandd),
    Scenario("relay-kill-after-ack", "relay SIGKILLed after Kafka's ack, before deleting the rows (×3)",
             commandd_fp="relay-after-commit=kill*1", nemesis=nem_failpoint_commandd),
    Scenario("relay-pause-takeover", "relay leader SIGSTOPped past the lease, another takes over, resumed",
             commandd_fp="relay-before-commit=pause*1", commandds=2, nemesis=nem_relay_pause),
    Scenario("kafka-kill", "Kafka SIGKILLed and restarted under load", nemesis=nem_kafka_kill),
    Scenario("kafka-pause", "Kafka SIGSTOPped longer than the producer timeout and the projector's session "
             "(6 s): the group's session expires while its only broker is unreachable", nemesis=nem_kafka_pause,
             queryd_env={"CQRS_KAFKA_SESSION_TIMEOUT_MS": "6000"}),
    Scenario("postgres-immediate", "PostgreSQL stopped in immediate mode and restarted",
             nemesis=nem_pg_immediate),
    Scenario("projector-kill-after-apply", "projector SIGKILLed after the Redis apply, before the offset (×1; long ×3)",
             queryd_fp="projector-after-apply=kill*1", arm=1, long_arm=3, nemesis=nem_failpoint_queryd),
    Scenario("projector-kill-kip848", "two projectors in a KIP-848 group (group.protocol=consumer, incremental "
             "rebalances); one SIGKILLed after an apply: the other takes its partitions, the restarted one gets a "
             "share back", queryd_fp="projector-after-apply=kill*1", arm=1, long_arm=3, queryds=2,
             queryd_env={"CQRS_KAFKA_GROUP_PROTOCOL": "consumer"}, nemesis=nem_failpoint_queryd),
    Scenario("redis-kill-empty", "Redis SIGKILLed and restarted empty", nemesis=nem_redis_empty),
    Scenario("redelivery-reorder", "applied offsets rewound; a test producer re-sends events newest first",
             nemesis=nem_offsets_and_dups),
    Scenario("random-mix", "seeded random mix of the faults above", commandds=2, nemesis=nem_random),
    Scenario("redis-failover-lost-writes", "Redis replica's link stalled, primary SIGKILLed, replica promoted "
             "behind it, endpoint flipped: the projector must re-apply what the store lost",
             prepare=failover_prepare, nemesis=nem_failover, bound=60, check_dlq=True),
    Scenario("redis-flush-two-projectors", "two projectors sharing the partitions; FLUSHDB of the read model "
             "under load, twice", queryds=2, nemesis=nem_flush_two, bound=60, check_dlq=True),
    Scenario("dlq-retry-race", "hot products' documents damaged: dead letters and parked events under load; "
             "repaired, then cqrsctl dlq retry racing the live projector", nemesis=nem_dlq_retry, bound=60,
             check_dlq=True),
    Scenario("NEGATIVE-ack-uncommitted", "negative control: CQRS_UNSAFE_ACK_UNCOMMITTED=1 and COMMIT failing ×5",
             commandd_fp="command-before-commit=error*5", unsafe={"CQRS_UNSAFE_ACK_UNCOMMITTED": "1"},
             negative=True, nemesis=lambda run, sc, opts: time.sleep(1)),
    Scenario("NEGATIVE-relay-delete-first", "negative control: CQRS_UNSAFE_RELAY_DELETE_FIRST=1 (at most once) and "
             "the relay SIGKILLed after reading the outbox", commandd_fp="relay-after-read=kill*1", arm=2,
             unsafe={"CQRS_UNSAFE_RELAY_DELETE_FIRST": "1"}, negative=True, nemesis=nem_failpoint_commandd,
             bound=20),
    Scenario("relay-delete-lost", "the delete after a Kafka commit lost while the relay's connection lives on "
             "(relay-delete-lost ×3, as an asynchronous delete lost behind a pooler across a failover): the next "
             "record finds the last one unsettled and settles it first", commandd_fp="relay-delete-lost=error*3",
             nemesis=lambda run, sc, opts: time.sleep(3)),
    Scenario("NEGATIVE-relay-record-overwrite", "negative control: relay-delete-lost with "
             "CQRS_UNSAFE_RELAY_RECORD_OVERWRITE=1 (a record written over the unsettled one, as before issue 24)",
             commandd_fp="relay-delete-lost=error*3", unsafe={"CQRS_UNSAFE_RELAY_RECORD_OVERWRITE": "1"},
             negative=True, nemesis=lambda run, sc, opts: time.sleep(3), bound=20),
    Scenario("NEGATIVE-relay-skip-recovery", "negative control: CQRS_UNSAFE_RELAY_SKIP_RECOVERY=1 (a new leader "
             "drops the last record without settling it) and the relay SIGKILLed after its Kafka commit, before the "
             "delete", commandd_fp="relay-after-commit=kill*1", arm=2,
             unsafe={"CQRS_UNSAFE_RELAY_SKIP_RECOVERY": "1"}, negative=True, nemesis=nem_failpoint_commandd,
             bound=20),
    Scenario("NEGATIVE-no-loss-detection", "negative control: redis-failover-lost-writes with "
             "CQRS_UNSAFE_NO_LOSS_DETECTION=1 (the projector does not look for store loss)",
             queryd_env={"CQRS_UNSAFE_NO_LOSS_DETECTION": "1"}, negative=True, prepare=failover_prepare,
             nemesis=nem_failover, bound=20),
]

# Three Kafka brokers (fault.py --replicated; tests/fault/run.sh BUILD --replicated): see the
# nemeses in nemeses_replicated.py. Each must end with nothing lost, duplicated or out of order.
REPLICATED_KAFKA = [
    Scenario("kafka-leader-kill", "the node leading most busy partitions SIGKILLed, its leadership moved, "
             "restarted; 3 rounds (long 6)", prepare=replicated_prepare, nemesis=nem_kafka_leader_kill),
    Scenario("kafka-rolling-restart", "rolling restart: each node stopped cleanly and started, one at a time",
             prepare=replicated_prepare, nemesis=nem_kafka_rolling_restart),
    Scenario("kafka-below-min-isr", "two of three nodes SIGKILLed (below min.insync.replicas): commands go on "
             "into the outbox; one node back, the backlog drains in order", prepare=replicated_prepare,
             nemesis=nem_kafka_below_min_isr),
    Scenario("kafka-txn-coordinator-kill", "the node hosting the relay's transaction coordinator SIGKILLed while "
             "the relay holds a produced transaction open (relay-before-commit=delay:1000) (×2)",
             commandd_fp="relay-before-commit=delay:1000", prepare=replicated_prepare,
             nemesis=nem_kafka_txn_coordinator_kill),
    Scenario("kafka-controller-kill", "the active KRaft controller SIGKILLed, a new one elected, restarted (×2)",
             prepare=replicated_prepare, nemesis=nem_kafka_controller_kill),
    Scenario("kafka-broker-isolated", "the node leading most busy partitions SIGSTOPped (cut off) until it is "
             "out of every ISR, then resumed", prepare=replicated_prepare, nemesis=nem_kafka_broker_isolated),
    Scenario("NEGATIVE-unclean-election", "negative control: topics with replication factor 2, "
             "min.insync.replicas=1 and unclean.leader.election.enable=true; the follower paused until the leader "
             "is alone in the ISR, the leader SIGKILLed, the stale follower elected", prepare=unclean_prepare,
             negative=True, nemesis=nem_kafka_unclean_election, bound=30),
]


REPLICATED_PG = [
    Scenario("pg-primary-kill-promote", "PostgreSQL primary SIGKILLed under load, its synchronous standby promoted, "
             "the old primary rewound and rejoined as a standby", prepare=pg_replicated_prepare,
             nemesis=nem_pg_kill_promote, bound=90),
    Scenario("pg-promote-old-primary-alive", "PostgreSQL standby promoted while the old primary runs on and the "
             "daemons stay connected to it (split brain), then the old primary fenced and rewound",
             prepare=pg_node1_primary_prepare, nemesis=nem_pg_split_brain, bound=90,
             commandd_env={"CQRS_RELAY_STALL_MS": str(PG_RELAY_STALL_MS)}),
    Scenario("NEGATIVE-pg-trust-unreplicated-commit", "negative control: pg-promote-old-primary-alive with "
             "CQRS_UNSAFE_TRUST_UNREPLICATED_COMMIT=1 (a COMMIT whose synchronous replication wait was cancelled "
             "counts as done)", prepare=pg_node1_primary_prepare, nemesis=nem_pg_split_brain, bound=60,
             commandd_env={"CQRS_RELAY_STALL_MS": str(PG_RELAY_STALL_MS)},
             unsafe={"CQRS_UNSAFE_TRUST_UNREPLICATED_COMMIT": "1"}, negative=True),
]


# The Redis Cluster (fault.py --cluster; tests/fault/run.sh BUILD --cluster): see the nemeses
# in nemeses_cluster.py. The read model of each run is on the cluster under its own key prefix.
CLUSTER = [
    Scenario("redis-cluster-reshard", "slots moved between the primaries under load (redis-cli --cluster reshard "
             "from each primary to the next, including shards in use, then rebalance)", prepare=cluster_prepare,
             nemesis=nem_cluster_reshard, bound=60, check_dlq=True, cluster=True),
    Scenario("redis-cluster-failover", "CLUSTER FAILOVER (graceful) of the primary serving the most shards in use, "
             "under load", prepare=cluster_prepare, nemesis=nem_cluster_failover, bound=60, check_dlq=True,
             cluster=True),
    Scenario("redis-cluster-primary-kill", "the primary serving the most shards in use SIGKILLed after its replica's "
             "link stalled (3 s of writes it never got); the replica promoted by the cluster: the projector must "
             "re-apply what the store lost", prepare=cluster_prepare, nemesis=nem_cluster_primary_kill, bound=60,
             check_dlq=True, cluster=True),
    Scenario("redis-cluster-seed-kill", "redis-cluster-primary-kill of node 1, the seed named in CQRS_REDIS_URL (a "
             "primary: made one first if need be)", prepare=cluster_seed_prepare, nemesis=nem_cluster_seed_kill,
             bound=60, check_dlq=True, cluster=True),
    Scenario("NEGATIVE-cluster-no-loss-detection", "negative control: redis-cluster-primary-kill with "
             "CQRS_UNSAFE_NO_LOSS_DETECTION=1 (the projector does not look for store loss)",
             queryd_env={"CQRS_UNSAFE_NO_LOSS_DETECTION": "1"}, negative=True, prepare=cluster_prepare,
             nemesis=nem_cluster_primary_kill, bound=20, cluster=True),
]
