/* Integration tests of projector.c against the real Kafka and Redis of the stack (a private
 * Redis database): events reach their documents exactly once and in order; a rejected event
 * becomes a dead letter that holds back its own aggregate only; a message that is not a
 * CloudEvent is kept aside; a Redis that lost its data is refilled from Kafka; offsets moved
 * backwards (redelivery) change no document. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <librdkafka/rdkafka.h>

#include <cqrs/bus.h>
#include <cqrs/projector.h>
#include <cqrs/util.h>

#include "redisdb.h"
#include "testenv.h"

static const char *brokers;
static char url[1024], topic[96];
static rd_kafka_t *producer;

/* The test projection: a counter per aggregate. */
static bool counter_key(const cqrs_event_t *ev, char *out, size_t cap)
{
    if (strcmp(ev->aggregate_type, "counter") != 0)
        return false;
    snprintf(out, cap, "itest:counter:{%s}", ev->aggregate_id);
    return true;
}

static cqrs_err_t counter_apply(const json_t *doc, const cqrs_event_t *ev, json_t **next,
                                cqrs_error_t *err)
{
    if (strcmp(ev->type, "counter.incremented.v1") != 0)
        return cqrs_error_set(err, CQRS_ERR_INVALID, "unknown event type %s", ev->type);
    json_int_t n = doc ? json_integer_value(json_object_get(doc, "n")) : 0;
    n += json_integer_value(json_object_get(ev->data, "by"));
    *next = json_pack("{s:I, s:I}", "n", n, "version", (json_int_t)ev->version);
    return CQRS_ERR_OK;
}

static const cqrs_projection_t counter = {counter_key, counter_apply, NULL, NULL};

static int setup(void **state)
{
    (void)state;
    brokers = testenv_require("CQRS_KAFKA_BROKERS");
    if (redisdb_url(testenv_require("CQRS_REDIS_URL"), 14, url, sizeof url) != 0)
        return -1;
    freeReplyObject(redisdb_cmd(url, "FLUSHDB", NULL));
    cqrs_error_t err;
    rd_kafka_conf_t *conf = cqrs_bus_conf_new(brokers, "itest-producer", &err);
    cqrs_bus_conf_set(conf, "enable.idempotence", "true", &err);
    char errstr[256];
    producer = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    return producer ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    rd_kafka_flush(producer, 10000);
    rd_kafka_destroy(producer);
    return 0;
}

static int fresh_topic(void **state)
{
    (void)state;
    char id[37];
    cqrs_uuid_v4(id);
    snprintf(topic, sizeof topic, "itest.%.8s.counters", id);
    const char *t[] = {topic};
    cqrs_error_t err;
    return cqrs_bus_create_topics(brokers, t, 1, 3, -1, 10000, &err) == CQRS_ERR_OK ? 0 : -1;
}

static void produce(const char *agg, int64_t version, const char *type, int by)
{
    cqrs_event_t ev;
    cqrs_event_init(&ev, type, "counter", agg, version, json_pack("{s:i}", "by", by), NULL);
    strcpy(ev.source, "/itest");
    ev.sequence = version;
    cqrs_event_headers_t h;
    cqrs_event_headers(&ev, &h);
    rd_kafka_headers_t *hdrs = rd_kafka_headers_new(h.n);
    for (size_t i = 0; i < h.n; i++)
        rd_kafka_header_add(hdrs, h.name[i], -1, h.value[i], -1);
    char *value = json_dumps(ev.data, JSON_COMPACT);
    assert_int_equal(rd_kafka_producev(producer, RD_KAFKA_V_TOPIC(topic),
                                       RD_KAFKA_V_KEY(agg, strlen(agg)),
                                       RD_KAFKA_V_VALUE(value, strlen(value)),
                                       RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                       RD_KAFKA_V_HEADERS(hdrs), RD_KAFKA_V_END),
                     0);
    free(value);
    cqrs_event_close(&ev);
    assert_int_equal(rd_kafka_flush(producer, 10000), 0);
}

static cqrs_projector_t *start_projector(void)
{
    char group[128];
    snprintf(group, sizeof group, "%s-group", topic);
    const char *topics[] = {topic};
    cqrs_projector_config_t cfg = {.brokers = brokers,
                                   .group_id = group,
                                   .client_id = "itest-projector",
                                   .topics = topics,
                                   .n_topics = 1,
                                   .redis_url = url,
                                   .redis_timeout_ms = 2000,
                                   .projection = &counter};
    cqrs_error_t err;
    cqrs_projector_t *p = cqrs_projector_new(&cfg, &err);
    assert_non_null(p);
    assert_int_equal(cqrs_projector_start(p, &err), CQRS_ERR_OK);
    return p;
}

/* The counter document of agg: n and version (-1 when absent). */
static void counter_of(const char *agg, long long *n, long long *version)
{
    char key[96];
    snprintf(key, sizeof key, "itest:counter:{%s}", agg);
    redisReply *r = redisdb_cmd(url, "HGET %s json", key);
    *n = *version = -1;
    if (r && r->type == REDIS_REPLY_STRING) {
        json_t *d = json_loads(r->str, 0, NULL);
        *n = json_integer_value(json_object_get(d, "n"));
        *version = json_integer_value(json_object_get(d, "version"));
        json_decref(d);
    }
    freeReplyObject(r);
}

static bool wait_counter(const char *agg, long long want_n, long long want_v)
{
    for (int i = 0; i < 600; i++) {
        long long n, v;
        counter_of(agg, &n, &v);
        if (n == want_n && v == want_v)
            return true;
        usleep(100 * 1000);
    }
    return false;
}

static void test_events_reach_documents_in_order(void **state)
{
    (void)state;
    char a[3][37];
    for (int k = 0; k < 3; k++)
        cqrs_uuid_v4(a[k]);
    for (int v = 1; v <= 5; v++)
        for (int k = 0; k < 3; k++)
            produce(a[k], v, "counter.incremented.v1", v * (k + 1));
    cqrs_projector_t *p = start_projector();
    for (int k = 0; k < 3; k++)
        assert_true(wait_counter(a[k], 15 * (k + 1), 5));
    cqrs_projector_stats_t st;
    cqrs_projector_stats(p, &st);
    assert_int_equal(st.applied, 15);
    assert_int_equal(st.dead_letters, 0);
    /* Redis recorded, per partition, the offset after the last applied event. */
    char key[160];
    cqrs_projector_offsets_key(topic, key, sizeof key);
    redisReply *r = redisdb_cmd(url, "HVALS %s", key);
    long long total = 0;
    for (size_t i = 0; r && i < r->elements; i++)
        total += atoll(r->element[i]->str);
    freeReplyObject(r);
    assert_int_equal(total, 15);

    /* Offsets moved backwards: everything is delivered again, and no document changes. */
    cqrs_projector_destroy(p);
    r = redisdb_cmd(url, "DEL %s", key);
    freeReplyObject(r);
    p = start_projector();
    for (int i = 0; i < 600; i++) {
        cqrs_projector_stats(p, &st);
        if (st.duplicates == 15)
            break;
        usleep(100 * 1000);
    }
    assert_int_equal(st.duplicates, 15);
    assert_int_equal(st.applied, 0);
    for (int k = 0; k < 3; k++)
        assert_true(wait_counter(a[k], 15 * (k + 1), 5));

    /* Redis loses everything: the next event finds the store empty, the consumer starts over
     * from the beginning, and every document comes back. */
    freeReplyObject(redisdb_cmd(url, "FLUSHDB", NULL));
    produce(a[0], 6, "counter.incremented.v1", 100);
    assert_true(wait_counter(a[0], 115, 6));
    assert_true(wait_counter(a[1], 30, 5));
    assert_true(wait_counter(a[2], 45, 5));
    cqrs_projector_stats(p, &st);
    assert_true(st.resets >= 1);
    cqrs_projector_destroy(p);
}

static void test_dead_letter_holds_back_only_its_aggregate(void **state)
{
    (void)state;
    char bad[37], good[37];
    cqrs_uuid_v4(bad);
    cqrs_uuid_v4(good);
    cqrs_projector_t *p = start_projector();
    produce(bad, 1, "counter.incremented.v1", 1);
    produce(bad, 2, "counter.exploded.v1", 1); /* the projection rejects it */
    produce(bad, 3, "counter.incremented.v1", 1);
    produce(good, 1, "counter.incremented.v1", 2);
    produce(good, 2, "counter.incremented.v1", 2);
    assert_true(wait_counter(good, 4, 2));
    cqrs_projector_stats_t st;
    for (int i = 0; i < 600; i++) {
        cqrs_projector_stats(p, &st);
        if (st.parked == 1)
            break;
        usleep(100 * 1000);
    }
    assert_int_equal(st.dead_letters, 1);
    assert_int_equal(st.parked, 1);
    long long n, v;
    counter_of(bad, &n, &v);
    assert_int_equal(v, 1);
    /* The dead letter keeps the whole event and the reason, the parked one waits with it. */
    char dlq[96];
    cqrs_projector_dlq_key(bad, dlq, sizeof dlq);
    redisReply *r = redisdb_cmd(url, "HGET %s 2:reason", dlq);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_non_null(strstr(r->str, "counter.exploded.v1"));
    freeReplyObject(r);
    r = redisdb_cmd(url, "HGET %s 3", dlq);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    json_t *blob = json_loads(r->str, 0, NULL);
    assert_string_equal(json_string_value(json_object_get(blob, "type")), "counter.incremented.v1");
    assert_int_equal(json_integer_value(json_object_get(blob, "version")), 3);
    assert_non_null(json_object_get(blob, "offset"));
    json_decref(blob);
    freeReplyObject(r);
    r = redisdb_cmd(url, "ZSCORE cqrs:dlq:index %s", bad);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    freeReplyObject(r);

    /* Not a CloudEvent at all: kept aside, the partition goes on. */
    assert_int_equal(rd_kafka_producev(producer, RD_KAFKA_V_TOPIC(topic),
                                       RD_KAFKA_V_KEY(good, strlen(good)),
                                       RD_KAFKA_V_VALUE("garbage", 7),
                                       RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END),
                     0);
    rd_kafka_flush(producer, 10000);
    produce(good, 3, "counter.incremented.v1", 2);
    assert_true(wait_counter(good, 6, 3));
    cqrs_projector_stats(p, &st);
    assert_int_equal(st.undecodable, 1);
    r = redisdb_cmd(url, "LLEN cqrs:dlq:undecodable", NULL);
    assert_int_equal(r->integer, 1);
    freeReplyObject(r);
    cqrs_projector_destroy(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_events_reach_documents_in_order, fresh_topic),
        cmocka_unit_test_setup(test_dead_letter_holds_back_only_its_aggregate, fresh_topic),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
