/* Kafka security against the real broker of the TLS stack (`stack.sh up --tls`, label tls):
 * SASL_SSL with SCRAM-SHA-512 on CQRS_KAFKA_BROKERS, mutual TLS on CQRS_KAFKA_MTLS_PORT.
 *
 *  - the round trip: cqrsctl creates the topics, cqrs-commandd's relay publishes and
 *    cqrs-queryd projects, all over SASL_SSL, with librdkafka's security debugging on — and
 *    the password is in none of their logs;
 *  - refusals, each next to a control that differs only in what is checked, so the test
 *    fails if the check went away: a CA the broker's certificate does not chain to (control:
 *    the same client with certificate verification off connects), a wrong password (control:
 *    the right one), a plain-text client (control: the same port over SASL_SSL), a mutual-TLS
 *    client without its certificate (control: with it);
 *  - a daemon with a wrong password says so in its log and metrics, and its log never holds
 *    the password.
 *
 * The clients are made by cqrs_bus_conf_new from CQRS_KAFKA_PROPERTY_* (as `stack.sh env`
 * exports them), as the daemons' are: each case changes those variables and restores them.
 * SCRAM against Kafka 4 needs librdkafka 2.6.1 or later (confluentinc/librdkafka#4895): with an
 * older one the SASL cases fail, saying so. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>
#include <librdkafka/rdkafka.h>

#include <cqrs/bus.h>
#include <cqrs/util.h>

#include "daemons.h"
#include "httpc.h"
#include "testenv.h"

extern char **environ;

#define CANARY "s3cr3t-canary-kafka-tls"
#define FAST_MS 10000 /* a refusal is reported within this, not after a long timeout */

static const char *tls_dir;
static char sasl_brokers[128], mtls_brokers[128];
static char *password; /* the stack's, from CQRS_KAFKA_PROPERTY_SASL_PASSWORD_FILE */
static char **saved;   /* the CQRS_KAFKA_* environment as the stack exported it */

/* ------------------------------------------------------------- environment --- */

static void unset_kafka_env(void)
{
    for (int again = 1; again;) {
        again = 0;
        for (char **e = environ; *e; e++) {
            if (strncmp(*e, "CQRS_KAFKA_PROPERTY", 19) == 0 ||
                strncmp(*e, "CQRS_KAFKA_DEBUG=", 17) == 0) {
                char name[256];
                snprintf(name, sizeof name, "%.*s", (int)strcspn(*e, "="), *e);
                unsetenv(name);
                again = 1;
                break;
            }
        }
    }
}

static void restore_env(void)
{
    unset_kafka_env();
    for (char **e = saved; *e; e++) {
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)strcspn(*e, "="), *e);
        setenv(name, strchr(*e, '=') + 1, 1);
    }
}

/* Only these properties (name, value pairs up to NULL), nothing of the stack's. */
static void use_props(const char *const *kv)
{
    unset_kafka_env();
    for (; kv && kv[0]; kv += 2)
        setenv(kv[0], kv[1], 1);
}

static char ca[256], other_ca[256], client_crt[256], client_key[256];

static void mtls_props(const char *trust, bool with_cert, const char *const *extra)
{
    const char *kv[16] = {"CQRS_KAFKA_PROPERTY_SECURITY_PROTOCOL", "SSL",
                          "CQRS_KAFKA_PROPERTY_SSL_CA_LOCATION", trust};
    size_t n = 4;
    if (with_cert) {
        kv[n++] = "CQRS_KAFKA_PROPERTY_SSL_CERTIFICATE_LOCATION";
        kv[n++] = client_crt;
        kv[n++] = "CQRS_KAFKA_PROPERTY_SSL_KEY_LOCATION";
        kv[n++] = client_key;
    }
    for (; extra && extra[0] && n + 2 < 16; extra += 2) {
        kv[n++] = extra[0];
        kv[n++] = extra[1];
    }
    kv[n] = NULL;
    use_props(kv);
}

/* SCRAM-SHA-512 as Kafka 4 accepts it: librdkafka 2.6.1 or later. */
static void need_scram(void)
{
    if (rd_kafka_version() < 0x02060100)
        fail_msg("librdkafka %s cannot authenticate with SCRAM to Kafka 4 (fixed in 2.6.1, "
                 "confluentinc/librdkafka#4895): build against a newer librdkafka",
                 rd_kafka_version_str());
}

/* ------------------------------------------------------------------- probe --- */

typedef struct probe {
    rd_kafka_resp_err_t code; /* the first error librdkafka reported (0: none) */
    char reason[512];
    int64_t elapsed_ms;
} probe_t;

static void error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    (void)rk;
    probe_t *p = opaque;
    /* "all brokers down" usually follows the error that says why: it is kept only when no
     * other comes (librdkafka 2.14 reports a plain-text client on a TLS port with it alone). */
    if (p->code && p->code != RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN)
        return;
    if (p->code && err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN)
        return;
    p->code = err;
    snprintf(p->reason, sizeof p->reason, "%s", reason);
}

/* A producer made like the daemons' (cqrs_bus_conf_new: the environment's properties) asks
 * brokers for metadata: true when it answers within 8 s; otherwise false, with the first
 * error librdkafka reported in out. */
static bool probe(const char *brokers, probe_t *out)
{
    memset(out, 0, sizeof *out);
    cqrs_error_t err;
    int64_t t0 = cqrs_monotonic_ms();
    rd_kafka_conf_t *conf = cqrs_bus_conf_new(brokers, "itest-tls", NULL, &err);
    if (!conf)
        fail_msg("configuration: %s", err.message);
    rd_kafka_conf_set_error_cb(conf, error_cb);
    rd_kafka_conf_set_opaque(conf, out);
    rd_kafka_t *rk = cqrs_bus_client_new(RD_KAFKA_PRODUCER, conf, "producer", &err);
    if (!rk)
        fail_msg("client: %s", err.message);
    const rd_kafka_metadata_t *md = NULL;
    bool ok = false;
    /* Short metadata requests, errors served in between: a refusal ends it early ("all
     * brokers down" after a while for the reason that may follow it). */
    while (!ok && cqrs_monotonic_ms() - t0 < 8000) {
        if (out->code &&
            (out->code != RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN || cqrs_monotonic_ms() - t0 > 3000))
            break;
        ok = rd_kafka_metadata(rk, 0, NULL, &md, 500) == RD_KAFKA_RESP_ERR_NO_ERROR;
        rd_kafka_poll(rk, 0);
    }
    out->elapsed_ms = cqrs_monotonic_ms() - t0;
    if (md)
        rd_kafka_metadata_destroy(md);
    rd_kafka_destroy(rk);
    return ok && !out->code;
}

static void expect_ok(const char *what, const char *brokers)
{
    probe_t p;
    if (!probe(brokers, &p))
        fail_msg("%s: refused (%s: %s)", what, rd_kafka_err2name(p.code), p.reason);
    printf("ok: %s: answered in %lld ms\n", what, (long long)p.elapsed_ms);
}

/* What a refusal may look like: an error code and words of its reason. */
typedef struct refusal {
    rd_kafka_resp_err_t code;
    const char *words;
} refusal_t;

/* Refused fast, as one of the expected refusals (up to {0, NULL}). */
static void expect_refused(const char *what, const char *brokers, const refusal_t *expected)
{
    probe_t p;
    if (probe(brokers, &p))
        fail_msg("%s: the broker answered", what);
    bool matched = false;
    for (const refusal_t *e = expected; e->words && !matched; e++)
        matched = p.code == e->code && strstr(p.reason, e->words);
    if (!matched)
        fail_msg("%s: %s (%s), not %s (%s)", what, rd_kafka_err2name(p.code), p.reason,
                 rd_kafka_err2name(expected[0].code), expected[0].words);
    if (p.elapsed_ms > FAST_MS)
        fail_msg("%s: refused only after %lld ms", what, (long long)p.elapsed_ms);
    assert_null(strstr(p.reason, password));
    printf("ok: %s refused in %lld ms: %s: %s\n", what, (long long)p.elapsed_ms,
           rd_kafka_err2name(p.code), p.reason);
}

static const refusal_t UNTRUSTED[] = {
    {RD_KAFKA_RESP_ERR__SSL, "certificate verify failed"},
    {RD_KAFKA_RESP_ERR__TRANSPORT, "certificate verify failed"},
    {0, NULL},
};
static const refusal_t BAD_PASSWORD[] = {
    {RD_KAFKA_RESP_ERR__AUTHENTICATION, "Authentication failed"},
    {0, NULL},
};
/* librdkafka 2.0.2 names the likely cause; 2.14 only sees the broker hang up (it logs
 * "Disconnected: connection closed by peer" at info level) and reports all brokers down. */
static const refusal_t NOT_TLS[] = {
    {RD_KAFKA_RESP_ERR__TRANSPORT, "incorrect security.protocol"},
    {RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN, "brokers are down"},
    {0, NULL},
};
static const refusal_t NO_CLIENT_CERT[] = {
    {RD_KAFKA_RESP_ERR__SSL, "alert"},
    {RD_KAFKA_RESP_ERR__TRANSPORT, "alert"},
    {0, NULL},
};

/* ----------------------------------------------------------------- fixtures --- */

static int group_setup(void **state)
{
    (void)state;
    testenv_require_stack();
    tls_dir = testenv_require("CQRS_TLS_DIR");
    const char *proto = testenv_require("CQRS_KAFKA_PROPERTY_SECURITY_PROTOCOL");
    if (strcmp(proto, "SASL_SSL") != 0)
        fail_msg("CQRS_KAFKA_PROPERTY_SECURITY_PROTOCOL is %s: not the TLS stack", proto);
    snprintf(sasl_brokers, sizeof sasl_brokers, "%s", getenv("CQRS_KAFKA_BROKERS"));
    snprintf(mtls_brokers, sizeof mtls_brokers, "localhost:%s",
             testenv_require("CQRS_KAFKA_MTLS_PORT"));
    password = cqrs_read_secret_file(testenv_require("CQRS_KAFKA_PROPERTY_SASL_PASSWORD_FILE"));
    assert_non_null(password);
    assert_true(strlen(password) >= 16);
    snprintf(ca, sizeof ca, "%s/ca.crt", tls_dir);
    snprintf(other_ca, sizeof other_ca, "%s/other-ca.crt", tls_dir);
    snprintf(client_crt, sizeof client_crt, "%s/client.crt", tls_dir);
    snprintf(client_key, sizeof client_key, "%s/client.key", tls_dir);
    size_t n = 0;
    for (char **e = environ; *e; e++)
        n++;
    saved = calloc(n + 1, sizeof *saved);
    n = 0;
    for (char **e = environ; *e; e++)
        if (strncmp(*e, "CQRS_KAFKA_PROPERTY", 19) == 0)
            saved[n++] = strdup(*e);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    for (char **e = saved; e && *e; e++)
        free(*e);
    free(saved);
    free(password);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    restore_env();
    return 0;
}

/* The whole text of a file (caller frees). */
static char *slurp(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return strdup("");
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)len + 1);
    size_t n = fread(s, 1, (size_t)len, f);
    s[n] = '\0';
    fclose(f);
    return s;
}

/* ------------------------------------------------------------------- tests --- */

static void test_daemons_round_trip_over_sasl_ssl(void **state)
{
    (void)state;
    need_scram();
    /* librdkafka's security and protocol debugging into the logs: the SCRAM exchange is
     * logged, the password must not be. */
    setenv("CQRS_KAFKA_DEBUG", "security,broker,protocol", 1);
    setenv("CQRS_LOG_LEVEL", "debug", 1);
    daemons_t d = {0};
    int rc = daemons_start(&d);
    unsetenv("CQRS_LOG_LEVEL");
    assert_int_equal(rc, 0);

    char body[256];
    snprintf(body, sizeof body,
             "{\"sku\":\"TLS-%s\",\"name\":\"Padlock\",\"category\":\"tools\","
             "\"price_cents\":999,\"currency\":\"EUR\",\"initial_stock\":3}",
             d.prefix);
    httpc_response_t r;
    assert_int_equal(httpc_request(d.cport, "POST", "/v1/products",
                                   "Content-Type: application/json\r\n", body, strlen(body), &r),
                     0);
    if (r.status != 201)
        fail_msg("POST /v1/products: %d %s", r.status, r.body);
    json_t *created = json_loads(r.body, 0, NULL);
    char path[96];
    snprintf(path, sizeof path, "/v1/products/%s",
             json_string_value(json_object_get(created, "id")));
    json_decref(created);
    httpc_response_free(&r);
    /* Only through Kafka: relay → SASL_SSL → projector → Redis. */
    int status = 0;
    for (int i = 0; i < 300 && status != 200; i++) {
        httpc_request(d.qport, "GET", path, NULL, NULL, 0, &r);
        status = r.status;
        httpc_response_free(&r);
        if (status != 200)
            usleep(100 * 1000);
    }
    if (status != 200)
        daemons_dump_logs(&d);
    assert_int_equal(status, 200);
    assert_int_equal(daemons_metric(d.cport, "cqrs_dependency_up{dependency=\"kafka\"}"), 1);
    daemons_stop(&d);

    char file[128];
    const char *logs[] = {"migrate", "commandd", "queryd"};
    for (size_t i = 0; i < 3; i++) {
        snprintf(file, sizeof file, "%s/%s.log", d.logdir, logs[i]);
        char *text = slurp(file);
        bool leaked = strstr(text, password) != NULL;
        bool scram = strstr(text, "SCRAM") != NULL;
        free(text);
        if (leaked)
            fail_msg("%s holds the SASL password", file);
        if (i > 0 && !scram)
            fail_msg("%s has no SCRAM debug line: the check above proves nothing", file);
    }
}

static void test_untrusted_ca_is_refused(void **state)
{
    (void)state;
    /* SASL_SSL: the handshake fails before SASL begins. */
    setenv("CQRS_KAFKA_PROPERTY_SSL_CA_LOCATION", other_ca, 1);
    expect_refused("SASL_SSL trusting other-ca.crt", sasl_brokers, UNTRUSTED);
    /* Mutual TLS, the same. */
    mtls_props(other_ca, true, NULL);
    expect_refused("mutual TLS trusting other-ca.crt", mtls_brokers, UNTRUSTED);
    /* Controls: the same clients with the chain check off connect — the refusals above are
     * that check. */
    const char *const off[] = {"CQRS_KAFKA_PROPERTY_ENABLE_SSL_CERTIFICATE_VERIFICATION", "false",
                               NULL};
    mtls_props(other_ca, true, off);
    expect_ok("control: mutual TLS, other-ca.crt, verification off", mtls_brokers);
    need_scram();
    restore_env();
    setenv("CQRS_KAFKA_PROPERTY_SSL_CA_LOCATION", other_ca, 1);
    setenv(off[0], off[1], 1);
    expect_ok("control: SASL_SSL, other-ca.crt, verification off", sasl_brokers);
}

static void test_wrong_password_is_refused(void **state)
{
    (void)state;
    need_scram();
    unsetenv("CQRS_KAFKA_PROPERTY_SASL_PASSWORD_FILE");
    setenv("CQRS_KAFKA_PROPERTY_SASL_PASSWORD", CANARY, 1);
    expect_refused("SASL_SSL with a wrong password", sasl_brokers, BAD_PASSWORD);
    /* Control: the right password, given the same way (a plain variable). */
    setenv("CQRS_KAFKA_PROPERTY_SASL_PASSWORD", password, 1);
    expect_ok("control: SASL_SSL with the right password", sasl_brokers);
    /* And as the stack gives it (a file). */
    restore_env();
    expect_ok("control: SASL_SSL with the password file", sasl_brokers);
}

static void test_daemon_with_a_wrong_password_says_so_without_the_password(void **state)
{
    (void)state;
    need_scram();
    testdb_t db;
    testdb_create(&db, "kafkatls");
    daemons_t d = {0};
    snprintf(d.prefix, sizeof d.prefix, "tls%08x", (unsigned)cqrs_monotonic_ms());
    snprintf(d.logdir, sizeof d.logdir, "/tmp/cqrs-tls-XXXXXX");
    assert_non_null(mkdtemp(d.logdir));
    char cmd[512];
    snprintf(cmd, sizeof cmd, "%s migrate --no-topics > %s/migrate.log 2>&1", CQRS_CTL, d.logdir);
    assert_int_equal(system(cmd), 0);

    unsetenv("CQRS_KAFKA_PROPERTY_SASL_PASSWORD_FILE");
    setenv("CQRS_KAFKA_PROPERTY_SASL_PASSWORD", CANARY, 1);
    setenv("CQRS_KAFKA_DEBUG", "conf,security,broker", 1);
    int port = free_port();
    /* A lease longer than the relay's attempt to create the topics (5 s), so that the failure
     * is reported by a relay that still leads. */
    pid_t pid = daemons_spawn_commandd(&d, port, "CQRS_LOG_LEVEL=debug;CQRS_RELAY_LEASE_MS=20000",
                                       "commandd");
    assert_true(pid > 0);
    char log[128];
    snprintf(log, sizeof log, "%s/commandd.log", d.logdir);
    /* The relay leads at once (its own database) and creates the topics first. */
    bool said = false;
    long long up = -1;
    for (int i = 0; i < 60 && !(said && up == 0); i++) {
        char *text = slurp(log);
        said = strstr(text, "SASL authentication error: Authentication failed") != NULL;
        free(text);
        up = daemons_metric(port, "cqrs_dependency_up{dependency=\"kafka\"}");
        usleep(500 * 1000);
    }
    httpc_response_t r;
    assert_int_equal(httpc_request(port, "GET", "/metrics", NULL, NULL, 0, &r), 0);
    char *metrics = strdup(r.body ? r.body : "");
    httpc_response_free(&r);
    daemons_stop_one(&pid);
    char *text = slurp(log);
    bool leaked = strstr(text, CANARY) || strstr(metrics, CANARY);
    /* librdkafka did log its configuration (debug conf), the password as [redacted]. */
    bool dumped = strstr(text, "sasl.password = [redacted]") != NULL;
    if (!said || up != 0 || !dumped)
        fprintf(stderr, "%s\n", text + (strlen(text) > 4000 ? strlen(text) - 4000 : 0));
    free(text);
    free(metrics);
    testdb_drop(&db);
    assert_true(said);
    assert_int_equal(up, 0);
    assert_false(leaked);
    assert_true(dumped);
}

static void test_plaintext_client_is_refused(void **state)
{
    (void)state;
    const char *const plain[] = {"CQRS_KAFKA_PROPERTY_SECURITY_PROTOCOL", "PLAINTEXT", NULL};
    use_props(plain);
    expect_refused("PLAINTEXT to the SASL_SSL port", sasl_brokers, NOT_TLS);
    expect_refused("PLAINTEXT to the mutual-TLS port", mtls_brokers, NOT_TLS);
    /* SASL without TLS: the same. */
    restore_env();
    setenv("CQRS_KAFKA_PROPERTY_SECURITY_PROTOCOL", "SASL_PLAINTEXT", 1);
    expect_refused("SASL_PLAINTEXT to the SASL_SSL port", sasl_brokers, NOT_TLS);
    /* Controls: the same ports with TLS. */
    mtls_props(ca, true, NULL);
    expect_ok("control: the mutual-TLS port over TLS", mtls_brokers);
    need_scram();
    restore_env();
    expect_ok("control: the SASL_SSL port over SASL_SSL", sasl_brokers);
}

static void test_mutual_tls_needs_the_client_certificate(void **state)
{
    (void)state;
    mtls_props(ca, false, NULL);
    expect_refused("mutual TLS without a client certificate", mtls_brokers, NO_CLIENT_CERT);
    /* Control: with it. */
    mtls_props(ca, true, NULL);
    expect_ok("control: mutual TLS with the client certificate", mtls_brokers);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_mutual_tls_needs_the_client_certificate, teardown),
        cmocka_unit_test_teardown(test_untrusted_ca_is_refused, teardown),
        cmocka_unit_test_teardown(test_plaintext_client_is_refused, teardown),
        cmocka_unit_test_teardown(test_wrong_password_is_refused, teardown),
        cmocka_unit_test_teardown(test_daemon_with_a_wrong_password_says_so_without_the_password,
                                  teardown),
        cmocka_unit_test_teardown(test_daemons_round_trip_over_sasl_ssl, teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
