/* End-to-end: the real daemons against the real stack. cqrsctl migrates; cqrs-commandd takes
 * a CreateProduct; its event travels PostgreSQL → outbox → Kafka → cqrs-queryd → Redis; the
 * query API serves the same product at version 1. Bad input writes nothing. SIGTERM stops
 * both daemons with exit status 0.
 *
 * Each run uses its own topic prefix and consumer group, so runs never see each other. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>
#include <libpq-fe.h>

#include <cqrs/util.h>

#include "daemons.h"
#include "httpc.h"
#include "testenv.h"

static daemons_t D;
#define cport D.cport
#define qport D.qport
#define prefix D.prefix

static void dump_logs(void)
{
    daemons_dump_logs(&D);
}

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
    return 0;
}

static const char *TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

static void test_created_product_is_served_by_the_query_side(void **state)
{
    (void)state;
    char sku[40], body[512];
    snprintf(sku, sizeof sku, "E2E-%s", prefix);
    snprintf(body, sizeof body,
             "{\"sku\":\"%s\",\"name\":\"Crème brûlée torch\",\"description\":\"Hot.\","
             "\"category\":\"kitchen\",\"price_cents\":2499,\"currency\":\"EUR\","
             "\"initial_stock\":25}",
             sku);
    char headers[160];
    snprintf(headers, sizeof headers, "Content-Type: application/json\r\ntraceparent: %s\r\n",
             TRACEPARENT);
    httpc_response_t r;
    assert_int_equal(httpc_request(cport, "POST", "/v1/products", headers, body, strlen(body), &r),
                     0);
    if (r.status != 201)
        fail_msg("POST /v1/products: %d %s", r.status, r.body);
    json_t *created = json_loads(r.body, 0, NULL);
    const char *id = json_string_value(json_object_get(created, "id"));
    assert_true(cqrs_uuid_valid(id));
    assert_int_equal(json_integer_value(json_object_get(created, "version")), 1);
    char loc[96], etag[16], want_loc[96];
    assert_int_equal(httpc_header(&r, "Location", loc, sizeof loc), 0);
    snprintf(want_loc, sizeof want_loc, "/v1/products/%s", id);
    assert_string_equal(loc, want_loc);
    assert_int_equal(httpc_header(&r, "ETag", etag, sizeof etag), 0);
    assert_string_equal(etag, "\"1\"");
    httpc_response_free(&r);

    /* The event carries the caller's trace context. */
    assert_int_equal(pg_count("SELECT count(*) FROM events WHERE aggregate_id = $1::uuid"
                              " AND version = 1 AND traceparent = '"
                              "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'",
                              id),
                     1);

    /* Eventually consistent: poll the query side (bounded wait, not a timing assertion). */
    json_t *doc = NULL;
    for (int i = 0; i < 600 && !doc; i++) {
        httpc_response_t g;
        httpc_request(qport, "GET", loc, NULL, NULL, 0, &g);
        if (g.status == 200) {
            doc = json_loads(g.body, 0, NULL);
            assert_int_equal(httpc_header(&g, "ETag", etag, sizeof etag), 0);
            assert_string_equal(etag, "\"1\"");
        } else {
            assert_int_equal(g.status, 404);
            usleep(100 * 1000);
        }
        httpc_response_free(&g);
    }
    if (!doc) {
        dump_logs();
        fail_msg("the product never appeared on the query side");
    }
    assert_string_equal(json_string_value(json_object_get(doc, "id")), id);
    assert_string_equal(json_string_value(json_object_get(doc, "sku")), sku);
    assert_string_equal(json_string_value(json_object_get(doc, "name")), "Crème brûlée torch");
    assert_string_equal(json_string_value(json_object_get(doc, "description")), "Hot.");
    assert_string_equal(json_string_value(json_object_get(doc, "category")), "kitchen");
    assert_int_equal(json_integer_value(json_object_get(doc, "price_cents")), 2499);
    assert_string_equal(json_string_value(json_object_get(doc, "currency")), "EUR");
    assert_int_equal(json_integer_value(json_object_get(doc, "stock")), 25);
    assert_string_equal(json_string_value(json_object_get(doc, "status")), "active");
    assert_int_equal(json_integer_value(json_object_get(doc, "units_sold")), 0);
    assert_int_equal(json_integer_value(json_object_get(doc, "version")), 1);
    /* Timestamps are the event's, identical on both sides. */
    assert_string_equal(json_string_value(json_object_get(doc, "created_at")),
                        json_string_value(json_object_get(created, "created_at")));
    assert_string_equal(json_string_value(json_object_get(doc, "updated_at")),
                        json_string_value(json_object_get(created, "created_at")));
    json_decref(doc);

    /* Conditional read */
    httpc_response_t c;
    httpc_request(qport, "GET", loc, "If-None-Match: \"1\"\r\n", NULL, 0, &c);
    assert_int_equal(c.status, 304);
    httpc_response_free(&c);

    /* The outbox row is gone once Kafka acknowledged it. */
    assert_int_equal(pg_count("SELECT count(*) FROM outbox o JOIN events e USING (sequence)"
                              " WHERE e.aggregate_id = $1::uuid",
                              id),
                     0);

    /* The same sku again is a business conflict. */
    httpc_request(cport, "POST", "/v1/products", "Content-Type: application/json\r\n", body,
                  strlen(body), &c);
    assert_int_equal(c.status, 409);
    json_t *p = json_loads(c.body, 0, NULL);
    assert_string_equal(json_string_value(json_object_get(p, "type")),
                        "urn:cqrs:problem:duplicate-sku");
    json_decref(p);
    httpc_response_free(&c);
    json_decref(created);
}

static void test_bad_input_writes_nothing(void **state)
{
    (void)state;
    long long events_before = pg_count("SELECT count(*) FROM events", NULL);
    long long products_before = pg_count("SELECT count(*) FROM products", NULL);
    struct {
        const char *headers, *body;
        int status;
    } cases[] = {
        {"Content-Type: application/json\r\n",
         "{\"sku\":\"BAD-1\",\"name\":\"\",\"category\":\"c\",\"price_cents\":1,"
         "\"currency\":\"EUR\",\"initial_stock\":1}",
         422},
        {"Content-Type: application/json\r\n",
         "{\"sku\":\"BAD-2\",\"name\":\"n\",\"category\":\"c\",\"price_cents\":1,"
         "\"currency\":\"EUR\",\"initial_stock\":1,\"version\":5}",
         422},
        {"Content-Type: application/json\r\n", "{\"sku\":\"BAD-3\",", 400},
        {"Content-Type: application/json\r\n", "", 400},
        {"Content-Type: text/plain\r\n", "{}", 415},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        httpc_response_t r;
        httpc_request(cport, "POST", "/v1/products", cases[i].headers, cases[i].body,
                      strlen(cases[i].body), &r);
        if (r.status != cases[i].status)
            fail_msg("case %zu: expected %d, got %d %s", i, cases[i].status, r.status, r.body);
        char ct[64];
        assert_int_equal(httpc_header(&r, "Content-Type", ct, sizeof ct), 0);
        assert_string_equal(ct, "application/problem+json");
        httpc_response_free(&r);
    }
    assert_int_equal(pg_count("SELECT count(*) FROM events", NULL), events_before);
    assert_int_equal(pg_count("SELECT count(*) FROM products", NULL), products_before);
}

static void test_query_side_errors(void **state)
{
    (void)state;
    httpc_response_t r;
    httpc_request(qport, "GET", "/v1/products/6f9619ff-8b86-4011-b42d-00c04fc964ff", NULL, NULL, 0,
                  &r);
    assert_int_equal(r.status, 404);
    httpc_response_free(&r);
    httpc_request(qport, "GET", "/v1/products/not-a-uuid", NULL, NULL, 0, &r);
    assert_int_equal(r.status, 400);
    httpc_response_free(&r);
    httpc_request(qport, "GET", "/v1/products/6f9619ff-8b86-4011-b42d-00c04fc964ff?x=1", NULL, NULL,
                  0, &r);
    assert_int_equal(r.status, 400);
    httpc_response_free(&r);
    httpc_request(qport, "DELETE", "/v1/products/6f9619ff-8b86-4011-b42d-00c04fc964ff", NULL, NULL,
                  0, &r);
    assert_int_equal(r.status, 405);
    httpc_response_free(&r);
}

static void test_sigterm_exits_cleanly(void **state)
{
    (void)state;
    int c = daemons_stop_one(&D.commandd), q = daemons_stop_one(&D.queryd);
    if (c != 0 || q != 0)
        dump_logs();
    assert_int_equal(c, 0);
    assert_int_equal(q, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_created_product_is_served_by_the_query_side),
        cmocka_unit_test(test_bad_input_writes_nothing),
        cmocka_unit_test(test_query_side_errors),
        cmocka_unit_test(test_sigterm_exits_cleanly),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
