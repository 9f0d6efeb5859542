/* waiters.h — HTTP requests parked until a document changes (read-your-writes waits and
 * Server-Sent Event watchers), woken by the change feed or by a deadline.
 *
 * A wait is one-shot: the request is woken exactly once — when the key is announced at
 * min_version or later, at its deadline, on a feed reset, while the feed is down (every
 * poll_ms, so waits still finish by polling the store), or when the hub closes — and the hub
 * forgets it at that moment. The woken handler re-checks the store and answers or waits again.
 *
 * A watch lasts until cqrs_watch_end (call it from the request's close hook): every
 * announcement of its key, every keep-alive interval and every reset wakes the request; the
 * stream's reader asks cqrs_watch_poll what happened since it last looked.
 *
 * Thread-safe. One timer thread handles deadlines, keep-alives and feed-down polling.
 */
#ifndef CQRS_WAITERS_H
#define CQRS_WAITERS_H

#include <stdbool.h>
#include <stdint.h>

#include "cqrs/http.h"

typedef struct cqrs_waiters cqrs_waiters_t;
typedef struct cqrs_watch cqrs_watch_t;

typedef struct cqrs_waiters_config {
    unsigned max_waits;   /* parked waits at once; more → add fails (answer 503) */
    unsigned max_watches; /* open streams at once */
    int keepalive_ms;     /* watchers are woken this often with keepalive_due */
    int poll_ms;          /* while the feed is down, waits are woken this often */
} cqrs_waiters_config_t;

cqrs_waiters_t *cqrs_waiters_new(const cqrs_waiters_config_t *cfg);
/* Wakes everything and refuses new waits and watches; then frees. Call before the HTTP server
 * stops (woken requests see the closed hub and answer at once). */
void cqrs_waiters_close(cqrs_waiters_t *w);
void cqrs_waiters_destroy(cqrs_waiters_t *w);
bool cqrs_waiters_closed(cqrs_waiters_t *w);

/* Parks req until key reaches min_version or deadline_ms (cqrs_monotonic_ms clock). The caller
 * then calls cqrs_http_suspend. false: full or closed (answer at once). */
bool cqrs_waiters_wait(cqrs_waiters_t *w, const char *key, int64_t min_version, int64_t deadline_ms,
                       cqrs_http_request_t *req);

/* Forgets req's wait on key if it has not fired yet (the request answered by itself). */
void cqrs_waiters_cancel(cqrs_waiters_t *w, const char *key, cqrs_http_request_t *req);

/* Opens a watch of key for a streaming req; NULL when full or closed. */
cqrs_watch_t *cqrs_watch_begin(cqrs_waiters_t *w, const char *key, cqrs_http_request_t *req);
/* What happened since the last poll: the highest announced version (0: none), whether a
 * keep-alive is due, whether the feed reset (re-read the store), whether the hub closed. */
typedef struct cqrs_watch_events {
    int64_t announced;
    bool keepalive_due, reset, closed;
} cqrs_watch_events_t;
void cqrs_watch_poll(cqrs_watch_t *watch, cqrs_watch_events_t *out);
void cqrs_watch_end(cqrs_watch_t *watch);

/* From the change feed. */
void cqrs_waiters_announce(cqrs_waiters_t *w, const char *key, int64_t version);
void cqrs_waiters_reset(cqrs_waiters_t *w);
void cqrs_waiters_feed_up(cqrs_waiters_t *w, bool up);

typedef struct cqrs_waiters_stats {
    uint64_t waits, watches; /* open now */
    uint64_t woken_by_change, woken_by_deadline, refused;
} cqrs_waiters_stats_t;
void cqrs_waiters_stats(cqrs_waiters_t *w, cqrs_waiters_stats_t *out);

#endif
