/* projector.c — Kafka consumer loop feeding a projection (see projector.h).
 *
 * Invariants:
 *  - Messages of a partition are handled one at a time, in offset order, on this thread.
 *  - Redis holds the truth about progress: each apply records the partition's next offset
 *    atomically with the document; assignment seeks there. The Kafka group's committed offsets
 *    (stored after each event) only serve lag monitoring.
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
#include "cqrs/log.h"
#include "cqrs/metrics.h"
#include "cqrs/util.h"

#define MAX_MISSING 256

typedef struct missing {
    char topic[128];
    int32_t partition;
    int64_t low;
} missing_t;

struct cqrs_projector {
    cqrs_projector_config_t cfg;
    char *brokers, *group_id, *client_id, *redis_url;
    char **topics;
    char **offsets_keys;
    rd_kafka_t *rk;
    cqrs_docstore_t *ds;
    pthread_t thread;
    bool running;
    bool restart; /* the consumer must be recreated (store reset) */
    atomic_bool stop;
    atomic_bool kafka_up, redis_up;
    atomic_uint history_missing, assigned;
    atomic_uint_fast64_t applied, duplicates, dead_letters, gaps, parked, undecodable, resets;
    pthread_mutex_t rk_lock; /* guards rk against the metrics reader while it is replaced */
    cqrs_histogram_t latency;
    missing_t missing[MAX_MISSING];
    unsigned n_missing;
    int64_t next_missing_check;
};

void cqrs_projector_offsets_key(const char *topic, char *out, size_t cap)
{
    snprintf(out, cap, "cqrs:offsets:{%s}", topic);
}

void cqrs_projector_dlq_key(const char *aggregate_id, char *out, size_t cap)
{
    snprintf(out, cap, "cqrs:dlq:{%s}", aggregate_id);
}

static const char *offsets_key_for(cqrs_projector_t *p, const char *topic)
{
    for (size_t i = 0; i < p->cfg.n_topics; i++)
        if (strcmp(p->topics[i], topic) == 0)
            return p->offsets_keys[i];
    return NULL;
}

static void sleep_unless_stopped(cqrs_projector_t *p, unsigned ms)
{
    for (unsigned waited = 0; waited < ms && !atomic_load(&p->stop); waited += 50)
        usleep(50 * 1000);
}

/* The offset Redis recorded for a partition, -1 when none; waits out a Redis outage. */
static int64_t redis_offset(cqrs_projector_t *p, const char *topic, int32_t partition)
{
    const char *key = offsets_key_for(p, topic);
    unsigned attempt = 0;
    while (key && !atomic_load(&p->stop)) {
        int64_t off;
        cqrs_error_t e;
        cqrs_err_t rc = cqrs_docstore_offset(p->ds, key, partition, &off, &e);
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

static void rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    cqrs_projector_t *p = opaque;
    p->n_missing = 0;
    if (err != RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        rd_kafka_assign(rk, NULL);
        atomic_store(&p->history_missing, 0);
        atomic_store(&p->assigned, 0);
        CQRS_LOG_INFO("partitions revoked");
        return;
    }
    /* Resume where Redis says the read model is; with no record, from the beginning. */
    rd_kafka_topic_partition_list_t *paused = rd_kafka_topic_partition_list_new(1);
    for (int i = 0; i < parts->cnt; i++) {
        rd_kafka_topic_partition_t *tp = &parts->elems[i];
        int64_t have = redis_offset(p, tp->topic, tp->partition);
        tp->offset = have >= 0 ? have : RD_KAFKA_OFFSET_BEGINNING;
        int64_t low = 0, high = 0;
        if (rd_kafka_query_watermark_offsets(rk, tp->topic, tp->partition, &low, &high, 5000) ==
                RD_KAFKA_RESP_ERR_NO_ERROR &&
            (have < 0 ? 0 : have) < low && p->n_missing < MAX_MISSING) {
            missing_t *m = &p->missing[p->n_missing++];
            snprintf(m->topic, sizeof m->topic, "%s", tp->topic);
            m->partition = tp->partition;
            m->low = low;
            report_missing(m, have);
            rd_kafka_topic_partition_list_add(paused, tp->topic, tp->partition);
        }
    }
    rd_kafka_assign(rk, parts);
    if (paused->cnt > 0)
        rd_kafka_pause_partitions(rk, paused);
    rd_kafka_topic_partition_list_destroy(paused);
    atomic_store(&p->history_missing, p->n_missing);
    atomic_store(&p->assigned, (unsigned)parts->cnt);
    char n[12];
    snprintf(n, sizeof n, "%d", parts->cnt);
    CQRS_LOG_INFO("partitions assigned", "count", n);
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
    pthread_mutex_init(&p->rk_lock, NULL);
    p->brokers = strdup(cfg->brokers);
    p->group_id = strdup(cfg->group_id);
    p->client_id = strdup(cfg->client_id ? cfg->client_id : "cqrs-projector");
    p->redis_url = strdup(cfg->redis_url);
    p->topics = calloc(cfg->n_topics, sizeof *p->topics);
    p->offsets_keys = calloc(cfg->n_topics, sizeof *p->offsets_keys);
    if (!p->brokers || !p->group_id || !p->client_id || !p->redis_url || !p->topics ||
        !p->offsets_keys) {
        cqrs_projector_destroy(p);
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    p->cfg.topics = NULL;
    for (size_t i = 0; i < cfg->n_topics; i++) {
        p->topics[i] = strdup(cfg->topics[i]);
        size_t len = strlen(cfg->topics[i]) + 32;
        p->offsets_keys[i] = malloc(len);
        if (p->offsets_keys[i])
            cqrs_projector_offsets_key(cfg->topics[i], p->offsets_keys[i], len);
    }
    p->ds = cqrs_docstore_new(cfg->redis_url, cfg->redis_timeout_ms, err);
    if (!p->ds) {
        cqrs_projector_destroy(p);
        return NULL;
    }
    return p;
}

static rd_kafka_t *consumer_new(cqrs_projector_t *p, cqrs_error_t *err)
{
    rd_kafka_conf_t *conf = cqrs_bus_conf_new(p->brokers, p->client_id, err);
    if (!conf)
        return NULL;
    if (cqrs_bus_conf_set(conf, "group.id", p->group_id, err) ||
        cqrs_bus_conf_set(conf, "enable.auto.commit", "true", err) ||
        cqrs_bus_conf_set(conf, "enable.auto.offset.store", "false", err) ||
        cqrs_bus_conf_set(conf, "auto.offset.reset", "earliest", err) ||
        cqrs_bus_conf_set(conf, "isolation.level", "read_committed", err) ||
        cqrs_bus_conf_set(conf, "enable.partition.eof", "false", err) ||
        cqrs_bus_conf_set(conf, "fetch.wait.max.ms", "10", err)) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    rd_kafka_conf_set_rebalance_cb(conf, rebalance_cb);
    rd_kafka_conf_set_opaque(conf, p);
    char errstr[256];
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof errstr);
    if (!rk) {
        rd_kafka_conf_destroy(conf);
        cqrs_error_set(err, CQRS_ERR_CONFIG, "cannot create consumer: %s", errstr);
        return NULL;
    }
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

/* A message that is not even a CloudEvent: kept whole in a list for an operator. */
static void keep_undecodable(cqrs_projector_t *p, const rd_kafka_message_t *m, const char *why)
{
    json_t *b = json_pack("{s:s, s:i, s:I, s:s}", "topic", rd_kafka_topic_name(m->rkt), "partition",
                          (int)m->partition, "offset", (json_int_t)m->offset, "reason", why);
    json_t *payload = m->payload ? json_stringn(m->payload, m->len) : json_null();
    json_object_set_new(b, "payload", payload ? payload : json_string("<not UTF-8>"));
    char *text = json_dumps(b, JSON_COMPACT);
    json_decref(b);
    unsigned attempt = 0;
    cqrs_error_t err;
    while (text && !atomic_load(&p->stop) &&
           cqrs_docstore_undecodable(p->ds, text, &err) != CQRS_ERR_OK) {
        if (attempt++ % 20 == 0)
            CQRS_LOG_WARN("cannot store an undecodable message yet", "error", err.message);
        sleep_unless_stopped(p, 500);
    }
    free(text);
}

/* Applies one event; returns false when the message must be handled again (stop, reset). */
static bool apply_event(cqrs_projector_t *p, const rd_kafka_message_t *m, const cqrs_event_t *ev)
{
    char key[256], dlq[96], part_s[12], offset_s[24];
    const char *topic = rd_kafka_topic_name(m->rkt);
    snprintf(part_s, sizeof part_s, "%d", m->partition);
    snprintf(offset_s, sizeof offset_s, "%lld", (long long)m->offset);
    cqrs_projector_dlq_key(ev->aggregate_id, dlq, sizeof dlq);
    bool known = p->cfg.projection->doc_key(ev, key, sizeof key);
    if (!known)
        snprintf(key, sizeof key, "cqrs:unknown:{%s}", ev->aggregate_id);

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
                      .offsets_key = offsets_key_for(p, topic),
                      .partition = m->partition,
                      .next_offset = m->offset + 1};
    bool done = false;
    unsigned attempt = 0;
    while (!done && !atomic_load(&p->stop)) {
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
            } else if (p->cfg.projection->apply(doc, ev, &next, &perr) != CQRS_ERR_OK) {
                dead = true;
                snprintf(reason, sizeof reason, "%s", perr.message);
            } else {
                next_text = json_dumps(next, JSON_COMPACT | JSON_PRESERVE_ORDER);
                if (p->cfg.projection->index)
                    p->cfg.projection->index(key, doc, next, &ops);
            }
        }
        if (rc == CQRS_ERR_OK) {
            a.json = next_text;
            a.reason = reason;
            a.ops = ops.v;
            a.n_ops = ops.n;
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
        if (rc == CQRS_ERR_RETRY) {
            /* A rebuild is switching generations (a second at most): wait, then redo. */
            sleep_unless_stopped(p, 20);
            continue;
        }
        if (rc != CQRS_ERR_OK) {
            atomic_store(&p->redis_up, false);
            if (attempt++ % 20 == 0)
                CQRS_LOG_WARN("event not applied yet; retrying", "event_id", ev->id, "aggregate_id",
                              ev->aggregate_id, "error", err.message);
            unsigned ms = 50u << (attempt < 5 ? attempt : 5);
            sleep_unless_stopped(p, ms > 1000 ? 1000 : ms);
            continue;
        }
        atomic_store(&p->redis_up, true);
        done = true;
        switch (res) {
        case CQRS_APPLY_APPLIED:
            atomic_fetch_add(&p->applied, 1);
            cqrs_histogram_observe(
                &p->latency, (double)(cqrs_realtime_ms() - cqrs_time_parse_ms(ev->time)) / 1000.0);
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
        case CQRS_APPLY_RESET:
            atomic_fetch_add(&p->resets, 1);
            CQRS_LOG_WARN("the read model store is empty (no meta key); restarting the consumer"
                          " to refill it from the beginning of the topics");
            cqrs_docstore_ensure_meta(p->ds, &err);
            p->restart = true;
            free(blob_text);
            return false;
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
        CQRS_LOG_ERROR("undecodable message kept in cqrs:dlq:undecodable", "topic",
                       rd_kafka_topic_name(m->rkt), "partition", part, "offset", off, "error",
                       err.message);
        keep_undecodable(p, m, err.message);
        if (!atomic_load(&p->stop))
            store_offset(p, m);
        cqrs_event_close(&ev);
        return;
    }
    if (apply_event(p, m, &ev) && !CQRS_FAILPOINT("projector-after-apply"))
        store_offset(p, m);
    cqrs_event_close(&ev);
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
            int64_t pos = tp->offset >= 0 ? tp->offset : low;
            cqrs_text_printf(t,
                             "cqrs_projector_consumer_lag_messages{topic=\"%s\",partition=\"%d\"}"
                             " %lld\n",
                             tp->topic, tp->partition, (long long)(high > pos ? high - pos : 0));
        }
    }
    if (parts)
        rd_kafka_topic_partition_list_destroy(parts);
    pthread_mutex_unlock(&p->rk_lock);
    cqrs_metric_histogram(t, "cqrs_projector_apply_latency_seconds",
                          "From an event's time (its command) to its apply in Redis.", &p->latency);
}

static void *projector_main(void *arg)
{
    cqrs_projector_t *p = arg;
    while (!atomic_load(&p->stop)) {
        if (p->restart) {
            consumer_close(p);
            cqrs_error_t err;
            rd_kafka_t *rk = consumer_new(p, &err);
            pthread_mutex_lock(&p->rk_lock);
            p->rk = rk;
            pthread_mutex_unlock(&p->rk_lock);
            if (!p->rk) {
                CQRS_LOG_ERROR("cannot recreate the consumer", "error", err.message);
                sleep_unless_stopped(p, 1000);
                continue;
            }
            p->restart = false;
        }
        recheck_missing(p);
        rd_kafka_message_t *m = rd_kafka_consumer_poll(p->rk, 200);
        if (!m)
            continue;
        if (m->err) {
            if (m->err == RD_KAFKA_RESP_ERR__TRANSPORT ||
                m->err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN)
                atomic_store(&p->kafka_up, false);
            CQRS_LOG_WARN("consumer error", "error", rd_kafka_message_errstr(m));
        } else {
            atomic_store(&p->kafka_up, true);
            handle(p, m);
        }
        rd_kafka_message_destroy(m);
    }
    return NULL;
}

cqrs_err_t cqrs_projector_start(cqrs_projector_t *p, cqrs_error_t *err)
{
    /* A fresh store gets its meta key before the first apply (a store without one is taken
     * for one that lost its data). */
    if (cqrs_docstore_ensure_meta(p->ds, err) != CQRS_ERR_OK)
        CQRS_LOG_WARN("Redis is not reachable yet; the projector will wait for it");
    p->rk = consumer_new(p, err);
    if (!p->rk)
        return err ? err->code : CQRS_ERR_CONFIG;
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
}

void cqrs_projector_destroy(cqrs_projector_t *p)
{
    if (!p)
        return;
    cqrs_projector_stop(p);
    for (size_t i = 0; p->topics && i < p->cfg.n_topics; i++) {
        free(p->topics[i]);
        if (p->offsets_keys)
            free(p->offsets_keys[i]);
    }
    free(p->topics);
    free(p->offsets_keys);
    cqrs_docstore_destroy(p->ds);
    pthread_mutex_destroy(&p->rk_lock);
    free(p->brokers);
    free(p->group_id);
    free(p->client_id);
    free(p->redis_url);
    free(p);
}
