/* cqrs-commandd — the command API and the outbox relay.
 *
 * What is its own; the boot, signals and drain are cqrs_daemon_main's (daemon.h):
 *   settings   PostgreSQL, Kafka, relay, command limits (own_settings)
 *   components the store, then the relay (CQRS_RELAY_ENABLED); stopped after the HTTP drain,
 *              the relay finishing its batch and flushing its producer
 *   routes     the commands (command_routes)
 *   readiness  PostgreSQL answers (Kafka is not a dependency: the outbox holds events)
 *   metrics    dependencies and the relay's
 */
#include <cqrs/daemon.h>
#include <cqrs/log.h>
#include <cqrs/metrics.h>
#include <cqrs/outbox.h>
#include <cqrs/store.h>
#include <stdio.h>

#include "command.h"
#include "topics.h"

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

static const cqrs_config_entry_t own_settings[] = {
    {"CQRS_PG_DSN", CQRS_CONFIG_SECRET, NULL, 0, 0,
     "PostgreSQL connection string or URI (may hold a password)", &S.pg_dsn, NULL},
    {"CQRS_PG_POOL_SIZE", CQRS_CONFIG_INT, "8", 1, 1000, "PostgreSQL connections", &S.pg_pool_size,
     NULL},
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
    TOPIC_PREFIX_SETTING(&S.topic_prefix),
    {"CQRS_KAFKA_PARTITIONS", CQRS_CONFIG_INT, "6", 1, 10000,
     "partitions of topics created at start-up", &S.kafka_partitions, NULL},
    {"CQRS_KAFKA_REPLICATION", CQRS_CONFIG_INT, "-1", -1, 100,
     "replication factor of created topics (-1 = broker default)", &S.kafka_replication, NULL},
    {"CQRS_RELAY_ENABLED", CQRS_CONFIG_BOOL, "true", 0, 0,
     "run the outbox relay (one instance leads; the others stand by)", &S.relay_enabled, NULL},
    {"CQRS_RELAY_BATCH_SIZE", CQRS_CONFIG_INT, "500", 1, 100000, "outbox rows published per round",
     &S.relay_batch_size, NULL},
    {"CQRS_RELAY_POLL_MS", CQRS_CONFIG_INT, "1000", 10, 60000,
     "fallback poll of the outbox when no NOTIFY arrives", &S.relay_poll_ms, NULL},
    {"CQRS_KAFKA_MESSAGE_TIMEOUT_MS", CQRS_CONFIG_INT, "30000", 1000, 900000,
     "delivery timeout of one event (then retried from the outbox)", &S.kafka_message_timeout_ms,
     NULL},
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
    {"CQRS_LIMIT_SKU_CHARS", CQRS_CONFIG_INT, "64", 1, 255, "longest sku", &S.limits.sku_max, NULL},
    {"CQRS_LIMIT_NAME_CHARS", CQRS_CONFIG_INT, "200", 1, 10000, "longest product name",
     &S.limits.name_max, NULL},
    {"CQRS_LIMIT_DESCRIPTION_CHARS", CQRS_CONFIG_INT, "4000", 0, 100000,
     "longest product description", &S.limits.description_max, NULL},
    {"CQRS_LIMIT_CATEGORY_CHARS", CQRS_CONFIG_INT, "64", 1, 1000, "longest category",
     &S.limits.category_max, NULL},
    {"CQRS_LIMIT_REASON_CHARS", CQRS_CONFIG_INT, "200", 0, 10000, "longest stock adjustment reason",
     &S.limits.reason_max, NULL},
    {"CQRS_LIMIT_PRICE_CENTS", CQRS_CONFIG_INT, "1000000000", 0, 1000000000000,
     "highest price_cents", &S.limits.price_max, NULL},
    {"CQRS_LIMIT_STOCK", CQRS_CONFIG_INT, "1000000000", 0, 1000000000000,
     "highest stock (and |delta|)", &S.limits.stock_max, NULL},
    {"CQRS_LIMIT_QUANTITY", CQRS_CONFIG_INT, "1000", 1, 1000000, "highest quantity of a line",
     &S.limits.quantity_max, NULL},
    {"CQRS_LIMIT_ORDER_LINES", CQRS_CONFIG_INT, "50", 1, 1000, "most lines in one order",
     &S.limits.order_lines_max, NULL},
};

typedef struct app {
    command_ctx_t ctx;
    cqrs_relay_t *relay;
    topics_t topics;
    char txn_id[300];
} app_t;

static app_t A;

static int check_settings(void *ud, const char *argv0)
{
    (void)ud;
    (void)argv0;
    cqrs_error_t err;
    if (cqrs_pg_dsn_check(S.pg_dsn, &err) != CQRS_ERR_OK) {
        fprintf(stderr, "cqrs-commandd: %s\n", err.message);
        return 2;
    }
    /* A healthy relay waits up to a third of the lease on Kafka between two signs of
     * progress: a shorter patience would cancel and replace it. */
    if (S.relay_stall_ms < S.relay_lease_ms) {
        fprintf(stderr,
                "cqrs-commandd: CQRS_RELAY_STALL_MS (%lld) must be at least CQRS_RELAY_LEASE_MS "
                "(%lld)\n",
                (long long)S.relay_stall_ms, (long long)S.relay_lease_ms);
        return 2;
    }
    return 0;
}

/* The store, then the relay. */
static int start(void *ud)
{
    app_t *a = ud;
    topics_init(&a->topics, S.topic_prefix);
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
    a->ctx.store = cqrs_store_new(&sc);
    a->ctx.product_topic = a->topics.name[TOPIC_PRODUCT];
    a->ctx.order_topic = a->topics.name[TOPIC_ORDER];
    a->ctx.cmd.max_json_depth = (int)S.d.max_json_depth;
    a->ctx.cmd.idempotency_ttl_s = S.idempotency_ttl_s;
    a->ctx.limits = S.limits;
    if (!a->ctx.store) {
        CQRS_LOG_ERROR("out of memory");
        return 1;
    }
    if (!S.relay_enabled)
        return 0;
    /* The relay ensures the topics when it becomes leader (cqrsctl migrate creates them
     * too); until they exist the events wait in the outbox. */
    snprintf(a->txn_id, sizeof a->txn_id, "%s", S.relay_txn_id);
    if (!a->txn_id[0])
        snprintf(a->txn_id, sizeof a->txn_id, "%s-relay", S.topic_prefix);
    cqrs_relay_config_t rc = {
        .dsn = S.pg_dsn,
        .brokers = S.kafka_brokers,
        .source = "/cqrs-commandd",
        .client_id = "cqrs-commandd-relay",
        .batch_size = (int)S.relay_batch_size,
        .poll_interval_ms = (int)S.relay_poll_ms,
        .message_timeout_ms = (int)S.kafka_message_timeout_ms,
        .transactional_id = a->txn_id,
        .lease_ms = (int)S.relay_lease_ms,
        .statement_timeout_ms = (int)S.pg_statement_timeout_ms,
        .lock_timeout_ms = (int)S.pg_lock_timeout_ms,
        .stall_ms = (int)S.relay_stall_ms,
        .topics = a->topics.names,
        .n_topics = TOPIC_TYPES,
        .topic_partitions = (int)S.kafka_partitions,
        .topic_replication = (int)S.kafka_replication,
    };
    cqrs_error_t err;
    a->relay = cqrs_relay_new(&rc, &err);
    if (!a->relay || cqrs_relay_start(a->relay, &err) != CQRS_ERR_OK) {
        CQRS_LOG_ERROR("cannot start the outbox relay", "error", err.message);
        return err.code == CQRS_ERR_CONFIG ? 2 : 1;
    }
    return 0;
}

static void stop(void *ud)
{
    app_t *a = ud;
    cqrs_relay_destroy(a->relay);
    cqrs_store_destroy(a->ctx.store);
}

static size_t routes(void *ud, bool all, cqrs_http_route_t *out, size_t max)
{
    (void)all;
    app_t *a = ud;
    return command_routes(&a->ctx, out, max);
}

static void ready(cqrs_http_request_t *req, void *ud)
{
    app_t *a = ud;
    cqrs_error_t err;
    /* Kafka is not a readiness dependency: commands are accepted while it is down and the
     * outbox holds their events until it is back. */
    if (cqrs_store_ping(a->ctx.store, &err) != CQRS_ERR_OK) {
        cqrs_http_reply_problem(req, 503, "not-ready", "Service Unavailable", err.message, NULL,
                                NULL);
        return;
    }
    cqrs_http_reply_json(
        req, 200, json_pack("{s:s, s:{s:s}}", "status", "ready", "checks", "postgres", "up"));
}

static void metrics(void *ud, cqrs_text_t *t)
{
    app_t *a = ud;
    cqrs_relay_stats_t st = {.backlog = -1};
    if (a->relay)
        cqrs_relay_stats(a->relay, &st);
    /* Only what this instance observed: PostgreSQL by its relay (which polls it, leading or
     * not) or, without a relay, by its commands and readiness checks; Kafka only while its
     * relay leads (a standby or a relay-less instance never talks to Kafka). */
    int pg = a->relay ? (st.pg_up ? 1 : 0) : cqrs_store_reachable(a->ctx.store);
    if (pg >= 0 || st.kafka_known)
        cqrs_text_printf(t, "# HELP cqrs_dependency_up 1 when the dependency answered at this "
                            "instance's last attempt, 0 when it did not; absent when this instance "
                            "has not tried it (kafka: only the leading relay talks to it).\n"
                            "# TYPE cqrs_dependency_up gauge\n");
    if (pg >= 0)
        cqrs_text_printf(t, "cqrs_dependency_up{dependency=\"postgres\"} %d\n", pg);
    if (st.kafka_known)
        cqrs_text_printf(t, "cqrs_dependency_up{dependency=\"kafka\"} %d\n", st.kafka_up ? 1 : 0);
    cqrs_metric_gauge(t, "cqrs_relay_leader", "1 while this instance's relay holds the lease.",
                      st.leader ? 1 : 0);
    cqrs_metric_counter(t, "cqrs_relay_leadership_changes_total",
                        "Times this instance's relay became the leader.", st.leadership_changes);
    cqrs_metric_counter(t, "cqrs_relay_events_published_total",
                        "Events committed to Kafka by this instance's relay.", st.published);
    cqrs_metric_counter(t, "cqrs_relay_delivery_failures_total",
                        "Events Kafka did not acknowledge (their batch is retried).", st.failed);
    cqrs_metric_counter(t, "cqrs_relay_transactions_aborted_total",
                        "Kafka transactions the relay aborted.", st.aborted);
    cqrs_metric_counter(t, "cqrs_relay_restarts_total",
                        "Relay threads replaced after CQRS_RELAY_STALL_MS without progress.",
                        st.restarts);
    cqrs_metric_counter(t, "cqrs_relay_pg_timeouts_total",
                        "Relay statements ended by lock_timeout, statement_timeout or a cancel "
                        "(retried).",
                        st.pg_timeouts);
    cqrs_metric_counter(t, "cqrs_relay_events_recovered_total",
                        "Outbox rows found already in Kafka when taking over.", st.recovered);
    if (st.backlog >= 0) {
        cqrs_metric_gauge(t, "cqrs_relay_backlog_events",
                          "Outbox rows not yet acknowledged by Kafka, counted every 2 s by the "
                          "leading relay, Kafka reachable or not (only the leader has it).",
                          (double)st.backlog);
        cqrs_metric_gauge(t, "cqrs_relay_oldest_unpublished_age_seconds",
                          "Age of the oldest outbox row, as of the leader's last count (only the "
                          "leader has it).",
                          st.oldest_age_s);
    }
    if (a->relay)
        cqrs_relay_metrics(a->relay, t);
}

int main(int argc, char **argv)
{
    static const cqrs_daemon_def_t commandd = {
        .program = "cqrs-commandd",
        .summary = "the command API and outbox relay of cqrs.",
        .default_port = "8081",
        .shared = &S.d,
        .settings = own_settings,
        .n_settings = sizeof own_settings / sizeof own_settings[0],
        .app = &A,
        .check = check_settings,
        .start = start,
        .routes = routes,
        .ready = ready,
        .metrics = metrics,
        .stop = stop,
        /* The Location of a created product or order names a document of the query API. No
         * setting holds the query API's public URL (deployments route it), so the hint names
         * the daemon. */
        .reads_elsewhere = "the command API serves no reads: read this resource from the query "
                           "API (cqrs-queryd), e.g. GET the path a command returned in Location "
                           "there",
    };
    return cqrs_daemon_main(&commandd, argc, argv);
}
