/* End-to-end tests of the outbox relay against the real stack and real daemons:
 *  - Kafka stopped: commands keep succeeding, the backlog grows and drains in order when Kafka
 *    is back, every event exactly once;
 *  - two cqrs-commandd: exactly one relays; SIGKILL it under load, the other takes over;
 *  - a leader paused (SIGSTOP, by a failpoint just before its Kafka commit) until another took
 *    over, then resumed: nothing it published becomes visible, nothing is lost;
 *  - PostgreSQL restarted under load: fast 503s during the outage, then success without
 *    restarting the daemon;
 *  - a lock held on relay_leader from another session (issue 16): the relays report a lock
 *    timeout within seconds, open no extra connections, and drain once it is released;
 *  - the same with a relay whose connection has no timeouts (CQRS_UNSAFE_RELAY_NO_PG_TIMEOUTS)
 *    and the shortest CQRS_RELAY_STALL_MS: its supervisor cancels the stuck statement instead
 *    of piling up abandoned workers, each with a connection;
 *  - a lock held on idempotency_keys while a new leader starts its cleanup: the cleanup times
 *    out, the leader keeps its lease and publishes meanwhile;
 *  - the delete after a Kafka commit fails (failpoint relay-delete-published): the leader
 *    retries that delete alone, without a Kafka lookup that could take the batch for aborted
 *    and publish it again;
 *  - a relay thread stuck (a failpoint delay) past CQRS_RELAY_STALL_MS and its grace is
 *    abandoned; it returns while the supervisor is still in abandon() (failpoint
 *    relay-abandon-after-cas) and frees itself: under ASan, no use after free, no leak.
 * A test that locks a table releases the lock in its teardown, even when an assertion
 * failed, so that later tests do not run against a held lock.
 * After each, the topic read back with read_committed holds every (aggregate, version) once,
 * in version order. */
#include <glob.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
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
#include "kafka_check.h"
#include "testenv.h"

#define N_PRODUCTS 10

static daemons_t D;
static char products[N_PRODUCTS][40];
static long long events_expected;
static int port; /* the cqrs-commandd the commands go to */
#define N_EXTRA 7
static pid_t extra[N_EXTRA] = {-1, -1, -1, -1, -1, -1, -1};
static int extra_port[N_EXTRA]; /* the HTTP port of extra[i] */

static int setup(void **state)
{
    (void)state;
    testenv_require_stack();
    testenv_require("CQRS_STACK_DIR");
    if (daemons_start(&D) != 0)
        return -1;
    port = D.cport;
    for (int i = 0; i < N_PRODUCTS; i++) {
        char body[256], id[37];
        cqrs_uuid_v4(id);
        snprintf(body, sizeof body,
                 "{\"sku\":\"R-%.8s\",\"name\":\"Relay %d\",\"category\":\"r\","
                 "\"price_cents\":1,\"currency\":\"EUR\",\"initial_stock\":0}",
                 id, i);
        httpc_response_t r;
        httpc_request(port, "POST", "/v1/products", "Content-Type: application/json\r\n", body,
                      strlen(body), &r);
        json_t *j = json_loads(r.body, 0, NULL);
        if (r.status != 201 || !j)
            return -1;
        snprintf(products[i], sizeof products[i], "%s",
                 json_string_value(json_object_get(j, "id")));
        json_decref(j);
        httpc_response_free(&r);
        events_expected++;
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    for (int i = 0; i < N_EXTRA; i++)
        if (extra[i] > 0) {
            kill(extra[i], SIGCONT);
            daemons_stop_one(&extra[i]);
        }
    daemons_stop(&D);
    /* whatever a test stopped comes back for the next suite */
    int rc = system(CQRS_STACK_SH " up >/dev/null 2>&1");
    (void)rc;
    return 0;
}

static int adjust(int to_port, int i)
{
    char path[128];
    snprintf(path, sizeof path, "/v1/products/%.40s/stock-adjustments", products[i % N_PRODUCTS]);
    const char *body = "{\"delta\":1,\"reason\":\"relay test\"}";
    httpc_response_t r;
    httpc_request(to_port, "POST", path, "Content-Type: application/json\r\n", body, strlen(body),
                  &r);
    int st = r.status;
    httpc_response_free(&r);
    return st;
}

/* Outbox rows of this test's products. */
static long long outbox_rows(void)
{
    char list[N_PRODUCTS * 40 + 8] = "{";
    for (int i = 0; i < N_PRODUCTS; i++) {
        strcat(list, products[i]);
        strcat(list, i + 1 < N_PRODUCTS ? "," : "}");
    }
    return pg_count("SELECT count(*) FROM outbox o JOIN events e USING (sequence)"
                    " WHERE e.aggregate_id = ANY($1::uuid[])",
                    list);
}

static bool outbox_drained(int seconds)
{
    for (int t = 0; t < seconds * 10; t++) {
        if (outbox_rows() == 0)
            return true;
        usleep(100 * 1000);
    }
    return false;
}

static void expect_exactly_once(void)
{
    char topic[96];
    snprintf(topic, sizeof topic, "%s.product.events", D.prefix);
    const char *topics[] = {topic};
    kafka_check_t k;
    assert_int_equal(kafka_check_topics(getenv("CQRS_KAFKA_BROKERS"), topics, 1,
                                        (size_t)events_expected, 90, &k),
                     0);
    if (k.duplicates || k.out_of_order || k.messages != (size_t)events_expected)
        fail_msg("Kafka holds %zu events (expected %lld), %zu duplicates, %zu out of order: %s",
                 k.messages, events_expected, k.duplicates, k.out_of_order, k.first_problem);
}

static int leader_port(const int *ports, int n, int seconds)
{
    for (int t = 0; t < seconds * 10; t++) {
        int found = -1, count = 0;
        for (int i = 0; i < n; i++)
            if (daemons_metric(ports[i], "cqrs_relay_leader") == 1) {
                found = ports[i];
                count++;
            }
        if (count == 1)
            return found;
        usleep(100 * 1000);
    }
    return -1;
}

static void test_kafka_outage(void **state)
{
    (void)state;
    assert_int_equal(system(CQRS_STACK_SH " stop kafka >/dev/null 2>&1"), 0);
    for (int i = 0; i < 200; i++) {
        int st = adjust(port, i);
        if (st != 200)
            fail_msg("command %d during the Kafka outage: %d", i, st);
        events_expected++;
    }
    /* nothing could be published meanwhile: the backlog holds all 200 */
    assert_true(outbox_rows() >= 200);
    /* and the operator sees it, with the relay that will drain it */
    FILE *p = popen(CQRS_CTL " outbox --json", "r");
    char buf[2048];
    size_t n = fread(buf, 1, sizeof buf - 1, p);
    buf[n] = '\0';
    assert_int_equal(pclose(p), 0);
    json_t *o = json_loads(buf, 0, NULL);
    assert_true(json_integer_value(json_object_get(o, "backlog")) >= 200);
    assert_true(json_real_value(json_object_get(o, "oldest_age_seconds")) > 0);
    assert_true(json_is_true(json_object_get(json_object_get(o, "relay"), "active")));
    json_decref(o);
    assert_int_equal(system(CQRS_STACK_SH " up >/dev/null 2>&1"), 0);
    assert_true(outbox_drained(120));
    expect_exactly_once();
}

typedef struct load {
    int port;
    int n;
    int ok;
    int bad;
} load_t;

static void *run_load(void *arg)
{
    load_t *l = arg;
    for (int i = 0; i < l->n; i++) {
        if (adjust(l->port, i) == 200)
            l->ok++;
        else
            l->bad++;
        usleep(5 * 1000);
    }
    return NULL;
}

static void test_takeover_after_sigkill(void **state)
{
    (void)state;
    int port2 = extra_port[0] = free_port();
    extra[0] = daemons_spawn_commandd(&D, port2, NULL, "commandd2");
    assert_true(extra[0] > 0);
    int ports[] = {D.cport, port2};
    int leader = leader_port(ports, 2, 20);
    assert_true(leader > 0);
    int survivor = leader == D.cport ? port2 : D.cport;
    load_t l = {.port = survivor, .n = 300};
    pthread_t t;
    pthread_create(&t, NULL, run_load, &l);
    usleep(400 * 1000);
    pid_t *victim = leader == D.cport ? &D.commandd : &extra[0];
    kill(*victim, SIGKILL);
    waitpid(*victim, NULL, 0);
    *victim = -1;
    pthread_join(t, NULL);
    assert_int_equal(l.bad, 0);
    events_expected += l.ok;
    /* the other one leads now, within seconds */
    int ports2[] = {survivor};
    assert_int_equal(leader_port(ports2, 1, 15), survivor);
    port = survivor;
    assert_true(outbox_drained(60));
    expect_exactly_once();
    if (victim == &D.commandd) {
        D.commandd = extra[0];
        D.cport = port2;
        extra[0] = -1;
    }
}

static char proc_state(pid_t pid)
{
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return '?';
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *rp = strrchr(buf, ')');
    return rp && rp[1] == ' ' ? rp[2] : '?';
}

static void test_paused_leader_is_fenced(void **state)
{
    (void)state;
    /* The current leader hands over on SIGTERM; the paused one takes the lease next. */
    int paused_port = extra_port[1] = free_port();
    extra[1] = daemons_spawn_commandd(&D, paused_port, "CQRS_FAILPOINTS=relay-before-commit=stop*1",
                                      "commandd-paused");
    assert_true(extra[1] > 0);
    assert_int_equal(daemons_stop_one(&D.commandd), 0);
    int ports[] = {paused_port};
    assert_int_equal(leader_port(ports, 1, 20), paused_port);
    /* A command: the paused leader produces it, records the batch and stops before its Kafka
     * commit. */
    assert_int_equal(adjust(paused_port, 0), 200);
    events_expected++;
    bool stopped = false;
    for (int t = 0; t < 100 && !stopped; t++) {
        stopped = proc_state(extra[1]) == 'T';
        usleep(100 * 1000);
    }
    assert_true(stopped);
    /* Another instance takes over once the lease runs out, fences it, settles the batch. */
    int port3 = extra_port[2] = free_port();
    extra[2] = daemons_spawn_commandd(&D, port3, NULL, "commandd3");
    assert_true(extra[2] > 0);
    int ports3[] = {port3};
    assert_int_equal(leader_port(ports3, 1, 20), port3);
    for (int i = 0; i < 20; i++) {
        assert_int_equal(adjust(port3, i), 200);
        events_expected++;
    }
    port = port3;
    assert_true(outbox_drained(60));
    /* Resumed: its commit is refused (fenced), it writes nothing, it is not the leader. */
    kill(extra[1], SIGCONT);
    sleep(3);
    assert_int_equal(daemons_metric(paused_port, "cqrs_relay_leader"), 0);
    assert_int_equal(daemons_metric(port3, "cqrs_relay_leader"), 1);
    expect_exactly_once();
}

static void test_postgres_restart(void **state)
{
    (void)state;
    assert_int_equal(system(CQRS_STACK_SH " stop postgres >/dev/null 2>&1"), 0);
    int unavailable = 0;
    for (int i = 0; i < 5; i++) {
        int64_t t0 = cqrs_monotonic_ms();
        int st = adjust(port, i);
        /* a hang detector, not a benchmark */
        assert_true(cqrs_monotonic_ms() - t0 < 15000);
        if (st == 503)
            unavailable++;
        else
            fail_msg("command during the PostgreSQL outage: %d", st);
    }
    assert_int_equal(unavailable, 5);
    assert_int_equal(system(CQRS_STACK_SH " up >/dev/null 2>&1"), 0);
    int ok = 0;
    for (int t = 0; t < 300 && ok < 10; t++) {
        if (adjust(port, t) == 200) {
            ok++;
            events_expected++;
        } else {
            usleep(100 * 1000);
        }
    }
    assert_int_equal(ok, 10);
    assert_true(outbox_drained(60));
    expect_exactly_once();
}

/* ---- locks held on the relay's tables (issue 16) ------------------------------------ */

#define TIMEOUT_LOGGED "relay statement timed out"
#define CANCEL_LOGGED "cancelling its PostgreSQL statement"
/* The relays' lock_timeout here: half of CQRS_RELAY_LEASE_MS (2000, set by daemons.c). */
#define RELAY_LOCK_TIMEOUT_MS 1000
/* Their lease renewal period (lease / 5) and outbox poll (CQRS_RELAY_POLL_MS, daemons.c). */
#define RELAY_RENEW_MS 400
#define RELAY_POLL_MS 200

/* The relays' PostgreSQL connections (application_name cqrs-relay) to the test database. */
static long long relay_connections(void)
{
    return pg_count("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'cqrs-relay'"
                    " AND datname = current_database()",
                    NULL);
}

static pid_t *commandd_pids[] = {&D.commandd, &extra[0], &extra[1], &extra[2],
                                 &extra[3],   &extra[4], &extra[5], &extra[6]};
static int *commandd_ports[] = {&D.cport,       &extra_port[0], &extra_port[1], &extra_port[2],
                                &extra_port[3], &extra_port[4], &extra_port[5], &extra_port[6]};
#define N_COMMANDD (sizeof commandd_pids / sizeof commandd_pids[0])

static bool alive(pid_t pid)
{
    return pid > 0 && kill(pid, 0) == 0 && proc_state(pid) != 'Z';
}

static long long running_commandd(void)
{
    long long n = 0;
    for (size_t i = 0; i < N_COMMANDD; i++)
        n += alive(*commandd_pids[i]);
    return n;
}

/* A counter summed over every running cqrs-commandd. */
static long long metric_sum(const char *name)
{
    long long sum = 0;
    for (size_t i = 0; i < N_COMMANDD; i++) {
        long long v = alive(*commandd_pids[i]) ? daemons_metric(*commandd_ports[i], name) : -1;
        if (v > 0)
            sum += v;
    }
    return sum;
}

/* Stops every cqrs-commandd but *keep (SIGTERM: each hands its lease over). */
static void only_commandd(pid_t *keep)
{
    for (size_t i = 0; i < N_COMMANDD; i++)
        if (commandd_pids[i] != keep && *commandd_pids[i] > 0)
            daemons_stop_one(commandd_pids[i]);
}

/* Waits until every running cqrs-commandd has its one relay connection; returns that count. */
static long long settled_relay_connections(void)
{
    long long want = running_commandd();
    for (int t = 0; t < 150 && relay_connections() != want; t++)
        usleep(100 * 1000);
    assert_int_equal(relay_connections(), want);
    return want;
}

/* Lines holding `what` in the logs of this run matching `pattern` (a glob under logdir). */
static long long log_lines(const char *pattern, const char *what)
{
    char path[160];
    snprintf(path, sizeof path, "%s/%s", D.logdir, pattern);
    glob_t g;
    long long n = 0;
    if (glob(path, 0, NULL, &g) != 0)
        return 0;
    for (size_t i = 0; i < g.gl_pathc; i++) {
        FILE *f = fopen(g.gl_pathv[i], "r");
        char line[4096];
        while (f && fgets(line, sizeof line, f))
            n += strstr(line, what) != NULL;
        if (f)
            fclose(f);
    }
    globfree(&g);
    return n;
}

/* Sessions of the test's own holding a table lock; released by unlock(), or by the teardown
 * of the test when an assertion ended it first. */
static PGconn *held[2];

/* A session holding `LOCK TABLE <table> IN ACCESS EXCLUSIVE MODE` until unlock(): what a
 * forgotten psql transaction does. */
static PGconn *lock_table(const char *table)
{
    size_t slot = 0;
    while (slot < 2 && held[slot])
        slot++;
    assert_true(slot < 2);
    PGconn *c = held[slot] = PQconnectdb(getenv("CQRS_PG_DSN"));
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    char sql[160];
    snprintf(sql, sizeof sql,
             "SET lock_timeout = '20s'; BEGIN; LOCK TABLE %s IN ACCESS EXCLUSIVE MODE", table);
    PGresult *r = PQexec(c, sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
        fail_msg("cannot lock %s: %s", table, PQerrorMessage(c));
    PQclear(r);
    return c;
}

static void unlock(PGconn *c)
{
    for (size_t i = 0; i < 2; i++)
        if (held[i] == c)
            held[i] = NULL;
    PGresult *r = PQexec(c, "COMMIT");
    ExecStatusType st = PQresultStatus(r);
    PQclear(r);
    PQfinish(c);
    assert_int_equal(st, PGRES_COMMAND_OK);
}

/* Per-test teardown: closing the session ends its transaction and releases its lock. */
static int release_locks(void **state)
{
    (void)state;
    for (size_t i = 0; i < 2; i++) {
        PQfinish(held[i]);
        held[i] = NULL;
    }
    return 0;
}

typedef struct under_lock {
    long long most_connections; /* relay connections, the highest sample */
    int64_t reported_ms;        /* first new TIMEOUT_LOGGED line after the lock (-1: none) */
    long long timeouts_mid;     /* cqrs_relay_pg_timeouts_total halfway through */
    long long timeouts_end;     /* and at the end */
    int sent;
} under_lock_t;

/* Sends a command every 100 ms for ms while sampling the relay connections, the logs and
 * the relays' timeout counters. */
static void commands_under_lock(int ms, under_lock_t *u)
{
    long long logged = log_lines("*.log", TIMEOUT_LOGGED);
    int64_t t0 = cqrs_monotonic_ms();
    u->most_connections = 0;
    u->reported_ms = -1;
    u->timeouts_mid = -1;
    u->sent = 0;
    while (cqrs_monotonic_ms() - t0 < ms) {
        int st = adjust(port, u->sent);
        if (st != 200)
            fail_msg("command %d while a relay table is locked: %d", u->sent, st);
        u->sent++;
        events_expected++;
        long long c = relay_connections();
        if (c > u->most_connections)
            u->most_connections = c;
        if (u->reported_ms < 0 && log_lines("*.log", TIMEOUT_LOGGED) > logged)
            u->reported_ms = cqrs_monotonic_ms() - t0;
        if (u->timeouts_mid < 0 && cqrs_monotonic_ms() - t0 >= ms / 2)
            u->timeouts_mid = metric_sum("cqrs_relay_pg_timeouts_total");
        usleep(100 * 1000);
    }
    u->timeouts_end = metric_sum("cqrs_relay_pg_timeouts_total");
}

static void test_relay_table_lock_is_bounded(void **state)
{
    (void)state;
    long long normal = settled_relay_connections();
    PGconn *lk = lock_table("relay_leader");
    under_lock_t u;
    commands_under_lock(12000, &u);
    /* Nothing could be published: every batch record reads relay_leader. */
    assert_true(outbox_rows() >= u.sent);
    unlock(lk);
    if (u.reported_ms < 0)
        fail_msg("no relay reported a lock timeout in 12 s (each relay statement waited)");
    /* Expected after the lock_timeout of the first relay statement on relay_leader (one
     * starts at least every renewal or poll); 5 s of slack for a loaded machine. */
    int64_t bound = RELAY_LOCK_TIMEOUT_MS + RELAY_RENEW_MS + RELAY_POLL_MS + 5000;
    if (u.reported_ms > bound)
        fail_msg("the first lock timeout was reported after %lld ms (expected within %lld)",
                 (long long)u.reported_ms, (long long)bound);
    /* …and the relays kept trying (a pause of at most twice the lease between attempts)
     * instead of waiting in one statement. */
    if (u.timeouts_end <= u.timeouts_mid)
        fail_msg("no relay statement timed out in the second half of the lock (%lld, then %lld)",
                 u.timeouts_mid, u.timeouts_end);
    if (u.most_connections > normal)
        fail_msg("%lld relay connections while the lock was held, %lld normally",
                 u.most_connections, normal);
    assert_true(outbox_drained(60));
    expect_exactly_once();
}

static void test_stuck_relay_statement_is_cancelled(void **state)
{
    (void)state;
    /* A relay as before issue 16 (no timeouts), with a supervisor that gives up after the
     * shortest CQRS_RELAY_STALL_MS (10 s) instead of 60: while the lock is held its election
     * statement never returns by itself. The lock is held past the stall and the grace
     * (5 s) after the cancel, so that an abandoned worker's successor would show up as an
     * extra connection. */
    int stuck_port = extra_port[3] = free_port();
    extra[3] = daemons_spawn_commandd(
        &D, stuck_port, "CQRS_UNSAFE_RELAY_NO_PG_TIMEOUTS=1;CQRS_RELAY_STALL_MS=10000",
        "commandd-stuck");
    assert_true(extra[3] > 0);
    long long normal = settled_relay_connections();
    long long cancels = log_lines("commandd-stuck.log", CANCEL_LOGGED);
    PGconn *lk = lock_table("relay_leader");
    under_lock_t u;
    commands_under_lock(18000, &u);
    unlock(lk);
    /* Its supervisor cancelled the stuck statement… */
    assert_true(log_lines("commandd-stuck.log", CANCEL_LOGGED) > cancels);
    /* …instead of abandoning the worker with its connection and starting another one. */
    if (u.most_connections > normal)
        fail_msg("%lld relay connections while the lock was held, %lld normally",
                 u.most_connections, normal);
    assert_int_equal(daemons_metric(stuck_port, "cqrs_relay_restarts_total"), 0);
    assert_true(outbox_drained(60));
    expect_exactly_once();
    assert_int_equal(daemons_stop_one(&extra[3]), 0);
}

static void test_idempotency_cleanup_lock_is_bounded(void **state)
{
    (void)state;
    /* A new instance takes over while idempotency_keys is locked: its first act as leader is
     * the expired-key cleanup. */
    PGconn *lk = lock_table("idempotency_keys");
    int new_port = extra_port[4] = free_port();
    extra[4] = daemons_spawn_commandd(&D, new_port, NULL, "commandd-cleanup");
    assert_true(extra[4] > 0);
    only_commandd(&extra[4]);
    port = new_port;
    int ports[] = {new_port};
    assert_int_equal(leader_port(ports, 1, 20), new_port);
    for (int i = 0; i < 20; i++) {
        assert_int_equal(adjust(port, i), 200);
        events_expected++;
    }
    /* Published while the lock is still held: the cleanup gave up, the lease was kept. */
    bool drained = outbox_drained(20);
    long long changes = daemons_metric(new_port, "cqrs_relay_leadership_changes_total");
    unlock(lk);
    if (!drained)
        fail_msg("nothing published while idempotency_keys was locked (the cleanup waited)");
    assert_int_equal(changes, 1);
    assert_true(log_lines("commandd-cleanup.log", TIMEOUT_LOGGED) > 0);
    expect_exactly_once();
}

/* ---- review of the bounded waits --------------------------------------------------- */

static void test_failed_delete_after_commit_is_retried_alone(void **state)
{
    (void)state;
    /* The delete after a successful Kafka commit fails three times (as a timed-out one
     * would). The leader knows the batch is in Kafka: it retries the delete alone. Settling
     * the record by a Kafka lookup instead (as after a takeover, but without the
     * init_transactions that waits for the commit markers) counts the batch as recovered
     * when it sees it, and publishes it again when it looks before the markers are written. */
    int p = extra_port[5] = free_port();
    extra[5] = daemons_spawn_commandd(&D, p, "CQRS_FAILPOINTS=relay-delete-published=error*3",
                                      "commandd-delete");
    assert_true(extra[5] > 0);
    only_commandd(&extra[5]);
    port = p;
    int ports[] = {p};
    assert_int_equal(leader_port(ports, 1, 20), p);
    for (int i = 0; i < 30; i++) {
        assert_int_equal(adjust(port, i), 200);
        events_expected++;
        usleep(100 * 1000);
    }
    assert_true(outbox_drained(60));
    expect_exactly_once();
    assert_int_equal(log_lines("commandd-delete.log", "\"relay-delete-published\""), 3);
    long long recovered = daemons_metric(p, "cqrs_relay_events_recovered_total");
    if (recovered != 0)
        fail_msg("%lld rows settled by a Kafka lookup after a failed delete (it can take a "
                 "committed batch for an aborted one)",
                 recovered);
    assert_true(log_lines("commandd-delete.log", "published rows deleted on retry") >= 1);
    assert_int_equal(daemons_metric(p, "cqrs_relay_leadership_changes_total"), 1);
}

static void test_abandoned_worker_frees_itself(void **state)
{
    (void)state;
    /* The leader's worker stops after its deliveries for 17 s without a heartbeat: past the
     * stall (10 s) and the grace after the cancel (5 s), so the supervisor abandons it. The
     * supervisor then waits 5 s right after its CAS (relay-abandon-after-cas): the worker
     * returns meanwhile, aborts its batch and frees itself. The supervisor must not touch it
     * any more (ASan aborts the daemon on a use after free), and nothing may leak (LeakSanitizer
     * makes the exit status non-zero). */
    int p = extra_port[6] = free_port();
    extra[6] = daemons_spawn_commandd(
        &D, p,
        "CQRS_RELAY_STALL_MS=10000;CQRS_FAILPOINTS=relay-after-delivery=delay:17000*1,"
        "relay-abandon-after-cas=delay:5000*1",
        "commandd-abandon");
    assert_true(extra[6] > 0);
    only_commandd(&extra[6]);
    port = p;
    int ports[] = {p};
    assert_int_equal(leader_port(ports, 1, 20), p);
    assert_int_equal(adjust(port, 0), 200);
    events_expected++;
    /* Abandoned about 15 s after its last heartbeat; the successor starts once abandon()
     * returns, 5 s later. */
    long long restarts = -1;
    for (int t = 0; t < 600 && restarts < 1 && alive(extra[6]); t++) {
        restarts = daemons_metric(p, "cqrs_relay_restarts_total");
        usleep(100 * 1000);
    }
    if (!alive(extra[6]))
        fail_msg("cqrs-commandd died while its stuck relay worker was abandoned (see %s/%s)",
                 D.logdir, "commandd-abandon.log");
    assert_int_equal(restarts, 1);
    /* The successor publishes the batch the abandoned worker aborted. */
    assert_true(outbox_drained(60));
    assert_int_equal(log_lines("commandd-abandon.log", "an abandoned relay worker returned"), 1);
    assert_int_equal(log_lines("commandd-abandon.log", "AddressSanitizer"), 0);
    expect_exactly_once();
    for (int i = 0; i < 20; i++) {
        assert_int_equal(adjust(port, i), 200);
        events_expected++;
    }
    assert_true(outbox_drained(60));
    expect_exactly_once();
    assert_int_equal(daemons_stop_one(&extra[6]), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kafka_outage),
        cmocka_unit_test(test_takeover_after_sigkill),
        cmocka_unit_test(test_paused_leader_is_fenced),
        cmocka_unit_test(test_postgres_restart),
        cmocka_unit_test_teardown(test_relay_table_lock_is_bounded, release_locks),
        cmocka_unit_test_teardown(test_stuck_relay_statement_is_cancelled, release_locks),
        cmocka_unit_test_teardown(test_idempotency_cleanup_lock_is_bounded, release_locks),
        cmocka_unit_test(test_failed_delete_after_commit_is_retried_alone),
        cmocka_unit_test(test_abandoned_worker_frees_itself),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
