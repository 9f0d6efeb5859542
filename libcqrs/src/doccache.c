/* doccache.c — see doccache.h. 64 shards, each a chained hash table plus a FIFO list for
 * eviction, under its own mutex. */
#include "cqrs/doccache.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "cqrs/util.h"

#define SHARDS 64
#define ENTRY_OVERHEAD 96 /* struct, allocator slack */

typedef struct entry {
    struct entry *next; /* hash chain */
    struct entry *fifo_prev, *fifo_next;
    uint64_t hash;
    int64_t version;
    size_t len, cost;
    char *json;
    char key[];
} entry_t;

typedef struct shard {
    pthread_mutex_t mu;
    entry_t **buckets;
    size_t n_buckets, n;
    entry_t *oldest, *newest;
    size_t bytes;
    uint64_t seq; /* announcements seen */
} shard_t;

struct cqrs_doccache {
    size_t max_bytes, shard_max;
    atomic_bool enabled;
    atomic_uint_fast64_t epoch;
    atomic_uint_fast64_t hits, misses, fills, refused, evictions, resets;
    shard_t shards[SHARDS];
};

static shard_t *shard_of(cqrs_doccache_t *c, uint64_t h)
{
    return &c->shards[(h >> 58) % SHARDS];
}

cqrs_doccache_t *cqrs_doccache_new(size_t max_bytes)
{
    cqrs_doccache_t *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->max_bytes = max_bytes;
    c->shard_max = max_bytes / SHARDS;
    for (int i = 0; i < SHARDS; i++)
        pthread_mutex_init(&c->shards[i].mu, NULL);
    return c;
}

static entry_t **find_slot(shard_t *s, const char *key, uint64_t h)
{
    if (!s->n_buckets)
        return NULL;
    entry_t **p = &s->buckets[h & (s->n_buckets - 1)];
    while (*p && ((*p)->hash != h || strcmp((*p)->key, key) != 0))
        p = &(*p)->next;
    return p;
}

static void unlink_entry(shard_t *s, entry_t **slot)
{
    entry_t *e = *slot;
    *slot = e->next;
    if (e->fifo_prev)
        e->fifo_prev->fifo_next = e->fifo_next;
    else
        s->oldest = e->fifo_next;
    if (e->fifo_next)
        e->fifo_next->fifo_prev = e->fifo_prev;
    else
        s->newest = e->fifo_prev;
    s->bytes -= e->cost;
    s->n--;
    free(e->json);
    free(e);
}

static void clear_shard(shard_t *s)
{
    for (entry_t *e = s->oldest, *next; e; e = next) {
        next = e->fifo_next;
        free(e->json);
        free(e);
    }
    free(s->buckets);
    s->buckets = NULL;
    s->n_buckets = s->n = s->bytes = 0;
    s->oldest = s->newest = NULL;
}

void cqrs_doccache_destroy(cqrs_doccache_t *c)
{
    if (!c)
        return;
    for (int i = 0; i < SHARDS; i++) {
        clear_shard(&c->shards[i]);
        pthread_mutex_destroy(&c->shards[i].mu);
    }
    free(c);
}

bool cqrs_doccache_get(cqrs_doccache_t *c, const char *key, int64_t min_version, char **json,
                       int64_t *version)
{
    if (!atomic_load(&c->enabled) || !c->max_bytes) {
        atomic_fetch_add(&c->misses, 1);
        return false;
    }
    uint64_t h = cqrs_hash64(key);
    shard_t *s = shard_of(c, h);
    bool hit = false;
    pthread_mutex_lock(&s->mu);
    entry_t **slot = find_slot(s, key, h);
    if (slot && *slot && (*slot)->version >= min_version) {
        entry_t *e = *slot;
        *json = malloc(e->len + 1);
        if (*json) {
            memcpy(*json, e->json, e->len + 1);
            *version = e->version;
            hit = true;
        }
    }
    pthread_mutex_unlock(&s->mu);
    atomic_fetch_add(hit ? &c->hits : &c->misses, 1);
    return hit;
}

cqrs_doccache_ticket_t cqrs_doccache_ticket(cqrs_doccache_t *c, const char *key)
{
    cqrs_doccache_ticket_t t = {0, 0, false};
    if (!atomic_load(&c->enabled) || !c->max_bytes)
        return t;
    shard_t *s = shard_of(c, cqrs_hash64(key));
    t.epoch = atomic_load(&c->epoch);
    pthread_mutex_lock(&s->mu);
    t.seq = s->seq;
    pthread_mutex_unlock(&s->mu);
    t.valid = true;
    return t;
}

static bool grow(shard_t *s)
{
    size_t nb = s->n_buckets ? s->n_buckets * 2 : 64;
    entry_t **b = calloc(nb, sizeof *b);
    if (!b)
        return false;
    for (entry_t *e = s->oldest; e; e = e->fifo_next) {
        e->next = b[e->hash & (nb - 1)];
        b[e->hash & (nb - 1)] = e;
    }
    free(s->buckets);
    s->buckets = b;
    s->n_buckets = nb;
    return true;
}

void cqrs_doccache_put(cqrs_doccache_t *c, const char *key, cqrs_doccache_ticket_t t,
                       int64_t version, const char *json, size_t len)
{
    if (!t.valid)
        return;
    size_t klen = strlen(key);
    size_t cost = sizeof(entry_t) + klen + 1 + len + 1 + ENTRY_OVERHEAD;
    if (cost > c->shard_max / 4)
        return; /* one document may not take a large part of its shard */
    uint64_t h = cqrs_hash64(key);
    shard_t *s = shard_of(c, h);
    pthread_mutex_lock(&s->mu);
    if (!atomic_load(&c->enabled) || atomic_load(&c->epoch) != t.epoch || s->seq != t.seq) {
        pthread_mutex_unlock(&s->mu);
        atomic_fetch_add(&c->refused, 1);
        return;
    }
    entry_t **slot = find_slot(s, key, h);
    if (slot && *slot) {
        if ((*slot)->version >= version) {
            pthread_mutex_unlock(&s->mu);
            return;
        }
        unlink_entry(s, slot);
    }
    while (s->oldest && s->bytes + cost > c->shard_max) {
        entry_t *old = s->oldest;
        unlink_entry(s, find_slot(s, old->key, old->hash));
        atomic_fetch_add(&c->evictions, 1);
    }
    if (s->n + 1 > s->n_buckets && !grow(s)) {
        pthread_mutex_unlock(&s->mu);
        return;
    }
    entry_t *e = malloc(sizeof *e + klen + 1);
    char *copy = e ? malloc(len + 1) : NULL;
    if (!e || !copy) {
        free(e);
        pthread_mutex_unlock(&s->mu);
        return;
    }
    memcpy(e->key, key, klen + 1);
    memcpy(copy, json, len);
    copy[len] = '\0';
    e->json = copy;
    e->len = len;
    e->cost = cost;
    e->hash = h;
    e->version = version;
    e->next = s->buckets[h & (s->n_buckets - 1)];
    s->buckets[h & (s->n_buckets - 1)] = e;
    e->fifo_next = NULL;
    e->fifo_prev = s->newest;
    if (s->newest)
        s->newest->fifo_next = e;
    else
        s->oldest = e;
    s->newest = e;
    s->bytes += cost;
    s->n++;
    pthread_mutex_unlock(&s->mu);
    atomic_fetch_add(&c->fills, 1);
}

void cqrs_doccache_announce(cqrs_doccache_t *c, const char *key, int64_t version)
{
    uint64_t h = cqrs_hash64(key);
    shard_t *s = shard_of(c, h);
    pthread_mutex_lock(&s->mu);
    s->seq++;
    entry_t **slot = find_slot(s, key, h);
    if (slot && *slot && (*slot)->version < version)
        unlink_entry(s, slot);
    pthread_mutex_unlock(&s->mu);
}

void cqrs_doccache_reset(cqrs_doccache_t *c, bool enabled)
{
    /* Refuse fills of earlier tickets first, then empty the shards. */
    atomic_fetch_add(&c->epoch, 1);
    atomic_store(&c->enabled, false);
    for (int i = 0; i < SHARDS; i++) {
        pthread_mutex_lock(&c->shards[i].mu);
        clear_shard(&c->shards[i]);
        pthread_mutex_unlock(&c->shards[i].mu);
    }
    atomic_fetch_add(&c->resets, 1);
    atomic_store(&c->enabled, enabled);
}

void cqrs_doccache_stats(cqrs_doccache_t *c, cqrs_doccache_stats_t *out)
{
    memset(out, 0, sizeof *out);
    out->hits = atomic_load(&c->hits);
    out->misses = atomic_load(&c->misses);
    out->fills = atomic_load(&c->fills);
    out->refused = atomic_load(&c->refused);
    out->evictions = atomic_load(&c->evictions);
    out->resets = atomic_load(&c->resets);
    out->max_bytes = c->max_bytes;
    out->enabled = atomic_load(&c->enabled);
    for (int i = 0; i < SHARDS; i++) {
        pthread_mutex_lock(&c->shards[i].mu);
        out->entries += c->shards[i].n;
        out->bytes += c->shards[i].bytes;
        pthread_mutex_unlock(&c->shards[i].mu);
    }
}
