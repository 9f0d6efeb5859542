/* Unit tests of util.c: UUIDs, timestamps, UTF-8 length, integers, traceparent. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include <cqrs/util.h>

static void test_uuid(void **state)
{
    (void)state;
    char a[37], b[37];
    cqrs_uuid_v4(a);
    cqrs_uuid_v4(b);
    assert_true(cqrs_uuid_valid(a));
    assert_string_not_equal(a, b);
    assert_int_equal(a[14], '4');
    assert_true(cqrs_uuid_valid("6F9619FF-8B86-D011-B42D-00C04FC964FF"));
    assert_false(cqrs_uuid_valid("6f9619ff-8b86-d011-b42d-00c04fc964f"));
    assert_false(cqrs_uuid_valid("6f9619ff-8b86-d011-b42d-00c04fc964fff"));
    assert_false(cqrs_uuid_valid("6f9619ff_8b86-d011-b42d-00c04fc964ff"));
    assert_false(cqrs_uuid_valid("../../../../etc/passwd-xxxxxxxxxxxxx"));
    assert_false(cqrs_uuid_valid(NULL));
}

static void test_time(void **state)
{
    (void)state;
    char t[25];
    cqrs_time_now_rfc3339(t);
    assert_int_equal(strlen(t), 24);
    assert_int_equal(t[10], 'T');
    assert_int_equal(t[19], '.');
    assert_int_equal(t[23], 'Z');
}

static void test_utf8_length(void **state)
{
    (void)state;
    assert_int_equal(cqrs_utf8_length("abc", 3), 3);
    assert_int_equal(cqrs_utf8_length("\xc3\xa9t\xc3\xa9", 5), 3); /* été */
    assert_int_equal(cqrs_utf8_length("\xf0\x9f\x98\x80", 4), 1);  /* emoji */
}

static void test_parse_int64(void **state)
{
    (void)state;
    int64_t v;
    assert_true(cqrs_parse_int64("-42", &v));
    assert_int_equal(v, -42);
    assert_true(cqrs_parse_int64("9223372036854775807", &v));
    assert_false(cqrs_parse_int64("9223372036854775808", &v));
    assert_false(cqrs_parse_int64("", &v));
    assert_false(cqrs_parse_int64(" 1", &v));
    assert_false(cqrs_parse_int64("1 ", &v));
    assert_false(cqrs_parse_int64("0x10", &v));
}

static void test_traceparent(void **state)
{
    (void)state;
    char tp[56];
    cqrs_traceparent_new(tp);
    assert_true(cqrs_traceparent_valid(tp));
    assert_true(cqrs_traceparent_valid("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
    assert_false(cqrs_traceparent_valid("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
    assert_false(cqrs_traceparent_valid("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"));
    assert_false(cqrs_traceparent_valid("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
    assert_false(cqrs_traceparent_valid("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"));
    assert_false(cqrs_traceparent_valid("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"));
}

static void test_utf8_valid(void **state)
{
    (void)state;
    assert_true(cqrs_utf8_valid("plain"));
    assert_true(cqrs_utf8_valid("\xc3\xa9t\xc3\xa9 \xe2\x98\x95 \xf0\x9f\x98\x80"));
    assert_false(cqrs_utf8_valid("\xff"));
    assert_false(cqrs_utf8_valid("\xc0\xaf"));         /* overlong '/' */
    assert_false(cqrs_utf8_valid("\xe0\x80\xaf"));     /* overlong */
    assert_false(cqrs_utf8_valid("\xed\xa0\x80"));     /* surrogate */
    assert_false(cqrs_utf8_valid("\xf4\x90\x80\x80")); /* past U+10FFFF */
    assert_false(cqrs_utf8_valid("\xc3"));             /* truncated */
}

static void test_checked_i64(void **state)
{
    (void)state;
    int64_t v = 7;
    assert_true(cqrs_checked_add_i64(INT64_MAX - 1, 1, &v));
    assert_int_equal(v, INT64_MAX);
    v = 7;
    assert_false(cqrs_checked_add_i64(INT64_MAX, 1, &v));
    assert_false(cqrs_checked_add_i64(INT64_MIN, -1, &v));
    assert_false(cqrs_checked_sub_i64(0, INT64_MIN, &v));
    assert_false(cqrs_checked_mul_i64(1000000000000LL, 10000000000LL, &v));
    assert_int_equal(v, 7); /* untouched on overflow */
    assert_true(cqrs_checked_sub_i64(0, INT64_MAX, &v));
    assert_int_equal(v, -INT64_MAX);
    assert_true(cqrs_checked_mul_i64(1000000000000LL, 1000000LL, &v));
    assert_int_equal(v, 1000000000000000000LL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_uuid),        cmocka_unit_test(test_time),
        cmocka_unit_test(test_utf8_length), cmocka_unit_test(test_parse_int64),
        cmocka_unit_test(test_traceparent), cmocka_unit_test(test_utf8_valid),
        cmocka_unit_test(test_checked_i64),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
