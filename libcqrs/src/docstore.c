/* docstore.c — versioned documents in Redis (hiredis 0.14).
 *
 * Invariants: a document's version only ever grows by exactly one per applied event; a
 * partition's recorded offset only ever grows; both change in the same Lua script call, so a
 * crash can never leave one without the other.
 *
 * Each connection is used by one thread at a time. After any error hiredis marks the context
 * dead; we free it and reconnect on the next call (the apply is idempotent, so redoing it is
 * safe).
 */
#include "cqrs/docstore.h"

#include <errno.h>
#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cqrs/util.h"

/* KEYS: 1 document, 2 offsets, 3 dead letters of the aggregate, 4 dead-letter index,
 *       5 meta, 6… index keys
 * ARGV: 1 mode (apply|dead), 2 version, 3 document, 4 partition, 5 next offset, 6 event blob,
 *       7 aggregate id, 8 now (ms), 9 reason, 10 number of index ops, then per op:
 *       op (ZADD|ZREM), key number, score, member */
static const char APPLY_LUA[] =
    "if redis.call('EXISTS', KEYS[5]) == 0 then return -2 end\n"
    "local cur = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')\n"
    "local v = tonumber(ARGV[2])\n"
    "local function mark()\n"
    "  local prev = tonumber(redis.call('HGET', KEYS[2], ARGV[4]) or '-1')\n"
    "  if tonumber(ARGV[5]) > prev then redis.call('HSET', KEYS[2], ARGV[4], ARGV[5]) end\n"
    "end\n"
    "if v <= cur then mark() return 0 end\n"
    "local held = redis.call('EXISTS', KEYS[3]) == 1\n"
    "if ARGV[1] == 'dead' or held or v > cur + 1 then\n"
    "  local code, reason = 3, ARGV[9]\n"
    "  if ARGV[1] ~= 'dead' then\n"
    "    if held then code, reason = 2, 'waiting behind an earlier dead letter of its aggregate'\n"
    "    else code, reason = -1, 'gap: the document is at version ' .. cur end\n"
    "  end\n"
    "  redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[6])\n"
    "  redis.call('HSETNX', KEYS[3], ARGV[2] .. ':reason', reason)\n"
    "  redis.call('ZADD', KEYS[4], 'NX', ARGV[8], ARGV[7])\n"
    "  mark()\n"
    "  return code\n"
    "end\n"
    "redis.call('HSET', KEYS[1], 'v', ARGV[2], 'json', ARGV[3])\n"
    "local i = 11\n"
    "for _ = 1, tonumber(ARGV[10]) do\n"
    "  local key = KEYS[tonumber(ARGV[i + 1])]\n"
    "  if ARGV[i] == 'ZADD' then redis.call('ZADD', key, ARGV[i + 2], ARGV[i + 3])\n"
    "  else redis.call('ZREM', key, ARGV[i + 3]) end\n"
    "  i = i + 4\n"
    "end\n"
    "mark()\n"
    "return 1\n";

struct cqrs_docstore {
    cqrs_redis_addr_t addr;
    int timeout_ms;
    redisContext *c;
    char sha[41];
};

cqrs_err_t cqrs_redis_url_parse(const char *url, cqrs_redis_addr_t *out, cqrs_error_t *err)
{
    memset(out, 0, sizeof *out);
    out->port = 6379;
    if (!url || strncmp(url, "redis://", 8) != 0)
        return cqrs_error_set(err, CQRS_ERR_CONFIG, "redis URL must start with redis://");
    const char *p = url + 8;
    const char *at = strrchr(p, '@');
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        const char *pw = colon ? colon + 1 : p;
        size_t len = (size_t)(at - pw);
        if (len >= sizeof out->password)
            return cqrs_error_set(err, CQRS_ERR_CONFIG, "redis password too long");
        memcpy(out->password, pw, len);
        p = at + 1;
    }
    size_t hlen = strcspn(p, ":/");
    if (hlen == 0 || hlen >= sizeof out->host)
        return cqrs_error_set(err, CQRS_ERR_CONFIG, "redis URL has no host");
    memcpy(out->host, p, hlen);
    p += hlen;
    if (*p == ':') {
        char *end;
        long port = strtol(p + 1, &end, 10);
        if (end == p + 1 || port < 1 || port > 65535)
            return cqrs_error_set(err, CQRS_ERR_CONFIG, "redis URL has a bad port");
        out->port = (int)port;
        p = end;
    }
    if (*p == '/' && p[1]) {
        char *end;
        long db = strtol(p + 1, &end, 10);
        if (*end || db < 0 || db > 1000)
            return cqrs_error_set(err, CQRS_ERR_CONFIG, "redis URL has a bad database number");
        out->db = (int)db;
    } else if (*p && strcmp(p, "/") != 0) {
        return cqrs_error_set(err, CQRS_ERR_CONFIG, "redis URL: unexpected '%s'", p);
    }
    return CQRS_ERR_OK;
}

cqrs_docstore_t *cqrs_docstore_new(const char *url, int timeout_ms, cqrs_error_t *err)
{
    cqrs_docstore_t *ds = calloc(1, sizeof *ds);
    if (!ds) {
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    if (cqrs_redis_url_parse(url, &ds->addr, err) != CQRS_ERR_OK) {
        free(ds);
        return NULL;
    }
    ds->timeout_ms = timeout_ms > 0 ? timeout_ms : 2000;
    return ds;
}

static void disconnect(cqrs_docstore_t *ds)
{
    if (ds->c) {
        redisFree(ds->c);
        ds->c = NULL;
    }
    ds->sha[0] = '\0';
}

void cqrs_docstore_destroy(cqrs_docstore_t *ds)
{
    if (!ds)
        return;
    disconnect(ds);
    free(ds);
}

/* Runs a command; on a transport error drops the connection. Caller frees the reply. */
static cqrs_err_t command(cqrs_docstore_t *ds, int argc, const char **argv, const size_t *lens,
                          redisReply **out, cqrs_error_t *err);

static cqrs_err_t connect_ds(cqrs_docstore_t *ds, cqrs_error_t *err)
{
    if (ds->c)
        return CQRS_ERR_OK;
    struct timeval tv = {ds->timeout_ms / 1000, (ds->timeout_ms % 1000) * 1000};
    redisContext *c = redisConnectWithTimeout(ds->addr.host, ds->addr.port, tv);
    if (!c || c->err) {
        cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "cannot connect to Redis %s:%d: %s",
                       ds->addr.host, ds->addr.port, c ? c->errstr : "out of memory");
        if (c)
            redisFree(c);
        return CQRS_ERR_UNAVAILABLE;
    }
    redisSetTimeout(c, tv);
    redisEnableKeepAlive(c);
    ds->c = c;
    redisReply *r = NULL;
    cqrs_err_t rc = CQRS_ERR_OK;
    if (ds->addr.password[0]) {
        const char *argv[] = {"AUTH", ds->addr.password};
        rc = command(ds, 2, argv, NULL, &r, err);
        freeReplyObject(r);
        if (rc != CQRS_ERR_OK)
            return rc;
    }
    if (ds->addr.db != 0) {
        char db[12];
        snprintf(db, sizeof db, "%d", ds->addr.db);
        const char *argv[] = {"SELECT", db};
        rc = command(ds, 2, argv, NULL, &r, err);
        freeReplyObject(r);
    }
    return rc;
}

static cqrs_err_t command(cqrs_docstore_t *ds, int argc, const char **argv, const size_t *lens,
                          redisReply **out, cqrs_error_t *err)
{
    *out = NULL;
    cqrs_err_t rc = connect_ds(ds, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    redisReply *r = redisCommandArgv(ds->c, argc, argv, lens);
    if (!r) {
        cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "Redis: %s", ds->c->errstr);
        disconnect(ds);
        return CQRS_ERR_UNAVAILABLE;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        /* LOADING, BUSY, MASTERDOWN, READONLY are transient states of a healthy server;
         * NOSCRIPT is handled by the caller. */
        cqrs_err_t code =
            (strncmp(r->str, "NOSCRIPT", 8) == 0) ? CQRS_ERR_STATE
            : (strncmp(r->str, "LOADING", 7) == 0 || strncmp(r->str, "BUSY", 4) == 0 ||
               strncmp(r->str, "MASTERDOWN", 10) == 0 || strncmp(r->str, "READONLY", 8) == 0)
                ? CQRS_ERR_UNAVAILABLE
                : CQRS_ERR_INTERNAL;
        cqrs_error_set(err, code, "Redis: %s", r->str);
        freeReplyObject(r);
        return code;
    }
    *out = r;
    return CQRS_ERR_OK;
}

cqrs_err_t cqrs_docstore_ping(cqrs_docstore_t *ds, cqrs_error_t *err)
{
    const char *argv[] = {"PING"};
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, 1, argv, NULL, &r, err);
    freeReplyObject(r);
    return rc;
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

static cqrs_err_t load_script(cqrs_docstore_t *ds, cqrs_error_t *err)
{
    const char *argv[] = {"SCRIPT", "LOAD", APPLY_LUA};
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, 3, argv, NULL, &r, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    if (r->type == REDIS_REPLY_STRING && r->len == 40)
        memcpy(ds->sha, r->str, 41);
    else
        rc = cqrs_error_set(err, CQRS_ERR_INTERNAL, "Redis: unexpected SCRIPT LOAD reply");
    freeReplyObject(r);
    return rc;
}

static cqrs_err_t run_apply(cqrs_docstore_t *ds, const cqrs_apply_t *a, bool dead,
                            cqrs_apply_result_t *result, cqrs_error_t *err)
{
    size_t nkeys = 5 + a->n_ops, nargs = 10 + 4 * a->n_ops;
    size_t argc = 3 + nkeys + nargs;
    const char **argv = calloc(argc, sizeof *argv);
    char(*num)[32] = calloc(6 + 2 * a->n_ops, sizeof *num);
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
    size_t k = 0;
    argv[k++] = "EVALSHA";
    argv[k++] = NULL; /* the script's sha, set below */
    argv[k++] = num[0];
    argv[k++] = a->key;
    argv[k++] = a->offsets_key;
    argv[k++] = a->dlq_key;
    argv[k++] = CQRS_DLQ_INDEX_KEY;
    argv[k++] = CQRS_META_KEY;
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
    for (size_t i = 0; i < a->n_ops; i++) {
        char *keyno = num[6 + 2 * i], *score = num[7 + 2 * i];
        snprintf(keyno, 32, "%zu", 6 + i);
        snprintf(score, 32, "%.17g", a->ops[i].score);
        argv[k++] = a->ops[i].op == CQRS_INDEX_ZADD ? "ZADD" : "ZREM";
        argv[k++] = keyno;
        argv[k++] = score;
        argv[k++] = a->ops[i].member;
    }
    cqrs_err_t rc = CQRS_ERR_OK;
    for (int attempt = 0; attempt < 2; attempt++) {
        if (!ds->sha[0] || !ds->c) {
            rc = connect_ds(ds, err);
            if (rc == CQRS_ERR_OK)
                rc = load_script(ds, err);
            if (rc != CQRS_ERR_OK)
                break;
        }
        argv[1] = ds->sha;
        redisReply *r = NULL;
        rc = command(ds, (int)k, argv, NULL, &r, err);
        if (rc == CQRS_ERR_STATE) {
            /* NOSCRIPT: the server restarted or flushed its script cache. */
            ds->sha[0] = '\0';
            continue;
        }
        if (rc != CQRS_ERR_OK)
            break;
        if (r->type != REDIS_REPLY_INTEGER || r->integer < -2 || r->integer > 3)
            rc = cqrs_error_set(err, CQRS_ERR_INTERNAL, "Redis: unexpected apply reply");
        else
            *result = (cqrs_apply_result_t)r->integer;
        freeReplyObject(r);
        break;
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

cqrs_err_t cqrs_docstore_ensure_meta(cqrs_docstore_t *ds, cqrs_error_t *err)
{
    char now[32];
    snprintf(now, sizeof now, "%lld", (long long)time(NULL));
    const char *argv[] = {"HSETNX", CQRS_META_KEY, "created", now};
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, 4, argv, NULL, &r, err);
    freeReplyObject(r);
    return rc;
}

cqrs_err_t cqrs_docstore_undecodable(cqrs_docstore_t *ds, const char *blob, cqrs_error_t *err)
{
    const char *argv[] = {"RPUSH", "cqrs:dlq:undecodable", blob};
    redisReply *r = NULL;
    cqrs_err_t rc = command(ds, 3, argv, NULL, &r, err);
    freeReplyObject(r);
    return rc;
}

cqrs_err_t cqrs_docstore_offset(cqrs_docstore_t *ds, const char *offsets_key, int32_t partition,
                                int64_t *offset, cqrs_error_t *err)
{
    char part[12];
    snprintf(part, sizeof part, "%d", partition);
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

/* ---- pool -------------------------------------------------------------------------------- */

struct cqrs_docstore_pool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned size;
    cqrs_docstore_t **all;
    bool *busy;
};

cqrs_docstore_pool_t *cqrs_docstore_pool_new(const char *url, int timeout_ms, unsigned size,
                                             cqrs_error_t *err)
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
        p->all[i] = cqrs_docstore_new(url, timeout_ms, err);
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
