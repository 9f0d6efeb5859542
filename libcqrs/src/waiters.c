/* waiters.c — see waiters.h. One mutex; a chained hash of parked requests by key and a list of
 * all of them for the timer's scan (every TICK_MS; a few thousand entries cost microseconds). */
#include "cqrs/waiters.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cqrs/util.h"

#define BUCKETS 4096
#define TICK_MS 20

typedef struct node {
    struct node *chain;       /* same bucket */
    struct node *prev, *next; /* all nodes */
    bool watch;
    uint64_t hash;
    cqrs_http_request_t *req;
    int64_t min_version, deadline_ms;  /* waits */
    int64_t announced, last_keepalive; /* watches */
    bool keepalive_due, reset, woken;
    cqrs_waiters_t *hub;
    char key[];
} node_t;

struct cqrs_watch {
    node_t n;
};

struct cqrs_waiters {
    cqrs_waiters_config_t cfg;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t timer;
    bool closed, stop, feed_up;
    int64_t last_poll;
    node_t *buckets[BUCKETS];
    node_t *all;
    uint64_t n_waits, n_watches, by_change, by_deadline, refused;
};

static void link_node(cqrs_waiters_t *w, node_t *n)
{
    node_t **b = &w->buckets[n->hash % BUCKETS];
    n->chain = *b;
    *b = n;
    n->prev = NULL;
    n->next = w->all;
    if (w->all)
        w->all->prev = n;
    w->all = n;
}

static void unlink_node(cqrs_waiters_t *w, node_t *n)
{
    node_t **p = &w->buckets[n->hash % BUCKETS];
    while (*p && *p != n)
        p = &(*p)->chain;
    if (*p)
        *p = n->chain;
    if (n->prev)
        n->prev->next = n->next;
    else
        w->all = n->next;
    if (n->next)
        n->next->prev = n->prev;
}

/* Called with mu held. A wait is forgotten before its request is woken: once woken, the
 * request may complete at any time. */
static void fire_wait(cqrs_waiters_t *w, node_t *n)
{
    unlink_node(w, n);
    w->n_waits--;
    cqrs_http_wake(n->req);
    free(n);
}

static void *timer_main(void *arg)
{
    cqrs_waiters_t *w = arg;
    pthread_mutex_lock(&w->mu);
    while (!w->stop) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += TICK_MS * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&w->cv, &w->mu, &ts);
        if (w->stop)
            break;
        int64_t now = cqrs_monotonic_ms();
        bool poll_all = !w->feed_up && now - w->last_poll >= w->cfg.poll_ms;
        if (poll_all)
            w->last_poll = now;
        for (node_t *n = w->all, *next; n; n = next) {
            next = n->next;
            if (!n->watch) {
                if (now >= n->deadline_ms || poll_all) {
                    if (now >= n->deadline_ms)
                        w->by_deadline++;
                    fire_wait(w, n);
                }
            } else if (now - n->last_keepalive >= w->cfg.keepalive_ms || (poll_all && !n->woken)) {
                if (now - n->last_keepalive >= w->cfg.keepalive_ms) {
                    n->keepalive_due = true;
                    n->last_keepalive = now;
                }
                if (poll_all)
                    n->reset = true; /* no feed: re-read the store */
                cqrs_http_wake(n->req);
            }
        }
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

cqrs_waiters_t *cqrs_waiters_new(const cqrs_waiters_config_t *cfg)
{
    cqrs_waiters_t *w = calloc(1, sizeof *w);
    if (!w)
        return NULL;
    w->cfg = *cfg;
    if (w->cfg.keepalive_ms <= 0)
        w->cfg.keepalive_ms = 15000;
    if (w->cfg.poll_ms <= 0)
        w->cfg.poll_ms = 100;
    pthread_mutex_init(&w->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&w->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&w->timer, NULL, timer_main, w) != 0) {
        pthread_cond_destroy(&w->cv);
        pthread_mutex_destroy(&w->mu);
        free(w);
        return NULL;
    }
    return w;
}

void cqrs_waiters_close(cqrs_waiters_t *w)
{
    if (!w)
        return;
    pthread_mutex_lock(&w->mu);
    w->closed = true;
    for (node_t *n = w->all, *next; n; n = next) {
        next = n->next;
        if (n->watch)
            cqrs_http_wake(n->req);
        else
            fire_wait(w, n);
    }
    pthread_mutex_unlock(&w->mu);
}

bool cqrs_waiters_closed(cqrs_waiters_t *w)
{
    pthread_mutex_lock(&w->mu);
    bool c = w->closed;
    pthread_mutex_unlock(&w->mu);
    return c;
}

void cqrs_waiters_destroy(cqrs_waiters_t *w)
{
    if (!w)
        return;
    pthread_mutex_lock(&w->mu);
    w->stop = true;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->timer, NULL);
    /* Watches still open belong to requests the HTTP server has already finished. */
    for (node_t *n = w->all, *next; n; n = next) {
        next = n->next;
        free(n);
    }
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    free(w);
}

static node_t *node_new(const char *key, cqrs_http_request_t *req)
{
    size_t len = strlen(key);
    node_t *n = calloc(1, sizeof *n + len + 1);
    if (!n)
        return NULL;
    memcpy(n->key, key, len + 1);
    n->hash = cqrs_hash64(key);
    n->req = req;
    return n;
}

bool cqrs_waiters_wait(cqrs_waiters_t *w, const char *key, int64_t min_version, int64_t deadline_ms,
                       cqrs_http_request_t *req)
{
    node_t *n = node_new(key, req);
    if (!n)
        return false;
    n->min_version = min_version;
    n->deadline_ms = deadline_ms;
    pthread_mutex_lock(&w->mu);
    if (w->closed || w->n_waits >= w->cfg.max_waits) {
        w->refused++;
        pthread_mutex_unlock(&w->mu);
        free(n);
        return false;
    }
    link_node(w, n);
    w->n_waits++;
    pthread_mutex_unlock(&w->mu);
    return true;
}

void cqrs_waiters_cancel(cqrs_waiters_t *w, const char *key, cqrs_http_request_t *req)
{
    uint64_t h = cqrs_hash64(key);
    pthread_mutex_lock(&w->mu);
    for (node_t *n = w->buckets[h % BUCKETS]; n; n = n->chain)
        if (!n->watch && n->req == req) {
            unlink_node(w, n);
            w->n_waits--;
            free(n);
            break;
        }
    pthread_mutex_unlock(&w->mu);
}

cqrs_watch_t *cqrs_watch_begin(cqrs_waiters_t *w, const char *key, cqrs_http_request_t *req)
{
    node_t *n = node_new(key, req);
    if (!n)
        return NULL;
    n->watch = true;
    n->hub = w;
    n->last_keepalive = cqrs_monotonic_ms();
    pthread_mutex_lock(&w->mu);
    if (w->closed || w->n_watches >= w->cfg.max_watches) {
        w->refused++;
        pthread_mutex_unlock(&w->mu);
        free(n);
        return NULL;
    }
    link_node(w, n);
    w->n_watches++;
    pthread_mutex_unlock(&w->mu);
    return (cqrs_watch_t *)n;
}

void cqrs_watch_poll(cqrs_watch_t *watch, cqrs_watch_events_t *out)
{
    node_t *n = &watch->n;
    cqrs_waiters_t *w = n->hub;
    pthread_mutex_lock(&w->mu);
    out->announced = n->announced;
    out->keepalive_due = n->keepalive_due;
    out->reset = n->reset;
    out->closed = w->closed;
    n->announced = 0;
    n->keepalive_due = n->reset = n->woken = false;
    pthread_mutex_unlock(&w->mu);
}

void cqrs_watch_end(cqrs_watch_t *watch)
{
    if (!watch)
        return;
    node_t *n = &watch->n;
    cqrs_waiters_t *w = n->hub;
    pthread_mutex_lock(&w->mu);
    unlink_node(w, n);
    w->n_watches--;
    pthread_mutex_unlock(&w->mu);
    free(n);
}

void cqrs_waiters_announce(cqrs_waiters_t *w, const char *key, int64_t version)
{
    uint64_t h = cqrs_hash64(key);
    pthread_mutex_lock(&w->mu);
    for (node_t *n = w->buckets[h % BUCKETS], *next; n; n = next) {
        next = n->chain;
        if (n->hash != h || strcmp(n->key, key) != 0)
            continue;
        if (n->watch) {
            if (version > n->announced)
                n->announced = version;
            n->woken = true;
            cqrs_http_wake(n->req);
        } else if (version >= n->min_version) {
            w->by_change++;
            fire_wait(w, n);
        }
    }
    pthread_mutex_unlock(&w->mu);
}

void cqrs_waiters_reset(cqrs_waiters_t *w)
{
    pthread_mutex_lock(&w->mu);
    for (node_t *n = w->all, *next; n; n = next) {
        next = n->next;
        if (n->watch) {
            n->reset = true;
            n->woken = true;
            cqrs_http_wake(n->req);
        } else {
            fire_wait(w, n);
        }
    }
    pthread_mutex_unlock(&w->mu);
}

void cqrs_waiters_feed_up(cqrs_waiters_t *w, bool up)
{
    pthread_mutex_lock(&w->mu);
    w->feed_up = up;
    pthread_mutex_unlock(&w->mu);
}

void cqrs_waiters_stats(cqrs_waiters_t *w, cqrs_waiters_stats_t *out)
{
    pthread_mutex_lock(&w->mu);
    out->waits = w->n_waits;
    out->watches = w->n_watches;
    out->woken_by_change = w->by_change;
    out->woken_by_deadline = w->by_deadline;
    out->refused = w->refused;
    pthread_mutex_unlock(&w->mu);
}
