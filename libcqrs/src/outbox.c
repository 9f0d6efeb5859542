/* outbox.c — event log + outbox writes, and the relay thread.
 *
 * DESIGN
 *  - Election: the relay holds pg_try_advisory_lock(lock_key) on its own session; the lock
 *    dies with the session, so a crashed leader is replaced as soon as PostgreSQL notices
 *    (TCP keepalives / tcp_user_timeout bound that to seconds).
 *  - Completeness: each round reads every row still in the outbox, in sequence order. Rows are
 *    deleted only after their delivery report succeeded, so a transaction that committed late
 *    (a lower sequence appearing after higher ones were published) is published in a later
 *    round, never skipped.
 *  - Per-aggregate order: an aggregate's events get increasing sequences (its row lock orders
 *    its transactions) and the idempotent producer keeps partition order, key = aggregate id.
 *  - Wake-up: LISTEN cqrs_outbox, NOTIFYed by the writing transaction at commit, plus a fallback
 *    poll every poll_interval_ms.
 *  - Runs on its own thread with its own PostgreSQL connection and producer.
 */
#include "cqrs/outbox.h"

#include <librdkafka/rdkafka.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cqrs/bus.h"
#include "cqrs/log.h"
#include "cqrs/util.h"
#include "store_int.h"

#define NOTIFY_CHANNEL "cqrs_outbox"

cqrs_err_t cqrs_outbox_append(cqrs_tx_t *tx, cqrs_event_t *ev, const char *topic, cqrs_error_t *err)
{
    return cqrs_outbox_append_many(tx, ev, 1, &topic, err);
}

cqrs_err_t cqrs_outbox_append_many(cqrs_tx_t *tx, cqrs_event_t *evs, size_t n,
                                   const char *const *topics, cqrs_error_t *err)
{
    json_t *rows = json_array();
    for (size_t i = 0; i < n; i++) {
        cqrs_event_t *ev = &evs[i];
        json_array_append_new(rows, json_pack("{s:s, s:s, s:s, s:I, s:s, s:s, s:s?, s:O, s:s, s:I}",
                                              "event_id", ev->id, "aggregate_type",
                                              ev->aggregate_type, "aggregate_id", ev->aggregate_id,
                                              "version", (json_int_t)ev->version, "event_type",
                                              ev->type, "occurred_at", ev->time, "traceparent",
                                              ev->traceparent[0] ? ev->traceparent : NULL, "data",
                                              ev->data, "topic", topics[i], "ord", (json_int_t)i));
    }
    char *param = json_dumps(rows, JSON_COMPACT);
    json_decref(rows);
    if (!param)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "cannot serialise events");
    const char *p[] = {param};
    cqrs_rows_t *res = NULL;
    cqrs_err_t rc = cqrs_tx_exec(
        tx,
        "WITH x AS ("
        "  SELECT * FROM jsonb_to_recordset($1::jsonb) AS x(event_id uuid, aggregate_type text,"
        "    aggregate_id uuid, version bigint, event_type text, occurred_at timestamptz,"
        "    traceparent text, data jsonb, topic text, ord int))"
        ", e AS ("
        "  INSERT INTO events(event_id, aggregate_type, aggregate_id, version, event_type,"
        "                     occurred_at, traceparent, data)"
        "  SELECT event_id, aggregate_type, aggregate_id, version, event_type, occurred_at,"
        "         traceparent, data FROM x ORDER BY ord"
        "  RETURNING event_id, sequence)"
        ", o AS (INSERT INTO outbox(sequence, topic)"
        "        SELECT e.sequence, x.topic FROM e JOIN x USING (event_id))"
        "SELECT x.ord, e.sequence, pg_notify('" NOTIFY_CHANNEL "', '')"
        "  FROM e JOIN x USING (event_id)",
        1, p, &res, err);
    free(param);
    if (rc == CQRS_ERR_OK) {
        if ((size_t)cqrs_rows_count(res) != n)
            rc = cqrs_error_set(err, CQRS_ERR_INTERNAL, "event insert returned %d rows for %zu",
                                cqrs_rows_count(res), n);
        for (int r = 0; rc == CQRS_ERR_OK && r < cqrs_rows_count(res); r++) {
            int64_t ord, seq;
            if (!cqrs_parse_int64(cqrs_rows_get(res, r, 0), &ord) || ord < 0 || (size_t)ord >= n ||
                !cqrs_parse_int64(cqrs_rows_get(res, r, 1), &seq))
                rc = cqrs_error_set(err, CQRS_ERR_INTERNAL, "bad event insert result");
            else
                evs[ord].sequence = seq;
        }
    }
    cqrs_rows_free(res);
    return rc;
}

/* ---- relay ------------------------------------------------------------------------------- */

typedef struct slot {
    int64_t sequence;
    rd_kafka_resp_err_t result;
    bool done;
} slot_t;

struct cqrs_relay {
    cqrs_relay_config_t cfg;
    char *dsn, *brokers, *source, *client_id;
    pthread_t thread;
    bool running;
    atomic_bool stop;
    atomic_bool leader, kafka_up, pg_up;
    atomic_uint_fast64_t published, failed;
    char **topics;
    bool topics_ready;
    PGconn *conn;
    rd_kafka_t *rk;
};

cqrs_relay_t *cqrs_relay_new(const cqrs_relay_config_t *cfg, cqrs_error_t *err)
{
    cqrs_relay_t *r = calloc(1, sizeof *r);
    if (!r) {
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    r->cfg = *cfg;
    r->dsn = strdup(cfg->dsn);
    r->brokers = strdup(cfg->brokers);
    r->source = strdup(cfg->source ? cfg->source : "/cqrs");
    r->client_id = strdup(cfg->client_id ? cfg->client_id : "cqrs-relay");
    if (!r->dsn || !r->brokers || !r->source || !r->client_id) {
        cqrs_relay_destroy(r);
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    r->topics = calloc(cfg->n_topics + 1, sizeof *r->topics);
    for (size_t i = 0; r->topics && i < cfg->n_topics; i++)
        r->topics[i] = strdup(cfg->topics[i]);
    r->cfg.topics = (const char *const *)r->topics;
    if (r->cfg.batch_size <= 0)
        r->cfg.batch_size = 500;
    if (r->cfg.poll_interval_ms <= 0)
        r->cfg.poll_interval_ms = 1000;
    if (r->cfg.message_timeout_ms <= 0)
        r->cfg.message_timeout_ms = 30000;
    return r;
}

static void dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    (void)opaque;
    slot_t *s = m->_private;
    if (s) {
        s->result = m->err;
        s->done = true;
    }
}

static rd_kafka_t *producer_new(cqrs_relay_t *r, cqrs_error_t *err)
{
    rd_kafka_conf_t *conf = cqrs_bus_conf_new(r->brokers, r->client_id, err);
    if (!conf)
        return NULL;
    char timeout[16];
    snprintf(timeout, sizeof timeout, "%d", r->cfg.message_timeout_ms);
    /* Idempotence: acks=all, no reordering or duplicates from internal retries. murmur2 so
     * that Java clients sharing the topics pick the same partition for a key. */
    if (cqrs_bus_conf_set(conf, "enable.idempotence", "true", err) ||
        cqrs_bus_conf_set(conf, "message.timeout.ms", timeout, err) ||
        cqrs_bus_conf_set(conf, "linger.ms", "5", err) ||
        cqrs_bus_conf_set(conf, "partitioner", "murmur2_random", err)) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    rd_kafka_conf_set_dr_msg_cb(conf, dr_cb);
    char errstr[256];
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    if (!rk) {
        rd_kafka_conf_destroy(conf);
        cqrs_error_set(err, CQRS_ERR_CONFIG, "cannot create producer: %s", errstr);
    }
    return rk;
}

static void drop_pg(cqrs_relay_t *r)
{
    if (r->conn) {
        PQfinish(r->conn);
        r->conn = NULL;
    }
    if (atomic_exchange(&r->leader, false) && !atomic_load(&r->stop))
        CQRS_LOG_WARN("outbox relay lost leadership");
}

/* Sleeps up to ms, waking early on NOTIFY (when listening) or stop. */
static void wait_for_work(cqrs_relay_t *r, int ms)
{
    int64_t until = cqrs_monotonic_ms() + ms;
    while (!atomic_load(&r->stop)) {
        int64_t left = until - cqrs_monotonic_ms();
        if (left <= 0)
            return;
        int slice = left > 100 ? 100 : (int)left;
        if (r->conn && atomic_load(&r->leader)) {
            struct pollfd pfd = {.fd = PQsocket(r->conn), .events = POLLIN};
            if (poll(&pfd, 1, slice) > 0) {
                if (!PQconsumeInput(r->conn)) {
                    drop_pg(r);
                    return;
                }
                bool woke = false;
                PGnotify *n;
                while ((n = PQnotifies(r->conn)) != NULL) {
                    woke = true;
                    PQfreemem(n);
                }
                if (woke)
                    return;
            }
        } else {
            usleep((useconds_t)slice * 1000);
        }
    }
}

static bool try_lead(cqrs_relay_t *r)
{
    cqrs_error_t err;
    if (!r->conn) {
        r->conn = cqrs__pg_connect(r->dsn, "cqrs-relay", 5, &err);
        atomic_store(&r->pg_up, r->conn != NULL);
        if (!r->conn) {
            CQRS_LOG_WARN("outbox relay cannot reach PostgreSQL", "error", err.message);
            return false;
        }
    }
    char sql[96];
    snprintf(sql, sizeof sql, "SELECT pg_try_advisory_lock(%lld)", (long long)r->cfg.lock_key);
    PGresult *res = PQexec(r->conn, sql);
    bool got = PQresultStatus(res) == PGRES_TUPLES_OK && PQgetvalue(res, 0, 0)[0] == 't';
    bool broken = PQresultStatus(res) != PGRES_TUPLES_OK;
    PQclear(res);
    if (broken) {
        drop_pg(r);
        return false;
    }
    if (!got)
        return false;
    res = PQexec(r->conn, "LISTEN " NOTIFY_CHANNEL);
    broken = PQresultStatus(res) != PGRES_COMMAND_OK;
    PQclear(res);
    if (broken) {
        drop_pg(r);
        return false;
    }
    atomic_store(&r->leader, true);
    CQRS_LOG_INFO("outbox relay is the leader");
    return true;
}

static const char *const SELECT_BATCH =
    "SELECT o.sequence, o.topic, e.event_id, e.event_type, e.aggregate_type, e.aggregate_id,"
    "       e.version,"
    "       to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),"
    "       coalesce(e.traceparent, ''), e.data::text"
    "  FROM outbox o JOIN events e ON e.sequence = o.sequence"
    " ORDER BY o.sequence LIMIT $1";

/* Produces one batch; returns the number of rows read, or -1 when PostgreSQL failed. */
static int relay_round(cqrs_relay_t *r)
{
    char limit[16];
    snprintf(limit, sizeof limit, "%d", r->cfg.batch_size);
    const char *p[] = {limit};
    PGresult *res = PQexecParams(r->conn, SELECT_BATCH, 1, NULL, p, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        cqrs_error_t err;
        cqrs__pg_error(r->conn, res, &err);
        CQRS_LOG_WARN("outbox read failed", "error", err.message);
        PQclear(res);
        drop_pg(r);
        return -1;
    }
    int n = PQntuples(res);
    if (n == 0) {
        PQclear(res);
        return 0;
    }
    slot_t *slots = calloc((size_t)n, sizeof *slots);
    int produced = 0;
    for (int i = 0; slots && i < n && !atomic_load(&r->stop); i++) {
        cqrs_event_t ev;
        memset(&ev, 0, sizeof ev);
        cqrs_parse_int64(PQgetvalue(res, i, 0), &ev.sequence);
        const char *topic = PQgetvalue(res, i, 1);
        snprintf(ev.id, sizeof ev.id, "%s", PQgetvalue(res, i, 2));
        snprintf(ev.type, sizeof ev.type, "%s", PQgetvalue(res, i, 3));
        snprintf(ev.aggregate_type, sizeof ev.aggregate_type, "%s", PQgetvalue(res, i, 4));
        snprintf(ev.aggregate_id, sizeof ev.aggregate_id, "%s", PQgetvalue(res, i, 5));
        cqrs_parse_int64(PQgetvalue(res, i, 6), &ev.version);
        snprintf(ev.time, sizeof ev.time, "%s", PQgetvalue(res, i, 7));
        snprintf(ev.traceparent, sizeof ev.traceparent, "%s", PQgetvalue(res, i, 8));
        snprintf(ev.source, sizeof ev.source, "%s", r->source);
        const char *data = PQgetvalue(res, i, 9);
        size_t data_len = (size_t)PQgetlength(res, i, 9);

        cqrs_event_headers_t h;
        cqrs_event_headers(&ev, &h);
        rd_kafka_headers_t *hdrs = rd_kafka_headers_new(h.n);
        for (size_t k = 0; k < h.n; k++)
            rd_kafka_header_add(hdrs, h.name[k], -1, h.value[k], -1);
        slots[i].sequence = ev.sequence;
        rd_kafka_resp_err_t kerr;
        for (;;) {
            kerr = rd_kafka_producev(
                r->rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(ev.aggregate_id, CQRS_UUID_LEN),
                RD_KAFKA_V_VALUE((void *)data, data_len), RD_KAFKA_V_HEADERS(hdrs),
                RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_OPAQUE(&slots[i]),
                RD_KAFKA_V_END);
            if (kerr != RD_KAFKA_RESP_ERR__QUEUE_FULL)
                break;
            rd_kafka_poll(r->rk, 100);
        }
        if (kerr != RD_KAFKA_RESP_ERR_NO_ERROR) {
            /* On failure the headers were not taken over. */
            rd_kafka_headers_destroy(hdrs);
            slots[i].done = true;
            slots[i].result = kerr;
            CQRS_LOG_WARN("produce failed", "event_id", ev.id, "error", rd_kafka_err2str(kerr));
            break;
        }
        produced++;
    }
    PQclear(res);
    if (!slots)
        return -1;

    /* Wait for every delivery report; librdkafka bounds each by message.timeout.ms. */
    int64_t deadline = cqrs_monotonic_ms() + r->cfg.message_timeout_ms + 5000;
    for (;;) {
        int pending = 0;
        for (int i = 0; i < produced; i++)
            pending += !slots[i].done;
        if (pending == 0 || cqrs_monotonic_ms() > deadline)
            break;
        rd_kafka_poll(r->rk, 50);
    }

    /* Delete exactly the acknowledged rows. */
    size_t cap = (size_t)produced * 21 + 3;
    char *arr = malloc(cap);
    size_t used = 0;
    int acked = 0, failed = 0;
    if (arr) {
        arr[used++] = '{';
        for (int i = 0; i < produced; i++) {
            if (!slots[i].done || slots[i].result != RD_KAFKA_RESP_ERR_NO_ERROR) {
                failed++;
                continue;
            }
            used += (size_t)snprintf(arr + used, cap - used, "%s%lld", acked ? "," : "",
                                     (long long)slots[i].sequence);
            acked++;
        }
        arr[used++] = '}';
        arr[used] = '\0';
    }
    int rc = produced;
    if (arr && acked > 0) {
        const char *dp[] = {arr};
        res = PQexecParams(r->conn, "DELETE FROM outbox WHERE sequence = ANY($1::bigint[])", 1,
                           NULL, dp, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_COMMAND_OK) {
            cqrs_error_t err;
            cqrs__pg_error(r->conn, res, &err);
            CQRS_LOG_WARN("outbox delete failed; rows will be published again", "error",
                          err.message);
            drop_pg(r);
            rc = -1;
        }
        PQclear(res);
    }
    atomic_fetch_add(&r->published, (uint64_t)acked);
    atomic_fetch_add(&r->failed, (uint64_t)failed);
    if (failed > 0 || produced < n) {
        for (int i = 0; i < produced; i++) {
            if (slots[i].done && slots[i].result != RD_KAFKA_RESP_ERR_NO_ERROR) {
                CQRS_LOG_WARN("event not delivered; will retry", "error",
                              rd_kafka_err2str(slots[i].result));
                break;
            }
        }
        atomic_store(&r->kafka_up, false);
        if (rc >= 0)
            rc = 0; /* back off before the next round */
    } else {
        atomic_store(&r->kafka_up, true);
    }
    free(arr);
    free(slots);
    return rc;
}

/* Expired Idempotency-Key rows, deleted in small batches by the leader so that no long
 * delete ever competes with commands. */
static void housekeeping(cqrs_relay_t *r)
{
    PGresult *res = PQexec(r->conn, "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY("
                                    "SELECT ctid FROM idempotency_keys WHERE expires_at < now()"
                                    " LIMIT 1000))");
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        cqrs_error_t err;
        cqrs__pg_error(r->conn, res, &err);
        CQRS_LOG_WARN("idempotency key cleanup failed", "error", err.message);
    }
    PQclear(res);
}

static void *relay_main(void *arg)
{
    cqrs_relay_t *r = arg;
    int64_t next_housekeeping = 0;
    while (!atomic_load(&r->stop)) {
        if (!atomic_load(&r->leader) && !try_lead(r)) {
            wait_for_work(r, r->cfg.poll_interval_ms);
            continue;
        }
        if (!r->rk) {
            cqrs_error_t err;
            r->rk = producer_new(r, &err);
            if (!r->rk) {
                CQRS_LOG_ERROR("outbox relay cannot create a producer", "error", err.message);
                wait_for_work(r, r->cfg.poll_interval_ms);
                continue;
            }
        }
        if (!r->topics_ready && r->cfg.n_topics > 0) {
            cqrs_error_t err;
            if (cqrs_bus_create_topics(r->brokers, r->cfg.topics, r->cfg.n_topics,
                                       r->cfg.topic_partitions, r->cfg.topic_replication, 5000,
                                       &err) != CQRS_ERR_OK) {
                atomic_store(&r->kafka_up, false);
                CQRS_LOG_WARN("cannot ensure the topics yet", "error", err.message);
                wait_for_work(r, r->cfg.poll_interval_ms);
                continue;
            }
            r->topics_ready = true;
        }
        char fatal[256];
        if (rd_kafka_fatal_error(r->rk, fatal, sizeof fatal) != RD_KAFKA_RESP_ERR_NO_ERROR) {
            /* Idempotence state is lost: start over with a new producer; the outbox still has
             * every undelivered row. */
            CQRS_LOG_ERROR("producer fatal error; recreating", "error", fatal);
            rd_kafka_destroy(r->rk);
            r->rk = NULL;
            continue;
        }
        if (cqrs_monotonic_ms() >= next_housekeeping) {
            housekeeping(r);
            next_housekeeping = cqrs_monotonic_ms() + 60000;
            if (!r->conn)
                continue;
        }
        int n = relay_round(r);
        if (n < r->cfg.batch_size)
            wait_for_work(r, r->cfg.poll_interval_ms);
    }
    if (r->rk) {
        rd_kafka_flush(r->rk, 5000);
        rd_kafka_destroy(r->rk);
        r->rk = NULL;
    }
    drop_pg(r);
    return NULL;
}

cqrs_err_t cqrs_relay_start(cqrs_relay_t *r, cqrs_error_t *err)
{
    atomic_store(&r->stop, false);
    if (pthread_create(&r->thread, NULL, relay_main, r) != 0)
        return cqrs_error_set(err, CQRS_ERR_INTERNAL, "cannot start the relay thread");
    r->running = true;
    return CQRS_ERR_OK;
}

void cqrs_relay_stop(cqrs_relay_t *r)
{
    if (!r || !r->running)
        return;
    atomic_store(&r->stop, true);
    pthread_join(r->thread, NULL);
    r->running = false;
}

void cqrs_relay_stats(cqrs_relay_t *r, cqrs_relay_stats_t *out)
{
    out->leader = atomic_load(&r->leader);
    out->kafka_up = atomic_load(&r->kafka_up);
    out->pg_up = atomic_load(&r->pg_up);
    out->published = atomic_load(&r->published);
    out->failed = atomic_load(&r->failed);
}

void cqrs_relay_destroy(cqrs_relay_t *r)
{
    if (!r)
        return;
    cqrs_relay_stop(r);
    free(r->dsn);
    free(r->brokers);
    free(r->source);
    free(r->client_id);
    for (size_t i = 0; r->topics && i < r->cfg.n_topics; i++)
        free(r->topics[i]);
    free(r->topics);
    free(r);
}
