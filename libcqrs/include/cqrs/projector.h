/* projector.h — the Kafka consumer that feeds events to a projection, one at a time, in
 * partition order.
 *
 * At-least-once delivery made effectively-once by the docstore's version check: the consumer
 * stores a partition's offset (offset + 1) only after the projection applied (or skipped as
 * duplicate) the message; Redis records the same offset atomically with the document. A
 * projection that reports UNAVAILABLE is retried with backoff, forever, until it succeeds or
 * the projector stops, so a Redis outage delays events but never drops one.
 *
 * On assignment, each partition resumes from the offset recorded in Redis (the offset after
 * the last applied event), falling back to the group's committed offset when Redis has none.
 *
 * One thread per projector; the callback runs on it and owns `ds` for the call.
 */
#ifndef CQRS_PROJECTOR_H
#define CQRS_PROJECTOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cqrs/docstore.h"
#include "cqrs/err.h"
#include "cqrs/event.h"

typedef struct cqrs_projector cqrs_projector_t;

typedef struct cqrs_delivery {
    const char *topic;
    int32_t partition;
    int64_t offset;
    const char *offsets_key; /* Redis hash of this topic's applied offsets */
} cqrs_delivery_t;

/* Applies one event. OK: applied or a duplicate; UNAVAILABLE: retry later; INVALID: the event
 * cannot be applied (logged and skipped); STATE: a gap, retried with backoff. */
typedef cqrs_err_t (*cqrs_projector_apply_fn)(void *ud, cqrs_docstore_t *ds, const cqrs_event_t *ev,
                                              const cqrs_delivery_t *at, cqrs_error_t *err);

typedef struct cqrs_projector_config {
    const char *brokers;
    const char *group_id;
    const char *client_id;
    const char *const *topics;
    size_t n_topics;
    const char *redis_url;
    int redis_timeout_ms;
    cqrs_projector_apply_fn apply;
    void *ud;
} cqrs_projector_config_t;

typedef struct cqrs_projector_stats {
    bool kafka_up;
    bool redis_up;
    uint64_t applied;
    uint64_t skipped_invalid;
} cqrs_projector_stats_t;

cqrs_projector_t *cqrs_projector_new(const cqrs_projector_config_t *cfg, cqrs_error_t *err);
cqrs_err_t cqrs_projector_start(cqrs_projector_t *p, cqrs_error_t *err);
/* Stops the thread after the event in hand; commits stored offsets; closes the consumer. */
void cqrs_projector_stop(cqrs_projector_t *p);
void cqrs_projector_stats(cqrs_projector_t *p, cqrs_projector_stats_t *out);
void cqrs_projector_destroy(cqrs_projector_t *p);

#endif
