/* End-to-end test of `cqrsctl explain` and `cqrsctl dlq`, in a PostgreSQL database and a Redis
 * database of their own, against the real daemons.
 *
 * explain follows one product's events through each state of their journey: applied; in the
 * outbox (relay off); published (the partition and offset it names hold that very event,
 * read back from Kafka) but not applied (projector stopped); applied again; dead-lettered
 * (its stored document corrupted) and parked behind it. dlq retry fails while the cause is
 * there (the event stays, with its reason), and after the fix applies both events, releases
 * the product (its next event applies by itself) and verify passes.
 *
 * An event type the projection does not know (written to the event log and outbox as a newer
 * command side would) is dead-lettered and the next event parked; list and show report them,
 * retry cannot apply them, drop refuses without --yes and then releases the product, whose
 * document stays behind PostgreSQL — which verify reports.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>
#include <librdkafka/rdkafka.h>

#include <cqrs/bus.h>
#include <cqrs/util.h>

#include "daemons.h"
#include "httpc.h"
#include "kafka_check.h"
#include "redisdb.h"
#include "testenv.h"

static daemons_t D;
static testdb_t DB;
static char redis_url[1024];

static int setup(void **state)
{
    (void)state;
    testenv_require_stack();
    testdb_create(&DB, "explain");
    D.redis_db = 13;
    redisdb_url(getenv("CQRS_REDIS_URL"), 13, redis_url, sizeof redis_url);
    return daemons_start(&D);
}

static int teardown(void **state)
{
    (void)state;
    daemons_stop(&D);
    testdb_drop(&DB);
    return 0;
}

static json_t *call(const char *method, const char *path, const char *body, int want)
{
    httpc_response_t r;
    httpc_request(D.cport, method, path, body ? "Content-Type: application/json\r\n" : NULL, body,
                  body ? strlen(body) : 0, &r);
    if (r.status != want)
        fail_msg("%s %s: %d %s", method, path, r.status, r.body);
    json_t *j = json_loads(r.body, 0, NULL);
    httpc_response_free(&r);
    return j;
}

static void adjust(const char *id, int delta)
{
    char path[128], body[128];
    snprintf(path, sizeof path, "/v1/products/%s/stock-adjustments", id);
    snprintf(body, sizeof body, "{\"delta\":%d,\"reason\":\"explain\"}", delta);
    json_decref(call("POST", path, body, 200));
}

/* cqrsctl with this run's settings: its exit status, and its stdout as JSON. */
#define ctl(out, ...) daemons_ctl(DB.dsn, redis_url, D.prefix, out, __VA_ARGS__)

static json_t *explain(const char *id)
{
    json_t *j = NULL;
    int st = ctl(&j, "explain %s --json", id);
    if (st != 0 || !j)
        fail_msg("cqrsctl explain %s: exit %d", id, st);
    return j;
}

static json_t *event_at(json_t *x, int64_t version)
{
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(x, "events"), i, e)
    {
        if (json_integer_value(json_object_get(e, "version")) == version)
            return e;
    }
    fail_msg("explain has no event at version %lld", (long long)version);
    return NULL;
}

static const char *sget(json_t *o, const char *path1, const char *path2)
{
    json_t *v = json_object_get(o, path1);
    return json_string_value(path2 ? json_object_get(v, path2) : v);
}

static json_int_t iget(json_t *o, const char *path1, const char *path2)
{
    json_t *v = json_object_get(o, path1);
    v = path2 ? json_object_get(v, path2) : v;
    if (!json_is_integer(v))
        fail_msg("%s%s%s is not an integer", path1, path2 ? "." : "", path2 ? path2 : "");
    return json_integer_value(v);
}

/* The query side's version of a product, 0 when absent. */
static long long query_version(const char *id)
{
    char path[128];
    snprintf(path, sizeof path, "/v1/products/%s", id);
    httpc_response_t r;
    httpc_request(D.qport, "GET", path, NULL, NULL, 0, &r);
    json_t *j = r.status == 200 ? json_loads(r.body, 0, NULL) : NULL;
    long long v = json_integer_value(json_object_get(j, "version"));
    json_decref(j);
    httpc_response_free(&r);
    return v;
}

static void wait_version(const char *id, long long want)
{
    for (int i = 0; i < 200; i++) {
        if (query_version(id) == want)
            return;
        usleep(100 * 1000);
    }
    fail_msg("product %s never reached version %lld (at %lld)", id, want, query_version(id));
}

/* Waits until explain says version's event is in state `redis`; returns that explain. */
static json_t *wait_state(const char *id, int64_t version, const char *redis)
{
    for (int i = 0; i < 200; i++) {
        json_t *x = explain(id);
        json_t *e = json_array_size(json_object_get(x, "events")) >= (size_t)version
                        ? event_at(x, version)
                        : NULL;
        if (e && strcmp(sget(e, "redis", NULL), redis) == 0)
            return x;
        json_decref(x);
        usleep(100 * 1000);
    }
    fail_msg("event %lld of %s never became %s", (long long)version, id, redis);
    return NULL;
}

static void assert_in_kafka(json_t *x, json_t *e)
{
    char topic[128];
    snprintf(topic, sizeof topic, "%s.product.events", D.prefix);
    assert_string_equal(sget(x, "kafka", "topic"), topic);
    assert_string_equal(sget(e, "kafka", "status"), "found");
    assert_int_equal(iget(e, "kafka", "partition"), iget(x, "kafka", "partition"));
    char *id =
        kafka_header_at(getenv("CQRS_KAFKA_BROKERS"), topic, (int32_t)iget(e, "kafka", "partition"),
                        iget(e, "kafka", "offset"), "ce_id");
    assert_non_null(id);
    assert_string_equal(id, sget(e, "event_id", NULL));
    free(id);
}

/* The relay deletes outbox rows only after Kafka committed them (and the projector may
 * already have applied them). */
static void wait_outbox_empty(void)
{
    for (int i = 0; i < 100 && pg_count("SELECT count(*) FROM outbox", NULL) != 0; i++)
        usleep(100 * 1000);
    assert_int_equal(pg_count("SELECT count(*) FROM outbox", NULL), 0);
}

static void restart_commandd(const char *extra_env, const char *name)
{
    assert_int_equal(daemons_stop_one(&D.commandd), 0);
    D.cport = free_port();
    D.commandd = daemons_spawn_commandd(&D, D.cport, extra_env, name);
    assert_true(D.commandd > 0);
}

static char redis_doc_key[CQRS_KEY_MAX];

/* A store-wide gauge from cqrs-queryd's /metrics; -1 when absent. */
static long long store_gauge(const char *name)
{
    httpc_response_t r;
    httpc_request(D.qport, "GET", "/metrics", NULL, NULL, 0, &r);
    long long v = -1;
    char prefix[128];
    snprintf(prefix, sizeof prefix, "\n%s ", name);
    const char *at = r.body ? strstr(r.body, prefix) : NULL;
    if (at)
        v = atoll(at + strlen(prefix));
    httpc_response_free(&r);
    return v;
}

static void test_explain_journey_and_retry(void **state)
{
    (void)state;
    json_t *p = call("POST", "/v1/products",
                     "{\"sku\":\"EXPLAIN-1\",\"name\":\"Explained\",\"category\":\"ops\","
                     "\"price_cents\":500,\"currency\":\"EUR\",\"initial_stock\":10}",
                     201);
    char id[40];
    snprintf(id, sizeof id, "%s", json_string_value(json_object_get(p, "id")));
    json_decref(p);
    wait_version(id, 1);
    wait_outbox_empty();

    /* applied: published where explain says, document at 1, no lag */
    json_t *x = explain(id);
    assert_string_equal(sget(x, "aggregate_type", NULL), "product");
    assert_int_equal(iget(x, "version", NULL), 1);
    json_t *e1 = event_at(x, 1);
    assert_false(json_is_true(json_object_get(e1, "in_outbox")));
    assert_string_equal(sget(e1, "redis", NULL), "applied");
    assert_in_kafka(x, e1);
    int64_t off1 = iget(e1, "kafka", "offset");
    assert_int_equal(iget(x, "document", "version"), 1);
    assert_true(iget(x, "kafka", "applied_offset") > off1);
    assert_int_equal(iget(x, "events_behind", NULL), 0);
    assert_true(json_real_value(json_object_get(x, "lag_seconds")) == 0.0);
    json_decref(x);

    /* in the outbox: projector stopped, relay off */
    assert_int_equal(daemons_stop_one(&D.queryd), 0);
    restart_commandd("CQRS_RELAY_ENABLED=false", "commandd-norelay");
    adjust(id, 2);
    usleep(1200 * 1000);
    x = explain(id);
    json_t *e2 = event_at(x, 2);
    assert_true(json_is_true(json_object_get(e2, "in_outbox")));
    assert_string_equal(sget(e2, "kafka", "status"), "not published");
    assert_string_equal(sget(e2, "redis", NULL), "pending");
    assert_int_equal(iget(x, "document", "version"), 1);
    assert_int_equal(iget(x, "events_behind", NULL), 1);
    assert_true(json_real_value(json_object_get(x, "lag_seconds")) >= 1.0);
    assert_string_equal(sget(x, "oldest_not_visible", NULL), sget(e2, "time", NULL));
    json_decref(x);

    /* published, not applied: relay back, projector still stopped */
    restart_commandd(NULL, "commandd-relay");
    wait_outbox_empty();
    x = explain(id);
    e2 = event_at(x, 2);
    assert_false(json_is_true(json_object_get(e2, "in_outbox")));
    assert_in_kafka(x, e2);
    int64_t off2 = iget(e2, "kafka", "offset");
    assert_true(off2 > off1);
    assert_string_equal(sget(e2, "redis", NULL), "pending");
    assert_int_equal(iget(x, "events_behind", NULL), 1);
    assert_true(iget(x, "kafka", "applied_offset") <= off2);
    assert_true(json_real_value(json_object_get(x, "lag_seconds")) >= 1.0);
    json_decref(x);

    /* applied: projector back */
    D.qport = free_port();
    D.queryd = daemons_spawn_queryd(&D, D.qport, NULL, "queryd-again");
    assert_true(D.queryd > 0);
    wait_version(id, 2);
    x = explain(id);
    assert_string_equal(sget(event_at(x, 2), "redis", NULL), "applied");
    assert_true(iget(x, "kafka", "applied_offset") > off2);
    assert_int_equal(iget(x, "events_behind", NULL), 0);
    json_decref(x);

    /* dead-lettered: the stored document is corrupted, so the projection rejects v3, and v4
     * is parked behind it */
    assert_int_equal(
        redisdb_doc_key(redis_url, D.prefix, "product", id, redis_doc_key, sizeof redis_doc_key),
        0);
    redisReply *r = redisdb_cmd(redis_url, "HGET %s json", redis_doc_key);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    char *saved = strdup(r->str);
    freeReplyObject(r);
    char hset[CQRS_KEY_MAX + 32];
    snprintf(hset, sizeof hset, "HSET %s json %%s", redis_doc_key);
    freeReplyObject(redisdb_cmd(redis_url, hset, "not json"));
    adjust(id, 3);
    json_decref(wait_state(id, 3, "dead letter"));
    adjust(id, 4);
    x = wait_state(id, 4, "parked");
    assert_string_equal(sget(event_at(x, 3), "reason", NULL), "the stored document is not JSON");
    assert_string_equal(sget(event_at(x, 3), "redis", NULL), "dead letter");
    assert_int_equal(json_array_size(json_object_get(x, "dead_letters")), 2);
    assert_int_equal(iget(x, "events_behind", NULL), 2);
    assert_in_kafka(x, event_at(x, 4));
    json_decref(x);

    /* dlq list names it */
    json_t *l = NULL;
    assert_int_equal(ctl(&l, "dlq list --json"), 0);
    json_t *a = json_array_get(json_object_get(l, "aggregates"), 0);
    assert_int_equal(json_array_size(json_object_get(l, "aggregates")), 1);
    assert_string_equal(sget(a, "aggregate_id", NULL), id);
    assert_int_equal(iget(a, "count", NULL), 2);
    assert_int_equal(iget(a, "first_version", NULL), 3);
    assert_string_equal(sget(a, "reason", NULL), "the stored document is not JSON");
    json_decref(l);
    /* and so does /metrics, store-wide */
    assert_int_equal(store_gauge("cqrs_read_model_dead_letter_aggregates"), 1);

    /* retry before the fix: exit 1, both still held, the reason kept */
    assert_int_equal(ctl(&l, "dlq retry %s --json", id), 1);
    assert_false(json_is_true(json_object_get(l, "released")));
    json_decref(l);
    assert_int_equal(ctl(&l, "dlq show %s --json", id), 0);
    assert_int_equal(json_array_size(json_object_get(l, "dead_letters")), 2);
    assert_string_equal(sget(json_array_get(json_object_get(l, "dead_letters"), 0), "reason", NULL),
                        "the stored document is not JSON");
    json_decref(l);
    r = redisdb_cmd(redis_url, "HGET %s v", redis_doc_key);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_string_equal(r->str, "2");
    freeReplyObject(r);

    /* fixed: retry applies v3 and v4 through the projection and releases the product */
    freeReplyObject(redisdb_cmd(redis_url, hset, saved));
    free(saved);
    assert_int_equal(ctl(&l, "dlq retry %s --json", id), 0);
    assert_true(json_is_true(json_object_get(l, "released")));
    assert_int_equal(json_array_size(json_object_get(l, "steps")), 2);
    json_decref(l);
    assert_int_equal(query_version(id), 4);
    char path[128];
    snprintf(path, sizeof path, "/v1/products/%s", id);
    httpc_response_t resp;
    httpc_request(D.qport, "GET", path, NULL, NULL, 0, &resp);
    json_t *doc = json_loads(resp.body, 0, NULL);
    httpc_response_free(&resp);
    assert_int_equal(json_integer_value(json_object_get(doc, "stock")), 10 + 2 + 3 + 4);
    json_decref(doc);
    assert_int_equal(ctl(&l, "dlq list --json"), 0);
    assert_int_equal(json_array_size(json_object_get(l, "aggregates")), 0);
    json_decref(l);
    assert_int_equal(store_gauge("cqrs_read_model_dead_letter_aggregates"), 0);
    assert_int_equal(store_gauge("cqrs_read_model_partitions_refilling"), 0);
    x = explain(id);
    assert_int_equal(json_array_size(json_object_get(x, "dead_letters")), 0);
    assert_string_equal(sget(event_at(x, 4), "redis", NULL), "applied");
    json_decref(x);

    /* released: the next event applies by itself, and the read model matches */
    adjust(id, 5);
    wait_version(id, 5);
    assert_int_equal(ctl(&l, "verify --json"), 0);
    assert_true(json_is_true(json_object_get(l, "match")));
    json_decref(l);
}

static void test_dlq_unknown_event_then_drop(void **state)
{
    (void)state;
    json_t *p = call("POST", "/v1/products",
                     "{\"sku\":\"DLQ-1\",\"name\":\"Held\",\"category\":\"ops\","
                     "\"price_cents\":700,\"currency\":\"EUR\",\"initial_stock\":10}",
                     201);
    char id[40];
    snprintf(id, sizeof id, "%s", json_string_value(json_object_get(p, "id")));
    json_decref(p);
    wait_version(id, 1);

    /* version 2 of a type this projection does not know, as a newer command side writes it */
    char sql[1024];
    snprintf(sql, sizeof sql,
             "WITH e AS (INSERT INTO events(event_id, aggregate_type, aggregate_id, version,"
             " event_type, occurred_at, data) VALUES (gen_random_uuid(), 'product', $1::uuid, 2,"
             " 'product.teleported.v1', now(), '{\"to\":\"mars\"}') RETURNING sequence),"
             " o AS (INSERT INTO outbox(sequence, topic) SELECT sequence, '%s.product.events'"
             " FROM e) UPDATE products SET version = 2 WHERE id = $1::uuid",
             D.prefix);
    pg_count(sql, id);
    assert_int_equal(pg_count("SELECT version FROM products WHERE id = $1::uuid", id), 2);
    json_decref(wait_state(id, 2, "dead letter"));
    adjust(id, 1); /* version 3, parked */
    json_decref(wait_state(id, 3, "parked"));

    json_t *l = NULL;
    assert_int_equal(ctl(&l, "dlq list --json"), 0);
    json_t *a = json_array_get(json_object_get(l, "aggregates"), 0);
    assert_int_equal(json_array_size(json_object_get(l, "aggregates")), 1);
    assert_string_equal(sget(a, "aggregate_id", NULL), id);
    assert_int_equal(iget(a, "count", NULL), 2);
    assert_int_equal(iget(a, "first_version", NULL), 2);
    assert_string_equal(sget(a, "type", NULL), "product.teleported.v1");
    assert_non_null(strstr(sget(a, "reason", NULL),
                           "event type product.teleported.v1 is unknown to this build"));
    json_decref(l);
    assert_int_equal(ctl(&l, "dlq show %s --json", id), 0);
    json_t *dl = json_object_get(l, "dead_letters");
    assert_int_equal(json_array_size(dl), 2);
    assert_int_equal(iget(json_array_get(dl, 0), "version", NULL), 2);
    assert_string_equal(sget(json_object_get(json_array_get(dl, 0), "event"), "data", "to"),
                        "mars");
    assert_int_equal(iget(json_array_get(dl, 1), "version", NULL), 3);
    json_decref(l);

    /* retry cannot apply it: still held, the document unchanged */
    assert_int_equal(ctl(&l, "dlq retry %s --json", id), 1);
    json_decref(l);
    assert_int_equal(query_version(id), 1);
    /* drop needs --yes */
    assert_int_equal(ctl(NULL, "dlq drop %s", id), 2);
    assert_int_equal(ctl(&l, "dlq list --json"), 0);
    assert_int_equal(json_array_size(json_object_get(l, "aggregates")), 1);
    json_decref(l);
    assert_int_equal(ctl(&l, "dlq drop %s --yes --json", id), 0);
    assert_int_equal(iget(l, "dropped", NULL), 2);
    assert_non_null(strstr(sget(l, "warning", NULL), "rebuild"));
    json_decref(l);
    assert_int_equal(ctl(&l, "dlq list --json"), 0);
    assert_int_equal(json_array_size(json_object_get(l, "aggregates")), 0);
    json_decref(l);
    assert_int_equal(ctl(NULL, "dlq show %s --json", id), 1);

    /* the document stays at 1 while PostgreSQL is at 3: explain and verify both say so */
    json_t *x = explain(id);
    assert_int_equal(iget(x, "document", "version"), 1);
    assert_int_equal(iget(x, "events_behind", NULL), 2);
    assert_string_equal(sget(event_at(x, 2), "redis", NULL), "pending");
    json_decref(x);
    assert_int_equal(ctl(&l, "verify --json"), 1);
    size_t i;
    json_t *k;
    bool named = false;
    json_array_foreach(json_object_get(l, "drift"), i, k)
    {
        if (strcmp(sget(k, "kind", NULL), "wrong version") == 0)
            named =
                strcmp(json_string_value(json_array_get(json_object_get(k, "first"), 0)), id) == 0;
    }
    assert_true(named);
    json_decref(l);
    assert_int_equal(ctl(NULL, "explain 00000000-0000-4000-8000-000000000000 --json"), 1);
    assert_int_equal(ctl(NULL, "explain not-a-uuid"), 2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_explain_journey_and_retry),
        cmocka_unit_test(test_dlq_unknown_event_then_drop),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
