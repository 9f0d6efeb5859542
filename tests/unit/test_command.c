/* Unit tests of the pure parts of the command pipeline (libcqrs command.c), of the order and
 * product validations and of the order's money decision (services/command). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "command.h"

static void test_if_match(void **state)
{
    (void)state;
    int64_t v = -5;
    assert_true(cqrs_if_match_parse("\"3\"", &v));
    assert_int_equal(v, 3);
    assert_true(cqrs_if_match_parse("*", &v));
    assert_int_equal(v, CQRS_IF_MATCH_ANY);
    assert_true(cqrs_if_match_parse(" \"12\" ", &v));
    assert_int_equal(v, 12);
    const char *bad[] = {"3",    "\"0\"", "\"-1\"", "W/\"3\"",      "\"3",
                         "\"\"", "\"a\"", "",       "\"1\", \"2\"", "\"99999999999999999999\""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_false(cqrs_if_match_parse(bad[i], &v));
}

static void test_idempotency_key(void **state)
{
    (void)state;
    char k[300];
    assert_true(cqrs_idempotency_key_valid("a"));
    assert_true(cqrs_idempotency_key_valid("8e03978e-40d5-43e8-bc93-6894a57f9324"));
    memset(k, 'k', 255);
    k[255] = '\0';
    assert_true(cqrs_idempotency_key_valid(k));
    k[255] = 'k';
    k[256] = '\0';
    assert_false(cqrs_idempotency_key_valid(k));
    assert_false(cqrs_idempotency_key_valid(""));
    assert_false(cqrs_idempotency_key_valid("tab\there"));
    assert_false(cqrs_idempotency_key_valid("caf\xc3\xa9"));
}

static int validate_order(const char *text, place_order_input_t *in, json_t **errors)
{
    domain_limits_t l;
    domain_limits_default(&l);
    json_t *body = json_loads(text, 0, NULL);
    assert_non_null(body);
    cqrs_violations_t v;
    cqrs_violations_init(&v);
    bool ok = order_validate_place(body, &l, in, &v);
    int status = ok ? 0 : v.status;
    *errors = json_incref(v.errors);
    cqrs_violations_close(&v);
    json_decref(body);
    return status;
}

static bool names(json_t *errors, const char *field)
{
    size_t i;
    json_t *e;
    json_array_foreach(errors, i, e)
    {
        if (strcmp(json_string_value(json_object_get(e, "field")), field) == 0)
            return true;
    }
    return false;
}

static void test_order_lines_sorted_and_checked(void **state)
{
    (void)state;
    place_order_input_t *in = malloc(sizeof *in);
    json_t *errors;
    assert_int_equal(validate_order("{\"customer_id\":\"6F9619FF-8B86-4011-B42D-00C04FC964FF\","
                                    "\"items\":[{\"product_id\":\"bbbbbbbb-0000-4000-8000-"
                                    "000000000000\",\"quantity\":2},{\"product_id\":\"aaaaaaaa-"
                                    "0000-4000-8000-000000000000\",\"quantity\":1}]}",
                                    in, &errors),
                     0);
    json_decref(errors);
    assert_int_equal(in->n, 2);
    /* lock order: by product id; the request position is kept for the document */
    assert_string_equal(in->lines[0].product_id, "aaaaaaaa-0000-4000-8000-000000000000");
    assert_int_equal(in->lines[0].index, 1);
    assert_int_equal(in->lines[1].quantity, 2);
    assert_string_equal(in->customer_id, "6f9619ff-8b86-4011-b42d-00c04fc964ff");

    assert_int_equal(validate_order("{\"customer_id\":\"6f9619ff-8b86-4011-b42d-00c04fc964ff\","
                                    "\"items\":[{\"product_id\":\"AAAAAAAA-0000-4000-8000-"
                                    "000000000000\",\"quantity\":2},{\"product_id\":\"aaaaaaaa-"
                                    "0000-4000-8000-000000000000\",\"quantity\":1}]}",
                                    in, &errors),
                     422);
    assert_true(names(errors, "items[1].product_id") || names(errors, "items[0].product_id"));
    json_decref(errors);

    assert_int_equal(validate_order("{\"customer_id\":\"x\",\"items\":[{\"quantity\":0,\"sku\":"
                                    "\"s\"}]}",
                                    in, &errors),
                     400);
    assert_true(names(errors, "customer_id"));
    assert_true(names(errors, "items[0].product_id"));
    assert_true(names(errors, "items[0].quantity"));
    assert_true(names(errors, "items[0].sku"));
    json_decref(errors);
    free(in);
}

static void test_update_details_needs_a_field(void **state)
{
    (void)state;
    domain_limits_t l;
    domain_limits_default(&l);
    json_t *body = json_loads("{}", 0, NULL);
    cqrs_violations_t v;
    cqrs_violations_init(&v);
    update_details_input_t in;
    assert_false(product_validate_update_details(body, &l, &in, &v));
    assert_int_equal(v.status, 422);
    cqrs_violations_close(&v);
    json_decref(body);

    body = json_loads("{\"description\":\"\"}", 0, NULL);
    cqrs_violations_init(&v);
    assert_true(product_validate_update_details(body, &l, &in, &v));
    assert_string_equal(in.description, "");
    assert_null(in.name);
    cqrs_violations_close(&v);
    json_decref(body);
}

static void test_adjust_stock_delta(void **state)
{
    (void)state;
    domain_limits_t l;
    domain_limits_default(&l);
    l.stock_max = 100; /* limits are configurable */
    const char *cases[] = {"{\"delta\":0,\"reason\":\"\"}", "{\"delta\":101,\"reason\":\"\"}",
                           "{\"delta\":-101,\"reason\":\"\"}"};
    for (size_t i = 0; i < 3; i++) {
        json_t *body = json_loads(cases[i], 0, NULL);
        cqrs_violations_t v;
        cqrs_violations_init(&v);
        adjust_stock_input_t in;
        assert_false(product_validate_adjust_stock(body, &l, &in, &v));
        assert_int_equal(v.status, 422);
        cqrs_violations_close(&v);
        json_decref(body);
    }
}

/* The widest settings cqrs-commandd accepts: one line of 10^6 at 10^12 cents is 10^18 cents,
 * nine fit int64 (2^63 - 1 ≈ 9.22e18), ten do not. Unchecked, 19 lines wrapped to a positive
 * 553255926290448384 and 10 to a negative total. */
static void test_order_total_out_of_range(void **state)
{
    (void)state;
    domain_limits_t l;
    domain_limits_default(&l);
    l.price_max = 1000000000000;
    l.quantity_max = 1000000;
    l.order_lines_max = ORDER_LINES_CAP;
    json_t *items = json_array();
    for (int i = 0; i < 19; i++) {
        char id[CQRS_UUID_LEN + 1];
        cqrs_uuid_v4(id);
        json_array_append_new(items, json_pack("{s:s, s:I}", "product_id", id, "quantity",
                                               (json_int_t)l.quantity_max));
    }
    json_t *body = json_pack("{s:s, s:o}", "customer_id", "6f9619ff-8b86-4011-b42d-00c04fc964ff",
                             "items", items);
    place_order_input_t *in = malloc(sizeof *in);
    cqrs_violations_t v;
    cqrs_violations_init(&v);
    assert_true(order_validate_place(body, &l, in, &v)); /* every line is within its limits */
    cqrs_violations_close(&v);
    assert_int_equal(in->n, 19);

    int64_t prices[ORDER_LINES_CAP], line_totals[ORDER_LINES_CAP], total = -1;
    for (size_t i = 0; i < in->n; i++)
        prices[i] = l.price_max;
    assert_false(order_price(in, prices, line_totals, &total));
    assert_int_equal(total, -1); /* untouched */
    in->n = 10;
    assert_false(order_price(in, prices, line_totals, &total));
    assert_int_equal(total, -1);
    in->n = 9;
    assert_true(order_price(in, prices, line_totals, &total));
    assert_int_equal(total, 9000000000000000000LL);
    for (size_t i = 0; i < in->n; i++)
        assert_int_equal(line_totals[i], 1000000000000000000LL);

    /* Exactly INT64_MAX is an amount; one cent more is not, nor is one line that overflows
     * alone. */
    in->n = 2;
    in->lines[0].quantity = 1;
    in->lines[1].quantity = 1;
    prices[0] = INT64_MAX - 1;
    prices[1] = 1;
    assert_true(order_price(in, prices, line_totals, &total));
    assert_int_equal(total, INT64_MAX);
    prices[1] = 2;
    total = -1;
    assert_false(order_price(in, prices, line_totals, &total));
    assert_int_equal(total, -1);
    in->n = 1;
    in->lines[0].quantity = 3;
    prices[0] = INT64_MAX / 2;
    assert_false(order_price(in, prices, line_totals, &total));
    free(in);
    json_decref(body);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_if_match),
        cmocka_unit_test(test_idempotency_key),
        cmocka_unit_test(test_order_lines_sorted_and_checked),
        cmocka_unit_test(test_update_details_needs_a_field),
        cmocka_unit_test(test_adjust_stock_delta),
        cmocka_unit_test(test_order_total_out_of_range),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
