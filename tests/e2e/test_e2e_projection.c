/* End-to-end tests of the projections through both daemons:
 *  - products and orders created, changed, ordered and cancelled: every document on the query
 *    side equals, field by field, the last answer of the command side;
 *  - the applied offsets moved backwards (redelivery of everything): no document changes, the
 *    duplicates are counted;
 *  - two projector instances share the partitions and give the same result as one. */
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

#define N_PRODUCTS 12

/* What the command side last answered for each aggregate. */
typedef struct expected {
    char path[96];
    json_t *doc;
} expected_t;

static expected_t products[N_PRODUCTS], orders[4];
static size_t n_orders;

static int setup(void **state)
{
    (void)state;
    testenv_require_stack();
    return daemons_start(&D);
}

static int teardown(void **state)
{
    (void)state;
    daemons_stop(&D);
    for (int i = 0; i < N_PRODUCTS; i++)
        json_decref(products[i].doc);
    for (size_t i = 0; i < n_orders; i++)
        json_decref(orders[i].doc);
    return 0;
}

static json_t *command(const char *method, const char *path, const char *body, int want)
{
    httpc_response_t r;
    httpc_request(D.cport, method, path, "Content-Type: application/json\r\n", body,
                  body ? strlen(body) : 0, &r);
    if (r.status != want) {
        fprintf(stderr, "%s %s: %d %s\n", method, path, r.status, r.body ? r.body : "");
        fail_msg("unexpected status %d", r.status);
    }
    json_t *j = json_loads(r.body, 0, NULL);
    httpc_response_free(&r);
    return j;
}

static void remember(expected_t *e, const char *collection, json_t *doc)
{
    json_decref(e->doc);
    e->doc = doc;
    snprintf(e->path, sizeof e->path, "/v1/%s/%s", collection,
             json_string_value(json_object_get(doc, "id")));
}

/* Waits until every document on a query instance equals what the command side answered. */
static void expect_documents(int port)
{
    expected_t *all[N_PRODUCTS + 4];
    size_t n = 0;
    for (int i = 0; i < N_PRODUCTS; i++)
        all[n++] = &products[i];
    for (size_t i = 0; i < n_orders; i++)
        all[n++] = &orders[i];
    for (size_t i = 0; i < n; i++) {
        json_t *got = NULL;
        for (int t = 0; t < 600; t++) {
            httpc_response_t r;
            httpc_request(port, "GET", all[i]->path, NULL, NULL, 0, &r);
            json_decref(got);
            got = r.status == 200 ? json_loads(r.body, 0, NULL) : NULL;
            httpc_response_free(&r);
            if (got && json_equal(got, all[i]->doc))
                break;
            usleep(100 * 1000);
        }
        if (!got || !json_equal(got, all[i]->doc)) {
            char *a = got ? json_dumps(got, JSON_SORT_KEYS) : strdup("(none)");
            char *b = json_dumps(all[i]->doc, JSON_SORT_KEYS);
            daemons_dump_logs(&D);
            fail_msg("%s differs:\n query:   %s\n command: %s", all[i]->path, a, b);
        }
        json_decref(got);
    }
}

static long long metric(int port, const char *name)
{
    httpc_response_t r;
    httpc_request(port, "GET", "/metrics", NULL, NULL, 0, &r);
    long long v = -1;
    for (char *line = r.body; line && *line;
         line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        if (strncmp(line, name, strlen(name)) == 0 && line[strlen(name)] == ' ') {
            v = atoll(line + strlen(name) + 1);
            break;
        }
    }
    httpc_response_free(&r);
    return v;
}

static void test_every_document_matches_the_write_model(void **state)
{
    (void)state;
    char body[512], path[128];
    for (int i = 0; i < N_PRODUCTS; i++) {
        char id[37];
        cqrs_uuid_v4(id);
        snprintf(body, sizeof body,
                 "{\"sku\":\"P-%.8s\",\"name\":\"Product %d\",\"description\":\"d\","
                 "\"category\":\"c%d\",\"price_cents\":%d,\"currency\":\"EUR\","
                 "\"initial_stock\":100}",
                 id, i, i % 3, 100 + i);
        remember(&products[i], "products", command("POST", "/v1/products", body, 201));
    }
    /* every kind of product change */
    char p0[40]; /* copied: remember() frees the document it came from */
    snprintf(p0, sizeof p0, "%s", json_string_value(json_object_get(products[0].doc, "id")));
    snprintf(path, sizeof path, "/v1/products/%s", p0);
    remember(&products[0], "products",
             command("PATCH", path, "{\"name\":\"Renamed\",\"category\":\"new\"}", 200));
    snprintf(path, sizeof path, "/v1/products/%s/price", p0);
    remember(&products[0], "products", command("PUT", path, "{\"price_cents\":555}", 200));
    snprintf(path, sizeof path, "/v1/products/%s/stock-adjustments", p0);
    remember(&products[0], "products",
             command("POST", path, "{\"delta\":-7,\"reason\":\"damaged\"}", 200));
    /* orders: one placed, one cancelled, across several products */
    for (int k = 0; k < 2; k++) {
        snprintf(body, sizeof body,
                 "{\"customer_id\":\"6f9619ff-8b86-4011-b42d-00c04fc964ff\",\"items\":["
                 "{\"product_id\":\"%s\",\"quantity\":%d},{\"product_id\":\"%s\",\"quantity\":3}]}",
                 json_string_value(json_object_get(products[1 + k].doc, "id")), 2 + k,
                 json_string_value(json_object_get(products[5].doc, "id")));
        remember(&orders[n_orders++], "orders", command("POST", "/v1/orders", body, 201));
    }
    snprintf(path, sizeof path, "%.96s/cancel", orders[1].path);
    remember(&orders[1], "orders", command("POST", path, NULL, 200));
    snprintf(path, sizeof path, "/v1/products/%s/discontinue",
             json_string_value(json_object_get(products[3].doc, "id")));
    remember(&products[3], "products", command("POST", path, NULL, 200));
    /* The products touched by orders: read their final state from the command side by a
     * no-op-free change (price set to itself bumps the version and returns the product). */
    int touched[] = {1, 2, 5};
    for (int t = 0; t < 3; t++) {
        expected_t *e = &products[touched[t]];
        snprintf(path, sizeof path, "%.96s/price", e->path);
        snprintf(body, sizeof body, "{\"price_cents\":%lld}",
                 (long long)json_integer_value(json_object_get(e->doc, "price_cents")));
        remember(e, "products", command("PUT", path, body, 200));
    }
    assert_int_equal(json_integer_value(json_object_get(products[5].doc, "units_sold")), 3);
    assert_int_equal(json_integer_value(json_object_get(products[5].doc, "stock")), 97);
    expect_documents(D.qport);
}

static void test_redelivery_changes_nothing(void **state)
{
    (void)state;
    assert_int_equal(daemons_stop_one(&D.queryd), 0);
    char url[1024], key[CQRS_KEY_MAX + 8], pattern[320];
    const char *base = getenv("CQRS_REDIS_URL");
    assert_int_equal(redisdb_url(base, 0, url, sizeof url), 0);
    /* every shard's offsets of this run's topics */
    snprintf(pattern, sizeof pattern, "{cqrs:%s.*}:g*:" CQRS_SHARD_OFFSETS, D.prefix);
    redisReply *keys = redisdb_cmd(url, "KEYS %s", pattern);
    assert_non_null(keys);
    assert_true(keys->elements > 0);
    for (size_t i = 0; i < keys->elements; i++) {
        snprintf(key, sizeof key, "DEL %s", keys->element[i]->str);
        freeReplyObject(redisdb_cmd(url, key, NULL));
    }
    freeReplyObject(keys);
    D.queryd = daemons_spawn_queryd(&D, D.qport, NULL, "queryd");
    assert_true(D.queryd > 0);
    long long dups = 0;
    for (int i = 0; i < 600 && dups < N_PRODUCTS; i++) {
        dups = metric(D.qport, "cqrs_projector_duplicates_skipped_total");
        usleep(100 * 1000);
    }
    assert_true(dups >= N_PRODUCTS);
    assert_int_equal(metric(D.qport, "cqrs_projector_events_applied_total"), 0);
    expect_documents(D.qport);
}

static void test_two_projectors_share_the_work(void **state)
{
    (void)state;
    int port2 = free_port();
    pid_t second = daemons_spawn_queryd(&D, port2, "project", "queryd2");
    assert_true(second > 0);
    /* the group rebalances: both instances end up with partitions */
    for (int t = 0; t < 300; t++) {
        if (metric(port2, "cqrs_projector_partitions_assigned") > 0 &&
            metric(D.qport, "cqrs_projector_partitions_assigned") > 0)
            break;
        usleep(100 * 1000);
    }
    assert_true(metric(port2, "cqrs_projector_partitions_assigned") > 0);
    assert_true(metric(D.qport, "cqrs_projector_partitions_assigned") > 0);
    char path[160], body[96];
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < N_PRODUCTS; i++) {
            snprintf(path, sizeof path, "%.96s/stock-adjustments", products[i].path);
            snprintf(body, sizeof body, "{\"delta\":%d,\"reason\":\"round %d\"}", round + 1, round);
            remember(&products[i], "products", command("POST", path, body, 200));
        }
    }
    expect_documents(D.qport);
    long long a = metric(D.qport, "cqrs_projector_events_applied_total");
    long long b = metric(port2, "cqrs_projector_events_applied_total");
    /* both took part, and together they applied each new event once */
    assert_true(b > 0);
    assert_true(a + b >= 3 * N_PRODUCTS);
    assert_int_equal(metric(port2, "cqrs_projector_dead_letters_total"), 0);
    assert_int_equal(metric(D.qport, "cqrs_projector_dead_letters_total"), 0);
    assert_int_equal(daemons_stop_one(&second), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_document_matches_the_write_model),
        cmocka_unit_test(test_redelivery_changes_nothing),
        cmocka_unit_test(test_two_projectors_share_the_work),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
