/* What a client of a PostgreSQL primary sees once its synchronous standby was promoted: every
 * commit waits for a standby that no longer follows it (statement_timeout does not end that
 * wait: PostgreSQL disables it before committing), a cancel request does, and PostgreSQL then
 * reports SUCCESS with only a WARNING ("already committed locally, but might not
 * have been replicated"). That commit exists on a server about to be fenced: the pool must
 * count it as failed (503, an Idempotency-Key retry settles it) and drop the connection, and
 * the relay must neither take its lease nor record, publish or delete anything there.
 *
 * Run by tests/support/with_sync_pg.sh, which starts a private server whose
 * synchronous_standby_names names a standby that never connects (CQRS_TEST_SYNC_PG_DSN; the
 * same database with synchronous_commit=local is CQRS_TEST_LOCAL_PG_DSN, for setup and
 * checks). Kafka is the stack's. Also: a read-only server (a standby) makes the pool drop the
 * connection. Each mechanism has its negative control (CQRS_UNSAFE_TRUST_UNREPLICATED_COMMIT=1,
 * failpoint builds). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <libpq-fe.h>

#include <cqrs/bus.h>
#include <cqrs/outbox.h>
#include <cqrs/store.h>
#include <cqrs/util.h>

#include "daemons.h"
#include "httpc.h"
#include "kafka_check.h"
#include "testenv.h"

extern const cqrs_embedded_file_t cqrs_migrations[];

static const char *sync_dsn, *local_dsn, *brokers;

static long long local_count(const char *sql)
{
    PGconn *c = PQconnectdb(local_dsn);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    PGresult *r = PQexec(c, sql);
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        fail_msg("%s: %s", sql, PQerrorMessage(c));
    long long n = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    PQfinish(c);
    return n;
}

static void local_exec(const char *sql)
{
    PGconn *c = PQconnectdb(local_dsn);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    PGresult *r = PQexec(c, sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
        fail_msg("%s: %s", sql, PQerrorMessage(c));
    PQclear(r);
    PQfinish(c);
}

static int setup(void **state)
{
    (void)state;
    sync_dsn = testenv_require("CQRS_TEST_SYNC_PG_DSN");
    local_dsn = testenv_require("CQRS_TEST_LOCAL_PG_DSN");
    brokers = testenv_require("CQRS_KAFKA_BROKERS");
    int applied;
    cqrs_error_t err;
    if (cqrs_store_migrate(local_dsn, cqrs_migrations, &applied, &err) != CQRS_ERR_OK) {
        fprintf(stderr, "migrate: %s\n", err.message);
        return -1;
    }
    local_exec("CREATE TABLE IF NOT EXISTS t(id int PRIMARY KEY)");
    return 0;
}

static cqrs_store_t *store_on(const char *dsn)
{
    cqrs_store_config_t cfg = {.dsn = dsn,
                               .pool_size = 1,
                               .acquire_timeout_ms = 2000,
                               .statement_timeout_ms = 300,
                               .lock_timeout_ms = 200,
                               .connect_timeout_s = 3,
                               .max_tx_attempts = 3,
                               .application_name = "test_store_failover"};
    cqrs_store_t *s = cqrs_store_new(&cfg);
    assert_non_null(s);
    return s;
}

static cqrs_err_t backend_pid_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    cqrs_rows_t *rows = NULL;
    cqrs_err_t rc = cqrs_tx_exec(tx, "SELECT pg_backend_pid()", 0, NULL, &rows, err);
    if (rc == CQRS_ERR_OK)
        *(long *)ud = atol(cqrs_rows_get(rows, 0, 0));
    cqrs_rows_free(rows);
    return rc;
}

static long backend_pid(cqrs_store_t *s)
{
    long pid = 0;
    cqrs_error_t err;
    /* read only: its commit writes nothing and waits for no standby */
    assert_int_equal(cqrs_store_run_tx(s, backend_pid_tx, &pid, &err), CQRS_ERR_OK);
    assert_true(pid > 0);
    return pid;
}

static cqrs_err_t insert_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    char id[16];
    snprintf(id, sizeof id, "%d", *(int *)ud);
    const char *p[] = {id};
    return cqrs_tx_exec(tx, "INSERT INTO t(id) VALUES ($1::int)", 1, p, NULL, err);
}

static void test_unreplicated_commit_fails_and_drops_the_connection(void **state)
{
    (void)state;
    cqrs_store_t *s = store_on(sync_dsn);
    long before = backend_pid(s);
    int id = 1;
    cqrs_error_t err;
    assert_int_equal(cqrs_store_run_tx(s, insert_tx, &id, &err), CQRS_ERR_UNAVAILABLE);
    assert_string_equal(err.where, "unreplicated-commit");
    /* The premise: PostgreSQL did commit it, on this server only. */
    assert_int_equal(local_count("SELECT count(*) FROM t WHERE id = 1"), 1);
    /* Not retried inside (a second attempt would be a second commit of the same work). */
    assert_int_equal(local_count("SELECT count(*) FROM t"), 1);
    assert_int_not_equal(backend_pid(s), before);
    cqrs_store_destroy(s);
}

static void test_negative_control_trusts_the_warning(void **state)
{
    (void)state;
#ifdef CQRS_ENABLE_FAILPOINTS
    cqrs_store_t *s = store_on(sync_dsn);
    setenv("CQRS_UNSAFE_TRUST_UNREPLICATED_COMMIT", "1", 1);
    int id = 2;
    cqrs_error_t err;
    cqrs_err_t rc = cqrs_store_run_tx(s, insert_tx, &id, &err);
    unsetenv("CQRS_UNSAFE_TRUST_UNREPLICATED_COMMIT");
    assert_int_equal(rc, CQRS_ERR_OK); /* what a client without the check believes */
    cqrs_store_destroy(s);
#else
    fprintf(stderr, "(negative control needs a -DCQRS_ENABLE_FAILPOINTS=ON build)\n");
#endif
}

static cqrs_err_t read_only_insert_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    cqrs_err_t rc = cqrs_tx_exec(tx, "SET TRANSACTION READ ONLY", 0, NULL, NULL, err);
    return rc ? rc : insert_tx(tx, ud, err);
}

static void test_read_only_server_drops_the_connection(void **state)
{
    (void)state;
    /* A standby answers every write with 25006; here the transaction is read-only instead. */
    cqrs_store_t *s = store_on(local_dsn);
    long before = backend_pid(s);
    int id = 3;
    cqrs_error_t err;
    assert_int_equal(cqrs_store_run_tx(s, read_only_insert_tx, &id, &err), CQRS_ERR_UNAVAILABLE);
    assert_string_equal(err.where, "25006");
    assert_int_not_equal(backend_pid(s), before);
    cqrs_store_destroy(s);
}

static cqrs_err_t append_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    const char *topic = ud;
    char agg[37];
    cqrs_uuid_v4(agg);
    cqrs_event_t ev;
    cqrs_event_init(&ev, "thing.happened.v1", "thing", agg, 1, json_pack("{s:i}", "a", 1), NULL);
    cqrs_err_t rc = cqrs_outbox_append(tx, &ev, topic, err);
    cqrs_event_close(&ev);
    return rc;
}

static cqrs_relay_t *relay_on(const char *topic)
{
    const char *topics[] = {topic};
    cqrs_relay_config_t rc = {.dsn = sync_dsn,
                              .brokers = brokers,
                              .source = "/test",
                              .batch_size = 100,
                              .poll_interval_ms = 200,
                              .message_timeout_ms = 5000,
                              .transactional_id = topic, /* its own: no daemon's relay fenced */
                              /* each write waits 1.3 s here (timeout + 1 s, then the
                               * cancel): a lease that outlasts a round's renewals */
                              .lease_ms = 10000,
                              .statement_timeout_ms = 300,
                              .topics = topics,
                              .n_topics = 1,
                              .topic_partitions = 1,
                              .topic_replication = -1};
    cqrs_error_t err;
    cqrs_relay_t *r = cqrs_relay_new(&rc, &err);
    assert_non_null(r);
    assert_int_equal(cqrs_relay_start(r, &err), CQRS_ERR_OK);
    return r;
}

static void test_relay_changes_nothing_on_an_unreplicated_primary(void **state)
{
    (void)state;
    char id[37], topic[64];
    cqrs_uuid_v4(id);
    snprintf(topic, sizeof topic, "itest.%.8s.events", id);
    const char *topics[] = {topic};
    cqrs_error_t err;
    assert_int_equal(cqrs_bus_create_topics(brokers, topics, 1, 1, -1, 10000, &err), CQRS_ERR_OK);
    cqrs_store_t *local = store_on(local_dsn);
    assert_int_equal(cqrs_store_run_tx(local, append_tx, topic, &err), CQRS_ERR_OK);
    cqrs_store_destroy(local);

    cqrs_relay_t *r = relay_on(topic);
    sleep(6); /* several elections (each 1.3 s, then a reconnect) */
    cqrs_relay_stats_t st;
    cqrs_relay_stats(r, &st);
    cqrs_relay_stop(r);
    cqrs_relay_destroy(r);
    assert_false(st.leader);
    assert_int_equal(st.published, 0);
    assert_int_equal(local_count("SELECT count(*) FROM outbox"), 1);
    /* (Its lease attempts did commit on this server, unreplicated: it never acted on one.) */
    kafka_check_t kc;
    assert_int_equal(kafka_check_topics(brokers, topics, 1, 1, 3, &kc), 0);
    assert_int_equal(kc.messages, 0);

#ifdef CQRS_ENABLE_FAILPOINTS
    /* Negative control: a relay that trusts the warning leads and publishes there. */
    setenv("CQRS_UNSAFE_TRUST_UNREPLICATED_COMMIT", "1", 1);
    r = relay_on(topic);
    assert_int_equal(kafka_check_topics(brokers, topics, 1, 1, 60, &kc), 0);
    cqrs_relay_stop(r);
    cqrs_relay_destroy(r);
    unsetenv("CQRS_UNSAFE_TRUST_UNREPLICATED_COMMIT");
    assert_int_equal(kc.messages, 1);
#endif
}

static int post_product(int port, const char *key, const char *sku)
{
    char hdr[128], body[256];
    snprintf(hdr, sizeof hdr, "Idempotency-Key: %s\r\nContent-Type: application/json\r\n", key);
    snprintf(body, sizeof body,
             "{\"sku\":\"%s\",\"name\":\"n\",\"category\":\"c\",\"price_cents\":100,"
             "\"currency\":\"USD\",\"initial_stock\":1}",
             sku);
    httpc_response_t r;
    int status = httpc_request(port, "POST", "/v1/products", hdr, body, strlen(body), &r) == 0
                     ? r.status
                     : -1;
    httpc_response_free(&r);
    return status;
}

static void test_command_and_its_retry_are_not_acknowledged(void **state)
{
    (void)state;
    /* cqrs-commandd on the server whose commits are never confirmed: the command answers 503
     * (not 201) and so does its retry with the same key (not the stored answer, which exists
     * on this server only: before the replay took an xid, the retry answered 201 in 1 ms). */
    daemons_t d = {0};
    char id[37];
    cqrs_uuid_v4(id);
    snprintf(d.prefix, sizeof d.prefix, "sync%.8s", id);
    snprintf(d.logdir, sizeof d.logdir, "/tmp/cqrs-syncpg-XXXXXX");
    assert_non_null(mkdtemp(d.logdir));
    char env[512];
    snprintf(env, sizeof env, "CQRS_PG_DSN=%s;CQRS_PG_STATEMENT_TIMEOUT_MS=300", sync_dsn);
    int port = free_port();
    pid_t pid = daemons_launch_commandd(&d, port, env, "commandd-sync");
    assert_true(pid > 0);
    int first = -1;
    for (int i = 0; i < 100 && first < 0; i++) { /* until it listens */
        first = post_product(port, id, id);
        if (first < 0)
            usleep(100 * 1000);
    }
    int retry = post_product(port, id, id);
    assert_int_equal(daemons_stop_one(&pid), 0);
    assert_int_equal(first, 503);
    assert_int_equal(retry, 503);
    /* The premise: the command did commit there, answer included. */
    char q[160];
    snprintf(q, sizeof q, "SELECT count(*) FROM idempotency_keys WHERE key = '%s'", id);
    assert_int_equal(local_count(q), 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_unreplicated_commit_fails_and_drops_the_connection),
        cmocka_unit_test(test_negative_control_trusts_the_warning),
        cmocka_unit_test(test_read_only_server_drops_the_connection),
        cmocka_unit_test(test_relay_changes_nothing_on_an_unreplicated_primary),
        cmocka_unit_test(test_command_and_its_retry_are_not_acknowledged),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
