/* changefeed.c — see changefeed.h. A blocking hiredis context (redis.h connects it: TLS, AUTH,
 * SELECT, the command timeout), read only when poll(2) says bytes arrived, so the thread can
 * stop and ping while idle; the context's timeout bounds a read that stalls mid-message (a
 * TLS record cut short) and every write. */
#define _GNU_SOURCE
#include "cqrs/changefeed.h"

#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cqrs/docstore.h"
#include "cqrs/rcluster.h"
#include "cqrs/log.h"
#include "cqrs/redis.h"
#include "cqrs/util.h"

#define PING_EVERY_MS 1000
#define SILENCE_LIMIT_MS 3000 /* no byte (not even a pong) for this long: the link is dead */
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 2000

struct cqrs_changefeed {
    cqrs_redis_target_t target;
    cqrs_rconn_t *rc; /* the nodes of a cluster: where to listen when the URL's node is down */
    char channel[64];
    int timeout_ms;
    cqrs_changefeed_handlers_t h;
    pthread_t thread;
    int wake[2]; /* pipe: stop */
    atomic_bool stop;
    atomic_bool connected;
    atomic_uint_fast64_t messages, reconnects;
};

bool cqrs_changefeed_parse(const char *msg, size_t len, char *key, size_t cap, int64_t *version,
                           bool *reset)
{
    *reset = false;
    if (len == 1 && msg[0] == '*') {
        *reset = true;
        return true;
    }
    const char *sp = NULL;
    for (size_t i = len; i > 0; i--)
        if (msg[i - 1] == ' ') {
            sp = msg + i - 1;
            break;
        }
    if (!sp || sp == msg || (size_t)(sp - msg) >= cap)
        return false;
    char num[24];
    size_t nlen = len - (size_t)(sp - msg) - 1;
    if (nlen == 0 || nlen >= sizeof num)
        return false;
    memcpy(num, sp + 1, nlen);
    num[nlen] = '\0';
    if (!cqrs_parse_int64(num, version) || *version < 1)
        return false;
    memcpy(key, msg, (size_t)(sp - msg));
    key[sp - msg] = '\0';
    return true;
}

/* Sleeps up to ms unless stopped; returns false when stopping. */
static bool nap(cqrs_changefeed_t *f, int ms)
{
    struct pollfd p = {f->wake[0], POLLIN, 0};
    poll(&p, 1, ms);
    return !atomic_load(&f->stop);
}

static bool flush_out(redisContext *c)
{
    int done = 0;
    while (!done)
        if (redisBufferWrite(c, &done) != REDIS_OK)
            return false;
    return true;
}

/* Sends a command and waits (bounded) for its reply; NULL on failure. */
static redisReply *call(cqrs_changefeed_t *f, redisContext *c, int argc, const char **argv)
{
    if (redisAppendCommandArgv(c, argc, argv, NULL) != REDIS_OK || !flush_out(c))
        return NULL;
    void *reply = NULL;
    int64_t deadline = cqrs_monotonic_ms() + f->timeout_ms;
    while (!reply) {
        if (redisGetReplyFromReader(c, &reply) != REDIS_OK)
            return NULL;
        if (reply)
            break;
        int64_t left = deadline - cqrs_monotonic_ms();
        if (left <= 0 || atomic_load(&f->stop))
            return NULL;
        struct pollfd p[2] = {{c->fd, POLLIN, 0}, {f->wake[0], POLLIN, 0}};
        if (poll(p, 2, (int)left) > 0 && (p[0].revents & (POLLIN | POLLHUP | POLLERR)))
            if (redisBufferRead(c) != REDIS_OK)
                return NULL;
    }
    return reply;
}

/* A subscribed connection to t's server; NULL with the reason in *err. */
static redisContext *subscribe_to(cqrs_changefeed_t *f, const cqrs_redis_target_t *t,
                                  cqrs_error_t *err)
{
    redisContext *c = cqrs_redis_connect(t, f->timeout_ms, err);
    if (!c)
        return NULL;
    const char *argv[] = {"SUBSCRIBE", f->channel};
    redisReply *r = call(f, c, 2, argv);
    bool ok = r && r->type == REDIS_REPLY_ARRAY && r->elements == 3 &&
              r->element[0]->type == REDIS_REPLY_STRING &&
              strcmp(r->element[0]->str, "subscribe") == 0;
    if (!ok)
        cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "SUBSCRIBE %s failed: %.120s", f->channel,
                       r && r->type == REDIS_REPLY_ERROR ? r->str
                       : c->err                          ? c->errstr
                                                         : "no confirmation");
    freeReplyObject(r);
    if (!ok) {
        redisFree(c);
        return NULL;
    }
    return c;
}

/* A subscribed connection: to the URL's node, else (a cluster, whose every node gets every
 * PUBLISH) to another primary the cluster client knows. */
static redisContext *subscribe(cqrs_changefeed_t *f, cqrs_error_t *err)
{
    redisContext *c = subscribe_to(f, &f->target, err);
    cqrs_error_t e2;
    if (c) {
        cqrs_rconn_nodes(f->rc, &e2); /* learns (or refreshes) the cluster's nodes */
        if (!cqrs_rconn_is_cluster(f->rc))
            cqrs_rconn_close(f->rc); /* one server: nothing else to listen on */
        return c;
    }
    if (!cqrs_rconn_is_cluster(f->rc))
        return NULL;
    size_t n = cqrs_rconn_nodes(f->rc, &e2);
    for (size_t i = 0; i < n && !c; i++) {
        char name[300];
        const char *colon = NULL;
        if (!cqrs_rconn_node_name(f->rc, i, name, sizeof name) || !(colon = strrchr(name, ':')))
            continue;
        cqrs_redis_target_t t = f->target; /* borrows the file names: not closed */
        snprintf(t.addr.host, sizeof t.addr.host, "%.*s", (int)(colon - name), name);
        t.addr.port = atoi(colon + 1);
        if (strcmp(t.addr.host, f->target.addr.host) == 0 && t.addr.port == f->target.addr.port)
            continue;
        c = subscribe_to(f, &t, &e2);
    }
    return c;
}

static void handle(cqrs_changefeed_t *f, redisReply *r)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 3 ||
        r->element[0]->type != REDIS_REPLY_STRING || strcmp(r->element[0]->str, "message") != 0 ||
        r->element[2]->type != REDIS_REPLY_STRING)
        return; /* pong and subscription confirmations */
    atomic_fetch_add(&f->messages, 1);
    char key[CQRS_KEY_MAX];
    int64_t version = 0;
    bool reset = false;
    if (!cqrs_changefeed_parse(r->element[2]->str, r->element[2]->len, key, sizeof key, &version,
                               &reset))
        return;
    if (reset) {
        /* info: also every new shard announces itself so (a fresh store); the projector warns
         * of a real loss itself */
        CQRS_LOG_INFO("change feed: a shard was found empty or switched; forgetting cached state");
        f->h.reset(f->h.ud);
    } else {
        f->h.change(f->h.ud, key, version);
    }
}

/* Reads announcements until the link fails or the feed stops. */
static void listen_on(cqrs_changefeed_t *f, redisContext *c)
{
    int64_t last_rx = cqrs_monotonic_ms(), last_ping = last_rx;
    for (;;) {
        void *reply = NULL;
        while (redisGetReplyFromReader(c, &reply) == REDIS_OK && reply) {
            handle(f, reply);
            freeReplyObject(reply);
            reply = NULL;
        }
        if (c->err || atomic_load(&f->stop))
            return;
        int64_t now = cqrs_monotonic_ms();
        if (now - last_rx > SILENCE_LIMIT_MS) {
            CQRS_LOG_WARN("change feed: Redis went silent; reconnecting");
            return;
        }
        if (now - last_ping >= PING_EVERY_MS) {
            const char *argv[] = {"PING"};
            if (redisAppendCommandArgv(c, 1, argv, NULL) != REDIS_OK || !flush_out(c))
                return;
            last_ping = now;
        }
        struct pollfd p[2] = {{c->fd, POLLIN, 0}, {f->wake[0], POLLIN, 0}};
        int n = poll(p, 2, PING_EVERY_MS / 3);
        if (n < 0 && errno != EINTR)
            return;
        if (n > 0 && (p[0].revents & (POLLIN | POLLHUP | POLLERR))) {
            if (redisBufferRead(c) != REDIS_OK)
                return;
            last_rx = cqrs_monotonic_ms();
        }
    }
}

static void *run(void *arg)
{
    cqrs_changefeed_t *f = arg;
    int backoff = BACKOFF_MIN_MS;
    bool first = true;
    char last_error[sizeof((cqrs_error_t *)0)->message] = "";
    while (!atomic_load(&f->stop)) {
        cqrs_error_t err;
        redisContext *c = subscribe(f, &err);
        if (!c) {
            /* once per distinct reason, not once per retry: a refused TLS handshake or AUTH
             * is a configuration problem the operator must see */
            if (strcmp(err.message, last_error) != 0) {
                CQRS_LOG_WARN("change feed: cannot subscribe; retrying", "error", err.message);
                snprintf(last_error, sizeof last_error, "%s", err.message);
            }
            if (!nap(f, backoff))
                break;
            backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
            continue;
        }
        backoff = BACKOFF_MIN_MS;
        last_error[0] = '\0';
        if (!first)
            atomic_fetch_add(&f->reconnects, 1);
        CQRS_LOG_INFO("change feed subscribed", "channel", f->channel);
        first = false;
        atomic_store(&f->connected, true);
        f->h.reset(f->h.ud); /* announcements may have been missed while not subscribed */
        listen_on(f, c);
        atomic_store(&f->connected, false);
        f->h.down(f->h.ud);
        redisFree(c);
        if (!atomic_load(&f->stop)) {
            CQRS_LOG_WARN("change feed lost; reconnecting", "channel", f->channel);
            nap(f, BACKOFF_MIN_MS);
        }
    }
    return NULL;
}

cqrs_changefeed_t *cqrs_changefeed_start(const cqrs_redis_config_t *redis, int timeout_ms,
                                         const cqrs_changefeed_handlers_t *h, cqrs_error_t *err)
{
    cqrs_changefeed_t *f = calloc(1, sizeof *f);
    if (!f) {
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    if (cqrs_redis_target_init(&f->target, redis, err) != CQRS_ERR_OK) {
        cqrs_redis_target_close(&f->target);
        free(f);
        return NULL;
    }
    cqrs_docstore_channel(f->target.prefix, f->target.addr.db, f->channel, sizeof f->channel);
    f->timeout_ms = timeout_ms > 0 ? timeout_ms : 2000;
    f->rc = cqrs_rconn_new(&f->target, f->timeout_ms);
    if (!f->rc) {
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        cqrs_redis_target_close(&f->target);
        free(f);
        return NULL;
    }
    f->h = *h;
    if (pipe2(f->wake, O_CLOEXEC) != 0) {
        cqrs_error_set(err, CQRS_ERR_INTERNAL, "pipe: %s", strerror(errno));
        cqrs_rconn_free(f->rc);
        cqrs_redis_target_close(&f->target);
        free(f);
        return NULL;
    }
    if (pthread_create(&f->thread, NULL, run, f) != 0) {
        cqrs_error_set(err, CQRS_ERR_INTERNAL, "cannot start the change feed thread");
        close(f->wake[0]);
        close(f->wake[1]);
        cqrs_rconn_free(f->rc);
        cqrs_redis_target_close(&f->target);
        free(f);
        return NULL;
    }
    return f;
}

void cqrs_changefeed_stats(cqrs_changefeed_t *f, cqrs_changefeed_stats_t *out)
{
    out->connected = atomic_load(&f->connected);
    out->messages = atomic_load(&f->messages);
    out->reconnects = atomic_load(&f->reconnects);
}

void cqrs_changefeed_stop(cqrs_changefeed_t *f)
{
    if (!f)
        return;
    atomic_store(&f->stop, true);
    ssize_t w = write(f->wake[1], "x", 1);
    (void)w;
    pthread_join(f->thread, NULL);
    close(f->wake[0]);
    close(f->wake[1]);
    cqrs_rconn_free(f->rc);
    cqrs_redis_target_close(&f->target);
    free(f);
}
