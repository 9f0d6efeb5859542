/* rebuild.c — `cqrsctl rebuild`: a new generation of the read model from the PostgreSQL event
 * log, switched in without downtime (README, "Rebuilding the read model without downtime").
 *
 * 1. Build: every event of the chosen projections, read in log order by --jobs threads (each
 *    its own connections and share of the aggregates), folded per aggregate through the
 *    projection cqrs-queryd uses (query_projection); each aggregate's final document and index
 *    entries are written with pipelined commands into the next generation of its shard
 *    (keyspace.h: beside the live one, the same slot) — as soon as it reaches the version its
 *    row had when the build began (while the log is still read), or at the end. Meanwhile the
 *    live generation keeps serving and the live projector keeps applying.
 * 2. Catch up: the versions in PostgreSQL's aggregate tables are compared with what the new
 *    generation holds, and the missing events of the aggregates that moved are folded on top
 *    — a few rounds, until little is left.
 * 3. Switch: every live shard is paused (a deadline in its meta that every write script
 *    honours; it lapses by itself if this process dies); a last catch-up reads PostgreSQL
 *    *after* the pause began, so the new generation holds every event the live one holds; the
 *    shards' offsets, undecodable messages and foreign dead letters are copied over; each
 *    shard's pointer moves in a script that checks the pause is still in force (once one moved
 *    the rest follow); readers are pointed at the new generation and "*" is announced.
 * 4. The old generation is deleted a few seconds later.
 *
 * Restartable: a marker names the generation being built; a later run deletes it and starts
 * over, and first finishes a switch an earlier run left half done.
 */
#include <cqrs/docstore.h>
#include <cqrs/failpoint.h>
#include <cqrs/event.h>
#include <cqrs/log.h>
#include <cqrs/metrics.h>
#include <cqrs/projector.h>
#include <cqrs/store.h>
#include <cqrs/util.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ops.h"
#include "query.h"

#define FLUSH_AGGREGATES 2048
#define PAUSE_MS 10000

/* Build order: the log's own order (index on the sequence, which follows the heap). Within an
 * aggregate, sequence order is version order: version n+1 is inserted only after version n
 * committed (row lock). */
#define SQL_SEQ                                                                                    \
    "SELECT e.aggregate_type, e.aggregate_id::text, e.version, e.event_id::text, e.event_type,"    \
    " e.occurred_at,"                                                                              \
    " coalesce(e.traceparent, ''), e.data::text, e.sequence"                                       \
    "  FROM events e"                                                                              \
    " WHERE e.aggregate_type IN (%s)%s"                                                            \
    " ORDER BY e.sequence"

static const char *const SQL_MISSING =
    "SELECT e.aggregate_type, e.aggregate_id::text, e.version, e.event_id::text, e.event_type,"
    " e.occurred_at,"
    " coalesce(e.traceparent, ''), e.data::text, e.sequence"
    "  FROM events e JOIN unnest($1::uuid[], $2::bigint[]) AS x(id, v)"
    "    ON e.aggregate_id = x.id AND e.version > x.v"
    " ORDER BY e.aggregate_id, e.version";

/* Every read of the log runs under these, so occurred_at comes as "YYYY-MM-DD HH:MM:SS[.f]+00"
 * (iso_time turns it into the events' format): PostgreSQL's to_char cost a fifth of the
 * read. */
static const char *const SQL_TIME_FORMAT =
    "SELECT set_config('TimeZone', 'UTC', true), set_config('DateStyle', 'ISO', true)";

static const char *const SQL_NO_SORT = "SELECT set_config('enable_sort', 'off', true)";

static const char *const SQL_COUNT =
    "SELECT count(*) FROM events WHERE aggregate_type = ANY($1::text[])";
static const char *const SQL_PRODUCT_VERSIONS = "SELECT id::text, version FROM products";
static const char *const SQL_ORDER_VERSIONS = "SELECT id::text, version FROM orders";

/* ---- what the new generation holds: aggregate id → version ---------------------------- */

typedef struct slot {
    char id[CQRS_UUID_LEN + 1];
    int64_t version; /* applied */
    int64_t seen;    /* highest version handled (applied or dead-lettered) */
    bool held;       /* has dead letters: later events are parked */
    bool used;
    /* build phase only: the folded document so far (NULL and spilled: written to the
     * scratch database to bound memory, without its list entries; NULL and written: written
     * whole, entries included, once it reached its target), the aggregate type, the dead
     * letters so far */
    bool spilled, written, is_order, in_log;
    int64_t target; /* the version of its row in products/orders when the build began (0:
                     * none; -1: read back, written at a spill or the end): the fold that
                     * reaches it is the last one the build reads. A slot with a target and no
                     * event (in_log false) is no aggregate of the build: left out of the
                     * merge. */
    struct agg *a;
} slot_t;

typedef struct vmap {
    slot_t *v;
    size_t cap, n;
} vmap_t;

static slot_t *vmap_lookup(vmap_t *m, const char *id, size_t *free_slot)
{
    size_t j = cqrs_hash64(id) & (m->cap - 1);
    while (m->v[j].used) {
        if (strcmp(m->v[j].id, id) == 0)
            return &m->v[j];
        j = (j + 1) & (m->cap - 1);
    }
    *free_slot = j;
    return NULL;
}

/* Finds id; with add, inserts it when absent (growing only then, so looking up or updating
 * an existing id never moves the slots). */
static slot_t *vmap_find(vmap_t *m, const char *id, bool add)
{
    size_t j = 0;
    slot_t *s = m->cap ? vmap_lookup(m, id, &j) : NULL;
    if (s || !add)
        return s;
    if ((m->n + 1) * 2 > m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 4096;
        slot_t *nv = calloc(cap, sizeof *nv);
        if (!nv)
            return NULL;
        for (size_t i = 0; i < m->cap; i++)
            if (m->v[i].used) {
                size_t k = cqrs_hash64(m->v[i].id) & (cap - 1);
                while (nv[k].used)
                    k = (k + 1) & (cap - 1);
                nv[k] = m->v[i];
            }
        free(m->v);
        m->v = nv;
        m->cap = cap;
        vmap_lookup(m, id, &j);
    }
    m->v[j].used = true;
    snprintf(m->v[j].id, sizeof m->v[j].id, "%s", id);
    m->n++;
    return &m->v[j];
}

/* ---- folding one aggregate -------------------------------------------------------------- */

typedef struct agg {
    char id[CQRS_UUID_LEN + 1];
    char shard[CQRS_SHARD_MAX];
    char key[CQRS_KEY_MAX];
    char dlq_key[CQRS_KEY_MAX];
    bool is_order;
    json_t *old; /* the document the new generation holds before this fold (NULL: none) */
    json_t *doc; /* after */
    int64_t version, seen;
    bool held;
    cqrs_dead_letter_put_t *dead;
    size_t n_dead, cap_dead;
} agg_t;

typedef struct rebuild {
    const cqrsctl_env_t *env;
    cqrs_store_t *store;
    cqrs_docstore_t *live, *scratch;
    const char *types; /* "{product,order}" */
    bool products, orders;
    int32_t shards[2]; /* per type (product, order): the layout's partition count */
    int64_t gen[2];    /* per type: the generation this rebuild writes (0: not rebuilt) */
    vmap_t map;
    agg_t cur;
    bool have_cur;
    /* finished aggregates waiting for the next bulk write */
    cqrs_bulk_doc_t docs[FLUSH_AGGREGATES];
    char *texts[FLUSH_AGGREGATES];
    cqrs_index_ops_t ops[FLUSH_AGGREGATES];
    agg_t done[FLUSH_AGGREGATES];
    size_t n_done;
    size_t in_memory, max_in_memory, spills;
    long long early, reread; /* written during the read; read back for a later event */
    /* progress */
    long long total, events, dead_letters;
    int64_t started_ms, last_report_ms;
    bool tty;
    /* the build's workers: worker `part` of `parts` folds the aggregates whose id's last byte
     * is part modulo parts, with connections of its own; main is the rebuild they work for */
    int part, parts;
    struct rebuild *main;
    atomic_llong built; /* main: events folded by every worker so far */
    agg_t kagg[512];    /* emit_all's keys of spilled aggregates */
    /* phase timings (ms), printed at the end */
    int64_t ms_read_fold, ms_write, ms_catch_up, ms_final_catch_up, ms_carry_over, ms_switch;
} rebuild_t;

static void agg_free(agg_t *a)
{
    json_decref(a->old);
    json_decref(a->doc);
    for (size_t i = 0; i < a->n_dead; i++) {
        free((char *)a->dead[i].blob);
        free((char *)a->dead[i].reason);
    }
    free(a->dead);
    memset(a, 0, sizeof *a);
}

static void add_dead(agg_t *a, const cqrs_event_t *ev, const char *reason)
{
    if (a->n_dead == a->cap_dead) {
        size_t cap = a->cap_dead ? a->cap_dead * 2 : 4;
        cqrs_dead_letter_put_t *nd = realloc(a->dead, cap * sizeof *nd);
        if (!nd)
            return;
        a->dead = nd;
        a->cap_dead = cap;
    }
    json_t *blob = cqrs_event_to_json(ev);
    /* Where it lies in Kafka is unknown here: offset -1 (a retry records nothing new). */
    json_object_set_new(blob, "partition", json_integer(-1));
    json_object_set_new(blob, "offset", json_integer(-1));
    a->dead[a->n_dead].version = ev->version;
    a->dead[a->n_dead].blob = json_dumps(blob, JSON_COMPACT);
    a->dead[a->n_dead].reason = strdup(reason);
    a->n_dead++;
    json_decref(blob);
}

/* Folds one event into the aggregate it belongs to (the current one). */
static void fold(agg_t *a, cqrs_event_t *ev)
{
    char reason[300];
    if (ev->version <= a->seen)
        return; /* handled already */
    a->seen = ev->version;
    if (a->held) {
        add_dead(a, ev, "waiting behind an earlier dead letter of its aggregate");
        return;
    }
    if (ev->version <= a->version)
        return; /* already there */
    if (ev->version > a->version + 1) {
        snprintf(reason, sizeof reason, "gap: the document is at version %lld",
                 (long long)a->version);
        a->held = true;
        add_dead(a, ev, reason);
        return;
    }
    json_t *next = NULL;
    cqrs_error_t perr;
    /* The event as written, for a dead letter (a retry upcasts it again). */
    char written[sizeof ev->type];
    memcpy(written, ev->type, sizeof written);
    json_t *data = json_incref(ev->data);
    /* In place when nothing else holds the document (no index to compute against it). */
    bool owned = !a->old;
    cqrs_err_t rc = owned ? cqrs_projection_apply_owned(&query_projection, a->doc, ev, &next, &perr)
                          : cqrs_projection_apply(&query_projection, a->doc, ev, &next, &perr);
    if (rc != CQRS_ERR_OK) {
        if (ev->data != data) {
            json_decref(ev->data);
            ev->data = json_incref(data);
            memcpy(ev->type, written, sizeof written);
        }
        a->held = true;
        add_dead(a, ev, perr.message);
    }
    json_decref(data);
    if (rc != CQRS_ERR_OK)
        return;
    if (!owned)
        json_decref(a->doc);
    a->doc = next;
    a->version = ev->version;
}

/* The shard and keys of an aggregate of type ("product" or "order"). */
static void agg_keys(const rebuild_t *r, agg_t *a, const char *type, const char *id)
{
    bool order = strcmp(type, "order") == 0;
    cqrs_keys_shard_gen(cqrs_docstore_prefix(r->live), query_topic(type),
                        cqrs_keys_partition(id, r->shards[order]), r->gen[order], a->shard,
                        sizeof a->shard);
    cqrs_keys_doc(a->shard, id, a->key, sizeof a->key);
    cqrs_keys_dlq(a->shard, id, a->dlq_key, sizeof a->dlq_key);
}

static cqrs_err_t flush_done(rebuild_t *r, cqrs_error_t *err)
{
    cqrs_err_t rc = CQRS_ERR_OK;
    if (r->n_done)
        rc = cqrs_docstore_bulk_write(r->scratch, r->docs, r->n_done, err);
    for (size_t i = 0; i < r->n_done; i++) {
        free(r->texts[i]);
        cqrs_index_ops_free(&r->ops[i]);
        agg_free(&r->done[i]);
    }
    r->n_done = 0;
    return rc;
}

/* The current aggregate is complete: queue its writes. */
static cqrs_err_t finish_agg(rebuild_t *r, cqrs_error_t *err)
{
    if (!r->have_cur)
        return CQRS_ERR_OK;
    r->have_cur = false;
    agg_t *a = &r->cur;
    slot_t *s = vmap_find(&r->map, a->id, true);
    if (!s)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    s->version = a->version;
    s->seen = a->seen;
    s->held = a->held;
    size_t i = r->n_done++;
    r->done[i] = *a;
    memset(a, 0, sizeof *a);
    agg_t *d = &r->done[i];
    memset(&r->ops[i], 0, sizeof r->ops[i]);
    r->texts[i] = NULL;
    bool changed = d->doc && d->doc != d->old;
    if (changed) {
        r->texts[i] = json_dumps(d->doc, JSON_COMPACT | JSON_PRESERVE_ORDER);
        query_projection.index(d->shard, d->is_order ? "order" : "product", d->key, d->old, d->doc,
                               &r->ops[i]);
        if (!r->texts[i] || r->ops[i].nomem)
            return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory (document %s)", d->key);
    }
    r->dead_letters += (long long)d->n_dead;
    r->docs[i] = (cqrs_bulk_doc_t){.shard = d->shard,
                                   .key = d->key,
                                   .version = d->version,
                                   .json = r->texts[i],
                                   .ops = r->ops[i].v,
                                   .n_ops = r->ops[i].n,
                                   .aggregate_id = d->id,
                                   .dlq_key = d->dlq_key,
                                   .dead = d->dead,
                                   .n_dead = d->n_dead};
    return r->n_done == FLUSH_AGGREGATES ? flush_done(r, err) : CQRS_ERR_OK;
}

static void progress(rebuild_t *r, const char *phase, bool final)
{
    int64_t now = cqrs_monotonic_ms();
    if (!final && now - r->last_report_ms < (r->tty ? 200 : 2000))
        return;
    r->last_report_ms = now;
    double s = (double)(now - r->started_ms) / 1000.0;
    double rate = s > 0 ? (double)r->events / s : 0;
    long long left = r->total > r->events ? r->total - r->events : 0;
    if (r->tty) {
        int width = 30, filled = r->total ? (int)(width * r->events / r->total) : width;
        if (filled > width)
            filled = width;
        fprintf(stderr, "\r%-9s [%.*s%*s] %lld/%lld events  %.0f events/s  ETA %.0f s   ", phase,
                filled, "##############################", width - filled, "", r->events, r->total,
                rate, rate > 0 ? (double)left / rate : 0.0);
        if (final)
            fputc('\n', stderr);
    } else {
        fprintf(stderr, "%s: %lld/%lld events, %.0f events/s, ETA %.0f s\n", phase, r->events,
                r->total, rate, rate > 0 ? (double)left / rate : 0.0);
    }
}

static void copy_str(char *dst, size_t cap, const char *src)
{
    size_t n = src ? strlen(src) : 0;
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, src ? src : "", n);
    dst[n] = '\0';
}

/* "2026-01-01 00:00:01.5+00" (timestamptz out, UTC, ISO) → "2026-01-01T00:00:01.500Z", what
 * to_char(… 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') made: milliseconds, truncated. */
static void iso_time(char *dst, size_t cap, const char *src)
{
    if (!src || strlen(src) < 19 || src[10] != ' ' || cap < 25) {
        copy_str(dst, cap, src);
        return;
    }
    memcpy(dst, src, 19);
    dst[10] = 'T';
    dst[19] = '.';
    const char *f = src[19] == '.' ? src + 20 : "";
    for (int i = 0; i < 3; i++)
        dst[20 + i] = (*f >= '0' && *f <= '9') ? *f++ : '0';
    dst[23] = 'Z';
    dst[24] = '\0';
}

/* An event from a row of SQL_SEQ / SQL_MISSING (same columns); data is a new reference. */
static void event_from_row(cqrs_event_t *ev, const char *const *v)
{
    memset(ev, 0, sizeof *ev);
    copy_str(ev->aggregate_type, sizeof ev->aggregate_type, v[0]);
    copy_str(ev->aggregate_id, sizeof ev->aggregate_id, v[1]);
    cqrs_parse_int64(v[2], &ev->version);
    copy_str(ev->id, sizeof ev->id, v[3]);
    copy_str(ev->type, sizeof ev->type, v[4]);
    iso_time(ev->time, sizeof ev->time, v[5]);
    copy_str(ev->traceparent, sizeof ev->traceparent, v[6]);
    copy_str(ev->source, sizeof ev->source, "/cqrs-commandd"); /* the log does not keep it */
    cqrs_parse_int64(v[8], &ev->sequence);
    ev->data = json_loads(v[7], 0, NULL);
}

/* One row of SQL_MISSING (catch-up, sorted by aggregate), folded into its aggregate (in catch-up,
 * an aggregate the new generation already holds starts from its stored document). */
static cqrs_err_t fold_row(rebuild_t *r, const char *const *v, bool catch_up, cqrs_error_t *err)
{
    const char *agg_id = v[1];
    if (!r->have_cur || strcmp(r->cur.id, agg_id) != 0) {
        cqrs_err_t rc = finish_agg(r, err);
        if (rc != CQRS_ERR_OK)
            return rc;
        agg_t *a = &r->cur;
        memset(a, 0, sizeof *a);
        r->have_cur = true;
        snprintf(a->id, sizeof a->id, "%s", agg_id);
        a->is_order = strcmp(v[0], "order") == 0;
        agg_keys(r, a, v[0], agg_id);
        slot_t *s = catch_up ? vmap_find(&r->map, agg_id, false) : NULL;
        if (s) {
            a->version = s->version;
            a->seen = s->seen;
            a->held = s->held;
            if (s->version > 0 && !s->held) {
                char *json = NULL;
                int64_t ver = 0;
                cqrs_err_t grc = cqrs_docstore_get(r->scratch, a->key, &json, &ver, err);
                if (grc != CQRS_ERR_OK && grc != CQRS_ERR_NOT_FOUND)
                    return grc;
                a->old = json ? json_loads(json, 0, NULL) : NULL;
                a->doc = a->old ? json_incref(a->old) : NULL;
                free(json);
            }
        }
    }
    cqrs_event_t ev;
    event_from_row(&ev, v);
    fold(&r->cur, &ev);
    json_decref(ev.data);
    r->events++;
    return CQRS_ERR_OK;
}

static cqrs_err_t catch_up_row(void *ud, int n, const char *const *v, cqrs_error_t *err)
{
    if (n < 9)
        return cqrs_error_set(err, CQRS_ERR_INTERNAL, "unexpected event row");
    return fold_row(ud, v, true, err);
}

typedef struct query {
    const char *sql;
    int n;
    const char *params[4];
    cqrs_rows_t *rows;
} query_t;

static cqrs_err_t query_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    query_t *q = ud;
    return cqrs_tx_exec(tx, q->sql, q->n, q->params, &q->rows, err);
}

static cqrs_err_t run_query(rebuild_t *r, query_t *q, cqrs_error_t *err)
{
    q->rows = NULL;
    return cqrs_store_run_tx(r->store, query_tx, q, err);
}

/* ---- phase 1: everything in the log, in the log's order, folded in memory -------------- */

/* Writes the aggregate of slot s whole (document, list entries against what was written
 * before, dead letters) and forgets it. */
static cqrs_err_t finish_early(rebuild_t *r, slot_t *s, cqrs_error_t *err)
{
    r->cur = *s->a; /* moved: finish_agg writes and frees it */
    free(s->a);
    s->a = NULL;
    r->have_cur = true;
    r->in_memory--;
    r->early += !s->written;
    s->written = true;
    s->spilled = false;
    return finish_agg(r, err);
}

/* Writes every aggregate held in memory to the scratch database (documents and dead letters,
 * no list entries yet: those are computed once, from the final documents) and forgets them;
 * one written whole before goes whole again (its entries change with it). */
static cqrs_err_t spill(rebuild_t *r, cqrs_error_t *err)
{
    cqrs_bulk_doc_t docs[FLUSH_AGGREGATES];
    char *texts[FLUSH_AGGREGATES];
    slot_t *slots[FLUSH_AGGREGATES];
    size_t n = 0;
    cqrs_err_t rc = CQRS_ERR_OK;
    for (size_t i = 0; i <= r->map.cap && rc == CQRS_ERR_OK; i++) {
        slot_t *s = i < r->map.cap ? &r->map.v[i] : NULL;
        if (s && s->used && s->a && s->written) {
            rc = finish_early(r, s, err);
            continue;
        }
        if (s && s->used && s->a) {
            agg_t *a = s->a;
            texts[n] = a->doc ? json_dumps(a->doc, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
            docs[n] = (cqrs_bulk_doc_t){.shard = a->shard,
                                        .key = a->key,
                                        .version = a->version,
                                        .json = texts[n],
                                        .aggregate_id = a->id,
                                        .dlq_key = a->dlq_key,
                                        .dead = a->dead,
                                        .n_dead = a->n_dead};
            r->dead_letters += (long long)a->n_dead;
            slots[n++] = s;
        }
        if (n == FLUSH_AGGREGATES || (!s && n > 0)) {
            rc = cqrs_docstore_bulk_write(r->scratch, docs, n, err);
            for (size_t k = 0; k < n; k++) {
                free(texts[k]);
                agg_free(slots[k]->a);
                free(slots[k]->a);
                slots[k]->a = NULL;
                slots[k]->spilled = true;
            }
            n = 0;
        }
    }
    r->in_memory = 0;
    r->spills++;
    return rc;
}

static cqrs_err_t build_row(void *ud, int n, const char *const *v, cqrs_error_t *err)
{
    rebuild_t *r = ud;
    if (n < 9)
        return cqrs_error_set(err, CQRS_ERR_INTERNAL, "unexpected event row");
    slot_t *s = vmap_find(&r->map, v[1], true);
    if (!s)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    s->in_log = true;
    if (!s->a) {
        agg_t *a = calloc(1, sizeof *a);
        if (!a)
            return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        s->a = a;
        s->is_order = strcmp(v[0], "order") == 0;
        copy_str(a->id, sizeof a->id, v[1]);
        a->is_order = s->is_order;
        agg_keys(r, a, v[0], a->id);
        if (s->spilled || s->written) { /* seen before: go on from the written document */
            a->version = s->version;
            a->seen = s->seen;
            a->held = s->held;
            if (s->version > 0) { /* held ones too: their list entries come at the end */
                char *json = NULL;
                int64_t ver = 0;
                /* finished ones wait in r->done for the next bulk write: send them first */
                cqrs_err_t grc = s->written && r->n_done ? flush_done(r, err) : CQRS_ERR_OK;
                if (grc == CQRS_ERR_OK)
                    grc = cqrs_docstore_get(r->scratch, a->key, &json, &ver, err);
                if (grc != CQRS_ERR_OK && grc != CQRS_ERR_NOT_FOUND)
                    return grc;
                a->doc = json ? json_loads(json, 0, NULL) : NULL;
                free(json);
                /* written whole: its list entries are there, what follows changes them; it
                 * stays in memory now (written at a spill or the end, not after each event) */
                if (s->written && a->doc)
                    a->old = json_incref(a->doc);
                if (s->written) {
                    r->reread++;
                    s->target = -1;
                }
            }
        }
        r->in_memory++;
    }
    cqrs_event_t ev;
    event_from_row(&ev, v);
    fold(s->a, &ev);
    json_decref(ev.data);
    s->version = s->a->version;
    s->seen = s->a->seen;
    s->held = s->a->held;
    r->events++;
    if (s->target > 0 && s->version >= s->target && !s->held) {
        /* Complete as of the build's start: written now, while the log is still read (a later
         * event of it, committed since, reads the written document back). */
        cqrs_err_t rc = finish_early(r, s, err);
        if (rc != CQRS_ERR_OK)
            return rc;
    }
    if ((r->events & 4095) == 0 && r->main) {
        long long all = atomic_fetch_add(&r->main->built, 4096) + 4096;
        if (r->part == 0) { /* the main thread waits for the workers: only this one prints */
            r->main->events = all;
            progress(r->main, "building", false);
        }
    }
    return r->in_memory > r->max_in_memory ? spill(r, err) : CQRS_ERR_OK;
}

static cqrs_err_t target_row(void *ud, int n, const char *const *v, cqrs_error_t *err)
{
    rebuild_t *r = ud;
    if (n < 2)
        return cqrs_error_set(err, CQRS_ERR_INTERNAL, "unexpected version row");
    slot_t *t = vmap_find(&r->map, v[0], true);
    if (!t)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    if (!cqrs_parse_int64(v[1], &t->target) || t->target < 0)
        t->target = 0;
    return CQRS_ERR_OK;
}

/* The condition that keeps this worker's share of the aggregates whose id is column, after
 * keyword ("" when there is one worker). */
static void share_filter(const rebuild_t *r, const char *keyword, const char *column, char *out,
                         size_t cap)
{
    out[0] = '\0';
    if (r->parts > 1)
        snprintf(out, cap, " %s get_byte(uuid_send(%s), 15) %% %d = %d", keyword, column, r->parts,
                 r->part);
}

static cqrs_err_t build_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    rebuild_t *r = ud;
    /* the types are this program's literals, never input */
    char sql[1024], part[128], rows_part[128];
    share_filter(r, "AND", "e.aggregate_id", part, sizeof part);
    share_filter(r, "WHERE", "id", rows_part, sizeof rows_part);
    /* The share's row versions first: the events' cursor, a later snapshot, holds at least
     * those versions, so an aggregate that reaches its row's is complete for this build. */
    cqrs_err_t rc = CQRS_ERR_OK;
    for (int t = 0; t < 2 && rc == CQRS_ERR_OK; t++) {
        if ((t == 0 && !r->products) || (t == 1 && !r->orders))
            continue;
        snprintf(sql, sizeof sql, "%s%s", t == 0 ? SQL_PRODUCT_VERSIONS : SQL_ORDER_VERSIONS,
                 rows_part);
        rc = cqrs_tx_cursor(tx, sql, 10000, target_row, r, err);
    }
    if (rc != CQRS_ERR_OK)
        return rc;
    CQRS_FAILPOINT("rebuild-after-targets"); /* delay:N: commands commit in between */
    snprintf(sql, sizeof sql, SQL_SEQ,
             r->products && r->orders ? "'product', 'order'"
             : r->products            ? "'product'"
                                      : "'order'",
             part);
    rc = cqrs_tx_exec(tx, SQL_TIME_FORMAT, 0, NULL, NULL, err);
    /* The planner cannot estimate the share's filter (it guesses a few rows) and would sort a
     * parallel sequential scan: the sequence's index gives the order without a sort. */
    if (rc == CQRS_ERR_OK)
        rc = cqrs_tx_exec(tx, SQL_NO_SORT, 0, NULL, NULL, err);
    return rc == CQRS_ERR_OK ? cqrs_tx_cursor(tx, sql, 10000, build_row, r, err) : rc;
}

/* The final documents, with their list entries. */
static cqrs_err_t emit_all(rebuild_t *r, cqrs_error_t *err)
{
    enum { GET_BATCH = 512 };
    const char *keys[GET_BATCH];
    char *jsons[GET_BATCH];
    slot_t *waiting[GET_BATCH];
    size_t n_wait = 0;
    cqrs_err_t rc = CQRS_ERR_OK;
    for (size_t i = 0; i <= r->map.cap && rc == CQRS_ERR_OK; i++) {
        slot_t *s = i < r->map.cap ? &r->map.v[i] : NULL;
        if (s && s->used && s->a) {
            r->cur = *s->a; /* moved: finish_agg writes and frees it */
            free(s->a);
            s->a = NULL;
            r->have_cur = true;
            rc = finish_agg(r, err);
        } else if (s && s->used && s->spilled && s->version > 0) {
            /* written at a spill without its list entries: read back, then complete */
            waiting[n_wait++] = s;
        }
        if (n_wait == GET_BATCH || (!s && n_wait > 0)) {
            agg_t *kagg = r->kagg;
            for (size_t k = 0; k < n_wait; k++) {
                agg_keys(r, &kagg[k], waiting[k]->is_order ? "order" : "product", waiting[k]->id);
                keys[k] = kagg[k].key;
            }
            rc = cqrs_docstore_get_many(r->scratch, keys, n_wait, jsons, err);
            for (size_t k = 0; k < n_wait && rc == CQRS_ERR_OK; k++) {
                if (!jsons[k])
                    continue;
                agg_t *a = &r->cur;
                memset(a, 0, sizeof *a);
                r->have_cur = true;
                copy_str(a->id, sizeof a->id, waiting[k]->id);
                a->is_order = waiting[k]->is_order;
                memcpy(a->shard, kagg[k].shard, sizeof a->shard);
                memcpy(a->key, kagg[k].key, sizeof a->key);
                memcpy(a->dlq_key, kagg[k].dlq_key, sizeof a->dlq_key);
                a->doc = json_loads(jsons[k], 0, NULL);
                a->version = a->seen = waiting[k]->version;
                rc = finish_agg(r, err);
            }
            for (size_t k = 0; k < n_wait; k++)
                free(jsons[k]);
            n_wait = 0;
        }
    }
    return rc == CQRS_ERR_OK ? flush_done(r, err) : rc;
}

static cqrs_err_t build_part(rebuild_t *r, cqrs_error_t *err)
{
    int64_t t0 = cqrs_monotonic_ms();
    cqrs_err_t rc = cqrs_store_run_tx(r->store, build_tx, r, err);
    int64_t t1 = cqrs_monotonic_ms();
    if (rc == CQRS_ERR_OK)
        rc = emit_all(r, err);
    if (rc == CQRS_ERR_OK)
        rc = cqrs_docstore_bulk_sync(r->scratch, err);
    r->ms_read_fold += t1 - t0;
    r->ms_write += cqrs_monotonic_ms() - t1;
    return rc;
}

typedef struct worker {
    rebuild_t *r;
    pthread_t thread;
    bool started;
    cqrs_err_t rc;
    cqrs_error_t err;
} worker_t;

static void *worker_main(void *ud)
{
    worker_t *w = ud;
    w->rc = build_part(w->r, &w->err);
    return NULL;
}

/* Phase 1 in `jobs` workers, each with its own PostgreSQL and Redis connections and a share of
 * the in-memory bound; then what the new generation holds, merged into r's map (catch-up and
 * carry-over read it). */
static cqrs_err_t build(rebuild_t *r, int jobs, cqrs_error_t *err)
{
    worker_t *ws = calloc((size_t)jobs, sizeof *ws);
    cqrs_err_t rc = ws ? CQRS_ERR_OK : cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    cqrs_store_config_t sc = {.dsn = r->env->pg_dsn,
                              .pool_size = 1,
                              .connect_timeout_s = 5,
                              .statement_timeout_ms = 600000,
                              .application_name = "cqrsctl-rebuild"};
    long long events = 0;
    json_object_seed(0); /* before the threads: jansson seeds its hashes on first use */
    for (int j = 0; rc == CQRS_ERR_OK && j < jobs; j++) {
        rebuild_t *w = calloc(1, sizeof *w);
        ws[j].r = w;
        if (!w) {
            rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
            break;
        }
        w->env = r->env;
        w->types = r->types;
        w->products = r->products;
        w->orders = r->orders;
        memcpy(w->shards, r->shards, sizeof w->shards);
        memcpy(w->gen, r->gen, sizeof w->gen);
        w->max_in_memory = r->max_in_memory / (size_t)jobs + 1;
        w->part = j;
        w->parts = jobs;
        w->main = r;
        w->started_ms = w->last_report_ms = r->started_ms;
        w->store = cqrs_store_new(&sc);
        w->live = w->scratch = cqrs_docstore_new(r->env->redis, 5000, err);
        if (!w->store || !w->live) {
            rc = w->live ? cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory") : err->code;
            break;
        }
        if (pthread_create(&ws[j].thread, NULL, worker_main, &ws[j]) != 0) {
            rc = cqrs_error_set(err, CQRS_ERR_INTERNAL, "cannot start a build thread");
            break;
        }
        ws[j].started = true;
    }
    for (int j = 0; ws && j < jobs; j++) {
        rebuild_t *w = ws[j].r;
        if (ws[j].started) {
            pthread_join(ws[j].thread, NULL);
            if (rc == CQRS_ERR_OK && ws[j].rc != CQRS_ERR_OK) {
                rc = ws[j].rc;
                *err = ws[j].err;
            }
        }
        if (!w)
            continue;
        for (size_t i = 0; rc == CQRS_ERR_OK && i < w->map.cap; i++) {
            const slot_t *from = &w->map.v[i];
            if (!from->used || !from->in_log)
                continue;
            slot_t *to = vmap_find(&r->map, from->id, true);
            if (!to) {
                rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
                break;
            }
            to->version = from->version;
            to->seen = from->seen;
            to->held = from->held;
            to->is_order = from->is_order;
            to->spilled = from->spilled;
        }
        events += w->events;
        r->dead_letters += w->dead_letters;
        r->spills += w->spills;
        r->early += w->early;
        r->reread += w->reread;
        if (w->ms_read_fold > r->ms_read_fold)
            r->ms_read_fold = w->ms_read_fold;
        if (w->ms_write > r->ms_write)
            r->ms_write = w->ms_write;
        /* a worker that failed may hold aggregates: free them */
        for (size_t i = 0; i < w->map.cap; i++)
            if (w->map.v[i].a) {
                agg_free(w->map.v[i].a);
                free(w->map.v[i].a);
            }
        if (w->have_cur)
            agg_free(&w->cur);
        for (size_t i = 0; i < w->n_done; i++) {
            free(w->texts[i]);
            cqrs_index_ops_free(&w->ops[i]);
            agg_free(&w->done[i]);
        }
        free(w->map.v);
        cqrs_docstore_destroy(w->live);
        cqrs_store_destroy(w->store);
        free(w);
    }
    free(ws);
    r->events = events;
    return rc;
}

typedef struct missing {
    rebuild_t *r;
    const char *ids, *versions;
} missing_t;

static cqrs_err_t missing_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    missing_t *m = ud;
    const char *params[] = {m->ids, m->versions};
    cqrs_err_t rc = cqrs_tx_exec(tx, SQL_TIME_FORMAT, 0, NULL, NULL, err);
    return rc == CQRS_ERR_OK ? cqrs_tx_stream(tx, SQL_MISSING, 2, params, catch_up_row, m->r, err)
                             : rc;
}

/* One catch-up round: aggregates whose version in PostgreSQL is past the new generation's;
 * *behind counts them. */
static cqrs_err_t catch_up(rebuild_t *r, long long *behind, cqrs_error_t *err)
{
    *behind = 0;
    json_t *ids = json_array(), *versions = json_array();
    for (int t = 0; t < 2; t++) {
        if ((t == 0 && !r->products) || (t == 1 && !r->orders))
            continue;
        query_t q = {t == 0 ? SQL_PRODUCT_VERSIONS : SQL_ORDER_VERSIONS, 0, {NULL}, NULL};
        cqrs_err_t rc = run_query(r, &q, err);
        if (rc != CQRS_ERR_OK) {
            json_decref(ids);
            json_decref(versions);
            return rc;
        }
        int n = cqrs_rows_count(q.rows);
        for (int i = 0; i < n; i++) {
            const char *id = cqrs_rows_get(q.rows, i, 0);
            int64_t v = 0;
            cqrs_parse_int64(cqrs_rows_get(q.rows, i, 1), &v);
            slot_t *s = vmap_find(&r->map, id, false);
            int64_t have = s ? s->seen : 0;
            if (v > have) {
                json_array_append_new(ids, json_string(id));
                json_array_append_new(versions, json_integer(have));
            }
        }
        cqrs_rows_free(q.rows);
    }
    *behind = (long long)json_array_size(ids);
    cqrs_err_t rc = CQRS_ERR_OK;
    if (*behind > 0) {
        /* PostgreSQL arrays as text: {a,b,c} */
        cqrs_text_t a = {0}, b = {0};
        cqrs_text_printf(&a, "{");
        cqrs_text_printf(&b, "{");
        for (size_t i = 0; i < json_array_size(ids); i++) {
            cqrs_text_printf(&a, "%s%s", i ? "," : "", json_string_value(json_array_get(ids, i)));
            cqrs_text_printf(&b, "%s%lld", i ? "," : "",
                             (long long)json_integer_value(json_array_get(versions, i)));
        }
        cqrs_text_printf(&a, "}");
        cqrs_text_printf(&b, "}");
        missing_t m = {r, a.buf, b.buf};
        rc = cqrs_store_run_tx(r->store, missing_tx, &m, err);
        if (rc == CQRS_ERR_OK)
            rc = finish_agg(r, err);
        if (rc == CQRS_ERR_OK)
            rc = flush_done(r, err);
        if (rc == CQRS_ERR_OK)
            rc = cqrs_docstore_bulk_sync(r->scratch, err);
        cqrs_text_free(&a);
        cqrs_text_free(&b);
    }
    json_decref(ids);
    json_decref(versions);
    return rc;
}

static int usage(FILE *f)
{
    fprintf(f, "usage: cqrsctl rebuild [--projection products|orders|all]\n"
               "                       [--max-in-memory AGGREGATES] [--jobs N]\n\n"
               "Rebuilds the read model from the PostgreSQL event log into a new generation of\n"
               "the chosen projections' shards, beside the live one (same Redis or cluster),\n"
               "while the live one keeps serving; then switches each shard to it, points the\n"
               "readers at it and deletes the old generation. The projections not chosen stay\n"
               "as they are. --max-in-memory (default 500000, about 1 GB) bounds the aggregates\n"
               "folded in memory; past it they are written out and read back when needed.\n"
               "--jobs (default 2, at most 64) folds in that many threads, each with its own\n"
               "PostgreSQL and Redis connections, each a share of the aggregates.\n"
               "Exit codes: 0 switched, 1 failed (the live read model is untouched), 2 usage,\n"
               "3 a dependency is unavailable or the switch was too slow (nothing switched).\n");
    return f == stdout ? 0 : 2;
}

static int fail(rebuild_t *r, const cqrs_error_t *err)
{
    if (r->tty)
        fputc('\n', stderr);
    fprintf(stderr, "cqrsctl rebuild: %s\n", err->message);
    return err->code == CQRS_ERR_UNAVAILABLE || err->code == CQRS_ERR_TIMEOUT ? 3 : 1;
}

/* The shards of the rebuilt topics: old[i] (the live generation) and new[i] (this rebuild's). */
typedef struct shard_pair {
    char old[CQRS_SHARD_MAX], new[CQRS_SHARD_MAX];
    bool is_order;
    int32_t partition;
} shard_pair_t;

/* One rebuild at a time: a lease in Redis (<prefix>:rebuild:lease) that a thread of its own
 * renews every LEASE_RENEW_MS while the run lives; a run that dies frees it within LEASE_MS. */
#define LEASE_MS 30000
#define LEASE_RENEW_MS 5000
#define LEASE "rebuild:lease"
/* Generations to delete (<prefix>:rebuild:garbage, members "<topic> <partition> <gen>"): the
 * one a run builds, from before it writes there until its switch; the old one after the
 * switch. Each run first deletes those its shard's pointer does not name. */
#define GARBAGE "rebuild:garbage"

typedef struct lease {
    const cqrsctl_env_t *env;
    char token[CQRS_UUID_LEN + 1];
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop, lost, running;
} lease_t;

static void *lease_renew(void *arg)
{
    lease_t *l = arg;
    cqrs_error_t err;
    cqrs_docstore_t *ds = cqrs_docstore_new(l->env->redis, 5000, &err);
    pthread_mutex_lock(&l->mu);
    while (!l->stop) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += LEASE_RENEW_MS / 1000;
        pthread_cond_timedwait(&l->cv, &l->mu, &until);
        if (l->stop)
            break;
        pthread_mutex_unlock(&l->mu);
        int64_t left = 0;
        cqrs_err_t rc =
            ds ? cqrs_docstore_lease(ds, LEASE, l->token, LEASE_MS, &left, &err) : CQRS_ERR_NOMEM;
        pthread_mutex_lock(&l->mu);
        if (rc == CQRS_ERR_CONFLICT)
            l->lost = true; /* another run took it over: this one must not switch */
    }
    pthread_mutex_unlock(&l->mu);
    cqrs_docstore_destroy(ds);
    return NULL;
}

static bool lease_lost(lease_t *l)
{
    pthread_mutex_lock(&l->mu);
    bool lost = l->lost;
    pthread_mutex_unlock(&l->mu);
    return lost;
}

/* Deletes the generations GARBAGE names unless they are their shard's current one; *n counts
 * the keys. A shard's keys are matched by their literal prefix "{…}:g<N>:", which no key of
 * another generation or shard starts with, whatever text a key carries after it: one walk of
 * the keyspace ("{<prefix>:*") for every generation to delete. A member whose shard cannot be
 * read now stays for the next run; the others go on (the first error is returned). */
static cqrs_err_t collect_garbage(rebuild_t *r, size_t *n, cqrs_error_t *err)
{
    char **members = NULL;
    size_t count = 0, n_old = 0;
    *n = 0;
    cqrs_err_t rc = cqrs_docstore_names(r->live, GARBAGE, &members, &count, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    char(*old)[CQRS_SHARD_MAX] = calloc(count ? count : 1, sizeof *old);
    const char **prefixes = calloc(count ? count : 1, sizeof *prefixes);
    bool *keep = calloc(count ? count : 1, sizeof *keep);
    if (!old || !prefixes || !keep)
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    cqrs_error_t first = {0};
    for (size_t i = 0; rc == CQRS_ERR_OK && i < count; i++) {
        char topic[256], cur[CQRS_SHARD_MAX];
        int partition = 0;
        long long gen = 0;
        if (sscanf(members[i], "%255s %d %lld", topic, &partition, &gen) != 3 || gen < 1)
            continue; /* not a generation: removed below */
        cqrs_error_t e;
        cqrs_err_t crc =
            cqrs_docstore_current_shard(r->live, topic, partition, cur, sizeof cur, &e);
        char *o = old[n_old];
        cqrs_keys_shard_gen(cqrs_docstore_prefix(r->live), topic, partition, gen, o, sizeof old[0]);
        size_t len = strlen(o);
        if (crc == CQRS_ERR_OK && (len == 0 || o[len - 1] != ':'))
            crc = cqrs_error_set(&e, CQRS_ERR_INTERNAL, "shard name too long: %s", members[i]);
        if (crc != CQRS_ERR_OK) {
            keep[i] = true;
            if (first.code == CQRS_ERR_OK)
                first = e;
        } else if (strcmp(cur, o) != 0) {
            prefixes[n_old++] = o;
        }
    }
    if (rc == CQRS_ERR_OK && n_old > 0) {
        char match[CQRS_KEY_MAX];
        cqrs_keys_shards_pattern(cqrs_docstore_prefix(r->live), match, sizeof match);
        rc = cqrs_docstore_delete_keys(r->live, match, prefixes, n_old, n, err);
    }
    for (size_t i = 0; rc == CQRS_ERR_OK && i < count; i++)
        if (!keep[i])
            rc = cqrs_docstore_names_remove(r->live, GARBAGE, members[i], err);
    if (rc == CQRS_ERR_OK && first.code != CQRS_ERR_OK) {
        *err = first;
        rc = first.code;
    }
    free(keep);
    free(prefixes);
    free(old);
    cqrs_docstore_strings_free(members, count);
    return rc;
}

/* "<topic> <partition> <gen>" of a shard prefix, for GARBAGE. */
static void garbage_name(const char *topic, int32_t partition, const char *shard, char *out,
                         size_t cap)
{
    int64_t gen = 0;
    cqrs_keys_shard_parse(shard, NULL, 0, &gen);
    snprintf(out, cap, "%s %d %lld", topic, (int)partition, (long long)gen);
}

/* What the live generation of a rebuilt shard holds that the build does not make: the
 * partition's offset (the projector goes on from it), undecodable messages, and dead letters
 * of aggregates the log does not know (an unknown aggregate type: its events are only ever
 * dead letters — the script never writes a document for it). Named keys only: no scan of
 * the keyspace while the projector is paused. */
static cqrs_err_t carry_over(rebuild_t *r, const shard_pair_t *s, size_t *copied, cqrs_error_t *err)
{
    static const char *const families[] = {CQRS_SHARD_OFFSETS, CQRS_SHARD_UNDECODABLE};
    cqrs_err_t rc = CQRS_ERR_OK;
    for (size_t f = 0; rc == CQRS_ERR_OK && f < 2; f++) {
        size_t n = 0;
        rc = cqrs_docstore_copy_shard_keys(r->live, s->old, s->new, families[f], &n, err);
        *copied += n;
    }
    char **ids = NULL;
    int64_t *since = NULL;
    size_t n_ids = 0;
    if (rc == CQRS_ERR_OK)
        rc = cqrs_docstore_dlq_index(r->live, s->old, &ids, &since, &n_ids, err);
    for (size_t k = 0; rc == CQRS_ERR_OK && k < n_ids; k++) {
        if (vmap_find(&r->map, ids[k], false))
            continue; /* rebuilt: its dead letters were recomputed */
        char glob[CQRS_KEY_MAX];
        size_t n = 0;
        snprintf(glob, sizeof glob, "dlq:%s", ids[k]);
        rc = cqrs_docstore_copy_shard_keys(r->live, s->old, s->new, glob, &n, err);
        *copied += n;
        if (rc == CQRS_ERR_OK)
            rc = cqrs_docstore_dlq_index_add(r->live, s->new, ids[k], since[k], err);
    }
    cqrs_docstore_strings_free(ids, n_ids);
    free(since);
    return rc;
}

int cqrsctl_rebuild(const cqrsctl_env_t *env, int argc, char **argv)
{
    const char *projection = "all";
    size_t max_in_memory = 500000; /* ≈ 1 GB of folded documents; past it, spill */
    int jobs = 2;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            return usage(stdout);
        if (strcmp(argv[i], "--projection") == 0 && i + 1 < argc) {
            projection = argv[++i];
        } else if (strcmp(argv[i], "--max-in-memory") == 0 && i + 1 < argc) {
            int64_t v;
            if (!cqrs_parse_int64(argv[++i], &v) || v < 1)
                return usage(stderr);
            max_in_memory = (size_t)v;
        } else if (strcmp(argv[i], "--jobs") == 0 && i + 1 < argc) {
            int64_t v;
            if (!cqrs_parse_int64(argv[++i], &v) || v < 1 || v > 64)
                return usage(stderr);
            jobs = (int)v;
        } else if (strcmp(argv[i], "--scratch-db") == 0) {
            fprintf(stderr, "cqrsctl rebuild: --scratch-db is gone: a rebuild writes a new "
                            "generation beside the live one (README, Redis keys)\n");
            return 2;
        } else {
            return usage(stderr);
        }
    }
    static rebuild_t R;
    rebuild_t *r = &R;
    r->env = env;
    r->products = strcmp(projection, "products") == 0 || strcmp(projection, "all") == 0;
    r->orders = strcmp(projection, "orders") == 0 || strcmp(projection, "all") == 0;
    if (!r->products && !r->orders)
        return usage(stderr);
    r->types = r->products && r->orders ? "{product,order}" : r->products ? "{product}" : "{order}";
    r->tty = isatty(2);
    r->max_in_memory = max_in_memory;
    cqrs_error_t err;
    cqrs_store_config_t sc = {.dsn = env->pg_dsn,
                              .pool_size = 1,
                              .connect_timeout_s = 5,
                              .statement_timeout_ms = 600000,
                              .application_name = "cqrsctl-rebuild"};
    r->store = cqrs_store_new(&sc);
    r->live = cqrs_docstore_new(env->redis, 5000, &err);
    r->scratch = r->live; /* the new generation lives beside the old one */
    static lease_t lease;
    shard_pair_t *pairs = NULL;
    const char **old_shards = NULL;
    int64_t *tokens = NULL;
    size_t n_pairs = 0;
    int rc = 1;
    if (!r->store || !r->live) {
        fprintf(stderr, "cqrsctl rebuild: %s\n", r->store ? err.message : "out of memory");
        rc = 2;
        goto out;
    }
    const char *prefix = cqrs_docstore_prefix(r->live);
    static const char *const types[2] = {"product", "order"};
    /* One rebuild at a time. */
    cqrs_uuid_v4(lease.token);
    int64_t left = 0;
    cqrs_err_t lrc = cqrs_docstore_lease(r->live, LEASE, lease.token, LEASE_MS, &left, &err);
    if (lrc == CQRS_ERR_CONFLICT) {
        fprintf(stderr,
                "cqrsctl rebuild: another rebuild is running (its lease, %s, expires in %lld ms "
                "if it died)\n",
                LEASE, (long long)left);
        rc = 2;
        goto out;
    }
    if (lrc != CQRS_ERR_OK) {
        rc = fail(r, &err);
        goto out;
    }
    lease.env = env;
    pthread_mutex_init(&lease.mu, NULL);
    pthread_cond_init(&lease.cv, NULL);
    lease.running = pthread_create(&lease.thread, NULL, lease_renew, &lease) == 0;
    /* Where each aggregate goes (the layout the projectors record). */
    for (int t = 0; t < 2; t++) {
        if ((t == 0 && !r->products) || (t == 1 && !r->orders))
            continue;
        lrc = query_shard_count(r->live, types[t], &r->shards[t], &err);
        if (lrc == CQRS_ERR_NOT_FOUND)
            cqrs_error_set(&err, CQRS_ERR_STATE,
                           "the read model records no layout for %s: start cqrs-queryd once"
                           " (its projector records each topic's partition count)",
                           query_topic(types[t]));
        if (lrc != CQRS_ERR_OK) {
            rc = fail(r, &err);
            goto out;
        }
        n_pairs += (size_t)r->shards[t];
    }
    /* What earlier runs left: generations they built and never switched to, old ones they
     * could not delete. */
    size_t leftover = 0;
    if (collect_garbage(r, &leftover, &err) != CQRS_ERR_OK) {
        rc = fail(r, &err);
        goto out;
    }
    if (leftover)
        fprintf(stderr, "deleted %zu keys of generations earlier runs left\n", leftover);
    pairs = calloc(n_pairs + 1, sizeof *pairs);
    old_shards = calloc(n_pairs + 1, sizeof *old_shards);
    tokens = calloc(n_pairs + 1, sizeof *tokens);
    if (!pairs || !old_shards || !tokens) {
        fprintf(stderr, "cqrsctl rebuild: out of memory\n");
        goto out;
    }
    /* Each shard's live generation (its pointer: shards may differ after a run that switched
     * only some); the new one is one past the highest of the topic, the same for all. */
    n_pairs = 0;
    int64_t live_top[2] = {0, 0};
    for (int t = 0; t < 2; t++)
        for (int32_t p = 0; p < r->shards[t] && ((t == 0 && r->products) || (t == 1 && r->orders));
             p++) {
            shard_pair_t *sp = &pairs[n_pairs];
            int64_t g = 0;
            if (cqrs_docstore_current_shard(r->live, query_topic(types[t]), p, sp->old,
                                            sizeof sp->old, &err) != CQRS_ERR_OK) {
                rc = fail(r, &err);
                goto out;
            }
            cqrs_keys_shard_parse(sp->old, NULL, 0, &g);
            live_top[t] = g > live_top[t] ? g : live_top[t];
            sp->is_order = t == 1;
            sp->partition = p;
            old_shards[n_pairs++] = sp->old;
        }
    for (size_t i = 0; i < n_pairs; i++) {
        int t = pairs[i].is_order;
        r->gen[t] = live_top[t] + 1;
        cqrs_keys_shard_gen(prefix, query_topic(types[t]), pairs[i].partition, r->gen[t],
                            pairs[i].new, sizeof pairs[i].new);
        /* garbage until switched: a run that dies leaves it to the next one */
        char name[300];
        garbage_name(query_topic(types[t]), pairs[i].partition, pairs[i].new, name, sizeof name);
        if (cqrs_docstore_names_add(r->live, GARBAGE, name, &err) != CQRS_ERR_OK) {
            rc = fail(r, &err);
            goto out;
        }
    }
    query_t count = {SQL_COUNT, 1, {r->types}, NULL};
    if (run_query(r, &count, &err) != CQRS_ERR_OK) {
        rc = fail(r, &err);
        goto out;
    }
    r->total = atoll(cqrs_rows_get(count.rows, 0, 0) ? cqrs_rows_get(count.rows, 0, 0) : "0");
    cqrs_rows_free(count.rows);
    fprintf(stderr, "rebuilding %s from %lld events into generation %lld (live: %lld)\n",
            projection, r->total, (long long)(r->gen[0] ? r->gen[0] : r->gen[1]),
            (long long)(r->gen[0] ? live_top[0] : live_top[1]));
    r->started_ms = r->last_report_ms = cqrs_monotonic_ms();
    r->events = 0;
    if (build(r, jobs, &err) != CQRS_ERR_OK) {
        rc = fail(r, &err);
        goto out;
    }
    progress(r, "building", true);
    int64_t built_ms = cqrs_monotonic_ms();
    long long built_events = r->events;

    /* Catch up while the live projector keeps going. */
    long long behind = 0;
    int64_t t_catch_up = cqrs_monotonic_ms();
    for (int round = 0; round < 5; round++) {
        if (catch_up(r, &behind, &err) != CQRS_ERR_OK) {
            rc = fail(r, &err);
            goto out;
        }
        fprintf(stderr, "catch-up round %d: %lld aggregates had moved\n", round + 1, behind);
        if (behind < 100)
            break;
    }

    /* Switch: pause the live generation's shards, catch up once more, carry over, switch. */
    int64_t pause_started = cqrs_monotonic_ms();
    r->ms_catch_up = pause_started - t_catch_up;
    if (cqrs_docstore_pause(r->live, old_shards, n_pairs, PAUSE_MS, tokens, &err) != CQRS_ERR_OK) {
        cqrs_error_t e2;
        cqrs_docstore_pause(r->live, old_shards, n_pairs, 0, NULL, &e2);
        rc = fail(r, &err);
        goto out;
    }
    /* Every event applied live was committed before the pause: this read sees it. */
    cqrs_err_t src = catch_up(r, &behind, &err);
    int64_t t_carry = cqrs_monotonic_ms();
    r->ms_final_catch_up = t_carry - pause_started;
    size_t copied = 0;
    for (size_t i = 0; src == CQRS_ERR_OK && i < n_pairs; i++)
        src = carry_over(r, &pairs[i], &copied, &err);
    int64_t t_switch = cqrs_monotonic_ms();
    r->ms_carry_over = t_switch - t_carry;
    int64_t remaining_ms = PAUSE_MS - (cqrs_monotonic_ms() - pause_started);
    if (src == CQRS_ERR_OK && remaining_ms < 1000)
        src = cqrs_error_set(&err, CQRS_ERR_TIMEOUT,
                             "the switch took longer than the pause allows; nothing switched");
    if (src == CQRS_ERR_OK && CQRS_FAILPOINT("rebuild-before-swap"))
        src = cqrs_error_set(&err, CQRS_ERR_INTERNAL, "failpoint rebuild-before-swap");
    if (src == CQRS_ERR_OK && lease_lost(&lease))
        src = cqrs_error_set(&err, CQRS_ERR_CONFLICT,
                             "another rebuild took the lease over; nothing switched");
    /* Each shard switches only while its pause is in force (checked in the script that
     * switches, in Redis's clock): a rebuild stalled past the pause switches nothing. Once one
     * shard switched the others must follow (force): one whose pause lapsed in between took
     * live writes after its offset was copied, so the new generation's offset is behind and
     * its projector re-applies from there. */
    size_t switched = 0;
    for (size_t i = 0; src == CQRS_ERR_OK && i < n_pairs; i++) {
        cqrs_err_t s = cqrs_docstore_switch_shard(r->live, pairs[i].old, pairs[i].new, tokens[i],
                                                  switched > 0, &err);
        if (s == CQRS_ERR_OK) {
            /* the new generation is live, the old one garbage */
            char name[300];
            const char *topic = query_topic(pairs[i].is_order ? "order" : "product");
            switched++;
            garbage_name(topic, pairs[i].partition, pairs[i].new, name, sizeof name);
            s = cqrs_docstore_names_remove(r->live, GARBAGE, name, &err);
            garbage_name(topic, pairs[i].partition, pairs[i].old, name, sizeof name);
            if (s == CQRS_ERR_OK)
                s = cqrs_docstore_names_add(r->live, GARBAGE, name, &err);
            if (s != CQRS_ERR_OK)
                src = s;
        } else if (s != CQRS_ERR_TIMEOUT || switched == 0)
            src = s;
    }
    if (src != CQRS_ERR_OK && switched == 0) {
        cqrs_error_t e2;
        cqrs_docstore_pause(r->live, old_shards, n_pairs, 0, NULL, &e2); /* go on live */
        rc = fail(r, &err);
        goto out;
    }
    if (src != CQRS_ERR_OK) {
        /* Some shards switched and a failure (Redis) stopped the rest. Readers follow each
         * shard's pointer: every shard is readable in the generation it is at; the next run
         * rebuilds them all into one generation again and deletes what this one left. */
        fprintf(stderr,
                "cqrsctl rebuild: %s; %zu of %zu shards switched (each readable in its own "
                "generation): run cqrsctl rebuild again\n",
                err.message, switched, n_pairs);
        rc = 3;
        goto out;
    }
    int64_t pause_ms = cqrs_monotonic_ms() - pause_started;
    r->ms_switch = cqrs_monotonic_ms() - t_switch;
    /* Readers follow each shard's pointer; "*" makes every cqrs-queryd drop what it cached and
     * read the pointers again (at most CQRS_GENERATION_TTL_MS later without it). */
    cqrs_error_t e2;
    cqrs_err_t arc = CQRS_ERR_UNAVAILABLE;
    for (int t = 0; t < 10 && arc != CQRS_ERR_OK; t++) {
        arc = cqrs_docstore_announce_reset(r->live, &e2);
        if (arc != CQRS_ERR_OK)
            usleep(300 * 1000);
    }
    double build_s = (double)(built_ms - r->started_ms) / 1000.0;
    printf("switched: %lld events (%lld in the build at %.0f events/s, %lld caught up), %zu "
           "aggregates, %lld dead letters, %zu keys carried over, %zu shards, projector paused "
           "%lld ms\n",
           r->events, built_events, build_s > 0 ? (double)built_events / build_s : 0.0,
           r->events - built_events, r->map.n, r->dead_letters, copied, n_pairs,
           (long long)pause_ms);
    fflush(stdout);
    fprintf(stderr,
            "phases (ms): read and fold %lld (%lld aggregates written meanwhile, %lld of them read "
            "back for a later event), write %lld, catch-up %lld, paused: final catch-up %lld, "
            "carry-over %lld, switch %lld\n",
            (long long)r->ms_read_fold, r->early, r->reread, (long long)r->ms_write,
            (long long)r->ms_catch_up, (long long)r->ms_final_catch_up, (long long)r->ms_carry_over,
            (long long)r->ms_switch);
    /* The old generation goes once no reader can still be on it (they follow within the
     * generation cache's lifetime even without the announcement). */
    usleep((CQRS_GENERATION_TTL_MS + 1000) * 1000);
    size_t deleted = 0;
    int64_t gc_ms = cqrs_monotonic_ms();
    if (collect_garbage(r, &deleted, &e2) != CQRS_ERR_OK)
        fprintf(stderr,
                "warning: the old generation was not deleted in full (%s); the next rebuild "
                "deletes what is left\n",
                e2.message);
    fprintf(stderr, "old generation deleted: %zu keys in %lld ms\n", deleted,
            (long long)(cqrs_monotonic_ms() - gc_ms));
    rc = 0;
    if (arc != CQRS_ERR_OK) {
        fprintf(stderr,
                "cqrsctl rebuild: switched, but the switch could not be announced: query daemons "
                "follow within %d ms (their generation cache)\n",
                CQRS_GENERATION_TTL_MS);
    }
out:
    if (lease.running) {
        pthread_mutex_lock(&lease.mu);
        lease.stop = true;
        pthread_cond_signal(&lease.cv);
        pthread_mutex_unlock(&lease.mu);
        pthread_join(lease.thread, NULL);
    }
    if (lease.token[0] && r->live) {
        cqrs_error_t e3;
        cqrs_docstore_unlease(r->live, LEASE, lease.token, &e3);
    }
    if (r->have_cur)
        agg_free(&r->cur);
    for (size_t i = 0; i < r->n_done; i++) {
        free(r->texts[i]);
        cqrs_index_ops_free(&r->ops[i]);
        agg_free(&r->done[i]);
    }
    free(r->map.v);
    free(pairs);
    free(old_shards);
    free(tokens);
    cqrs_docstore_destroy(r->live);
    cqrs_store_destroy(r->store);
    return rc;
}
