/* kafka_check.c — see kafka_check.h. */
#include "kafka_check.h"

#include <cqrs/bus.h>

#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct seen {
    char key[40];
    long long last;
} seen_t;

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static long long header_ll(rd_kafka_headers_t *h, const char *name)
{
    const void *v;
    size_t n;
    char buf[32];
    if (!h || rd_kafka_header_get_last(h, name, &v, &n) != 0 || n >= sizeof buf)
        return -1;
    memcpy(buf, v, n);
    buf[n] = '\0';
    return atoll(buf);
}

int kafka_check_topics(const char *brokers, const char *const *topics, size_t n_topics,
                       size_t expected, int timeout_s, kafka_check_t *out)
{
    memset(out, 0, sizeof *out);
    /* Through libcqrs, so the stack's Kafka properties (TLS, SASL) apply here too. */
    static const char *const own[][2] = {
        {"group.id", "kafka-check-unused"},
        {"isolation.level", "read_committed"},
        {"enable.auto.commit", "false"},
        {"log_level", "3"},
        {NULL, NULL},
    };
    cqrs_error_t err;
    rd_kafka_conf_t *conf = cqrs_bus_conf_new(brokers, "kafka-check", own, &err);
    rd_kafka_t *rk = conf ? cqrs_bus_client_new(RD_KAFKA_CONSUMER, conf, "consumer", &err) : NULL;
    if (!rk)
        return -1;
    /* every partition of every topic, from the beginning */
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(16);
    for (size_t t = 0; t < n_topics; t++) {
        const struct rd_kafka_metadata *md = NULL;
        rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topics[t], NULL);
        if (rd_kafka_metadata(rk, 0, rkt, &md, 10000) == RD_KAFKA_RESP_ERR_NO_ERROR &&
            md->topic_cnt == 1) {
            for (int p = 0; p < md->topics[0].partition_cnt; p++)
                rd_kafka_topic_partition_list_add(l, topics[t], p)->offset =
                    RD_KAFKA_OFFSET_BEGINNING;
        }
        if (md)
            rd_kafka_metadata_destroy(md);
        rd_kafka_topic_destroy(rkt);
    }
    rd_kafka_assign(rk, l);
    rd_kafka_topic_partition_list_destroy(l);

    size_t cap = expected + 64, n_seen = 0;
    seen_t *seen = calloc(cap, sizeof *seen);
    long long deadline = now_ms() + (long long)timeout_s * 1000, grace = -1;
    while (now_ms() < deadline && (grace < 0 || now_ms() < grace)) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 200);
        if (!m)
            continue;
        if (!m->err && m->key_len < 40) {
            char key[40];
            memcpy(key, m->key, m->key_len);
            key[m->key_len] = '\0';
            rd_kafka_headers_t *h = NULL;
            rd_kafka_message_headers(m, &h);
            long long v = header_ll(h, "ce_aggregateversion");
            seen_t *s = NULL;
            for (size_t i = 0; i < n_seen; i++)
                if (strcmp(seen[i].key, key) == 0) {
                    s = &seen[i];
                    break;
                }
            if (!s) {
                if (n_seen == cap)
                    seen = realloc(seen, (cap *= 2) * sizeof *seen);
                s = &seen[n_seen++];
                snprintf(s->key, sizeof s->key, "%s", key);
                s->last = 0;
            }
            if (v <= s->last) {
                out->duplicates++;
                if (!out->first_problem[0])
                    snprintf(out->first_problem, sizeof out->first_problem,
                             "%s version %lld again after %lld", key, v, s->last);
            } else if (v != s->last + 1) {
                out->out_of_order++;
                if (!out->first_problem[0])
                    snprintf(out->first_problem, sizeof out->first_problem,
                             "%s version %lld after %lld", key, v, s->last);
            }
            if (v > s->last)
                s->last = v;
            out->messages++;
            if (out->messages >= expected && grace < 0)
                grace = now_ms() + 1000;
        }
        rd_kafka_message_destroy(m);
    }
    free(seen);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    return 0;
}

char *kafka_header_at(const char *brokers, const char *topic, int32_t partition, int64_t offset,
                      const char *header)
{
    static const char *const own[][2] = {
        {"group.id", "kafka-header-at-unused"},
        {"isolation.level", "read_committed"},
        {"enable.auto.commit", "false"},
        {"log_level", "3"},
        {NULL, NULL},
    };
    cqrs_error_t err;
    rd_kafka_conf_t *conf = cqrs_bus_conf_new(brokers, "kafka-header-at", own, &err);
    rd_kafka_t *rk = conf ? cqrs_bus_client_new(RD_KAFKA_CONSUMER, conf, "consumer", &err) : NULL;
    if (!rk)
        return NULL;
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, topic, partition)->offset = offset;
    rd_kafka_assign(rk, l);
    rd_kafka_topic_partition_list_destroy(l);
    char *value = NULL;
    for (int i = 0; i < 100 && !value; i++) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
        if (!m)
            continue;
        rd_kafka_headers_t *h = NULL;
        const void *val = NULL;
        size_t size = 0;
        if (!m->err && m->offset == offset && rd_kafka_message_headers(m, &h) == 0 &&
            rd_kafka_header_get_last(h, header, &val, &size) == 0)
            value = strndup(val, size);
        else if (!m->err)
            value = strdup("(another message)");
        rd_kafka_message_destroy(m);
    }
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    return value;
}
