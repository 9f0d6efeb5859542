/* test_json.c — libcqrs/src/json.c: the strict request-body parser and the field validators.
 * Integers however written (JSON Schema 2020-12), "\u0000" refused as the field's fault, and
 * parser errors that never show the parser's internals. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include <cqrs/json.h>

/* Validates field "n" of body with cqrs_v_int in [min, max]; returns the violations' status
 * (0 = valid) and the value in *out. */
static int judge_int(const char *body, int64_t min, int64_t max, int64_t *out)
{
    cqrs_error_t err;
    json_t *doc = cqrs_json_parse_object(body, strlen(body), 32, &err);
    if (!doc)
        fail_msg("%s does not parse: %s", body, err.message);
    cqrs_violations_t v;
    cqrs_violations_init(&v);
    *out = -12345;
    bool ok = cqrs_v_int(&v, doc, "n", true, min, max, out);
    int status = v.status;
    assert_int_equal(ok, status == 0);
    cqrs_violations_close(&v);
    json_decref(doc);
    return status;
}

static void test_integral_numbers_are_integers(void **state)
{
    (void)state;
    int64_t n;
    assert_int_equal(judge_int("{\"n\":72794.0}", 0, 1000000000, &n), 0);
    assert_int_equal(n, 72794);
    assert_int_equal(judge_int("{\"n\":1e3}", 0, 1000000000, &n), 0);
    assert_int_equal(n, 1000);
    assert_int_equal(judge_int("{\"n\":1E+3}", 0, 1000000000, &n), 0);
    assert_int_equal(n, 1000);
    assert_int_equal(judge_int("{\"n\":-5.0}", -10, 10, &n), 0);
    assert_int_equal(n, -5);
    assert_int_equal(judge_int("{\"n\":-0.0}", 0, 10, &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(judge_int("{\"n\":999}", 0, 1000, &n), 0);
    assert_int_equal(n, 999);
}

static void test_non_integral_and_out_of_range(void **state)
{
    (void)state;
    int64_t n;
    /* not an integer: 400, as a string is */
    assert_int_equal(judge_int("{\"n\":1.5}", 0, 1000, &n), 400);
    assert_int_equal(judge_int("{\"n\":999.0000001}", 0, 1000, &n), 400);
    assert_int_equal(judge_int("{\"n\":\"3\"}", 0, 1000, &n), 400);
    /* integral but out of range: 422, as 1001 is */
    assert_int_equal(judge_int("{\"n\":1001}", 0, 1000, &n), 422);
    assert_int_equal(judge_int("{\"n\":1001.0}", 0, 1000, &n), 422);
    assert_int_equal(judge_int("{\"n\":-1e0}", 0, 1000, &n), 422);
    assert_int_equal(judge_int("{\"n\":1e300}", 0, 1000, &n), 422);
    assert_int_equal(judge_int("{\"n\":-1e300}", 0, 1000, &n), 422);
    /* 2^63 is one past int64: out of range, never a wrapped cast */
    assert_int_equal(judge_int("{\"n\":9223372036854775808.0}", INT64_MIN, INT64_MAX, &n), 422);
    assert_int_equal(judge_int("{\"n\":-9223372036854775808.0}", INT64_MIN, INT64_MAX, &n), 0);
    assert_true(n == INT64_MIN);
}

static void test_nul_in_a_string_names_the_field(void **state)
{
    (void)state;
    const char body[] = "{\"name\":\"kitchen\\u0000zzz\"}";
    cqrs_error_t err;
    json_t *doc = cqrs_json_parse_object(body, strlen(body), 32, &err);
    assert_non_null(doc);
    cqrs_violations_t v;
    cqrs_violations_init(&v);
    assert_null(cqrs_v_string(&v, doc, "name", true, 1, 100));
    assert_int_equal(v.status, 422);
    json_t *e = json_array_get(v.errors, 0);
    assert_string_equal(json_string_value(json_object_get(e, "field")), "name");
    assert_non_null(strstr(json_string_value(json_object_get(e, "message")), "NUL"));
    cqrs_violations_close(&v);
    json_decref(doc);
}

/* Every way a body can fail to load: the message is ours or plain JSON talk, never a flag. */
static void test_parse_errors_show_no_internals(void **state)
{
    (void)state;
    static const struct {
        const char *body;
        size_t len; /* 0: strlen */
        const char *says;
    } cases[] = {
        {"{\"a\\u0000b\":1}", 0, "NUL character"},
        {"{\"a\":\"x\0\"}", 10, "control character"},
        {"{\"a\":1,\"a\":2}", 0, "duplicate"},
        {"{\"a\":99999999999999999999}", 0, "too big"},
        {"{\"a\":1e999}", 0, "overflow"},
        {"{\"a\":tru}", 0, "invalid token"},
        {"{\"a\":1} x", 0, "more text follows"},
        {"{\"a\":", 0, "ends too early"},
        {"{\"a\":\"\xff\"}", 0, "not valid UTF-8"},
        {"[1]", 0, "must be a JSON object"},
        {"", 0, "empty"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t len = cases[i].len ? cases[i].len : strlen(cases[i].body);
        cqrs_error_t err;
        memset(&err, 0, sizeof err);
        json_t *doc = cqrs_json_parse_object(cases[i].body, len, 32, &err);
        if (doc)
            fail_msg("case %zu parsed", i);
        assert_int_equal(err.code, CQRS_ERR_INVALID);
        if (strstr(err.message, "JSON_") || strstr(err.message, "not supported"))
            fail_msg("case %zu shows the parser's internals: %s", i, err.message);
        if (!strstr(err.message, cases[i].says))
            fail_msg("case %zu: '%s' does not say '%s'", i, err.message, cases[i].says);
    }
    /* deeper than jansson's own limit (2048): our limit is named, not jansson's */
    char deep[5000];
    memset(deep, '[', 2100);
    snprintf(deep + 2100, sizeof deep - 2100, "%s", "");
    char obj[5100];
    snprintf(obj, sizeof obj, "{\"a\":%s}", deep);
    cqrs_error_t err;
    assert_null(cqrs_json_parse_object(obj, strlen(obj), 32, &err));
    assert_non_null(strstr(err.message, "deeper than 32"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_integral_numbers_are_integers),
        cmocka_unit_test(test_non_integral_and_out_of_range),
        cmocka_unit_test(test_nul_in_a_string_names_the_field),
        cmocka_unit_test(test_parse_errors_show_no_internals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
