/* counterd — a whole CQRS service on libcqrs, in one file: one aggregate (a counter), one
 * command (Increment), one projection (the counter's document).
 *
 * What you write: the decision (pure: the locked row and the command in, the event out), the
 * transaction that loads, locks, decides and writes, and the projection (pure: event + document →
 * document). What the platform does for you: HTTP with If-Match, Idempotency-Key and problem
 * answers (cqrs_command_*), contention retries, the event and its outbox row in the same
 * PostgreSQL transaction, the fenced exactly-once relay to Kafka (cqrs_relay_*), and the
 * exactly-once, ordered projection into Redis with dead letters (cqrs_projector_*).
 *
 * Tables it needs (besides libcqrs's own migrations, schemas/sql/ of the cqrs repository):
 *   CREATE TABLE counters (id uuid PRIMARY KEY, value bigint NOT NULL, version bigint NOT NULL);
 *
 *   COUNTER_PG_DSN=… COUNTER_KAFKA_BROKERS=… COUNTER_REDIS_URL=redis://… counterd
 *   curl -X POST localhost:8090/v1/counters/<uuid>/increments -H 'Content-Type: application/json' \
 *        -d '{"by":2}'
 */
#include <cqrs/command.h>
#include <cqrs/http.h>
#include <cqrs/log.h>
#include <cqrs/outbox.h>
#include <cqrs/projector.h>
#include <cqrs/store.h>
#include <cqrs/util.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TOPIC "counter.events"

/* ---- the decision (pure) ----------------------------------------------------------------- */

/* The new value, or false when it would overflow (a problem, never a wrapped number). */
static bool decide_increment(int64_t value, int64_t by, int64_t *next)
{
    return by > 0 && cqrs_checked_add_i64(value, by, next);
}

/* ---- the command: load, lock, decide, write ---------------------------------------------- */

typedef struct increment {
    char id[CQRS_UUID_LEN + 1];
    int64_t by;
} increment_t;

static cqrs_store_t *store;
static cqrs_command_config_t command_cfg = {.max_json_depth = 32, .idempotency_ttl_s = 86400};

static cqrs_err_t increment_tx(cqrs_tx_t *tx, cqrs_command_t *cmd, void *ud, cqrs_error_t *err)
{
    increment_t *in = ud;
    cqrs_rows_t *rows = NULL;
    const char *p[] = {in->id};
    /* load and lock (a counter that does not exist yet starts at 0, version 0) */
    cqrs_err_t rc = cqrs_tx_exec(tx,
                                 "INSERT INTO counters VALUES ($1, 0, 0) ON CONFLICT (id)"
                                 " DO UPDATE SET id = excluded.id RETURNING value, version",
                                 1, p, &rows, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    int64_t value = 0, version = 0, next = 0;
    cqrs_parse_int64(cqrs_rows_get(rows, 0, 0), &value);
    cqrs_parse_int64(cqrs_rows_get(rows, 0, 1), &version);
    cqrs_rows_free(rows);
    if (!cqrs_command_check_version(cmd, version))
        return CQRS_ERR_OK; /* 412 answered */
    if (!decide_increment(value, in->by, &next)) {
        cqrs_command_problem(cmd, 409, "counter-overflow", "Conflict", "the counter is full", NULL);
        return CQRS_ERR_OK;
    }
    char v[24], ver[24];
    snprintf(v, sizeof v, "%lld", (long long)next);
    snprintf(ver, sizeof ver, "%lld", (long long)version + 1);
    const char *p2[] = {in->id, v, ver};
    rc = cqrs_tx_exec(tx, "UPDATE counters SET value = $2, version = $3 WHERE id = $1", 3, p2, NULL,
                      err);
    if (rc != CQRS_ERR_OK)
        return rc;
    cqrs_event_t ev;
    cqrs_event_init(&ev, "counter.incremented.v1", "counter", in->id, version + 1,
                    json_pack("{s:s, s:I, s:I}", "counter_id", in->id, "by", (json_int_t)in->by,
                              "value", (json_int_t)next),
                    cqrs_http_traceparent(cmd->req));
    memcpy(ev.time, cmd->time, sizeof ev.time);
    rc = cqrs_outbox_append(tx, &ev, TOPIC, err);
    cqrs_event_close(&ev);
    if (rc == CQRS_ERR_OK)
        cqrs_command_reply(cmd, 200,
                           json_pack("{s:s, s:I}", "id", in->id, "value", (json_int_t)next),
                           version + 1, NULL);
    return rc;
}

static void increment_handler(cqrs_http_request_t *req, void *ud)
{
    (void)ud;
    increment_t in = {.by = 0};
    const char *id = cqrs_http_param(req, "id");
    if (!cqrs_uuid_valid(id)) {
        cqrs_http_reply_problem(req, 400, "malformed-request", "Bad Request",
                                "the id must be a UUID", NULL, NULL);
        return;
    }
    snprintf(in.id, sizeof in.id, "%s", id);
    cqrs_command_t cmd;
    if (cqrs_command_begin(&cmd, req, CQRS_CMD_BODY | CQRS_CMD_IF_MATCH, &command_cfg)) {
        in.by = json_integer_value(json_object_get(cmd.body, "by"));
        if (in.by < 1)
            cqrs_http_reply_problem(req, 422, "validation-failed", "Unprocessable Content",
                                    "by must be a positive integer", NULL, NULL);
        else
            cqrs_command_execute(&cmd, store, &command_cfg, increment_tx, &in);
    }
    cqrs_command_end(&cmd);
}

/* ---- the projection (pure) --------------------------------------------------------------- */

static bool knows(const cqrs_event_t *ev)
{
    return strcmp(ev->aggregate_type, "counter") == 0;
}

static cqrs_err_t apply(const json_t *doc, const cqrs_event_t *ev, json_t **next, cqrs_error_t *err)
{
    (void)doc;
    const json_t *value = json_object_get(ev->data, "value");
    if (strcmp(ev->type, "counter.incremented.v1") != 0 || !json_is_integer(value))
        return cqrs_error_set(err, CQRS_ERR_INVALID, "not a counter event"); /* dead letter */
    *next = json_pack("{s:s, s:O, s:I, s:s}", "id", ev->aggregate_id, "value", value, "version",
                      (json_int_t)ev->version, "updated_at", ev->time);
    return CQRS_ERR_OK;
}

static const cqrs_projection_t projection = {.knows = knows, .apply = apply};

/* ---- main: the platform's parts, started in order, stopped in reverse -------------------- */

static const char *env(const char *name, const char *def)
{
    const char *v = getenv(name);
    return v && *v ? v : def;
}

int main(void)
{
    int rc = 1;
    cqrs_error_t err = {0};
    static const char *const topics[] = {TOPIC};
    cqrs_relay_t *relay = NULL;
    cqrs_projector_t *projector = NULL;
    cqrs_http_server_t *http = NULL;
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);

    const char *dsn = env("COUNTER_PG_DSN", "dbname=counter"),
               *brokers = env("COUNTER_KAFKA_BROKERS", "127.0.0.1:9092");
    store = cqrs_store_new(&(cqrs_store_config_t){.dsn = dsn,
                                                  .pool_size = 4,
                                                  .acquire_timeout_ms = 2000,
                                                  .statement_timeout_ms = 5000,
                                                  .lock_timeout_ms = 2000,
                                                  .connect_timeout_s = 5,
                                                  .max_tx_attempts = 5,
                                                  .application_name = "counterd"});
    relay = cqrs_relay_new(&(cqrs_relay_config_t){.dsn = dsn,
                                                  .brokers = brokers,
                                                  .source = "/counterd",
                                                  .client_id = "counterd-relay",
                                                  .transactional_id = "counterd-relay",
                                                  .batch_size = 500,
                                                  .poll_interval_ms = 500,
                                                  .message_timeout_ms = 10000,
                                                  .lease_ms = 10000,
                                                  .topics = topics,
                                                  .n_topics = 1,
                                                  .topic_partitions = 3,
                                                  .topic_replication = 1},
                           &err);
    cqrs_redis_config_t redis = {.url = (char *)env("COUNTER_REDIS_URL", "redis://127.0.0.1:6379")};
    projector = relay ? cqrs_projector_new(&(cqrs_projector_config_t){.brokers = brokers,
                                                                      .group_id = "counterd",
                                                                      .client_id = "counterd",
                                                                      .topics = topics,
                                                                      .n_topics = 1,
                                                                      .redis = &redis,
                                                                      .redis_timeout_ms = 2000,
                                                                      .projection = &projection,
                                                                      .consumer_protocol = true},
                                           &err)
                      : NULL;
    cqrs_http_route_t routes[] = {
        {"POST", "/v1/counters/{id}/increments", increment_handler, NULL, "increment", 0}};
    http = cqrs_http_server_new(&(cqrs_http_config_t){.host = "127.0.0.1",
                                                      .port = 8090,
                                                      .threads = 4,
                                                      .connection_limit = 256,
                                                      .connection_timeout_s = 30,
                                                      .max_body_bytes = 1 << 20,
                                                      .drain_timeout_ms = 5000},
                                routes, 1, &err);
    if (!store || !relay || !projector || !http || cqrs_relay_start(relay, &err) != CQRS_ERR_OK ||
        cqrs_projector_start(projector, &err) != CQRS_ERR_OK ||
        cqrs_http_server_start(http, &err) != CQRS_ERR_OK) {
        fprintf(stderr, "counterd: %s\n", err.message);
        goto out;
    }
    int sig = 0;
    sigwait(&stop, &sig); /* SIGTERM: drain what is in flight, then stop */
    rc = 0;
out:
    if (http)
        cqrs_http_server_stop(http);
    cqrs_http_server_destroy(http);
    if (projector)
        cqrs_projector_stop(projector);
    cqrs_projector_destroy(projector);
    if (relay)
        cqrs_relay_stop(relay);
    cqrs_relay_destroy(relay);
    cqrs_store_destroy(store);
    return rc;
}
