/* docstore.h — the read model in Redis: versioned documents and per-partition applied offsets.
 *
 * A document is a hash {v: version, json: document}. cqrs_docstore_apply runs one Lua script
 * that, atomically, writes the document only when its version is exactly the stored version + 1
 * and records the partition's applied offset with it. The script is loaded once per connection
 * (SCRIPT LOAD) and re-sent on NOSCRIPT, e.g. after a Redis restart.
 *
 * A cqrs_docstore_t is one connection, owned by one thread. It reconnects by itself on the next
 * call after a failure. cqrs_docstore_pool_t hands connections to worker threads (thread-safe).
 */
#ifndef CQRS_DOCSTORE_H
#define CQRS_DOCSTORE_H

#include <stdint.h>

#include "cqrs/err.h"

typedef struct cqrs_docstore cqrs_docstore_t;
typedef struct cqrs_docstore_pool cqrs_docstore_pool_t;

typedef struct cqrs_redis_addr {
    char host[256];
    int port;
    int db;
    char password[256];
} cqrs_redis_addr_t;

/* Parses redis://[[user]:password@]host[:port][/db]; INVALID otherwise. */
cqrs_err_t cqrs_redis_url_parse(const char *url, cqrs_redis_addr_t *out, cqrs_error_t *err);

/* Does not connect; the first call does. NULL with err on a bad URL. */
cqrs_docstore_t *cqrs_docstore_new(const char *url, int timeout_ms, cqrs_error_t *err);
void cqrs_docstore_destroy(cqrs_docstore_t *ds);

cqrs_err_t cqrs_docstore_ping(cqrs_docstore_t *ds, cqrs_error_t *err);

/* Reads a document. NOT_FOUND when absent. *json is malloc'ed (caller frees) and may be NULL
 * when json is NULL (version only). */
cqrs_err_t cqrs_docstore_get(cqrs_docstore_t *ds, const char *key, char **json, int64_t *version,
                             cqrs_error_t *err);

typedef enum cqrs_apply_result {
    CQRS_APPLY_APPLIED = 1,
    CQRS_APPLY_DUPLICATE = 0, /* version ≤ stored: skipped, offset still recorded */
    CQRS_APPLY_GAP = -1,      /* version > stored + 1: nothing written */
} cqrs_apply_result_t;

/* Atomically: if version == stored + 1, HSET key v <version> json <json>; unless it is a gap,
 * also record next_offset (the offset after the event's message) for `partition` in the hash
 * offsets_key, which only ever grows. See cqrs_apply_result_t. */
cqrs_err_t cqrs_docstore_apply(cqrs_docstore_t *ds, const char *key, int64_t version,
                               const char *json, const char *offsets_key, int32_t partition,
                               int64_t next_offset, cqrs_apply_result_t *result, cqrs_error_t *err);

/* Applied offset (next offset to read) of a partition; NOT_FOUND when none is stored. */
cqrs_err_t cqrs_docstore_offset(cqrs_docstore_t *ds, const char *offsets_key, int32_t partition,
                                int64_t *offset, cqrs_error_t *err);

cqrs_docstore_pool_t *cqrs_docstore_pool_new(const char *url, int timeout_ms, unsigned size,
                                             cqrs_error_t *err);
/* Waits up to timeout_ms for a free connection; NULL on timeout (answer 503). */
cqrs_docstore_t *cqrs_docstore_pool_acquire(cqrs_docstore_pool_t *pool, int timeout_ms);
void cqrs_docstore_pool_release(cqrs_docstore_pool_t *pool, cqrs_docstore_t *ds);
void cqrs_docstore_pool_destroy(cqrs_docstore_pool_t *pool);

#endif
