/* Integration tests of docstore.c against the real Redis of the stack (CQRS_REDIS_URL): the
 * versioned apply (exactly stored + 1), duplicates and gaps, offsets that only grow and move
 * with the document, recovery from a flushed script cache, and a fast failure when Redis is
 * unreachable. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <hiredis/hiredis.h>

#include <cqrs/docstore.h>
#include <cqrs/util.h>

#include "testenv.h"

static const char *url;
static cqrs_docstore_t *ds;
static char key[96], offsets[96];

static int setup(void **state)
{
    (void)state;
    url = testenv_require("CQRS_REDIS_URL");
    cqrs_error_t err;
    ds = cqrs_docstore_new(url, 2000, &err);
    return ds ? 0 : -1;
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
    char id[37];
    cqrs_uuid_v4(id);
    snprintf(key, sizeof key, "itest:doc:{%s}", id);
    snprintf(offsets, sizeof offsets, "itest:offsets:{%s}", id);
    return 0;
}

static cqrs_apply_result_t apply(int64_t v, const char *json, int64_t next_offset)
{
    cqrs_apply_result_t res = 99;
    cqrs_error_t err;
    assert_int_equal(cqrs_docstore_apply(ds, key, v, json, offsets, 0, next_offset, &res, &err),
                     CQRS_ERR_OK);
    return res;
}

static void expect_doc(int64_t v, const char *json)
{
    char *got = NULL;
    int64_t version = 0;
    cqrs_error_t err;
    assert_int_equal(cqrs_docstore_get(ds, key, &got, &version, &err), CQRS_ERR_OK);
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

static void test_absent_document(void **state)
{
    (void)state;
    int64_t v;
    cqrs_error_t err;
    assert_int_equal(cqrs_docstore_get(ds, key, NULL, &v, &err), CQRS_ERR_NOT_FOUND);
    assert_int_equal(cqrs_docstore_offset(ds, offsets, 0, &v, &err), CQRS_ERR_NOT_FOUND);
}

static void test_versions_apply_in_order_only(void **state)
{
    (void)state;
    assert_int_equal(apply(1, "{\"v\":1}", 11), CQRS_APPLY_APPLIED);
    expect_doc(1, "{\"v\":1}");
    assert_int_equal(offset(), 11);

    /* redelivery of v1: skipped, document untouched */
    assert_int_equal(apply(1, "{\"v\":\"other\"}", 11), CQRS_APPLY_DUPLICATE);
    expect_doc(1, "{\"v\":1}");

    /* v3 before v2: a gap; nothing written, offset not advanced */
    assert_int_equal(apply(3, "{\"v\":3}", 13), CQRS_APPLY_GAP);
    expect_doc(1, "{\"v\":1}");
    assert_int_equal(offset(), 11);

    assert_int_equal(apply(2, "{\"v\":2}", 12), CQRS_APPLY_APPLIED);
    assert_int_equal(apply(3, "{\"v\":3}", 13), CQRS_APPLY_APPLIED);
    expect_doc(3, "{\"v\":3}");
    assert_int_equal(offset(), 13);

    /* an old duplicate never moves the offset back */
    assert_int_equal(apply(2, "{}", 12), CQRS_APPLY_DUPLICATE);
    assert_int_equal(offset(), 13);
}

static void test_script_cache_flush_is_survived(void **state)
{
    (void)state;
    assert_int_equal(apply(1, "{\"v\":1}", 1), CQRS_APPLY_APPLIED);
    cqrs_redis_addr_t a;
    cqrs_error_t err;
    assert_int_equal(cqrs_redis_url_parse(url, &a, &err), CQRS_ERR_OK);
    redisContext *c = redisConnect(a.host, a.port);
    assert_non_null(c);
    redisReply *r = redisCommand(c, "SCRIPT FLUSH");
    assert_non_null(r);
    freeReplyObject(r);
    redisFree(c);
    /* The next apply meets NOSCRIPT and loads the script again. */
    assert_int_equal(apply(2, "{\"v\":2}", 2), CQRS_APPLY_APPLIED);
    expect_doc(2, "{\"v\":2}");
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
    assert_int_equal(cqrs_docstore_apply(dead, "k", 1, "{}", "o", 0, 1, &res, &err),
                     CQRS_ERR_UNAVAILABLE);
    cqrs_docstore_destroy(dead);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_absent_document, fresh_keys),
        cmocka_unit_test_setup(test_versions_apply_in_order_only, fresh_keys),
        cmocka_unit_test_setup(test_script_cache_flush_is_survived, fresh_keys),
        cmocka_unit_test(test_url_parsing),
        cmocka_unit_test(test_unreachable_redis_is_unavailable),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
