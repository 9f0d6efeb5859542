/* rcluster.c — one logical Redis connection, single server or Redis Cluster (see rcluster.h).
 *
 * DESIGN. The mode is learnt once per connection from the seed's answer to CLUSTER SLOTS and
 * kept until cqrs_rconn_close. In single mode nodes[0] is the server and every call makes one
 * attempt, exactly as a bare hiredis context would: no retry, no reply interpreted.
 *
 * In cluster mode `nodes` holds every node known (after a refresh: the primaries of the map,
 * sorted by address, so that per-node indices are the same on every client) and slot[s] the
 * index of the one serving slot s. Indices change only in refresh(), which callers never run
 * while holding one (ASK targets, pipeline owners are re-derived after it). A MOVED updates its
 * slot at once, so the retry goes to the right node, and schedules a refresh of the whole map
 * for the start of the next call, since a MOVED usually means a reshard or a failover that
 * moved more than one slot. Not before the retry: the node asked for the map may not have heard
 * of the move yet, and its map would send the retry back to the old owner. A failed attempt
 * (connection, CLUSTERDOWN, MASTERDOWN) refreshes before the next one. ASK never touches the
 * map: the slot is still the old node's until the migration ends, and that node says so with
 * MOVED.
 *
 * Every call has one deadline (timeout_ms from its start). Every wait is cut to what is left:
 * connects, the socket timeout of each exchange, the backoff between attempts. Nothing loops
 * without waiting or a deadline check: redirections are free only a few times in a row.
 */
#define _GNU_SOURCE
#include "cqrs/rcluster.h"

#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { MODE_UNKNOWN, MODE_SINGLE, MODE_CLUSTER };
enum { R_DONE, R_MOVED, R_ASK, R_RETRY };

#define FREE_REDIRECTS 5 /* redirections followed in a row before backing off */
#define BACKOFF_MIN_MS 5
#define BACKOFF_MAX_MS 100

typedef struct node {
    char host[256];
    int port;
    unsigned n_slots; /* slots this node serves in the map */
    redisContext *c;  /* NULL: not connected */
} node_t;

struct cqrs_rconn {
    cqrs_redis_target_t target; /* owns its copies of the TLS file names */
    int timeout_ms;
    int mode;
    bool stale; /* the map needs a refresh */
    uint64_t epoch;
    node_t *nodes;
    size_t n_nodes, cap_nodes;
    int slot[CQRS_REDIS_SLOTS]; /* index in nodes; -1: served by no known node */
};

/* One call: its deadline and what went wrong last (named by node), for the final error. */
typedef struct call {
    long long deadline;
    int backoff_ms;
    int redirects;
    char why[256];
} call_t;

/* ---- slots ----------------------------------------------------------------------------- */

/* CRC16/XMODEM (polynomial 0x1021, initial value 0), bit by bit: keys are short. */
static unsigned crc16(const unsigned char *p, size_t len)
{
    unsigned crc = 0;
    for (size_t i = 0; i < len; i++) {
        crc ^= (unsigned)p[i] << 8;
        for (int b = 0; b < 8; b++)
            crc = (crc & 0x8000) ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
    }
    return crc;
}

unsigned cqrs_redis_key_slot(const char *key, size_t len)
{
    const char *open = memchr(key, '{', len);
    if (open) {
        size_t rest = len - (size_t)(open - key) - 1;
        const char *close = memchr(open + 1, '}', rest);
        if (close && close > open + 1)
            return crc16((const unsigned char *)open + 1, (size_t)(close - open - 1)) %
                   CQRS_REDIS_SLOTS;
    }
    return crc16((const unsigned char *)key, len) % CQRS_REDIS_SLOTS;
}

/* ---- time ------------------------------------------------------------------------------ */

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int left_ms(const call_t *cl)
{
    long long left = cl->deadline - now_ms();
    return left > 0 ? (int)left : 0;
}

static void call_start(call_t *cl, const cqrs_rconn_t *rc)
{
    cl->deadline = now_ms() + rc->timeout_ms;
    cl->backoff_ms = 0;
    cl->redirects = 0;
    snprintf(cl->why, sizeof cl->why, "no attempt made");
}

/* Waits before the next attempt: 5, 10, 20… up to 100 ms, never past the deadline. */
static void backoff(call_t *cl)
{
    cl->backoff_ms = cl->backoff_ms ? cl->backoff_ms * 2 : BACKOFF_MIN_MS;
    if (cl->backoff_ms > BACKOFF_MAX_MS)
        cl->backoff_ms = BACKOFF_MAX_MS;
    int ms = left_ms(cl) < cl->backoff_ms ? left_ms(cl) : cl->backoff_ms;
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static cqrs_err_t give_up(const cqrs_rconn_t *rc, const call_t *cl, cqrs_error_t *err)
{
    return cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "Redis cluster: no answer within %d ms: %s",
                          rc->timeout_ms, cl->why);
}

/* ---- nodes ----------------------------------------------------------------------------- */

static void drop(node_t *nd)
{
    if (nd->c) {
        redisFree(nd->c);
        nd->c = NULL;
    }
}

static void drop_all(cqrs_rconn_t *rc)
{
    for (size_t i = 0; i < rc->n_nodes; i++)
        drop(&rc->nodes[i]);
    free(rc->nodes);
    rc->nodes = NULL;
    rc->n_nodes = rc->cap_nodes = 0;
    for (int s = 0; s < CQRS_REDIS_SLOTS; s++)
        rc->slot[s] = -1;
}

static int find_node(const node_t *nodes, size_t n, const char *host, int port)
{
    for (size_t i = 0; i < n; i++)
        if (nodes[i].port == port && strcmp(nodes[i].host, host) == 0)
            return (int)i;
    return -1;
}

/* The index of host:port, added (unconnected, serving nothing) when new; -1 out of memory. */
static int add_node(node_t **nodes, size_t *n, size_t *cap, const char *host, int port)
{
    int i = find_node(*nodes, *n, host, port);
    if (i >= 0)
        return i;
    if (*n == *cap) {
        size_t ncap = *cap ? *cap * 2 : 8;
        node_t *nn = realloc(*nodes, ncap * sizeof *nn);
        if (!nn)
            return -1;
        *nodes = nn;
        *cap = ncap;
    }
    node_t *nd = &(*nodes)[*n];
    memset(nd, 0, sizeof *nd);
    snprintf(nd->host, sizeof nd->host, "%s", host);
    nd->port = port;
    return (int)(*n)++;
}

/* The context of node i, connected if need be, its socket timeout cut to what the call has
 * left; NULL (the reason in cl->why) when it cannot be had in time. */
static redisContext *node_ctx(cqrs_rconn_t *rc, int i, call_t *cl)
{
    node_t *nd = &rc->nodes[i];
    int left = left_ms(cl);
    if (left <= 0)
        return NULL;
    if (!nd->c) {
        cqrs_redis_target_t t = rc->target; /* borrows the file names: not closed */
        snprintf(t.addr.host, sizeof t.addr.host, "%s", nd->host);
        t.addr.port = nd->port;
        cqrs_error_t cerr;
        nd->c = cqrs_redis_connect(&t, left, &cerr);
        if (!nd->c) {
            snprintf(cl->why, sizeof cl->why, "%s", cerr.message);
            return NULL;
        }
    } else {
        struct timeval tv = {left / 1000, (left % 1000) * 1000};
        redisSetTimeout(nd->c, tv);
    }
    return nd->c;
}

/* Sends a command to node i (preceded by ASKING when asking) and reads its reply; NULL after a
 * transport error, which drops that node's context only. */
static redisReply *exchange(cqrs_rconn_t *rc, int i, call_t *cl, bool asking, int argc,
                            const char **argv, const size_t *lens)
{
    redisContext *c = node_ctx(rc, i, cl);
    if (!c)
        return NULL;
    void *r = NULL;
    if ((asking && redisAppendCommand(c, "ASKING") != REDIS_OK) ||
        redisAppendCommandArgv(c, argc, argv, lens) != REDIS_OK)
        goto broken;
    /* ASKING's own reply: an error (an old server) shows again as the command's ASK/MOVED */
    if (asking) {
        if (redisGetReply(c, &r) != REDIS_OK)
            goto broken;
        freeReplyObject(r);
        r = NULL;
    }
    if (redisGetReply(c, &r) != REDIS_OK)
        goto broken;
    return r;
broken:
    snprintf(cl->why, sizeof cl->why, "Redis %.64s:%d: %.120s", rc->nodes[i].host,
             rc->nodes[i].port, c->errstr[0] ? c->errstr : "out of memory");
    drop(&rc->nodes[i]);
    return NULL;
}

static bool is_error(const redisReply *r, const char *code)
{
    size_t n = strlen(code);
    return r->type == REDIS_REPLY_ERROR && strncmp(r->str, code, n) == 0 &&
           (r->str[n] == ' ' || r->str[n] == '\0');
}

static int classify(const redisReply *r)
{
    if (r->type != REDIS_REPLY_ERROR)
        return R_DONE;
    if (is_error(r, "MOVED"))
        return R_MOVED;
    if (is_error(r, "ASK"))
        return R_ASK;
    if (is_error(r, "TRYAGAIN") || is_error(r, "CLUSTERDOWN") || is_error(r, "LOADING") ||
        is_error(r, "MASTERDOWN"))
        return R_RETRY;
    return R_DONE;
}

/* "MOVED <slot> <host>:<port>" or "ASK …" from node `from`: the slot and the index of the node
 * named (an empty host: from's); -1 when malformed or out of memory. */
static int redirect_target(cqrs_rconn_t *rc, const redisReply *r, int from, unsigned *slot)
{
    const char *p = strchr(r->str, ' ');
    char *end;
    unsigned long s = p ? strtoul(p + 1, &end, 10) : CQRS_REDIS_SLOTS;
    if (s >= CQRS_REDIS_SLOTS || *end != ' ')
        return -1;
    const char *addr = end + 1, *colon = strrchr(addr, ':');
    if (!colon)
        return -1;
    long port = strtol(colon + 1, &end, 10);
    char host[256];
    size_t hlen = (size_t)(colon - addr);
    if (*end || port < 1 || port > 65535 || hlen >= sizeof host)
        return -1;
    memcpy(host, addr, hlen);
    host[hlen] = '\0';
    if (!hlen)
        snprintf(host, sizeof host, "%s", rc->nodes[from].host);
    *slot = (unsigned)s;
    return add_node(&rc->nodes, &rc->n_nodes, &rc->cap_nodes, host, (int)port);
}

static void set_slot(cqrs_rconn_t *rc, unsigned s, int i)
{
    if (rc->slot[s] == i)
        return;
    rc->epoch++;
    if (rc->slot[s] >= 0)
        rc->nodes[rc->slot[s]].n_slots--;
    rc->slot[s] = i;
    rc->nodes[i].n_slots++;
}

/* ---- the map --------------------------------------------------------------------------- */

static int by_address(const void *a, const void *b)
{
    const node_t *x = a, *y = b;
    int c = strcmp(x->host, y->host);
    return c ? c : (x->port > y->port) - (x->port < y->port);
}

/* The primary of a CLUSTER SLOTS entry [start, end, [host, port, …], replicas…]: false when
 * malformed. An empty or null host means the node asked ("?": unknown, *host NULL). */
static bool map_entry(const redisReply *e, const char *asked, long long *start, long long *end,
                      const char **host, int *port)
{
    if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
        e->element[0]->type != REDIS_REPLY_INTEGER || e->element[1]->type != REDIS_REPLY_INTEGER)
        return false;
    const redisReply *p = e->element[2];
    if (p->type != REDIS_REPLY_ARRAY || p->elements < 2 ||
        p->element[1]->type != REDIS_REPLY_INTEGER ||
        (p->element[0]->type != REDIS_REPLY_STRING && p->element[0]->type != REDIS_REPLY_NIL))
        return false;
    *start = e->element[0]->integer;
    *end = e->element[1]->integer;
    *port = (int)p->element[1]->integer;
    const char *h = p->element[0]->type == REDIS_REPLY_STRING ? p->element[0]->str : "";
    *host = !h[0] ? asked : strcmp(h, "?") == 0 ? NULL : h;
    return *start >= 0 && *start <= *end && *end<CQRS_REDIS_SLOTS && * port> 0 && *port <= 65535 &&
           (!*host || strlen(*host) < sizeof((node_t *)0)->host);
}

/* Replaces the map with a CLUSTER SLOTS reply of the node at `asked`: the nodes become the
 * primaries it names, sorted by address, keeping the contexts of those already connected and
 * dropping the others'. false, nothing changed, when the reply is not a map. */
static bool apply_map(cqrs_rconn_t *rc, const redisReply *r, const char *asked)
{
    if (r->type != REDIS_REPLY_ARRAY)
        return false;
    node_t *nodes = NULL;
    size_t n = 0, cap = 0;
    int *slot = malloc(CQRS_REDIS_SLOTS * sizeof *slot);
    long long start, end;
    const char *host;
    int port;
    bool ok = slot != NULL;
    for (size_t e = 0; ok && e < r->elements; e++) {
        ok = map_entry(r->element[e], asked, &start, &end, &host, &port);
        if (ok && host)
            ok = add_node(&nodes, &n, &cap, host, port) >= 0;
    }
    if (!ok) {
        free(nodes);
        free(slot);
        return false;
    }
    if (n)
        qsort(nodes, n, sizeof *nodes, by_address);
    for (int s = 0; s < CQRS_REDIS_SLOTS; s++)
        slot[s] = -1;
    for (size_t e = 0; e < r->elements; e++) {
        map_entry(r->element[e], asked, &start, &end, &host, &port);
        int i = host ? find_node(nodes, n, host, port) : -1;
        for (long long s = start; i >= 0 && s <= end; s++)
            slot[s] = i;
    }
    bool changed = false;
    for (int s = 0; s < CQRS_REDIS_SLOTS; s++) {
        if (slot[s] >= 0)
            nodes[slot[s]].n_slots++;
        const node_t *a = rc->slot[s] >= 0 ? &rc->nodes[rc->slot[s]] : NULL;
        const node_t *b = slot[s] >= 0 ? &nodes[slot[s]] : NULL;
        if ((a == NULL) != (b == NULL) || (a && by_address(a, b) != 0))
            changed = true;
    }
    for (size_t i = 0; i < rc->n_nodes; i++) {
        int j = find_node(nodes, n, rc->nodes[i].host, rc->nodes[i].port);
        if (j >= 0) {
            nodes[j].c = rc->nodes[i].c;
            rc->nodes[i].c = NULL;
        }
        drop(&rc->nodes[i]);
    }
    free(rc->nodes);
    rc->nodes = nodes;
    rc->n_nodes = n;
    rc->cap_nodes = cap;
    memcpy(rc->slot, slot, CQRS_REDIS_SLOTS * sizeof *slot);
    free(slot);
    rc->epoch += changed;
    rc->stale = false;
    return true;
}

/* Refreshes the map from the first node that answers: the connected ones first, then the
 * others, the seed last. false (the old map kept, the reason in cl->why) when none did. */
static bool refresh(cqrs_rconn_t *rc, call_t *cl)
{
    static const char *slots[] = {"CLUSTER", "SLOTS"};
    if (add_node(&rc->nodes, &rc->n_nodes, &rc->cap_nodes, rc->target.addr.host,
                 rc->target.addr.port) < 0)
        return false;
    for (int pass = 0; pass < 2; pass++) {
        for (size_t i = 0; i < rc->n_nodes; i++) {
            if ((rc->nodes[i].c != NULL) != (pass == 0))
                continue;
            if (left_ms(cl) <= 0)
                return false;
            redisReply *r = exchange(rc, (int)i, cl, false, 2, slots, NULL);
            if (!r)
                continue;
            char asked[256];
            snprintf(asked, sizeof asked, "%s", rc->nodes[i].host);
            int port = rc->nodes[i].port;
            bool ok = apply_map(rc, r, asked);
            if (!ok)
                snprintf(cl->why, sizeof cl->why,
                         "Redis %.64s:%d: unexpected CLUSTER SLOTS reply%s%.100s", asked, port,
                         r->type == REDIS_REPLY_ERROR ? ": " : "",
                         r->type == REDIS_REPLY_ERROR ? r->str : "");
            freeReplyObject(r);
            if (ok)
                return true;
        }
    }
    return false;
}

/* ---- mode ------------------------------------------------------------------------------ */

/* Connects to the seed and learns the mode from CLUSTER SLOTS (one attempt, as a single
 * server's connect always was: an unreachable server fails fast). */
static cqrs_err_t discover(cqrs_rconn_t *rc, call_t *cl, cqrs_error_t *err)
{
    cqrs_err_t code = CQRS_ERR_OK;
    redisReply *r = NULL;
    cqrs_redis_target_t t = rc->target; /* borrows the file names: not closed */
    const char *host = t.addr.host;
    int port = t.addr.port, db = t.addr.db;
    t.addr.db = 0; /* a cluster refuses SELECT n: the database waits for the mode */
    redisContext *c = cqrs_redis_connect(&t, left_ms(cl) ? left_ms(cl) : 1, err);
    if (!c)
        return CQRS_ERR_UNAVAILABLE;
    r = redisCommand(c, "CLUSTER SLOTS");
    if (!r) {
        code = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "Redis %.64s:%d: CLUSTER SLOTS failed: %s",
                              host, port, c->errstr);
    } else if (r->type == REDIS_REPLY_ERROR && strstr(r->str, "cluster support disabled")) {
        freeReplyObject(r);
        r = db ? redisCommand(c, "SELECT %d", db) : NULL;
        int i = add_node(&rc->nodes, &rc->n_nodes, &rc->cap_nodes, host, port);
        if (db && (!r || r->type == REDIS_REPLY_ERROR))
            code = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE,
                                  "Redis %.64s:%d refused SELECT %d: %.120s", host, port, db,
                                  r ? r->str : c->errstr);
        else if (i < 0)
            code = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        if (code == CQRS_ERR_OK) {
            rc->nodes[i].c = c;
            c = NULL;
            rc->mode = MODE_SINGLE;
        }
    } else if (r->type == REDIS_REPLY_ERROR) {
        bool perm = is_error(r, "NOPERM");
        code = cqrs_error_set(err, perm ? CQRS_ERR_CONFIG : CQRS_ERR_UNAVAILABLE,
                              "Redis %.64s:%d refused CLUSTER SLOTS%s: %.120s", host, port,
                              perm ? " (the user needs +cluster|slots and +asking)" : "", r->str);
    } else if (db != 0) {
        code = cqrs_error_set(err, CQRS_ERR_CONFIG,
                              "CQRS_REDIS_URL selects database %d, but %.64s:%d is a Redis "
                              "Cluster, which has database 0 only",
                              db, host, port);
    } else if (!apply_map(rc, r, host)) {
        code = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE,
                              "Redis %.64s:%d: unexpected CLUSTER SLOTS reply", host, port);
    } else {
        int i = find_node(rc->nodes, rc->n_nodes, host, port);
        if (i >= 0) {
            rc->nodes[i].c = c;
            c = NULL;
        }
        rc->mode = MODE_CLUSTER;
    }
    freeReplyObject(r);
    if (c)
        redisFree(c);
    return code;
}

static cqrs_err_t ready(cqrs_rconn_t *rc, call_t *cl, cqrs_error_t *err)
{
    return rc->mode == MODE_UNKNOWN ? discover(rc, cl, err) : CQRS_ERR_OK;
}

/* ---- commands -------------------------------------------------------------------------- */

/* A primary for a command of no key: a connected one if any. */
static int any_node(const cqrs_rconn_t *rc)
{
    int first = -1;
    for (size_t i = 0; i < rc->n_nodes; i++) {
        if (!rc->nodes[i].n_slots)
            continue;
        if (rc->nodes[i].c)
            return (int)i;
        if (first < 0)
            first = (int)i;
    }
    return first;
}

/* The single server: one attempt. */
static cqrs_err_t single(cqrs_rconn_t *rc, call_t *cl, int argc, const char **argv,
                         const size_t *lens, redisReply **out, cqrs_error_t *err)
{
    *out = exchange(rc, 0, cl, false, argc, argv, lens);
    return *out ? CQRS_ERR_OK : cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "%s", cl->why);
}

static void note(call_t *cl, const node_t *nd, const redisReply *r)
{
    snprintf(cl->why, sizeof cl->why, "Redis %.64s:%d answered %.100s", nd->host, nd->port, r->str);
}

/* A command routed by key (NULL: any primary) in cluster mode, until a final reply or the
 * deadline. */
static cqrs_err_t routed(cqrs_rconn_t *rc, call_t *cl, const char *key, int argc, const char **argv,
                         const size_t *lens, redisReply **out, cqrs_error_t *err)
{
    unsigned slot = key ? cqrs_redis_key_slot(key, strlen(key)) : 0;
    int ask = -1;
    bool moved = false; /* the map is refreshed at the next call, not before the retry */
    cqrs_err_t code = CQRS_ERR_OK;
    while (left_ms(cl) > 0) {
        if (rc->stale && ask < 0)
            refresh(rc, cl);
        int i = ask >= 0 ? ask : key ? rc->slot[slot] : any_node(rc);
        bool asking = ask >= 0;
        ask = -1;
        if (i < 0) {
            snprintf(cl->why, sizeof cl->why, "no known node serves slot %u", slot);
            rc->stale = true;
            backoff(cl);
            continue;
        }
        redisReply *r = exchange(rc, i, cl, asking, argc, argv, lens);
        if (!r) {
            rc->stale = true;
            backoff(cl);
            continue;
        }
        int kind = classify(r);
        if (kind == R_DONE) {
            *out = r;
            goto out;
        }
        note(cl, &rc->nodes[i], r);
        if (kind == R_RETRY) {
            if (is_error(r, "CLUSTERDOWN") || is_error(r, "MASTERDOWN"))
                rc->stale = true;
            backoff(cl);
        } else {
            unsigned s;
            int to = redirect_target(rc, r, i, &s);
            if (to < 0) { /* not a redirection we understand: the caller's to read */
                *out = r;
                goto out;
            }
            if (kind == R_MOVED) {
                set_slot(rc, s, to);
                moved = true;
            } else {
                ask = to;
            }
            if (++cl->redirects > FREE_REDIRECTS)
                backoff(cl);
        }
        freeReplyObject(r);
    }
    code = give_up(rc, cl, err);
out:
    rc->stale |= moved;
    return code;
}

/* ---- public ---------------------------------------------------------------------------- */

cqrs_rconn_t *cqrs_rconn_new(const cqrs_redis_target_t *t, int timeout_ms)
{
    cqrs_rconn_t *rc = calloc(1, sizeof *rc);
    if (!rc)
        return NULL;
    rc->target = *t;
    rc->target.tls_ca_file = t->tls_ca_file ? strdup(t->tls_ca_file) : NULL;
    rc->target.tls_cert_file = t->tls_cert_file ? strdup(t->tls_cert_file) : NULL;
    rc->target.tls_key_file = t->tls_key_file ? strdup(t->tls_key_file) : NULL;
    if ((t->tls_ca_file && !rc->target.tls_ca_file) ||
        (t->tls_cert_file && !rc->target.tls_cert_file) ||
        (t->tls_key_file && !rc->target.tls_key_file)) {
        cqrs_rconn_free(rc);
        return NULL;
    }
    rc->timeout_ms = timeout_ms > 0 ? timeout_ms : 2000;
    for (int s = 0; s < CQRS_REDIS_SLOTS; s++)
        rc->slot[s] = -1;
    return rc;
}

void cqrs_rconn_close(cqrs_rconn_t *rc)
{
    drop_all(rc);
    rc->mode = MODE_UNKNOWN;
    rc->stale = false;
}

void cqrs_rconn_free(cqrs_rconn_t *rc)
{
    if (!rc)
        return;
    cqrs_rconn_close(rc);
    cqrs_redis_target_close(&rc->target);
    free(rc);
}

bool cqrs_rconn_is_cluster(const cqrs_rconn_t *rc)
{
    return rc->mode == MODE_CLUSTER;
}

uint64_t cqrs_rconn_map_epoch(const cqrs_rconn_t *rc)
{
    return rc->epoch;
}

void cqrs_rconn_map_stale(cqrs_rconn_t *rc)
{
    if (rc->mode == MODE_CLUSTER)
        rc->stale = true;
}

cqrs_err_t cqrs_rconn_command(cqrs_rconn_t *rc, const char *route_key, int argc, const char **argv,
                              const size_t *lens, redisReply **out, cqrs_error_t *err)
{
    call_t cl;
    call_start(&cl, rc);
    *out = NULL;
    cqrs_err_t code = ready(rc, &cl, err);
    if (code != CQRS_ERR_OK)
        return code;
    if (rc->mode == MODE_SINGLE)
        return single(rc, &cl, argc, argv, lens, out, err);
    return routed(rc, &cl, route_key, argc, argv, lens, out, err);
}

/* ---- pipelines ------------------------------------------------------------------------- */

/* Sends node i's share of a pipeline (the commands k with owner[k] == i) and writes it out
 * before any reply is read; false when its connection failed (dropped: nothing to read). */
static bool send_share(cqrs_rconn_t *rc, call_t *cl, int i, size_t n, const cqrs_rcmd_t *cmds,
                       const int *owner)
{
    size_t mine = 0;
    while (mine < n && owner[mine] != i)
        mine++;
    if (mine == n)
        return true; /* nothing for this node: no connection made */
    redisContext *c = node_ctx(rc, i, cl);
    if (!c)
        return false;
    for (size_t k = 0; k < n; k++)
        if (owner[k] == i &&
            redisAppendCommandArgv(c, cmds[k].argc, cmds[k].argv, cmds[k].lens) != REDIS_OK)
            goto broken;
    for (int done = 0; !done;)
        if (redisBufferWrite(c, &done) != REDIS_OK)
            goto broken;
    return true;
broken:
    snprintf(cl->why, sizeof cl->why, "Redis %.64s:%d: %.120s", rc->nodes[i].host,
             rc->nodes[i].port, c->errstr[0] ? c->errstr : "out of memory");
    drop(&rc->nodes[i]);
    return false;
}

/* Reads node i's replies in order; after a transport error (or at the deadline) the node is
 * dropped and the rest of its replies stay NULL. */
static void read_share(cqrs_rconn_t *rc, call_t *cl, int i, size_t n, const int *owner,
                       redisReply **replies)
{
    redisContext *c = rc->nodes[i].c;
    int left = left_ms(cl);
    if (!c)
        return;
    if (left <= 0) {
        snprintf(cl->why, sizeof cl->why, "Redis %.64s:%d: no reply in time", rc->nodes[i].host,
                 rc->nodes[i].port);
        drop(&rc->nodes[i]);
        return;
    }
    redisSetTimeout(c, (struct timeval){left / 1000, (left % 1000) * 1000});
    for (size_t k = 0; k < n; k++) {
        void *r = NULL;
        if (owner[k] != i)
            continue;
        if (redisGetReply(c, &r) != REDIS_OK) {
            snprintf(cl->why, sizeof cl->why, "Redis %.64s:%d: %.120s", rc->nodes[i].host,
                     rc->nodes[i].port, c->errstr);
            drop(&rc->nodes[i]);
            return;
        }
        replies[k] = r;
    }
}

cqrs_err_t cqrs_rconn_pipeline(cqrs_rconn_t *rc, size_t n, const cqrs_rcmd_t *cmds,
                               redisReply **replies, cqrs_error_t *err)
{
    call_t cl;
    call_start(&cl, rc);
    for (size_t k = 0; k < n; k++)
        replies[k] = NULL;
    if (n == 0)
        return CQRS_ERR_OK;
    cqrs_err_t code = ready(rc, &cl, err);
    if (code != CQRS_ERR_OK)
        return code;
    bool cluster = rc->mode == MODE_CLUSTER, moved = false;
    if (cluster && rc->stale)
        refresh(rc, &cl);
    int *owner = malloc(n * sizeof *owner);
    if (!owner)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    for (size_t k = 0; k < n; k++) {
        const char *key = cmds[k].route_key;
        owner[k] = !cluster ? 0
                   : key    ? rc->slot[cqrs_redis_key_slot(key, strlen(key))]
                            : any_node(rc);
    }
    for (size_t i = 0; i < rc->n_nodes; i++)
        if (!send_share(rc, &cl, (int)i, n, cmds, owner) && !cluster)
            goto broken;
    for (size_t i = 0; i < rc->n_nodes; i++)
        read_share(rc, &cl, (int)i, n, owner, replies);
    if (!cluster) {
        for (size_t k = 0; k < n; k++)
            if (!replies[k])
                goto broken;
        goto out;
    }
    /* the map first, so that no redone command needs its own MOVED; the refresh waits for
     * the next call (a node that has not heard of the move yet would undo it) */
    for (size_t k = 0; k < n; k++) {
        unsigned s;
        int to;
        if (replies[k] && classify(replies[k]) == R_MOVED &&
            (to = redirect_target(rc, replies[k], owner[k], &s)) >= 0) {
            set_slot(rc, s, to);
            moved = true;
        }
    }
    for (size_t k = 0; k < n; k++) {
        if (replies[k] && classify(replies[k]) == R_DONE)
            continue;
        if (!replies[k])
            rc->stale = true; /* its node failed */
        freeReplyObject(replies[k]);
        replies[k] = NULL;
        code = routed(rc, &cl, cmds[k].route_key, cmds[k].argc, cmds[k].argv, cmds[k].lens,
                      &replies[k], err);
        if (code != CQRS_ERR_OK)
            goto fail;
    }
out:
    rc->stale |= moved;
    free(owner);
    return code;
broken:
    code = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "%s", cl.why);
fail:
    for (size_t k = 0; k < n; k++) {
        freeReplyObject(replies[k]);
        replies[k] = NULL;
    }
    goto out;
}

/* ---- per node -------------------------------------------------------------------------- */

/* The node index of primary i (the i-th node serving a slot); -1 when there is none. */
static int primary(const cqrs_rconn_t *rc, size_t i)
{
    for (size_t k = 0; k < rc->n_nodes; k++)
        if (rc->nodes[k].n_slots && i-- == 0)
            return (int)k;
    return -1;
}

size_t cqrs_rconn_nodes(cqrs_rconn_t *rc, cqrs_error_t *err)
{
    call_t cl;
    call_start(&cl, rc);
    if (ready(rc, &cl, err) != CQRS_ERR_OK)
        return 0;
    if (rc->mode == MODE_SINGLE)
        return 1;
    if (rc->stale)
        refresh(rc, &cl);
    size_t n = 0;
    while (primary(rc, n) >= 0)
        n++;
    if (!n)
        cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "Redis cluster: no node serves a slot (%s)",
                       cl.why);
    return n;
}

bool cqrs_rconn_node_name(const cqrs_rconn_t *rc, size_t i, char *out, size_t cap)
{
    int k = rc->mode == MODE_SINGLE ? (i == 0 && rc->n_nodes ? 0 : -1) : primary(rc, i);
    if (k < 0)
        return false;
    snprintf(out, cap, "%s:%d", rc->nodes[k].host, rc->nodes[k].port);
    return true;
}

cqrs_err_t cqrs_rconn_command_node(cqrs_rconn_t *rc, size_t i, int argc, const char **argv,
                                   const size_t *lens, redisReply **out, cqrs_error_t *err)
{
    call_t cl;
    call_start(&cl, rc);
    *out = NULL;
    cqrs_err_t code = ready(rc, &cl, err);
    if (code != CQRS_ERR_OK)
        return code;
    if (rc->mode == MODE_SINGLE)
        return i == 0 ? single(rc, &cl, argc, argv, lens, out, err)
                      : cqrs_error_set(err, CQRS_ERR_INVALID, "no Redis node %zu", i);
    int k = primary(rc, i);
    if (k < 0)
        return cqrs_error_set(err, CQRS_ERR_INVALID, "no Redis cluster primary %zu", i);
    /* no refresh here: k stays this node's index for the whole call */
    while (left_ms(&cl) > 0) {
        redisReply *r = exchange(rc, k, &cl, false, argc, argv, lens);
        if (r && classify(r) != R_RETRY) {
            *out = r;
            return CQRS_ERR_OK;
        }
        if (r)
            note(&cl, &rc->nodes[k], r);
        freeReplyObject(r);
        backoff(&cl);
    }
    return give_up(rc, &cl, err);
}
