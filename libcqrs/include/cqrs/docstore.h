/* docstore.h — the read model in Redis: versioned documents and per-partition applied offsets.
 *
 * Keys are named by keyspace.h: every write of an event touches one shard (its partition's)
 * only — its document, index entries, offset, meta and dead letters — so it is one script on
 * one slot of a Redis Cluster.
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

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cqrs/err.h"
#include "cqrs/keyspace.h"
#include "cqrs/redis.h"

typedef struct cqrs_docstore cqrs_docstore_t;
typedef struct cqrs_docstore_pool cqrs_docstore_pool_t;

/* Every applied document is announced with PUBLISH on the change channel of its deployment
 * and database, "<prefix>:changes:<db>", as "<document name> <version>" (the name: its key
 * without the generation, keyspace.h); "*" means a shard was found empty or a rebuild switched
 * generations (a listener must forget what it knew). See changefeed.h. */
void cqrs_docstore_channel(const char *prefix, int db, char *out, size_t cap);

/* The deployment's key prefix (CQRS_REDIS_PREFIX; keyspace.h). */
const char *cqrs_docstore_prefix(const cqrs_docstore_t *ds);

/* Does not connect; the first call does (redis.h: TLS, AUTH, SELECT). redis is borrowed for
 * the call only. NULL with err on bad Redis settings. */
cqrs_docstore_t *cqrs_docstore_new(const cqrs_redis_config_t *redis, int timeout_ms,
                                   cqrs_error_t *err);
void cqrs_docstore_destroy(cqrs_docstore_t *ds);

/* Reads a document. NOT_FOUND when absent. *json is malloc'ed (caller frees) and may be NULL
 * when json is NULL (version only). */
cqrs_err_t cqrs_docstore_get(cqrs_docstore_t *ds, const char *key, char **json, int64_t *version,
                             cqrs_error_t *err);

typedef enum cqrs_apply_result {
    CQRS_APPLY_APPLIED = 1,   /* written, with its index changes and the offset */
    CQRS_APPLY_DUPLICATE = 0, /* version ≤ stored: skipped, offset still recorded */
    CQRS_APPLY_HELD = 2,      /* the aggregate has dead letters: parked behind them */
    CQRS_APPLY_DEAD = 3,      /* stored as a dead letter (mode DEAD) */
    CQRS_APPLY_GAP = -1,      /* version > stored + 1: parked as a dead letter, aggregate held */
    CQRS_APPLY_RESET = -2,    /* the store lost its data or was replaced (no incarnation, or
                                 another one than the caller's): nothing written */
    CQRS_APPLY_OFFSET_MOVED = -4, /* the partition's stored offset is not the one the caller
                                     expects (a store that lost writes, or another writer):
                                     nothing written */
    CQRS_APPLY_STALE = -5,        /* the document is no longer at the base version the new one
                                     was computed from: recompute; nothing written */
    CQRS_APPLY_GENERATION = -6,   /* a rebuild switched the shard to another generation: learn
                                     it (cqrs_docstore_current_shard); nothing written */
} cqrs_apply_result_t;

/* What an apply does with the partition's recorded offset. */
typedef enum cqrs_offset_mode {
    CQRS_OFFSET_NONE = 0, /* neither checked nor written (cqrsctl dlq retry) */
    CQRS_OFFSET_EXPECT,   /* must equal prev_offset (else OFFSET_MOVED); then set to next_offset */
    CQRS_OFFSET_RAISE,    /* not checked, raised to next_offset (no loss detection: only the
                             CQRS_UNSAFE_NO_LOSS_DETECTION negative control uses it) */
} cqrs_offset_mode_t;

typedef enum cqrs_index_op_kind {
    CQRS_INDEX_ZADD, /* key score member */
    CQRS_INDEX_ZREM, /* key member */
    CQRS_INDEX_SADD, /* key member */
    CQRS_INDEX_SREM, /* key member */
    CQRS_INDEX_HSET, /* key member(field) value */
} cqrs_index_op_kind_t;

/* One change of an index, made in the same script call as the document. */
typedef struct cqrs_index_op {
    cqrs_index_op_kind_t op;
    const char *key;
    double score;       /* ZADD only */
    const char *member; /* the field for HSET */
    const char *value;  /* HSET only */
} cqrs_index_op_t;

/* A growable list of index changes owning its strings. */
typedef struct cqrs_index_ops {
    cqrs_index_op_t *v;
    size_t n, cap;
    char *block; /* the strings (internal) */
    size_t block_used, block_cap;
    bool nomem; /* a change could not be added: the list is incomplete and must not be written */
} cqrs_index_ops_t;

/* Appends a change (strings copied; value may be NULL except for HSET). False, and ops->nomem
 * set for good, when memory ran out: whoever writes the list checks nomem first, since a
 * document written without one of its index changes would leave a list silently wrong. */
bool cqrs_index_ops_add(cqrs_index_ops_t *ops, cqrs_index_op_kind_t op, const char *key,
                        double score, const char *member, const char *value);
void cqrs_index_ops_free(cqrs_index_ops_t *ops);

/* Each shard's meta hash (keyspace.h): "incarnation" (a random id given to a shard when it is
 * found without one: fresh or emptied — a cluster node that lost its data loses its shards'
 * metas with them — or a rebuild's new generation), "created", and "paused_until" while a
 * rebuild switches. Every projector remembers the incarnation of each shard it writes; a write
 * that finds another one (or none) is refused with RESET. */
#define CQRS_INCARNATION_LEN 36

/* Everything one apply writes. Strings are borrowed for the call. */
typedef struct cqrs_apply {
    const char *key;     /* the document */
    int64_t version;     /* the event's aggregate version */
    const char *json;    /* the new document (ignored unless applied) */
    const char *dlq_key; /* this aggregate's dead letters: hash version → event blob */
    const char *aggregate_id;
    const char *blob;   /* the event as JSON, stored when parked or dead-lettered */
    const char *reason; /* why, for a dead letter (mode DEAD) */
    const cqrs_index_op_t *ops;
    size_t n_ops;
    const char *shard; /* the shard prefix (keyspace.h): its meta, offsets, dead-letter index */
    int32_t partition;
    int64_t next_offset; /* the offset after the event's message */
    /* The store incarnation the caller works on; NULL: any (only its presence is checked). */
    const char *incarnation;
    cqrs_offset_mode_t offset_mode;
    int64_t prev_offset; /* EXPECT: the offset the caller last recorded (-1: none) */
    /* The document version json (or the dead letter's reason) was computed from; the write
     * happens only while the stored document is still at it (else STALE). -1 with a NULL json
     * for a dead letter computed from no document (unknown type). */
    int64_t base_version;
} cqrs_apply_t;

/* One Lua script call, atomic. First the store is checked: RESET when its incarnation is not
 * a->incarnation (or absent), OFFSET_MOVED when the partition's offset is not the expected one
 * (mode EXPECT). Then: a version at or below the stored one is a duplicate; an aggregate with
 * dead letters parks the event behind them; a version past stored + 1 is parked as a gap (and
 * holds the aggregate); a document computed from another base version than the stored one is
 * STALE; otherwise the document and its index changes are written. Every outcome past the
 * store check records next_offset as the offset mode says. An empty or absent json is never
 * stored. */
cqrs_err_t cqrs_docstore_apply(cqrs_docstore_t *ds, const cqrs_apply_t *a,
                               cqrs_apply_result_t *result, cqrs_error_t *err);

/* Stores the event as a dead letter with a reason (holding its aggregate), recording the
 * offset; result DEAD, DUPLICATE (already applied) or RESET. */
cqrs_err_t cqrs_docstore_dead_letter(cqrs_docstore_t *ds, const cqrs_apply_t *a,
                                     cqrs_apply_result_t *result, cqrs_error_t *err);

/* Gives a shard an incarnation when it has none (fresh or emptied) and writes the one in force
 * into incarnation (may be NULL; CQRS_INCARNATION_LEN + 1 bytes) and, read in the same script,
 * the partition's recorded offset into *offset (may be NULL; -1 when none). */
cqrs_err_t cqrs_docstore_shard_open(cqrs_docstore_t *ds, const char *shard, int32_t partition,
                                    char *incarnation, int64_t *offset, cqrs_error_t *err);

/* For each of n shards, in one round trip (pipelined; per node on a cluster), atomically per
 * shard: its incarnation ("" when it has none), the recorded offset of partitions[i] (-1 when
 * none) and the generation its pointer names (gens may be NULL). Read-only. */
cqrs_err_t cqrs_docstore_progress(cqrs_docstore_t *ds, const char *const *shards,
                                  const int32_t *partitions, size_t n,
                                  char (*incarnations)[CQRS_INCARNATION_LEN + 1], int64_t *offsets,
                                  int64_t *gens, cqrs_error_t *err);

/* The partition count of a topic as the projector recorded it in <prefix>:layout (how a reader
 * finds an aggregate's shard); NOT_FOUND when none is recorded (nothing projected yet). */
cqrs_err_t cqrs_docstore_layout_get(cqrs_docstore_t *ds, const char *topic, int32_t *partitions,
                                    cqrs_error_t *err);
/* The same, cached for the process (a topic's partition count never changes under a running
 * deployment): Redis is read only until it is known. */
cqrs_err_t cqrs_docstore_partitions(cqrs_docstore_t *ds, const char *topic, int32_t *partitions,
                                    cqrs_error_t *err);
/* The shard prefix of an aggregate of topic (keyspace.h), in the generation readers follow,
 * into shard (cap ≥ CQRS_SHARD_MAX); NOT_FOUND when no layout is recorded for the topic. */
cqrs_err_t cqrs_docstore_shard_of(cqrs_docstore_t *ds, const char *topic, const char *aggregate_id,
                                  char *shard, size_t cap, cqrs_error_t *err);
/* Up to limit members after `after` (NULL: from the start) of each of n lexicographic indexes,
 * in one round trip: members[i] (free each with cqrs_docstore_strings_free) holds counts[i]. */
cqrs_err_t cqrs_docstore_range_many(cqrs_docstore_t *ds, const char *const *keys, size_t n,
                                    const char *after, size_t limit, char ***members,
                                    size_t *counts, cqrs_error_t *err);
/* The current shard prefix of a topic's partition (its generation pointer; keyspace.h). */
cqrs_err_t cqrs_docstore_current_shard(cqrs_docstore_t *ds, const char *topic, int32_t partition,
                                       char *shard, size_t cap, cqrs_error_t *err);

/* The generation a shard's pointer names (1 when it has none), as readers follow it: cached for
 * the process, read again after CQRS_GENERATION_TTL_MS or at once after
 * cqrs_docstore_generations_forget (the change feed's "*": a shard found empty or a rebuild
 * switched); never lower than a value this process used since the last forget. A read that
 * fails answers the last value known, if any. Data and pointer share the shard's slot: a node
 * that loses one loses both. */
#define CQRS_GENERATION_TTL_MS 2000
cqrs_err_t cqrs_docstore_shard_generation(cqrs_docstore_t *ds, const char *topic, int32_t partition,
                                          int64_t *gen, cqrs_error_t *err);
void cqrs_docstore_generations_forget(void);

/* Records it unless one is recorded; *recorded gets the one in force (compare: a topic whose
 * partition count changed moved its aggregates to other partitions). */
cqrs_err_t cqrs_docstore_layout_set(cqrs_docstore_t *ds, const char *topic, int32_t partitions,
                                    int32_t *recorded, cqrs_error_t *err);

/* Partitions re-reading what the store lost: hash <prefix>:refill, "<topic>:<partition>" →
 * the offset the refill runs to. Written by the projector that found the loss, removed when it
 * got there; every cqrs-queryd's readiness reads it. A store emptied again loses the markers
 * with everything else (and the projector marks its partitions again). */
cqrs_err_t cqrs_docstore_refill_set(cqrs_docstore_t *ds, const char *field, int64_t until,
                                    cqrs_error_t *err);
/* NOT_FOUND when the partition is not refilling. */
cqrs_err_t cqrs_docstore_refill_get(cqrs_docstore_t *ds, const char *field, int64_t *until,
                                    cqrs_error_t *err);
cqrs_err_t cqrs_docstore_refill_clear(cqrs_docstore_t *ds, const char *field, cqrs_error_t *err);
/* How many partitions are refilling (one round trip; also a liveness check). */
cqrs_err_t cqrs_docstore_refill_count(cqrs_docstore_t *ds, long long *n, cqrs_error_t *err);

/* Appends a message that could not even be decoded to its shard's list <shard>dlq:undecodable
 * and records a->next_offset for a->partition as the apply does (same store and offset checks;
 * only shard, partition, next_offset, incarnation, offset_mode, prev_offset and blob are
 * used). *result: APPLIED, RESET or OFFSET_MOVED. */
cqrs_err_t cqrs_docstore_undecodable(cqrs_docstore_t *ds, const cqrs_apply_t *a,
                                     cqrs_apply_result_t *result, cqrs_error_t *err);

/* The "json" field of each of n document keys, in one round trip; missing → NULL. */
cqrs_err_t cqrs_docstore_get_many(cqrs_docstore_t *ds, const char *const *keys, size_t n,
                                  char **jsons, cqrs_error_t *err);

void cqrs_docstore_strings_free(char **v, size_t n);

/* In one round trip: whether members[i] is in the sorted set keys[i], for each i. */
cqrs_err_t cqrs_docstore_zcontains_many(cqrs_docstore_t *ds, const char *const *keys,
                                        const char *const *members, size_t n, bool *present,
                                        cqrs_error_t *err);

/* In one round trip: the number of members of each sorted set. */
cqrs_err_t cqrs_docstore_zcard_many(cqrs_docstore_t *ds, const char *const *keys, size_t n,
                                    long long *counts, cqrs_error_t *err);

/* Applied offset (next offset to read) of a partition in its shard; NOT_FOUND when none. */
cqrs_err_t cqrs_docstore_offset(cqrs_docstore_t *ds, const char *shard, int32_t partition,
                                int64_t *offset, cqrs_error_t *err);

cqrs_docstore_pool_t *cqrs_docstore_pool_new(const cqrs_redis_config_t *redis, int timeout_ms,
                                             unsigned size, cqrs_error_t *err);
/* Waits up to timeout_ms for a free connection; NULL on timeout (answer 503). */
cqrs_docstore_t *cqrs_docstore_pool_acquire(cqrs_docstore_pool_t *pool, int timeout_ms);
void cqrs_docstore_pool_release(cqrs_docstore_pool_t *pool, cqrs_docstore_t *ds);
void cqrs_docstore_pool_destroy(cqrs_docstore_pool_t *pool);

/* ---- dead letters (cqrsctl dlq) ----------------------------------------------------------
 * An aggregate's dead letters live in one hash (version → the event as the projector stored
 * it, "<version>:reason" → why) indexed in its shard's <shard>dlq:index (score: when it was
 * first held, ms). While the hash exists the apply script parks the aggregate's events in it. */

typedef struct cqrs_dead_letter {
    int64_t version;
    char *blob;   /* the stored event (JSON text) */
    char *reason; /* NULL when none was stored */
} cqrs_dead_letter_t;

/* The aggregates of a shard with dead letters, oldest first: *ids (free with
 * cqrs_docstore_strings_free) and *since_ms (free) hold *n entries. */
cqrs_err_t cqrs_docstore_dlq_index(cqrs_docstore_t *ds, const char *shard, char ***ids,
                                   int64_t **since_ms, size_t *n, cqrs_error_t *err);

/* One aggregate's dead letters in version order (*n = 0 when none); free with
 * cqrs_docstore_dlq_free. */
cqrs_err_t cqrs_docstore_dlq_get(cqrs_docstore_t *ds, const char *dlq_key, cqrs_dead_letter_t **out,
                                 size_t *n, cqrs_error_t *err);
void cqrs_docstore_dlq_free(cqrs_dead_letter_t *v, size_t n);

/* Runs the apply script for an event held in a->dlq_key as if its aggregate were not held:
 * APPLIED (document, index changes; offsets untouched: use CQRS_OFFSET_NONE) at version =
 * stored + 1, DUPLICATE at or below, RESET when the store lost its data. The dead letter stays
 * until cqrs_docstore_dlq_remove. STATE when the document is no longer at a->base_version
 * (read it again and call again). */
cqrs_err_t cqrs_docstore_apply_held(cqrs_docstore_t *ds, const cqrs_apply_t *a,
                                    cqrs_apply_result_t *result, cqrs_error_t *err);

/* Removes one version (and its reason); when none is left the aggregate is released (its
 * hash is gone and it leaves the index) and *released is true. Atomic. */
cqrs_err_t cqrs_docstore_dlq_remove(cqrs_docstore_t *ds, const char *shard, const char *dlq_key,
                                    const char *aggregate_id, int64_t version, bool *released,
                                    cqrs_error_t *err);

/* Replaces the reason of a version that is still held (nothing when it is gone). */
cqrs_err_t cqrs_docstore_dlq_set_reason(cqrs_docstore_t *ds, const char *dlq_key, int64_t version,
                                        const char *reason, cqrs_error_t *err);

/* Deletes all of an aggregate's dead letters and releases it; *dropped = how many versions.
 * Atomic. */
cqrs_err_t cqrs_docstore_dlq_drop(cqrs_docstore_t *ds, const char *shard, const char *dlq_key,
                                  const char *aggregate_id, size_t *dropped, cqrs_error_t *err);

/* For each of n shards, in one round trip: the aggregates its dead-letter index holds and the
 * length of its list of undecodable messages (either array may be NULL). */
cqrs_err_t cqrs_docstore_dlq_counts(cqrs_docstore_t *ds, const char *const *shards, size_t n,
                                    long long *held, long long *undecodable, cqrs_error_t *err);

/* ---- rebuilds (cqrsctl rebuild) ----
 * A rebuild writes a new generation of a topic's shards beside the live one (keyspace.h), then
 * switches each shard, then the topic's generation for readers, and deletes the old one. The
 * same calls serve a single Redis and a cluster (one shard at a time: one slot). */

typedef struct cqrs_dead_letter_put {
    int64_t version;
    const char *blob;
    const char *reason;
} cqrs_dead_letter_put_t;

/* One aggregate's final state for a bulk write: the document (json NULL: none), the index
 * changes, and events that could not be applied (dead letters, holding the aggregate). */
typedef struct cqrs_bulk_doc {
    const char *shard; /* of the aggregate (its dead-letter index) */
    const char *key;
    int64_t version;
    const char *json;
    const cqrs_index_op_t *ops;
    size_t n_ops;
    const char *aggregate_id;
    const char *dlq_key;
    const cqrs_dead_letter_put_t *dead;
    size_t n_dead;
} cqrs_bulk_doc_t;

/* Writes with plain pipelined commands, not atomically: only for keys nothing else writes (a
 * rebuild's new generation). On a single server the replies are read later — by the next bulk
 * write, cqrs_docstore_bulk_sync or any other call — so Redis works while the caller prepares
 * the next batch; an error of an earlier batch is returned by the next bulk write or sync. On a
 * cluster each batch is one pipeline per node, read at once. */
cqrs_err_t cqrs_docstore_bulk_write(cqrs_docstore_t *ds, const cqrs_bulk_doc_t *docs, size_t n,
                                    cqrs_error_t *err);
/* Reads every outstanding reply; the first error of the bulk writes since the last sync. */
cqrs_err_t cqrs_docstore_bulk_sync(cqrs_docstore_t *ds, cqrs_error_t *err);

/* Pauses (for_ms > 0: for that many ms of the server's clock from now) or resumes (0) the
 * writes into each of n shards (their meta's paused_until, which every write script honours):
 * one script per shard; tokens[i] (may be NULL) gets shard i's deadline, the token its switch
 * checks. */
cqrs_err_t cqrs_docstore_pause(cqrs_docstore_t *ds, const char *const *shards, size_t n,
                               int64_t for_ms, int64_t *tokens, cqrs_error_t *err);

/* Switches a shard from generation `from` to `to` (shard prefixes of the same shard): the new
 * generation takes the old one's incarnation and carries no pause; the pointer is set. Only
 * while the pause with deadline token is still the one in force in `from` and still ahead in
 * the server's clock (else TIMEOUT, nothing switched) — unless force (a switch that must go on
 * once others switched: writes the old generation took after its pause lapsed show as an
 * offset the new one does not hold, which the projector re-applies). */
cqrs_err_t cqrs_docstore_switch_shard(cqrs_docstore_t *ds, const char *from, const char *to,
                                      int64_t token, bool force, cqrs_error_t *err);

/* Copies the keys of shard `from` matching <from><glob> to the same names under `to`
 * (COPY … REPLACE: same slot), scanning every node — or, when glob has no wildcard, the one
 * key, without a scan; *copied counts them. */
cqrs_err_t cqrs_docstore_copy_shard_keys(cqrs_docstore_t *ds, const char *from, const char *to,
                                         const char *glob, size_t *copied, cqrs_error_t *err);

/* Deletes every key matching pattern (SCAN on every node, each page's UNLINKs pipelined) and,
 * when n_prefixes > 0, starting with one of prefixes (literally): one walk of the keyspace for
 * the keys of many shards. *deleted counts them. */
cqrs_err_t cqrs_docstore_delete_keys(cqrs_docstore_t *ds, const char *pattern,
                                     const char *const *prefixes, size_t n_prefixes,
                                     size_t *deleted, cqrs_error_t *err);

/* A lease <prefix>:<name> held by token for ttl_ms (taken when free or ours, renewed when
 * ours): CONFLICT, with *other_left_ms, when another token holds it. */
cqrs_err_t cqrs_docstore_lease(cqrs_docstore_t *ds, const char *name, const char *token,
                               int64_t ttl_ms, int64_t *other_left_ms, cqrs_error_t *err);
/* Gives the lease up if token holds it. */
cqrs_err_t cqrs_docstore_unlease(cqrs_docstore_t *ds, const char *name, const char *token,
                                 cqrs_error_t *err);
/* A set of names <prefix>:<name> (a rebuild's generations to delete): add, remove, read
 * (*members: free with cqrs_docstore_strings_free). */
cqrs_err_t cqrs_docstore_names_add(cqrs_docstore_t *ds, const char *name, const char *member,
                                   cqrs_error_t *err);
cqrs_err_t cqrs_docstore_names_remove(cqrs_docstore_t *ds, const char *name, const char *member,
                                      cqrs_error_t *err);
cqrs_err_t cqrs_docstore_names(cqrs_docstore_t *ds, const char *name, char ***members, size_t *n,
                               cqrs_error_t *err);

/* PUBLISHes "*" on ds's change channel: listeners forget what they derived (and the
 * generations they follow). */
cqrs_err_t cqrs_docstore_announce_reset(cqrs_docstore_t *ds, cqrs_error_t *err);
/* Adds an aggregate to its shard's dead-letter index (held since since_ms) unless it is there. */
cqrs_err_t cqrs_docstore_dlq_index_add(cqrs_docstore_t *ds, const char *shard,
                                       const char *aggregate_id, int64_t since_ms,
                                       cqrs_error_t *err);

/* A bounded walk of a lexicographic index (as cqrs_docstore_range_many), in one Lua call, keeping
 * the members that end with suffix (NULL or "": all) and whose id — id_len bytes ending id_skip
 * bytes before the member's end — is in every set in sets. When there are sets and the smallest
 * has at most small_max members (or one set is empty), the index is not walked: *small is set
 * and *items holds pairs
 * (id, its field in the hash records — absent ones left out) for every id in all the sets, in
 * no order (cost O(smallest); the caller places, filters and sorts them). Otherwise at most
 * budget members are looked at from `after`: *items holds up to limit matches in order, and
 * *next (malloc'ed, NULL at the end of the index) where to continue — past the last match
 * when more matches follow, else the last member looked at (so *n may be below limit with
 * more to come). All keys must be in one slot. Free *items with cqrs_docstore_strings_free. */
typedef struct cqrs_walk {
    const char *index;
    const char *records; /* NULL: no small path (then small_max is moot) */
    const char *const *sets;
    size_t n_sets;
    const char *after;
    size_t limit, budget, small_max;
    const char *suffix;
    size_t id_len, id_skip;
} cqrs_walk_t;

cqrs_err_t cqrs_docstore_walk(cqrs_docstore_t *ds, const cqrs_walk_t *q, char ***items, size_t *n,
                              char **next, bool *small, cqrs_error_t *err);

#endif
