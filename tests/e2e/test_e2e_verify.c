/* End-to-end test of `cqrsctl verify`, in a PostgreSQL database and a Redis database of its
 * own: after a workload the read model matches the write model (exit 0); then each kind of
 * drift is injected into Redis — a missing document, a wrong field, a wrong version, a stray
 * list entry — and verify exits 1 naming each kind with the right ids. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include <cqrs/util.h>

#include "daemons.h"
#include "httpc.h"
#include "redisdb.h"
#include "testenv.h"

static daemons_t D;
static testdb_t DB;
static char redis_url[1024];
static char ids[20][40];

static int setup(void **state)
{
    (void)state;
    testenv_require_stack();
    testdb_create(&DB, "verify");
    D.redis_db = 12;
    redisdb_url(getenv("CQRS_REDIS_URL"), 12, redis_url, sizeof redis_url);
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

/* Runs cqrsctl verify --json; returns its exit status and the parsed report. */
static int verify(json_t **report)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "CQRS_PG_DSN='%s' CQRS_REDIS_URL='%s' CQRS_TOPIC_PREFIX='%s' %s verify --json", DB.dsn,
             redis_url, D.prefix, CQRS_CTL);
    FILE *p = popen(cmd, "r");
    static char buf[65536];
    size_t n = fread(buf, 1, sizeof buf - 1, p);
    buf[n] = '\0';
    int st = pclose(p);
    *report = json_loads(buf, 0, NULL);
    return WEXITSTATUS(st);
}

static json_t *kind(json_t *report, const char *name)
{
    size_t i;
    json_t *k;
    json_array_foreach(json_object_get(report, "drift"), i, k)
    {
        if (strcmp(json_string_value(json_object_get(k, "kind")), name) == 0)
            return k;
    }
    return NULL;
}

static bool names(json_t *k, const char *what)
{
    size_t i;
    json_t *v;
    json_array_foreach(json_object_get(k, "first"), i, v)
    {
        if (strstr(json_string_value(v), what))
            return true;
    }
    return false;
}

static void test_verify_after_workload_and_drift(void **state)
{
    (void)state;
    char body[512], path[128];
    for (int i = 0; i < 20; i++) {
        char id[37];
        cqrs_uuid_v4(id);
        snprintf(body, sizeof body,
                 "{\"sku\":\"V-%.8s\",\"name\":\"Verify %d\",\"category\":\"v%d\","
                 "\"price_cents\":%d,\"currency\":\"EUR\",\"initial_stock\":50}",
                 id, i, i % 3, 100 + i);
        json_t *p = call("POST", "/v1/products", body, 201);
        snprintf(ids[i], sizeof ids[i], "%s", json_string_value(json_object_get(p, "id")));
        json_decref(p);
    }
    for (int k = 0; k < 3; k++) {
        snprintf(
            body, sizeof body,
            "{\"customer_id\":\"6f9619ff-8b86-4011-b42d-00c04fc964ff\",\"items\":["
            "{\"product_id\":\"%.36s\",\"quantity\":2},{\"product_id\":\"%.36s\",\"quantity\":1}]}",
            ids[k], ids[k + 5]);
        json_t *o = call("POST", "/v1/orders", body, 201);
        if (k == 2) {
            snprintf(path, sizeof path, "/v1/orders/%.36s/cancel",
                     json_string_value(json_object_get(o, "id")));
            json_decref(call("POST", path, NULL, 200));
        }
        json_decref(o);
    }
    snprintf(path, sizeof path, "/v1/products/%.36s/discontinue", ids[9]);
    json_decref(call("POST", path, NULL, 200));

    json_t *report = NULL;
    int st = 1;
    for (int t = 0; t < 120 && st != 0; t++) {
        json_decref(report);
        st = verify(&report);
        if (st != 0)
            usleep(250 * 1000);
    }
    if (st != 0) {
        char *text = json_dumps(report, 0);
        fail_msg("verify after the workload: exit %d %s", st, text);
    }
    assert_true(json_is_true(json_object_get(report, "match")));
    assert_int_equal(json_integer_value(json_object_get(report, "products")), 20);
    assert_int_equal(json_integer_value(json_object_get(report, "orders")), 3);
    json_decref(report);

    /* drift, one kind per product */
    char cmd[CQRS_KEY_MAX + 16], key[CQRS_KEY_MAX];
    assert_int_equal(redisdb_doc_key(redis_url, D.prefix, "product", ids[11], key, sizeof key), 0);
    snprintf(cmd, sizeof cmd, "DEL %s", key);
    freeReplyObject(redisdb_cmd(redis_url, cmd, NULL));
    assert_int_equal(redisdb_doc_key(redis_url, D.prefix, "product", ids[12], cmd, sizeof cmd), 0);
    redisReply *r = redisdb_cmd(redis_url, "HGET %s json", cmd);
    json_t *doc = json_loads(r->str, 0, NULL);
    freeReplyObject(r);
    json_object_set_new(doc, "name", json_string("tampered"));
    char *text = json_dumps(doc, JSON_COMPACT);
    char hset[CQRS_KEY_MAX + 32];
    snprintf(hset, sizeof hset, "HSET %s json %%s", cmd);
    freeReplyObject(redisdb_cmd(redis_url, hset, text));
    free(text);
    json_decref(doc);
    assert_int_equal(redisdb_doc_key(redis_url, D.prefix, "product", ids[13], cmd, sizeof cmd), 0);
    r = redisdb_cmd(redis_url, "HGET %s json", cmd);
    doc = json_loads(r->str, 0, NULL);
    freeReplyObject(r);
    json_object_set_new(doc, "version", json_integer(99));
    text = json_dumps(doc, JSON_COMPACT);
    snprintf(hset, sizeof hset, "HSET %s json %%s", cmd);
    freeReplyObject(redisdb_cmd(redis_url, hset, text));
    free(text);
    json_decref(doc);
    /* a stray entry in the list of the shard product 0 lives in */
    char shard[CQRS_SHARD_MAX], list[CQRS_KEY_MAX], zadd[CQRS_KEY_MAX + 32];
    assert_int_equal(redisdb_shard(redis_url, D.prefix, "product", ids[0], shard, sizeof shard), 0);
    snprintf(list, sizeof list, "%sidx:p:name:active", shard);
    snprintf(zadd, sizeof zadd, "ZADD %s 0 %%s", list);
    freeReplyObject(redisdb_cmd(redis_url, zadd,
                                "stray\x01"
                                "00000000-0000-4000-8000-000000000000"));
    /* and a missing one: the first member of another list of that shard */
    char other[CQRS_KEY_MAX], zpop[CQRS_KEY_MAX + 16];
    snprintf(other, sizeof other, "%sidx:p:-updated:active", shard);
    snprintf(zpop, sizeof zpop, "ZPOPMIN %s", other);
    freeReplyObject(redisdb_cmd(redis_url, zpop, NULL));

    assert_int_equal(verify(&report), 1);
    assert_false(json_is_true(json_object_get(report, "match")));
    json_t *k;
    assert_non_null(k = kind(report, "missing document"));
    assert_true(names(k, ids[11]));
    assert_non_null(k = kind(report, "wrong fields"));
    assert_true(names(k, ids[12]));
    assert_non_null(k = kind(report, "wrong version"));
    assert_true(names(k, ids[13]));
    assert_non_null(k = kind(report, "index size differs (stray or missing entries)"));
    assert_true(names(k, list));
    assert_true(names(k, other));
    assert_non_null(kind(report, "missing index entry"));
    json_decref(report);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_verify_after_workload_and_drift),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
