/* outbox.h — the event log and transactional outbox in PostgreSQL, and the relay that moves
 * the outbox to Kafka.
 *
 * Writing: cqrs_outbox_append, inside the command's transaction, inserts the event into the
 * event log (kept forever; unique (aggregate_id, version)) and its sequence into the outbox,
 * and NOTIFYs the relay (delivered at commit).
 *
 * Relaying: exactly one leader among all relays, elected by a lease in PostgreSQL
 * (relay_leader; renewed every second, lost after CQRS_RELAY_LEASE_MS without renewal, so a
 * crashed or paused leader is replaced within seconds). The leader publishes with a Kafka
 * transactional producer whose fixed transactional.id fences any earlier leader: a relay that
 * lost its lease can neither commit in Kafka nor write in PostgreSQL (every write checks its
 * epoch). Each batch — every outbox row still present, in sequence order, so a transaction
 * that commits late is published late and never skipped — is one Kafka transaction; its rows
 * are deleted only after the commit. The batch is recorded (relay_inflight) before the
 * commit, so a new leader knows whether the last commit happened (its check message is
 * visible to read_committed, looked up after its own init_transactions has waited for the
 * previous transaction to complete) and publishes nothing twice; a leader whose delete after
 * a commit failed retries that delete alone before its next batch.
 *
 * Bounded waits: the relay's PostgreSQL connection has a statement_timeout and a lock_timeout
 * (below the lease), so a lock held on its tables (a forgotten FOR UPDATE, a CREATE INDEX)
 * costs a logged, retried timeout, never a blocked thread, and after such a timeout the
 * leader checks (NOWAIT) that it can record a batch before producing it; the expired
 * Idempotency-Key cleanup runs in small batches, each shorter than the lease and preceded by a
 * renewal. A worker that still makes no progress for stall_ms — longer than any bounded wait of a
 * healthy one — has its running statement cancelled (PQcancel, from a thread of its own), and is
 * replaced only if that does not free it; a replaced worker frees its connection and producer
 * whenever its call returns.
 */
#ifndef CQRS_OUTBOX_H
#define CQRS_OUTBOX_H

#include <stdbool.h>
#include <stdint.h>

#include "cqrs/err.h"
#include "cqrs/event.h"
#include "cqrs/store.h"

/* Stores ev in the event log and the outbox for `topic`; sets ev->sequence. A second event
 * with the same (aggregate_id, version) gives CONFLICT with where = "events_aggregate_version_key".
 */
cqrs_err_t cqrs_outbox_append(cqrs_tx_t *tx, cqrs_event_t *ev, const char *topic,
                              cqrs_error_t *err);

/* Stores n events (each to topics[i]) in one statement, in array order; sets each sequence.
 * All of a command's events go through one call, so a command costs one round trip for its
 * events however many products it touches. */
cqrs_err_t cqrs_outbox_append_many(cqrs_tx_t *tx, cqrs_event_t *evs, size_t n,
                                   const char *const *topics, cqrs_error_t *err);

typedef struct cqrs_relay cqrs_relay_t;

/* The least stall_ms: twice the longest fixed wait of a healthy relay thread between two
 * signs of progress (connecting to PostgreSQL, creating the topics: 5 s each). */
#define CQRS_RELAY_STALL_MIN_MS 10000

typedef struct cqrs_relay_config {
    const char *dsn;
    const char *brokers;
    const char *source; /* ce_source, e.g. "/cqrs-commandd" */
    const char *client_id;
    const char *transactional_id; /* one per deployment, e.g. "cqrs-relay" */
    int batch_size;
    int poll_interval_ms;     /* fallback poll when no NOTIFY arrives */
    int message_timeout_ms;   /* librdkafka message.timeout.ms */
    int lease_ms;             /* leadership lease; renewed every lease_ms / 5 */
    int statement_timeout_ms; /* of the relay's connection (0: 5000), at most stall_ms / 4 */
    int lock_timeout_ms;      /* of the relay's connection (0: 2000), at most lease_ms / 2 */
    /* No progress this long: cancel the statement, then replace (0: 60000). At least
     * CQRS_RELAY_STALL_MIN_MS and lease_ms (Kafka transaction calls wait up to lease_ms / 3);
     * less is raised to that. */
    int stall_ms;
    const char *const *topics; /* created (if missing) when the relay becomes leader */
    size_t n_topics;
    int topic_partitions;
    int topic_replication;
} cqrs_relay_config_t;

typedef struct cqrs_relay_stats {
    bool leader;
    bool kafka_up;    /* meaningful when kafka_known */
    bool kafka_known; /* this relay leads and has tried Kafka since (a standby never does) */
    bool pg_up;
    int64_t epoch;               /* of this relay's current or last leadership */
    uint64_t published;          /* events committed to Kafka by this relay */
    uint64_t failed;             /* deliveries that failed (the rows stay and are retried) */
    uint64_t aborted;            /* Kafka transactions aborted */
    uint64_t leadership_changes; /* times this relay became leader */
    uint64_t recovered;          /* rows found already in Kafka when taking over */
    uint64_t restarts;           /* relay threads replaced after stall_ms without progress */
    uint64_t pg_timeouts;        /* statements ended by lock_timeout, statement_timeout or a
                                    cancel (the relay backs off and retries) */
    int64_t backlog;             /* outbox rows, as of this leader's last look (-1: unknown,
                                    or not leading) */
    double oldest_age_s;         /* age of the oldest outbox row then */
} cqrs_relay_stats_t;

/* Copies cfg. Starts nothing. */
cqrs_relay_t *cqrs_relay_new(const cqrs_relay_config_t *cfg, cqrs_error_t *err);
/* Creates (and destroys) a producer with the relay's configuration first, so that Kafka
 * properties at odds with it are CONFIG here and not a log line every round; then starts the
 * relay thread and its supervisor. */
cqrs_err_t cqrs_relay_start(cqrs_relay_t *relay, cqrs_error_t *err);
/* Asks the thread to stop, waits for it; it finishes its batch and flushes the producer. */
void cqrs_relay_stop(cqrs_relay_t *relay);
void cqrs_relay_stats(cqrs_relay_t *relay, cqrs_relay_stats_t *out);
/* Seconds from an event's commit to Kafka's acknowledgement of its transaction. Borrowed. */
const struct cqrs_histogram *cqrs_relay_latency(cqrs_relay_t *relay);
/* Appends the relay's histograms to t (Prometheus text): the publish latency above, the time
 * an event waits in the outbox, and the duration of each step of a round. */
struct cqrs_text;
void cqrs_relay_metrics(cqrs_relay_t *relay, struct cqrs_text *t);
void cqrs_relay_destroy(cqrs_relay_t *relay);

#endif
