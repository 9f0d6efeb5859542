/* Unit tests of the CreateProduct validation (services/command/product.c), data-driven:
 * tests/data/create_product/valid/<case>/input must pass; invalid/<case>/input must fail with
 * the status in invalid/<case>/status (400 or 422) and, when invalid/<case>/field exists, an
 * error naming that field. Parsing uses the daemon's own strict parser and depth limit. */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "command.h"

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = malloc(1 << 16);
    *len = fread(buf, 1, (1 << 16) - 1, f);
    buf[*len] = '\0';
    fclose(f);
    return buf;
}

/* Returns 0 when valid, else the status of the answer the daemon gives (400/422). */
static int judge(const char *body, size_t len, json_t **errors)
{
    domain_limits_t limits;
    domain_limits_default(&limits);
    cqrs_error_t err;
    *errors = NULL;
    json_t *doc = cqrs_json_parse_object(body, len, 32, &err);
    if (!doc)
        return 400;
    cqrs_violations_t v;
    cqrs_violations_init(&v);
    create_product_input_t in;
    bool ok = product_validate_create(doc, &limits, &in, &v);
    int status = ok ? 0 : v.status;
    if (ok) {
        /* The event data carries exactly the validated input. */
        json_t *data = product_created_data("6f9619ff-8b86-4011-b42d-00c04fc964ff", &in);
        assert_string_equal(json_string_value(json_object_get(data, "sku")),
                            json_string_value(json_object_get(doc, "sku")));
        /* 1e3 is the integer 1000 (JSON Schema), and goes into the event as 1000. */
        assert_true(json_is_integer(json_object_get(data, "price_cents")));
        assert_true(json_number_value(json_object_get(data, "price_cents")) ==
                    json_number_value(json_object_get(doc, "price_cents")));
        assert_non_null(json_object_get(data, "description"));
        json_decref(data);
    }
    *errors = json_incref(v.errors);
    cqrs_violations_close(&v);
    json_decref(doc);
    return status;
}

static int run_dir(const char *kind, bool expect_valid)
{
    char dir[512];
    snprintf(dir, sizeof dir, "%s/create_product/%s", CQRS_TEST_DATA, kind);
    DIR *d = opendir(dir);
    assert_non_null(d);
    int cases = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char path[1024];
        size_t len = 0;
        snprintf(path, sizeof path, "%s/%s/input", dir, e->d_name);
        char *body = slurp(path, &len);
        assert_non_null(body);
        json_t *errors;
        int got = judge(body, len, &errors);
        if (expect_valid) {
            if (got != 0)
                fail_msg("case %s: expected valid, got %d", e->d_name, got);
        } else {
            snprintf(path, sizeof path, "%s/%s/status", dir, e->d_name);
            size_t slen;
            char *want = slurp(path, &slen);
            assert_non_null(want);
            if (got != atoi(want))
                fail_msg("case %s: expected %d, got %d", e->d_name, atoi(want), got);
            free(want);
            snprintf(path, sizeof path, "%s/%s/field", dir, e->d_name);
            char *field = slurp(path, &slen);
            if (field) {
                field[strcspn(field, "\n")] = '\0';
                bool named = false;
                size_t i;
                json_t *it;
                json_array_foreach(errors, i, it)
                {
                    const char *f = json_string_value(json_object_get(it, "field"));
                    named |= f && strcmp(f, field) == 0;
                }
                if (!named)
                    fail_msg("case %s: no error names field %s", e->d_name, field);
                free(field);
            }
        }
        json_decref(errors);
        free(body);
        cases++;
    }
    closedir(d);
    return cases;
}

static void test_valid_cases(void **state)
{
    (void)state;
    assert_true(run_dir("valid", true) >= 4);
}

static void test_invalid_cases(void **state)
{
    (void)state;
    assert_true(run_dir("invalid", false) >= 25);
}

static void test_all_violations_reported_together(void **state)
{
    (void)state;
    const char *body = "{\"sku\":\"a b\",\"name\":\"\",\"category\":\"t\",\"price_cents\":-5,"
                       "\"currency\":\"eur\",\"initial_stock\":1,\"id\":\"x\"}";
    json_t *errors;
    assert_int_equal(judge(body, strlen(body), &errors), 422);
    assert_int_equal(json_array_size(errors), 5); /* sku, name, price_cents, currency, id */
    json_decref(errors);
}

static void test_missing_field_outranks_semantic_errors(void **state)
{
    (void)state;
    const char *body = "{\"name\":\"\",\"category\":\"t\",\"price_cents\":1,\"currency\":\"EUR\","
                       "\"initial_stock\":1}";
    json_t *errors;
    assert_int_equal(judge(body, strlen(body), &errors), 400);
    assert_int_equal(json_array_size(errors), 2);
    json_decref(errors);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_cases),
        cmocka_unit_test(test_invalid_cases),
        cmocka_unit_test(test_all_violations_reported_together),
        cmocka_unit_test(test_missing_field_outranks_semantic_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
