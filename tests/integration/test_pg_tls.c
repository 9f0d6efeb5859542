/* Integration tests of PostgreSQL over TLS, through the store's pool (store.c), against the TLS
 * profile of the local stack (stack.sh up --tls: CQRS_STACK_TLS=1, CQRS_TLS_DIR, a CQRS_PG_DSN
 * with sslmode=verify-full, sslrootcert and passfile). Labels integration and tls; on another
 * stack they fail under CI=true (testenv_require), they never pass by skipping.
 *
 * Each refusal has its negative control, the same DSN with only the checked thing changed or
 * the check weakened, which connects:
 *  - the pool's connection is TLS (pg_stat_ssl of its own backend); control: a connection over
 *    the stack's unix socket (no TLS there) reads ssl = false through the same query;
 *  - no TLS (sslmode=disable): refused by pg_hba (no `host` line); control: sslmode=require;
 *  - a client trusting only another CA: refused by the chain check, verify-ca too; control:
 *    the test CA;
 *  - a host name the certificate does not name (host=not-this-host.invalid, hostaddr= the
 *    server's address): refused by the name check; controls: verify-ca (chain only) connects,
 *    and verify-full by the names the certificate holds (localhost, 127.0.0.1) connects;
 *  - no password, or a wrong one: refused (SCRAM, not trust); control: the stack's passfile.
 * The DSN is varied by appending keywords (libpq: the last value wins), so CQRS_PG_DSN must be
 * a conninfo string (the stack's is), not a URI. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include <cqrs/store.h>

#include "testenv.h"

static const char *dsn, *tls_dir, *stack_dir;

static int setup(void **state)
{
    (void)state;
    tls_dir = testenv_require_tls();
    stack_dir = testenv_require("CQRS_STACK_DIR");
    testenv_require("CQRS_PG_PORT");
    dsn = testenv_require("CQRS_PG_DSN");
    if (!strstr(dsn, "sslmode=verify-full")) {
        fprintf(stderr, "not the TLS profile's DSN: %s\n", dsn);
        return -1;
    }
    return 0;
}

typedef struct probe {
    char ssl[8], version[16], min_version[16];
} probe_t;

static cqrs_err_t probe_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    probe_t *p = ud;
    cqrs_rows_t *rows = NULL;
    cqrs_err_t rc = cqrs_tx_exec(tx,
                                 "SELECT s.ssl::text, coalesce(s.version, ''),"
                                 " current_setting('ssl_min_protocol_version')"
                                 " FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()",
                                 0, NULL, &rows, err);
    if (rc == CQRS_ERR_OK && cqrs_rows_count(rows) == 1) {
        snprintf(p->ssl, sizeof p->ssl, "%s", cqrs_rows_get(rows, 0, 0));
        snprintf(p->version, sizeof p->version, "%s", cqrs_rows_get(rows, 0, 1));
        snprintf(p->min_version, sizeof p->min_version, "%s", cqrs_rows_get(rows, 0, 2));
    }
    cqrs_rows_free(rows);
    return rc;
}

/* Connects a one-connection pool with the stack's DSN plus `extra` and asks its backend
 * whether it is TLS; the error (UNAVAILABLE when refused) in err. */
static cqrs_err_t try_dsn(const char *extra, probe_t *p, cqrs_error_t *err)
{
    char d[1024];
    snprintf(d, sizeof d, "%s %s", dsn, extra);
    cqrs_store_config_t cfg = {.dsn = d,
                               .pool_size = 1,
                               .acquire_timeout_ms = 2000,
                               .statement_timeout_ms = 5000,
                               .lock_timeout_ms = 1000,
                               .connect_timeout_s = 3,
                               .max_tx_attempts = 1,
                               .application_name = "test_pg_tls"};
    cqrs_store_t *s = cqrs_store_new(&cfg);
    assert_non_null(s);
    memset(p, 0, sizeof *p);
    cqrs_error_clear(err);
    cqrs_err_t rc = cqrs_store_run_tx(s, probe_tx, p, err);
    cqrs_store_destroy(s);
    return rc;
}

static void assert_tls(const char *extra)
{
    probe_t p;
    cqrs_error_t err;
    cqrs_err_t rc = try_dsn(extra, &p, &err);
    if (rc != CQRS_ERR_OK)
        fail_msg("'%s' should connect: %s", extra, err.message);
    assert_string_equal(p.ssl, "true");
    if (strcmp(p.version, "TLSv1.2") != 0 && strcmp(p.version, "TLSv1.3") != 0)
        fail_msg("TLS version %s", p.version);
}

static void assert_refused(const char *extra, const char *why)
{
    probe_t p;
    cqrs_error_t err;
    cqrs_err_t rc = try_dsn(extra, &p, &err);
    if (rc == CQRS_ERR_OK)
        fail_msg("'%s' connected (ssl=%s), it must be refused (%s)", extra, p.ssl, why);
    assert_int_equal(rc, CQRS_ERR_UNAVAILABLE);
    if (!strstr(err.message, why))
        fail_msg("'%s' refused for another reason than '%s': %s", extra, why, err.message);
    /* the error names the server, never the secret */
    assert_null(strstr(err.message, "password="));
}

static void test_pool_connection_is_tls(void **state)
{
    (void)state;
    probe_t p;
    cqrs_error_t err;
    assert_int_equal(try_dsn("", &p, &err), CQRS_ERR_OK);
    assert_string_equal(p.ssl, "true");
    assert_string_equal(p.min_version, "TLSv1.2");
    assert_tls("");
}

/* Control of the check above: a connection without TLS reads false through the same query
 * (the stack's unix socket, where libpq does no TLS whatever sslmode says). */
static void test_control_socket_connection_is_not_tls(void **state)
{
    (void)state;
    char extra[600];
    snprintf(extra, sizeof extra, "host=%s/pg/sock", stack_dir);
    probe_t p;
    cqrs_error_t err;
    if (try_dsn(extra, &p, &err) != CQRS_ERR_OK)
        fail_msg("socket: %s", err.message);
    assert_string_equal(p.ssl, "false");
}

static void test_plain_tcp_is_refused(void **state)
{
    (void)state;
    assert_refused("sslmode=disable", "no pg_hba.conf entry");
    assert_refused("sslmode=disable", "no encryption");
    assert_tls("sslmode=require"); /* control: the same DSN, with TLS */
}

static void test_untrusted_ca_is_refused(void **state)
{
    (void)state;
    char extra[600];
    snprintf(extra, sizeof extra, "sslrootcert=%s/other-ca.crt", tls_dir);
    assert_refused(extra, "certificate verify failed");
    snprintf(extra, sizeof extra, "sslrootcert=%s/other-ca.crt sslmode=verify-ca", tls_dir);
    assert_refused(extra, "certificate verify failed"); /* the chain alone refuses it */
    snprintf(extra, sizeof extra, "sslrootcert=%s/ca.crt", tls_dir);
    assert_tls(extra); /* control: only the trust anchor differs */
}

static void test_wrong_host_name_is_refused(void **state)
{
    (void)state;
    /* hostaddr= connects to the server without a name lookup; host= is the name libpq checks
     * the certificate against (and the password file's host) */
    assert_refused("host=not-this-host.invalid hostaddr=127.0.0.1", "does not match host name");
    /* controls: the chain alone (verify-ca) accepts the same server, so the refusal above is
     * the name check; and the names the certificate holds pass it */
    assert_tls("host=not-this-host.invalid hostaddr=127.0.0.1 sslmode=verify-ca");
    assert_tls("host=localhost hostaddr=127.0.0.1");
    assert_tls("host=127.0.0.1");
}

/* With several hosts libpq reports each attempt; the one refused for TLS is in the error even
 * when an earlier host failed otherwise. */
static void test_each_host_reason_is_reported(void **state)
{
    (void)state;
    char extra[600];
    snprintf(extra, sizeof extra, "host=127.0.0.1,localhost port=1,%s sslrootcert=%s/other-ca.crt",
             getenv("CQRS_PG_PORT"), tls_dir);
    assert_refused(extra, "port 1 failed: Connection refused");
    assert_refused(extra, "certificate verify failed");
    snprintf(extra, sizeof extra, "host=127.0.0.1,localhost port=1,%s", getenv("CQRS_PG_PORT"));
    assert_tls(extra); /* control: the second host with the test CA */
}

/* password files of test_password_is_required, removed by the group teardown (also when an
 * assertion failed) */
static char empty[] = "/tmp/test_pg_tls_empty_XXXXXX", wrong[] = "/tmp/test_pg_tls_wrong_XXXXXX";

static int teardown(void **state)
{
    (void)state;
    if (!strstr(empty, "XXXXXX"))
        unlink(empty);
    if (!strstr(wrong, "XXXXXX"))
        unlink(wrong);
    return 0;
}

static void test_password_is_required(void **state)
{
    (void)state;
    int fe = mkstemp(empty), fw = mkstemp(wrong);
    assert_true(fe >= 0 && fw >= 0);
    const char line[] = "*:*:*:*:not-the-password\n";
    assert_int_equal(write(fw, line, sizeof line - 1), (ssize_t)(sizeof line - 1));
    close(fe);
    close(fw);
    char extra[600];
    snprintf(extra, sizeof extra, "passfile=%s", empty);
    assert_refused(extra, "no password supplied");
    snprintf(extra, sizeof extra, "passfile=%s", wrong);
    assert_refused(extra, "password authentication failed");
    assert_tls(""); /* control: the stack's own password file */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pool_connection_is_tls),
        cmocka_unit_test(test_control_socket_connection_is_not_tls),
        cmocka_unit_test(test_plain_tcp_is_refused),
        cmocka_unit_test(test_untrusted_ca_is_refused),
        cmocka_unit_test(test_wrong_host_name_is_refused),
        cmocka_unit_test(test_each_host_reason_is_reported),
        cmocka_unit_test(test_password_is_required),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
