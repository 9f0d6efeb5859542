/* doccache.h — an in-process cache of read-model documents, kept exact by the change feed.
 *
 * Entries carry their version. An announcement "key is at version V" drops an older entry; a
 * feed reset (resubscribed, store emptied) drops everything; while the feed is down the cache
 * is off (no hits, no fills), because nothing would tell it about changes.
 *
 * Fills race with announcements: a reader that read version 5 from Redis may insert it after
 * the feed announced version 6. So a reader takes a ticket before reading Redis and the fill
 * is refused when any announcement reached the key's shard (or the cache was reset) since the
 * ticket was taken. A fill also never lowers an entry's version.
 *
 * Memory is bounded by max_bytes (document bytes + key + overhead), split across shards;
 * a full shard evicts its oldest entries. Thread-safe.
 */
#ifndef CQRS_DOCCACHE_H
#define CQRS_DOCCACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct cqrs_doccache cqrs_doccache_t;

typedef struct cqrs_doccache_ticket {
    uint64_t epoch, seq;
    bool valid;
} cqrs_doccache_ticket_t;

typedef struct cqrs_doccache_stats {
    uint64_t hits, misses, fills, refused, evictions, resets;
    uint64_t entries, bytes, max_bytes;
    bool enabled;
} cqrs_doccache_stats_t;

/* max_bytes 0: the cache is never used (every lookup misses). Starts disabled. */
cqrs_doccache_t *cqrs_doccache_new(size_t max_bytes);
void cqrs_doccache_destroy(cqrs_doccache_t *c);

/* A hit needs an entry at version ≥ min_version; copies the document into *json (malloc'ed,
 * caller frees, NUL-terminated) and its version into *version. */
bool cqrs_doccache_get(cqrs_doccache_t *c, const char *key, int64_t min_version, char **json,
                       int64_t *version);

/* Take before reading the document from the store; pass to put. */
cqrs_doccache_ticket_t cqrs_doccache_ticket(cqrs_doccache_t *c, const char *key);
/* Inserts (copies) a document read from the store with the ticket taken before the read. */
void cqrs_doccache_put(cqrs_doccache_t *c, const char *key, cqrs_doccache_ticket_t t,
                       int64_t version, const char *json, size_t len);

/* The feed said key is at version: drops an older entry. */
void cqrs_doccache_announce(cqrs_doccache_t *c, const char *key, int64_t version);
/* Drops everything; enabled says whether the cache may be used from now on. */
void cqrs_doccache_reset(cqrs_doccache_t *c, bool enabled);

void cqrs_doccache_stats(cqrs_doccache_t *c, cqrs_doccache_stats_t *out);

#endif
