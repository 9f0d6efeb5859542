/* Unit tests of the connection parameters libcqrs gives libpq (store.c cqrs__pg_connect, used
 * by the pool, the relay and the migrations): the DSN's own settings — TLS (sslmode,
 * sslrootcert, sslcert, sslkey), the password file, the hosts, target_session_attrs — reach
 * libpq as written, in a conninfo string and in a URI; only application_name and the bounded
 * waits (connect_timeout, keepalives, tcp_user_timeout) are libcqrs's and override the DSN's.
 *
 * PQconnectdbParams is replaced at link time (-Wl,--wrap): the fake resolves the arrays it is
 * given with libpq's own PQconnectStartParams + PQconninfo (the same expansion rules as a real
 * connect) and records the effective values per application_name. The hosts are hostaddr=
 * 127.0.0.1 port 1: nothing is looked up and nothing answers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include <cqrs/outbox.h>
#include <cqrs/store.h>
#include <libpq-fe.h>
#include <pthread.h>

#define MAX_OPTS 64

/* The effective options of the last connect made under one application_name. */
typedef struct seen {
    char app[64];
    int n;
    char key[MAX_OPTS][32];
    char val[MAX_OPTS][256];
} seen_t;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static seen_t seen[8];
static int n_seen;

PGconn *__wrap_PQconnectdbParams(const char *const *keywords, const char *const *values,
                                 int expand_dbname);

PGconn *__wrap_PQconnectdbParams(const char *const *keywords, const char *const *values,
                                 int expand_dbname)
{
    PGconn *c = PQconnectStartParams(keywords, values, expand_dbname);
    PQconninfoOption *opts = c ? PQconninfo(c) : NULL;
    seen_t s = {0};
    for (PQconninfoOption *o = opts; o && o->keyword && s.n < MAX_OPTS; o++) {
        if (!o->val)
            continue;
        snprintf(s.key[s.n], sizeof s.key[s.n], "%s", o->keyword);
        snprintf(s.val[s.n], sizeof s.val[s.n], "%s", o->val);
        if (strcmp(o->keyword, "application_name") == 0)
            snprintf(s.app, sizeof s.app, "%s", o->val);
        s.n++;
    }
    PQconninfoFree(opts);
    pthread_mutex_lock(&mu);
    int i = 0;
    while (i < n_seen && strcmp(seen[i].app, s.app) != 0)
        i++;
    if (i < (int)(sizeof seen / sizeof seen[0])) {
        seen[i] = s;
        if (i == n_seen)
            n_seen++;
    }
    pthread_mutex_unlock(&mu);
    /* Not CONNECTION_OK (still connecting, or refused): the caller reports it and frees it. */
    return c;
}

static int reset(void **state)
{
    (void)state;
    pthread_mutex_lock(&mu);
    n_seen = 0;
    memset(seen, 0, sizeof seen);
    pthread_mutex_unlock(&mu);
    return 0;
}

/* The value libpq would use for key on the last connect as app; NULL when unset or no such
 * connect. */
static const char *opt(const char *app, const char *key)
{
    static char out[256];
    const char *v = NULL;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < n_seen && !v; i++) {
        if (strcmp(seen[i].app, app) != 0)
            continue;
        for (int k = 0; k < seen[i].n; k++) {
            if (strcmp(seen[i].key[k], key) == 0) {
                snprintf(out, sizeof out, "%s", seen[i].val[k]);
                v = out;
                break;
            }
        }
    }
    pthread_mutex_unlock(&mu);
    return v;
}

static void assert_opt(const char *app, const char *key, const char *want)
{
    const char *v = opt(app, key);
    if (!v || strcmp(v, want) != 0)
        fail_msg("%s: %s is '%s', expected '%s'", app, key, v ? v : "(unset)", want);
}

/* A DSN that sets everything, including what libcqrs overrides. */
static const char *const FULL_DSN =
    "host=db.example.invalid hostaddr=127.0.0.1 port=1 dbname=app user=svc "
    "sslmode=verify-full sslrootcert=/etc/cqrs/ca.crt sslcert=/etc/cqrs/client.crt "
    "sslkey=/etc/cqrs/client.key passfile=/etc/cqrs/pgpass target_session_attrs=read-write "
    "application_name=from-dsn connect_timeout=60 keepalives=0";

static void ping_with(const char *dsn, const char *app)
{
    cqrs_store_config_t cfg = {.dsn = dsn,
                               .pool_size = 1,
                               .acquire_timeout_ms = 1000,
                               .statement_timeout_ms = 1000,
                               .lock_timeout_ms = 1000,
                               .connect_timeout_s = 3,
                               .max_tx_attempts = 1,
                               .application_name = app};
    cqrs_store_t *s = cqrs_store_new(&cfg);
    assert_non_null(s);
    cqrs_error_t err;
    assert_int_equal(cqrs_store_ping(s, &err), CQRS_ERR_UNAVAILABLE);
    assert_non_null(strstr(err.message, "cannot connect to PostgreSQL"));
    cqrs_store_destroy(s);
}

static void test_pool_keeps_the_dsn_tls_settings(void **state)
{
    (void)state;
    ping_with(FULL_DSN, "cqrs-commandd");
    assert_opt("cqrs-commandd", "host",
               "db.example.invalid"); /* the name the cert is checked for */
    assert_opt("cqrs-commandd", "hostaddr", "127.0.0.1");
    assert_opt("cqrs-commandd", "dbname", "app");
    assert_opt("cqrs-commandd", "user", "svc");
    assert_opt("cqrs-commandd", "sslmode", "verify-full");
    assert_opt("cqrs-commandd", "sslrootcert", "/etc/cqrs/ca.crt");
    assert_opt("cqrs-commandd", "sslcert", "/etc/cqrs/client.crt");
    assert_opt("cqrs-commandd", "sslkey", "/etc/cqrs/client.key");
    assert_opt("cqrs-commandd", "passfile", "/etc/cqrs/pgpass");
    assert_opt("cqrs-commandd", "target_session_attrs", "read-write");
}

/* A DSN libpq cannot parse: libpq's own error quotes the text it choked on (the control
 * shows it), which may be the password; ours never does, at start-up or on a connection. */
static void test_malformed_dsn_is_never_quoted(void **state)
{
    (void)state;
    const char *const dsns[][2] = {
        {"host=x password=hunter2 secretpart", "secretpart"},
        {"postgresql://u:hun%ZZter@h/db", "hun%ZZter"},
    };
    for (size_t i = 0; i < 2; i++) {
        char *why = NULL;
        assert_null(PQconninfoParse(dsns[i][0], &why)); /* control: libpq quotes it */
        assert_non_null(why);
        assert_non_null(strstr(why, dsns[i][1]));
        PQfreemem(why);
        cqrs_error_t err;
        assert_int_equal(cqrs_pg_dsn_check(dsns[i][0], &err), CQRS_ERR_CONFIG);
        assert_null(strstr(err.message, dsns[i][1]));
        assert_non_null(strstr(err.message, "CQRS_PG_DSN cannot be parsed"));
        cqrs_store_config_t cfg = {.dsn = dsns[i][0],
                                   .pool_size = 1,
                                   .acquire_timeout_ms = 1000,
                                   .connect_timeout_s = 1,
                                   .max_tx_attempts = 1};
        cqrs_store_t *s = cqrs_store_new(&cfg);
        assert_non_null(s);
        assert_int_not_equal(cqrs_store_ping(s, &err), CQRS_ERR_OK);
        assert_null(strstr(err.message, dsns[i][1]));
        assert_null(strstr(err.message, "hunter2"));
        cqrs_store_destroy(s);
    }
}

static void test_libcqrs_owns_the_name_and_the_waits(void **state)
{
    (void)state;
    ping_with(FULL_DSN, "cqrs-commandd");
    assert_null(opt("from-dsn", "application_name")); /* no connect under the DSN's name */
    assert_opt("cqrs-commandd", "connect_timeout", "3");
    assert_opt("cqrs-commandd", "keepalives", "1");
    assert_opt("cqrs-commandd", "tcp_user_timeout", "10000");
}

static void test_uri_and_multi_host_dsns(void **state)
{
    (void)state;
    ping_with("postgresql://svc@127.0.0.1:1/app?sslmode=verify-ca&sslrootcert=/ca.pem"
              "&passfile=/pgpass&target_session_attrs=primary",
              "uri");
    assert_opt("uri", "sslmode", "verify-ca");
    assert_opt("uri", "sslrootcert", "/ca.pem");
    assert_opt("uri", "passfile", "/pgpass");
    assert_opt("uri", "target_session_attrs", "primary");
    assert_opt("uri", "dbname", "app");
    ping_with("host=a.invalid,b.invalid hostaddr=127.0.0.1,127.0.0.1 port=1 dbname=app "
              "sslmode=require password=pw-in-dsn",
              "multi");
    assert_opt("multi", "host", "a.invalid,b.invalid");
    assert_opt("multi", "hostaddr", "127.0.0.1,127.0.0.1");
    assert_opt("multi", "sslmode", "require");
    assert_opt("multi", "password", "pw-in-dsn");
}

/* Negative control: the recorder sees a difference — a DSN without sslmode gets libpq's
 * default (prefer), so the assertions above could fail. */
static void test_control_default_sslmode_is_seen(void **state)
{
    (void)state;
    ping_with("host=127.0.0.1 port=1 dbname=app", "plain");
    assert_opt("plain", "sslmode", "prefer");
    assert_null(opt("plain", "sslrootcert"));
}

static void test_migrations_keep_the_dsn_tls_settings(void **state)
{
    (void)state;
    static const cqrs_embedded_file_t none[] = {{NULL, NULL}};
    int applied = -1;
    cqrs_error_t err;
    assert_int_equal(cqrs_store_migrate(FULL_DSN, none, &applied, &err), CQRS_ERR_UNAVAILABLE);
    assert_opt("cqrsctl-migrate", "sslmode", "verify-full");
    assert_opt("cqrsctl-migrate", "sslrootcert", "/etc/cqrs/ca.crt");
    assert_opt("cqrsctl-migrate", "passfile", "/etc/cqrs/pgpass");
    assert_opt("cqrsctl-migrate", "host", "db.example.invalid");
}

static void test_relay_keeps_the_dsn_tls_settings(void **state)
{
    (void)state;
    const char *topics[] = {"unit.events"};
    cqrs_relay_config_t cfg = {.dsn = FULL_DSN,
                               .brokers = "127.0.0.1:1",
                               .transactional_id = "unit-relay",
                               .poll_interval_ms = 50,
                               .topics = topics,
                               .n_topics = 1};
    cqrs_error_t err;
    cqrs_relay_t *r = cqrs_relay_new(&cfg, &err);
    assert_non_null(r);
    assert_int_equal(cqrs_relay_start(r, &err), CQRS_ERR_OK);
    for (int i = 0; i < 100 && !opt("cqrs-relay", "sslmode"); i++)
        usleep(50 * 1000);
    cqrs_relay_destroy(r);
    assert_opt("cqrs-relay", "application_name", "cqrs-relay");
    assert_opt("cqrs-relay", "sslmode", "verify-full");
    assert_opt("cqrs-relay", "sslrootcert", "/etc/cqrs/ca.crt");
    assert_opt("cqrs-relay", "sslcert", "/etc/cqrs/client.crt");
    assert_opt("cqrs-relay", "passfile", "/etc/cqrs/pgpass");
    assert_opt("cqrs-relay", "host", "db.example.invalid");
    assert_opt("cqrs-relay", "target_session_attrs", "read-write");
    assert_opt("cqrs-relay", "keepalives", "1");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_pool_keeps_the_dsn_tls_settings, reset),
        cmocka_unit_test_setup(test_libcqrs_owns_the_name_and_the_waits, reset),
        cmocka_unit_test_setup(test_malformed_dsn_is_never_quoted, reset),
        cmocka_unit_test_setup(test_uri_and_multi_host_dsns, reset),
        cmocka_unit_test_setup(test_control_default_sslmode_is_seen, reset),
        cmocka_unit_test_setup(test_migrations_keep_the_dsn_tls_settings, reset),
        cmocka_unit_test_setup(test_relay_keeps_the_dsn_tls_settings, reset),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
