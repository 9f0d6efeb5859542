/* redisdb.h — a private Redis database for a test: the stack's Redis (CQRS_REDIS_URL) with
 * another database number, so a test may flush it without touching anything else. */
#ifndef CQRS_TEST_REDISDB_H
#define CQRS_TEST_REDISDB_H

#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cqrs/docstore.h>

/* Writes "redis://host:port/<db>" for the stack's Redis into out; 0 on success. */
static inline int redisdb_url(const char *base, int db, char *out, size_t cap)
{
    cqrs_redis_addr_t a;
    cqrs_error_t err;
    if (cqrs_redis_url_parse(base, &a, &err) != CQRS_ERR_OK)
        return -1;
    int n = a.password[0]
                ? snprintf(out, cap, "redis://:%.200s@%.200s:%d/%d", a.password, a.host, a.port, db)
                : snprintf(out, cap, "redis://%.200s:%d/%d", a.host, a.port, db);
    return n > 0 && (size_t)n < cap ? 0 : -1;
}

/* A connection to that database (caller frees with redisFree); NULL when unreachable. */
static inline redisContext *redisdb_connect(const char *url)
{
    cqrs_redis_addr_t a;
    cqrs_error_t err;
    if (cqrs_redis_url_parse(url, &a, &err) != CQRS_ERR_OK)
        return NULL;
    redisContext *c = redisConnect(a.host, a.port);
    if (!c || c->err) {
        if (c)
            redisFree(c);
        return NULL;
    }
    if (a.password[0])
        freeReplyObject(redisCommand(c, "AUTH %s", a.password));
    freeReplyObject(redisCommand(c, "SELECT %d", a.db));
    return c;
}

/* Runs one command (printf-style) on that database; returns the reply (caller frees). */
static inline redisReply *redisdb_cmd(const char *url, const char *fmt, const char *arg)
{
    redisContext *c = redisdb_connect(url);
    if (!c)
        return NULL;
    redisReply *r = arg ? redisCommand(c, fmt, arg) : redisCommand(c, fmt);
    redisFree(c);
    return r;
}

#endif
