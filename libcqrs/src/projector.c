/* projector.c — Kafka consumer loop feeding a projection (see projector.h).
 *
 * Invariants:
 *  - Messages of a partition are handled one at a time, in offset order, on this thread.
 *  - Redis holds the truth about progress: each apply records the partition's next offset
 *    atomically with the document; assignment seeks there. The Kafka group's committed offsets
 *    (stored after each event) only serve lag monitoring.
 *  - Each partition writes into its own shard (keyspace.h): its documents, index entries,
 *    offset, meta and dead letters share one hash tag, so on a Redis Cluster they live in one
 *    slot and one apply is one script there.
 *  - Loss detection, per shard: the projector remembers each shard's incarnation and the
 *    offset it last recorded there; every apply checks both in the same script. A shard
 *    emptied or replaced (another incarnation or none: a flushed store, a cluster node that
 *    came back empty) sends its partition back to the offset it holds (none: the beginning);
 *    a partition whose recorded offset is not the one written last (a failover to a replica
 *    that missed writes, a restart that lost its last second) goes back to what the store
 *    holds. The version check makes re-applying harmless. An audit compares both every
 *    AUDIT_MS also when no event arrives, so an idle partition is healed too.
 *  - isolation.level=read_committed: a fenced relay's aborted writes are never seen.
 */
#include "cqrs/projector.h"

#include <librdkafka/rdkafka.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cqrs/bus.h"
#include "cqrs/failpoint.h"
#include "cqrs/keyspace.h"
#include "cqrs/log.h"
#include "cqrs/metrics.h"
#include "cqrs/util.h"

#define MAX_MISSING 256
#define AUDIT_MS 1000
#define LAYOUT_MS 10000
#define LAYOUT_RETRY_MS 500     /* while a topic's layout could not be recorded */
#define LAYOUT_METADATA_MS 2000 /* one topic's metadata request: bounds a stop's wait */

/* What this projector knows of one assigned partition. */
typedef struct part_state {
    const char *topic; /* one of the projector's topics (no copy, any length) */
    size_t topic_idx;
    int32_t partition;
    char shard[CQRS_SHARD_MAX];                 /* its keys' prefix (keyspace.h) */
    char incarnation[CQRS_INCARNATION_LEN + 1]; /* of its shard; "" until known */
    _Atomic int64_t written; /* the offset last recorded in (or read from) the store; -1: none */
    int64_t refill_until;    /* > 0: re-reading after a loss until the end seen then */
    int64_t refill_started_ms;
    uint64_t seeks; /* successful rewinds: tells a caller whether its partition was sent back */
} part_state_t;

typedef struct missing {
    char topic[256]; /* Kafka allows 249 characters */
    int32_t partition;
    int64_t low;
} missing_t;

struct cqrs_projector {
    cqrs_projector_config_t cfg;
    char *brokers, *group_id, *client_id;
    char **topics;
    int32_t *partitions; /* per topic, from Kafka's metadata; 0 until known */
    int64_t next_layout;
    bool layout_failing; /* the last attempt left a topic out (said once at warn, then debug) */
    rd_kafka_t *rk;
    cqrs_docstore_t *ds;
    pthread_t thread;
    bool running;
    bool detect; /* loss detection (off only for the CQRS_UNSAFE_NO_LOSS_DETECTION control) */
    part_state_t *parts; /* the assigned partitions: changed by the projector thread only, */
    size_t n_parts, cap_parts;
    pthread_mutex_t parts_lock; /* taken there when the array changes and by the metrics */
    int64_t next_audit;
    atomic_bool stop;
    atomic_bool kafka_up, redis_up;
    atomic_uint history_missing, assigned, refilling;
    atomic_uint_fast64_t applied, duplicates, dead_letters, gaps, parked, undecodable, resets,
        regressions, replaced;
    /* The consumer's health from its statistics (stats_cb, served by the consumer poll on the
     * projector thread): unhealthy since (ms, monotonic; 0: healthy), why, and whether the
     * latest report found it unhealthy for CQRS_BUS_STALL_MS. */
    int64_t unhealthy_since;
    cqrs_bus_health_t health;
    bool replace_due;
    pthread_mutex_t rk_lock;   /* guards rk against the metrics reader while it is closed */
    cqrs_histogram_t *latency; /* per topic (projection) */
    /* Where the time goes (all topics): Kafka — from the relay's produce (the message's
     * CreateTime) to this consumer's poll, which takes in the relay's commit and the fetch —
     * and the apply of one message. */
    cqrs_histogram_t stage_kafka, stage_apply;
    missing_t missing[MAX_MISSING];
    unsigned n_missing;
    int64_t next_missing_check;
};

static void shard_of(cqrs_projector_t *p, const char *topic, int32_t partition, char *out,
                     size_t cap)
{
    cqrs_keys_shard(cqrs_docstore_prefix(p->ds), topic, partition, out, cap);
}

static void sleep_unless_stopped(cqrs_projector_t *p, unsigned ms)
{
    for (unsigned waited = 0; waited < ms && !atomic_load(&p->stop); waited += 50)
        usleep(50 * 1000);
}

/* The offset Redis recorded for a partition (in its shard's current generation), -1 when none;
 * waits out a Redis outage. */
static int64_t redis_offset(cqrs_projector_t *p, const char *topic, int32_t partition)
{
    char shard[CQRS_SHARD_MAX];
    unsigned attempt = 0;
    while (!atomic_load(&p->stop)) {
        int64_t off;
        cqrs_error_t e;
        cqrs_err_t rc =
            cqrs_docstore_current_shard(p->ds, topic, partition, shard, sizeof shard, &e);
        if (rc == CQRS_ERR_OK)
            rc = cqrs_docstore_offset(p->ds, shard, partition, &off, &e);
        if (rc == CQRS_ERR_OK)
            return off;
        if (rc == CQRS_ERR_NOT_FOUND)
            return -1;
        atomic_store(&p->redis_up, false);
        if (attempt++ % 20 == 0)
            CQRS_LOG_WARN("cannot read applied offsets from Redis; waiting", "error", e.message);
        sleep_unless_stopped(p, 500);
    }
    return -1;
}

static void report_missing(const missing_t *m, int64_t have)
{
    char part[12], low[24], off[24];
    snprintf(part, sizeof part, "%d", m->partition);
    snprintf(low, sizeof low, "%lld", (long long)m->low);
    snprintf(off, sizeof off, "%lld", (long long)(have < 0 ? 0 : have));
    CQRS_LOG_ERROR("Kafka no longer holds the events this read model needs; partition paused."
                   " Rebuild the read model from PostgreSQL: cqrsctl rebuild",
                   "topic", m->topic, "partition", part, "needed_from_offset", off,
                   "kafka_earliest_offset", low);
}

/* A shard's current generation (its pointer), its incarnation there (given one when it has
 * none) and, read with it, its partition's offset (-1: none) into *stored; waits out a Redis
 * outage. Offsets read with an incarnation belong to it (a shard emptied afterwards is caught
 * by the next apply or audit); a switch between the two reads is simply read again. */
static bool learn_incarnation(cqrs_projector_t *p, part_state_t *ps, int64_t *stored)
{
    unsigned attempt = 0;
    while (!atomic_load(&p->stop)) {
        cqrs_error_t e;
        cqrs_err_t rc = cqrs_docstore_current_shard(p->ds, ps->topic, ps->partition, ps->shard,
                                                    sizeof ps->shard, &e);
        if (rc == CQRS_ERR_OK)
            rc = cqrs_docstore_shard_open(p->ds, ps->shard, ps->partition, ps->incarnation, stored,
                                          &e);
        if (rc == CQRS_ERR_OK)
            return true;
        if (rc == CQRS_ERR_STATE)
            continue; /* switched to another generation between the reads */
        atomic_store(&p->redis_up, false);
        if (attempt++ % 20 == 0)
            CQRS_LOG_WARN("cannot read the read model's incarnation from Redis; waiting", "error",
                          e.message);
        sleep_unless_stopped(p, 500);
    }
    return false;
}

static part_state_t *part_find(cqrs_projector_t *p, const char *topic, int32_t partition)
{
    for (size_t i = 0; i < p->n_parts; i++)
        if (p->parts[i].partition == partition && strcmp(p->parts[i].topic, topic) == 0)
            return &p->parts[i];
    return NULL;
}

static part_state_t *part_add(cqrs_projector_t *p, const char *topic, int32_t partition,
                              int64_t written)
{
    pthread_mutex_lock(&p->parts_lock);
    part_state_t *ps = NULL;
    if (p->n_parts == p->cap_parts) {
        size_t cap = p->cap_parts ? 2 * p->cap_parts : 64;
        part_state_t *v = realloc(p->parts, cap * sizeof *v);
        if (!v)
            goto out;
        p->parts = v;
        p->cap_parts = cap;
    }
    size_t t = 0;
    while (t < p->cfg.n_topics && strcmp(p->topics[t], topic) != 0)
        t++;
    if (t == p->cfg.n_topics)
        goto out; /* not one of ours */
    ps = &p->parts[p->n_parts++];
    memset(ps, 0, sizeof *ps);
    ps->topic = p->topics[t];
    ps->topic_idx = t;
    ps->partition = partition;
    ps->written = written;
    shard_of(p, ps->topic, partition, ps->shard, sizeof ps->shard);
out:
    pthread_mutex_unlock(&p->parts_lock);
    return ps;
}

static void parts_clear(cqrs_projector_t *p)
{
    pthread_mutex_lock(&p->parts_lock);
    p->n_parts = 0;
    pthread_mutex_unlock(&p->parts_lock);
    atomic_store(&p->refilling, 0);
}

/* For the metrics thread: the offset recorded for a partition, -1 when unknown. */
static int64_t part_written(cqrs_projector_t *p, const char *topic, int32_t partition)
{
    pthread_mutex_lock(&p->parts_lock);
    part_state_t *ps = part_find(p, topic, partition);
    int64_t w = ps ? ps->written : -1;
    pthread_mutex_unlock(&p->parts_lock);
    return w;
}

/* Paused for want of history: recheck_missing owns it until a rebuild records an offset. */
static bool paused_for_history(const cqrs_projector_t *p, const char *topic, int32_t partition)
{
    for (unsigned i = 0; i < p->n_missing; i++)
        if (p->missing[i].partition == partition && strcmp(p->missing[i].topic, topic) == 0)
            return true;
    return false;
}

/* Pauses a partition whose needed history Kafka no longer holds (retention); true if so. */
static bool check_history(cqrs_projector_t *p, rd_kafka_t *rk, const char *topic, int32_t partition,
                          int64_t have)
{
    if (paused_for_history(p, topic, partition))
        return false; /* already paused and reported */
    int64_t low = 0, high = 0;
    if (rd_kafka_query_watermark_offsets(rk, topic, partition, &low, &high, 5000) !=
            RD_KAFKA_RESP_ERR_NO_ERROR ||
        (have < 0 ? 0 : have) >= low || p->n_missing >= MAX_MISSING)
        return false;
    missing_t *m = &p->missing[p->n_missing++];
    snprintf(m->topic, sizeof m->topic, "%s", topic);
    m->partition = partition;
    m->low = low;
    report_missing(m, have);
    atomic_store(&p->history_missing, p->n_missing);
    return true;
}

static void refill_field(const part_state_t *ps, char *out, size_t cap)
{
    snprintf(out, cap, "%s:%d", ps->topic, ps->partition);
}

/* ps re-reads what the store lost, up to `until`: counted here and marked in the store, where
 * every instance's readiness sees it (mark: false when the mark is there already). */
static void refill_start(cqrs_projector_t *p, part_state_t *ps, int64_t until, bool mark)
{
    if (!ps->refill_until) {
        atomic_fetch_add(&p->refilling, 1);
        ps->refill_started_ms = cqrs_monotonic_ms();
    }
    ps->refill_until = until;
    char f[300];
    cqrs_error_t e;
    refill_field(ps, f, sizeof f);
    if (mark && cqrs_docstore_refill_set(p->ds, f, until, &e) != CQRS_ERR_OK)
        CQRS_LOG_WARN("cannot mark a refill in Redis", "partition", f, "error", e.message);
}

static void refill_done(cqrs_projector_t *p, part_state_t *ps)
{
    char f[300], ms[24];
    refill_field(ps, f, sizeof f);
    snprintf(ms, sizeof ms, "%lld", (long long)(cqrs_monotonic_ms() - ps->refill_started_ms));
    CQRS_LOG_INFO("partition refilled after a store loss", "partition", f, "duration_ms", ms);
    ps->refill_until = 0;
    atomic_fetch_sub(&p->refilling, 1);
    cqrs_error_t e;
    if (cqrs_docstore_refill_clear(p->ds, f, &e) != CQRS_ERR_OK)
        CQRS_LOG_WARN("cannot clear a refill mark in Redis; it stays until the partition's next"
                      " assignment",
                      "partition", f, "error", e.message);
}

/* A refill another instance (or this one, before a rebalance) was running on a partition just
 * assigned: taken over while the store's offset is below its goal, cleared otherwise. */
static void refill_resume(cqrs_projector_t *p, part_state_t *ps)
{
    char f[300];
    int64_t until = 0;
    cqrs_error_t e;
    refill_field(ps, f, sizeof f);
    if (cqrs_docstore_refill_get(p->ds, f, &until, &e) != CQRS_ERR_OK)
        return;
    if (ps->written < until)
        refill_start(p, ps, until, false);
    else
        cqrs_docstore_refill_clear(p->ds, f, &e);
}

static void shard_reset(cqrs_projector_t *p, part_state_t *ps);

/* A partition taken away by an incremental rebalance: its state goes, a refill it was running
 * stays marked in the store for the instance that gets it next (refill_resume). */
static void part_remove(cqrs_projector_t *p, const char *topic, int32_t partition)
{
    pthread_mutex_lock(&p->parts_lock);
    part_state_t *ps = part_find(p, topic, partition);
    if (ps) {
        if (ps->refill_until)
            atomic_fetch_sub(&p->refilling, 1);
        *ps = p->parts[--p->n_parts];
    }
    pthread_mutex_unlock(&p->parts_lock);
    for (unsigned i = 0; i < p->n_missing; i++)
        if (p->missing[i].partition == partition && strcmp(p->missing[i].topic, topic) == 0) {
            p->missing[i] = p->missing[--p->n_missing];
            break;
        }
}

static void incremental_result(rd_kafka_error_t *e, const char *what)
{
    if (!e)
        return;
    CQRS_LOG_ERROR("Kafka refused a change of assignment", "operation", what, "error",
                   rd_kafka_error_string(e));
    rd_kafka_error_destroy(e);
}

/* Records each topic's partition count in the store's layout (keyspace.h: how readers find an
 * aggregate's shard), from Kafka's metadata: the topics of parts, or every topic (parts NULL:
 * at the start, before the first assignment, so that reads work as soon as the daemon is up;
 * and every LAYOUT_MS, since the layout goes with a store that is emptied: layouts_due). A count
 * that differs from the one recorded means the topic was given more partitions: its aggregates
 * moved to other partitions, and so to other shards — an error an operator must handle (a
 * rebuild), logged each time. Returns whether every topic meant was recorded (readers wait for it:
 * the serving instances are not ready until then). */
static bool record_layouts(cqrs_projector_t *p, rd_kafka_t *rk,
                           const rd_kafka_topic_partition_list_t *parts)
{
    bool all = true;
    /* a failure said once at warn, then at debug while it lasts */
    cqrs_log_level_t failed = p->layout_failing ? CQRS_LOG_DEBUG : CQRS_LOG_WARN;
    for (size_t t = 0; t < p->cfg.n_topics; t++) {
        bool wanted = !parts;
        for (int i = 0; parts && i < parts->cnt && !wanted; i++)
            wanted = strcmp(parts->elems[i].topic, p->topics[t]) == 0;
        if (!wanted)
            continue;
        if (p->partitions[t] <= 0) {
            rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, p->topics[t], NULL);
            const struct rd_kafka_metadata *md = NULL;
            if (rkt &&
                rd_kafka_metadata(rk, 0, rkt, &md, LAYOUT_METADATA_MS) ==
                    RD_KAFKA_RESP_ERR_NO_ERROR &&
                md->topic_cnt == 1 && !md->topics[0].err)
                p->partitions[t] = md->topics[0].partition_cnt;
            if (md)
                rd_kafka_metadata_destroy(md);
            if (rkt)
                rd_kafka_topic_destroy(rkt);
        }
        if (p->partitions[t] <= 0 || p->partitions[t] > CQRS_MAX_SHARDS) {
            CQRS_LOG_AT(failed, "cannot learn a topic's partition count yet", "topic",
                        p->topics[t]);
            p->partitions[t] = 0;
            all = false;
            continue;
        }
        int32_t recorded = 0;
        cqrs_error_t e;
        if (cqrs_docstore_layout_set(p->ds, p->topics[t], p->partitions[t], &recorded, &e) !=
            CQRS_ERR_OK) {
            CQRS_LOG_AT(failed, "cannot record the read model's layout yet", "error", e.message);
            all = false;
        } else if (recorded != p->partitions[t]) {
            char have[12], rec[12];
            snprintf(have, sizeof have, "%d", p->partitions[t]);
            snprintf(rec, sizeof rec, "%d", recorded);
            CQRS_LOG_ERROR("the topic's partition count differs from the read model's layout:"
                           " aggregates moved to other partitions; rebuild the read model"
                           " (cqrsctl rebuild) after deleting <prefix>:layout",
                           "topic", p->topics[t], "partitions", have, "layout", rec);
        }
    }
    p->layout_failing = !all;
    return all;
}

/* Everything assigned is gone (an eager revoke, or a replaced consumer): the partitions' state
 * with it. */
static void assignment_forgotten(cqrs_projector_t *p)
{
    p->n_missing = 0;
    parts_clear(p);
    atomic_store(&p->assigned, 0);
    atomic_store(&p->history_missing, 0);
}

/* Eager protocols (classic range/roundrobin) take everything away and hand out a whole new
 * assignment; cooperative ones (KIP-848's consumer protocol, cooperative-sticky) add and remove
 * only the partitions that move, so the others keep their state and never stop. */
static void rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    cqrs_projector_t *p = opaque;
    const char *protocol = rd_kafka_rebalance_protocol(rk);
    bool incremental = protocol && strcmp(protocol, "COOPERATIVE") == 0;
    char n[12];
    snprintf(n, sizeof n, "%d", parts->cnt);
    if (err != RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        if (incremental) {
            for (int i = 0; i < parts->cnt; i++)
                part_remove(p, parts->elems[i].topic, parts->elems[i].partition);
            incremental_result(rd_kafka_incremental_unassign(rk, parts), "unassign");
            rd_kafka_topic_partition_list_t *now = NULL;
            if (rd_kafka_assignment(rk, &now) == RD_KAFKA_RESP_ERR_NO_ERROR && now) {
                atomic_store(&p->assigned, (unsigned)now->cnt);
                rd_kafka_topic_partition_list_destroy(now);
            }
            atomic_store(&p->history_missing, p->n_missing);
        } else {
            rd_kafka_assign(rk, NULL);
            assignment_forgotten(p);
        }
        CQRS_LOG_INFO("partitions revoked", "count", n);
        return;
    }
    if (!incremental) {
        p->n_missing = 0;
        parts_clear(p);
    }
    /* Resume where Redis says the read model is; with no record, from the beginning. Each
     * new partition learns its shard's incarnation with its offset; the partitions this
     * instance keeps (incremental) keep theirs: a shard emptied meanwhile is a reset for them
     * (counted, logged, re-read) found by the next apply or audit, not one to adopt quietly. */
    record_layouts(p, rk, parts);
    /* A partition paused for want of history keeps librdkafka's pause flag across a revoke:
     * one that comes back with its history there (a rebuild since) is resumed. */
    rd_kafka_topic_partition_list_t *paused = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_t *running = rd_kafka_topic_partition_list_new(parts->cnt);
    for (int i = 0; i < parts->cnt; i++) {
        rd_kafka_topic_partition_t *tp = &parts->elems[i];
        int64_t have = -1;
        part_state_t *ps = part_add(p, tp->topic, tp->partition, -1);
        if (ps)
            learn_incarnation(p, ps, &have);
        if (ps)
            ps->written = have;
        tp->offset = have >= 0 ? have : RD_KAFKA_OFFSET_BEGINNING;
        if (ps && p->detect)
            refill_resume(p, ps);
        if (check_history(p, rk, tp->topic, tp->partition, have))
            rd_kafka_topic_partition_list_add(paused, tp->topic, tp->partition);
        else if (!paused_for_history(p, tp->topic, tp->partition))
            rd_kafka_topic_partition_list_add(running, tp->topic, tp->partition);
    }
    if (incremental)
        incremental_result(rd_kafka_incremental_assign(rk, parts), "assign");
    else
        rd_kafka_assign(rk, parts);
    rd_kafka_topic_partition_list_t *now = NULL;
    if (rd_kafka_assignment(rk, &now) == RD_KAFKA_RESP_ERR_NO_ERROR && now) {
        atomic_store(&p->assigned, (unsigned)now->cnt);
        rd_kafka_topic_partition_list_destroy(now);
    }
    if (paused->cnt > 0)
        rd_kafka_pause_partitions(rk, paused);
    if (running->cnt > 0)
        rd_kafka_resume_partitions(rk, running);
    rd_kafka_topic_partition_list_destroy(paused);
    rd_kafka_topic_partition_list_destroy(running);
    atomic_store(&p->history_missing, p->n_missing);
    CQRS_LOG_INFO("partitions assigned", "count", n, "protocol", protocol ? protocol : "NONE");
}

/* Sends a partition to the offset the store holds (-1: none, the beginning); after a loss it
 * counts as refilling until it reaches the end it has now. If the seek fails, what this
 * projector remembers stays as it was, so the next apply or audit finds the mismatch again;
 * false then. */
static bool rewind_partition(cqrs_projector_t *p, part_state_t *ps, int64_t stored, bool loss)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, ps->topic, ps->partition)->offset =
        stored >= 0 ? stored : RD_KAFKA_OFFSET_BEGINNING;
    rd_kafka_error_t *e = rd_kafka_seek_partitions(p->rk, l, 5000);
    rd_kafka_resp_err_t perr = l->elems[0].err;
    rd_kafka_topic_partition_list_destroy(l);
    char part[12], from[24], was[24];
    snprintf(part, sizeof part, "%d", ps->partition);
    snprintf(from, sizeof from, "%lld", (long long)stored);
    snprintf(was, sizeof was, "%lld", (long long)ps->written);
    if (e || perr) {
        CQRS_LOG_WARN("cannot rewind a partition yet; trying again", "topic", ps->topic,
                      "partition", part, "error",
                      e ? rd_kafka_error_string(e) : rd_kafka_err2str(perr));
        if (e)
            rd_kafka_error_destroy(e);
        return false;
    }
    ps->written = stored;
    ps->seeks++;
    int64_t low = 0, high = 0;
    if (rd_kafka_query_watermark_offsets(p->rk, ps->topic, ps->partition, &low, &high, 2000) !=
        RD_KAFKA_RESP_ERR_NO_ERROR)
        rd_kafka_get_watermark_offsets(p->rk, ps->topic, ps->partition, &low, &high);
    if (loss && high > (stored < 0 ? 0 : stored))
        refill_start(p, ps, high, true);
    CQRS_LOG_WARN("partition rewound to the offset the read model store holds; re-applying",
                  "topic", ps->topic, "partition", part, "from_offset", from, "recorded_before",
                  was);
    if (check_history(p, p->rk, ps->topic, ps->partition, stored)) {
        rd_kafka_topic_partition_list_t *pl = rd_kafka_topic_partition_list_new(1);
        rd_kafka_topic_partition_list_add(pl, ps->topic, ps->partition);
        rd_kafka_pause_partitions(p->rk, pl);
        rd_kafka_topic_partition_list_destroy(pl);
    }
    return true;
}

/* A shard was emptied or replaced (its incarnation changed or is gone): learn the one in force
 * and send its partition back to the offset the shard holds, if that is not what this
 * projector recorded last. */
static void shard_reset(cqrs_projector_t *p, part_state_t *ps)
{
    atomic_fetch_add(&p->resets, 1);
    /* An emptied store lost its layout too: readers (and cqrsctl) need it back now. */
    if (p->rk)
        record_layouts(p, p->rk, NULL);
    char before[CQRS_INCARNATION_LEN + 1];
    snprintf(before, sizeof before, "%s", ps->incarnation);
    int64_t stored = -1;
    if (!learn_incarnation(p, ps, &stored))
        return;
    char part[12];
    snprintf(part, sizeof part, "%d", ps->partition);
    CQRS_LOG_WARN("a shard of the read model was emptied or replaced (its incarnation changed);"
                  " re-reading its partition from the offset it holds",
                  "topic", ps->topic, "partition", part, "incarnation_before", before,
                  "incarnation", ps->incarnation);
    if (!paused_for_history(p, ps->topic, ps->partition) && stored != ps->written)
        rewind_partition(p, ps, stored, true);
}

/* The store records another offset for ps than this projector wrote last; true when the
 * partition was sent there. */
static bool offset_moved(cqrs_projector_t *p, part_state_t *ps, int64_t stored)
{
    char part[12], have[24], wrote[24];
    snprintf(part, sizeof part, "%d", ps->partition);
    snprintf(have, sizeof have, "%lld", (long long)stored);
    snprintf(wrote, sizeof wrote, "%lld", (long long)ps->written);
    bool loss = stored < ps->written;
    if (loss) {
        atomic_fetch_add(&p->regressions, 1);
        CQRS_LOG_ERROR("the read model store lost writes (a failover to a replica that missed"
                       " them, or a restart that lost its last writes): its offset for the"
                       " partition went back; re-applying from there",
                       "topic", ps->topic, "partition", part, "store_offset", have,
                       "recorded_offset", wrote);
    } else {
        CQRS_LOG_WARN("another writer recorded this partition's offset; going on from there",
                      "topic", ps->topic, "partition", part, "store_offset", have,
                      "recorded_offset", wrote);
    }
    return rewind_partition(p, ps, stored, loss);
}

typedef enum verdict {
    RECORDED, /* the write counted: on to the next message */
    DROPPED,  /* its partition was sent back (or we stop): this message comes again */
    AGAIN,    /* the store changed but this partition stays where it is: write it again */
} verdict_t;

/* A rebuild switched ps's shard to a new generation: go on there. It took over the
 * incarnation and the offsets this projector recorded before its pause, so normally the
 * partition stays where it is; if the old generation took writes after the new one copied
 * its offset (a pause that lapsed), the new one's offset is behind and the partition goes
 * back there to re-apply (duplicates are skipped). */
static verdict_t generation_switched(cqrs_projector_t *p, part_state_t *ps)
{
    char before[CQRS_SHARD_MAX], part[12];
    snprintf(before, sizeof before, "%s", ps->shard);
    snprintf(part, sizeof part, "%d", ps->partition);
    int64_t stored = -1, was = 0, now = 0;
    if (!learn_incarnation(p, ps, &stored))
        return DROPPED; /* stopping */
    cqrs_keys_shard_parse(before, NULL, 0, &was);
    cqrs_keys_shard_parse(ps->shard, NULL, 0, &now);
    /* A pointer that went back was lost (a node that came back without it, a failover that
     * missed it): the store lost writes — counted and refilled like any other loss. */
    bool loss = now < was;
    if (loss) {
        atomic_fetch_add(&p->regressions, 1);
        CQRS_LOG_ERROR("the shard's generation pointer went back (the store lost writes);"
                       " re-applying into the generation it names",
                       "topic", ps->topic, "partition", part, "from", before, "to", ps->shard);
    } else {
        CQRS_LOG_INFO("a rebuild switched the partition's shard to a new generation", "topic",
                      ps->topic, "partition", part, "from", before, "to", ps->shard);
    }
    if (stored == ps->written)
        return AGAIN;
    if (rewind_partition(p, ps, stored, loss))
        return DROPPED;
    sleep_unless_stopped(p, 200);
    return AGAIN;
}

/* Every AUDIT_MS: each assigned partition's shard incarnation and offset as the store holds
 * them (one pipelined round trip), compared with what this projector knows — a loss is found
 * even on a partition where nothing new arrives. */
static void audit(cqrs_projector_t *p)
{
    if (!p->detect || p->n_parts == 0 || cqrs_monotonic_ms() < p->next_audit)
        return;
    p->next_audit = cqrs_monotonic_ms() + AUDIT_MS;
    size_t n = p->n_parts;
    const char **shards = malloc(n * sizeof *shards);
    int32_t *parts = malloc(n * sizeof *parts);
    int64_t *offs = malloc(n * sizeof *offs);
    char(*incs)[CQRS_INCARNATION_LEN + 1] = malloc(n * sizeof *incs);
    int64_t *gens = malloc(n * sizeof *gens);
    if (shards && parts && offs && incs && gens) {
        for (size_t i = 0; i < n; i++) {
            shards[i] = p->parts[i].shard;
            parts[i] = p->parts[i].partition;
        }
        cqrs_error_t e;
        if (cqrs_docstore_progress(p->ds, shards, parts, n, incs, offs, gens, &e) != CQRS_ERR_OK) {
            atomic_store(&p->redis_up, false);
        } else {
            atomic_store(&p->redis_up, true);
            for (size_t i = 0; i < n && i < p->n_parts; i++) {
                part_state_t *ps = &p->parts[i];
                int64_t mine = 0;
                cqrs_keys_shard_parse(ps->shard, NULL, 0, &mine);
                if (gens[i] != mine)
                    generation_switched(p, ps);
                else if (!incs[i][0] || strcmp(incs[i], ps->incarnation) != 0)
                    shard_reset(p, ps);
                else if (offs[i] != ps->written && !paused_for_history(p, ps->topic, ps->partition))
                    offset_moved(p, ps, offs[i]);
            }
        }
    }
    free(shards);
    free(parts);
    free(offs);
    free(incs);
    free(gens);
}

/* The layout goes with a store that is emptied: written again every LAYOUT_MS (soon again while
 * it could not be). */
static void layouts_due(cqrs_projector_t *p)
{
    if (!p->rk || cqrs_monotonic_ms() < p->next_layout)
        return;
    bool all = record_layouts(p, p->rk, NULL);
    p->next_layout = cqrs_monotonic_ms() + (all ? LAYOUT_MS : LAYOUT_RETRY_MS);
}

/* Paused partitions come back once a rebuild recorded an offset Kafka still holds. */
static void recheck_missing(cqrs_projector_t *p)
{
    if (p->n_missing == 0 || cqrs_monotonic_ms() < p->next_missing_check)
        return;
    p->next_missing_check = cqrs_monotonic_ms() + 5000;
    for (unsigned i = 0; i < p->n_missing;) {
        missing_t *m = &p->missing[i];
        int64_t have = redis_offset(p, m->topic, m->partition);
        if (have < m->low) {
            i++;
            continue;
        }
        rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
        rd_kafka_topic_partition_list_add(l, m->topic, m->partition)->offset = have;
        rd_kafka_error_t *e = rd_kafka_seek_partitions(p->rk, l, 5000);
        if (e)
            rd_kafka_error_destroy(e);
        rd_kafka_resume_partitions(p->rk, l);
        rd_kafka_topic_partition_list_destroy(l);
        part_state_t *ps = part_find(p, m->topic, m->partition);
        if (ps)
            ps->written = have;
        CQRS_LOG_INFO("partition resumed after rebuild", "topic", m->topic);
        p->missing[i] = p->missing[--p->n_missing];
    }
    atomic_store(&p->history_missing, p->n_missing);
}

cqrs_projector_t *cqrs_projector_new(const cqrs_projector_config_t *cfg, cqrs_error_t *err)
{
    cqrs_projector_t *p = calloc(1, sizeof *p);
    if (!p) {
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    p->cfg = *cfg;
    p->detect = !CQRS_UNSAFE("NO_LOSS_DETECTION");
    if (!p->detect)
        CQRS_LOG_WARN("CQRS_UNSAFE_NO_LOSS_DETECTION=1: a read model store that loses writes is"
                      " NOT detected (negative control of the fault suite)");
    pthread_mutex_init(&p->rk_lock, NULL);
    pthread_mutex_init(&p->parts_lock, NULL);
    p->brokers = strdup(cfg->brokers);
    p->group_id = strdup(cfg->group_id);
    p->client_id = strdup(cfg->client_id ? cfg->client_id : "cqrs-projector");
    p->topics = calloc(cfg->n_topics, sizeof *p->topics);
    p->latency = calloc(cfg->n_topics, sizeof *p->latency);
    p->partitions = calloc(cfg->n_topics, sizeof *p->partitions);
    if (!p->brokers || !p->group_id || !p->client_id || !p->topics || !p->partitions ||
        !p->latency) {
        cqrs_projector_destroy(p);
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    p->cfg.topics = NULL;
    p->cfg.redis = NULL; /* borrowed for this call only */
    for (size_t i = 0; i < cfg->n_topics; i++)
        p->topics[i] = strdup(cfg->topics[i]);
    p->ds = cqrs_docstore_new(cfg->redis, cfg->redis_timeout_ms, err);
    if (!p->ds) {
        cqrs_projector_destroy(p);
        return NULL;
    }
    return p;
}

cqrs_err_t cqrs_projection_apply(const cqrs_projection_t *p, const json_t *doc, cqrs_event_t *ev,
                                 json_t **next, cqrs_error_t *err)
{
    *next = NULL;
    cqrs_err_t rc = p->events ? cqrs_event_upcast(p->events, ev, err) : CQRS_ERR_OK;
    return rc != CQRS_ERR_OK ? rc : p->apply(doc, ev, next, err);
}

cqrs_err_t cqrs_projection_apply_owned(const cqrs_projection_t *p, json_t *doc, cqrs_event_t *ev,
                                       json_t **next, cqrs_error_t *err)
{
    *next = NULL;
    cqrs_err_t rc = p->events ? cqrs_event_upcast(p->events, ev, err) : CQRS_ERR_OK;
    if (rc != CQRS_ERR_OK)
        return rc;
    if (p->apply_owned)
        return p->apply_owned(doc, ev, next, err);
    rc = p->apply(doc, ev, next, err);
    if (rc == CQRS_ERR_OK)
        json_decref(doc);
    return rc;
}

static int stats_cb(rd_kafka_t *rk, char *json, size_t len, void *opaque);

static rd_kafka_t *consumer_new(cqrs_projector_t *p, cqrs_error_t *err)
{
    /* Offsets are stored by hand after the Redis write and committed by the auto-commit
     * (bus.c refuses an operator's value for all of these but fetch.wait.max.ms). */
    const char *own[13][2] = {
        {"group.id", p->group_id},
        {"enable.auto.commit", "true"},
        {"enable.auto.offset.store", "false"},
        {"auto.offset.reset", "earliest"},
        {"isolation.level", "read_committed"},
        {"enable.partition.eof", "true"},
        {"fetch.wait.max.ms", "10"},
        /* Connections to every broker kept up and retried: with sparse connections, a group
         * whose session timed out while its only broker was unreachable waited in query-coord
         * for a connection nothing asked for (minutes, until the next metadata refresh; the
         * fault suite's kafka-pause with a session shorter than the pause). */
        {"enable.sparse.connections", "false"},
        /* The watchdog's input (stats_cb). */
        {"statistics.interval.ms", CQRS_BUS_STATS_INTERVAL},
    };
    size_t n = 9;
    /* KIP-848 moves the session timeout and the assignor to the broker (librdkafka refuses
     * them with group.protocol=consumer): ask for its range assignor, which, like the classic
     * default, gives every instance a share of each topic (each projection) rather than a
     * balanced count of partitions that may all belong to one. The classic protocol keeps its
     * default assignors and heartbeats three times per session. */
    char session[16], heartbeat[16];
    snprintf(session, sizeof session, "%d", p->cfg.session_timeout_ms);
    snprintf(heartbeat, sizeof heartbeat, "%d", p->cfg.session_timeout_ms / 3);
    if (p->cfg.consumer_protocol) {
        own[n][0] = "group.protocol", own[n++][1] = "consumer";
        own[n][0] = "group.remote.assignor", own[n++][1] = "range";
    } else if (p->cfg.session_timeout_ms > 0) {
        own[n][0] = "session.timeout.ms", own[n++][1] = session;
        own[n][0] = "heartbeat.interval.ms", own[n++][1] = heartbeat;
    }
    own[n][0] = own[n][1] = NULL;
    rd_kafka_conf_t *conf =
        cqrs_bus_conf_new(p->brokers, p->client_id, (const char *const(*)[2])own, err);
    if (!conf)
        return NULL;
    rd_kafka_conf_set_rebalance_cb(conf, rebalance_cb);
    rd_kafka_conf_set_stats_cb(conf, stats_cb);
    rd_kafka_conf_set_opaque(conf, p);
    rd_kafka_t *rk = cqrs_bus_client_new(RD_KAFKA_CONSUMER, conf, "consumer", err);
    if (!rk)
        return NULL;
    rd_kafka_poll_set_consumer(rk);
    rd_kafka_topic_partition_list_t *subs = rd_kafka_topic_partition_list_new((int)p->cfg.n_topics);
    for (size_t i = 0; i < p->cfg.n_topics; i++)
        rd_kafka_topic_partition_list_add(subs, p->topics[i], RD_KAFKA_PARTITION_UA);
    rd_kafka_resp_err_t e = rd_kafka_subscribe(rk, subs);
    rd_kafka_topic_partition_list_destroy(subs);
    if (e) {
        cqrs_error_set(err, CQRS_ERR_CONFIG, "subscribe: %s", rd_kafka_err2str(e));
        rd_kafka_destroy(rk);
        return NULL;
    }
    return rk;
}

/* Statistics, every CQRS_BUS_STATS_INTERVAL ms, served by the consumer poll (this thread):
 * how long the consumer has been unable to work. */
static int stats_cb(rd_kafka_t *rk, char *json, size_t len, void *opaque)
{
    (void)rk;
    cqrs_projector_t *p = opaque;
    cqrs_bus_health_t h;
    if (cqrs_bus_stats_health(json, len, &h)) {
        p->unhealthy_since = 0;
        p->replace_due = false;
    } else {
        int64_t now = cqrs_monotonic_ms();
        if (!p->unhealthy_since)
            p->unhealthy_since = now;
        p->health = h;
        p->replace_due = now - p->unhealthy_since >= CQRS_BUS_STALL_MS;
    }
    return 0; /* librdkafka frees json */
}

/* Header values are not NUL-terminated; copy each into one of a few buffers. */
typedef struct header_ctx {
    rd_kafka_headers_t *hdrs;
    char buf[4][512];
    int next;
} header_ctx_t;

static const char *header_lookup(const char *name, void *ud)
{
    header_ctx_t *h = ud;
    const void *val = NULL;
    size_t size = 0;
    if (!h->hdrs || rd_kafka_header_get_last(h->hdrs, name, &val, &size) != 0 || !val)
        return NULL;
    char *b = h->buf[h->next++ % 4];
    if (size >= sizeof h->buf[0] || memchr(val, '\0', size))
        return NULL;
    memcpy(b, val, size);
    b[size] = '\0';
    return b;
}

static void store_offset(cqrs_projector_t *p, const rd_kafka_message_t *m)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, rd_kafka_topic_name(m->rkt), m->partition)->offset =
        m->offset + 1;
    /* _STATE during a rebalance (partition no longer ours) is expected and harmless. */
    rd_kafka_offsets_store(p->rk, l);
    rd_kafka_topic_partition_list_destroy(l);
}

/* The partition state of a message, added (from the store's record) if unknown. */
static part_state_t *part_of(cqrs_projector_t *p, const rd_kafka_message_t *m)
{
    const char *topic = rd_kafka_topic_name(m->rkt);
    part_state_t *ps = part_find(p, topic, m->partition);
    if (ps)
        return ps;
    int64_t have = -1;
    ps = part_add(p, topic, m->partition, -1);
    if (ps)
        learn_incarnation(p, ps, &have);
    if (ps)
        ps->written = have;
    return ps;
}

/* Fills in what every write of a projector checks: the store's incarnation and the offset this
 * projector recorded last. */
static void set_checks(cqrs_projector_t *p, const part_state_t *ps, cqrs_apply_t *a)
{
    a->shard = ps->shard;
    a->incarnation = p->detect ? ps->incarnation : NULL;
    a->offset_mode = p->detect ? CQRS_OFFSET_EXPECT : CQRS_OFFSET_RAISE;
    a->prev_offset = ps->written;
}

/* After a write's store check: RESET (emptied or replaced) and OFFSET_MOVED send partitions
 * back; the message in hand is dropped only when its own partition was sent back — after a
 * reset a partition with nothing recorded stays where it is, and its message is written again
 * under the new incarnation. */
static verdict_t recorded(cqrs_projector_t *p, part_state_t *ps, cqrs_apply_result_t res,
                          int64_t next_offset)
{
    uint64_t seeks = ps->seeks;
    if (res == CQRS_APPLY_GENERATION)
        return generation_switched(p, ps);
    if (res == CQRS_APPLY_RESET) {
        shard_reset(p, ps);
        return atomic_load(&p->stop) || ps->seeks != seeks ? DROPPED : AGAIN;
    }
    if (res == CQRS_APPLY_OFFSET_MOVED) {
        int64_t stored = redis_offset(p, ps->topic, ps->partition);
        if (atomic_load(&p->stop))
            return DROPPED;
        if (stored == next_offset) {
            /* Our own write, whose reply was lost (a timeout after the script ran). */
            ps->written = next_offset;
            return RECORDED;
        }
        if (offset_moved(p, ps, stored))
            return DROPPED;
        sleep_unless_stopped(p, 200); /* the seek failed; the check fails again until it works */
        return AGAIN;
    }
    ps->written = next_offset;
    if (ps->refill_until && next_offset >= ps->refill_until)
        refill_done(p, ps);
    return RECORDED;
}

/* Waits before redoing a write that Redis refused or could not take. */
static void write_failed(cqrs_projector_t *p, cqrs_err_t rc, unsigned *attempt, const char *what,
                         const cqrs_error_t *err)
{
    if (rc == CQRS_ERR_RETRY) {
        /* A rebuild is switching generations (a second at most). */
        sleep_unless_stopped(p, 20);
        return;
    }
    atomic_store(&p->redis_up, false);
    if ((*attempt)++ % 20 == 0)
        CQRS_LOG_WARN("not written to Redis yet; retrying", "what", what, "error", err->message);
    unsigned ms = 50u << (*attempt < 5 ? *attempt : 5);
    sleep_unless_stopped(p, ms > 1000 ? 1000 : ms);
}

/* A message that is not even a CloudEvent: kept whole in a list for an operator, with its
 * offset recorded (so it is kept once, whatever restarts or rebalances follow). Returns false
 * when the message must not be committed (stop, or the store was found behind). */
static bool keep_undecodable(cqrs_projector_t *p, const rd_kafka_message_t *m, const char *why)
{
    json_t *b = json_pack("{s:s, s:i, s:I, s:s}", "topic", rd_kafka_topic_name(m->rkt), "partition",
                          (int)m->partition, "offset", (json_int_t)m->offset, "reason", why);
    json_t *payload = m->payload ? json_stringn(m->payload, m->len) : json_null();
    json_object_set_new(b, "payload", payload ? payload : json_string("<not UTF-8>"));
    char *text = json_dumps(b, JSON_COMPACT);
    json_decref(b);
    part_state_t *ps = part_of(p, m);
    bool done = false;
    unsigned attempt = 0;
    while (text && ps && !done && !atomic_load(&p->stop)) {
        cqrs_apply_t a = {.partition = m->partition, .next_offset = m->offset + 1, .blob = text};
        set_checks(p, ps, &a);
        cqrs_apply_result_t res = CQRS_APPLY_APPLIED;
        cqrs_error_t err;
        cqrs_err_t rc = cqrs_docstore_undecodable(p->ds, &a, &res, &err);
        if (rc != CQRS_ERR_OK) {
            write_failed(p, rc, &attempt, "an undecodable message", &err);
            continue;
        }
        atomic_store(&p->redis_up, true);
        verdict_t vd = recorded(p, ps, res, a.next_offset);
        if (vd == DROPPED)
            break;
        done = vd == RECORDED;
    }
    free(text);
    return done;
}

/* Applies one event; returns false when the message must be handled again (stop, reset). */
static bool apply_event(cqrs_projector_t *p, const rd_kafka_message_t *m, cqrs_event_t *ev)
{
    char key[CQRS_KEY_MAX], dlq[CQRS_KEY_MAX], part_s[12], offset_s[24];
    const char *topic = rd_kafka_topic_name(m->rkt);
    snprintf(part_s, sizeof part_s, "%d", m->partition);
    snprintf(offset_s, sizeof offset_s, "%lld", (long long)m->offset);
    part_state_t *ps = part_of(p, m);
    if (!ps)
        return false;
    bool known = p->cfg.projection->knows(ev);

    json_t *blob = cqrs_event_to_json(ev);
    json_object_set_new(blob, "topic", json_string(topic));
    json_object_set_new(blob, "partition", json_integer(m->partition));
    json_object_set_new(blob, "offset", json_integer((json_int_t)m->offset));
    char *blob_text = json_dumps(blob, JSON_COMPACT);
    json_decref(blob);

    cqrs_apply_t a = {.key = key,
                      .version = ev->version,
                      .dlq_key = dlq,
                      .aggregate_id = ev->aggregate_id,
                      .blob = blob_text,
                      .partition = m->partition,
                      .next_offset = m->offset + 1};
    bool done = false, dropped = false;
    unsigned attempt = 0, stale = 0;
    while (!done && !dropped && !atomic_load(&p->stop)) {
        /* In the shard's current generation (a rebuild's switch moves it: apply again). */
        cqrs_keys_dlq(ps->shard, ev->aggregate_id, dlq, sizeof dlq);
        if (known)
            cqrs_keys_doc(ps->shard, ev->aggregate_id, key, sizeof key);
        else
            cqrs_keys_unknown(ps->shard, ev->aggregate_id, key, sizeof key);
        cqrs_error_t err;
        cqrs_err_t rc;
        cqrs_apply_result_t res = CQRS_APPLY_DUPLICATE;
        char *text = NULL, *next_text = NULL;
        int64_t version = 0;
        json_t *doc = NULL, *next = NULL;
        cqrs_index_ops_t ops = {0};
        rc = known ? cqrs_docstore_get(p->ds, key, &text, &version, &err) : CQRS_ERR_NOT_FOUND;
        if (rc == CQRS_ERR_NOT_FOUND)
            rc = CQRS_ERR_OK;
        bool dead = !known;
        char reason[300] = "unknown aggregate type";
        if (rc == CQRS_ERR_OK && known && ev->version == version + 1) {
            doc = text ? json_loads(text, 0, NULL) : NULL;
            cqrs_error_t perr;
            if (text && !doc) {
                dead = true;
                snprintf(reason, sizeof reason, "the stored document is not JSON");
            } else if (cqrs_projection_apply(p->cfg.projection, doc, ev, &next, &perr) !=
                       CQRS_ERR_OK) {
                dead = true;
                snprintf(reason, sizeof reason, "%s", perr.message);
            } else {
                next_text = next ? json_dumps(next, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
                if (!next_text || !*next_text) {
                    dead = true;
                    snprintf(reason, sizeof reason, "the projection produced no document");
                } else if (p->cfg.projection->index) {
                    p->cfg.projection->index(ps->shard, ev->aggregate_type, key, doc, next, &ops);
                    if (ops.nomem) /* retried like any failed write */
                        rc = cqrs_error_set(&err, CQRS_ERR_NOMEM, "out of memory (index changes)");
                }
            }
        }
        if (rc == CQRS_ERR_OK) {
            a.json = next_text;
            a.reason = reason;
            a.ops = ops.v;
            a.n_ops = ops.n;
            /* What the document (or the verdict) was computed from: the script writes only
             * while the stored document is still there. */
            a.base_version = known ? version : -1;
            set_checks(p, ps, &a);
            (void)CQRS_FAILPOINT("projector-before-apply");
            rc = dead ? cqrs_docstore_dead_letter(p->ds, &a, &res, &err)
                      : cqrs_docstore_apply(p->ds, &a, &res, &err);
        }
        free(text);
        free(next_text);
        json_decref(doc);
        json_decref(next);
        cqrs_index_ops_free(&ops);
        a.ops = NULL;
        a.n_ops = 0;
        if (rc != CQRS_ERR_OK) {
            write_failed(p, rc, &attempt, ev->id, &err);
            continue;
        }
        atomic_store(&p->redis_up, true);
        if (res == CQRS_APPLY_STALE) {
            /* The document moved between our read and the script (dlq retry released the
             * aggregate, a rebuild switched): compute again. */
            if (++stale % 100 == 0) {
                CQRS_LOG_WARN("the document keeps moving under the projector; retrying", "event_id",
                              ev->id, "aggregate_id", ev->aggregate_id);
                sleep_unless_stopped(p, 100);
            }
            continue;
        }
        verdict_t vd = recorded(p, ps, res, a.next_offset);
        if (vd == DROPPED) {
            dropped = true;
            break;
        }
        if (vd == AGAIN)
            continue;
        done = true;
        switch (res) {
        case CQRS_APPLY_APPLIED:
            atomic_fetch_add(&p->applied, 1);
            cqrs_histogram_observe(&p->latency[ps->topic_idx],
                                   (double)(cqrs_realtime_ms() - cqrs_time_parse_ms(ev->time)) /
                                       1000.0);
            CQRS_LOG_DEBUG("event applied", "event_id", ev->id, "aggregate_id", ev->aggregate_id,
                           "traceparent", ev->traceparent);
            break;
        case CQRS_APPLY_DUPLICATE:
            atomic_fetch_add(&p->duplicates, 1);
            break;
        case CQRS_APPLY_HELD:
            atomic_fetch_add(&p->parked, 1);
            CQRS_LOG_WARN("event parked behind a dead letter of its aggregate", "event_id", ev->id,
                          "aggregate_id", ev->aggregate_id, "type", ev->type);
            break;
        case CQRS_APPLY_DEAD:
            atomic_fetch_add(&p->dead_letters, 1);
            CQRS_LOG_ERROR("event dead-lettered; its aggregate is held (cqrsctl dlq)", "event_id",
                           ev->id, "aggregate_id", ev->aggregate_id, "type", ev->type, "reason",
                           reason, "topic", topic, "partition", part_s, "offset", offset_s);
            break;
        case CQRS_APPLY_GAP:
            atomic_fetch_add(&p->gaps, 1);
            atomic_fetch_add(&p->dead_letters, 1);
            CQRS_LOG_ERROR("gap: an earlier version of the aggregate is missing; event held as a"
                           " dead letter (cqrsctl dlq)",
                           "event_id", ev->id, "aggregate_id", ev->aggregate_id, "type", ev->type);
            break;
        default:
            break;
        }
    }
    free(blob_text);
    return done;
}

static void handle(cqrs_projector_t *p, const rd_kafka_message_t *m)
{
    header_ctx_t h = {.next = 0};
    rd_kafka_message_headers(m, &h.hdrs);
    cqrs_event_t ev;
    cqrs_error_t err;
    if (cqrs_event_decode(header_lookup, &h, m->payload, m->len, &ev, &err) != CQRS_ERR_OK) {
        atomic_fetch_add(&p->undecodable, 1);
        char part[12], off[24];
        snprintf(part, sizeof part, "%d", m->partition);
        snprintf(off, sizeof off, "%lld", (long long)m->offset);
        CQRS_LOG_ERROR("undecodable message kept in its shard's " CQRS_SHARD_UNDECODABLE, "topic",
                       rd_kafka_topic_name(m->rkt), "partition", part, "offset", off, "error",
                       err.message);
        if (keep_undecodable(p, m, err.message))
            store_offset(p, m);
        cqrs_event_close(&ev);
        return;
    }
    if (apply_event(p, m, &ev) && !CQRS_FAILPOINT("projector-after-apply"))
        store_offset(p, m);
    cqrs_event_close(&ev);
}

/* The end of a partition was reached: a refill that aimed there is complete. */
static void partition_eof(cqrs_projector_t *p, const rd_kafka_message_t *m)
{
    part_state_t *ps = part_find(p, rd_kafka_topic_name(m->rkt), m->partition);
    if (ps && ps->refill_until && m->offset >= ps->refill_until)
        refill_done(p, ps);
}

static void consumer_close(cqrs_projector_t *p)
{
    if (!p->rk)
        return;
    /* Commits the stored offsets and leaves the group. */
    rd_kafka_consumer_close(p->rk);
    pthread_mutex_lock(&p->rk_lock);
    rd_kafka_destroy(p->rk);
    p->rk = NULL;
    pthread_mutex_unlock(&p->rk_lock);
}

void cqrs_projector_metrics(cqrs_projector_t *p, struct cqrs_text *t)
{
    cqrs_text_printf(t, "# HELP cqrs_projector_consumer_lag_messages Messages of a partition "
                        "not yet applied by this instance.\n"
                        "# TYPE cqrs_projector_consumer_lag_messages gauge\n");
    pthread_mutex_lock(&p->rk_lock);
    rd_kafka_topic_partition_list_t *parts = NULL;
    if (p->rk && rd_kafka_assignment(p->rk, &parts) == RD_KAFKA_RESP_ERR_NO_ERROR && parts) {
        rd_kafka_position(p->rk, parts);
        for (int i = 0; i < parts->cnt; i++) {
            rd_kafka_topic_partition_t *tp = &parts->elems[i];
            int64_t low = 0, high = 0;
            if (rd_kafka_get_watermark_offsets(p->rk, tp->topic, tp->partition, &low, &high) !=
                    RD_KAFKA_RESP_ERR_NO_ERROR ||
                high < 0)
                continue;
            /* Before the first message after an assignment the consumer has no position:
             * the offset the store holds is where it stands. */
            int64_t w = tp->offset >= 0 ? -1 : part_written(p, tp->topic, tp->partition);
            int64_t pos = tp->offset >= 0 ? tp->offset : w >= 0 ? w : low;
            cqrs_text_printf(t,
                             "cqrs_projector_consumer_lag_messages{topic=\"%s\",partition=\"%d\"}"
                             " %lld\n",
                             tp->topic, tp->partition, (long long)(high > pos ? high - pos : 0));
        }
    }
    if (parts)
        rd_kafka_topic_partition_list_destroy(parts);
    pthread_mutex_unlock(&p->rk_lock);
    cqrs_text_printf(t, "# HELP cqrs_projector_apply_latency_seconds From an event's time (its"
                        " command) to its apply in Redis, per topic.\n"
                        "# TYPE cqrs_projector_apply_latency_seconds histogram\n");
    for (size_t i = 0; i < p->cfg.n_topics; i++) {
        char labels[320];
        snprintf(labels, sizeof labels, "topic=\"%s\"", p->topics[i]);
        cqrs_metric_histogram_samples(t, "cqrs_projector_apply_latency_seconds", labels,
                                      &p->latency[i]);
    }
    cqrs_text_printf(t, "# HELP cqrs_projector_stage_seconds Where an event's time goes in the"
                        " projector: kafka, from the relay's produce (the message's CreateTime)"
                        " to its poll here; apply, the handling of one message.\n"
                        "# TYPE cqrs_projector_stage_seconds histogram\n");
    cqrs_metric_histogram_samples(t, "cqrs_projector_stage_seconds", "stage=\"kafka\"",
                                  &p->stage_kafka);
    cqrs_metric_histogram_samples(t, "cqrs_projector_stage_seconds", "stage=\"apply\"",
                                  &p->stage_apply);
}

/* Whether a consumer reported unable to work should be replaced. A partition without a
 * leader is first looked up in Kafka: when Kafka has no leader for it either (its replicas
 * down), a new consumer would not help, and leaving the group without a close would stall
 * every instance in a rebalance every 30 s; that partition waits for Kafka instead. */
static bool replace_needed(cqrs_projector_t *p)
{
    if (p->health.partition < 0)
        return true;
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(p->rk, p->health.topic, NULL);
    const struct rd_kafka_metadata *md = NULL;
    bool replace = true;
    if (rkt && rd_kafka_metadata(p->rk, 0, rkt, &md, 5000) == RD_KAFKA_RESP_ERR_NO_ERROR && md &&
        md->topic_cnt == 1) {
        for (int i = 0; i < md->topics[0].partition_cnt; i++)
            if (md->topics[0].partitions[i].id == p->health.partition &&
                md->topics[0].partitions[i].leader < 0)
                replace = false;
    }
    if (md)
        rd_kafka_metadata_destroy(md);
    if (rkt)
        rd_kafka_topic_destroy(rkt);
    if (!replace) {
        char part[12];
        snprintf(part, sizeof part, "%d", (int)p->health.partition);
        CQRS_LOG_WARN("a partition has no leader in Kafka: waiting for Kafka (its replicas down?)",
                      "topic", p->health.topic, "partition", part);
        p->unhealthy_since = 0;
        p->replace_due = false;
    }
    return replace;
}

/* A consumer that could not work for CQRS_BUS_STALL_MS — its coordinator not reached, no
 * broker up, or a partition of its assignment without a known, connected leader — is replaced
 * by a new one, which starts again from the bootstrap servers. librdkafka 2.14 decommissions a
 * broker that a metadata response leaves out (a KRaft broker fenced for a moment after a
 * pause) and can then wait for a coordinator or a leader it no longer looks for, for minutes,
 * while Kafka is back (fault suite, kafka-pause). The old consumer leaves without closing:
 * nothing of it is needed (the offsets that matter are the store's), and a close would wait
 * for the coordinator it cannot reach (the destroy may still wait for commits deferred for
 * want of a coordinator, at most a session timeout). Its group membership expires with its
 * session, as after a crash. false when no new consumer could be made (retried). */
static bool consumer_replace(cqrs_projector_t *p)
{
    if (p->rk) {
        char secs[24];
        snprintf(secs, sizeof secs, "%lld",
                 (long long)(cqrs_monotonic_ms() - p->unhealthy_since) / 1000);
        CQRS_LOG_WARN("the Kafka consumer has not been able to work; replacing it", "reason",
                      p->health.why, "seconds", secs);
        pthread_mutex_lock(&p->rk_lock);
        rd_kafka_t *old = p->rk;
        p->rk = NULL;
        pthread_mutex_unlock(&p->rk_lock);
        rd_kafka_destroy_flags(old, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
        assignment_forgotten(p);
        atomic_store(&p->kafka_up, false);
        atomic_fetch_add(&p->replaced, 1);
    }
    p->unhealthy_since = 0;
    p->replace_due = false;
    cqrs_error_t err;
    rd_kafka_t *rk = consumer_new(p, &err);
    if (!rk) {
        CQRS_LOG_WARN("cannot make a new Kafka consumer; trying again", "error", err.message);
        return false;
    }
    pthread_mutex_lock(&p->rk_lock);
    p->rk = rk;
    pthread_mutex_unlock(&p->rk_lock);
    return true;
}

/* One message, event or error of the consumer poll (destroyed here). */
static void consume(cqrs_projector_t *p, rd_kafka_message_t *m)
{
    if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) {
        atomic_store(&p->kafka_up, true);
        partition_eof(p, m);
    } else if (m->err) {
        if (m->err == RD_KAFKA_RESP_ERR__TRANSPORT || m->err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN)
            atomic_store(&p->kafka_up, false);
        CQRS_LOG_WARN("consumer error", "error", rd_kafka_message_errstr(m));
    } else {
        atomic_store(&p->kafka_up, true);
        rd_kafka_timestamp_type_t tst;
        int64_t created = rd_kafka_message_timestamp(m, &tst);
        if (tst == RD_KAFKA_TIMESTAMP_CREATE_TIME && created > 0)
            cqrs_histogram_observe(&p->stage_kafka,
                                   (double)(cqrs_realtime_ms() - created) / 1000.0);
        int64_t t0 = cqrs_monotonic_us();
        handle(p, m);
        cqrs_histogram_observe(&p->stage_apply, (double)(cqrs_monotonic_us() - t0) / 1e6);
    }
    rd_kafka_message_destroy(m);
}

static void *projector_main(void *arg)
{
    cqrs_projector_t *p = arg;
    /* The layout before the first assignment, so that reads work as soon as possible. */
    layouts_due(p);
    while (!atomic_load(&p->stop)) {
        if (!p->rk && !consumer_replace(p)) {
            sleep_unless_stopped(p, 1000);
            continue;
        }
        recheck_missing(p);
        audit(p);
        layouts_due(p);
        rd_kafka_message_t *m = rd_kafka_consumer_poll(p->rk, 200);
        if (m)
            consume(p, m);
        /* Decided right after a poll, which served the statistics that came meanwhile: the
         * verdict is the latest report's, never an old one's after a long wait elsewhere (a
         * Redis outage). */
        if (p->replace_due && replace_needed(p))
            consumer_replace(p);
    }
    return NULL;
}

cqrs_err_t cqrs_projector_start(cqrs_projector_t *p, cqrs_error_t *err)
{
    p->rk = consumer_new(p, err);
    if (!p->rk)
        return err ? err->code : CQRS_ERR_CONFIG;
    p->next_layout = 0; /* recorded by the thread first (a metadata request may wait on Kafka) */
    atomic_store(&p->stop, false);
    if (pthread_create(&p->thread, NULL, projector_main, p) != 0) {
        consumer_close(p);
        return cqrs_error_set(err, CQRS_ERR_INTERNAL, "cannot start the projector thread");
    }
    p->running = true;
    return CQRS_ERR_OK;
}

void cqrs_projector_stop(cqrs_projector_t *p)
{
    if (!p || !p->running)
        return;
    atomic_store(&p->stop, true);
    pthread_join(p->thread, NULL);
    p->running = false;
    consumer_close(p);
}

void cqrs_projector_stats(cqrs_projector_t *p, cqrs_projector_stats_t *out)
{
    out->kafka_up = atomic_load(&p->kafka_up);
    out->redis_up = atomic_load(&p->redis_up);
    out->history_missing = atomic_load(&p->history_missing);
    out->assigned = atomic_load(&p->assigned);
    out->applied = atomic_load(&p->applied);
    out->duplicates = atomic_load(&p->duplicates);
    out->dead_letters = atomic_load(&p->dead_letters);
    out->gaps = atomic_load(&p->gaps);
    out->parked = atomic_load(&p->parked);
    out->undecodable = atomic_load(&p->undecodable);
    out->resets = atomic_load(&p->resets);
    out->regressions = atomic_load(&p->regressions);
    out->replaced = atomic_load(&p->replaced);
    out->refilling = atomic_load(&p->refilling);
}

void cqrs_projector_destroy(cqrs_projector_t *p)
{
    if (!p)
        return;
    cqrs_projector_stop(p);
    for (size_t i = 0; p->topics && i < p->cfg.n_topics; i++)
        free(p->topics[i]);
    free(p->topics);
    free(p->partitions);
    free(p->parts);
    free(p->latency);
    cqrs_docstore_destroy(p->ds);
    pthread_mutex_destroy(&p->rk_lock);
    pthread_mutex_destroy(&p->parts_lock);
    free(p->brokers);
    free(p->group_id);
    free(p->client_id);
    free(p);
}
