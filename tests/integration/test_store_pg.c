/* Integration tests of store.c and cqrs_outbox_append against the real PostgreSQL of the
 * stack (CQRS_PG_DSN): migrations, one transaction for row + event + outbox, rollback,
 * the (aggregate, version) constraint, contention retry, and a fast failure when the server
 * is unreachable. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include <cqrs/outbox.h>
#include <cqrs/store.h>
#include <cqrs/util.h>

#include "daemons.h"
#include "testenv.h"

extern const cqrs_embedded_file_t cqrs_migrations[];

static const char *dsn;
static cqrs_store_t *store;

static int setup(void **state)
{
    (void)state;
    dsn = testenv_require("CQRS_PG_DSN");
    int applied;
    cqrs_error_t err;
    if (cqrs_store_migrate(dsn, cqrs_migrations, &applied, &err) != CQRS_ERR_OK) {
        fprintf(stderr, "migrate: %s\n", err.message);
        return -1;
    }
    cqrs_store_config_t cfg = {.dsn = dsn,
                               .pool_size = 2,
                               .acquire_timeout_ms = 2000,
                               .statement_timeout_ms = 5000,
                               .lock_timeout_ms = 1000,
                               .connect_timeout_s = 3,
                               .max_tx_attempts = 5,
                               .application_name = "test_store_pg"};
    store = cqrs_store_new(&cfg);
    return store ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    /* These events name a topic that does not exist; keep them away from the relay. */
    pg_count("WITH d AS (DELETE FROM outbox WHERE topic = 'itest.events' RETURNING 1)"
             " SELECT count(*) FROM d",
             NULL);
    cqrs_store_destroy(store);
    return 0;
}

static void test_migrate_is_idempotent(void **state)
{
    (void)state;
    int applied = -1;
    cqrs_error_t err;
    assert_int_equal(cqrs_store_migrate(dsn, cqrs_migrations, &applied, &err), CQRS_ERR_OK);
    assert_int_equal(applied, 0);
    int files = 0;
    for (const cqrs_embedded_file_t *f = cqrs_migrations; f->name; f++)
        files++;
    assert_int_equal(pg_count("SELECT count(*) FROM schema_migrations", NULL), files);
}

typedef struct append_ctx {
    char agg[37];
    int64_t version;
    bool fail_after;
    int64_t sequence;
} append_ctx_t;

static cqrs_err_t append_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    append_ctx_t *a = ud;
    cqrs_event_t ev;
    cqrs_event_init(&ev, "thing.happened.v1", "thing", a->agg, a->version,
                    json_pack("{s:s}", "k", "v"), NULL);
    cqrs_err_t rc = cqrs_outbox_append(tx, &ev, "itest.events", err);
    a->sequence = ev.sequence;
    cqrs_event_close(&ev);
    if (rc == CQRS_ERR_OK && a->fail_after)
        rc = cqrs_error_set(err, CQRS_ERR_CONFLICT, "business rule said no");
    return rc;
}

static void test_event_and_outbox_commit_together(void **state)
{
    (void)state;
    append_ctx_t a = {.version = 1};
    cqrs_uuid_v4(a.agg);
    cqrs_error_t err;
    assert_int_equal(cqrs_store_run_tx(store, append_tx, &a, &err), CQRS_ERR_OK);
    assert_true(a.sequence > 0);
    char seq[24];
    snprintf(seq, sizeof seq, "%lld", (long long)a.sequence);
    assert_int_equal(
        pg_count("SELECT count(*) FROM events WHERE sequence = $1 AND version = 1", seq), 1);
    assert_int_equal(
        pg_count("SELECT count(*) FROM outbox WHERE sequence = $1 AND topic = 'itest.events'", seq),
        1);
}

static void test_failed_command_writes_nothing(void **state)
{
    (void)state;
    append_ctx_t a = {.version = 1, .fail_after = true};
    cqrs_uuid_v4(a.agg);
    cqrs_error_t err;
    assert_int_equal(cqrs_store_run_tx(store, append_tx, &a, &err), CQRS_ERR_CONFLICT);
    assert_int_equal(pg_count("SELECT count(*) FROM events WHERE aggregate_id = $1", a.agg), 0);
}

static void test_one_event_per_aggregate_version(void **state)
{
    (void)state;
    append_ctx_t a = {.version = 1};
    cqrs_uuid_v4(a.agg);
    cqrs_error_t err;
    assert_int_equal(cqrs_store_run_tx(store, append_tx, &a, &err), CQRS_ERR_OK);
    assert_int_equal(cqrs_store_run_tx(store, append_tx, &a, &err), CQRS_ERR_CONFLICT);
    assert_string_equal(err.where, "events_aggregate_version_key");
    a.version = 2;
    assert_int_equal(cqrs_store_run_tx(store, append_tx, &a, &err), CQRS_ERR_OK);
    assert_int_equal(pg_count("SELECT count(*) FROM events WHERE aggregate_id = $1", a.agg), 2);
}

static int attempts;

static cqrs_err_t flaky_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    (void)ud;
    attempts++;
    if (attempts < 3)
        /* What PostgreSQL raises when two transactions collide. */
        return cqrs_tx_exec(tx,
                            "DO $$ BEGIN RAISE EXCEPTION 'collided' USING ERRCODE = '40001';"
                            " END $$",
                            0, NULL, NULL, err);
    return CQRS_ERR_OK;
}

static void test_contention_is_retried_inside(void **state)
{
    (void)state;
    attempts = 0;
    cqrs_error_t err;
    assert_int_equal(cqrs_store_run_tx(store, flaky_tx, NULL, &err), CQRS_ERR_OK);
    assert_int_equal(attempts, 3);
}

static void test_unreachable_server_fails_fast(void **state)
{
    (void)state;
    cqrs_store_config_t cfg = {.dsn = "host=127.0.0.1 port=1 dbname=x user=x",
                               .pool_size = 1,
                               .acquire_timeout_ms = 100,
                               .connect_timeout_s = 2,
                               .max_tx_attempts = 3};
    cqrs_store_t *dead = cqrs_store_new(&cfg);
    cqrs_error_t err;
    int64_t t0 = cqrs_monotonic_ms();
    assert_int_equal(cqrs_store_run_tx(dead, flaky_tx, NULL, &err), CQRS_ERR_UNAVAILABLE);
    assert_int_equal(cqrs_store_ping(dead, &err), CQRS_ERR_UNAVAILABLE);
    /* A hang detector, not a benchmark: a refused connection waits out no timeout. */
    assert_true(cqrs_monotonic_ms() - t0 < 15000);
    cqrs_store_destroy(dead);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_migrate_is_idempotent),
        cmocka_unit_test(test_event_and_outbox_commit_together),
        cmocka_unit_test(test_failed_command_writes_nothing),
        cmocka_unit_test(test_one_event_per_aggregate_version),
        cmocka_unit_test(test_contention_is_retried_inside),
        cmocka_unit_test(test_unreachable_server_fails_fast),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
