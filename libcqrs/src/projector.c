/* projector.c — Kafka consumer loop feeding a projection (see projector.h).
 *
 * Invariants:
 *  - Messages of a partition are handled one at a time, in offset order, on this thread.
 *  - An offset is stored for commit (offset + 1) only after the projection returned OK (or
 *    declared the event unusable), so a crash re-delivers and never skips.
 *  - isolation.level=read_committed: a transactional producer's aborted writes are never seen.
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
#include "cqrs/log.h"
#include "cqrs/util.h"

struct cqrs_projector {
    cqrs_projector_config_t cfg;
    char *brokers, *group_id, *client_id, *redis_url;
    char **topics;
    char **offsets_keys;
    rd_kafka_t *rk;
    cqrs_docstore_t *ds;
    pthread_t thread;
    bool running;
    atomic_bool stop;
    atomic_bool kafka_up, redis_up;
    atomic_uint_fast64_t applied, skipped_invalid;
};

static const char *offsets_key_for(cqrs_projector_t *p, const char *topic)
{
    for (size_t i = 0; i < p->cfg.n_topics; i++)
        if (strcmp(p->topics[i], topic) == 0)
            return p->offsets_keys[i];
    return NULL;
}

static void rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    cqrs_projector_t *p = opaque;
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        /* Resume where Redis says the read model is: documents and offsets were written
         * together, so this is exactly the first event not yet applied. */
        for (int i = 0; i < parts->cnt; i++) {
            rd_kafka_topic_partition_t *tp = &parts->elems[i];
            const char *key = offsets_key_for(p, tp->topic);
            int64_t off;
            cqrs_error_t e;
            if (key && cqrs_docstore_offset(p->ds, key, tp->partition, &off, &e) == CQRS_ERR_OK)
                tp->offset = off;
        }
        rd_kafka_assign(rk, parts);
        CQRS_LOG_INFO("partitions assigned");
    } else {
        rd_kafka_assign(rk, NULL);
        CQRS_LOG_INFO("partitions revoked");
    }
}

cqrs_projector_t *cqrs_projector_new(const cqrs_projector_config_t *cfg, cqrs_error_t *err)
{
    cqrs_projector_t *p = calloc(1, sizeof *p);
    if (!p) {
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    p->cfg = *cfg;
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
            snprintf(p->offsets_keys[i], len, "cqrs:offsets:{%s}", cfg->topics[i]);
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
        cqrs_bus_conf_set(conf, "enable.partition.eof", "false", err)) {
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

static void handle(cqrs_projector_t *p, const rd_kafka_message_t *m)
{
    header_ctx_t h = {.next = 0};
    rd_kafka_message_headers(m, &h.hdrs);
    cqrs_event_t ev;
    cqrs_error_t err;
    char offset_s[24], part_s[12];
    snprintf(offset_s, sizeof offset_s, "%lld", (long long)m->offset);
    snprintf(part_s, sizeof part_s, "%d", m->partition);
    const char *topic = rd_kafka_topic_name(m->rkt);
    if (cqrs_event_decode(header_lookup, &h, m->payload, m->len, &ev, &err) != CQRS_ERR_OK) {
        atomic_fetch_add(&p->skipped_invalid, 1);
        CQRS_LOG_ERROR("undecodable event skipped", "topic", topic, "partition", part_s, "offset",
                       offset_s, "error", err.message);
        store_offset(p, m);
        return;
    }
    cqrs_delivery_t at = {topic, m->partition, m->offset, offsets_key_for(p, topic)};
    unsigned attempt = 0;
    while (!atomic_load(&p->stop)) {
        cqrs_err_t rc = p->cfg.apply(p->cfg.ud, p->ds, &ev, &at, &err);
        if (rc == CQRS_ERR_OK) {
            atomic_store(&p->redis_up, true);
            atomic_fetch_add(&p->applied, 1);
            store_offset(p, m);
            CQRS_LOG_DEBUG("event applied", "event_id", ev.id, "aggregate_id", ev.aggregate_id,
                           "traceparent", ev.traceparent);
            break;
        }
        if (rc == CQRS_ERR_INVALID) {
            atomic_fetch_add(&p->skipped_invalid, 1);
            CQRS_LOG_ERROR("event cannot be applied; skipped", "event_id", ev.id, "aggregate_id",
                           ev.aggregate_id, "type", ev.type, "error", err.message);
            store_offset(p, m);
            break;
        }
        if (rc == CQRS_ERR_UNAVAILABLE)
            atomic_store(&p->redis_up, false);
        if (attempt % 20 == 0)
            CQRS_LOG_WARN("event not applied yet; retrying", "event_id", ev.id, "aggregate_id",
                          ev.aggregate_id, "error", err.message);
        unsigned ms = 50u << (attempt < 5 ? attempt : 5);
        usleep((ms > 1000 ? 1000 : ms) * 1000);
        attempt++;
    }
    cqrs_event_close(&ev);
}

static void *projector_main(void *arg)
{
    cqrs_projector_t *p = arg;
    while (!atomic_load(&p->stop)) {
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
    p->rk = consumer_new(p, err);
    if (!p->rk)
        return err ? err->code : CQRS_ERR_CONFIG;
    atomic_store(&p->stop, false);
    if (pthread_create(&p->thread, NULL, projector_main, p) != 0) {
        rd_kafka_destroy(p->rk);
        p->rk = NULL;
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
    /* Commits the stored offsets and leaves the group. */
    rd_kafka_consumer_close(p->rk);
    rd_kafka_destroy(p->rk);
    p->rk = NULL;
}

void cqrs_projector_stats(cqrs_projector_t *p, cqrs_projector_stats_t *out)
{
    out->kafka_up = atomic_load(&p->kafka_up);
    out->redis_up = atomic_load(&p->redis_up);
    out->applied = atomic_load(&p->applied);
    out->skipped_invalid = atomic_load(&p->skipped_invalid);
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
    free(p->brokers);
    free(p->group_id);
    free(p->client_id);
    free(p->redis_url);
    free(p);
}
