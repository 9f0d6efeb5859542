/* docstore.c — versioned documents in Redis (hiredis; connections made by redis.c).
 *
 * Invariants: a document's version only ever grows by exactly one per applied event; a
 * partition's recorded offset only ever grows; both change in the same Lua script call, so a
 * crash can never leave one without the other.
 *
 * Each connection is used by one thread at a time. Commands go through rcluster.h: to the one
 * server, or on a Redis Cluster to the node serving the slot of their first key (every write
 * touches the keys of one shard: one slot). After a transport error the connection is dropped
 * and made again on the next call (the apply is idempotent, so redoing it is safe). The bulk
 * writes of a rebuild use a connection of their own, to a single server only (their replies
 * are read later; every other call reads them first, so order is kept).
 */
#include "cqrs/docstore.h"
#include "cqrs/failpoint.h"

#include <errno.h>
#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <openssl/evp.h>

#include "cqrs/keyspace.h"
#include "cqrs/rcluster.h"
#include "cqrs/redis.h"
#include "cqrs/util.h"

/* Lua: returns -3 while a rebuild's pause lies ahead — the meta hash (META, a KEYS reference)
 * field paused_until, in ms of the Redis clock. Shared by every script that writes the read
 * model, so none slips a write into the switch. */
#define PAUSE_CHECK_LUA(META)                                                                      \
    "local pause = redis.call('HGET', " META ", 'paused_until')\n"                                 \
    "if pause then\n"                                                                              \
    "  local t = redis.call('TIME')\n"                                                             \
    "  if tonumber(pause) > tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) then\n"      \
    "    return -3\n"                                                                              \
    "  end\n"                                                                                      \
    "end\n"

/* Lua: the store check every script that writes the read model for a projector starts with.
 * -2 when the meta hash (META) has no incarnation — a fresh, emptied or legacy store; "*" is
 * announced on the change channel (CHANNEL) so readers forget what they derived — or another
 * one than the caller's (INC; '' accepts any: cqrsctl). */
#define STORE_CHECK_LUA(META, INC, CHANNEL)                                                        \
    "local inc = redis.call('HGET', " META ", 'incarnation')\n"                                    \
    "if not inc then redis.call('PUBLISH', " CHANNEL ", '*') return -2 end\n"                      \
    "if " INC " ~= '' and " INC " ~= inc then return -2 end\n"

/* Lua: the partition's recorded offset (OFFSETS hash, field PART) under offset mode MODE
 * (none|expect|raise). In mode expect it must be PREV (-1: none), else -4: the store lost
 * writes (a failover to a replica that missed them, a restart that lost its last second) or
 * someone else records this partition. Defines mark(), which records NEXT as the mode says. */
#define OFFSET_CHECK_LUA(OFFSETS, PART, MODE, PREV, NEXT)                                          \
    "local stored = tonumber(redis.call('HGET', " OFFSETS ", " PART ") or '-1')\n"                 \
    "if " MODE " == 'expect' and stored ~= tonumber(" PREV ") then return -4 end\n"                \
    "local function mark()\n"                                                                      \
    "  if " MODE " == 'expect' or (" MODE " == 'raise' and tonumber(" NEXT ") > stored) then\n"    \
    "    redis.call('HSET', " OFFSETS ", " PART ", " NEXT ")\n"                                    \
    "  end\n"                                                                                      \
    "end\n"

/* Lua: -6 when the shard's generation pointer (PTR, absent: 1) is not GEN — a rebuild
 * switched the shard to another generation: the caller learns the new one (keyspace.h). */
#define GENERATION_CHECK_LUA(PTR, GEN)                                                             \
    "if (redis.call('GET', " PTR ") or '1') ~= " GEN " then return -6 end\n"

/* KEYS: 1 document, 2 offsets, 3 dead letters of the aggregate, 4 dead-letter index,
 *       5 meta, 6 the shard's generation pointer, 7… index keys
 * ARGV: 1 mode (apply|dead), 2 version, 3 document, 4 partition, 5 next offset, 6 event blob,
 *       7 aggregate id, 8 now (ms), 9 reason, 10 number of index ops, 11 change channel,
 *       12 incarnation, 13 offset mode, 14 expected offset, 15 base version ('' none),
 *       16 the generation the keys belong to, 17 the document's name (keyspace.h, announced),
 *       then per op: op (ZADD|ZREM|SADD|SREM|HSET), key number, score, member, value
 * An applied document is announced on the change channel as "<key> <version>". While the meta
 * hash's paused_until (ms, Redis clock) lies ahead, nothing is applied (-3): a rebuild is
 * switching generations. A document (or a dead letter's reason) computed from another version
 * than the stored one is refused (-5): the caller recomputes. */
static const char APPLY_LUA[] = GENERATION_CHECK_LUA("KEYS[6]", "ARGV[16]")
    STORE_CHECK_LUA("KEYS[5]", "ARGV[12]", "ARGV[11]") PAUSE_CHECK_LUA("KEYS[5]") OFFSET_CHECK_LUA(
        "KEYS[2]", "ARGV[4]", "ARGV[13]", "ARGV[14]",
        "ARGV[5]") "local cur = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')\n"
                   "local v = tonumber(ARGV[2])\n"
                   "if v <= cur then mark() return 0 end\n"
                   "local held = redis.call('EXISTS', KEYS[3]) == 1\n"
                   "if v == cur + 1 and not held then\n"
                   "  local base = tonumber(ARGV[15])\n"
                   "  if ARGV[1] == 'apply' and (base ~= cur or ARGV[3] == '') then return -5 end\n"
                   "  if ARGV[1] == 'dead' and base and base ~= cur then return -5 end\n"
                   "end\n"
                   "if ARGV[1] == 'dead' or held or v > cur + 1 then\n"
                   "  local code, reason = 3, ARGV[9]\n"
                   "  if ARGV[1] ~= 'dead' then\n"
                   "    if held then code, reason = 2, 'waiting behind an earlier dead letter of "
                   "its aggregate'\n"
                   "    else code, reason = -1, 'gap: the document is at version ' .. cur end\n"
                   "  end\n"
                   "  redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[6])\n"
                   "  redis.call('HSETNX', KEYS[3], ARGV[2] .. ':reason', reason)\n"
                   "  redis.call('ZADD', KEYS[4], 'NX', ARGV[8], ARGV[7])\n"
                   "  mark()\n"
                   "  return code\n"
                   "end\n"
                   "redis.call('HSET', KEYS[1], 'v', ARGV[2], 'json', ARGV[3])\n"
                   "local i = 18\n"
                   "for _ = 1, tonumber(ARGV[10]) do\n"
                   "  local op, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]\n"
                   "  if op == 'ZADD' then redis.call('ZADD', key, ARGV[i + 2], ARGV[i + 3])\n"
                   "  elseif op == 'HSET' then redis.call('HSET', key, ARGV[i + 3], ARGV[i + 4])\n"
                   "  else redis.call(op, key, ARGV[i + 3]) end\n"
                   "  i = i + 5\n"
                   "end\n"
                   "mark()\n"
                   "redis.call('PUBLISH', ARGV[11], ARGV[17] .. ' ' .. ARGV[2])\n"
                   "return 1\n";

static const char *const OFFSET_MODES[] = {"none", "expect", "raise"};

struct cqrs_docstore {
    cqrs_redis_target_t target; /* where and how to connect (redis.h) */
    int timeout_ms;
    cqrs_rconn_t *rc;   /* the commands' connection (one server or a cluster) */
    redisContext *bulk; /* bulk writes (single server only); NULL: not connected */
    char sha[41];       /* of APPLY_LUA */
    char channel[CQRS_REDIS_PREFIX_MAX + 32];
    /* bulk writes whose replies are not read yet, and the first error among those read */
    size_t deferred;
    cqrs_err_t deferred_rc;
    cqrs_error_t deferred_err;
};

cqrs_docstore_t *cqrs_docstore_new(const cqrs_redis_config_t *redis, int timeout_ms,
                                   cqrs_error_t *err)
{
    cqrs_docstore_t *ds = calloc(1, sizeof *ds);
    if (!ds) {
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    if (cqrs_redis_target_init(&ds->target, redis, err) != CQRS_ERR_OK) {
        cqrs_redis_target_close(&ds->target);
        free(ds);
        return NULL;
    }
    ds->timeout_ms = timeout_ms > 0 ? timeout_ms : 2000;
    cqrs_docstore_channel(ds->target.prefix, ds->target.addr.db, ds->channel, sizeof ds->channel);
    ds->rc = cqrs_rconn_new(&ds->target, ds->timeout_ms);
    /* EVALSHA names the script by its SHA-1; on NOSCRIPT the script itself is sent (EVAL, to
     * the node of its keys, which caches it): no SCRIPT LOAD, which a cluster would run on
     * one node only. */
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (!ds->rc || !EVP_Digest(APPLY_LUA, strlen(APPLY_LUA), md, &mdlen, EVP_sha1(), NULL) ||
        mdlen != 20) {
        cqrs_docstore_destroy(ds);
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    for (unsigned i = 0; i < mdlen; i++)
        snprintf(ds->sha + 2 * i, 3, "%02x", md[i]);
    return ds;
}

void cqrs_docstore_channel(const char *prefix, int db, char *out, size_t cap)
{
    /* Pub/sub is server-wide (cluster-wide on a cluster): the prefix and the database number
     * keep deployments apart. */
    char name[32];
    snprintf(name, sizeof name, "changes:%d", db);
    cqrs_keys_global(prefix, name, out, cap);
}

const char *cqrs_docstore_prefix(const cqrs_docstore_t *ds)
{
    return ds->target.prefix;
}

static void bulk_disconnect(cqrs_docstore_t *ds)
{
    if (ds->bulk) {
        redisFree(ds->bulk);
        ds->bulk = NULL;
    }
}

void cqrs_docstore_destroy(cqrs_docstore_t *ds)
{
    if (!ds)
        return;
    bulk_disconnect(ds);
    cqrs_rconn_free(ds->rc);
    cqrs_redis_target_close(&ds->target);
    free(ds);
}

/* Runs a command; on a transport error drops the connection. Caller frees the reply. */
static cqrs_err_t command(cqrs_docstore_t *ds, int argc, const char **argv, const size_t *lens,
                          redisReply **out, cqrs_error_t *err);

static void settle(cqrs_docstore_t *ds);

static void connect_ds(cqrs_docstore_t *ds)
{
    if (ds->deferred)
        settle(ds); /* replies of earlier bulk writes come before anything else */
}

/* The key a command is routed by (cluster): the first key of a script, the key of the others;
 * NULL for commands of no key (PUBLISH, SCAN, DBSIZE, FLUSHDB, SWAPDB: any node). */
static const char *route_of(int argc, const char *const *argv)
{
    const char *c = argv[0];
    if (strcasecmp(c, "EVAL") == 0 || strcasecmp(c, "EVALSHA") == 0)
        return argc > 3 && strcmp(argv[2], "0") != 0 ? argv[3] : NULL;
    if (strcasecmp(c, "PUBLISH") == 0 || strcasecmp(c, "SCAN") == 0 ||
        strcasecmp(c, "DBSIZE") == 0 || strcasecmp(c, "FLUSHDB") == 0 ||
        strcasecmp(c, "SWAPDB") == 0 || argc < 2)
        return NULL;
    return argv[1];
}

/* The code of an error reply: LOADING, BUSY, MASTERDOWN, READONLY are transient states of a
 * healthy server; NOSCRIPT is handled by the caller. */
static cqrs_err_t reply_error_code(const char *msg)
{
    if (strncmp(msg, "NOSCRIPT", 8) == 0)
        return CQRS_ERR_STATE;
    if (strncmp(msg, "LOADING", 7) == 0 || strncmp(msg, "BUSY", 4) == 0 ||
        strncmp(msg, "MASTERDOWN", 10) == 0 || strncmp(msg, "READONLY", 8) == 0)
        return CQRS_ERR_UNAVAILABLE;
    return CQRS_ERR_INTERNAL;
}

static cqrs_err_t command(cqrs_docstore_t *ds, int argc, const char **argv, const size_t *lens,
                          redisReply **out, cqrs_error_t *err)
{
    *out = NULL;
    connect_ds(ds);
    redisReply *r = NULL;
    cqrs_err_t rc = cqrs_rconn_command(ds->rc, route_of(argc, argv), argc, argv, lens, &r, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    if (r->type == REDIS_REPLY_ERROR) {
        cqrs_err_t code = reply_error_code(r->str);
        cqrs_error_set(err, code, "Redis: %s", r->str);
        freeReplyObject(r);
        return code;
    }
    *out = r;
    return CQRS_ERR_OK;
}

cqrs_err_t cqrs_docstore_get(cqrs_docstore_t *ds, const char *key, char **json, int64_t *version,
                             cqrs_error_t *err)
{
    if (json)
        *json = NULL;
    const char *argv[] = {"HMGET", key, "v", "json"};
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, 4, argv, NULL, &r, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
        rc = cqrs_error_set(err, CQRS_ERR_INTERNAL, "Redis: unexpected HMGET reply");
    } else if (r->element[0]->type != REDIS_REPLY_STRING ||
               r->element[1]->type != REDIS_REPLY_STRING) {
        rc = cqrs_error_set(err, CQRS_ERR_NOT_FOUND, "no document %s", key);
    } else if (!cqrs_parse_int64(r->element[0]->str, version)) {
        rc = cqrs_error_set(err, CQRS_ERR_INTERNAL, "document %s has a bad version", key);
    } else if (json) {
        *json = strndup(r->element[1]->str, r->element[1]->len);
        if (!*json)
            rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    }
    freeReplyObject(r);
    return rc;
}

/* The integer reply of a script that writes the read model: -3 (paused) → RETRY. */
static cqrs_err_t script_result(const redisReply *r, cqrs_apply_result_t *result, cqrs_error_t *err)
{
    if (r->type == REDIS_REPLY_INTEGER && r->integer == -3)
        return cqrs_error_set(err, CQRS_ERR_RETRY,
                              "the read model is paused while a rebuild switches generations");
    if (r->type != REDIS_REPLY_INTEGER || r->integer < -6 || r->integer > 3)
        return cqrs_error_set(err, CQRS_ERR_INTERNAL, "Redis: unexpected script reply");
    *result = (cqrs_apply_result_t)r->integer;
    return CQRS_ERR_OK;
}

static cqrs_err_t run_apply(cqrs_docstore_t *ds, const cqrs_apply_t *a, bool dead,
                            cqrs_apply_result_t *result, cqrs_error_t *err)
{
    size_t nkeys = 6 + a->n_ops, nargs = 17 + 5 * a->n_ops;
    size_t argc = 3 + nkeys + nargs;
    const char **argv = calloc(argc, sizeof *argv);
    char(*num)[32] = calloc(8 + 2 * a->n_ops, sizeof *num);
    if (!argv || !num) {
        free(argv);
        free(num);
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    }
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    snprintf(num[0], 32, "%zu", nkeys);
    snprintf(num[1], 32, "%lld", (long long)a->version);
    snprintf(num[2], 32, "%d", a->partition);
    snprintf(num[3], 32, "%lld", (long long)a->next_offset);
    snprintf(num[4], 32, "%lld", (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000);
    snprintf(num[5], 32, "%zu", a->n_ops);
    snprintf(num[6], 32, "%lld", (long long)(a->prev_offset < 0 ? -1 : a->prev_offset));
    if (a->base_version >= 0)
        snprintf(num[7], 32, "%lld", (long long)a->base_version);
    char offsets[CQRS_KEY_MAX], dlq_index[CQRS_KEY_MAX], meta[CQRS_KEY_MAX], ptr[CQRS_KEY_MAX];
    char gen[24], name[CQRS_KEY_MAX];
    int64_t g = 0;
    cqrs_keys_name(a->key ? a->key : "", name, sizeof name);
    size_t sl = strlen(a->shard);
    /* Every key of one apply in the shard (and generation) whose checks it runs. */
    bool inside = a->key && strncmp(a->key, a->shard, sl) == 0 && a->dlq_key &&
                  strncmp(a->dlq_key, a->shard, sl) == 0;
    for (size_t i = 0; inside && i < a->n_ops; i++)
        inside = strncmp(a->ops[i].key, a->shard, sl) == 0;
    if (!inside || !cqrs_keys_shard_parse(a->shard, ptr, sizeof ptr, &g)) {
        free(argv);
        free(num);
        return cqrs_error_set(err, CQRS_ERR_INTERNAL,
                              "an apply's keys must all be of its shard %.80s", a->shard);
    }
    snprintf(gen, sizeof gen, "%lld", (long long)g);
    cqrs_keys_in(a->shard, CQRS_SHARD_OFFSETS, offsets, sizeof offsets);
    cqrs_keys_in(a->shard, CQRS_SHARD_DLQ_INDEX, dlq_index, sizeof dlq_index);
    cqrs_keys_in(a->shard, CQRS_SHARD_META, meta, sizeof meta);
    size_t k = 0;
    argv[k++] = "EVALSHA";
    argv[k++] = NULL; /* the script's sha, set below */
    argv[k++] = num[0];
    argv[k++] = a->key;
    argv[k++] = offsets;
    argv[k++] = a->dlq_key;
    argv[k++] = dlq_index;
    argv[k++] = meta;
    argv[k++] = ptr;
    for (size_t i = 0; i < a->n_ops; i++)
        argv[k++] = a->ops[i].key;
    argv[k++] = dead ? "dead" : "apply";
    argv[k++] = num[1];
    argv[k++] = a->json ? a->json : "";
    argv[k++] = num[2];
    argv[k++] = num[3];
    argv[k++] = a->blob ? a->blob : "{}";
    argv[k++] = a->aggregate_id ? a->aggregate_id : "";
    argv[k++] = num[4];
    argv[k++] = a->reason ? a->reason : "";
    argv[k++] = num[5];
    argv[k++] = ds->channel;
    argv[k++] = a->incarnation ? a->incarnation : "";
    argv[k++] = OFFSET_MODES[a->offset_mode];
    argv[k++] = num[6];
    argv[k++] = num[7]; /* '' when no base */
    argv[k++] = gen;
    argv[k++] = name;
    for (size_t i = 0; i < a->n_ops; i++) {
        char *keyno = num[8 + 2 * i], *score = num[9 + 2 * i];
        snprintf(keyno, 32, "%zu", 7 + i);
        snprintf(score, 32, "%.17g", a->ops[i].score);
        static const char *const names[] = {"ZADD", "ZREM", "SADD", "SREM", "HSET"};
        argv[k++] = names[a->ops[i].op];
        argv[k++] = keyno;
        argv[k++] = score;
        argv[k++] = a->ops[i].member;
        argv[k++] = a->ops[i].value ? a->ops[i].value : "";
    }
    argv[1] = ds->sha;
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, (int)k, argv, NULL, &r, err);
    if (rc == CQRS_ERR_STATE) {
        /* NOSCRIPT: this node never ran it, restarted or flushed its script cache. */
        argv[0] = "EVAL";
        argv[1] = APPLY_LUA;
        rc = command(ds, (int)k, argv, NULL, &r, err);
    }
    if (rc == CQRS_ERR_OK) {
        rc = script_result(r, result, err);
        freeReplyObject(r);
    }
    free(argv);
    free(num);
    return rc;
}

cqrs_err_t cqrs_docstore_apply(cqrs_docstore_t *ds, const cqrs_apply_t *a,
                               cqrs_apply_result_t *result, cqrs_error_t *err)
{
    return run_apply(ds, a, false, result, err);
}

cqrs_err_t cqrs_docstore_dead_letter(cqrs_docstore_t *ds, const cqrs_apply_t *a,
                                     cqrs_apply_result_t *result, cqrs_error_t *err)
{
    return run_apply(ds, a, true, result, err);
}

/* KEYS: 1 meta, 2 offsets, 3 generation pointer. ARGV: 1 a new incarnation, 2 now (s),
 * 3 change channel, 4 partition, 5 generation. Returns {the incarnation in force, the
 * partition's offset or false}, or -6 when the shard is at another generation. A shard given
 * one was empty (or is new): "*" tells readers to forget what they derived. */
static const char SHARD_OPEN_LUA[] = GENERATION_CHECK_LUA(
    "KEYS[3]", "ARGV[5]") "redis.call('HSETNX', KEYS[1], 'created', ARGV[2])\n"
                          "if redis.call('HSETNX', KEYS[1], 'incarnation', ARGV[1]) == 1 then\n"
                          "  redis.call('PUBLISH', ARGV[3], '*')\n"
                          "end\n"
                          "return {redis.call('HGET', KEYS[1], 'incarnation'), redis.call('HGET', "
                          "KEYS[2], ARGV[4])}\n";

/* An offset from a reply element: -1 unless a number. */
static int64_t reply_offset(const redisReply *e)
{
    int64_t v;
    return e && e->type == REDIS_REPLY_STRING && cqrs_parse_int64(e->str, &v) ? v : -1;
}

cqrs_err_t cqrs_docstore_shard_open(cqrs_docstore_t *ds, const char *shard, int32_t partition,
                                    char *incarnation, int64_t *offset, cqrs_error_t *err)
{
    char fresh[CQRS_UUID_LEN + 1], now[32], part[12], meta[CQRS_KEY_MAX], offsets[CQRS_KEY_MAX];
    char ptr[CQRS_KEY_MAX], gen[24];
    int64_t g = 0;
    if (!cqrs_keys_shard_parse(shard, ptr, sizeof ptr, &g))
        return cqrs_error_set(err, CQRS_ERR_INTERNAL, "not a shard prefix: %.80s", shard);
    snprintf(gen, sizeof gen, "%lld", (long long)g);
    cqrs_uuid_v4(fresh);
    snprintf(now, sizeof now, "%lld", (long long)time(NULL));
    snprintf(part, sizeof part, "%d", partition);
    cqrs_keys_in(shard, CQRS_SHARD_META, meta, sizeof meta);
    cqrs_keys_in(shard, CQRS_SHARD_OFFSETS, offsets, sizeof offsets);
    const char *argv[] = {"EVAL", SHARD_OPEN_LUA, "3",  meta, offsets, ptr, fresh,
                          now,    ds->channel,    part, gen};
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, 11, argv, NULL, &r, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    if (r->type == REDIS_REPLY_INTEGER && r->integer == -6)
        rc = cqrs_error_set(err, CQRS_ERR_STATE, "the shard moved to another generation");
    else if (r->type != REDIS_REPLY_ARRAY || r->elements < 1 ||
             r->element[0]->type != REDIS_REPLY_STRING ||
             r->element[0]->len > CQRS_INCARNATION_LEN) {
        rc = cqrs_error_set(err, CQRS_ERR_INTERNAL, "Redis: unexpected incarnation reply");
    } else {
        if (incarnation)
            snprintf(incarnation, CQRS_INCARNATION_LEN + 1, "%s", r->element[0]->str);
        if (offset)
            *offset = reply_offset(r->elements > 1 ? r->element[1] : NULL);
    }
    freeReplyObject(r);
    return rc;
}

/* KEYS: 1 meta, 2 offsets, 3 generation pointer. ARGV: 1 partition.
 * {incarnation or false, offset or false, generation or false}. */
static const char PROGRESS_LUA[] =
    "return {redis.call('HGET', KEYS[1], 'incarnation'), redis.call('HGET', KEYS[2], ARGV[1]),"
    " redis.call('GET', KEYS[3])}\n";

typedef struct progress_out {
    char (*incarnations)[CQRS_INCARNATION_LEN + 1];
    int64_t *offsets, *gens;
} progress_out_t;

static void read_progress(const redisReply *r, size_t i, void *ud)
{
    progress_out_t *o = ud;
    o->incarnations[i][0] = '\0';
    o->offsets[i] = -1;
    if (o->gens)
        o->gens[i] = 1;
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 3)
        return;
    if (o->gens && reply_offset(r->element[2]) >= 1)
        o->gens[i] = reply_offset(r->element[2]);
    const redisReply *inc = r->element[0];
    if (inc->type == REDIS_REPLY_STRING && inc->len <= CQRS_INCARNATION_LEN)
        snprintf(o->incarnations[i], CQRS_INCARNATION_LEN + 1, "%s", inc->str);
    o->offsets[i] = reply_offset(r->element[1]);
}

static cqrs_err_t pipeline(cqrs_docstore_t *ds, size_t n, int argc, const char *const *argv,
                           void (*fn)(const redisReply *r, size_t i, void *ud), void *ud,
                           cqrs_error_t *err);

cqrs_err_t cqrs_docstore_progress(cqrs_docstore_t *ds, const char *const *shards,
                                  const int32_t *partitions, size_t n,
                                  char (*incarnations)[CQRS_INCARNATION_LEN + 1], int64_t *offsets,
                                  int64_t *gens, cqrs_error_t *err)
{
    if (n == 0)
        return CQRS_ERR_OK;
    const int argc = 7;
    const char **argv = calloc(n * (size_t)argc, sizeof *argv);
    char(*keys)[3][CQRS_KEY_MAX] = calloc(n, sizeof *keys);
    char(*parts)[12] = calloc(n, sizeof *parts);
    cqrs_err_t rc;
    if (!argv || !keys || !parts) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        cqrs_keys_in(shards[i], CQRS_SHARD_META, keys[i][0], sizeof keys[i][0]);
        cqrs_keys_in(shards[i], CQRS_SHARD_OFFSETS, keys[i][1], sizeof keys[i][1]);
        if (!cqrs_keys_shard_parse(shards[i], keys[i][2], sizeof keys[i][2], NULL))
            snprintf(keys[i][2], sizeof keys[i][2], "%s", keys[i][0]); /* not a shard: no gen */
        snprintf(parts[i], sizeof parts[i], "%d", partitions[i]);
        const char **a = argv + i * (size_t)argc;
        a[0] = "EVAL";
        a[1] = PROGRESS_LUA;
        a[2] = "3";
        a[3] = keys[i][0];
        a[4] = keys[i][1];
        a[5] = keys[i][2];
        a[6] = parts[i];
    }
    progress_out_t o = {incarnations, offsets, gens};
    rc = pipeline(ds, n, argc, argv, read_progress, &o, err);
out:
    free(argv);
    free(keys);
    free(parts);
    return rc;
}

static cqrs_err_t command_int(cqrs_docstore_t *ds, int argc, const char **argv, long long *out,
                              cqrs_error_t *err);

/* HGET <prefix>:<name> field as a number: -1 in *out when absent or not a number. */
static cqrs_err_t global_hget_int(cqrs_docstore_t *ds, const char *name, const char *field,
                                  int64_t *out, cqrs_error_t *err)
{
    char key[CQRS_KEY_MAX];
    cqrs_keys_global(ds->target.prefix, name, key, sizeof key);
    const char *argv[] = {"HGET", key, field};
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, 3, argv, NULL, &r, err);
    if (rc == CQRS_ERR_OK)
        *out = reply_offset(r);
    freeReplyObject(r);
    return rc;
}

cqrs_err_t cqrs_docstore_layout_get(cqrs_docstore_t *ds, const char *topic, int32_t *partitions,
                                    cqrs_error_t *err)
{
    int64_t v = -1;
    cqrs_err_t rc = global_hget_int(ds, "layout", topic, &v, err);
    if (rc == CQRS_ERR_OK && (v < 1 || v > CQRS_MAX_SHARDS))
        rc = cqrs_error_set(err, CQRS_ERR_NOT_FOUND, "no layout recorded for %s", topic);
    else if (rc == CQRS_ERR_OK)
        *partitions = (int32_t)v;
    return rc;
}

/* Partition counts learned from layouts, per deployment prefix, database and topic. */
#define LAYOUT_CACHE 64
static struct {
    char key[CQRS_REDIS_PREFIX_MAX + 280];
    int32_t n;
} layout_cache[LAYOUT_CACHE];
static size_t layout_cached;
static pthread_mutex_t layout_lock = PTHREAD_MUTEX_INITIALIZER;

cqrs_err_t cqrs_docstore_partitions(cqrs_docstore_t *ds, const char *topic, int32_t *partitions,
                                    cqrs_error_t *err)
{
    char key[sizeof layout_cache[0].key];
    snprintf(key, sizeof key, "%s/%d/%s", ds->target.prefix, ds->target.addr.db, topic);
    pthread_mutex_lock(&layout_lock);
    for (size_t i = 0; i < layout_cached; i++)
        if (strcmp(layout_cache[i].key, key) == 0) {
            *partitions = layout_cache[i].n;
            pthread_mutex_unlock(&layout_lock);
            return CQRS_ERR_OK;
        }
    pthread_mutex_unlock(&layout_lock);
    cqrs_err_t rc = cqrs_docstore_layout_get(ds, topic, partitions, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    pthread_mutex_lock(&layout_lock);
    if (layout_cached < LAYOUT_CACHE) {
        snprintf(layout_cache[layout_cached].key, sizeof layout_cache[0].key, "%s", key);
        layout_cache[layout_cached++].n = *partitions;
    }
    pthread_mutex_unlock(&layout_lock);
    return CQRS_ERR_OK;
}

cqrs_err_t cqrs_docstore_shard_of(cqrs_docstore_t *ds, const char *topic, const char *aggregate_id,
                                  char *shard, size_t cap, cqrs_error_t *err)
{
    int32_t n = 0;
    int64_t gen = 1;
    cqrs_err_t rc = cqrs_docstore_partitions(ds, topic, &n, err);
    int32_t p = rc == CQRS_ERR_OK ? cqrs_keys_partition(aggregate_id, n) : 0;
    if (rc == CQRS_ERR_OK)
        rc = cqrs_docstore_shard_generation(ds, topic, p, &gen, err);
    if (rc == CQRS_ERR_OK)
        cqrs_keys_shard_gen(ds->target.prefix, topic, p, gen, shard, cap);
    return rc;
}

cqrs_err_t cqrs_docstore_current_shard(cqrs_docstore_t *ds, const char *topic, int32_t partition,
                                       char *shard, size_t cap, cqrs_error_t *err)
{
    char base[CQRS_SHARD_MAX], ptr[CQRS_KEY_MAX];
    cqrs_keys_shard(ds->target.prefix, topic, partition, base, sizeof base);
    cqrs_keys_shard_parse(base, ptr, sizeof ptr, NULL);
    const char *argv[] = {"GET", ptr};
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, 2, argv, NULL, &r, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    int64_t gen = 1;
    if (r->type == REDIS_REPLY_STRING && (!cqrs_parse_int64(r->str, &gen) || gen < 1))
        rc = cqrs_error_set(err, CQRS_ERR_INTERNAL, "bad generation pointer %s", ptr);
    freeReplyObject(r);
    if (rc == CQRS_ERR_OK)
        cqrs_keys_shard_gen(ds->target.prefix, topic, partition, gen, shard, cap);
    return rc;
}

/* Generations readers follow, per shard (its pointer), cached for the process: an open
 * hash table of 64-bit hashes of "<prefix>/<db>/<topic>/<partition>". */
#define GEN_CACHE 8192
static struct {
    uint64_t h; /* 0: free */
    int64_t gen, read_ms;
    uint64_t epoch; /* gen_epoch when read: an older one is read again */
} gen_cache[GEN_CACHE];
static uint64_t gen_epoch = 1; /* bumped by forget */

void cqrs_docstore_generations_forget(void)
{
    pthread_mutex_lock(&layout_lock);
    gen_epoch++;
    pthread_mutex_unlock(&layout_lock);
}

/* The cache slot of h (its own or a free one); GEN_CACHE when the probe found neither. */
static size_t gen_slot(uint64_t h)
{
    for (size_t k = 0; k < 16; k++) {
        size_t i = (size_t)((h + k) & (GEN_CACHE - 1));
        if (gen_cache[i].h == h || gen_cache[i].h == 0)
            return i;
    }
    return GEN_CACHE;
}

cqrs_err_t cqrs_docstore_shard_generation(cqrs_docstore_t *ds, const char *topic, int32_t partition,
                                          int64_t *gen, cqrs_error_t *err)
{
    char key[CQRS_KEY_MAX];
    snprintf(key, sizeof key, "%s/%d/%s/%d", ds->target.prefix, ds->target.addr.db, topic,
             (int)partition);
    uint64_t h = cqrs_hash64(key) | 1;
    int64_t now = cqrs_monotonic_ms(), known = 0, stale = 0;
    pthread_mutex_lock(&layout_lock);
    uint64_t epoch = gen_epoch;
    size_t slot = gen_slot(h);
    if (slot < GEN_CACHE && gen_cache[slot].h == h) {
        stale = gen_cache[slot].gen;
        known = gen_cache[slot].epoch == epoch ? stale : 0;
        if (known && now - gen_cache[slot].read_ms < CQRS_GENERATION_TTL_MS) {
            *gen = known;
            pthread_mutex_unlock(&layout_lock);
            return CQRS_ERR_OK;
        }
    }
    pthread_mutex_unlock(&layout_lock);
    char shard[CQRS_SHARD_MAX];
    int64_t g = 1;
    cqrs_err_t rc = cqrs_docstore_current_shard(ds, topic, partition, shard, sizeof shard, err);
    if (rc != CQRS_ERR_OK) {
        if (!stale)
            return rc;
        *gen = stale; /* the last one known, rather than a guess */
        return CQRS_ERR_OK;
    }
    cqrs_keys_shard_parse(shard, NULL, 0, &g);
    if (g < known)
        g = known; /* never back to an older generation than one used since the last forget */
    pthread_mutex_lock(&layout_lock);
    if (slot < GEN_CACHE) {
        gen_cache[slot].h = h;
        gen_cache[slot].gen = g;
        gen_cache[slot].read_ms = now;
        gen_cache[slot].epoch = epoch;
    }
    pthread_mutex_unlock(&layout_lock);
    *gen = g;
    return CQRS_ERR_OK;
}

cqrs_err_t cqrs_docstore_layout_set(cqrs_docstore_t *ds, const char *topic, int32_t partitions,
                                    int32_t *recorded, cqrs_error_t *err)
{
    char key[CQRS_KEY_MAX], n[12];
    cqrs_keys_global(ds->target.prefix, "layout", key, sizeof key);
    snprintf(n, sizeof n, "%d", partitions);
    const char *argv[] = {"HSETNX", key, topic, n};
    cqrs_err_t rc = command_int(ds, 4, argv, NULL, err);
    return rc == CQRS_ERR_OK ? cqrs_docstore_layout_get(ds, topic, recorded, err) : rc;
}

/* KEYS: 1 the list, 2 meta, 3 offsets, 4 generation pointer. ARGV: 1 blob, 2 incarnation,
 * 3 offset mode, 4 partition, 5 expected offset, 6 next offset, 7 change channel,
 * 8 generation. The message's offset is recorded with it, so a restart or rebalance does not
 * keep it a second time. */
static const char UNDECODABLE_LUA[] = GENERATION_CHECK_LUA("KEYS[4]", "ARGV[8]")
    STORE_CHECK_LUA("KEYS[2]", "ARGV[2]", "ARGV[7]") PAUSE_CHECK_LUA("KEYS[2]")
        OFFSET_CHECK_LUA("KEYS[3]", "ARGV[4]", "ARGV[3]", "ARGV[5]",
                         "ARGV[6]") "redis.call('RPUSH', KEYS[1], ARGV[1])\n"
                                    "mark()\n"
                                    "return 1\n";

cqrs_err_t cqrs_docstore_undecodable(cqrs_docstore_t *ds, const cqrs_apply_t *a,
                                     cqrs_apply_result_t *result, cqrs_error_t *err)
{
    char part[12], prev[24], next[24];
    snprintf(part, sizeof part, "%d", a->partition);
    snprintf(prev, sizeof prev, "%lld", (long long)(a->prev_offset < 0 ? -1 : a->prev_offset));
    snprintf(next, sizeof next, "%lld", (long long)a->next_offset);
    char list[CQRS_KEY_MAX], meta[CQRS_KEY_MAX], offsets[CQRS_KEY_MAX], ptr[CQRS_KEY_MAX];
    char gen[24];
    int64_t g = 0;
    if (!cqrs_keys_shard_parse(a->shard, ptr, sizeof ptr, &g))
        return cqrs_error_set(err, CQRS_ERR_INTERNAL, "not a shard prefix: %.80s", a->shard);
    snprintf(gen, sizeof gen, "%lld", (long long)g);
    cqrs_keys_in(a->shard, CQRS_SHARD_UNDECODABLE, list, sizeof list);
    cqrs_keys_in(a->shard, CQRS_SHARD_META, meta, sizeof meta);
    cqrs_keys_in(a->shard, CQRS_SHARD_OFFSETS, offsets, sizeof offsets);
    const char *argv[] = {"EVAL",
                          UNDECODABLE_LUA,
                          "4",
                          list,
                          meta,
                          offsets,
                          ptr,
                          a->blob ? a->blob : "{}",
                          a->incarnation ? a->incarnation : "",
                          OFFSET_MODES[a->offset_mode],
                          part,
                          prev,
                          next,
                          ds->channel,
                          gen};
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, 15, argv, NULL, &r, err);
    if (rc == CQRS_ERR_OK)
        rc = script_result(r, result, err);
    freeReplyObject(r);
    return rc;
}

cqrs_err_t cqrs_docstore_offset(cqrs_docstore_t *ds, const char *shard, int32_t partition,
                                int64_t *offset, cqrs_error_t *err)
{
    char part[12], offsets_key[CQRS_KEY_MAX];
    snprintf(part, sizeof part, "%d", partition);
    cqrs_keys_in(shard, CQRS_SHARD_OFFSETS, offsets_key, sizeof offsets_key);
    const char *argv[] = {"HGET", offsets_key, part};
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, 3, argv, NULL, &r, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    if (r->type != REDIS_REPLY_STRING)
        rc = cqrs_error_set(err, CQRS_ERR_NOT_FOUND, "no offset for partition %d", partition);
    else if (!cqrs_parse_int64(r->str, offset))
        rc = cqrs_error_set(err, CQRS_ERR_INTERNAL, "bad offset for partition %d", partition);
    freeReplyObject(r);
    return rc;
}

/* The strings of a list of index changes live in blocks owned by the list (one allocation per
 * few dozen changes instead of three per change). A block starts with the previous one's
 * address. */
#define OPS_BLOCK 4096

static const char *ops_copy(cqrs_index_ops_t *ops, const char *s)
{
    size_t len = strlen(s) + 1;
    if (!ops->block || ops->block_used + len > ops->block_cap) {
        size_t cap = len + sizeof(char *) > OPS_BLOCK ? len + sizeof(char *) : OPS_BLOCK;
        char *b = malloc(cap);
        if (!b)
            return NULL;
        memcpy(b, &ops->block, sizeof(char *));
        ops->block = b;
        ops->block_used = sizeof(char *);
        ops->block_cap = cap;
    }
    char *out = ops->block + ops->block_used;
    memcpy(out, s, len);
    ops->block_used += len;
    return out;
}

bool cqrs_index_ops_add(cqrs_index_ops_t *ops, cqrs_index_op_kind_t op, const char *key,
                        double score, const char *member, const char *value)
{
    if (ops->n == ops->cap) {
        size_t cap = ops->cap ? ops->cap * 2 : 16;
        cqrs_index_op_t *v = realloc(ops->v, cap * sizeof *v);
        if (!v) {
            ops->nomem = true;
            return false;
        }
        ops->v = v;
        ops->cap = cap;
    }
    cqrs_index_op_t o = {op, ops_copy(ops, key), score, ops_copy(ops, member ? member : ""),
                         value ? ops_copy(ops, value) : NULL};
    if (!o.key || !o.member || (value && !o.value)) {
        ops->nomem = true;
        return false;
    }
    ops->v[ops->n++] = o;
    return true;
}

void cqrs_index_ops_free(cqrs_index_ops_t *ops)
{
    char *b = ops->block;
    while (b) {
        char *prev;
        memcpy(&prev, b, sizeof prev);
        free(b);
        b = prev;
    }
    free(ops->v);
    memset(ops, 0, sizeof *ops);
}

void cqrs_docstore_strings_free(char **v, size_t n)
{
    for (size_t i = 0; v && i < n; i++)
        free(v[i]);
    free(v);
}

static char **reply_strings(const redisReply *r, size_t from, size_t *n)
{
    *n = 0;
    if (r->type != REDIS_REPLY_ARRAY)
        return NULL;
    char **v = calloc(r->elements + 1, sizeof *v);
    for (size_t i = from; v && i < r->elements; i++)
        if (r->element[i]->type == REDIS_REPLY_STRING)
            v[(*n)++] = strndup(r->element[i]->str, r->element[i]->len);
    return v;
}

typedef struct range_out {
    char ***members;
    size_t *counts;
} range_out_t;

static void read_range(const redisReply *r, size_t i, void *ud)
{
    range_out_t *o = ud;
    o->members[i] = reply_strings(r, 0, &o->counts[i]);
}

cqrs_err_t cqrs_docstore_range_many(cqrs_docstore_t *ds, const char *const *keys, size_t n,
                                    const char *after, size_t limit, char ***members,
                                    size_t *counts, cqrs_error_t *err)
{
    for (size_t i = 0; i < n; i++) {
        members[i] = NULL;
        counts[i] = 0;
    }
    if (n == 0)
        return CQRS_ERR_OK;
    char *from = NULL, count[24];
    const char **argv = calloc(7 * n, sizeof *argv);
    if (after && (from = malloc(strlen(after) + 2)) != NULL)
        sprintf(from, "(%s", after);
    if (!argv || (after && !from)) {
        free(argv);
        free(from);
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    }
    snprintf(count, sizeof count, "%zu", limit);
    for (size_t i = 0; i < n; i++) {
        const char **a = argv + 7 * i;
        a[0] = "ZRANGEBYLEX";
        a[1] = keys[i];
        a[2] = from ? from : "-";
        a[3] = "+";
        a[4] = "LIMIT";
        a[5] = "0";
        a[6] = count;
    }
    range_out_t o = {members, counts};
    cqrs_err_t rc = pipeline(ds, n, 7, argv, read_range, &o, err);
    if (rc != CQRS_ERR_OK)
        for (size_t i = 0; i < n; i++) {
            cqrs_docstore_strings_free(members[i], counts[i]);
            members[i] = NULL;
            counts[i] = 0;
        }
    free(argv);
    free(from);
    return rc;
}

static void read_json(const redisReply *r, size_t i, void *ud)
{
    if (r->type == REDIS_REPLY_STRING)
        ((char **)ud)[i] = strndup(r->str, r->len);
}

cqrs_err_t cqrs_docstore_get_many(cqrs_docstore_t *ds, const char *const *keys, size_t n,
                                  char **jsons, cqrs_error_t *err)
{
    for (size_t i = 0; i < n; i++)
        jsons[i] = NULL;
    if (n == 0)
        return CQRS_ERR_OK;
    const char **argv = calloc(3 * n, sizeof *argv);
    if (!argv)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        argv[3 * i] = "HGET";
        argv[3 * i + 1] = keys[i];
        argv[3 * i + 2] = "json";
    }
    cqrs_err_t rc = pipeline(ds, n, 3, argv, read_json, jsons, err);
    free(argv);
    if (rc != CQRS_ERR_OK)
        for (size_t i = 0; i < n; i++) {
            free(jsons[i]);
            jsons[i] = NULL;
        }
    return rc;
}

/* n pipelined commands of argc arguments each (argv row-major), per node on a cluster; fn
 * reads each reply (error replies included), in order. */
static cqrs_err_t pipeline(cqrs_docstore_t *ds, size_t n, int argc, const char *const *argv,
                           void (*fn)(const redisReply *r, size_t i, void *ud), void *ud,
                           cqrs_error_t *err)
{
    connect_ds(ds);
    cqrs_rcmd_t *cmds = calloc(n ? n : 1, sizeof *cmds);
    redisReply **replies = calloc(n ? n : 1, sizeof *replies);
    cqrs_err_t rc = CQRS_ERR_OK;
    if (!cmds || !replies) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        const char **a = (const char **)(argv + i * (size_t)argc);
        cmds[i] = (cqrs_rcmd_t){route_of(argc, a), argc, a, NULL};
    }
    rc = cqrs_rconn_pipeline(ds->rc, n, cmds, replies, err);
    for (size_t i = 0; rc == CQRS_ERR_OK && i < n; i++)
        fn(replies[i], i, ud);
out:
    for (size_t i = 0; replies && i < n; i++)
        freeReplyObject(replies[i]);
    free(cmds);
    free(replies);
    return rc;
}

static void read_present(const redisReply *r, size_t i, void *ud)
{
    ((bool *)ud)[i] = r->type == REDIS_REPLY_STRING;
}

static void read_count(const redisReply *r, size_t i, void *ud)
{
    ((long long *)ud)[i] = r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
}

cqrs_err_t cqrs_docstore_zcontains_many(cqrs_docstore_t *ds, const char *const *keys,
                                        const char *const *members, size_t n, bool *present,
                                        cqrs_error_t *err)
{
    const char **argv = calloc(n * 3 + 1, sizeof *argv);
    if (!argv)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        argv[3 * i] = "ZSCORE";
        argv[3 * i + 1] = keys[i];
        argv[3 * i + 2] = members[i];
    }
    cqrs_err_t rc = n ? pipeline(ds, n, 3, argv, read_present, present, err) : CQRS_ERR_OK;
    free(argv);
    return rc;
}

cqrs_err_t cqrs_docstore_zcard_many(cqrs_docstore_t *ds, const char *const *keys, size_t n,
                                    long long *counts, cqrs_error_t *err)
{
    const char **argv = calloc(n * 2 + 1, sizeof *argv);
    if (!argv)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        argv[2 * i] = "ZCARD";
        argv[2 * i + 1] = keys[i];
    }
    cqrs_err_t rc = n ? pipeline(ds, n, 2, argv, read_count, counts, err) : CQRS_ERR_OK;
    free(argv);
    return rc;
}

/* ---- pool -------------------------------------------------------------------------------- */

struct cqrs_docstore_pool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned size;
    cqrs_docstore_t **all;
    bool *busy;
};

cqrs_docstore_pool_t *cqrs_docstore_pool_new(const cqrs_redis_config_t *redis, int timeout_ms,
                                             unsigned size, cqrs_error_t *err)
{
    cqrs_docstore_pool_t *p = calloc(1, sizeof *p);
    if (!p || size == 0) {
        free(p);
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    p->size = size;
    p->all = calloc(size, sizeof *p->all);
    p->busy = calloc(size, sizeof *p->busy);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    for (unsigned i = 0; p->all && p->busy && i < size; i++) {
        p->all[i] = cqrs_docstore_new(redis, timeout_ms, err);
        if (!p->all[i]) {
            cqrs_docstore_pool_destroy(p);
            return NULL;
        }
    }
    if (!p->all || !p->busy) {
        cqrs_docstore_pool_destroy(p);
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    return p;
}

cqrs_docstore_t *cqrs_docstore_pool_acquire(cqrs_docstore_pool_t *p, int timeout_ms)
{
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    cqrs_docstore_t *ds = NULL;
    pthread_mutex_lock(&p->mu);
    while (!ds) {
        for (unsigned i = 0; i < p->size; i++) {
            if (!p->busy[i]) {
                p->busy[i] = true;
                ds = p->all[i];
                break;
            }
        }
        if (!ds && pthread_cond_timedwait(&p->cv, &p->mu, &deadline) == ETIMEDOUT)
            break;
    }
    pthread_mutex_unlock(&p->mu);
    return ds;
}

void cqrs_docstore_pool_release(cqrs_docstore_pool_t *p, cqrs_docstore_t *ds)
{
    pthread_mutex_lock(&p->mu);
    for (unsigned i = 0; i < p->size; i++) {
        if (p->all[i] == ds) {
            p->busy[i] = false;
            break;
        }
    }
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

void cqrs_docstore_pool_destroy(cqrs_docstore_pool_t *p)
{
    if (!p)
        return;
    for (unsigned i = 0; p->all && i < p->size; i++)
        cqrs_docstore_destroy(p->all[i]);
    free(p->all);
    free(p->busy);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p);
}

/* ---- dead letters (cqrsctl dlq) -------------------------------------------------------- */

cqrs_err_t cqrs_docstore_dlq_index(cqrs_docstore_t *ds, const char *shard, char ***ids,
                                   int64_t **since_ms, size_t *n, cqrs_error_t *err)
{
    *ids = NULL;
    *since_ms = NULL;
    *n = 0;
    char index[CQRS_KEY_MAX];
    cqrs_keys_in(shard, CQRS_SHARD_DLQ_INDEX, index, sizeof index);
    const char *argv[] = {"ZRANGE", index, "0", "-1", "WITHSCORES"};
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, 5, argv, NULL, &r, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    size_t pairs = r->type == REDIS_REPLY_ARRAY ? r->elements / 2 : 0;
    *ids = calloc(pairs + 1, sizeof **ids);
    *since_ms = calloc(pairs + 1, sizeof **since_ms);
    if (!*ids || !*since_ms) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < pairs; i++) {
        const redisReply *m = r->element[2 * i], *s = r->element[2 * i + 1];
        if (m->type != REDIS_REPLY_STRING || s->type != REDIS_REPLY_STRING)
            continue;
        (*ids)[*n] = strndup(m->str, m->len);
        (*since_ms)[*n] = (int64_t)strtod(s->str, NULL);
        (*n)++;
    }
out:
    if (rc != CQRS_ERR_OK) {
        free(*ids);
        free(*since_ms);
        *ids = NULL;
        *since_ms = NULL;
    }
    freeReplyObject(r);
    return rc;
}

static int cmp_dead_letter(const void *a, const void *b)
{
    int64_t x = ((const cqrs_dead_letter_t *)a)->version;
    int64_t y = ((const cqrs_dead_letter_t *)b)->version;
    return x < y ? -1 : x > y;
}

void cqrs_docstore_dlq_free(cqrs_dead_letter_t *v, size_t n)
{
    for (size_t i = 0; v && i < n; i++) {
        free(v[i].blob);
        free(v[i].reason);
    }
    free(v);
}

cqrs_err_t cqrs_docstore_dlq_get(cqrs_docstore_t *ds, const char *dlq_key, cqrs_dead_letter_t **out,
                                 size_t *n, cqrs_error_t *err)
{
    *out = NULL;
    *n = 0;
    const char *argv[] = {"HGETALL", dlq_key};
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, 2, argv, NULL, &r, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    size_t pairs = r->type == REDIS_REPLY_ARRAY ? r->elements / 2 : 0;
    cqrs_dead_letter_t *v = calloc(pairs + 1, sizeof *v);
    if (!v) {
        freeReplyObject(r);
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    }
    size_t k = 0;
    /* fields "<version>" first, then attach each "<version>:reason" */
    for (size_t i = 0; i < pairs; i++) {
        const redisReply *f = r->element[2 * i], *val = r->element[2 * i + 1];
        int64_t version;
        if (f->type == REDIS_REPLY_STRING && val->type == REDIS_REPLY_STRING &&
            !memchr(f->str, ':', f->len) && cqrs_parse_int64(f->str, &version)) {
            v[k].version = version;
            v[k].blob = strndup(val->str, val->len);
            k++;
        }
    }
    for (size_t i = 0; i < pairs; i++) {
        const redisReply *f = r->element[2 * i], *val = r->element[2 * i + 1];
        const char *colon = f->type == REDIS_REPLY_STRING ? memchr(f->str, ':', f->len) : NULL;
        if (!colon || strcmp(colon, ":reason") != 0 || val->type != REDIS_REPLY_STRING)
            continue;
        char num[24];
        size_t len = (size_t)(colon - f->str);
        int64_t version;
        if (len >= sizeof num)
            continue;
        memcpy(num, f->str, len);
        num[len] = '\0';
        if (!cqrs_parse_int64(num, &version))
            continue;
        for (size_t j = 0; j < k; j++)
            if (v[j].version == version && !v[j].reason)
                v[j].reason = strndup(val->str, val->len);
    }
    freeReplyObject(r);
    qsort(v, k, sizeof *v, cmp_dead_letter);
    *out = v;
    *n = k;
    return CQRS_ERR_OK;
}

cqrs_err_t cqrs_docstore_apply_held(cqrs_docstore_t *ds, const cqrs_apply_t *a,
                                    cqrs_apply_result_t *result, cqrs_error_t *err)
{
    /* The script parks an event while its dlq key exists; a key of the same hash slot that
     * does not exist lets it apply. It is only ever written when the document moved on
     * between the caller's read and this call (then deleted again). */
    char scratch[512];
    snprintf(scratch, sizeof scratch, "%s:retry", a->dlq_key);
    cqrs_apply_t b = *a;
    b.dlq_key = scratch;
    b.offset_mode = CQRS_OFFSET_NONE; /* the projector recorded it when it parked the event */
    cqrs_err_t rc = run_apply(ds, &b, false, result, err);
    if (rc != CQRS_ERR_OK || *result == CQRS_APPLY_APPLIED || *result == CQRS_APPLY_DUPLICATE ||
        *result == CQRS_APPLY_RESET)
        return rc;
    if (*result == CQRS_APPLY_STALE)
        return cqrs_error_set(err, CQRS_ERR_STATE, "the document changed meanwhile; try again");
    const char *argv[] = {"DEL", scratch};
    redisReply *r = NULL;
    if (command(ds, 2, argv, NULL, &r, err) == CQRS_ERR_OK)
        freeReplyObject(r);
    return cqrs_error_set(err, CQRS_ERR_STATE, "the document changed meanwhile; try again");
}

/* KEYS: 1 dead letters of the aggregate, 2 index. ARGV: 1 version, 2 aggregate id. */
static const char DLQ_REMOVE_LUA[] = "redis.call('HDEL', KEYS[1], ARGV[1], ARGV[1] .. ':reason')\n"
                                     "if redis.call('EXISTS', KEYS[1]) == 0 then\n"
                                     "  redis.call('ZREM', KEYS[2], ARGV[2])\n"
                                     "  return 1\n"
                                     "end\n"
                                     "return 0\n";

/* KEYS: 1 dead letters of the aggregate, 2 index. ARGV: 1 aggregate id. */
static const char DLQ_DROP_LUA[] = "local n = 0\n"
                                   "for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do\n"
                                   "  if not string.find(f, ':', 1, true) then n = n + 1 end\n"
                                   "end\n"
                                   "redis.call('DEL', KEYS[1])\n"
                                   "redis.call('ZREM', KEYS[2], ARGV[1])\n"
                                   "return n\n";

/* KEYS: 1 dead letters of the aggregate. ARGV: 1 version, 2 reason. Never creates the hash:
 * that would hold the aggregate again. */
static const char DLQ_REASON_LUA[] =
    "if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end\n"
    "redis.call('HSET', KEYS[1], ARGV[1] .. ':reason', ARGV[2])\n"
    "return 1\n";

/* One command with an integer reply (scripts go by EVAL: Redis caches a script by its
 * text after the first call). */
static cqrs_err_t command_int(cqrs_docstore_t *ds, int argc, const char **argv, long long *out,
                              cqrs_error_t *err)
{
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, argc, argv, NULL, &r, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    if (r->type != REDIS_REPLY_INTEGER)
        rc = cqrs_error_set(err, CQRS_ERR_INTERNAL, "Redis: unexpected script reply");
    else if (out)
        *out = r->integer;
    freeReplyObject(r);
    return rc;
}

cqrs_err_t cqrs_docstore_dlq_remove(cqrs_docstore_t *ds, const char *shard, const char *dlq_key,
                                    const char *aggregate_id, int64_t version, bool *released,
                                    cqrs_error_t *err)
{
    char v[24], index[CQRS_KEY_MAX];
    snprintf(v, sizeof v, "%lld", (long long)version);
    cqrs_keys_in(shard, CQRS_SHARD_DLQ_INDEX, index, sizeof index);
    const char *argv[] = {"EVAL", DLQ_REMOVE_LUA, "2", dlq_key, index, v, aggregate_id};
    long long res = 0;
    cqrs_err_t rc = command_int(ds, 7, argv, &res, err);
    *released = rc == CQRS_ERR_OK && res == 1;
    return rc;
}

cqrs_err_t cqrs_docstore_dlq_set_reason(cqrs_docstore_t *ds, const char *dlq_key, int64_t version,
                                        const char *reason, cqrs_error_t *err)
{
    char v[24];
    snprintf(v, sizeof v, "%lld", (long long)version);
    const char *argv[] = {"EVAL", DLQ_REASON_LUA, "1", dlq_key, v, reason};
    return command_int(ds, 6, argv, NULL, err);
}

cqrs_err_t cqrs_docstore_dlq_drop(cqrs_docstore_t *ds, const char *shard, const char *dlq_key,
                                  const char *aggregate_id, size_t *dropped, cqrs_error_t *err)
{
    char index[CQRS_KEY_MAX];
    cqrs_keys_in(shard, CQRS_SHARD_DLQ_INDEX, index, sizeof index);
    const char *argv[] = {"EVAL", DLQ_DROP_LUA, "2", dlq_key, index, aggregate_id};
    long long n = 0;
    cqrs_err_t rc = command_int(ds, 6, argv, &n, err);
    *dropped = rc == CQRS_ERR_OK && n > 0 ? (size_t)n : 0;
    return rc;
}

cqrs_err_t cqrs_docstore_refill_set(cqrs_docstore_t *ds, const char *field, int64_t until,
                                    cqrs_error_t *err)
{
    char u[24];
    snprintf(u, sizeof u, "%lld", (long long)until);
    char refill[CQRS_KEY_MAX];
    cqrs_keys_global(ds->target.prefix, "refill", refill, sizeof refill);
    const char *argv[] = {"HSET", refill, field, u};
    return command_int(ds, 4, argv, NULL, err);
}

cqrs_err_t cqrs_docstore_refill_get(cqrs_docstore_t *ds, const char *field, int64_t *until,
                                    cqrs_error_t *err)
{
    cqrs_err_t rc = global_hget_int(ds, "refill", field, until, err);
    if (rc == CQRS_ERR_OK && *until < 0)
        rc = cqrs_error_set(err, CQRS_ERR_NOT_FOUND, "%s is not refilling", field);
    return rc;
}

cqrs_err_t cqrs_docstore_refill_clear(cqrs_docstore_t *ds, const char *field, cqrs_error_t *err)
{
    char refill[CQRS_KEY_MAX];
    cqrs_keys_global(ds->target.prefix, "refill", refill, sizeof refill);
    const char *argv[] = {"HDEL", refill, field};
    return command_int(ds, 3, argv, NULL, err);
}

cqrs_err_t cqrs_docstore_refill_count(cqrs_docstore_t *ds, long long *n, cqrs_error_t *err)
{
    char refill[CQRS_KEY_MAX];
    cqrs_keys_global(ds->target.prefix, "refill", refill, sizeof refill);
    const char *argv[] = {"HLEN", refill};
    return command_int(ds, 2, argv, n, err);
}

typedef struct dlq_counts_out {
    long long *held, *undecodable;
} dlq_counts_out_t;

static void read_dlq_count(const redisReply *r, size_t i, void *ud)
{
    dlq_counts_out_t *o = ud;
    long long *to = i % 2 ? o->undecodable : o->held;
    if (to)
        to[i / 2] = r->type == REDIS_REPLY_INTEGER ? r->integer : 0;
}

cqrs_err_t cqrs_docstore_dlq_counts(cqrs_docstore_t *ds, const char *const *shards, size_t n,
                                    long long *held, long long *undecodable, cqrs_error_t *err)
{
    if (n == 0)
        return CQRS_ERR_OK;
    const char **argv = calloc(4 * n, sizeof *argv);
    char(*keys)[2][CQRS_KEY_MAX] = calloc(n, sizeof *keys);
    cqrs_err_t rc;
    if (!argv || !keys) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        cqrs_keys_in(shards[i], CQRS_SHARD_DLQ_INDEX, keys[i][0], sizeof keys[i][0]);
        cqrs_keys_in(shards[i], CQRS_SHARD_UNDECODABLE, keys[i][1], sizeof keys[i][1]);
        argv[4 * i] = "ZCARD";
        argv[4 * i + 1] = keys[i][0];
        argv[4 * i + 2] = "LLEN";
        argv[4 * i + 3] = keys[i][1];
    }
    dlq_counts_out_t o = {held, undecodable};
    rc = pipeline(ds, 2 * n, 2, argv, read_dlq_count, &o, err);
out:
    free(argv);
    free(keys);
    return rc;
}

/* ---- rebuilds ---------------------------------------------------------------------------- */

/* A pipeline: commands are appended, and every `window` of them the replies are read. On a
 * cluster (cluster set) the commands are copied into a batch sent per node when it is full or
 * at the end (pipe_flush). */
typedef struct pipe {
    cqrs_docstore_t *ds;
    size_t pending;
    cqrs_err_t rc;
    cqrs_error_t *err;
    bool cluster;
    cqrs_rcmd_t *batch;
    size_t n_batch;
} pipe_t;

#define PIPE_BATCH 4096

static void pipe_flush(pipe_t *p)
{
    if (p->n_batch > 0 && p->rc == CQRS_ERR_OK) {
        redisReply **replies = calloc(p->n_batch, sizeof *replies);
        if (!replies)
            p->rc = cqrs_error_set(p->err, CQRS_ERR_NOMEM, "out of memory");
        else
            p->rc = cqrs_rconn_pipeline(p->ds->rc, p->n_batch, p->batch, replies, p->err);
        for (size_t i = 0; replies && i < p->n_batch; i++) {
            if (p->rc == CQRS_ERR_OK && replies[i]->type == REDIS_REPLY_ERROR)
                p->rc = cqrs_error_set(p->err, CQRS_ERR_INTERNAL, "Redis: %s", replies[i]->str);
            freeReplyObject(replies[i]);
        }
        free(replies);
    }
    for (size_t i = 0; i < p->n_batch; i++) {
        for (int k = 0; p->batch[i].argv && k < p->batch[i].argc; k++)
            free((char *)p->batch[i].argv[k]);
        free(p->batch[i].argv);
    }
    p->n_batch = 0;
}

static void pipe_drain(pipe_t *p)
{
    for (; p->pending > 0; p->pending--) {
        void *reply = NULL;
        if (redisGetReply(p->ds->bulk, &reply) != REDIS_OK || !reply) {
            if (p->rc == CQRS_ERR_OK)
                p->rc =
                    cqrs_error_set(p->err, CQRS_ERR_UNAVAILABLE, "Redis: %s", p->ds->bulk->errstr);
            bulk_disconnect(p->ds);
            p->pending = 0;
            return;
        }
        redisReply *r = reply;
        if (r->type == REDIS_REPLY_ERROR && p->rc == CQRS_ERR_OK)
            p->rc = cqrs_error_set(p->err, CQRS_ERR_INTERNAL, "Redis: %s", r->str);
        freeReplyObject(r);
    }
}

static void pipe_add(pipe_t *p, int argc, const char **argv)
{
    if (p->rc != CQRS_ERR_OK)
        return;
    if (p->cluster) {
        if (!p->batch && !(p->batch = calloc(PIPE_BATCH, sizeof *p->batch))) {
            p->rc = cqrs_error_set(p->err, CQRS_ERR_NOMEM, "out of memory");
            return;
        }
        const char **copy = calloc((size_t)argc, sizeof *copy);
        for (int k = 0; copy && k < argc; k++)
            copy[k] = strdup(argv[k]);
        p->batch[p->n_batch++] = (cqrs_rcmd_t){copy ? copy[1] : NULL, argc, copy, NULL};
        if (!copy || !copy[argc - 1])
            p->rc = cqrs_error_set(p->err, CQRS_ERR_NOMEM, "out of memory");
        if (p->n_batch == PIPE_BATCH)
            pipe_flush(p);
        return;
    }
    if (!p->ds->bulk)
        return;
    if (redisAppendCommandArgv(p->ds->bulk, argc, argv, NULL) != REDIS_OK) {
        p->rc = cqrs_error_set(p->err, CQRS_ERR_NOMEM, "Redis: cannot queue a command");
        return;
    }
    if (++p->pending >= 20000)
        pipe_drain(p);
}

static void settle(cqrs_docstore_t *ds)
{
    size_t n = ds->deferred;
    ds->deferred = 0;
    if (!ds->bulk) {
        if (ds->deferred_rc == CQRS_ERR_OK)
            ds->deferred_rc = cqrs_error_set(&ds->deferred_err, CQRS_ERR_UNAVAILABLE,
                                             "Redis: the connection was lost before the bulk "
                                             "write was confirmed");
        return;
    }
    pipe_t p = {ds, n, CQRS_ERR_OK, &ds->deferred_err, false, NULL, 0};
    if (ds->deferred_rc != CQRS_ERR_OK) {
        cqrs_error_t ignored;
        p.err = &ignored;
    }
    pipe_drain(&p);
    if (ds->deferred_rc == CQRS_ERR_OK)
        ds->deferred_rc = p.rc;
}

cqrs_err_t cqrs_docstore_bulk_sync(cqrs_docstore_t *ds, cqrs_error_t *err)
{
    if (ds->deferred)
        settle(ds);
    cqrs_err_t rc = ds->deferred_rc;
    if (rc != CQRS_ERR_OK && err)
        *err = ds->deferred_err;
    ds->deferred_rc = CQRS_ERR_OK;
    return rc;
}

/* Bulk writes group the changes of many documents by (command, key): the lists every product
 * belongs to get one ZADD with all of the batch's members instead of one per document. */
typedef struct group {
    int op; /* cqrs_index_op_kind_t */
    const char *key;
    const char **args; /* score/member pairs for ZADD, field/value pairs for HSET, members else */
    size_t n, cap;
} group_t;

typedef struct groups {
    group_t *v;
    size_t n, cap;
    size_t *slots; /* open addressing: index + 1, 0 = empty */
    size_t n_slots;
} groups_t;

static uint64_t group_hash(int op, const char *key)
{
    return cqrs_hash64(key) ^ ((uint64_t)op * 0x9e3779b97f4a7c15ULL);
}

static group_t *group_for(groups_t *g, int op, const char *key)
{
    if ((g->n + 1) * 2 > g->n_slots) {
        size_t ns = g->n_slots ? g->n_slots * 2 : 1024;
        size_t *slots = calloc(ns, sizeof *slots);
        if (!slots)
            return NULL;
        for (size_t i = 0; i < g->n; i++) {
            size_t j = group_hash(g->v[i].op, g->v[i].key) & (ns - 1);
            while (slots[j])
                j = (j + 1) & (ns - 1);
            slots[j] = i + 1;
        }
        free(g->slots);
        g->slots = slots;
        g->n_slots = ns;
    }
    size_t j = group_hash(op, key) & (g->n_slots - 1);
    while (g->slots[j]) {
        group_t *x = &g->v[g->slots[j] - 1];
        if (x->op == op && strcmp(x->key, key) == 0)
            return x;
        j = (j + 1) & (g->n_slots - 1);
    }
    if (g->n == g->cap) {
        size_t cap = g->cap ? g->cap * 2 : 256;
        group_t *nv = realloc(g->v, cap * sizeof *nv);
        if (!nv)
            return NULL;
        g->v = nv;
        g->cap = cap;
    }
    g->v[g->n] = (group_t){op, key, NULL, 0, 0};
    g->slots[j] = ++g->n;
    return &g->v[g->n - 1];
}

static bool group_push(group_t *x, const char *a, const char *b)
{
    if (!x)
        return false;
    if (x->n + 2 > x->cap) {
        size_t cap = x->cap ? x->cap * 2 : 8;
        const char **na = realloc(x->args, cap * sizeof *na);
        if (!na)
            return false;
        x->args = na;
        x->cap = cap;
    }
    x->args[x->n++] = a;
    if (b)
        x->args[x->n++] = b;
    return true;
}

cqrs_err_t cqrs_docstore_bulk_write(cqrs_docstore_t *ds, const cqrs_bulk_doc_t *docs, size_t n,
                                    cqrs_error_t *err)
{
    cqrs_err_t rc = cqrs_docstore_bulk_sync(ds, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    /* A cluster: batches per node through the cluster client; one server: a connection of
     * its own whose replies are read later. Which one is known once connected (a docstore's
     * first command may be this one). */
    if (cqrs_rconn_nodes(ds->rc, err) == 0)
        return CQRS_ERR_UNAVAILABLE;
    bool cluster = cqrs_rconn_is_cluster(ds->rc);
    if (!cluster && !ds->bulk && !(ds->bulk = cqrs_redis_connect(&ds->target, ds->timeout_ms, err)))
        return CQRS_ERR_UNAVAILABLE;
    enum { G_HSET = 10, G_HSETNX_DEAD = 11 };
    groups_t g = {0};
    size_t n_scores = 0;
    for (size_t i = 0; i < n; i++)
        for (size_t k = 0; k < docs[i].n_ops; k++)
            n_scores += docs[i].ops[k].op == CQRS_INDEX_ZADD;
    char(*versions)[24] = calloc(n ? n : 1, sizeof *versions);
    char(*scores)[32] = calloc(n_scores ? n_scores : 1, sizeof *scores);
    size_t si = 0;
    bool ok = versions && scores;
    char now[24];
    snprintf(now, sizeof now, "%lld", (long long)cqrs_realtime_ms());
    size_t n_dead = 0;
    for (size_t i = 0; ok && i < n; i++) {
        const cqrs_bulk_doc_t *d = &docs[i];
        snprintf(versions[i], sizeof versions[i], "%lld", (long long)d->version);
        if (d->json) {
            group_t *x = group_for(&g, G_HSET, d->key);
            ok = group_push(x, "v", versions[i]) && group_push(x, "json", d->json);
        }
        for (size_t k = 0; ok && k < d->n_ops; k++) {
            const cqrs_index_op_t *o = &d->ops[k];
            group_t *x = group_for(&g, o->op == CQRS_INDEX_HSET ? G_HSET : (int)o->op, o->key);
            if (o->op == CQRS_INDEX_ZADD) {
                snprintf(scores[si], sizeof scores[si], "%.17g", o->score);
                ok = group_push(x, scores[si++], o->member);
            } else if (o->op == CQRS_INDEX_HSET) {
                ok = group_push(x, o->member, o->value ? o->value : "");
            } else {
                ok = group_push(x, o->member, NULL);
            }
        }
        n_dead += d->n_dead;
    }
    if (!ok) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    static const char *const names[] = {"ZADD", "ZREM", "SADD", "SREM", "HSET"};
    pipe_t p = {ds, 0, CQRS_ERR_OK, err, cluster, NULL, 0};
    /* Removals first: a batch never removes and adds one member of one key, but order them
     * the way the apply script would anyway. */
    for (int pass = 0; pass < 2; pass++)
        for (size_t i = 0; i < g.n; i++) {
            group_t *x = &g.v[i];
            bool removal = x->op == CQRS_INDEX_ZREM || x->op == CQRS_INDEX_SREM;
            if (removal != (pass == 0))
                continue;
            const char *name = x->op == G_HSET ? "HSET" : names[x->op];
            size_t step = (x->op == CQRS_INDEX_ZADD || x->op == G_HSET) ? 2 : 1;
            for (size_t off = 0; off < x->n; off += 1000 * step) {
                size_t take = x->n - off < 1000 * step ? x->n - off : 1000 * step;
                const char **argv = malloc((take + 2) * sizeof *argv);
                if (!argv) {
                    rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
                    bulk_disconnect(ds);
                    goto out;
                }
                argv[0] = name;
                argv[1] = x->key;
                memcpy(argv + 2, x->args + off, take * sizeof *argv);
                pipe_add(&p, (int)(take + 2), argv);
                free(argv);
            }
        }
    for (size_t i = 0; i < n; i++)
        for (size_t k = 0; k < docs[i].n_dead; k++) {
            const cqrs_bulk_doc_t *d = &docs[i];
            char v[24], field[40];
            snprintf(v, sizeof v, "%lld", (long long)d->dead[k].version);
            snprintf(field, sizeof field, "%s:reason", v);
            const char *a1[] = {"HSETNX", d->dlq_key, v, d->dead[k].blob};
            const char *a2[] = {"HSETNX", d->dlq_key, field, d->dead[k].reason};
            char index[CQRS_KEY_MAX];
            cqrs_keys_in(d->shard, CQRS_SHARD_DLQ_INDEX, index, sizeof index);
            const char *a3[] = {"ZADD", index, "NX", now, d->aggregate_id};
            pipe_add(&p, 4, a1);
            pipe_add(&p, 4, a2);
            pipe_add(&p, 5, a3);
        }
    (void)n_dead;
    if (cluster) {
        pipe_flush(&p);
        free(p.batch);
        rc = p.rc;
        goto out;
    }
    /* Send everything now, read the replies later (the next bulk write, a sync, or any other
     * command): Redis works on this batch while the caller prepares the next. */
    int done = 0;
    while (ds->bulk && p.rc == CQRS_ERR_OK && !done)
        if (redisBufferWrite(ds->bulk, &done) != REDIS_OK) {
            p.rc = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "Redis: %s", ds->bulk->errstr);
            bulk_disconnect(ds);
        }
    if (p.rc == CQRS_ERR_OK)
        ds->deferred = p.pending;
    else if (ds->bulk)
        bulk_disconnect(ds); /* appended commands must not be taken for the next call's */
    rc = p.rc;
out:
    for (size_t i = 0; i < g.n; i++)
        free(g.v[i].args);
    free(g.v);
    free(g.slots);
    free(versions);
    free(scores);
    return rc;
}

/* KEYS: 1 the shard's meta. ARGV: 1 for how many ms (0: clear). The deadline in the server's
 * clock, which the write scripts compare with; it is also the token the switch checks. */
static const char PAUSE_LUA[] =
    "local t = redis.call('TIME')\n"
    "local u = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])\n"
    "if tonumber(ARGV[1]) > 0 then\n"
    "  redis.call('HSET', KEYS[1], 'paused_until', string.format('%d', u))\n"
    "else redis.call('HDEL', KEYS[1], 'paused_until') end\n"
    "return u\n";

cqrs_err_t cqrs_docstore_pause(cqrs_docstore_t *ds, const char *const *shards, size_t n,
                               int64_t for_ms, int64_t *tokens, cqrs_error_t *err)
{
    char ms[24];
    snprintf(ms, sizeof ms, "%lld", (long long)(for_ms > 0 ? for_ms : 0));
    cqrs_err_t rc = CQRS_ERR_OK;
    for (size_t i = 0; i < n && rc == CQRS_ERR_OK; i++) {
        char meta[CQRS_KEY_MAX];
        cqrs_keys_in(shards[i], CQRS_SHARD_META, meta, sizeof meta);
        const char *argv[] = {"EVAL", PAUSE_LUA, "1", meta, ms};
        long long until = 0;
        rc = command_int(ds, 5, argv, &until, err);
        if (tokens)
            tokens[i] = for_ms > 0 ? until : 0;
    }
    return rc;
}

/* KEYS: 1 pointer, 2 old meta, 3 new meta. ARGV: 1 the pause's deadline (token), 2 the new
 * generation, 3 force ('1'). 1 switched, 0 the pause is not ours or lapsed. */
static const char SWITCH_LUA[] =
    "local p = redis.call('HGET', KEYS[2], 'paused_until')\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "if ARGV[3] ~= '1' and (not p or tonumber(p) ~= tonumber(ARGV[1]) or tonumber(p) <= now)"
    " then return 0 end\n"
    "local inc = redis.call('HGET', KEYS[2], 'incarnation')\n"
    "if inc then redis.call('HSET', KEYS[3], 'incarnation', inc) end\n"
    "redis.call('HSETNX', KEYS[3], 'created', t[1])\n"
    "redis.call('HDEL', KEYS[3], 'paused_until')\n"
    "redis.call('SET', KEYS[1], ARGV[2])\n"
    "return 1\n";

cqrs_err_t cqrs_docstore_switch_shard(cqrs_docstore_t *ds, const char *from, const char *to,
                                      int64_t token, bool force, cqrs_error_t *err)
{
    char ptr[CQRS_KEY_MAX], old_meta[CQRS_KEY_MAX], new_meta[CQRS_KEY_MAX], gen[24], tok[24];
    int64_t g = 0;
    if (!cqrs_keys_shard_parse(to, ptr, sizeof ptr, &g))
        return cqrs_error_set(err, CQRS_ERR_INTERNAL, "not a shard prefix: %.80s", to);
    cqrs_keys_in(from, CQRS_SHARD_META, old_meta, sizeof old_meta);
    cqrs_keys_in(to, CQRS_SHARD_META, new_meta, sizeof new_meta);
    snprintf(gen, sizeof gen, "%lld", (long long)g);
    snprintf(tok, sizeof tok, "%lld", (long long)token);
    const char *argv[] = {"EVAL", SWITCH_LUA,       "3", ptr, old_meta, new_meta, tok,
                          gen,    force ? "1" : "0"};
    long long switched = 0;
    cqrs_err_t rc = command_int(ds, 9, argv, &switched, err);
    if (rc == CQRS_ERR_OK && switched != 1)
        rc = cqrs_error_set(err, CQRS_ERR_TIMEOUT,
                            "the projector's pause lapsed before the switch; nothing switched");
    return rc;
}

/* Calls fn with every page of keys matching pattern (a SCAN reply's array of names), node by
 * node (SCAN). A map change during the walk starts it over: one this client sees (a MOVED),
 * and one the map it asks for after the walk shows (a slot that moved, unseen, from a node not
 * yet walked to one already walked). Keys may then come twice. A slot still migrating when the
 * walk ends can hide keys from it (the rebuild's clean-up: README, "Operating it"). */
static cqrs_err_t scan_keys(cqrs_docstore_t *ds, const char *pattern,
                            cqrs_err_t (*fn)(cqrs_docstore_t *ds, const redisReply *page, void *ud,
                                             cqrs_error_t *err),
                            void *ud, cqrs_error_t *err)
{
    connect_ds(ds);
    for (int attempt = 0; attempt < 5; attempt++) {
        size_t nodes = cqrs_rconn_nodes(ds->rc, err);
        if (nodes == 0)
            return CQRS_ERR_UNAVAILABLE;
        uint64_t epoch = cqrs_rconn_map_epoch(ds->rc);
        bool moved = false;
        for (size_t i = 0; i < nodes && !moved; i++) {
            char cursor[32] = "0";
            do {
                const char *argv[] = {"SCAN", cursor, "MATCH", pattern, "COUNT", "1000"};
                redisReply *r = NULL;
                cqrs_err_t rc = cqrs_rconn_command_node(ds->rc, i, 6, argv, NULL, &r, err);
                if (rc != CQRS_ERR_OK)
                    return rc;
                if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
                    r->element[0]->type != REDIS_REPLY_STRING ||
                    r->element[1]->type != REDIS_REPLY_ARRAY) {
                    freeReplyObject(r);
                    return cqrs_error_set(err, CQRS_ERR_INTERNAL, "Redis: unexpected SCAN reply");
                }
                snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
                rc = r->element[1]->elements ? fn(ds, r->element[1], ud, err) : CQRS_ERR_OK;
                freeReplyObject(r);
                if (rc != CQRS_ERR_OK)
                    return rc;
                moved = cqrs_rconn_map_epoch(ds->rc) != epoch;
            } while (strcmp(cursor, "0") != 0 && !moved);
            CQRS_FAILPOINT("scan-after-node"); /* delay:N: slots move between two nodes' walks */
        }
        if (!moved) {
            /* A slot that moved from a node not yet walked to one already walked, which this
             * client did not see (no MOVED), would be missed: ask for the map again. */
            cqrs_rconn_map_stale(ds->rc);
            if (cqrs_rconn_nodes(ds->rc, err) == 0)
                return CQRS_ERR_UNAVAILABLE;
            moved = cqrs_rconn_map_epoch(ds->rc) != epoch;
        }
        if (!moved)
            return CQRS_ERR_OK;
    }
    return cqrs_error_set(err, CQRS_ERR_UNAVAILABLE,
                          "the cluster's slots kept moving during a scan");
}

/* What a page's pipelined COPY or UNLINK commands did: how many keys they copied or deleted,
 * and the first error reply (READONLY in a failover, OOM…), which fails the walk. */
typedef struct key_ops {
    const char *from, *to;       /* COPY: the shard prefixes */
    const char *const *prefixes; /* UNLINK: only keys starting with one of these (if any) */
    size_t n_prefixes;
    size_t n;
    char error[256];
} key_ops_t;

static void read_key_op(const redisReply *r, size_t i, void *ud)
{
    (void)i;
    key_ops_t *c = ud;
    if (r->type == REDIS_REPLY_INTEGER && r->integer > 0)
        c->n += (size_t)r->integer;
    else if (r->type == REDIS_REPLY_ERROR && !c->error[0])
        snprintf(c->error, sizeof c->error, "%s", r->str);
}

/* Runs the page's commands (argc arguments per key, argv row-major) as one pipeline per node. */
static cqrs_err_t run_key_ops(cqrs_docstore_t *ds, size_t n, int argc, const char **argv,
                              key_ops_t *c, cqrs_error_t *err)
{
    cqrs_err_t rc = n ? pipeline(ds, n, argc, argv, read_key_op, c, err) : CQRS_ERR_OK;
    if (rc == CQRS_ERR_OK && c->error[0])
        rc = cqrs_error_set(err, reply_error_code(c->error), "Redis: %s (%s)", c->error, argv[0]);
    return rc;
}

/* COPY <key> <key under c->to> REPLACE for each key of the page under c->from. */
static cqrs_err_t copy_page(cqrs_docstore_t *ds, const redisReply *page, void *ud,
                            cqrs_error_t *err)
{
    key_ops_t *c = ud;
    size_t lf = strlen(c->from), n = 0;
    const char **argv = calloc(page->elements * 4, sizeof *argv);
    char(*dst)[CQRS_KEY_MAX * 2] = calloc(page->elements, sizeof *dst);
    cqrs_err_t rc =
        argv && dst ? CQRS_ERR_OK : cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    for (size_t k = 0; rc == CQRS_ERR_OK && k < page->elements; k++) {
        const redisReply *key = page->element[k];
        if (key->type != REDIS_REPLY_STRING || key->len < lf || strncmp(key->str, c->from, lf) != 0)
            continue;
        snprintf(dst[n], sizeof dst[n], "%s%.*s", c->to, (int)(key->len - lf), key->str + lf);
        const char *row[] = {"COPY", key->str, dst[n], "REPLACE"};
        memcpy(argv + 4 * n++, row, sizeof row);
    }
    if (rc == CQRS_ERR_OK)
        rc = run_key_ops(ds, n, 4, argv, c, err);
    free(argv);
    free(dst);
    return rc;
}

cqrs_err_t cqrs_docstore_copy_shard_keys(cqrs_docstore_t *ds, const char *from, const char *to,
                                         const char *glob, size_t *copied, cqrs_error_t *err)
{
    char pattern[CQRS_KEY_MAX];
    snprintf(pattern, sizeof pattern, "%s%s", from, glob);
    key_ops_t c = {.from = from, .to = to};
    cqrs_err_t rc;
    if (strpbrk(glob, "*?[\\")) {
        rc = scan_keys(ds, pattern, copy_page, &c, err);
    } else {
        /* One name: COPY it (a SCAN walks the whole keyspace of every node for it). */
        redisReply key = {.type = REDIS_REPLY_STRING, .str = pattern, .len = strlen(pattern)};
        redisReply *one = &key;
        redisReply page = {.type = REDIS_REPLY_ARRAY, .elements = 1, .element = &one};
        const char *argv[] = {"EXISTS", pattern};
        long long n = 0;
        rc = command_int(ds, 2, argv, &n, err);
        if (rc == CQRS_ERR_OK && n > 0)
            rc = copy_page(ds, &page, &c, err);
    }
    *copied = c.n;
    return rc;
}

static bool has_prefix(const key_ops_t *c, const redisReply *key)
{
    if (key->type != REDIS_REPLY_STRING)
        return false;
    for (size_t i = 0; i < c->n_prefixes; i++) {
        size_t len = strlen(c->prefixes[i]);
        if (key->len >= len && memcmp(key->str, c->prefixes[i], len) == 0)
            return true;
    }
    return c->n_prefixes == 0;
}

/* UNLINK each key of the page that has one of the prefixes (one command per key: a page of a
 * pattern without a hash tag spans slots, which one UNLINK of several keys may not on a
 * cluster). */
static cqrs_err_t unlink_page(cqrs_docstore_t *ds, const redisReply *page, void *ud,
                              cqrs_error_t *err)
{
    key_ops_t *c = ud;
    size_t n = 0;
    const char **argv = calloc(page->elements * 2, sizeof *argv);
    if (!argv)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    for (size_t k = 0; k < page->elements; k++)
        if (has_prefix(c, page->element[k])) {
            argv[2 * n] = "UNLINK";
            argv[2 * n++ + 1] = page->element[k]->str;
        }
    cqrs_err_t rc = run_key_ops(ds, n, 2, argv, c, err);
    free(argv);
    return rc;
}

cqrs_err_t cqrs_docstore_delete_keys(cqrs_docstore_t *ds, const char *pattern,
                                     const char *const *prefixes, size_t n_prefixes,
                                     size_t *deleted, cqrs_error_t *err)
{
    key_ops_t c = {.prefixes = prefixes, .n_prefixes = n_prefixes};
    cqrs_err_t rc = scan_keys(ds, pattern, unlink_page, &c, err);
    *deleted = c.n;
    return rc;
}

cqrs_err_t cqrs_docstore_announce_reset(cqrs_docstore_t *ds, cqrs_error_t *err)
{
    const char *argv[] = {"PUBLISH", ds->channel, "*"};
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, 3, argv, NULL, &r, err);
    freeReplyObject(r);
    return rc;
}

static cqrs_err_t simple(cqrs_docstore_t *ds, int argc, const char **argv, cqrs_error_t *err)
{
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, argc, argv, NULL, &r, err);
    freeReplyObject(r);
    return rc;
}

cqrs_err_t cqrs_docstore_dlq_index_add(cqrs_docstore_t *ds, const char *shard,
                                       const char *aggregate_id, int64_t since_ms,
                                       cqrs_error_t *err)
{
    char score[24], index[CQRS_KEY_MAX];
    snprintf(score, sizeof score, "%lld", (long long)since_ms);
    cqrs_keys_in(shard, CQRS_SHARD_DLQ_INDEX, index, sizeof index);
    const char *argv[] = {"ZADD", index, "NX", score, aggregate_id};
    return simple(ds, 5, argv, err);
}

/* ---- cqrs_docstore_walk (lean lists; self-contained: script and function) ----
 * KEYS: 1 index, 2 records hash, 3… sets. ARGV: 1 after ('' = start), 2 limit, 3 budget,
 * 4 small_max, 5 suffix ('' = none), 6 id length, 7 bytes after the id.
 * Returns {'walk', next or '', member…} or {'small', '', id, record, id, record…} (also when a
 * set is empty: nothing matches, in any index). No string is
 * compared for order in Lua (its comparisons follow the server's locale, not bytes): ZRANGEBYLEX
 * orders, the caller sorts what the small path returns. */
static const char WALK_LUA[] =
    "local after, limit = ARGV[1], tonumber(ARGV[2])\n"
    "local budget, small = tonumber(ARGV[3]), tonumber(ARGV[4])\n"
    "local suffix, idlen, skip = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])\n"
    "local smallest, size = nil, nil\n"
    "for i = 3, #KEYS do\n"
    "  local c = redis.call('SCARD', KEYS[i])\n"
    "  if c == 0 then return {'small', ''} end\n"
    "  if not size or c < size then smallest, size = i, c end\n"
    "end\n"
    "local function in_all(id, skip_set)\n"
    "  for i = 3, #KEYS do\n"
    "    if i ~= skip_set and redis.call('SISMEMBER', KEYS[i], id) == 0 then return false end\n"
    "  end\n"
    "  return true\n"
    "end\n"
    "if smallest and size <= small then\n"
    "  local out = {'small', ''}\n"
    "  for _, id in ipairs(redis.call('SMEMBERS', KEYS[smallest])) do\n"
    "    if in_all(id, smallest) then\n"
    "      local r = redis.call('HGET', KEYS[2], id)\n"
    "      if r then out[#out + 1] = id out[#out + 1] = r end\n"
    "    end\n"
    "  end\n"
    "  return out\n"
    "end\n"
    "local out, n, from, scanned = {'walk', ''}, 0, (after == '' and '-' or '(' .. after), 0\n"
    "while scanned < budget do\n"
    "  local batch = redis.call('ZRANGEBYLEX', KEYS[1], from, '+', 'LIMIT', 0, 100)\n"
    "  if #batch == 0 then return out end\n"
    "  for _, m in ipairs(batch) do\n"
    "    scanned = scanned + 1\n"
    "    local len = #m\n"
    "    if (suffix == '' or string.sub(m, -#suffix) == suffix) and\n"
    "       (#KEYS < 3 or in_all(string.sub(m, len - skip - idlen + 1, len - skip), nil)) then\n"
    "      if n == limit then out[2] = out[#out] return out end\n"
    "      out[#out + 1] = m\n"
    "      n = n + 1\n"
    "    end\n"
    "    from = '(' .. m\n"
    "    if scanned >= budget then break end\n"
    "  end\n"
    "end\n"
    "out[2] = string.sub(from, 2)\n"
    "return out\n";

cqrs_err_t cqrs_docstore_walk(cqrs_docstore_t *ds, const cqrs_walk_t *q, char ***items, size_t *n,
                              char **next, bool *small, cqrs_error_t *err)
{
    *items = NULL;
    *n = 0;
    *next = NULL;
    *small = false;
    size_t k = 0;
    const char **argv = calloc(3 + 2 + q->n_sets + 7, sizeof *argv);
    if (!argv)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    char nkeys[16], limit[24], budget[24], small_max[24], id_len[24], id_skip[24];
    snprintf(nkeys, sizeof nkeys, "%zu", 2 + q->n_sets);
    snprintf(limit, sizeof limit, "%zu", q->limit);
    snprintf(budget, sizeof budget, "%zu", q->budget);
    snprintf(small_max, sizeof small_max, "%zu", q->records ? q->small_max : 0);
    snprintf(id_len, sizeof id_len, "%zu", q->id_len);
    snprintf(id_skip, sizeof id_skip, "%zu", q->id_skip);
    argv[k++] = "EVAL";
    argv[k++] = WALK_LUA;
    argv[k++] = nkeys;
    argv[k++] = q->index;
    argv[k++] = q->records ? q->records : q->index;
    for (size_t i = 0; i < q->n_sets; i++)
        argv[k++] = q->sets[i];
    argv[k++] = q->after ? q->after : "";
    argv[k++] = limit;
    argv[k++] = budget;
    argv[k++] = small_max;
    argv[k++] = q->suffix ? q->suffix : "";
    argv[k++] = id_len;
    argv[k++] = id_skip;
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, (int)k, argv, NULL, &r, err);
    free(argv);
    if (rc != CQRS_ERR_OK)
        return rc;
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 2 ||
        r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_STRING) {
        freeReplyObject(r);
        return cqrs_error_set(err, CQRS_ERR_INTERNAL, "Redis: unexpected walk reply");
    }
    *small = r->element[0]->len == 5 && memcmp(r->element[0]->str, "small", 5) == 0;
    if (r->element[1]->len > 0)
        *next = strndup(r->element[1]->str, r->element[1]->len);
    *items = reply_strings(r, 2, n);
    freeReplyObject(r);
    return CQRS_ERR_OK;
}

/* ---- a lease and a set of names (cqrsctl rebuild) --------------------------------------- */

/* KEYS: 1 the lease. ARGV: 1 token, 2 ms. 1 taken or renewed (ours or free), else the ms left
 * of another holder's lease (negative). */
static const char LEASE_LUA[] = "local v = redis.call('GET', KEYS[1])\n"
                                "if not v or v == ARGV[1] then\n"
                                "  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])\n"
                                "  return 1\n"
                                "end\n"
                                "return -math.max(redis.call('PTTL', KEYS[1]), 1)\n";

cqrs_err_t cqrs_docstore_lease(cqrs_docstore_t *ds, const char *name, const char *token,
                               int64_t ttl_ms, int64_t *other_left_ms, cqrs_error_t *err)
{
    char key[CQRS_KEY_MAX], ms[24];
    cqrs_keys_global(ds->target.prefix, name, key, sizeof key);
    snprintf(ms, sizeof ms, "%lld", (long long)ttl_ms);
    const char *argv[] = {"EVAL", LEASE_LUA, "1", key, token, ms};
    long long res = 0;
    cqrs_err_t rc = command_int(ds, 6, argv, &res, err);
    *other_left_ms = rc == CQRS_ERR_OK && res < 0 ? -res : 0;
    if (rc == CQRS_ERR_OK && res < 0)
        rc = cqrs_error_set(err, CQRS_ERR_CONFLICT, "%s is held by another holder for %lld ms", key,
                            (long long)-res);
    return rc;
}

static const char UNLEASE_LUA[] =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end\n"
    "return 0\n";

cqrs_err_t cqrs_docstore_unlease(cqrs_docstore_t *ds, const char *name, const char *token,
                                 cqrs_error_t *err)
{
    char key[CQRS_KEY_MAX];
    cqrs_keys_global(ds->target.prefix, name, key, sizeof key);
    const char *argv[] = {"EVAL", UNLEASE_LUA, "1", key, token};
    return command_int(ds, 5, argv, NULL, err);
}

/* SADD or SREM of one member of the set <prefix>:<name>. */
static cqrs_err_t names_change(cqrs_docstore_t *ds, const char *verb, const char *name,
                               const char *member, cqrs_error_t *err)
{
    char key[CQRS_KEY_MAX];
    cqrs_keys_global(ds->target.prefix, name, key, sizeof key);
    const char *argv[] = {verb, key, member};
    return command_int(ds, 3, argv, NULL, err);
}

cqrs_err_t cqrs_docstore_names_add(cqrs_docstore_t *ds, const char *name, const char *member,
                                   cqrs_error_t *err)
{
    return names_change(ds, "SADD", name, member, err);
}

cqrs_err_t cqrs_docstore_names_remove(cqrs_docstore_t *ds, const char *name, const char *member,
                                      cqrs_error_t *err)
{
    return names_change(ds, "SREM", name, member, err);
}

cqrs_err_t cqrs_docstore_names(cqrs_docstore_t *ds, const char *name, char ***members, size_t *n,
                               cqrs_error_t *err)
{
    char key[CQRS_KEY_MAX];
    cqrs_keys_global(ds->target.prefix, name, key, sizeof key);
    const char *argv[] = {"SMEMBERS", key};
    redisReply *r = NULL;
    *members = NULL;
    *n = 0;
    cqrs_err_t rc = command(ds, 2, argv, NULL, &r, err);
    if (rc == CQRS_ERR_OK)
        *members = reply_strings(r, 0, n);
    freeReplyObject(r);
    return rc;
}
