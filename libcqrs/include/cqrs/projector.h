/* projector.h — the Kafka consumer that feeds events to a projection, one at a time, in
 * partition order, and keeps the read model exactly in step.
 *
 * Exactly once: every event goes through one atomic docstore apply (document + index changes +
 * the partition's applied offset, only at version = stored + 1). On assignment each partition
 * resumes from the offset recorded in Redis; with none, from the beginning of the topic — so a
 * Redis that lost its data is refilled from Kafka. When Kafka no longer holds that beginning
 * (retention), the partition is paused and reported (history_missing) until a rebuild records
 * an offset Kafka still has; the daemon's readiness fails meanwhile.
 *
 * Dead letters: an event the projection rejects, or that arrives after a gap, is stored with
 * its reason in Redis and holds back its own aggregate only (later events of that aggregate
 * are parked behind it); all other aggregates go on.
 *
 * Shards: each partition writes into its own shard of the read model (keyspace.h) — one slot
 * of a Redis Cluster — and records each topic's partition count in the layout, so readers
 * find an aggregate's shard.
 *
 * Store loss: the projector remembers each shard's incarnation (<shard>meta) and the offset it
 * recorded there last, and every write checks both atomically (docstore.h). A shard found
 * emptied or replaced, or a partition whose offset went back (a failover to a replica that
 * missed writes), sends the partition back to the offset the shard holds; an audit every
 * second finds the same on partitions where nothing new arrives. While such a partition
 * re-reads up to the end it had when the loss was found, it counts as refilling (readiness
 * fails).
 *
 * Outages: Redis down → the event in hand is retried with backoff until it succeeds or the
 * projector stops; Kafka down → librdkafka reconnects.
 *
 * One thread per projector; the projection's functions run on it.
 */
#ifndef CQRS_PROJECTOR_H
#define CQRS_PROJECTOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cqrs/docstore.h"
#include "cqrs/err.h"
#include "cqrs/event.h"
#include "cqrs/upcast.h"

typedef struct cqrs_projector cqrs_projector_t;

/* The domain part of a projection: pure functions. */
typedef struct cqrs_projection {
    /* Whether the projection knows ev's aggregate type (else: a dead letter). The document's
     * key is the platform's: <shard>doc:<aggregate id> (keyspace.h). */
    bool (*knows)(const cqrs_event_t *ev);
    /* The new document from the current one (NULL when none); INVALID → dead letter. */
    cqrs_err_t (*apply)(const json_t *doc, const cqrs_event_t *ev, json_t **next,
                        cqrs_error_t *err);
    /* Optional: the index changes from old (NULL when none) to next, written atomically with
     * the document: keys of the shard only (shard is its prefix). key is the document's key. */
    void (*index)(const char *shard, const char *aggregate_type, const char *key, const json_t *old,
                  const json_t *next, cqrs_index_ops_t *ops);
    /* Optional: as apply, but the caller hands doc over (NULL or a reference no one else
     * holds): it may be changed in place and returned as *next. On failure doc is unchanged
     * and still the caller's. Rebuilds fold long histories with it without copying. */
    cqrs_err_t (*apply_owned)(json_t *doc, const cqrs_event_t *ev, json_t **next,
                              cqrs_error_t *err);
    /* Optional: the event types the projection knows, at the newest version it is written
     * against, with their upcasters (upcast.h). NULL: events reach apply as they were written. */
    const struct cqrs_event_registry *events;
} cqrs_projection_t;

/* The only way events reach a projection (the projector, cqrsctl rebuild and dlq retry): ev
 * brought to the newest version the projection knows (cqrs_event_upcast: ev's type and data
 * change), then apply — or, with owned, apply_owned when the projection has it (doc handed
 * over as apply_owned says; on failure still the caller's). INVALID with the reason when the
 * event's type or version is unknown to this build, as from apply. */
cqrs_err_t cqrs_projection_apply(const cqrs_projection_t *p, const json_t *doc, cqrs_event_t *ev,
                                 json_t **next, cqrs_error_t *err);
cqrs_err_t cqrs_projection_apply_owned(const cqrs_projection_t *p, json_t *doc, cqrs_event_t *ev,
                                       json_t **next, cqrs_error_t *err);

typedef struct cqrs_projector_config {
    const char *brokers;
    const char *group_id;
    const char *client_id;
    const char *const *topics;
    size_t n_topics;
    const cqrs_redis_config_t *redis; /* borrowed for cqrs_projector_new only */
    int redis_timeout_ms;
    const cqrs_projection_t *projection;
    /* The group protocol: KIP-848's consumer protocol (true), or the classic one with this
     * session timeout (0: librdkafka's default). */
    bool consumer_protocol;
    int session_timeout_ms;
} cqrs_projector_config_t;

typedef struct cqrs_projector_stats {
    bool kafka_up;
    bool redis_up;
    unsigned assigned;        /* partitions this instance consumes */
    unsigned history_missing; /* partitions paused because Kafka lost their beginning */
    uint64_t applied;
    uint64_t duplicates;
    uint64_t dead_letters; /* rejected by the projection or after a gap */
    uint64_t gaps;
    uint64_t parked; /* held behind an earlier dead letter of their aggregate */
    uint64_t undecodable;
    uint64_t resets;      /* times the store was found emptied or replaced (incarnation) */
    uint64_t regressions; /* times a partition's offset in the store was found behind */
    uint64_t replaced;    /* times the Kafka consumer was replaced (unhealthy too long) */
    unsigned refilling;   /* partitions re-reading what the store lost */
} cqrs_projector_stats_t;

cqrs_projector_t *cqrs_projector_new(const cqrs_projector_config_t *cfg, cqrs_error_t *err);
cqrs_err_t cqrs_projector_start(cqrs_projector_t *p, cqrs_error_t *err);
/* Stops the thread after the event in hand; commits; leaves the group. */
void cqrs_projector_stop(cqrs_projector_t *p);
void cqrs_projector_stats(cqrs_projector_t *p, cqrs_projector_stats_t *out);

/* Appends the projector's metrics: lag per assigned partition (from the consumer's position
 * and the last known high watermark) and event time → applied latency. */
struct cqrs_text;
void cqrs_projector_metrics(cqrs_projector_t *p, struct cqrs_text *out);
void cqrs_projector_destroy(cqrs_projector_t *p);

#endif
