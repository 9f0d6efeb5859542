/* outbox.h — the event log and transactional outbox in PostgreSQL, and the relay that moves
 * the outbox to Kafka.
 *
 * Writing: cqrs_outbox_append, inside the command's transaction, inserts the event into the
 * event log (kept forever; unique (aggregate_id, version)) and its sequence into the outbox,
 * and NOTIFYs the relay (delivered at commit).
 *
 * Relaying: one relay thread per daemon; among all daemons only the holder of a PostgreSQL
 * advisory lock publishes. It reads the outbox in sequence order — every row still present,
 * so a transaction that commits late is published late, never skipped — produces each event
 * with the idempotent producer (key = aggregate id, CloudEvents headers), and deletes an
 * outbox row only after its delivery report succeeded. Undelivered rows stay and are retried.
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

/* The advisory lock that elects the one relay among all cqrs-commandd instances. */
#define CQRS_RELAY_LOCK_KEY 4242002

typedef struct cqrs_relay cqrs_relay_t;

typedef struct cqrs_relay_config {
    const char *dsn;
    const char *brokers;
    const char *source; /* ce_source, e.g. "/cqrs-commandd" */
    const char *client_id;
    int batch_size;
    int poll_interval_ms;      /* fallback poll when no NOTIFY arrives */
    int message_timeout_ms;    /* librdkafka message.timeout.ms */
    int64_t lock_key;          /* advisory lock id that elects the relay */
    const char *const *topics; /* created (if missing) when the relay becomes leader */
    size_t n_topics;
    int topic_partitions;
    int topic_replication;
} cqrs_relay_config_t;

typedef struct cqrs_relay_stats {
    bool leader;
    bool kafka_up;
    bool pg_up;
    uint64_t published;
    uint64_t failed;
} cqrs_relay_stats_t;

/* Copies cfg. Starts nothing. */
cqrs_relay_t *cqrs_relay_new(const cqrs_relay_config_t *cfg, cqrs_error_t *err);
cqrs_err_t cqrs_relay_start(cqrs_relay_t *relay, cqrs_error_t *err);
/* Asks the thread to stop, waits for it; it finishes its batch and flushes the producer. */
void cqrs_relay_stop(cqrs_relay_t *relay);
void cqrs_relay_stats(cqrs_relay_t *relay, cqrs_relay_stats_t *out);
void cqrs_relay_destroy(cqrs_relay_t *relay);

#endif
