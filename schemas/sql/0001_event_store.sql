-- Event log (kept forever: the source for replay and rebuild) and transactional outbox.
-- Written by libcqrs (outbox.c) in the same transaction as the domain rows.

CREATE TABLE events (
    sequence       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id       uuid        NOT NULL UNIQUE,
    aggregate_type text        NOT NULL,
    aggregate_id   uuid        NOT NULL,
    version        bigint      NOT NULL CHECK (version >= 1),
    event_type     text        NOT NULL,
    occurred_at    timestamptz NOT NULL,
    traceparent    text,
    data           jsonb       NOT NULL,
    -- optimistic concurrency: one event per aggregate version, ever
    CONSTRAINT events_aggregate_version_key UNIQUE (aggregate_id, version)
);

-- One row per event not yet known to be in Kafka. The relay reads it in sequence order and
-- deletes a batch's rows only after the Kafka transaction that carried it committed (the delete
-- itself committed asynchronously; a lost one is settled by the next leader from
-- relay_inflight): libcqrs/src/relay.c, DESIGN.
CREATE TABLE outbox (
    sequence   bigint      PRIMARY KEY REFERENCES events (sequence),
    topic      text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
