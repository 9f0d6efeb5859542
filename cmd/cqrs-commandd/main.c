/* cqrs-commandd — the command API and the outbox relay.
 *
 * Start-up: config → log → store → topics (best effort) → relay → HTTP → wait for SIGTERM.
 * Shutdown: readiness fails, HTTP drains in-flight requests (bounded by the grace period),
 * the relay finishes its batch and flushes its producer, exit 0.
 */
#include <cqrs/bus.h>
#include <cqrs/config.h>
#include <cqrs/daemon.h>
#include <cqrs/log.h>
#include <cqrs/metrics.h>
#include <cqrs/version.h>
#include <cqrs/outbox.h>
#include <cqrs/store.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "command.h"

typedef struct settings {
    cqrs_daemon_settings_t d;
    char *pg_dsn;
    int64_t pg_pool_size;
    int64_t pg_acquire_timeout_ms;
    int64_t pg_statement_timeout_ms;
    int64_t pg_lock_timeout_ms;
    int64_t tx_max_attempts;
    char *kafka_brokers;
    char *topic_prefix;
    int64_t kafka_partitions;
    int64_t kafka_replication;
    bool relay_enabled;
    int64_t relay_batch_size;
    int64_t relay_poll_ms;
    int64_t kafka_message_timeout_ms;
    int64_t idempotency_ttl_s;
    int64_t relay_lease_ms;
    int64_t relay_stall_ms;
    char *relay_txn_id;
    domain_limits_t limits;
} settings_t;

static settings_t S;

#define N_OWN 27
static cqrs_config_entry_t entries[CQRS_DAEMON_SETTINGS_N + N_OWN];

static void settings_table(void)
{
    cqrs_daemon_settings_entries(&S.d, "8081", entries);
    const cqrs_config_entry_t own[N_OWN] = {
        {"CQRS_PG_DSN", CQRS_CONFIG_SECRET, NULL, 0, 0,
         "PostgreSQL connection string or URI (may hold a password)", &S.pg_dsn, NULL},
        {"CQRS_PG_POOL_SIZE", CQRS_CONFIG_INT, "8", 1, 1000, "PostgreSQL connections",
         &S.pg_pool_size, NULL},
        {"CQRS_PG_ACQUIRE_TIMEOUT_MS", CQRS_CONFIG_INT, "2000", 1, 60000,
         "wait for a free connection before answering 503", &S.pg_acquire_timeout_ms, NULL},
        {"CQRS_PG_STATEMENT_TIMEOUT_MS", CQRS_CONFIG_INT, "5000", 1, 600000,
         "statement_timeout of every connection (the relay's: at most CQRS_RELAY_STALL_MS/4)",
         &S.pg_statement_timeout_ms, NULL},
        {"CQRS_PG_LOCK_TIMEOUT_MS", CQRS_CONFIG_INT, "2000", 1, 600000,
         "lock_timeout of every connection, retried inside (the relay's: at most "
         "CQRS_RELAY_LEASE_MS/2)",
         &S.pg_lock_timeout_ms, NULL},
        {"CQRS_TX_MAX_ATTEMPTS", CQRS_CONFIG_INT, "10", 1, 100,
         "attempts of a transaction that hits contention", &S.tx_max_attempts, NULL},
        {"CQRS_KAFKA_BROKERS", CQRS_CONFIG_STRING, NULL, 0, 0, "Kafka bootstrap servers",
         &S.kafka_brokers, NULL},
        {"CQRS_TOPIC_PREFIX", CQRS_CONFIG_STRING, "cqrs", 0, 0,
         "topics are <prefix>.product.events and <prefix>.order.events", &S.topic_prefix, NULL},
        {"CQRS_KAFKA_PARTITIONS", CQRS_CONFIG_INT, "6", 1, 10000,
         "partitions of topics created at start-up", &S.kafka_partitions, NULL},
        {"CQRS_KAFKA_REPLICATION", CQRS_CONFIG_INT, "-1", -1, 100,
         "replication factor of created topics (-1 = broker default)", &S.kafka_replication, NULL},
        {"CQRS_RELAY_ENABLED", CQRS_CONFIG_BOOL, "true", 0, 0,
         "run the outbox relay (one instance leads; the others stand by)", &S.relay_enabled, NULL},
        {"CQRS_RELAY_BATCH_SIZE", CQRS_CONFIG_INT, "500", 1, 100000,
         "outbox rows published per round", &S.relay_batch_size, NULL},
        {"CQRS_RELAY_POLL_MS", CQRS_CONFIG_INT, "1000", 10, 60000,
         "fallback poll of the outbox when no NOTIFY arrives", &S.relay_poll_ms, NULL},
        {"CQRS_KAFKA_MESSAGE_TIMEOUT_MS", CQRS_CONFIG_INT, "30000", 1000, 900000,
         "delivery timeout of one event (then retried from the outbox)",
         &S.kafka_message_timeout_ms, NULL},
        {"CQRS_RELAY_LEASE_MS", CQRS_CONFIG_INT, "5000", 1000, 600000,
         "relay leadership lease: a silent leader is replaced after this long", &S.relay_lease_ms,
         NULL},
        {"CQRS_RELAY_STALL_MS", CQRS_CONFIG_INT, "60000", CQRS_RELAY_STALL_MIN_MS, 600000,
         "a relay thread without progress this long has its statement cancelled, then is "
         "replaced (at least CQRS_RELAY_LEASE_MS)",
         &S.relay_stall_ms, NULL},
        {"CQRS_RELAY_TRANSACTIONAL_ID", CQRS_CONFIG_STRING, "", 0, 0,
         "Kafka transactional.id shared by the relays of one deployment (default "
         "<prefix>-relay)",
         &S.relay_txn_id, NULL},
        {"CQRS_IDEMPOTENCY_TTL_S", CQRS_CONFIG_INT, "86400", 60, 2592000,
         "how long a stored Idempotency-Key response is replayed", &S.idempotency_ttl_s, NULL},
        {"CQRS_LIMIT_SKU_CHARS", CQRS_CONFIG_INT, "64", 1, 255, "longest sku", &S.limits.sku_max,
         NULL},
        {"CQRS_LIMIT_NAME_CHARS", CQRS_CONFIG_INT, "200", 1, 10000, "longest product name",
         &S.limits.name_max, NULL},
        {"CQRS_LIMIT_DESCRIPTION_CHARS", CQRS_CONFIG_INT, "4000", 0, 100000,
         "longest product description", &S.limits.description_max, NULL},
        {"CQRS_LIMIT_CATEGORY_CHARS", CQRS_CONFIG_INT, "64", 1, 1000, "longest category",
         &S.limits.category_max, NULL},
        {"CQRS_LIMIT_REASON_CHARS", CQRS_CONFIG_INT, "200", 0, 10000,
         "longest stock adjustment reason", &S.limits.reason_max, NULL},
        {"CQRS_LIMIT_PRICE_CENTS", CQRS_CONFIG_INT, "1000000000", 0, 1000000000000,
         "highest price_cents", &S.limits.price_max, NULL},
        {"CQRS_LIMIT_STOCK", CQRS_CONFIG_INT, "1000000000", 0, 1000000000000,
         "highest stock (and |delta|)", &S.limits.stock_max, NULL},
        {"CQRS_LIMIT_QUANTITY", CQRS_CONFIG_INT, "1000", 1, 1000000, "highest quantity of a line",
         &S.limits.quantity_max, NULL},
        {"CQRS_LIMIT_ORDER_LINES", CQRS_CONFIG_INT, "50", 1, 1000, "most lines in one order",
         &S.limits.order_lines_max, NULL},
    };
    memcpy(entries + CQRS_DAEMON_SETTINGS_N, own, sizeof own);
}

typedef struct app {
    command_ctx_t ctx;
    cqrs_relay_t *relay;
    atomic_bool draining;
    cqrs_http_server_t *http;
} app_t;

static void readyz(cqrs_http_request_t *req, void *ud)
{
    app_t *app = ud;
    cqrs_error_t err;
    if (atomic_load(&app->draining)) {
        cqrs_http_reply_problem(req, 503, "not-ready", "Service Unavailable", "draining", NULL,
                                NULL);
        return;
    }
    /* Kafka is not a readiness dependency: commands are accepted while it is down and the
     * outbox holds their events until it is back. */
    if (cqrs_store_ping(app->ctx.store, &err) != CQRS_ERR_OK) {
        cqrs_http_reply_problem(req, 503, "not-ready", "Service Unavailable", err.message, NULL,
                                NULL);
        return;
    }
    cqrs_http_reply_json(
        req, 200, json_pack("{s:s, s:{s:s}}", "status", "ready", "checks", "postgres", "up"));
}

static void metrics(cqrs_http_request_t *req, void *ud)
{
    app_t *app = ud;
    cqrs_relay_stats_t st = {.backlog = -1};
    if (app->relay)
        cqrs_relay_stats(app->relay, &st);
    cqrs_text_t t = {0};
    if (app->http)
        cqrs_http_server_metrics(app->http, &t);
    cqrs_version_metrics(&t, "cqrs-commandd");
    cqrs_metrics_process(&t);
    /* Only what this instance observed: PostgreSQL by its relay (which polls it, leading or
     * not) or, without a relay, by its commands and readiness checks; Kafka only while its
     * relay leads (a standby or a relay-less instance never talks to Kafka). */
    int pg = app->relay ? (st.pg_up ? 1 : 0) : cqrs_store_reachable(app->ctx.store);
    if (pg >= 0 || st.kafka_known)
        cqrs_text_printf(&t,
                         "# HELP cqrs_dependency_up 1 when the dependency answered at this "
                         "instance's last attempt, 0 when it did not; absent when this instance "
                         "has not tried it (kafka: only the leading relay talks to it).\n"
                         "# TYPE cqrs_dependency_up gauge\n");
    if (pg >= 0)
        cqrs_text_printf(&t, "cqrs_dependency_up{dependency=\"postgres\"} %d\n", pg);
    if (st.kafka_known)
        cqrs_text_printf(&t, "cqrs_dependency_up{dependency=\"kafka\"} %d\n", st.kafka_up ? 1 : 0);
    cqrs_metric_gauge(&t, "cqrs_relay_leader", "1 while this instance's relay holds the lease.",
                      st.leader ? 1 : 0);
    cqrs_metric_counter(&t, "cqrs_relay_leadership_changes_total",
                        "Times this instance's relay became the leader.", st.leadership_changes);
    cqrs_metric_counter(&t, "cqrs_relay_events_published_total",
                        "Events committed to Kafka by this instance's relay.", st.published);
    cqrs_metric_counter(&t, "cqrs_relay_delivery_failures_total",
                        "Events Kafka did not acknowledge (their batch is retried).", st.failed);
    cqrs_metric_counter(&t, "cqrs_relay_transactions_aborted_total",
                        "Kafka transactions the relay aborted.", st.aborted);
    cqrs_metric_counter(&t, "cqrs_relay_restarts_total",
                        "Relay threads replaced after CQRS_RELAY_STALL_MS without progress.",
                        st.restarts);
    cqrs_metric_counter(&t, "cqrs_relay_pg_timeouts_total",
                        "Relay statements ended by lock_timeout, statement_timeout or a cancel "
                        "(retried).",
                        st.pg_timeouts);
    cqrs_metric_counter(&t, "cqrs_relay_events_recovered_total",
                        "Outbox rows found already in Kafka when taking over.", st.recovered);
    if (st.backlog >= 0) {
        cqrs_metric_gauge(&t, "cqrs_relay_backlog_events",
                          "Outbox rows not yet acknowledged by Kafka, counted every 2 s by the "
                          "leading relay, Kafka reachable or not (only the leader has it).",
                          (double)st.backlog);
        cqrs_metric_gauge(&t, "cqrs_relay_oldest_unpublished_age_seconds",
                          "Age of the oldest outbox row, as of the leader's last count (only the "
                          "leader has it).",
                          st.oldest_age_s);
    }
    if (app->relay)
        cqrs_relay_metrics(app->relay, &t);
    cqrs_http_reply_text(req, 200, "text/plain; version=0.0.4; charset=utf-8", t.buf ? t.buf : "");
    cqrs_text_free(&t);
}

#define MAX_ROUTES 32

static size_t build_routes(app_t *app, cqrs_http_route_t *routes)
{
    size_t n = command_routes(&app->ctx, routes, MAX_ROUTES - 3);
    routes[n++] = (cqrs_http_route_t){"GET", "/healthz", cqrs_daemon_healthz,
                                      app,   "Healthz",  CQRS_SCOPE_NONE};
    routes[n++] = (cqrs_http_route_t){"GET", "/readyz", readyz, app, "Readyz", CQRS_SCOPE_NONE};
    routes[n++] =
        (cqrs_http_route_t){"GET", "/metrics", metrics, app, "Metrics", CQRS_SCOPE_METRICS};
    return n;
}

/* --routes: the route table, one "METHOD PATTERN" per line (checked against the OpenAPI
 * document by the test suite). */
static void print_routes(void)
{
    static app_t app;
    cqrs_http_route_t routes[MAX_ROUTES];
    size_t n = build_routes(&app, routes);
    cqrs_daemon_print_routes(routes, n);
}

int main(int argc, char **argv)
{
    settings_table();
    size_t n_entries = sizeof entries / sizeof entries[0];
    const cqrs_daemon_cli_t cli = {"cqrs-commandd", "the command API and outbox relay of cqrs.",
                                   entries, n_entries, print_routes};
    int cli_rc = cqrs_daemon_cli(&cli, argc, argv);
    if (cli_rc >= 0)
        return cli_rc;
    if (cqrs_config_load(entries, n_entries, NULL, NULL, stderr) != 0) {
        fprintf(stderr, "cqrs-commandd: bad configuration (see --help)\n");
        return 2;
    }
    /* Every Kafka client reads the operator's librdkafka properties: a bad one is a
     * configuration error now, not at the first connection. */
    if (cqrs_bus_check_properties(stderr) != 0) {
        fprintf(stderr, "cqrs-commandd: bad Kafka client properties (see --help)\n");
        cqrs_config_free(entries, n_entries);
        return 2;
    }
    cqrs_error_t dsn_err;
    if (cqrs_pg_dsn_check(S.pg_dsn, &dsn_err) != CQRS_ERR_OK) {
        fprintf(stderr, "cqrs-commandd: %s\n", dsn_err.message);
        cqrs_config_free(entries, n_entries);
        return 2;
    }
    /* A healthy relay waits up to a third of the lease on Kafka between two signs of
     * progress: a shorter patience would cancel and replace it. */
    if (S.relay_stall_ms < S.relay_lease_ms) {
        fprintf(stderr,
                "cqrs-commandd: CQRS_RELAY_STALL_MS (%lld) must be at least CQRS_RELAY_LEASE_MS "
                "(%lld)\n",
                (long long)S.relay_stall_ms, (long long)S.relay_lease_ms);
        cqrs_config_free(entries, n_entries);
        return 2;
    }
    cqrs_log_level_t level = CQRS_LOG_INFO;
    cqrs_log_level_parse(S.d.log_level, &level);
    cqrs_log_init("cqrs-commandd", level);

    /* Bad tokens are a configuration error: exit 2 before anything starts. */
    cqrs_http_auth_t *auth = NULL;
    if (S.d.auth_tokens_file[0]) {
        cqrs_error_t aerr;
        auth = cqrs_http_auth_load(S.d.auth_tokens_file, &aerr);
        if (!auth) {
            fprintf(stderr, "%s: CQRS_AUTH_TOKENS_FILE: %s\n", argv[0], aerr.message);
            cqrs_config_free(entries, n_entries);
            return 2;
        }
    }

    sigset_t sigs;
    cqrs_daemon_block_signals(&sigs);

    int rc = 1;
    static app_t app;
    char product_topic[256], order_topic[256];
    snprintf(product_topic, sizeof product_topic, "%s.product.events", S.topic_prefix);
    snprintf(order_topic, sizeof order_topic, "%s.order.events", S.topic_prefix);
    cqrs_store_config_t sc = {
        .dsn = S.pg_dsn,
        .pool_size = (unsigned)S.pg_pool_size,
        .acquire_timeout_ms = (unsigned)S.pg_acquire_timeout_ms,
        .statement_timeout_ms = (unsigned)S.pg_statement_timeout_ms,
        .lock_timeout_ms = (unsigned)S.pg_lock_timeout_ms,
        .connect_timeout_s = 3,
        .max_tx_attempts = (unsigned)S.tx_max_attempts,
        .application_name = "cqrs-commandd",
    };
    app.ctx.store = cqrs_store_new(&sc);
    app.ctx.product_topic = product_topic;
    app.ctx.order_topic = order_topic;
    app.ctx.cmd.max_json_depth = (int)S.d.max_json_depth;
    app.ctx.cmd.idempotency_ttl_s = S.idempotency_ttl_s;
    app.ctx.limits = S.limits;
    cqrs_http_server_t *http = NULL;
    cqrs_error_t err;
    if (!app.ctx.store) {
        CQRS_LOG_ERROR("out of memory");
        goto out;
    }

    /* The relay ensures the topics when it becomes leader (cqrsctl migrate creates them
     * too); until they exist the events wait in the outbox. */
    const char *topics[] = {product_topic, order_topic};
    char txn_id[300];
    snprintf(txn_id, sizeof txn_id, "%s", S.relay_txn_id);
    if (!txn_id[0])
        snprintf(txn_id, sizeof txn_id, "%s-relay", S.topic_prefix);
    if (S.relay_enabled) {
        cqrs_relay_config_t rc_cfg = {
            .dsn = S.pg_dsn,
            .brokers = S.kafka_brokers,
            .source = "/cqrs-commandd",
            .client_id = "cqrs-commandd-relay",
            .batch_size = (int)S.relay_batch_size,
            .poll_interval_ms = (int)S.relay_poll_ms,
            .message_timeout_ms = (int)S.kafka_message_timeout_ms,
            .transactional_id = txn_id,
            .lease_ms = (int)S.relay_lease_ms,
            .statement_timeout_ms = (int)S.pg_statement_timeout_ms,
            .lock_timeout_ms = (int)S.pg_lock_timeout_ms,
            .stall_ms = (int)S.relay_stall_ms,
            .topics = topics,
            .n_topics = 2,
            .topic_partitions = (int)S.kafka_partitions,
            .topic_replication = (int)S.kafka_replication,
        };
        app.relay = cqrs_relay_new(&rc_cfg, &err);
        if (!app.relay || cqrs_relay_start(app.relay, &err) != CQRS_ERR_OK) {
            CQRS_LOG_ERROR("cannot start the outbox relay", "error", err.message);
            if (err.code == CQRS_ERR_CONFIG)
                rc = 2;
            goto out;
        }
    }

    static cqrs_http_route_t routes[MAX_ROUTES];
    size_t n = build_routes(&app, routes);
    cqrs_http_config_t hc;
    cqrs_daemon_http_config(&S.d, &hc);
    hc.auth = auth;
    /* The Location of a created product or order names a document of the query API. No
     * setting holds the query API's public URL (deployments route it), so the hint names the
     * daemon. */
    hc.reads_elsewhere = "the command API serves no reads: read this resource from the query API "
                         "(cqrs-queryd), e.g. GET the path a command returned in Location there";
    http = cqrs_http_server_new(&hc, routes, n, &err);
    if (!http || cqrs_http_server_start(http, &err) != CQRS_ERR_OK) {
        CQRS_LOG_ERROR("cannot start the HTTP server", "error", err.message);
        goto out;
    }
    char port[8];
    snprintf(port, sizeof port, "%u", (unsigned)cqrs_http_server_port(http));
    CQRS_LOG_INFO("listening", "host", S.d.http_host, "port", port);

    app.http = http;
    int sig = cqrs_daemon_wait(&sigs, auth);
    CQRS_LOG_INFO("shutting down", "signal", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    /* Readiness fails first, so load balancers stop sending before the listener closes. */
    atomic_store(&app.draining, true);
    if (S.d.shutdown_delay_ms > 0)
        usleep((useconds_t)S.d.shutdown_delay_ms * 1000);
    rc = 0;
out:
    cqrs_http_server_destroy(http);
    cqrs_relay_destroy(app.relay);
    cqrs_store_destroy(app.ctx.store);
    cqrs_http_auth_destroy(auth);
    CQRS_LOG_INFO("stopped");
    cqrs_config_free(entries, n_entries);
    return rc;
}
