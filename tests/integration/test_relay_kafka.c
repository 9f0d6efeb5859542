/* Integration test of the outbox relay against the real PostgreSQL and Kafka of the stack:
 * events appended in PostgreSQL reach Kafka with key = aggregate id and the CloudEvents
 * headers, in version order per aggregate, exactly once each, and leave the outbox only
 * after Kafka acknowledged them. Also: the relay holds them while Kafka is unreachable. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>

#include <cqrs/bus.h>
#include <cqrs/event.h>
#include <cqrs/outbox.h>
#include <cqrs/store.h>
#include <cqrs/util.h>

#include "kafka_check.h"
#include "daemons.h"
#include "testenv.h"

extern const cqrs_embedded_file_t cqrs_migrations[];

static const char *dsn, *brokers;
static cqrs_store_t *store;
static char topic[96];

static int setup(void **state)
{
    (void)state;
    dsn = testenv_require("CQRS_PG_DSN");
    brokers = testenv_require("CQRS_KAFKA_BROKERS");
    int applied;
    cqrs_error_t err;
    if (cqrs_store_migrate(dsn, cqrs_migrations, &applied, &err) != CQRS_ERR_OK)
        return -1;
    char id[37];
    cqrs_uuid_v4(id);
    snprintf(topic, sizeof topic, "itest.%.8s.events", id);
    const char *topics[] = {topic};
    if (cqrs_bus_create_topics(brokers, topics, 1, 3, -1, 10000, &err) != CQRS_ERR_OK) {
        fprintf(stderr, "create topic: %s\n", err.message);
        return -1;
    }
    cqrs_store_config_t cfg = {.dsn = dsn,
                               .pool_size = 1,
                               .acquire_timeout_ms = 2000,
                               .statement_timeout_ms = 5000,
                               .lock_timeout_ms = 1000,
                               .max_tx_attempts = 3};
    store = cqrs_store_new(&cfg);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    cqrs_store_destroy(store);
    return 0;
}

typedef struct batch {
    char agg[2][37];
    int versions;
    int64_t first_seq;
} batch_t;

static cqrs_err_t append_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    batch_t *b = ud;
    /* Interleave two aggregates: a1 v1, a2 v1, a1 v2, a2 v2, … */
    for (int v = 1; v <= b->versions; v++) {
        for (int a = 0; a < 2; a++) {
            cqrs_event_t ev;
            cqrs_event_init(&ev, "thing.happened.v1", "thing", b->agg[a], v,
                            json_pack("{s:i, s:i}", "a", a, "v", v),
                            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
            cqrs_err_t rc = cqrs_outbox_append(tx, &ev, topic, err);
            if (!b->first_seq)
                b->first_seq = ev.sequence;
            cqrs_event_close(&ev);
            if (rc)
                return rc;
        }
    }
    return CQRS_ERR_OK;
}

static const char *hdr(rd_kafka_headers_t *h, const char *name, char *buf, size_t cap)
{
    const void *v;
    size_t n;
    if (rd_kafka_header_get_last(h, name, &v, &n) != 0 || n >= cap)
        return NULL;
    memcpy(buf, v, n);
    buf[n] = '\0';
    return buf;
}

static cqrs_relay_t *relay_for(const char *broker_list)
{
    cqrs_relay_config_t rc = {.dsn = dsn,
                              .brokers = broker_list,
                              .source = "/test",
                              .batch_size = 100,
                              .poll_interval_ms = 200,
                              .message_timeout_ms = 5000,
                              .transactional_id = "cqrs-relay",
                              .lease_ms = 3000};
    cqrs_error_t err;
    cqrs_relay_t *r = cqrs_relay_new(&rc, &err);
    assert_non_null(r);
    assert_int_equal(cqrs_relay_start(r, &err), CQRS_ERR_OK);
    return r;
}

/* The test relay takes the real relay lease, so it never runs beside a daemon's relay. */
static void wait_leader(cqrs_relay_t *r)
{
    cqrs_relay_stats_t st = {0};
    for (int i = 0; i < 100 && !st.leader; i++) {
        usleep(100 * 1000);
        cqrs_relay_stats(r, &st);
    }
    if (!st.leader)
        fail_msg("the test relay never became leader: is a cqrs-commandd running on this stack?");
}

static bool outbox_drained(const char *t, int seconds)
{
    for (int i = 0; i < seconds * 10; i++) {
        if (pg_count("SELECT count(*) FROM outbox WHERE topic = $1", t) == 0)
            return true;
        usleep(100 * 1000);
    }
    return false;
}

static void test_relay_publishes_in_order_with_headers(void **state)
{
    (void)state;
    batch_t b = {.versions = 5};
    cqrs_uuid_v4(b.agg[0]);
    cqrs_uuid_v4(b.agg[1]);
    cqrs_error_t err;
    assert_int_equal(cqrs_store_run_tx(store, append_tx, &b, &err), CQRS_ERR_OK);
    assert_int_equal(pg_count("SELECT count(*) FROM outbox WHERE topic = $1", topic), 10);

    cqrs_relay_t *relay = relay_for(brokers);
    wait_leader(relay);
    assert_true(outbox_drained(topic, 60));
    cqrs_relay_destroy(relay);
    /* The event log keeps everything. */
    assert_int_equal(pg_count("SELECT count(*) FROM events WHERE aggregate_id = $1", b.agg[0]), 5);

    /* Read the topic back from the beginning. */
    char group[128];
    snprintf(group, sizeof group, "itest-%s", topic);
    const char *const own[][2] = {
        {"group.id", group},
        {"auto.offset.reset", "earliest"},
        {"isolation.level", "read_committed"},
        {NULL, NULL},
    };
    rd_kafka_conf_t *conf = cqrs_bus_conf_new(brokers, "itest-reader", own, &err);
    assert_non_null(conf);
    rd_kafka_t *rk = cqrs_bus_client_new(RD_KAFKA_CONSUMER, conf, "consumer", &err);
    assert_non_null(rk);
    rd_kafka_poll_set_consumer(rk);
    rd_kafka_topic_partition_list_t *subs = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(subs, topic, RD_KAFKA_PARTITION_UA);
    assert_int_equal(rd_kafka_subscribe(rk, subs), 0);
    rd_kafka_topic_partition_list_destroy(subs);

    int seen = 0, next_version[2] = {1, 1};
    int64_t t_end = cqrs_monotonic_ms() + 60000;
    while (seen < 10 && cqrs_monotonic_ms() < t_end) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 500);
        if (!m)
            continue;
        if (m->err) {
            rd_kafka_message_destroy(m);
            continue;
        }
        rd_kafka_headers_t *h = NULL;
        assert_int_equal(rd_kafka_message_headers(m, &h), 0);
        char buf[128], key[40];
        assert_int_equal(m->key_len, 36);
        memcpy(key, m->key, 36);
        key[36] = '\0';
        int a = strcmp(key, b.agg[0]) == 0 ? 0 : 1;
        assert_string_equal(key, b.agg[a]);
        assert_string_equal(hdr(h, "ce_specversion", buf, sizeof buf), "1.0");
        assert_string_equal(hdr(h, "ce_subject", buf, sizeof buf), key);
        assert_string_equal(hdr(h, "ce_type", buf, sizeof buf), "thing.happened.v1");
        assert_string_equal(hdr(h, "ce_source", buf, sizeof buf), "/test");
        assert_string_equal(hdr(h, "content-type", buf, sizeof buf), "application/json");
        assert_string_equal(hdr(h, "ce_aggregatetype", buf, sizeof buf), "thing");
        assert_string_equal(hdr(h, "ce_traceparent", buf, sizeof buf),
                            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_true(cqrs_uuid_valid(hdr(h, "ce_id", buf, sizeof buf)));
        assert_int_equal(strlen(hdr(h, "ce_time", buf, sizeof buf)), 24);
        int64_t v, seq;
        assert_true(cqrs_parse_int64(hdr(h, "ce_aggregateversion", buf, sizeof buf), &v));
        /* Per aggregate: every version once, in order. */
        assert_int_equal(v, next_version[a]);
        next_version[a]++;
        assert_true(cqrs_parse_int64(hdr(h, "ce_sequence", buf, sizeof buf), &seq));
        assert_int_equal(strlen(buf), CQRS_EVENT_SEQUENCE_DIGITS); /* sorts as a string */
        assert_true(seq >= b.first_seq);
        json_t *data = json_loadb(m->payload, m->len, 0, NULL);
        assert_int_equal(json_integer_value(json_object_get(data, "v")), v);
        json_decref(data);
        seen++;
        rd_kafka_message_destroy(m);
    }
    assert_int_equal(seen, 10);
    /* Nothing more: no event was published twice. */
    for (int i = 0; i < 6; i++) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 500);
        if (m) {
            bool real = !m->err;
            rd_kafka_message_destroy(m);
            assert_false(real);
        }
    }
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
}

static void test_relay_keeps_events_while_kafka_is_unreachable(void **state)
{
    (void)state;
    batch_t b = {.versions = 1};
    cqrs_uuid_v4(b.agg[0]);
    cqrs_uuid_v4(b.agg[1]);
    cqrs_error_t err;
    assert_int_equal(cqrs_store_run_tx(store, append_tx, &b, &err), CQRS_ERR_OK);
    cqrs_relay_t *relay = relay_for("127.0.0.1:1");
    wait_leader(relay);
    sleep(2);
    cqrs_relay_destroy(relay);
    assert_int_equal(pg_count("SELECT count(*) FROM outbox WHERE topic = $1", topic), 2);
    /* and a working relay delivers them afterwards */
    relay = relay_for(brokers);
    assert_true(outbox_drained(topic, 60));
    cqrs_relay_destroy(relay);
}

/* Inserts one event + outbox row on c (inside whatever transaction c has open). */
static void raw_append_to(PGconn *c, const char *agg, const char *to)
{
    char id[37];
    cqrs_uuid_v4(id);
    const char *p[] = {id, agg, to};
    PGresult *r = PQexecParams(c,
                               "WITH e AS (INSERT INTO events(event_id, aggregate_type,"
                               " aggregate_id, version, event_type, occurred_at, data)"
                               " VALUES ($1, 'thing', $2, 1, 'thing.happened.v1', now(),"
                               " '{\"late\":true}') RETURNING sequence)"
                               "INSERT INTO outbox(sequence, topic) SELECT sequence, $3 FROM e",
                               3, NULL, p, NULL, NULL, 0);
    assert_int_equal(PQresultStatus(r), PGRES_COMMAND_OK);
    PQclear(r);
}

static void raw_append(PGconn *c, const char *agg)
{
    raw_append_to(c, agg, topic);
}

static void test_record_beyond_the_partition_end_is_settled(void **state)
{
    (void)state;
    /* A batch record whose check message lies beyond the partition's end. The lookup no longer
     * takes such an end for an abort at once (a new partition leader can serve a high
     * watermark behind what it holds: that published a committed batch twice); but an end
     * that stays before it means the log was cut below it (an unclean election): after 10 s
     * the batch counts as not in Kafka and is published — once, not never. */
    char id[37], t2[96];
    cqrs_uuid_v4(id);
    snprintf(t2, sizeof t2, "itest.%.8s.cut", id);
    const char *topics[] = {t2};
    cqrs_error_t err;
    assert_int_equal(cqrs_bus_create_topics(brokers, topics, 1, 1, -1, 10000, &err), CQRS_ERR_OK);
    PGconn *c = PQconnectdb(dsn);
    char agg[2][37];
    cqrs_uuid_v4(agg[0]);
    cqrs_uuid_v4(agg[1]);
    raw_append_to(c, agg[0], t2);
    raw_append_to(c, agg[1], t2);
    const char *p[] = {t2};
    PGresult *r = PQexecParams(c,
                               "INSERT INTO relay_inflight(id, epoch, sequences, check_topic,"
                               " check_partition, check_offset, check_sequence)"
                               " SELECT 1, 0, array_agg(sequence ORDER BY sequence), $1, 0, 1000,"
                               " max(sequence) FROM outbox WHERE topic = $1"
                               " ON CONFLICT (id) DO UPDATE SET sequences = EXCLUDED.sequences,"
                               " check_topic = EXCLUDED.check_topic, check_partition = 0,"
                               " check_offset = 1000, check_sequence = EXCLUDED.check_sequence",
                               1, NULL, p, NULL, NULL, 0);
    assert_int_equal(PQresultStatus(r), PGRES_COMMAND_OK);
    PQclear(r);
    PQfinish(c);
    cqrs_relay_t *relay = relay_for(brokers);
    wait_leader(relay);
    assert_true(outbox_drained(t2, 60));
    cqrs_relay_destroy(relay);
    assert_int_equal(pg_count("SELECT count(*) FROM relay_inflight", NULL), 0);
    kafka_check_t k;
    assert_int_equal(kafka_check_topics(brokers, topics, 1, 2, 30, &k), 0);
    assert_int_equal(k.messages, 2);
    assert_int_equal(k.duplicates, 0);
}

static void test_late_commit_is_not_skipped(void **state)
{
    (void)state;
    /* A takes the lower sequence but commits after B, whose higher sequence is published
     * first: A's event must still be published. */
    PGconn *a = PQconnectdb(dsn), *b = PQconnectdb(dsn);
    char agg_a[37], agg_b[37];
    cqrs_uuid_v4(agg_a);
    cqrs_uuid_v4(agg_b);
    PQclear(PQexec(a, "BEGIN"));
    raw_append(a, agg_a);
    raw_append(b, agg_b); /* autocommit */
    cqrs_relay_t *relay = relay_for(brokers);
    wait_leader(relay);
    for (int i = 0; i < 100 && pg_count("SELECT count(*) FROM outbox o JOIN events e USING"
                                        " (sequence) WHERE e.aggregate_id = $1",
                                        agg_b) != 0;
         i++)
        usleep(100 * 1000);
    assert_int_equal(pg_count("SELECT count(*) FROM outbox o JOIN events e USING (sequence)"
                              " WHERE e.aggregate_id = $1",
                              agg_b),
                     0);
    PQclear(PQexec(a, "COMMIT"));
    assert_true(outbox_drained(topic, 60));
    cqrs_relay_destroy(relay);
    PQfinish(a);
    PQfinish(b);
    const char *topics[] = {topic};
    kafka_check_t k;
    /* 10 + 2 from the earlier tests, 2 now */
    assert_int_equal(kafka_check_topics(brokers, topics, 1, 14, 60, &k), 0);
    assert_int_equal(k.messages, 14);
    assert_int_equal(k.duplicates, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_relay_publishes_in_order_with_headers),
        cmocka_unit_test(test_relay_keeps_events_while_kafka_is_unreachable),
        cmocka_unit_test(test_late_commit_is_not_skipped),
        cmocka_unit_test(test_record_beyond_the_partition_end_is_settled),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
