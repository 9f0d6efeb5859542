/* Integration tests of docstore.c against the real Redis of the stack (a private database
 * number): the atomic apply of document + index + offset (exactly stored version + 1),
 * duplicates, gaps and dead letters holding back their own aggregate only, the reset marker,
 * recovery from a flushed script cache, and a fast failure when Redis is unreachable. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <cqrs/docstore.h>
#include <cqrs/util.h>

#include "redisdb.h"
#include "testenv.h"

static char url[1024];
static cqrs_docstore_t *ds;
static char agg[37], key[96], offsets[96], dlq[96];

static int setup(void **state)
{
    (void)state;
    if (redisdb_url(testenv_require("CQRS_REDIS_URL"), 15, url, sizeof url) != 0)
        return -1;
    freeReplyObject(redisdb_cmd(url, "FLUSHDB", NULL));
    cqrs_error_t err;
    ds = cqrs_docstore_new(url, 2000, &err);
    return ds && cqrs_docstore_ensure_meta(ds, &err) == CQRS_ERR_OK ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    cqrs_docstore_destroy(ds);
    return 0;
}

static int fresh_keys(void **state)
{
    (void)state;
    cqrs_uuid_v4(agg);
    snprintf(key, sizeof key, "itest:doc:{%s}", agg);
    snprintf(offsets, sizeof offsets, "itest:offsets:{%s}", agg);
    snprintf(dlq, sizeof dlq, "cqrs:dlq:{%s}", agg);
    return 0;
}

static cqrs_apply_result_t apply_ops(const char *k, const char *d, int64_t v, const char *json,
                                     int64_t next_offset, const cqrs_index_op_t *ops, size_t n_ops,
                                     bool dead)
{
    cqrs_apply_result_t res = 99;
    cqrs_error_t err;
    cqrs_apply_t a = {.key = k,
                      .version = v,
                      .json = json,
                      .dlq_key = d,
                      .aggregate_id = agg,
                      .blob = "{\"event\":true}",
                      .reason = "rejected by the projection",
                      .ops = ops,
                      .n_ops = n_ops,
                      .offsets_key = offsets,
                      .partition = 0,
                      .next_offset = next_offset};
    cqrs_err_t rc = dead ? cqrs_docstore_dead_letter(ds, &a, &res, &err)
                         : cqrs_docstore_apply(ds, &a, &res, &err);
    if (rc != CQRS_ERR_OK)
        fail_msg("apply: %s", err.message);
    return res;
}

static cqrs_apply_result_t apply(int64_t v, const char *json, int64_t next_offset)
{
    return apply_ops(key, dlq, v, json, next_offset, NULL, 0, false);
}

static void expect_doc(const char *k, int64_t v, const char *json)
{
    char *got = NULL;
    int64_t version = 0;
    cqrs_error_t err;
    assert_int_equal(cqrs_docstore_get(ds, k, &got, &version, &err), CQRS_ERR_OK);
    assert_int_equal(version, v);
    assert_string_equal(got, json);
    free(got);
}

static int64_t offset(void)
{
    int64_t off = -1;
    cqrs_error_t err;
    assert_int_equal(cqrs_docstore_offset(ds, offsets, 0, &off, &err), CQRS_ERR_OK);
    return off;
}

static long long integer(const char *fmt, const char *arg)
{
    redisReply *r = redisdb_cmd(url, fmt, arg);
    assert_non_null(r);
    long long v = r->type == REDIS_REPLY_INTEGER  ? r->integer
                  : r->type == REDIS_REPLY_STRING ? atoll(r->str)
                                                  : -1;
    freeReplyObject(r);
    return v;
}

static void test_absent_document(void **state)
{
    (void)state;
    int64_t v;
    cqrs_error_t err;
    assert_int_equal(cqrs_docstore_get(ds, key, NULL, &v, &err), CQRS_ERR_NOT_FOUND);
    assert_int_equal(cqrs_docstore_offset(ds, offsets, 0, &v, &err), CQRS_ERR_NOT_FOUND);
}

static void test_document_index_and_offset_change_together(void **state)
{
    (void)state;
    cqrs_index_op_t add[] = {{CQRS_INDEX_ZADD, "itest:idx:a", 5, agg, NULL},
                             {CQRS_INDEX_ZADD, "itest:idx:b", 7, agg, NULL}};
    assert_int_equal(apply_ops(key, dlq, 1, "{\"v\":1}", 11, add, 2, false), CQRS_APPLY_APPLIED);
    expect_doc(key, 1, "{\"v\":1}");
    assert_int_equal(offset(), 11);
    char cmd[160];
    snprintf(cmd, sizeof cmd, "ZSCORE itest:idx:a %s", agg);
    assert_int_equal(integer(cmd, NULL), 5);
    /* A duplicate changes no index. */
    cqrs_index_op_t move[] = {{CQRS_INDEX_ZREM, "itest:idx:a", 0, agg, NULL},
                              {CQRS_INDEX_ZADD, "itest:idx:c", 9, agg, NULL}};
    assert_int_equal(apply_ops(key, dlq, 1, "{\"v\":9}", 11, move, 2, false), CQRS_APPLY_DUPLICATE);
    assert_int_equal(integer(cmd, NULL), 5);
    assert_int_equal(apply_ops(key, dlq, 2, "{\"v\":2}", 12, move, 2, false), CQRS_APPLY_APPLIED);
    assert_int_equal(integer(cmd, NULL), -1); /* removed: nil */
    snprintf(cmd, sizeof cmd, "ZSCORE itest:idx:c %s", agg);
    assert_int_equal(integer(cmd, NULL), 9);
    assert_int_equal(offset(), 12);
}

static void test_duplicates_are_skipped(void **state)
{
    (void)state;
    assert_int_equal(apply(1, "{\"v\":1}", 11), CQRS_APPLY_APPLIED);
    assert_int_equal(apply(1, "{\"v\":\"other\"}", 11), CQRS_APPLY_DUPLICATE);
    expect_doc(key, 1, "{\"v\":1}");
    assert_int_equal(apply(2, "{\"v\":2}", 12), CQRS_APPLY_APPLIED);
    /* an old duplicate never moves the offset back */
    assert_int_equal(apply(1, "{}", 5), CQRS_APPLY_DUPLICATE);
    assert_int_equal(offset(), 12);
}

static void test_gap_is_held_not_papered_over(void **state)
{
    (void)state;
    assert_int_equal(apply(1, "{\"v\":1}", 11), CQRS_APPLY_APPLIED);
    /* v3 before v2: parked as a dead letter, the document stays at v1 */
    assert_int_equal(apply(3, "{\"v\":3}", 13), CQRS_APPLY_GAP);
    expect_doc(key, 1, "{\"v\":1}");
    assert_int_equal(integer("HEXISTS %s 3", dlq), 1);
    assert_int_equal(offset(), 13); /* the partition goes on */
    /* even the missing v2 now waits behind the held aggregate, in order */
    assert_int_equal(apply(2, "{\"v\":2}", 14), CQRS_APPLY_HELD);
    expect_doc(key, 1, "{\"v\":1}");
    assert_int_equal(integer("HLEN %s", dlq), 4); /* two events, two reasons */
}

static void test_dead_letter_holds_back_its_aggregate_only(void **state)
{
    (void)state;
    char other_key[96], other_dlq[96];
    snprintf(other_key, sizeof other_key, "itest:doc:{%s-other}", agg);
    snprintf(other_dlq, sizeof other_dlq, "cqrs:dlq:{%s-other}", agg);
    assert_int_equal(apply(1, "{\"v\":1}", 1), CQRS_APPLY_APPLIED);
    assert_int_equal(apply_ops(key, dlq, 2, NULL, 2, NULL, 0, true), CQRS_APPLY_DEAD);
    assert_int_equal(integer("ZSCORE cqrs:dlq:index %s", agg) > 0, 1);
    assert_int_equal(apply(3, "{\"v\":3}", 3), CQRS_APPLY_HELD);
    expect_doc(key, 1, "{\"v\":1}");
    /* another aggregate on the same partition goes on */
    assert_int_equal(apply_ops(other_key, other_dlq, 1, "{\"o\":1}", 4, NULL, 0, false),
                     CQRS_APPLY_APPLIED);
    assert_int_equal(apply_ops(other_key, other_dlq, 2, "{\"o\":2}", 5, NULL, 0, false),
                     CQRS_APPLY_APPLIED);
    expect_doc(other_key, 2, "{\"o\":2}");
    assert_int_equal(offset(), 5);
}

static void test_lost_store_is_detected(void **state)
{
    (void)state;
    freeReplyObject(redisdb_cmd(url, "DEL " CQRS_META_KEY, NULL));
    assert_int_equal(apply(1, "{\"v\":1}", 1), CQRS_APPLY_RESET);
    int64_t v;
    cqrs_error_t err;
    assert_int_equal(cqrs_docstore_get(ds, key, NULL, &v, &err), CQRS_ERR_NOT_FOUND);
    assert_int_equal(cqrs_docstore_offset(ds, offsets, 0, &v, &err), CQRS_ERR_NOT_FOUND);
    assert_int_equal(cqrs_docstore_ensure_meta(ds, &err), CQRS_ERR_OK);
    assert_int_equal(apply(1, "{\"v\":1}", 1), CQRS_APPLY_APPLIED);
}

static void test_script_cache_flush_is_survived(void **state)
{
    (void)state;
    assert_int_equal(apply(1, "{\"v\":1}", 1), CQRS_APPLY_APPLIED);
    freeReplyObject(redisdb_cmd(url, "SCRIPT FLUSH", NULL));
    /* The next apply meets NOSCRIPT and loads the script again. */
    assert_int_equal(apply(2, "{\"v\":2}", 2), CQRS_APPLY_APPLIED);
    expect_doc(key, 2, "{\"v\":2}");
}

static void test_url_parsing(void **state)
{
    (void)state;
    cqrs_redis_addr_t a;
    cqrs_error_t err;
    assert_int_equal(cqrs_redis_url_parse("redis://:pw@host:7000/3", &a, &err), CQRS_ERR_OK);
    assert_string_equal(a.host, "host");
    assert_int_equal(a.port, 7000);
    assert_int_equal(a.db, 3);
    assert_string_equal(a.password, "pw");
    assert_int_equal(cqrs_redis_url_parse("redis://h", &a, &err), CQRS_ERR_OK);
    assert_int_equal(a.port, 6379);
    assert_int_not_equal(cqrs_redis_url_parse("http://h", &a, &err), CQRS_ERR_OK);
    assert_int_not_equal(cqrs_redis_url_parse("redis://h:0", &a, &err), CQRS_ERR_OK);
    assert_int_not_equal(cqrs_redis_url_parse("redis://h/x", &a, &err), CQRS_ERR_OK);
}

static void test_unreachable_redis_is_unavailable(void **state)
{
    (void)state;
    cqrs_error_t err;
    cqrs_docstore_t *dead = cqrs_docstore_new("redis://127.0.0.1:1/0", 500, &err);
    assert_non_null(dead);
    int64_t v;
    assert_int_equal(cqrs_docstore_get(dead, "k", NULL, &v, &err), CQRS_ERR_UNAVAILABLE);
    cqrs_apply_result_t res;
    cqrs_apply_t a = {.key = "k", .version = 1, .json = "{}", .dlq_key = "d", .offsets_key = "o"};
    assert_int_equal(cqrs_docstore_apply(dead, &a, &res, &err), CQRS_ERR_UNAVAILABLE);
    cqrs_docstore_destroy(dead);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_absent_document, fresh_keys),
        cmocka_unit_test_setup(test_document_index_and_offset_change_together, fresh_keys),
        cmocka_unit_test_setup(test_duplicates_are_skipped, fresh_keys),
        cmocka_unit_test_setup(test_gap_is_held_not_papered_over, fresh_keys),
        cmocka_unit_test_setup(test_dead_letter_holds_back_its_aggregate_only, fresh_keys),
        cmocka_unit_test_setup(test_lost_store_is_detected, fresh_keys),
        cmocka_unit_test_setup(test_script_cache_flush_is_survived, fresh_keys),
        cmocka_unit_test(test_url_parsing),
        cmocka_unit_test(test_unreachable_redis_is_unavailable),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
