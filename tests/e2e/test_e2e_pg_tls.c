/* End-to-end tests of the daemons over PostgreSQL TLS, on the TLS profile of the local stack
 * (stack.sh up --tls; labels e2e and tls), in a PostgreSQL database of their own:
 *  - a running cqrs-commandd whose relay leads: every connection of its pool
 *    (application_name cqrs-commandd) and of its relay (cqrs-relay) is TLS in pg_stat_ssl, and
 *    a product created through it reaches the query side (relay → Kafka → projector);
 *    control: a plain connection under the pool's name (the stack's unix socket) is caught by
 *    the same check;
 *  - a cqrs-commandd given a DSN the server or the client must refuse — a host name the
 *    certificate does not name, a client trusting another CA, no TLS — stays not ready
 *    (/readyz 503 saying why, cqrs_dependency_up{postgres} 0), logs why, and never shows the
 *    password (given in the DSN, password=) in its log, /readyz or /metrics; control for each:
 *    the same DSN with the check weakened (verify-ca; the test CA; sslmode=require) becomes
 *    ready;
 *  - cqrsctl with a refused DSN exits 3 naming the reason, without the password; control: the
 *    test CA; --help and a bad configuration print no password either; control of the
 *    search: a password put in a setting that is echoed (a bad CQRS_PG_POOL_SIZE) is found. */
#include <libpq-fe.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include <cqrs/util.h>

#include "daemons.h"
#include "httpc.h"
#include "testenv.h"

static daemons_t D;
static testdb_t DB;
static const char *tls_dir;
static char password[128];

/* The password in the stack's password file (passfile= of CQRS_PG_DSN, one line
 * host:port:db:user:password, the password without ':' or '\'). */
static int read_password(const char *dsn)
{
    const char *p = strstr(dsn, "passfile=");
    if (!p)
        return -1;
    char path[512];
    snprintf(path, sizeof path, "%s", p + strlen("passfile="));
    path[strcspn(path, " ")] = '\0';
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    char line[512] = "";
    char *ok = fgets(line, sizeof line, f);
    fclose(f);
    line[strcspn(line, "\r\n")] = '\0';
    char *last = strrchr(line, ':');
    if (!ok || !last || strlen(last + 1) < 8)
        return -1;
    snprintf(password, sizeof password, "%s", last + 1);
    return 0;
}

static int setup(void **state)
{
    (void)state;
    testenv_require_stack();
    tls_dir = testenv_require_tls();
    testenv_require("CQRS_STACK_DIR");
    if (!strstr(getenv("CQRS_PG_DSN"), "sslmode=verify-full") ||
        read_password(getenv("CQRS_PG_DSN")) != 0) {
        fprintf(stderr, "not the TLS profile's DSN, or no password file: %s\n",
                getenv("CQRS_PG_DSN"));
        return -1;
    }
    testdb_create(&DB, "pgtls");
    return daemons_start(&D);
}

static int teardown(void **state)
{
    (void)state;
    daemons_stop(&D);
    testdb_drop(&DB);
    return 0;
}

/* A file's content (malloc'ed, caller frees); "" when unreadable. */
static char *slurp(const char *path)
{
    FILE *f = fopen(path, "r");
    char *buf = NULL;
    size_t len = 0, cap = 0;
    char chunk[4096];
    size_t n;
    while (f && (n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (len + n + 1 > cap) {
            cap = (len + n + 1) * 2;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
        memcpy(buf + len, chunk, n);
        len += n;
    }
    if (f)
        fclose(f);
    if (!buf)
        buf = strdup("");
    else
        buf[len] = '\0';
    return buf;
}

static void assert_no_password(const char *what, const char *text)
{
    if (strstr(text, password))
        fail_msg("the PostgreSQL password appears in %s", what);
}

/* Connections of this test's database by role: TLS ones of the pool and the relay, and
 * plain ones of either. */
typedef struct conns {
    long long pool_tls, relay_tls, plain;
} conns_t;

static conns_t count_conns(void)
{
    conns_t c = {-1, -1, -1};
    char *s = pg_text("SELECT format('%s %s %s',"
                      " count(*) FILTER (WHERE a.application_name = 'cqrs-commandd' AND s.ssl),"
                      " count(*) FILTER (WHERE a.application_name = 'cqrs-relay' AND s.ssl),"
                      " count(*) FILTER (WHERE NOT s.ssl))"
                      " FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)"
                      " WHERE a.datname = $1"
                      " AND a.application_name IN ('cqrs-commandd', 'cqrs-relay')",
                      DB.name);
    if (s && sscanf(s, "%lld %lld %lld", &c.pool_tls, &c.relay_tls, &c.plain) != 3)
        c.pool_tls = c.relay_tls = c.plain = -1;
    free(s);
    return c;
}

static int get_status(int port, const char *path, char **body)
{
    httpc_response_t r;
    int st = httpc_request(port, "GET", path, NULL, NULL, 0, &r) == 0 ? r.status : 0;
    if (body)
        *body = strdup(r.body ? r.body : "");
    httpc_response_free(&r);
    return st;
}

static void test_daemon_connections_use_tls(void **state)
{
    (void)state;
    /* a command through the pool, its event through the relay to the query side */
    char id[37], body[256], path[128];
    cqrs_uuid_v4(id);
    snprintf(body, sizeof body,
             "{\"sku\":\"TLS-%.8s\",\"name\":\"Over TLS\",\"category\":\"tls\","
             "\"price_cents\":100,\"currency\":\"EUR\",\"initial_stock\":1}",
             id);
    httpc_response_t r;
    httpc_request(D.cport, "POST", "/v1/products", "Content-Type: application/json\r\n", body,
                  strlen(body), &r);
    assert_int_equal(r.status, 201);
    json_t *j = json_loads(r.body, 0, NULL);
    httpc_response_free(&r);
    assert_non_null(j);
    snprintf(path, sizeof path, "/v1/products/%s", json_string_value(json_object_get(j, "id")));
    json_decref(j);
    int st = 0;
    for (int i = 0; i < 300 && st != 200; i++) {
        st = get_status(D.qport, path, NULL);
        if (st != 200)
            usleep(100 * 1000);
    }
    assert_int_equal(st, 200);
    long long leader = -1;
    for (int i = 0; i < 100 && leader != 1; i++) {
        leader = daemons_metric(D.cport, "cqrs_relay_leader");
        if (leader != 1)
            usleep(100 * 1000);
    }
    assert_int_equal(leader, 1);

    conns_t c = count_conns();
    if (c.pool_tls < 1 || c.relay_tls < 1 || c.plain != 0)
        fail_msg("connections of %s: pool over TLS %lld, relay over TLS %lld, plain %lld", DB.name,
                 c.pool_tls, c.relay_tls, c.plain);

    /* control: a plain connection under the pool's name is caught by the same check */
    char dsn[1024];
    snprintf(dsn, sizeof dsn, "%s host=%s/pg/sock application_name=cqrs-commandd", DB.dsn,
             getenv("CQRS_STACK_DIR"));
    PGconn *plain = PQconnectdb(dsn);
    assert_int_equal(PQstatus(plain), CONNECTION_OK);
    c = count_conns();
    PQfinish(plain);
    assert_int_equal(c.plain, 1);
}

typedef struct refusal {
    const char *name;
    const char *bad;     /* appended to the DSN: refused */
    const char *why;     /* in /readyz and the log */
    const char *control; /* appended instead: the check weakened, ready */
} refusal_t;

static void check_refusal(const refusal_t *c)
{
    char env[1400], log[256], name[64];
    /* the password in the DSN itself, where a careless log line would show it */
    snprintf(env, sizeof env, "CQRS_PG_DSN=%s password=%s %s", DB.dsn, password, c->bad);
    snprintf(name, sizeof name, "refused-%s", c->name);
    snprintf(log, sizeof log, "%s/%s.log", D.logdir, name);
    int port = free_port();
    pid_t pid = daemons_launch_commandd(&D, port, env, name);
    assert_true(pid > 0);
    int st = 0;
    char *readyz = NULL, *text = NULL;
    for (int i = 0; i < 200; i++) {
        free(readyz);
        free(text);
        st = get_status(port, "/readyz", &readyz);
        text = slurp(log);
        if (st == 503 && strstr(readyz, c->why) && strstr(text, c->why))
            break;
        usleep(100 * 1000);
    }
    char *metrics = NULL;
    int mst = get_status(port, "/metrics", &metrics);
    int rc = daemons_stop_one(&pid);
    free(text);
    text = slurp(log); /* with the shutdown */
    if (st != 503 || !strstr(readyz, c->why))
        fail_msg("%s: /readyz %d %s (expected 503 saying '%s')", c->name, st, readyz, c->why);
    if (!strstr(text, c->why))
        fail_msg("%s: no log line says '%s':\n%s", c->name, c->why, text);
    assert_int_equal(mst, 200);
    assert_non_null(strstr(metrics, "cqrs_dependency_up{dependency=\"postgres\"} 0"));
    assert_int_equal(rc, 0);
    assert_no_password("the log", text);
    assert_no_password("/readyz", readyz);
    assert_no_password("/metrics", metrics);
    free(readyz);
    free(metrics);
    free(text);

    /* control: the same DSN and password with the check weakened */
    snprintf(env, sizeof env, "CQRS_PG_DSN=%s password=%s %s", DB.dsn, password, c->control);
    snprintf(name, sizeof name, "control-%s", c->name);
    pid = daemons_spawn_commandd(&D, free_port(), env, name);
    if (pid <= 0)
        fail_msg("%s: control '%s' did not become ready", c->name, c->control);
    assert_int_equal(daemons_stop_one(&pid), 0);
}

static void test_refused_tls_configs_keep_the_daemon_not_ready(void **state)
{
    (void)state;
    char other_ca[600], ca[600];
    snprintf(other_ca, sizeof other_ca, "sslrootcert=%s/other-ca.crt", tls_dir);
    snprintf(ca, sizeof ca, "sslrootcert=%s/ca.crt", tls_dir);
    const refusal_t cases[] = {
        {"host-name", "host=not-this-host.invalid hostaddr=127.0.0.1", "does not match host name",
         "host=not-this-host.invalid hostaddr=127.0.0.1 sslmode=verify-ca"},
        {"other-ca", other_ca, "certificate verify failed", ca},
        {"no-tls", "sslmode=disable", "no pg_hba.conf entry", "sslmode=require"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        check_refusal(&cases[i]);
}

/* Runs a shell command, returns its exit status and its output (stdout and stderr). */
static int run(const char *cmd, char **out)
{
    char full[2400];
    snprintf(full, sizeof full, "%s 2>&1", cmd);
    FILE *p = popen(full, "r");
    assert_non_null(p);
    static char buf[65536];
    size_t n = fread(buf, 1, sizeof buf - 1, p);
    buf[n] = '\0';
    int st = pclose(p);
    *out = strdup(buf);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_tools_never_print_the_password(void **state)
{
    (void)state;
    char cmd[2400], *out = NULL;
    /* cqrsctl refused by the chain check: exit 3 (dependency unavailable), saying why */
    snprintf(cmd, sizeof cmd,
             "CQRS_PG_DSN='%s password=%s sslrootcert=%s/other-ca.crt' CQRS_TOPIC_PREFIX=%s "
             "%s migrate",
             DB.dsn, password, tls_dir, D.prefix, CQRS_CTL);
    assert_int_equal(run(cmd, &out), 3);
    assert_non_null(strstr(out, "certificate verify failed"));
    assert_no_password("cqrsctl's error", out);
    free(out);
    /* control: the test CA */
    snprintf(cmd, sizeof cmd,
             "CQRS_PG_DSN='%s password=%s sslrootcert=%s/ca.crt' CQRS_TOPIC_PREFIX=%s %s migrate",
             DB.dsn, password, tls_dir, D.prefix, CQRS_CTL);
    assert_int_equal(run(cmd, &out), 0);
    free(out);

    /* --help and a bad configuration */
    snprintf(cmd, sizeof cmd, "CQRS_PG_DSN='%s password=%s' %s --help", DB.dsn, password,
             CQRS_COMMANDD);
    assert_int_equal(run(cmd, &out), 0);
    assert_non_null(strstr(out, "CQRS_PG_DSN"));
    assert_no_password("--help", out);
    free(out);
    snprintf(cmd, sizeof cmd, "CQRS_PG_DSN='%s password=%s' CQRS_PG_POOL_SIZE=0 %s", DB.dsn,
             password, CQRS_COMMANDD);
    assert_int_equal(run(cmd, &out), 2);
    assert_non_null(strstr(out, "CQRS_PG_POOL_SIZE"));
    assert_no_password("the configuration errors", out);
    free(out);
    /* control of the search: a setting that is echoed back does show it */
    snprintf(cmd, sizeof cmd, "CQRS_PG_DSN='%s' CQRS_PG_POOL_SIZE='%s' %s", DB.dsn, password,
             CQRS_COMMANDD);
    assert_int_equal(run(cmd, &out), 2);
    assert_non_null(strstr(out, password));
    free(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_daemon_connections_use_tls),
        cmocka_unit_test(test_refused_tls_configs_keep_the_daemon_not_ready),
        cmocka_unit_test(test_tools_never_print_the_password),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
