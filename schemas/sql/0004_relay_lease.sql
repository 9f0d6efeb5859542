-- The relay's leadership lease and its in-flight Kafka transaction.
--
-- relay_leader: one row. A relay leads while its lease is unexpired; it renews every second.
-- Taking over bumps the epoch; every write a relay makes checks its epoch, so a relay that
-- lost the lease (crashed, paused, cut off) can change nothing in PostgreSQL, and the new
-- leader's Kafka transactional producer (same transactional.id) fences it in Kafka.
CREATE TABLE relay_leader (
    id         int         PRIMARY KEY CHECK (id = 1),
    owner      text        NOT NULL DEFAULT '',
    epoch      bigint      NOT NULL DEFAULT 0,
    since      timestamptz,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO relay_leader (id) VALUES (1);

-- The batch whose Kafka transaction is being committed: written before the commit, deleted
-- with the batch's outbox rows after it. A new leader finding a row here checks whether that
-- transaction committed (its check message is visible to read_committed) and either deletes
-- the rows (published) or leaves them to be published again (aborted).
CREATE TABLE relay_inflight (
    id              int      PRIMARY KEY CHECK (id = 1),
    epoch           bigint   NOT NULL,
    sequences       bigint[] NOT NULL,
    check_topic     text     NOT NULL,
    check_partition int      NOT NULL,
    check_offset    bigint   NOT NULL,
    check_sequence  bigint   NOT NULL
);
