/* Unit tests of config.c: defaults, ranges, enums, booleans, secrets from files, all errors
 * reported at once. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include <cqrs/config.h>

typedef struct kv {
    const char *k, *v;
} kv_t;

static const char *lookup(const char *name, void *ud)
{
    for (kv_t *e = ud; e->k; e++)
        if (strcmp(e->k, name) == 0)
            return e->v;
    return NULL;
}

static struct {
    char *s;
    int64_t i;
    bool b;
    char *role;
    char *secret;
} V;

static const cqrs_config_entry_t T[] = {
    {"S", CQRS_CONFIG_STRING, "dflt", 0, 0, "a string", &V.s, NULL},
    {"I", CQRS_CONFIG_INT, "5", 1, 10, "an int", &V.i, NULL},
    {"B", CQRS_CONFIG_BOOL, "false", 0, 0, "a bool", &V.b, NULL},
    {"ROLE", CQRS_CONFIG_ENUM, "both", 0, 0, "an enum", &V.role, "serve|project|both"},
    {"SECRET", CQRS_CONFIG_SECRET, NULL, 0, 0, "a secret", &V.secret, NULL},
};
#define N (sizeof T / sizeof T[0])

static void test_defaults_and_values(void **state)
{
    (void)state;
    kv_t env[] = {{"I", "7"}, {"B", "yes"}, {"SECRET", "pw"}, {NULL, NULL}};
    assert_int_equal(cqrs_config_load(T, N, lookup, env, NULL), 0);
    assert_string_equal(V.s, "dflt");
    assert_int_equal(V.i, 7);
    assert_true(V.b);
    assert_string_equal(V.role, "both");
    assert_string_equal(V.secret, "pw");
    cqrs_config_free(T, N);
    assert_null(V.s);
}

static void test_every_bad_value_is_reported(void **state)
{
    (void)state;
    kv_t env[] = {{"I", "11"}, {"B", "maybe"}, {"ROLE", "read"}, {NULL, NULL}};
    char buf[1024] = "";
    FILE *f = fmemopen(buf, sizeof buf, "w");
    /* I out of range, B not a bool, ROLE not a choice, SECRET missing: four errors. */
    assert_int_equal(cqrs_config_load(T, N, lookup, env, f), 4);
    fclose(f);
    assert_non_null(strstr(buf, "I: 11 is outside 1..10"));
    assert_non_null(strstr(buf, "B: 'maybe'"));
    assert_non_null(strstr(buf, "ROLE: 'read'"));
    assert_non_null(strstr(buf, "SECRET: required"));
    cqrs_config_free(T, N);
}

static void test_int_rejects_junk(void **state)
{
    (void)state;
    kv_t env[] = {{"I", "5x"}, {"SECRET", "x"}, {NULL, NULL}};
    assert_int_equal(cqrs_config_load(T, N, lookup, env, NULL), 1);
    kv_t env2[] = {{"I", "99999999999999999999999"}, {"SECRET", "x"}, {NULL, NULL}};
    assert_int_equal(cqrs_config_load(T, N, lookup, env2, NULL), 1);
    cqrs_config_free(T, N);
}

static void test_secret_from_file(void **state)
{
    (void)state;
    char path[] = "/tmp/cqrs-secret-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "s3cret\n", 7), 7);
    close(fd);
    kv_t env[] = {{"SECRET", "ignored"}, {"SECRET_FILE", path}, {NULL, NULL}};
    assert_int_equal(cqrs_config_load(T, N, lookup, env, NULL), 0);
    assert_string_equal(V.secret, "s3cret");
    unlink(path);
    kv_t env2[] = {{"SECRET_FILE", "/nonexistent/file"}, {NULL, NULL}};
    assert_int_equal(cqrs_config_load(T, N, lookup, env2, NULL), 1);
    cqrs_config_free(T, N);
}

static void test_help_never_prints_secret_values(void **state)
{
    (void)state;
    char buf[4096] = "";
    FILE *f = fmemopen(buf, sizeof buf, "w");
    cqrs_config_print_help(T, N, f);
    fclose(f);
    assert_non_null(strstr(buf, "SECRET"));
    assert_non_null(strstr(buf, "(or SECRET_FILE)"));
    assert_non_null(strstr(buf, "range: 1..10"));
    assert_non_null(strstr(buf, "one of: serve|project|both"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_and_values),
        cmocka_unit_test(test_every_bad_value_is_reported),
        cmocka_unit_test(test_int_rejects_junk),
        cmocka_unit_test(test_secret_from_file),
        cmocka_unit_test(test_help_never_prints_secret_values),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
