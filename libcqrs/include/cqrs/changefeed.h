/* changefeed.h — listens to the read model's change announcements (docstore.h: every applied
 * document is PUBLISHed as "<key> <version>" on its database's change channel).
 *
 * One thread with its own Redis connection, SUBSCRIBEd to the channel. Redis pub/sub is
 * at-most-once: a listener that was disconnected may have missed announcements, so each time
 * the subscription is (re)established — and when the store announces it was found empty — the
 * listener gets `reset` and must forget whatever it derived from earlier announcements. While
 * the subscription is down (`down`), nothing is announced at all; the thread reconnects by
 * itself with a bounded backoff. A PING every few seconds notices a silent server (stopped,
 * partitioned) instead of waiting forever.
 *
 * Callbacks run on the feed's thread, in announcement order; keep them short.
 */
#ifndef CQRS_CHANGEFEED_H
#define CQRS_CHANGEFEED_H

#include <stdbool.h>
#include <stdint.h>

#include "cqrs/err.h"
#include "cqrs/redis.h"

typedef struct cqrs_changefeed cqrs_changefeed_t;

typedef struct cqrs_changefeed_handlers {
    void (*change)(void *ud, const char *key, int64_t version);
    void (*reset)(void *ud); /* subscribed (again), or the store was found empty */
    void (*down)(void *ud);  /* the subscription is lost */
    void *ud;
} cqrs_changefeed_handlers_t;

typedef struct cqrs_changefeed_stats {
    bool connected;
    uint64_t messages;   /* announcements received */
    uint64_t reconnects; /* subscriptions established after the first */
} cqrs_changefeed_stats_t;

/* Starts the thread; redis (redis.h) is borrowed for the call only. NULL with err on bad
 * Redis settings or when the thread cannot start (a Redis that is down or refuses the
 * connection is not an error: the thread keeps trying). */
cqrs_changefeed_t *cqrs_changefeed_start(const cqrs_redis_config_t *redis, int timeout_ms,
                                         const cqrs_changefeed_handlers_t *h, cqrs_error_t *err);
void cqrs_changefeed_stats(cqrs_changefeed_t *f, cqrs_changefeed_stats_t *out);
void cqrs_changefeed_stop(cqrs_changefeed_t *f);

/* Parses an announcement: "<key> <version>" → key copied to out, version; "*" → reset (true,
 * *reset = true). false when malformed. Pure, exported for tests. */
bool cqrs_changefeed_parse(const char *msg, size_t len, char *key, size_t cap, int64_t *version,
                           bool *reset);

#endif
