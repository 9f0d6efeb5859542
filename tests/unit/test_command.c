/* Unit tests of the pure parts of the command pipeline (libcqrs command.c) and of the order
 * and product validations (services/command). */
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_if_match),
        cmocka_unit_test(test_idempotency_key),
        cmocka_unit_test(test_order_lines_sorted_and_checked),
        cmocka_unit_test(test_update_details_needs_a_field),
        cmocka_unit_test(test_adjust_stock_delta),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
