/* Unit tests of the Product projection (services/query/product_view.c), pure. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "query.h"

/* product.created.v2: the version the projection is written against. */
static void created(cqrs_event_t *ev, int64_t version)
{
    cqrs_event_init(ev, "product.created.v2", "product", "6f9619ff-8b86-4011-b42d-00c04fc964ff",
                    version,
                    json_pack("{s:s,s:s,s:s,s:s,s:s,s:i,s:s,s:i,s:i}", "product_id",
                              "6f9619ff-8b86-4011-b42d-00c04fc964ff", "sku", "ABC-1", "name",
                              "Widget", "description", "", "category", "tools", "price_cents", 1299,
                              "currency", "EUR", "initial_stock", 10, "weight_grams", 1250),
                    NULL);
}

/* The same creation as written before v2 existed. */
static void created_v1(cqrs_event_t *ev)
{
    cqrs_event_init(ev, "product.created.v1", "product", "6f9619ff-8b86-4011-b42d-00c04fc964ff", 1,
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
        "id",           "sku",   "name",   "description", "category", "price_cents", "currency",
        "weight_grams", "stock", "status", "units_sold",  "version",  "created_at",  "updated_at"};
    assert_int_equal(json_object_size(doc), 14);
    for (size_t i = 0; i < 14; i++)
        assert_non_null(json_object_get(doc, fields[i]));
    assert_int_equal(json_integer_value(json_object_get(doc, "weight_grams")), 1250);
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
    cqrs_event_init(&ev, "product.created.v2", "product", "6f9619ff-8b86-4011-b42d-00c04fc964ff", 1,
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

static json_t *base_doc(void)
{
    cqrs_event_t ev;
    created(&ev, 1);
    json_t *doc = NULL;
    cqrs_error_t err;
    assert_int_equal(product_view_apply(NULL, &ev, &doc, &err), CQRS_ERR_OK);
    cqrs_event_close(&ev);
    return doc;
}

/* Applies one event to doc (stolen) and returns the new document. */
static json_t *step(json_t *doc, const char *type, int64_t version, json_t *data)
{
    cqrs_event_t ev;
    cqrs_event_init(&ev, type, "product", "6f9619ff-8b86-4011-b42d-00c04fc964ff", version, data,
                    NULL);
    json_t *next = NULL;
    cqrs_error_t err;
    if (product_view_apply(doc, &ev, &next, &err) != CQRS_ERR_OK)
        fail_msg("%s: %s", type, err.message);
    assert_int_equal(json_integer_value(json_object_get(next, "version")), version);
    assert_string_equal(json_string_value(json_object_get(next, "updated_at")), ev.time);
    /* created_at never moves */
    assert_string_equal(json_string_value(json_object_get(next, "created_at")),
                        json_string_value(json_object_get(doc, "created_at")));
    assert_int_equal(json_object_size(next), 14);
    cqrs_event_close(&ev);
    json_decref(doc);
    return next;
}

#define I(doc, f) json_integer_value(json_object_get(doc, f))
#define S(doc, f) json_string_value(json_object_get(doc, f))

static void test_every_product_event(void **state)
{
    (void)state;
    json_t *d = base_doc();
    d = step(
        d, "product.details-updated.v1", 2,
        json_pack("{s:s,s:s,s:s}", "name", "Gadget", "description", "New", "category", "toys"));
    assert_string_equal(S(d, "name"), "Gadget");
    assert_string_equal(S(d, "description"), "New");
    assert_string_equal(S(d, "category"), "toys");
    assert_string_equal(S(d, "sku"), "ABC-1");
    d = step(d, "product.price-changed.v1", 3,
             json_pack("{s:i,s:i}", "price_cents", 999, "previous_price_cents", 1299));
    assert_int_equal(I(d, "price_cents"), 999);
    d = step(d, "product.stock-adjusted.v1", 4,
             json_pack("{s:i,s:s,s:i}", "delta", 5, "reason", "restock", "stock", 15));
    assert_int_equal(I(d, "stock"), 15);
    d = step(d, "product.stock-reserved.v1", 5,
             json_pack("{s:s,s:i,s:i}", "order_id", "o", "quantity", 4, "stock", 11));
    assert_int_equal(I(d, "stock"), 11);
    assert_int_equal(I(d, "units_sold"), 4);
    d = step(d, "product.stock-reserved.v1", 6,
             json_pack("{s:s,s:i,s:i}", "order_id", "p", "quantity", 1, "stock", 10));
    d = step(d, "product.stock-released.v1", 7,
             json_pack("{s:s,s:i,s:i}", "order_id", "o", "quantity", 4, "stock", 14));
    assert_int_equal(I(d, "stock"), 14);
    assert_int_equal(I(d, "units_sold"), 1);
    d = step(d, "product.discontinued.v1", 8, json_object());
    assert_string_equal(S(d, "status"), "discontinued");
    assert_int_equal(I(d, "price_cents"), 999);
    json_decref(d);
}

static void test_product_events_need_their_document_and_data(void **state)
{
    (void)state;
    const char *types[] = {"product.details-updated.v1", "product.price-changed.v1",
                           "product.stock-adjusted.v1", "product.stock-reserved.v1",
                           "product.stock-released.v1"};
    json_t *doc = base_doc();
    for (size_t i = 0; i < 5; i++) {
        cqrs_event_t ev;
        cqrs_event_init(&ev, types[i], "product", "6f9619ff-8b86-4011-b42d-00c04fc964ff", 2,
                        json_object(), NULL);
        json_t *out = NULL;
        cqrs_error_t err;
        /* incomplete data */
        assert_int_equal(product_view_apply(doc, &ev, &out, &err), CQRS_ERR_INVALID);
        assert_null(out);
        /* no document to change */
        assert_int_equal(product_view_apply(NULL, &ev, &out, &err), CQRS_ERR_INVALID);
        cqrs_event_close(&ev);
    }
    json_decref(doc);
}

static json_t *placed(cqrs_event_t *ev)
{
    cqrs_event_init(ev, "order.placed.v1", "order", "aaaaaaaa-8b86-4011-b42d-00c04fc964ff", 1,
                    json_pack("{s:s,s:s,s:[{s:s,s:s,s:s,s:i,s:i,s:i}],s:i,s:s}", "order_id",
                              "aaaaaaaa-8b86-4011-b42d-00c04fc964ff", "customer_id",
                              "bbbbbbbb-8b86-4011-b42d-00c04fc964ff", "items", "product_id",
                              "6f9619ff-8b86-4011-b42d-00c04fc964ff", "sku", "ABC-1", "name",
                              "Widget", "unit_price_cents", 1299, "quantity", 2, "line_total_cents",
                              2598, "total_cents", 2598, "currency", "EUR"),
                    NULL);
    json_t *doc = NULL;
    cqrs_error_t err;
    assert_int_equal(order_view_apply(NULL, ev, &doc, &err), CQRS_ERR_OK);
    return doc;
}

static void test_order_events(void **state)
{
    (void)state;
    cqrs_event_t ev;
    json_t *doc = placed(&ev);
    assert_int_equal(json_object_size(doc), 9);
    assert_string_equal(S(doc, "id"), "aaaaaaaa-8b86-4011-b42d-00c04fc964ff");
    assert_string_equal(S(doc, "customer_id"), "bbbbbbbb-8b86-4011-b42d-00c04fc964ff");
    assert_string_equal(S(doc, "status"), "placed");
    assert_int_equal(I(doc, "total_cents"), 2598);
    assert_string_equal(S(doc, "currency"), "EUR");
    assert_string_equal(S(doc, "placed_at"), ev.time);
    assert_true(json_is_null(json_object_get(doc, "cancelled_at")));
    json_t *line = json_array_get(json_object_get(doc, "items"), 0);
    assert_string_equal(S(line, "sku"), "ABC-1");
    assert_int_equal(I(line, "line_total_cents"), 2598);
    json_t *again = NULL;
    cqrs_error_t err;
    assert_int_equal(order_view_apply(doc, &ev, &again, &err), CQRS_ERR_INVALID);
    cqrs_event_close(&ev);

    cqrs_event_init(&ev, "order.cancelled.v1", "order", "aaaaaaaa-8b86-4011-b42d-00c04fc964ff", 2,
                    json_pack("{s:s}", "order_id", "aaaaaaaa-8b86-4011-b42d-00c04fc964ff"), NULL);
    json_t *cancelled = NULL;
    assert_int_equal(order_view_apply(doc, &ev, &cancelled, &err), CQRS_ERR_OK);
    assert_string_equal(S(cancelled, "status"), "cancelled");
    assert_string_equal(S(cancelled, "cancelled_at"), ev.time);
    assert_int_equal(I(cancelled, "version"), 2);
    assert_string_equal(S(cancelled, "placed_at"), S(doc, "placed_at"));
    assert_int_equal(order_view_apply(NULL, &ev, &again, &err), CQRS_ERR_INVALID);
    cqrs_event_close(&ev);
    cqrs_event_init(&ev, "order.shipped.v1", "order", "aaaaaaaa-8b86-4011-b42d-00c04fc964ff", 3,
                    json_object(), NULL);
    assert_int_equal(order_view_apply(cancelled, &ev, &again, &err), CQRS_ERR_INVALID);
    cqrs_event_close(&ev);
    json_decref(cancelled);
    json_decref(doc);
}

/* apply (copying) and apply_owned (in place) give the same documents; apply leaves its input
 * untouched; a rejected event leaves an owned document as it was. */
static void test_in_place_matches_copying(void **state)
{
    (void)state;
    json_t *owned = base_doc();
    json_t *kept = json_deep_copy(owned);
    const struct {
        const char *type;
        const char *data;
    } steps[] = {
        {"product.stock-adjusted.v1", "{\"delta\":5,\"reason\":\"r\",\"stock\":15}"},
        {"product.price-changed.v1", "{\"price_cents\":777}"},
        {"product.stock-reserved.v1", "{\"quantity\":2,\"stock\":13,\"order_id\":\"x\"}"},
        {"product.details-updated.v1", "{\"name\":\"N\",\"description\":\"D\",\"category\":\"c\"}"},
        {"product.discontinued.v1", "{}"},
    };
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
        cqrs_event_t ev;
        cqrs_event_init(&ev, steps[i].type, "product", "6f9619ff-8b86-4011-b42d-00c04fc964ff",
                        (int64_t)i + 2, json_loads(steps[i].data, 0, NULL), NULL);
        json_t *before = json_deep_copy(kept), *copied = NULL, *next = NULL;
        cqrs_error_t err;
        assert_int_equal(query_projection.apply(kept, &ev, &copied, &err), CQRS_ERR_OK);
        assert_true(json_equal(kept, before)); /* the input is untouched */
        assert_int_equal(query_projection.apply_owned(owned, &ev, &next, &err), CQRS_ERR_OK);
        assert_true(json_equal(next, copied));
        owned = next;
        json_decref(kept);
        json_decref(before);
        kept = copied;
        cqrs_event_close(&ev);
    }
    cqrs_event_t bad;
    cqrs_event_init(&bad, "product.price-changed.v1", "product",
                    "6f9619ff-8b86-4011-b42d-00c04fc964ff", 7, json_object(), NULL);
    json_t *same = json_deep_copy(owned), *next = NULL;
    cqrs_error_t err;
    assert_int_equal(query_projection.apply_owned(owned, &bad, &next, &err), CQRS_ERR_INVALID);
    assert_null(next);
    assert_true(json_equal(owned, same));
    cqrs_event_close(&bad);
    json_decref(same);
    json_decref(owned);
    json_decref(kept);
}

/* units_sold is a sum of every reservation minus every release: a history that would take it
 * past int64 is rejected (a dead letter), the document left as it was, never wrapped. */
static void test_units_sold_never_wraps(void **state)
{
    (void)state;
    json_t *d = step(
        base_doc(), "product.stock-reserved.v1", 2,
        json_pack("{s:s,s:I,s:i}", "order_id", "o", "quantity", (json_int_t)INT64_MAX, "stock", 0));
    assert_int_equal(I(d, "units_sold"), INT64_MAX);
    const char *types[] = {"product.stock-reserved.v1", "product.stock-released.v1"};
    const json_int_t quantities[] = {1, INT64_MIN};
    for (size_t i = 0; i < 2; i++) {
        cqrs_event_t ev;
        cqrs_event_init(
            &ev, types[i], "product", "6f9619ff-8b86-4011-b42d-00c04fc964ff", 3,
            json_pack("{s:s,s:I,s:i}", "order_id", "o", "quantity", quantities[i], "stock", 0),
            NULL);
        json_t *next = NULL;
        cqrs_error_t err;
        assert_int_equal(product_view_apply(d, &ev, &next, &err), CQRS_ERR_INVALID);
        assert_null(next);
        assert_int_equal(I(d, "units_sold"), INT64_MAX);
        assert_int_equal(I(d, "version"), 2);
        cqrs_event_close(&ev);
    }
    /* the top products key stays 13 digits, past 10^13 units sold too */
    char member[64];
    top_member(d, member, sizeof member);
    assert_memory_equal(member, "0000000000000", 13);
    assert_string_equal(member + 13, S(d, "id"));
    json_decref(d);
}

/* A log holding both versions folds to the same document as one holding only v2 after the
 * upcast: v1 arrives with weight_grams null, everything else alike. */
static void test_v1_creation_is_upcast(void **state)
{
    (void)state;
    cqrs_event_t v1, v2;
    created_v1(&v1);
    created(&v2, 1);
    json_object_set_new(v2.data, "weight_grams", json_null());
    snprintf(v2.time, sizeof v2.time, "%s", v1.time);
    snprintf(v2.id, sizeof v2.id, "%s", v1.id);
    json_t *a = NULL, *b = NULL;
    cqrs_error_t err;
    /* the projection itself knows v2 only… */
    assert_int_equal(product_view_apply(NULL, &v1, &a, &err), CQRS_ERR_INVALID);
    /* …and every reader reaches it through the upcasters */
    assert_int_equal(cqrs_projection_apply(&query_projection, NULL, &v1, &a, &err), CQRS_ERR_OK);
    assert_string_equal(v1.type, "product.created.v2");
    assert_int_equal(cqrs_projection_apply(&query_projection, NULL, &v2, &b, &err), CQRS_ERR_OK);
    assert_true(json_is_null(json_object_get(a, "weight_grams")));
    assert_true(json_equal(a, b));
    json_decref(a);
    json_decref(b);
    cqrs_event_close(&v1);
    cqrs_event_close(&v2);
}

/* A document projected before product.created.v2 (no weight_grams) gains weight_grams: null
 * with its next event, so it matches the write model again. */
static void test_old_document_gains_the_new_member(void **state)
{
    (void)state;
    json_t *doc = base_doc();
    json_object_del(doc, "weight_grams");
    cqrs_event_t ev;
    cqrs_event_init(&ev, "product.price-changed.v1", "product",
                    "6f9619ff-8b86-4011-b42d-00c04fc964ff", 2,
                    json_pack("{s:i,s:i}", "old_price_cents", 1299, "price_cents", 999), NULL);
    json_t *next = NULL;
    cqrs_error_t err;
    assert_int_equal(cqrs_projection_apply(&query_projection, doc, &ev, &next, &err), CQRS_ERR_OK);
    assert_true(json_is_null(json_object_get(next, "weight_grams")));
    assert_int_equal(json_object_size(next), 14);
    json_decref(next);
    json_decref(doc);
    cqrs_event_close(&ev);
}

/* An old reader meeting a newer version: INVALID with a reason that says so (a dead letter). */
static void test_newer_version_is_refused_with_its_reason(void **state)
{
    (void)state;
    cqrs_event_t ev;
    created(&ev, 1);
    snprintf(ev.type, sizeof ev.type, "product.created.v3");
    json_t *doc = NULL;
    cqrs_error_t err;
    assert_int_equal(cqrs_projection_apply(&query_projection, NULL, &ev, &doc, &err),
                     CQRS_ERR_INVALID);
    assert_null(doc);
    assert_non_null(strstr(err.message, "product.created.v3 is newer than this build knows "
                                        "(product.created.v2)"));
    assert_string_equal(ev.type, "product.created.v3");
    cqrs_event_close(&ev);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_product_event),
        cmocka_unit_test(test_in_place_matches_copying),
        cmocka_unit_test(test_product_events_need_their_document_and_data),
        cmocka_unit_test(test_order_events),
        cmocka_unit_test(test_units_sold_never_wraps),
        cmocka_unit_test(test_created_builds_the_whole_document),
        cmocka_unit_test(test_v1_creation_is_upcast),
        cmocka_unit_test(test_old_document_gains_the_new_member),
        cmocka_unit_test(test_newer_version_is_refused_with_its_reason),
        cmocka_unit_test(test_created_is_deterministic),
        cmocka_unit_test(test_rejects_what_does_not_fit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
