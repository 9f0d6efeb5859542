/* End-to-end tests of what an operator relies on, with tokens configured:
 *  - every endpoint of both daemons with no token, an unknown token, a token of the wrong
 *    scope, and the right one; probes need none; a reloaded tokens file (SIGHUP) takes effect;
 *  - /metrics of both daemons, scraped after traffic, passes `promtool check metrics`, and a
 *    metric of each family moves when its event happens;
 *  - a traceparent sent with a command is found in both daemons' log lines for it;
 *  - scrapes of /metrics and probes log no `request` line, commands do;
 *  - what /metrics says with Kafka unreachable (its own database, cqrs-commandd pointed at a
 *    closed port): the leader keeps the backlog gauges current and reports Kafka down; a
 *    standby reports no Kafka series (it never talks to Kafka) nor backlog; an instance with
 *    CQRS_RELAY_ENABLED=false reports PostgreSQL as its commands found it, and no Kafka;
 *  - SIGTERM under load: no request is cut off, exit status 0. */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include <cqrs/util.h>

#include "daemons.h"
#include "httpc.h"
#include "testenv.h"

static daemons_t D;
static char tokens_path[] = "/tmp/cqrs-tokens-XXXXXX";
#define READER "reader-token-0123456789abcdef"
#define WRITER "writer-token-0123456789abcdef"
#define ADMIN "admin-token-0123456789abcdef"
#define SCRAPER "scraper-token-0123456789abcdef"
#define LATE "late-token-0123456789abcdef"

static void write_tokens(bool with_late)
{
    FILE *f = fopen(tokens_path, "w");
    fprintf(f,
            "# test tokens\nreader %s read\nwriter %s write\nadmin %s admin\n"
            "scraper %s metrics\n%s",
            READER, WRITER, ADMIN, SCRAPER, with_late ? "late " LATE " read\n" : "");
    fclose(f);
}

static int setup(void **state)
{
    (void)state;
    testenv_require_stack();
    int fd = mkstemp(tokens_path);
    if (fd < 0)
        return -1;
    close(fd);
    write_tokens(false);
    setenv("CQRS_AUTH_TOKENS_FILE", tokens_path, 1);
    setenv("CQRS_LOG_LEVEL", "debug", 1); /* the projector logs each applied event at debug */
    int rc = daemons_start_auth(&D, "Authorization: Bearer " ADMIN "\r\n");
    unsetenv("CQRS_AUTH_TOKENS_FILE");
    unsetenv("CQRS_LOG_LEVEL");
    return rc;
}

static int teardown(void **state)
{
    (void)state;
    daemons_stop(&D);
    unlink(tokens_path);
    return 0;
}

static int status_of(int port, const char *method, const char *path, const char *token)
{
    char h[256];
    snprintf(h, sizeof h, "Content-Type: application/json\r\n%s%s%s",
             token ? "Authorization: Bearer " : "", token ? token : "", token ? "\r\n" : "");
    httpc_response_t r;
    const char *body = strcmp(method, "GET") ? "{}" : NULL;
    httpc_request(port, method, path, h, body, body ? 2 : 0, &r);
    int st = r.status;
    char www[200] = "";
    httpc_header(&r, "WWW-Authenticate", www, sizeof www);
    if ((st == 401 || st == 403) && strncmp(www, "Bearer", 6) != 0)
        fail_msg("%s %s: %d without WWW-Authenticate", method, path, st);
    httpc_response_free(&r);
    return st;
}

/* Every route of a daemon, from its own --routes. */
static void each_route(const char *binary, int port, const char *needed, const char *other)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "%s --routes", binary);
    FILE *p = popen(cmd, "r");
    char line[256];
    int routes = 0;
    while (fgets(line, sizeof line, p)) {
        char method[16], pattern[200], path[256];
        if (sscanf(line, "%15s %199s", method, pattern) != 2)
            continue;
        /* a concrete path: {id} becomes a UUID */
        char *brace = strstr(pattern, "{id}");
        if (brace) {
            *brace = '\0';
            snprintf(path, sizeof path, "%s6f9619ff-8b86-4011-b42d-00c04fc964ff%s", pattern,
                     brace + 4);
        } else {
            snprintf(path, sizeof path, "%s", pattern);
        }
        bool probe = strcmp(path, "/healthz") == 0 || strcmp(path, "/readyz") == 0;
        bool metrics = strcmp(path, "/metrics") == 0;
        int none = status_of(port, method, path, NULL);
        int unknown = status_of(port, method, path, "not-a-token-0123456789");
        int wrong = status_of(port, method, path, metrics ? READER : other);
        int right = status_of(port, method, path, metrics ? SCRAPER : needed);
        int admin = status_of(port, method, path, ADMIN);
        if (probe) {
            if (none != 200)
                fail_msg("%s needs no token, got %d", path, none);
        } else {
            if (none != 401 || unknown != 401 || wrong != 403)
                fail_msg("%s %s: none %d, unknown %d, wrong scope %d", method, path, none, unknown,
                         wrong);
            if (right == 401 || right == 403 || admin == 401 || admin == 403)
                fail_msg("%s %s: right scope %d, admin %d", method, path, right, admin);
        }
        routes++;
    }
    pclose(p);
    assert_true(routes >= 8);
}

static void test_every_endpoint_needs_its_scope(void **state)
{
    (void)state;
    each_route(CQRS_COMMANDD, D.cport, WRITER, READER);
    each_route(CQRS_QUERYD, D.qport, READER, WRITER);
    /* a token added to the file works after SIGHUP */
    assert_int_equal(status_of(D.qport, "GET", "/v1/products", LATE), 401);
    write_tokens(true);
    kill(D.queryd, SIGHUP);
    int st = 0;
    for (int i = 0; i < 50 && st != 200; i++) {
        usleep(100 * 1000);
        st = status_of(D.qport, "GET", "/v1/products", LATE);
    }
    assert_int_equal(st, 200);
}

static char *scrape(int port)
{
    httpc_response_t r;
    httpc_request(port, "GET", "/metrics", "Authorization: Bearer " SCRAPER "\r\n", NULL, 0, &r);
    assert_int_equal(r.status, 200);
    char *body = strdup(r.body);
    httpc_response_free(&r);
    return body;
}

/* The value of the sample line starting with line_prefix (not its HELP or TYPE line). */
static long long sample(const char *text, const char *line_prefix)
{
    size_t len = strlen(line_prefix);
    for (const char *line = text; line && *line;) {
        if (strncmp(line, line_prefix, len) == 0 && (line[len] == ' ' || line[len] == '{'))
            return atoll(strchr(line + len, ' ') + 1);
        const char *nl = strchr(line, '\n');
        line = nl ? nl + 1 : NULL;
    }
    return -1;
}

static void promtool(int port)
{
    char *text = scrape(port);
    char path[] = "/tmp/cqrs-metrics-XXXXXX";
    int fd = mkstemp(path);
    assert_true(write(fd, text, strlen(text)) == (ssize_t)strlen(text));
    close(fd);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "promtool check metrics < %s >&2", path);
    int rc = system(cmd);
    unlink(path);
    if (rc != 0)
        fail_msg("promtool check metrics failed on the scrape of port %d:\n%s", port, text);
    free(text);
}

static void test_metrics_move_and_lint(void **state)
{
    (void)state;
    char *before_c = scrape(D.cport), *before_q = scrape(D.qport);
    const char *created = "cqrs_http_requests_total{operation=\"CreateProduct\",method=\"POST\","
                          "route=\"/v1/products\",status=\"201\"}";
    long long c0 = sample(before_c, created);
    long long pub0 = sample(before_c, "cqrs_relay_events_published_total");
    long long app0 = sample(before_q, "cqrs_projector_events_applied_total");
    free(before_c);
    free(before_q);
    char id[37], body[256], path[96];
    cqrs_uuid_v4(id);
    snprintf(body, sizeof body,
             "{\"sku\":\"M-%.8s\",\"name\":\"Metric\",\"category\":\"m\",\"price_cents\":1,"
             "\"currency\":\"EUR\",\"initial_stock\":1}",
             id);
    httpc_response_t r;
    httpc_request(D.cport, "POST", "/v1/products",
                  "Content-Type: application/json\r\nAuthorization: Bearer " WRITER "\r\n", body,
                  strlen(body), &r);
    assert_int_equal(r.status, 201);
    json_t *j = json_loads(r.body, 0, NULL);
    snprintf(path, sizeof path, "/v1/products/%s", json_string_value(json_object_get(j, "id")));
    json_decref(j);
    httpc_response_free(&r);
    for (int i = 0; i < 300; i++) {
        httpc_request(D.qport, "GET", path, "Authorization: Bearer " READER "\r\n", NULL, 0, &r);
        int st = r.status;
        httpc_response_free(&r);
        if (st == 200)
            break;
        usleep(50 * 1000);
    }
    char *after_c = scrape(D.cport), *after_q = scrape(D.qport);
    assert_int_equal(sample(after_c, created), (c0 < 0 ? 0 : c0) + 1);
    assert_true(sample(after_c, "cqrs_relay_events_published_total") > pub0);
    assert_true(sample(after_q, "cqrs_projector_events_applied_total") > app0);
    assert_true(sample(after_q, "cqrs_projector_apply_latency_seconds_count") >= 1);
    assert_true(sample(after_c, "cqrs_relay_publish_latency_seconds_count") >= 1);
    /* The consistency window broken down: every step of a published round, and the
     * projector's two stages. */
    assert_true(sample(after_c, "cqrs_relay_pickup_seconds_count") >= 1);
    static const char *const phases[] = {"read", "produce", "ack", "record", "commit", "delete"};
    for (size_t i = 0; i < sizeof phases / sizeof *phases; i++) {
        char name[96];
        snprintf(name, sizeof name, "cqrs_relay_round_phase_seconds_count{phase=\"%s\"}",
                 phases[i]);
        if (sample(after_c, name) < 1)
            fail_msg("no relay round timed for the step %s", phases[i]);
    }
    assert_true(sample(after_q, "cqrs_projector_stage_seconds_count{stage=\"kafka\"}") >= 1);
    assert_true(sample(after_q, "cqrs_projector_stage_seconds_count{stage=\"apply\"}") >= 1);
    assert_non_null(strstr(after_q, "cqrs_projector_consumer_lag_messages{"));
    assert_non_null(strstr(after_c, "cqrs_dependency_up{dependency=\"postgres\"} 1"));
    assert_non_null(strstr(after_q, "cqrs_dependency_up{dependency=\"redis\"} 1"));
    assert_non_null(strstr(after_q, "cqrs_http_request_duration_seconds_bucket{operation=\""
                                    "GetProduct\""));
    free(after_c);
    free(after_q);
    promtool(D.cport);
    promtool(D.qport);
}

static bool log_has(const char *file, const char *a, const char *b)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "grep -F '%s' %s/%s | grep -q -F '%s'", a, D.logdir, file, b);
    return system(cmd) == 0;
}

static void test_traceparent_across_both_daemons(void **state)
{
    (void)state;
    const char *tp = "00-5b8aa5a2d2c872e8321cf37308d69df2-051581bf3cb55c13-01";
    char id[37], body[256];
    cqrs_uuid_v4(id);
    snprintf(body, sizeof body,
             "{\"sku\":\"T-%.8s\",\"name\":\"Traced\",\"category\":\"t\",\"price_cents\":1,"
             "\"currency\":\"EUR\",\"initial_stock\":1}",
             id);
    httpc_response_t r;
    httpc_request(D.cport, "POST", "/v1/products",
                  "Content-Type: application/json\r\nAuthorization: Bearer " WRITER
                  "\r\ntraceparent: 00-5b8aa5a2d2c872e8321cf37308d69df2-051581bf3cb55c13-01\r\n",
                  body, strlen(body), &r);
    assert_int_equal(r.status, 201);
    json_t *j = json_loads(r.body, 0, NULL);
    char pid[40];
    snprintf(pid, sizeof pid, "%s", json_string_value(json_object_get(j, "id")));
    json_decref(j);
    httpc_response_free(&r);
    bool seen = false;
    for (int i = 0; i < 100 && !seen; i++) {
        usleep(100 * 1000);
        seen = log_has("queryd.log", pid, tp);
    }
    /* the command's request line and the projector's line for its event carry the same trace */
    assert_true(log_has("commandd.log", "\"operation\":\"CreateProduct\"", tp));
    assert_true(seen);
    /* and the token itself never reaches a log */
    assert_false(log_has("commandd.log", WRITER, ""));
    assert_false(log_has("queryd.log", READER, ""));
}

static void test_scrapes_and_probes_are_not_logged(void **state)
{
    (void)state;
    for (int i = 0; i < 3; i++) {
        free(scrape(D.cport));
        free(scrape(D.qport));
        assert_int_equal(status_of(D.cport, "GET", "/readyz", NULL), 200);
        assert_int_equal(status_of(D.qport, "GET", "/healthz", NULL), 200);
    }
    /* the lines are written when the answer is complete: give the last one a moment */
    usleep(500 * 1000);
    assert_true(log_has("commandd.log", "\"msg\":\"request\"", "\"operation\":\"CreateProduct\""));
    const char *files[] = {"commandd.log", "queryd.log"};
    const char *paths[] = {"\"path\":\"/metrics\"", "\"path\":\"/readyz\"",
                           "\"path\":\"/healthz\""};
    for (int f = 0; f < 2; f++)
        for (int p = 0; p < 3; p++)
            if (log_has(files[f], "\"msg\":\"request\"", paths[p]))
                fail_msg("%s logs a request line for %s", files[f], paths[p]);
}

/* Waits up to seconds for daemons_metric(port, name) to satisfy want; returns the last value. */
static long long metric_until(int port, const char *name, bool (*want)(long long, long long),
                              long long arg, int seconds)
{
    long long v = daemons_metric(port, name);
    for (int t = 0; t < seconds * 5 && !want(v, arg); t++) {
        usleep(200 * 1000);
        v = daemons_metric(port, name);
    }
    return v;
}

static bool at_least(long long v, long long arg)
{
    return v >= arg;
}

static bool equals(long long v, long long arg)
{
    return v == arg;
}

static void test_relay_metrics_without_kafka(void **state)
{
    (void)state;
    const char *kafka_up = "cqrs_dependency_up{dependency=\"kafka\"}";
    const char *pg_up = "cqrs_dependency_up{dependency=\"postgres\"}";
    testdb_t db;
    testdb_create(&db, "opsnokafka");
    char env[256];
    pid_t c[3] = {-1, -1, -1};
    int cp[3];
    if (daemons_migrate(&D, "migrate-nokafka") != 0) {
        testdb_drop(&db);
        fail_msg("migrate of the test database failed (see %s)", D.logdir);
    }
    /* Nothing listens there. A lease longer than a topic creation's wait keeps one leader. */
    snprintf(env, sizeof env,
             "CQRS_KAFKA_BROKERS=127.0.0.1:%d;CQRS_RELAY_LEASE_MS=20000;CQRS_RELAY_STALL_MS=60000",
             free_port());
    cp[0] = free_port();
    c[0] = daemons_spawn_commandd(&D, cp[0], env, "commandd-nokafka-1");
    /* the first one leads before the second starts */
    long long lead = c[0] > 0 ? metric_until(cp[0], "cqrs_relay_leader", equals, 1, 60) : -1;
    cp[1] = free_port();
    c[1] = c[0] > 0 ? daemons_spawn_commandd(&D, cp[1], env, "commandd-nokafka-2") : -1;
    cp[2] = free_port();
    c[2] = c[1] > 0
               ? daemons_spawn_commandd(&D, cp[2],
                                        "CQRS_RELAY_ENABLED=false;CQRS_KAFKA_BROKERS=127.0.0.1:1",
                                        "commandd-norelay")
               : -1;
    bool started = c[0] > 0 && c[1] > 0 && c[2] > 0;
    int created = 0;
    for (int i = 0; started && i < 5; i++) {
        char id[37], body[256];
        cqrs_uuid_v4(id);
        snprintf(body, sizeof body,
                 "{\"sku\":\"K-%.8s\",\"name\":\"No Kafka\",\"category\":\"k\","
                 "\"price_cents\":1,\"currency\":\"EUR\",\"initial_stock\":1}",
                 id);
        httpc_response_t r;
        httpc_request(cp[i % 2 ? 2 : 0], "POST", "/v1/products",
                      "Content-Type: application/json\r\n", body, strlen(body), &r);
        created += r.status == 201;
        httpc_response_free(&r);
    }
    /* The leader's view of the outbox, while it cannot reach Kafka: the 5 rows, and their
     * age growing. Generous waits: a loaded machine, and a Kafka client waiting for a broker
     * that does not answer. */
    long long backlog =
        started ? metric_until(cp[0], "cqrs_relay_backlog_events", at_least, 5, 60) : -1;
    /* no wait for the age without a gauge: the suite's timeout is 180 s */
    long long age0 = backlog >= 0 ? metric_until(cp[0], "cqrs_relay_oldest_unpublished_age_seconds",
                                                 at_least, 2, 30)
                                  : -1;
    long long age1 = age0 >= 0 ? metric_until(cp[0], "cqrs_relay_oldest_unpublished_age_seconds",
                                              at_least, age0 + 3, 30)
                               : -1;
    long long outbox = pg_count("SELECT count(*) FROM outbox", NULL);
    long long leader_kafka = started ? metric_until(cp[0], kafka_up, equals, 0, 30) : -2;
    long long leader_pg = started ? daemons_metric(cp[0], pg_up) : -2;
    long long standby_leads = started ? daemons_metric(cp[1], "cqrs_relay_leader") : -2;
    long long standby_kafka = started ? daemons_metric(cp[1], kafka_up) : -2;
    long long standby_pg = started ? metric_until(cp[1], pg_up, equals, 1, 30) : -2;
    long long standby_backlog = started ? daemons_metric(cp[1], "cqrs_relay_backlog_events") : -2;
    long long norelay_kafka = started ? daemons_metric(cp[2], kafka_up) : -2;
    long long norelay_pg = started ? daemons_metric(cp[2], pg_up) : -2;
    if (started)
        promtool(cp[2]);
    for (int i = 0; i < 3; i++)
        if (c[i] > 0)
            daemons_stop_one(&c[i]);
    testdb_drop(&db);
    if (!started)
        fail_msg("a cqrs-commandd did not start (see %s)", D.logdir);
    assert_int_equal(lead, 1);
    assert_int_equal(created, 5);
    assert_int_equal(outbox, 5);
    /* every finding at once */
    char bad[1024] = "";
    size_t n = 0;
#define EXPECT(cond, ...)                                                                          \
    do {                                                                                           \
        if (!(cond) && n < sizeof bad)                                                             \
            n += (size_t)snprintf(bad + n, sizeof bad - n, __VA_ARGS__);                           \
    } while (0)
    EXPECT(backlog == 5 && age0 >= 2 && age1 >= age0 + 3,
           "the leader's backlog gauges froze without Kafka: backlog %lld (outbox rows %lld), "
           "oldest age %lld s then %lld s; ",
           backlog, outbox, age0, age1);
    EXPECT(leader_kafka == 0 && leader_pg == 1, "leader: kafka %lld, postgres %lld; ", leader_kafka,
           leader_pg);
    /* -1: absent. A standby never talks to Kafka, nor counts the outbox. */
    EXPECT(standby_leads == 0 && standby_kafka == -1 && standby_pg == 1 && standby_backlog == -1,
           "standby: leader %lld, kafka %lld, postgres %lld, backlog %lld; ", standby_leads,
           standby_kafka, standby_pg, standby_backlog);
    /* its commands and readiness checks reached PostgreSQL; it never talks to Kafka */
    EXPECT(norelay_kafka == -1 && norelay_pg == 1, "without a relay: kafka %lld, postgres %lld",
           norelay_kafka, norelay_pg);
#undef EXPECT
    if (bad[0])
        fail_msg("%s", bad);
}

typedef struct load {
    volatile bool stop;
    volatile bool taken_out; /* the "load balancer" saw readiness fail: no new requests */
    bool not_ready_seen;     /* /readyz answered 503 (while the listener was still open) */
    int port;
    int ok, refused, cut;
} load_t;

static void *run_load(void *arg)
{
    load_t *l = arg;
    while (!l->stop && !l->taken_out) {
        httpc_response_t r;
        httpc_request(l->port, "GET", "/v1/products?limit=5",
                      "Authorization: Bearer " READER "\r\n", NULL, 0, &r);
        if (r.status == 200)
            l->ok++;
        else if (!r.connected)
            l->refused++; /* after the listener closed: never started, not cut off */
        else if (r.status == 0)
            l->cut++;
        httpc_response_free(&r);
    }
    return NULL;
}

/* A load balancer's part: polls readiness and takes the instance out (no new requests) as
 * soon as it fails. */
static void *watch_ready(void *arg)
{
    load_t *l = arg;
    while (!l->stop) {
        httpc_response_t r;
        httpc_request(l->port, "GET", "/readyz", NULL, NULL, 0, &r);
        int st = r.status;
        httpc_response_free(&r);
        if (st != 200) {
            l->not_ready_seen = st == 503;
            l->taken_out = true;
            return NULL;
        }
        usleep(10 * 1000);
    }
    return NULL;
}

/* SIGTERM under load, deployed as behind a Service: readiness fails for CQRS_SHUTDOWN_DELAY_MS
 * while the listener still answers, the clients' balancer takes the instance out, then the
 * listener closes and every request in flight finishes. (Clients that keep opening connections
 * through the close itself meet a refused or reset connection — TCP's, not the daemon's, to
 * avoid: what the delay is for.) */
static void test_sigterm_under_load(void **state)
{
    (void)state;
    char env[600];
    snprintf(env, sizeof env, "CQRS_AUTH_TOKENS_FILE=%s;CQRS_SHUTDOWN_DELAY_MS=1000", tokens_path);
    load_t l = {.port = free_port()};
    pid_t q = daemons_spawn_queryd_env(&D, l.port, "serve", env, "queryd-drain");
    assert_true(q > 0);
    pthread_t t[4], w;
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, run_load, &l);
    pthread_create(&w, NULL, watch_ready, &l);
    usleep(500 * 1000);
    int rc = daemons_stop_one(&q);
    l.stop = true;
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    pthread_join(w, NULL);
    assert_int_equal(rc, 0);
    assert_true(l.ok > 0);
    assert_true(l.not_ready_seen); /* readiness failed while the listener was still open */
    assert_int_equal(l.cut, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_endpoint_needs_its_scope),
        cmocka_unit_test(test_metrics_move_and_lint),
        cmocka_unit_test(test_traceparent_across_both_daemons),
        cmocka_unit_test(test_scrapes_and_probes_are_not_logged),
        cmocka_unit_test(test_relay_metrics_without_kafka),
        cmocka_unit_test(test_sigterm_under_load),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
