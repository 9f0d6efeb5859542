/* End-to-end test of event schema evolution (issue 20), in a PostgreSQL database and a Redis
 * database of their own, against the real daemons.
 *
 * A mixed log and a mixed topic: products created through the command API (product.created.v2,
 * with and without weight_grams) next to one created as a cqrs-commandd from before v2 wrote it
 * (its row, a product.created.v1 event and its outbox row, written straight into PostgreSQL and
 * relayed to Kafka as they are). The projector brings v1 up to v2: the old product's document
 * has weight_grams null and otherwise the fields of its row, like a v2 product made without a
 * weight. `cqrsctl rebuild` from the log (both versions) yields the same documents, and verify
 * passes.
 *
 * A rolling deployment: an old cqrs-queryd (a build that does not know product.created.v2,
 * played by CQRS_TEST_UNKNOWN_EVENT_TYPES) meets a v2 creation: it parks the product as a dead
 * letter whose reason says so (the next event parked behind it), and goes on with the others.
 * Once the new cqrs-queryd runs, `cqrsctl dlq retry` applies what was parked and verify passes.
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
    testdb_create(&DB, "evolution");
    D.redis_db = 9;
    redisdb_url(getenv("CQRS_REDIS_URL"), 9, redis_url, sizeof redis_url);
    return daemons_start(&D);
}

static int teardown(void **state)
{
    (void)state;
    daemons_stop(&D);
    testdb_drop(&DB);
    return 0;
}

/* The answer's JSON when its status is want (else NULL; a failure when must). */
static json_t *request(int port, const char *method, const char *path, const char *body, int want,
                       bool must)
{
    httpc_response_t r;
    httpc_request(port, method, path, body ? "Content-Type: application/json\r\n" : NULL, body,
                  body ? strlen(body) : 0, &r);
    if (must && r.status != want)
        fail_msg("%s %s: %d %s", method, path, r.status, r.body);
    json_t *j = r.status == want ? json_loads(r.body, 0, NULL) : NULL;
    httpc_response_free(&r);
    return j;
}

static json_t *call(int port, const char *method, const char *path, const char *body, int want)
{
    return request(port, method, path, body, want, true);
}

/* cqrsctl with this run's settings: its exit status, and its stdout as JSON. */
#define ctl(out, ...) daemons_ctl(DB.dsn, redis_url, D.prefix, out, __VA_ARGS__)

/* The query side's document of a product once it reaches version; fails after 20 s. */
static json_t *doc_at(const char *id, long long version)
{
    char path[128];
    snprintf(path, sizeof path, "/v1/products/%s", id);
    for (int i = 0; i < 200; i++) {
        json_t *d = request(D.qport, "GET", path, NULL, 200, false);
        if (d && json_integer_value(json_object_get(d, "version")) >= version)
            return d;
        json_decref(d);
        usleep(100 * 1000);
    }
    fail_msg("product %s never reached version %lld on the query side", id, version);
    return NULL;
}

static void create(const char *sku, const char *weight, char id[40])
{
    char body[512];
    snprintf(body, sizeof body,
             "{\"sku\":\"%s\",\"name\":\"Kettle %s\",\"category\":\"kitchen\","
             "\"price_cents\":3999,\"currency\":\"EUR\",\"initial_stock\":5%s%s}",
             sku, sku, weight ? ",\"weight_grams\":" : "", weight ? weight : "");
    json_t *p = call(D.cport, "POST", "/v1/products", body, 201);
    snprintf(id, 40, "%s", json_string_value(json_object_get(p, "id")));
    json_decref(p);
}

/* A product as a cqrs-commandd from before product.created.v2 wrote it: its row (no weight),
 * its product.created.v1 event (v1's data) and the event's outbox row, in one transaction. */
static void create_as_v1_writer(const char *sku, char id[40])
{
    cqrs_uuid_v4(id);
    char sql[2048];
    snprintf(sql, sizeof sql,
             "WITH p AS (INSERT INTO products(id, sku, name, description, category, price_cents,"
             " currency, stock, status, units_sold, version, created_at, updated_at)"
             " VALUES ($1::uuid, '%s', 'Kettle %s', '', 'kitchen', 3999, 'EUR', 5, 'active', 0,"
             " 1, date_trunc('milliseconds', now()), date_trunc('milliseconds', now()))"
             " RETURNING id, created_at)"
             ", e AS (INSERT INTO events(event_id, aggregate_type, aggregate_id, version,"
             " event_type, occurred_at, data) SELECT gen_random_uuid(), 'product', id, 1,"
             " 'product.created.v1', created_at, jsonb_build_object('product_id', id, 'sku', '%s',"
             " 'name', 'Kettle %s', 'description', '', 'category', 'kitchen', 'price_cents', 3999,"
             " 'currency', 'EUR', 'initial_stock', 5) FROM p RETURNING sequence)"
             " INSERT INTO outbox(sequence, topic) SELECT sequence, '%s.product.events' FROM e"
             " RETURNING 0",
             sku, sku, sku, sku, D.prefix);
    assert_int_equal(pg_count(sql, id), 0);
    assert_int_equal(pg_count("SELECT count(*) FROM events WHERE aggregate_id = $1::uuid AND"
                              " event_type = 'product.created.v1'",
                              id),
                     1);
}

/* The creation of id is `type` in the event log (explain) and in Kafka (ce_type and
 * ce_dataschema of the message at the partition and offset explain names); explain says what
 * the projections read it as (read_as, absent when as written). */
static void assert_written_as(const char *id, const char *type, const char *read_as)
{
    json_t *x = NULL;
    assert_int_equal(ctl(&x, "explain %s --json", id), 0);
    json_t *e = json_array_get(json_object_get(x, "events"), 0);
    assert_string_equal(json_string_value(json_object_get(e, "type")), type);
    if (read_as)
        assert_string_equal(json_string_value(json_object_get(e, "read_as")), read_as);
    else
        assert_null(json_object_get(e, "read_as"));
    json_t *k = json_object_get(e, "kafka");
    char topic[128], schema[160];
    snprintf(topic, sizeof topic, "%s.product.events", D.prefix);
    snprintf(schema, sizeof schema, "urn:cqrs:event:%s", type);
    int32_t part = (int32_t)json_integer_value(json_object_get(k, "partition"));
    int64_t off = json_integer_value(json_object_get(k, "offset"));
    const char *brokers = getenv("CQRS_KAFKA_BROKERS");
    char *got = kafka_header_at(brokers, topic, part, off, "ce_type");
    char *ds = kafka_header_at(brokers, topic, part, off, "ce_dataschema");
    assert_non_null(got);
    assert_string_equal(got, type);
    assert_non_null(ds);
    assert_string_equal(ds, schema);
    free(got);
    free(ds);
    json_decref(x);
}

/* Every member but the ones that differ by construction (id, sku, name, times) is equal. */
static void assert_alike(json_t *a, json_t *b)
{
    static const char *const own[] = {"id", "sku", "name", "created_at", "updated_at"};
    assert_int_equal(json_object_size(a), json_object_size(b));
    const char *k;
    json_t *v;
    json_object_foreach(a, k, v)
    {
        bool skip = false;
        for (size_t i = 0; i < sizeof own / sizeof *own; i++)
            skip = skip || strcmp(k, own[i]) == 0;
        if (!skip && !json_equal(v, json_object_get(b, k)))
            fail_msg("member %s differs", k);
    }
}

static void test_mixed_versions_project_and_rebuild_alike(void **state)
{
    (void)state;
    char heavy[40], unknown[40], old[40];
    create("EVO-HEAVY", "1250", heavy);
    create("EVO-UNKNOWN", NULL, unknown);
    create_as_v1_writer("EVO-OLD", old);

    json_t *dh = doc_at(heavy, 1), *du = doc_at(unknown, 1), *dold = doc_at(old, 1);
    assert_int_equal(json_integer_value(json_object_get(dh, "weight_grams")), 1250);
    assert_true(json_is_null(json_object_get(du, "weight_grams")));
    /* v1, brought up to v2: weight unknown, the rest as a v2 product made without a weight */
    assert_true(json_is_null(json_object_get(dold, "weight_grams")));
    assert_alike(dold, du);
    /* the log and the topic hold both versions, as written */
    assert_written_as(old, "product.created.v1", "product.created.v2");
    assert_written_as(heavy, "product.created.v2", NULL);
    assert_int_equal(ctl(NULL, "verify --json"), 0);

    /* the same documents from the log, rebuilt */
    assert_int_equal(ctl(NULL, "rebuild"), 0);
    const char *ids[] = {heavy, unknown, old};
    json_t *before[] = {dh, du, dold};
    for (size_t i = 0; i < 3; i++) {
        json_t *after = doc_at(ids[i], 1);
        if (!json_equal(before[i], after)) {
            char *a = json_dumps(before[i], JSON_SORT_KEYS), *b = json_dumps(after, JSON_SORT_KEYS);
            fail_msg("rebuilt document of %s differs:\n before %s\n after  %s", ids[i], a, b);
        }
        json_decref(after);
        json_decref(before[i]);
    }
    assert_int_equal(ctl(NULL, "verify --json"), 0);
}

static void test_rolling_deployment_parks_then_retry_applies(void **state)
{
    (void)state;
#ifndef CQRS_ENABLE_FAILPOINTS
    skip(); /* the old reader is played by a failpoint build's switch */
#endif
    /* the old reader: does not know product.created.v2 */
    assert_int_equal(daemons_stop_one(&D.queryd), 0);
    D.qport = free_port();
    D.queryd = daemons_spawn_queryd_env(
        &D, D.qport, NULL, "CQRS_TEST_UNKNOWN_EVENT_TYPES=product.created.v2", "queryd-old");
    assert_true(D.queryd > 0);
    char id[40], other[40];
    create("EVO-ROLL", "800", id);
    char path[128];
    snprintf(path, sizeof path, "/v1/products/%s/stock-adjustments", id);
    json_decref(call(D.cport, "POST", path, "{\"delta\":2,\"reason\":\"rolling\"}", 200));
    json_t *l = NULL;
    json_t *a = NULL;
    for (int i = 0; i < 200 && !a; i++) {
        json_decref(l);
        assert_int_equal(ctl(&l, "dlq list --json"), 0);
        a = json_array_get(json_object_get(l, "aggregates"), 0);
        if (a && json_integer_value(json_object_get(a, "count")) < 2)
            a = NULL; /* the creation parked, its next event not yet behind it */
        if (!a)
            usleep(100 * 1000);
    }
    if (!a) {
        char *text = json_dumps(l, 0);
        fail_msg("the old reader parked nothing: dlq list says %s", text ? text : "(no JSON)");
    }
    assert_string_equal(json_string_value(json_object_get(a, "aggregate_id")), id);
    assert_string_equal(json_string_value(json_object_get(a, "type")), "product.created.v2");
    const char *reason = json_string_value(json_object_get(a, "reason"));
    if (!reason || !strstr(reason, "product.created.v2 is unknown to this build"))
        fail_msg("reason: %s", reason ? reason : "(none)");
    json_decref(l);
    /* the others go on meanwhile: a v1-era product is still projected */
    create_as_v1_writer("EVO-ROLL-OLD", other);
    json_decref(doc_at(other, 1));
    snprintf(path, sizeof path, "/v1/products/%s", id);
    json_t *none = call(D.qport, "GET", path, NULL, 404);
    json_decref(none);

    /* the upgrade: the new reader, then the parked events retried */
    assert_int_equal(daemons_stop_one(&D.queryd), 0);
    D.qport = free_port();
    D.queryd = daemons_spawn_queryd(&D, D.qport, NULL, "queryd-new");
    assert_true(D.queryd > 0);
    assert_int_equal(ctl(&l, "dlq retry %s --json", id), 0);
    json_decref(l);
    json_t *d = doc_at(id, 2);
    assert_int_equal(json_integer_value(json_object_get(d, "weight_grams")), 800);
    assert_int_equal(json_integer_value(json_object_get(d, "stock")), 7);
    json_decref(d);
    assert_int_equal(ctl(&l, "dlq list --json"), 0);
    assert_int_equal(json_array_size(json_object_get(l, "aggregates")), 0);
    json_decref(l);
    assert_int_equal(ctl(NULL, "verify --json"), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mixed_versions_project_and_rebuild_alike),
        cmocka_unit_test(test_rolling_deployment_parks_then_retry_applies),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
