/* Unit tests of index.c (pure): the compact id and number encodings keep the order of what
 * they encode; members, keys and search records; the index changes of a product's events. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "query.h"

#define SHARD "{cqrs:t.product.events:0}:"

static json_t *product(const char *id, const char *name, long long price, const char *updated,
                       const char *category, const char *status)
{
    return json_pack("{s:s, s:s, s:s, s:s, s:I, s:s, s:s, s:I}", "id", id, "name", name,
                     "description", "a thing", "category", category, "price_cents",
                     (json_int_t)price, "status", status, "updated_at", updated, "units_sold",
                     (json_int_t)0);
}

static void test_ids_round_trip_and_keep_their_order(void **state)
{
    (void)state;
    const char *ids[] = {
        "00000000-0000-0000-0000-000000000000", "00000000-0000-0000-0000-000000000001",
        "0fffffff-ffff-ffff-ffff-ffffffffffff", "6f9619ff-8b86-4011-b42d-00c04fc964ff",
        "6f9619ff-8b86-4011-b42d-00c04fc96500", "ffffffff-ffff-ffff-ffff-fffffffffffe",
        "ffffffff-ffff-ffff-ffff-ffffffffffff"};
    char prev[PRODUCT_ID_BYTES + 1] = "";
    for (size_t i = 0; i < sizeof ids / sizeof ids[0]; i++) {
        char enc[PRODUCT_ID_BYTES + 1], back[CQRS_UUID_LEN + 1];
        assert_true(product_id_encode(ids[i], enc));
        assert_int_equal(strlen(enc), PRODUCT_ID_BYTES); /* no NUL inside */
        for (int k = 0; k < PRODUCT_ID_BYTES; k++)
            assert_true((unsigned char)enc[k] >= 1 && (unsigned char)enc[k] <= 0x80);
        assert_true(product_id_decode(enc, back));
        assert_string_equal(back, ids[i]);
        if (i > 0)
            assert_true(strcmp(prev, enc) < 0);
        memcpy(prev, enc, sizeof prev);
    }
    char enc[PRODUCT_ID_BYTES + 1];
    assert_true(product_id_encode("6F9619FF-8B86-4011-B42D-00C04FC964FF", enc));
    assert_false(product_id_encode("6f9619ff-8b86-4011-b42d-00c04fc964f", enc));
    assert_false(product_id_encode("6f9619ff-8b86-4011-b42d-00c04fc964fff", enc));
    assert_false(product_id_encode("6f9619ff-8b86-4011-b42d-00c04fc964fg", enc));
}

static void test_members_sort_as_the_orders_say(void **state)
{
    (void)state;
    const char *a = "11111111-1111-4111-8111-111111111111",
               *b = "22222222-2222-4222-8222-222222222222";
    json_t *cheap = product(b, "Zebra", 5, "2026-01-02T00:00:00.000Z", "c1", "active");
    json_t *dear = product(a, "apple", 1000000000000LL, "2026-01-01T00:00:00.000Z", "c2", "active");
    json_t *same = product(a, "zebra pie", 5, "2026-01-02T00:00:00.000Z", "c1", "active");
    char x[PRODUCT_MEMBER_MAX], y[PRODUCT_MEMBER_MAX];
    product_sort_member(dear, SORT_NAME, x, sizeof x);
    product_sort_member(cheap, SORT_NAME, y, sizeof y);
    assert_true(strcmp(x, y) < 0); /* apple < zebra, case-insensitive */
    product_sort_member(same, SORT_NAME, x, sizeof x);
    assert_true(strcmp(y, x) < 0); /* a name before its extensions */
    product_sort_member(cheap, SORT_PRICE, x, sizeof x);
    product_sort_member(dear, SORT_PRICE, y, sizeof y);
    assert_true(strcmp(x, y) < 0);
    assert_int_equal(strlen(x), PRODUCT_NUM_BYTES + PRODUCT_MEMBER_TAIL);
    product_sort_member(cheap, SORT_PRICE_DESC, x, sizeof x);
    product_sort_member(dear, SORT_PRICE_DESC, y, sizeof y);
    assert_true(strcmp(y, x) < 0);
    product_sort_member(cheap, SORT_UPDATED_DESC, x, sizeof x);
    product_sort_member(dear, SORT_UPDATED_DESC, y, sizeof y);
    assert_true(strcmp(x, y) < 0); /* newer first */
    /* ties break by ascending id */
    product_sort_member(same, SORT_PRICE, x, sizeof x);
    product_sort_member(cheap, SORT_PRICE, y, sizeof y);
    assert_true(strcmp(x, y) < 0);
    char id[CQRS_UUID_LEN + 1], tag[PRODUCT_TAG_BYTES + 1];
    assert_true(product_member_id(y, id));
    assert_string_equal(id, b);
    product_category_tag("c1", tag);
    assert_true(product_member_has_tag(y, tag));
    product_category_tag("c2", tag);
    assert_false(product_member_has_tag(y, tag));
    json_decref(cheap);
    json_decref(dear);
    json_decref(same);
}

static void test_search_records_give_the_members(void **state)
{
    (void)state;
    json_t *p = product("6f9619ff-8b86-4011-b42d-00c04fc964ff", "Kettle 9", 1234,
                        "2026-03-04T05:06:07.089Z", "kitchen", "discontinued");
    char rec[PRODUCT_MEMBER_MAX], eid[PRODUCT_ID_BYTES + 1];
    product_search_record(p, rec, sizeof rec);
    assert_true(product_id_encode("6f9619ff-8b86-4011-b42d-00c04fc964ff", eid));
    for (int s = 0; s < PRODUCT_SORTS; s++) {
        char want[PRODUCT_MEMBER_MAX], got[PRODUCT_MEMBER_MAX], tag[PRODUCT_TAG_BYTES + 1],
            ctag[PRODUCT_TAG_BYTES + 1];
        int st = -1;
        product_sort_member(p, s, want, sizeof want);
        assert_true(product_record_member(eid, rec, s, got, sizeof got, &st, tag));
        assert_string_equal(got, want);
        assert_int_equal(st, product_status_index("discontinued"));
        product_category_tag("kitchen", ctag);
        assert_string_equal(tag, ctag);
    }
    char got[PRODUCT_MEMBER_MAX], tag[PRODUCT_TAG_BYTES + 1];
    int st;
    assert_false(product_record_member(eid, "1abc", SORT_PRICE, got, sizeof got, &st, tag));
    json_decref(p);
}

static void test_keys_and_entries(void **state)
{
    (void)state;
    char key[4608];
    product_list_key(SHARD, SORT_PRICE, 0, NULL, key, sizeof key);
    assert_string_equal(key, SHARD "idx:p:price:active");
    product_list_key(SHARD, SORT_PRICE, 1, "tools", key, sizeof key); /* only name has c= */
    assert_string_equal(key, SHARD "idx:p:price:discontinued");
    product_list_key(SHARD, SORT_NAME, 0, "tools", key, sizeof key);
    assert_string_equal(key, SHARD "idx:p:name:active:c=tools");
    product_records_key(SHARD, key, sizeof key);
    assert_string_equal(key, SHARD "idx:p:rec");
    word_key(SHARD, "lamp", key, sizeof key);
    assert_string_equal(key, SHARD "idx:w:lamp");
    json_t *p = product("6f9619ff-8b86-4011-b42d-00c04fc964ff", "Lamp", 1,
                        "2026-01-01T00:00:00.000Z", "tools", "active");
    static product_entry_t e[PRODUCT_LISTS];
    assert_int_equal(product_list_entries(SHARD, p, e), PRODUCT_LISTS);
    assert_string_equal(e[0].key, SHARD "idx:p:name:active");
    assert_string_equal(e[1].key, SHARD "idx:p:name:active:c=tools");
    assert_string_equal(e[0].member, e[1].member);
    assert_string_equal(e[4].key, SHARD "idx:p:-updated:active");
    json_object_set_new(p, "status", json_string("lost"));
    assert_int_equal(product_list_entries(SHARD, p, e), 0);
    json_decref(p);
}

static size_t count(const cqrs_index_ops_t *ops, cqrs_index_op_kind_t op, const char *key_part)
{
    size_t n = 0;
    for (size_t i = 0; i < ops->n; i++)
        n += ops->v[i].op == op && strstr(ops->v[i].key, key_part) != NULL;
    return n;
}

static void test_index_changes(void **state)
{
    (void)state;
    const char *id = "6f9619ff-8b86-4011-b42d-00c04fc964ff";
    json_t *v1 = product(id, "Lamp", 100, "2026-01-01T00:00:00.000Z", "tools", "active");
    cqrs_index_ops_t ops = {0};
    query_index(SHARD, "product", SHARD "doc:x", NULL, v1, &ops);
    assert_int_equal(count(&ops, CQRS_INDEX_ZADD, "idx:p:"), PRODUCT_LISTS);
    assert_int_equal(count(&ops, CQRS_INDEX_ZREM, ""), 0);
    assert_int_equal(count(&ops, CQRS_INDEX_HSET, "idx:p:rec"), 1);
    assert_int_equal(count(&ops, CQRS_INDEX_HSET, "doc:"), 0);   /* no fields in the document */
    assert_int_equal(count(&ops, CQRS_INDEX_SADD, "idx:w:"), 3); /* lamp, a, thing */
    cqrs_index_ops_free(&ops);

    /* a price change: the price orders move, the record changes, nothing else */
    json_t *v2 = json_deep_copy(v1);
    json_object_set_new(v2, "price_cents", json_integer(200));
    memset(&ops, 0, sizeof ops);
    query_index(SHARD, "product", SHARD "doc:x", v1, v2, &ops);
    assert_int_equal(count(&ops, CQRS_INDEX_ZREM, "idx:p:"), 2);
    assert_int_equal(count(&ops, CQRS_INDEX_ZADD, "idx:p:price:active"), 1);
    assert_int_equal(count(&ops, CQRS_INDEX_ZADD, "idx:p:-price:active"), 1);
    assert_int_equal(count(&ops, CQRS_INDEX_HSET, "idx:p:rec"), 1);
    assert_int_equal(count(&ops, CQRS_INDEX_SADD, ""), 0);
    cqrs_index_ops_free(&ops);

    /* discontinued: every list of the old status left for the new one's */
    json_t *v3 = json_deep_copy(v2);
    json_object_set_new(v3, "status", json_string("discontinued"));
    memset(&ops, 0, sizeof ops);
    query_index(SHARD, "product", SHARD "doc:x", v2, v3, &ops);
    assert_int_equal(count(&ops, CQRS_INDEX_ZREM, ":active"), PRODUCT_LISTS);
    assert_int_equal(count(&ops, CQRS_INDEX_ZADD, ":discontinued"), PRODUCT_LISTS);
    cqrs_index_ops_free(&ops);

    /* nothing indexed changed: no change at all */
    memset(&ops, 0, sizeof ops);
    query_index(SHARD, "product", SHARD "doc:x", v3, v3, &ops);
    assert_int_equal(ops.n, 0);
    cqrs_index_ops_free(&ops);
    json_decref(v1);
    json_decref(v2);
    json_decref(v3);
}

/* Top products: a product enters when it sells, moves when its count changes, leaves at 0;
 * more sold sorts first, ties by id. */
static void test_top_products_changes(void **state)
{
    (void)state;
    const char *id = "6f9619ff-8b86-4011-b42d-00c04fc964ff";
    json_t *v1 = product(id, "Lamp", 100, "2026-01-01T00:00:00.000Z", "tools", "active");
    json_t *v2 = json_deep_copy(v1), *v3 = json_deep_copy(v1);
    json_object_set_new(v2, "units_sold", json_integer(3));
    json_object_set_new(v3, "units_sold", json_integer(5));
    cqrs_index_ops_t ops = {0};
    query_index(SHARD, "product", SHARD "doc:x", v1, v2, &ops);
    assert_int_equal(count(&ops, CQRS_INDEX_ZADD, "idx:top"), 1);
    assert_int_equal(count(&ops, CQRS_INDEX_ZREM, "idx:top"), 0);
    cqrs_index_ops_free(&ops);
    memset(&ops, 0, sizeof ops);
    query_index(SHARD, "product", SHARD "doc:x", v2, v3, &ops);
    assert_int_equal(count(&ops, CQRS_INDEX_ZADD, "idx:top"), 1);
    assert_int_equal(count(&ops, CQRS_INDEX_ZREM, "idx:top"), 1);
    assert_int_equal(ops.n, 2); /* nothing else changed */
    cqrs_index_ops_free(&ops);
    memset(&ops, 0, sizeof ops);
    query_index(SHARD, "product", SHARD "doc:x", v3, v1, &ops);
    assert_int_equal(count(&ops, CQRS_INDEX_ZREM, "idx:top"), 1);
    assert_int_equal(count(&ops, CQRS_INDEX_ZADD, "idx:top"), 0);
    cqrs_index_ops_free(&ops);

    char m3[128], m5[128], other[128];
    top_member(v2, m3, sizeof m3);
    top_member(v3, m5, sizeof m5);
    assert_true(strcmp(m5, m3) < 0); /* 5 sold before 3 sold */
    json_object_set_new(v3, "id", json_string("7f9619ff-8b86-4011-b42d-00c04fc964ff"));
    top_member(v3, other, sizeof other);
    assert_true(strcmp(m5, other) < 0); /* same count: by id */
    json_decref(v1);
    json_decref(v2);
    json_decref(v3);
}

/* Customer orders: added once when placed (customer and placed_at never change), newest first. */
static void test_customer_orders_changes(void **state)
{
    (void)state;
    json_t *o1 = json_pack("{s:s, s:s, s:s, s:s}", "id", "6f9619ff-8b86-4011-b42d-00c04fc964ff",
                           "customer_id", "44444444-4444-4444-8444-444444444444", "placed_at",
                           "2026-01-01T00:00:00.000Z", "status", "placed");
    json_t *o2 = json_deep_copy(o1);
    json_object_set_new(o2, "placed_at", json_string("2026-01-02T00:00:00.000Z"));
    cqrs_index_ops_t ops = {0};
    query_index(SHARD, "order", SHARD "doc:o", NULL, o1, &ops);
    assert_int_equal(ops.n, 1);
    assert_int_equal(ops.v[0].op, CQRS_INDEX_ZADD);
    char key[256];
    customer_orders_key(SHARD, "44444444-4444-4444-8444-444444444444", key, sizeof key);
    assert_string_equal(ops.v[0].key, key);
    cqrs_index_ops_free(&ops);
    memset(&ops, 0, sizeof ops);
    json_t *cancelled = json_deep_copy(o1);
    json_object_set_new(cancelled, "status", json_string("cancelled"));
    query_index(SHARD, "order", SHARD "doc:o", o1, cancelled, &ops);
    assert_int_equal(ops.n, 0);
    cqrs_index_ops_free(&ops);
    char m1[128], m2[128];
    customer_order_member(o1, m1, sizeof m1);
    customer_order_member(o2, m2, sizeof m2);
    assert_true(strcmp(m2, m1) < 0); /* newest first */
    json_decref(o1);
    json_decref(o2);
    json_decref(cancelled);
}

/* Words: lower-cased, split on what is not a letter or digit (or UTF-8), each once. */
static void test_split_words(void **state)
{
    (void)state;
    char words[8][MAX_WORD + 1];
    size_t n = split_words("Desk-Lamp, BIG lamp", words, 8);
    assert_int_equal(n, 3); /* "lamp" once */
    assert_string_equal(words[0], "desk");
    assert_string_equal(words[1], "lamp");
    assert_string_equal(words[2], "big");
    assert_int_equal(split_words("", words, 8), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ids_round_trip_and_keep_their_order),
        cmocka_unit_test(test_members_sort_as_the_orders_say),
        cmocka_unit_test(test_search_records_give_the_members),
        cmocka_unit_test(test_keys_and_entries),
        cmocka_unit_test(test_index_changes),
        cmocka_unit_test(test_top_products_changes),
        cmocka_unit_test(test_customer_orders_changes),
        cmocka_unit_test(test_split_words),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
