/* test_redis.c — the Redis URL and the combination of Redis settings (libcqrs/src/redis.c),
 * without a server: what parses to what, what is refused, and that no refusal quotes the
 * password. The connection itself is tested against real servers in
 * tests/integration/test_redis_tls.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <cqrs/redis.h>

#define SECRET "s3cr3t-PW"

typedef struct valid_case {
    const char *url;
    bool tls;
    const char *host;
    int port, db;
    const char *user, *password;
} valid_case_t;

static const valid_case_t VALID[] = {
    {"redis://h", false, "h", 6379, 0, "", ""},
    {"redis://h/", false, "h", 6379, 0, "", ""},
    {"redis://127.0.0.1:16379/0", false, "127.0.0.1", 16379, 0, "", ""},
    {"redis://:pw@host:7000/3", false, "host", 7000, 3, "", "pw"},
    {"rediss://cqrs:pw@cache.example.com:6380/2", true, "cache.example.com", 6380, 2, "cqrs", "pw"},
    {"REDISS://h", true, "h", 6379, 0, "", ""},
    {"rediss://cqrs@localhost:46479/0", true, "localhost", 46479, 0, "cqrs", ""},
    /* percent-decoding of both, and the characters a password may hold once encoded */
    {"redis://app%2Duser:p%40ss%3Aw%2Fo%25rd@h", false, "h", 6379, 0, "app-user", "p@ss:w/o%rd"},
    /* unencoded '@' and ':' in the password still work: the last '@' ends the user info */
    {"redis://u:a@b:c@h:1/1", false, "h", 1, 1, "u", "a@b:c"},
    {"rediss://[::1]:6380/4", true, "::1", 6380, 4, "", ""},
    {"redis://[2001:db8::7]", false, "2001:db8::7", 6379, 0, "", ""},
    {"redis://h:65535/1000", false, "h", 65535, 1000, "", ""},
};

static void test_valid_urls(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof VALID / sizeof VALID[0]; i++) {
        const valid_case_t *c = &VALID[i];
        cqrs_redis_addr_t a;
        cqrs_error_t err = {0};
        if (cqrs_redis_url_parse(c->url, &a, &err) != CQRS_ERR_OK)
            fail_msg("%s: refused: %s", c->url, err.message);
        assert_int_equal(a.tls, c->tls);
        assert_string_equal(a.host, c->host);
        assert_int_equal(a.port, c->port);
        assert_int_equal(a.db, c->db);
        assert_string_equal(a.user, c->user);
        assert_string_equal(a.password, c->password);
    }
}

typedef struct invalid_case {
    const char *url;
    const char *says; /* a part of the message */
} invalid_case_t;

static const invalid_case_t INVALID[] = {
    {NULL, "must start with redis://"},
    {"", "must start with redis://"},
    {"http://h", "must start with redis://"},
    {"redis:/h", "must start with redis://"},
    {"redis://", "no host"},
    {"redis://:" SECRET "@", "no host"},
    {"redis://:" SECRET "@:6379", "no host"},
    {"redis://@h", "neither user nor password"},
    {"redis://h:0", "port"},
    {"redis://h:65536", "port"},
    {"redis://h:", "port"},
    {"redis://h:12x/0", "port"},
    {"redis://h:-1", "port"},
    {"redis://h/x", "database"},
    {"redis://h/-1", "database"},
    {"redis://h/1001", "database"},
    {"redis://h/1/2", "database"},
    {"redis://h/ 1", "database"},
    {"redis://h?password=" SECRET, "unexpected characters"},
    {"redis://h/0?password=" SECRET, "database"},
    {"redis://h#" SECRET, "unexpected characters"},
    {"redis://h h", "unexpected characters"},
    {"redis://[::1", "IPv6"},
    {"redis://[nonsense]:1", "IPv6"},
    {"redis://[]:1", "IPv6"},
    {"redis://u:" SECRET "%zz@h", "password is malformed"},
    {"redis://u:" SECRET "%4@h", "password is malformed"},
    {"redis://u:" SECRET "%00@h", "password is malformed"},
    {"redis://u:" SECRET "\n@h", "password is malformed"},
    {"redis://%zz:" SECRET "@h", "user name is malformed"},
};

static void test_invalid_urls_never_quote_the_password(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof INVALID / sizeof INVALID[0]; i++) {
        const invalid_case_t *c = &INVALID[i];
        cqrs_redis_addr_t a;
        cqrs_error_t err = {0};
        if (cqrs_redis_url_parse(c->url, &a, &err) != CQRS_ERR_CONFIG)
            fail_msg("%s: accepted", c->url ? c->url : "(null)");
        if (!strstr(err.message, c->says))
            fail_msg("%s: '%s' does not say '%s'", c->url, err.message, c->says);
        if (strstr(err.message, SECRET))
            fail_msg("%s: the message quotes the password: %s", c->url, err.message);
    }
}

static void test_long_user_info_is_refused(void **state)
{
    (void)state;
    char url[1024], pw[400];
    memset(pw, 'p', sizeof pw - 1);
    pw[sizeof pw - 1] = '\0';
    snprintf(url, sizeof url, "redis://u:%s@h", pw);
    cqrs_redis_addr_t a;
    cqrs_error_t err;
    assert_int_equal(cqrs_redis_url_parse(url, &a, &err), CQRS_ERR_CONFIG);
    assert_non_null(strstr(err.message, "longer than 255"));
    pw[255] = '\0'; /* 255 bytes fit */
    snprintf(url, sizeof url, "redis://u:%s@h", pw);
    assert_int_equal(cqrs_redis_url_parse(url, &a, &err), CQRS_ERR_OK);
    assert_int_equal(strlen(a.password), 255);
}

/* ---- the combination of settings (cqrs_redis_target_init, cqrs_redis_config_check) ---- */

static cqrs_err_t target(const char *url, const char *password, const char *ca, const char *cert,
                         const char *key, const char *name, cqrs_redis_target_t *t,
                         cqrs_error_t *err)
{
    cqrs_redis_config_t c = {(char *)url, (char *)password, (char *)ca, (char *)cert,
                             (char *)key, (char *)name,     NULL};
    cqrs_err_t rc = cqrs_redis_target_init(t, &c, err);
    if (rc != CQRS_ERR_OK)
        cqrs_redis_target_close(t);
    return rc;
}

static void test_password_from_its_setting(void **state)
{
    (void)state;
    cqrs_redis_target_t t;
    cqrs_error_t err;
    assert_int_equal(target("rediss://cqrs@h:1/0", SECRET, "", "", "", "", &t, &err), CQRS_ERR_OK);
    assert_string_equal(t.addr.user, "cqrs");
    assert_string_equal(t.addr.password, SECRET);
    assert_string_equal(t.server_name, "h"); /* the URL's host unless set */
    assert_null(t.tls_ca_file);
    cqrs_redis_target_close(&t);
    /* the default user with a password of its own */
    assert_int_equal(target("redis://h", SECRET, NULL, NULL, NULL, NULL, &t, &err), CQRS_ERR_OK);
    assert_string_equal(t.addr.user, "");
    assert_string_equal(t.addr.password, SECRET);
    cqrs_redis_target_close(&t);
}

static void test_tls_settings_are_kept(void **state)
{
    (void)state;
    cqrs_redis_target_t t;
    cqrs_error_t err;
    assert_int_equal(target("rediss://u:pw@10.0.0.1:6380", NULL, "/ca.pem", "/c.pem", "/k.pem",
                            "redis.internal", &t, &err),
                     CQRS_ERR_OK);
    assert_string_equal(t.server_name, "redis.internal");
    assert_string_equal(t.tls_ca_file, "/ca.pem");
    assert_string_equal(t.tls_cert_file, "/c.pem");
    assert_string_equal(t.tls_key_file, "/k.pem");
    cqrs_redis_target_close(&t);
}

typedef struct bad_combination {
    const char *url, *password, *ca, *cert, *key, *name;
    const char *says;
} bad_combination_t;

static const bad_combination_t BAD[] = {
    /* a user needs a password; the old password-only form is not quoted back as a user */
    {"rediss://cqrs@h", "", "", "", "", "", "no password is given"},
    {"redis://" SECRET "@h", "", "", "", "", "", "a password alone is redis://:password@host"},
    /* the password is given once */
    {"redis://:" SECRET "@h", "other", "", "", "", "", "CQRS_REDIS_PASSWORD"},
    /* TLS settings with a plain-text URL: never silently plain text */
    {"redis://h", "", "/ca.pem", "", "", "", "CQRS_REDIS_TLS_CA_FILE is set but"},
    {"redis://h", "", "", "/c.pem", "/k.pem", "", "CQRS_REDIS_TLS_CERT_FILE is set but"},
    {"redis://h", "", "", "", "", "name", "CQRS_REDIS_TLS_SERVER_NAME is set but"},
    /* a certificate without its key, a key without its certificate */
    {"rediss://h", "", "", "/c.pem", "", "", "go together"},
    {"rediss://h", "", "", "", "/k.pem", "", "go together"},
    /* the URL's own errors name the setting */
    {"redis://u:" SECRET "@h:0", "", "", "", "", "", "CQRS_REDIS_URL: "},
};

static void test_bad_combinations_name_the_setting(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof BAD / sizeof BAD[0]; i++) {
        const bad_combination_t *b = &BAD[i];
        cqrs_redis_target_t t;
        cqrs_error_t err = {0};
        if (target(b->url, b->password, b->ca, b->cert, b->key, b->name, &t, &err) !=
            CQRS_ERR_CONFIG)
            fail_msg("case %zu (%s) accepted", i, b->says);
        if (!strstr(err.message, b->says))
            fail_msg("case %zu: '%s' does not say '%s'", i, err.message, b->says);
        if (strstr(err.message, SECRET))
            fail_msg("case %zu quotes the password: %s", i, err.message);
        /* cqrs_redis_config_check refuses the same */
        cqrs_redis_config_t c = {
            (char *)b->url, (char *)b->password, (char *)b->ca, (char *)b->cert,
            (char *)b->key, (char *)b->name,     NULL};
        assert_int_equal(cqrs_redis_config_check(&c, &err), CQRS_ERR_CONFIG);
    }
}

/* Start-up checks that the TLS files load (cqrs_redis_config_check). */
static void test_unreadable_tls_files_are_configuration_errors(void **state)
{
    (void)state;
    cqrs_error_t err;
    char url[] = "rediss://h", none[] = "/nonexistent/ca.pem", empty[] = "";
    cqrs_redis_config_t c = {url, empty, none, empty, empty, empty, NULL};
    assert_int_equal(cqrs_redis_config_check(&c, &err), CQRS_ERR_CONFIG);
    assert_non_null(strstr(err.message, "CQRS_REDIS_TLS_CA_FILE: cannot read /nonexistent/ca.pem: "
                                        "No such file or directory"));
    /* a file that holds no certificate */
    char self[] = __FILE__;
    c.tls_ca_file = self;
    assert_int_equal(cqrs_redis_config_check(&c, &err), CQRS_ERR_CONFIG);
    assert_non_null(strstr(err.message, "CQRS_REDIS_TLS_CA_FILE"));
    /* no CA file: the system's trust store (present on Debian: ca-certificates) */
    c.tls_ca_file = empty;
    assert_int_equal(cqrs_redis_config_check(&c, &err), CQRS_ERR_OK);
    c.tls_cert_file = none;
    c.tls_key_file = none;
    assert_int_equal(cqrs_redis_config_check(&c, &err), CQRS_ERR_CONFIG);
    assert_non_null(strstr(err.message, "CQRS_REDIS_TLS_CERT_FILE: cannot read"));
    /* plain text needs no files at all */
    char plain[] = "redis://h";
    cqrs_redis_config_t p = {plain, NULL, NULL, NULL, NULL, NULL, NULL};
    assert_int_equal(cqrs_redis_config_check(&p, &err), CQRS_ERR_OK);
}

/* CQRS_REDIS_PREFIX: unset means "cqrs"; anything that could break a key or a hash tag (":",
 * "{", "}", spaces, glob characters) or is too long is a configuration error. */
static void test_key_prefix_is_checked(void **state)
{
    (void)state;
    cqrs_error_t err;
    cqrs_redis_target_t t;
    char url[] = "redis://h";
    cqrs_redis_config_t c = {url, NULL, NULL, NULL, NULL, NULL, NULL};
    assert_int_equal(cqrs_redis_target_init(&t, &c, &err), CQRS_ERR_OK);
    assert_string_equal(t.prefix, "cqrs");
    cqrs_redis_target_close(&t);
    char good[] = "shop-eu_1.prod";
    c.prefix = good;
    assert_int_equal(cqrs_redis_target_init(&t, &c, &err), CQRS_ERR_OK);
    assert_string_equal(t.prefix, good);
    cqrs_redis_target_close(&t);
    const char *bad[] = {"a:b", "a{b", "a}b",  "a b",
                         "a*",  "a?",  "a[b]", "123456789012345678901234567890123"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        c.prefix = (char *)bad[i];
        assert_int_equal(cqrs_redis_target_init(&t, &c, &err), CQRS_ERR_CONFIG);
        assert_non_null(strstr(err.message, "CQRS_REDIS_PREFIX"));
        cqrs_redis_target_close(&t);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_urls),
        cmocka_unit_test(test_invalid_urls_never_quote_the_password),
        cmocka_unit_test(test_long_user_info_is_refused),
        cmocka_unit_test(test_password_from_its_setting),
        cmocka_unit_test(test_tls_settings_are_kept),
        cmocka_unit_test(test_bad_combinations_name_the_setting),
        cmocka_unit_test(test_unreadable_tls_files_are_configuration_errors),
        cmocka_unit_test(test_key_prefix_is_checked),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
