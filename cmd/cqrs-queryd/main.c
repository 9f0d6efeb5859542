/* cqrs-queryd — projects Kafka events into Redis and serves the query API from Redis.
 *
 * Roles (CQRS_QUERY_ROLE): serve (HTTP reads only), project (consumer only, still serves the
 * probes and /metrics), both. What is its own; the boot, signals and drain are
 * cqrs_daemon_main's (daemon.h):
 *   settings   role, Redis, Kafka consumer, cache and wait limits (own_settings)
 *   components the Redis pool; serving: cache, waiters, change feed; projecting: the projector
 *              (stopped after the HTTP drain: it finishes the event in hand, commits offsets)
 *   routes     the reads (query_routes) when serving
 *   readiness  Redis answers, no partition refilling or missing its history
 *   metrics    change feed, cache, waits, the read model's dead letters, the projector's
 */
#include <cqrs/changefeed.h>
#include <cqrs/daemon.h>
#include <cqrs/docstore.h>
#include <cqrs/log.h>
#include <cqrs/metrics.h>
#include <cqrs/projector.h>
#include <cqrs/redis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "query.h"
#include "topics.h"

typedef struct settings {
    cqrs_daemon_settings_t d;
    char *role;
    cqrs_redis_config_t redis;
    int64_t redis_timeout_ms;
    int64_t redis_pool_size;
    char *kafka_brokers;
    char *topic_prefix;
    char *consumer_group;
    char *group_protocol;
    int64_t session_timeout_ms;
    int64_t cache_mb;
    int64_t max_waits;
    int64_t max_streams;
    int64_t keepalive_ms;
} settings_t;

static settings_t S;

static const cqrs_config_entry_t own_settings[] = {
    {"CQRS_QUERY_ROLE", CQRS_CONFIG_ENUM, "both", 0, 0,
     "serve = HTTP reads, project = Kafka → Redis, both", &S.role, "serve|project|both"},
    CQRS_REDIS_SETTINGS(S.redis, "Redis URL redis[s]://[[user]:password@]host:port/db"),
    {"CQRS_REDIS_TIMEOUT_MS", CQRS_CONFIG_INT, "2000", 10, 60000,
     "connect and command timeout of Redis calls", &S.redis_timeout_ms, NULL},
    {"CQRS_REDIS_POOL_SIZE", CQRS_CONFIG_INT, "8", 1, 1000, "Redis connections of the HTTP workers",
     &S.redis_pool_size, NULL},
    {"CQRS_KAFKA_BROKERS", CQRS_CONFIG_STRING, "127.0.0.1:9092", 0, 0,
     "Kafka bootstrap servers (role project/both)", &S.kafka_brokers, NULL},
    TOPIC_PREFIX_SETTING(&S.topic_prefix),
    {"CQRS_CONSUMER_GROUP", CQRS_CONFIG_STRING, "cqrs-queryd", 0, 0,
     "Kafka consumer group of the projectors", &S.consumer_group, NULL},
    {"CQRS_KAFKA_GROUP_PROTOCOL", CQRS_CONFIG_ENUM, "classic", 0, 0,
     "consumer group protocol of the projectors: classic or consumer "
     "(KIP-848, brokers >= 4.0; the broker's group.consumer.session.timeout.ms then decides "
     "how soon a dead projector's partitions move)",
     &S.group_protocol, "classic|consumer"},
    {"CQRS_KAFKA_SESSION_TIMEOUT_MS", CQRS_CONFIG_INT, "10000", 6000, 3600000,
     "classic protocol: a projector that stops heartbeating this long loses its partitions "
     "to the others (the broker allows group.min.session.timeout.ms and up, 6000 by default)",
     &S.session_timeout_ms, NULL},
    {"CQRS_QUERY_CACHE_MB", CQRS_CONFIG_INT, "32", 0, 65536,
     "in-process document cache (role serve/both), MiB; 0 = off", &S.cache_mb, NULL},
    {"CQRS_QUERY_MAX_WAITS", CQRS_CONFIG_INT, "4096", 1, 1000000,
     "reads waiting for min_version at once; more get 503", &S.max_waits, NULL},
    {"CQRS_QUERY_MAX_STREAMS", CQRS_CONFIG_INT, "512", 0, 1000000,
     "open /stream connections at once (each holds an HTTP connection); more get 503",
     &S.max_streams, NULL},
    {"CQRS_SSE_KEEPALIVE_MS", CQRS_CONFIG_INT, "15000", 100, 3600000,
     "keep-alive comment interval of streams", &S.keepalive_ms, NULL},
};

typedef struct app {
    query_ctx_t ctx;
    cqrs_changefeed_t *feed;
    cqrs_projector_t *projector;
    topics_t topics;
} app_t;

static app_t A;

/* The change feed keeps the cache exact and wakes waiting reads and streams. */
static void feed_change(void *ud, const char *key, int64_t version)
{
    app_t *app = ud;
    if (app->ctx.cache)
        cqrs_doccache_announce(app->ctx.cache, key, version);
    cqrs_waiters_announce(app->ctx.waiters, key, version);
}

static void feed_reset(void *ud)
{
    app_t *app = ud;
    /* "*": a shard found empty, or a rebuild switched generations: the next read learns the
     * generation to follow again. */
    cqrs_docstore_generations_forget();
    if (app->ctx.cache)
        cqrs_doccache_reset(app->ctx.cache, true);
    cqrs_waiters_feed_up(app->ctx.waiters, true);
    cqrs_waiters_reset(app->ctx.waiters);
}

static void feed_down(void *ud)
{
    app_t *app = ud;
    if (app->ctx.cache)
        cqrs_doccache_reset(app->ctx.cache, false);
    cqrs_waiters_feed_up(app->ctx.waiters, false);
}

static void live_metrics(app_t *app, cqrs_text_t *t)
{
    cqrs_changefeed_stats_t fs;
    cqrs_changefeed_stats(app->feed, &fs);
    cqrs_metric_gauge(t, "cqrs_changefeed_connected",
                      "1 while subscribed to the read model's change announcements.",
                      fs.connected ? 1 : 0);
    cqrs_metric_counter(t, "cqrs_changefeed_messages_total", "Change announcements received.",
                        fs.messages);
    cqrs_metric_counter(t, "cqrs_changefeed_reconnects_total",
                        "Subscriptions re-established (each flushes the cache).", fs.reconnects);
    cqrs_waiters_stats_t ws;
    cqrs_waiters_stats(app->ctx.waiters, &ws);
    cqrs_metric_gauge(t, "cqrs_query_waiting_reads", "Reads waiting for min_version.", ws.waits);
    cqrs_metric_gauge(t, "cqrs_query_open_streams", "Open /stream connections.", ws.watches);
    cqrs_metric_counter(t, "cqrs_query_waits_timed_out_total",
                        "Reads whose min_version was not reached by wait_ms.",
                        ws.woken_by_deadline);
    cqrs_metric_counter(t, "cqrs_query_waits_refused_total",
                        "Waits and streams refused because the limits were reached.", ws.refused);
    if (!app->ctx.cache)
        return;
    cqrs_doccache_stats_t cs;
    cqrs_doccache_stats(app->ctx.cache, &cs);
    cqrs_metric_counter(t, "cqrs_cache_hits_total", "Document reads answered from the cache.",
                        cs.hits);
    cqrs_metric_counter(t, "cqrs_cache_misses_total", "Document reads that went to Redis.",
                        cs.misses);
    cqrs_metric_counter(t, "cqrs_cache_fills_refused_total",
                        "Fills refused because a change was announced during the read.",
                        cs.refused);
    cqrs_metric_counter(t, "cqrs_cache_evictions_total", "Entries evicted to stay in budget.",
                        cs.evictions);
    cqrs_metric_counter(t, "cqrs_cache_resets_total",
                        "Times the whole cache was dropped (feed reconnected or lost).", cs.resets);
    cqrs_metric_gauge(t, "cqrs_cache_entries", "Documents in the cache.", cs.entries);
    cqrs_metric_gauge(t, "cqrs_cache_bytes", "Bytes the cache accounts for.", cs.bytes);
}

static bool serves(void)
{
    return strcmp(S.role, "project") != 0;
}

static void ready(cqrs_http_request_t *req, void *ud)
{
    app_t *app = ud;
    cqrs_docstore_t *ds = cqrs_docstore_pool_acquire(app->ctx.pool, app->ctx.acquire_timeout_ms);
    cqrs_error_t err;
    long long refilling = 0; /* partitions re-reading what the store lost, any instance's */
    cqrs_err_t rc = ds ? cqrs_docstore_refill_count(ds, &refilling, &err)
                       : cqrs_error_set(&err, CQRS_ERR_UNAVAILABLE, "no free Redis connection");
    /* Serving: every read finds its shards through the layout a projector records (its first
     * step, once it reaches Kafka); until then each one would answer 503. */
    if (rc == CQRS_ERR_OK && serves())
        rc = query_layouts_known(ds, &err);
    if (ds)
        cqrs_docstore_pool_release(app->ctx.pool, ds);
    if (rc != CQRS_ERR_OK) {
        cqrs_http_reply_problem(req, 503, "not-ready", "Service Unavailable", err.message, NULL,
                                NULL);
        return;
    }
    cqrs_projector_stats_t st = {0};
    if (app->projector)
        cqrs_projector_stats(app->projector, &st);
    if (st.history_missing > 0) {
        cqrs_http_reply_problem(
            req, 503, "not-ready", "Service Unavailable",
            "Kafka no longer holds events the read model needs; run cqrsctl"
            " rebuild",
            NULL, json_pack("{s:i}", "partitions_missing_history", (int)st.history_missing));
        return;
    }
    if (refilling > 0 || st.refilling > 0) {
        /* The store lost writes (or all of them) and a projector re-applies them from Kafka:
         * documents are behind until it is done. Every instance says so, serving ones too. */
        cqrs_http_reply_problem(
            req, 503, "not-ready", "Service Unavailable",
            "the read model store lost writes; a projector re-applies them from Kafka", NULL,
            json_pack("{s:I}", "partitions_refilling",
                      (json_int_t)(refilling > st.refilling ? refilling : st.refilling)));
        return;
    }
    cqrs_http_reply_json(req, 200,
                         json_pack("{s:s, s:{s:s}}", "status", "ready", "checks", "redis", "up"));
}

/* The read model's own state, the same from every instance (read from Redis at each scrape;
 * left out while Redis does not answer): aggregates held by dead letters, undecodable
 * messages kept, partitions refilling after a store loss. */
static void store_metrics(app_t *app, cqrs_text_t *t)
{
    cqrs_docstore_t *ds = cqrs_docstore_pool_acquire(app->ctx.pool, 200);
    if (!ds)
        return;
    long long held = 0, undecodable = 0, refilling = 0;
    cqrs_error_t err;
    bool ok = cqrs_docstore_refill_count(ds, &refilling, &err) == CQRS_ERR_OK;
    /* Every shard of every topic: one pipelined round trip per topic. */
    for (int k = 0; ok && k < TOPIC_TYPES; k++) {
        int32_t n = 0;
        cqrs_err_t rc = query_shard_count(ds, topic_type(k), &n, &err);
        if (rc == CQRS_ERR_NOT_FOUND)
            continue; /* nothing projected yet */
        char(*shards)[CQRS_SHARD_MAX] = calloc((size_t)n, sizeof *shards);
        const char **sp = calloc((size_t)n, sizeof *sp);
        long long *h = calloc((size_t)n, sizeof *h), *u = calloc((size_t)n, sizeof *u);
        ok = rc == CQRS_ERR_OK && shards && sp && h && u;
        for (int32_t i = 0; ok && i < n; i++) {
            query_shard(ds, topic_type(k), i, shards[i], sizeof shards[i]);
            sp[i] = shards[i];
        }
        ok = ok && cqrs_docstore_dlq_counts(ds, sp, (size_t)n, h, u, &err) == CQRS_ERR_OK;
        for (int32_t i = 0; ok && i < n; i++) {
            held += h[i];
            undecodable += u[i];
        }
        free(shards);
        free(sp);
        free(h);
        free(u);
    }
    cqrs_docstore_pool_release(app->ctx.pool, ds);
    if (!ok)
        return;
    cqrs_metric_gauge(t, "cqrs_read_model_dead_letter_aggregates",
                      "Aggregates held by dead letters in the read model (cqrsctl dlq list).",
                      (double)held);
    cqrs_metric_gauge(t, "cqrs_read_model_undecodable_messages",
                      "Messages kept in the shards' " CQRS_SHARD_UNDECODABLE " (not CloudEvents).",
                      (double)undecodable);
    cqrs_metric_gauge(t, "cqrs_read_model_partitions_refilling",
                      "Partitions a projector re-applies after a store loss (<prefix>:refill),"
                      " any instance's.",
                      (double)refilling);
}

static void metrics(void *ud, cqrs_text_t *t)
{
    app_t *app = ud;
    cqrs_projector_stats_t st = {0};
    if (app->projector)
        cqrs_projector_stats(app->projector, &st);
    if (app->feed)
        live_metrics(app, t);
    store_metrics(app, t);
    if (app->projector) {
        cqrs_text_printf(t,
                         "# HELP cqrs_dependency_up 1 when the dependency answered at the "
                         "last attempt.\n# TYPE cqrs_dependency_up gauge\n"
                         "cqrs_dependency_up{dependency=\"redis\"} %d\n"
                         "cqrs_dependency_up{dependency=\"kafka\"} %d\n",
                         st.redis_up ? 1 : 0, st.kafka_up ? 1 : 0);
        cqrs_metric_counter(t, "cqrs_projector_events_applied_total",
                            "Events applied to the read model.", st.applied);
        cqrs_metric_counter(t, "cqrs_projector_duplicates_skipped_total",
                            "Events already applied (redelivery).", st.duplicates);
        cqrs_metric_counter(t, "cqrs_projector_dead_letters_total",
                            "Events stored as dead letters.", st.dead_letters);
        cqrs_metric_counter(t, "cqrs_projector_gaps_total",
                            "Events that arrived after a missing version.", st.gaps);
        cqrs_metric_counter(t, "cqrs_projector_events_parked_total",
                            "Events held behind a dead letter.", st.parked);
        cqrs_metric_counter(t, "cqrs_projector_undecodable_total",
                            "Messages that are not CloudEvents.", st.undecodable);
        cqrs_metric_counter(t, "cqrs_projector_store_resets_total",
                            "Times the store was found emptied or replaced (its incarnation).",
                            st.resets);
        cqrs_metric_counter(t, "cqrs_projector_store_regressions_total",
                            "Times a partition's applied offset in the store was found behind "
                            "the one this projector recorded (the store lost writes).",
                            st.regressions);
        cqrs_metric_counter(t, "cqrs_projector_consumer_replaced_total",
                            "Times the Kafka consumer was replaced after it could not reach its "
                            "coordinator, a broker or a partition leader for 30 s.",
                            st.replaced);
        cqrs_metric_gauge(t, "cqrs_projector_partitions_refilling",
                          "Partitions re-applying what the store lost.", st.refilling);
        cqrs_metric_gauge(t, "cqrs_projector_partitions_assigned",
                          "Partitions this instance consumes.", st.assigned);
        cqrs_metric_gauge(t, "cqrs_projector_partitions_missing_history",
                          "Partitions paused because Kafka no longer holds their beginning.",
                          st.history_missing);
        cqrs_projector_metrics(app->projector, t);
    }
}

/* Redis settings (URL, TLS files) a connection would refuse. */
static int check_settings(void *ud, const char *argv0)
{
    (void)ud;
    cqrs_error_t err;
    if (cqrs_redis_config_check(&S.redis, &err) != CQRS_ERR_OK) {
        fprintf(stderr, "%s: %s\n", argv0, err.message);
        return 2;
    }
    return 0;
}

/* The Redis pool; serving: the cache, the waiters and the change feed; projecting: the
 * projector. */
static int start(void *ud)
{
    app_t *a = ud;
    cqrs_error_t err;
    topics_init(&a->topics, S.topic_prefix);
    query_keys_init(S.topic_prefix);

    a->ctx.acquire_timeout_ms = (int)S.redis_timeout_ms;
    a->ctx.pool = cqrs_docstore_pool_new(&S.redis, (int)S.redis_timeout_ms,
                                         (unsigned)S.redis_pool_size, &err);
    if (!a->ctx.pool) {
        CQRS_LOG_ERROR("bad Redis settings", "error", err.message);
        return 1;
    }
    if (serves()) {
        a->ctx.wait_default_ms = 2000;
        if (S.cache_mb > 0)
            a->ctx.cache = cqrs_doccache_new((size_t)S.cache_mb << 20);
        cqrs_waiters_config_t wc = {(unsigned)S.max_waits, (unsigned)S.max_streams,
                                    (int)S.keepalive_ms, 100};
        a->ctx.waiters = cqrs_waiters_new(&wc);
        if (!a->ctx.waiters || (S.cache_mb > 0 && !a->ctx.cache)) {
            CQRS_LOG_ERROR("out of memory");
            return 1;
        }
        cqrs_changefeed_handlers_t fh = {feed_change, feed_reset, feed_down, a};
        a->feed = cqrs_changefeed_start(&S.redis, (int)S.redis_timeout_ms, &fh, &err);
        if (!a->feed) {
            CQRS_LOG_ERROR("cannot start the change feed", "error", err.message);
            return 1;
        }
    }
    if (strcmp(S.role, "serve") == 0)
        return 0;
    cqrs_projector_config_t pc = {
        .brokers = S.kafka_brokers,
        .group_id = S.consumer_group,
        .client_id = "cqrs-queryd-projector",
        .topics = a->topics.names,
        .n_topics = TOPIC_TYPES,
        .redis = &S.redis,
        .redis_timeout_ms = (int)S.redis_timeout_ms,
        .projection = &query_projection,
        .consumer_protocol = strcmp(S.group_protocol, "consumer") == 0,
        .session_timeout_ms = (int)S.session_timeout_ms,
    };
    a->projector = cqrs_projector_new(&pc, &err);
    if (!a->projector || cqrs_projector_start(a->projector, &err) != CQRS_ERR_OK) {
        CQRS_LOG_ERROR("cannot start the projector", "error", err.message);
        return err.code == CQRS_ERR_CONFIG ? 2 : 1;
    }
    return 0;
}

/* Waiting reads answer 503 and streams end before the listener drains. */
static void drain(void *ud)
{
    app_t *a = ud;
    if (a->ctx.waiters)
        cqrs_waiters_close(a->ctx.waiters);
}

static void stop(void *ud)
{
    app_t *a = ud;
    cqrs_changefeed_stop(a->feed);
    cqrs_waiters_destroy(a->ctx.waiters);
    cqrs_doccache_destroy(a->ctx.cache);
    cqrs_projector_destroy(a->projector);
    cqrs_docstore_pool_destroy(a->ctx.pool);
}

/* The reads only when serving (--routes: the serving role's table); the probes and /metrics
 * always. */
static size_t routes(void *ud, bool all, cqrs_http_route_t *out, size_t max)
{
    app_t *a = ud;
    return all || serves() ? query_routes(&a->ctx, out, max) : 0;
}

int main(int argc, char **argv)
{
    static const cqrs_daemon_def_t queryd = {
        .program = "cqrs-queryd",
        .summary = "the projector and query API of cqrs.",
        .default_port = "8082",
        .shared = &S.d,
        .settings = own_settings,
        .n_settings = sizeof own_settings / sizeof own_settings[0],
        .app = &A,
        .check = check_settings,
        .start = start,
        .routes = routes,
        .ready = ready,
        .metrics = metrics,
        .drain = drain,
        .stop = stop,
        .listening_key = "role",
        .listening_value = &S.role,
    };
    return cqrs_daemon_main(&queryd, argc, argv);
}
