/* Unit tests of the Product projection (services/query/product_view.c), pure. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "query.h"

static void created(cqrs_event_t *ev, int64_t version)
{
    cqrs_event_init(ev, "product.created.v1", "product", "6f9619ff-8b86-4011-b42d-00c04fc964ff",
                    version,
                    json_pack("{s:s,s:s,s:s,s:s,s:s,s:i,s:s,s:i}", "product_id",
                              "6f9619ff-8b86-4011-b42d-00c04fc964ff", "sku", "ABC-1", "name",
                              "Widget", "description", "", "category", "tools", "price_cents", 1299,
                              "currency", "EUR", "initial_stock", 10),
                    NULL);
}

static void test_created_builds_the_whole_document(void **state)
{
    (void)state;
    cqrs_event_t ev;
    created(&ev, 1);
    json_t *doc = NULL;
    cqrs_error_t err;
    assert_int_equal(product_view_apply(NULL, &ev, &doc, &err), CQRS_ERR_OK);
    static const char *const fields[] = {
        "id",    "sku",    "name",       "description", "category",   "price_cents", "currency",
        "stock", "status", "units_sold", "version",     "created_at", "updated_at"};
    assert_int_equal(json_object_size(doc), 13);
    for (size_t i = 0; i < 13; i++)
        assert_non_null(json_object_get(doc, fields[i]));
    assert_string_equal(json_string_value(json_object_get(doc, "id")), ev.aggregate_id);
    assert_int_equal(json_integer_value(json_object_get(doc, "stock")), 10);
    assert_string_equal(json_string_value(json_object_get(doc, "status")), "active");
    assert_int_equal(json_integer_value(json_object_get(doc, "units_sold")), 0);
    assert_int_equal(json_integer_value(json_object_get(doc, "version")), 1);
    assert_string_equal(json_string_value(json_object_get(doc, "created_at")), ev.time);
    assert_string_equal(json_string_value(json_object_get(doc, "updated_at")), ev.time);
    json_decref(doc);
    cqrs_event_close(&ev);
}

static void test_created_is_deterministic(void **state)
{
    (void)state;
    cqrs_event_t ev;
    created(&ev, 1);
    json_t *a = NULL, *b = NULL;
    cqrs_error_t err;
    product_view_apply(NULL, &ev, &a, &err);
    product_view_apply(NULL, &ev, &b, &err);
    assert_true(json_equal(a, b));
    json_decref(a);
    json_decref(b);
    cqrs_event_close(&ev);
}

static void test_rejects_what_does_not_fit(void **state)
{
    (void)state;
    cqrs_event_t ev;
    json_t *doc = NULL, *out = NULL;
    cqrs_error_t err;
    created(&ev, 1);
    product_view_apply(NULL, &ev, &doc, &err);
    /* created twice */
    assert_int_equal(product_view_apply(doc, &ev, &out, &err), CQRS_ERR_INVALID);
    cqrs_event_close(&ev);
    /* created not at version 1 */
    created(&ev, 2);
    assert_int_equal(product_view_apply(NULL, &ev, &out, &err), CQRS_ERR_INVALID);
    cqrs_event_close(&ev);
    /* incomplete data */
    cqrs_event_init(&ev, "product.created.v1", "product", "6f9619ff-8b86-4011-b42d-00c04fc964ff", 1,
                    json_pack("{s:s}", "sku", "x"), NULL);
    assert_int_equal(product_view_apply(NULL, &ev, &out, &err), CQRS_ERR_INVALID);
    cqrs_event_close(&ev);
    /* unknown type */
    cqrs_event_init(&ev, "product.teleported.v1", "product", "6f9619ff-8b86-4011-b42d-00c04fc964ff",
                    2, json_object(), NULL);
    assert_int_equal(product_view_apply(doc, &ev, &out, &err), CQRS_ERR_INVALID);
    assert_null(out);
    cqrs_event_close(&ev);
    json_decref(doc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_created_builds_the_whole_document),
        cmocka_unit_test(test_created_is_deterministic),
        cmocka_unit_test(test_rejects_what_does_not_fit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
