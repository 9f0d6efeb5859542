/* explain.c — `cqrsctl explain <aggregate-id>`: one aggregate across the whole system, gathered
 * (gather: PostgreSQL, Redis, Kafka into one JSON report) then printed (--json or print_human).
 *
 * For each of its events (the newest --limit of them): the event log row in PostgreSQL, whether
 * the outbox still holds it, where it landed in Kafka, and whether the Redis document shows it,
 * holds it as a dead letter or parks it behind one; then the document's version, the applied
 * offset of the aggregate's partition and how long the document has been behind.
 *
 * Kafka has no index by key: the aggregate's partition (the relay's murmur2_random of the key)
 * is read from the first message stamped a minute before the oldest published event shown, up
 * to its end, within a time budget (--kafka-budget-ms); what the budget does not reach is
 * "unknown", never a hang. Read-only everywhere.
 */
#include <cqrs/bus.h>
#include <cqrs/docstore.h>
#include <cqrs/projector.h>
#include <cqrs/store.h>
#include <cqrs/util.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"
#include "query.h"
#include "topics.h"

#define KAFKA_SLACK_MS 60000
#define PARKED_PREFIX "waiting behind"

typedef struct events_ud {
    const char *id;
    const char *limit;
    cqrs_rows_t *rows;  /* newest first */
    cqrs_rows_t *total; /* count, max version */
} events_ud_t;

static cqrs_err_t events_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    events_ud_t *e = ud;
    const char *p[] = {e->id, e->limit};
    cqrs_err_t rc = cqrs_tx_exec(
        tx,
        "SELECT e.version, e.sequence, e.event_id::text, e.event_type, e.aggregate_type,"
        " to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),"
        " o.sequence IS NOT NULL, o.topic"
        " FROM events e LEFT JOIN outbox o ON o.sequence = e.sequence"
        " WHERE e.aggregate_id = $1::uuid ORDER BY e.version DESC LIMIT $2::int",
        2, p, &e->rows, err);
    if (rc == CQRS_ERR_OK)
        rc = cqrs_tx_exec(tx,
                          "SELECT count(*), coalesce(max(version), 0) FROM events"
                          " WHERE aggregate_id = $1::uuid",
                          1, p, &e->total, err);
    return rc;
}

typedef struct oldest_ud {
    const char *id;
    const char *version;
    cqrs_rows_t *rows;
} oldest_ud_t;

static cqrs_err_t oldest_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    oldest_ud_t *o = ud;
    const char *p[] = {o->id, o->version};
    return cqrs_tx_exec(tx,
                        "SELECT to_char(min(occurred_at) AT TIME ZONE 'UTC',"
                        " 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') FROM events"
                        " WHERE aggregate_id = $1::uuid AND version > $2::bigint",
                        2, p, &o->rows, err);
}

static int exit_for(cqrs_err_t rc)
{
    return rc == CQRS_ERR_UNAVAILABLE ? 3 : 1;
}

static json_t *find_dead_letter(json_t *dead, int64_t version)
{
    size_t i;
    json_t *d;
    json_array_foreach(dead, i, d)
    {
        if (json_integer_value(json_object_get(d, "version")) == version)
            return d;
    }
    return NULL;
}

static void print_human(json_t *out)
{
    const char *id = json_string_value(json_object_get(out, "aggregate_id"));
    const char *type = json_string_value(json_object_get(out, "aggregate_type"));
    json_t *doc = json_object_get(out, "document");
    json_t *kafka = json_object_get(out, "kafka");
    printf("aggregate:   %s %s\n", type ? type : "(type unknown)", id);
    printf("postgresql:  version %lld, %lld events\n",
           (long long)json_integer_value(json_object_get(out, "version")),
           (long long)json_integer_value(json_object_get(out, "events_total")));
    json_t *part = json_object_get(kafka, "partition");
    json_t *applied = json_object_get(kafka, "applied_offset");
    const char *note = json_string_value(json_object_get(kafka, "note"));
    if (json_is_integer(part) && json_is_integer(applied))
        printf("kafka:       %s partition %lld, applied up to offset %lld (next %lld)\n",
               json_string_value(json_object_get(kafka, "topic")),
               (long long)json_integer_value(part), (long long)json_integer_value(applied) - 1,
               (long long)json_integer_value(applied));
    else if (json_is_integer(part))
        printf("kafka:       %s partition %lld, no applied offset recorded\n",
               json_string_value(json_object_get(kafka, "topic")),
               (long long)json_integer_value(part));
    else
        printf("kafka:       %s, partition unknown\n",
               json_string_value(json_object_get(kafka, "topic")));
    if (note)
        printf("             offsets may be unknown: %s\n", note);
    if (json_is_null(doc))
        printf("redis:       no document\n");
    else
        printf("redis:       %s version %lld\n", json_string_value(json_object_get(doc, "key")),
               (long long)json_integer_value(json_object_get(doc, "version")));
    json_int_t behind = json_integer_value(json_object_get(out, "events_behind"));
    if (behind == 0)
        printf("lag:         0 s (the document shows every event)\n");
    else
        printf("lag:         %.1f s (%lld events not yet visible, the oldest from %s)\n",
               json_real_value(json_object_get(out, "lag_seconds")), (long long)behind,
               json_string_value(json_object_get(out, "oldest_not_visible")));
    json_int_t shown = (json_int_t)json_array_size(json_object_get(out, "events"));
    json_int_t total = json_integer_value(json_object_get(out, "events_total"));
    if (total > shown)
        printf("(the newest %lld of %lld events; --limit N for more)\n", (long long)shown,
               (long long)total);
    printf("\n%7s %10s  %-28s %-25s %-8s %-12s %s\n", "version", "sequence", "type", "time",
           "outbox", "kafka", "redis");
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(out, "events"), i, e)
    {
        char where[64];
        json_t *k = json_object_get(e, "kafka");
        if (json_is_integer(json_object_get(k, "offset")))
            snprintf(where, sizeof where, "p%lld@%lld",
                     (long long)json_integer_value(json_object_get(k, "partition")),
                     (long long)json_integer_value(json_object_get(k, "offset")));
        else
            snprintf(where, sizeof where, "%s", json_string_value(json_object_get(k, "status")));
        const char *redis = json_string_value(json_object_get(e, "redis"));
        const char *reason = json_string_value(json_object_get(e, "reason"));
        char etype[200];
        const char *as = json_string_value(json_object_get(e, "read_as"));
        snprintf(etype, sizeof etype, "%s%s%s", json_string_value(json_object_get(e, "type")),
                 as ? " → " : "", as ? strrchr(as, '.') + 1 : "");
        printf("%7lld %10lld  %-28s %-25s %-8s %-12s %s%s%s\n",
               (long long)json_integer_value(json_object_get(e, "version")),
               (long long)json_integer_value(json_object_get(e, "sequence")), etype,
               json_string_value(json_object_get(e, "time")),
               json_is_true(json_object_get(e, "in_outbox")) ? "pending" : "-", where, redis,
               reason ? ": " : "", reason ? reason : "");
    }
    json_t *dead = json_object_get(out, "dead_letters");
    if (json_array_size(dead) > 0)
        printf("\n%zu dead letters hold this aggregate: cqrsctl dlq show %s\n",
               json_array_size(dead), id);
}

/* What explain gathers about one aggregate; the report is built from it. */
typedef struct explain {
    const cqrsctl_env_t *env;
    char lid[CQRS_UUID_LEN + 1]; /* the aggregate id, lower case */
    bool as_json;
    long limit, budget_ms;
    cqrs_store_t *store;
    cqrs_docstore_t *ds;
    events_ud_t ev;
    cqrs_dead_letter_t *dl;
    size_t n_dl;
    const char *type; /* from PostgreSQL, a dead letter or the document found; NULL: unknown */
    char type_buf[32];
    char key[CQRS_KEY_MAX];
    int64_t doc_version;
    bool have_doc;
    char topic[256];
    cqrs_bus_sought_t *sought; /* newest first, like ev.rows */
    size_t n_sought;
    int32_t partition;
    bool complete;
    char note[300];
    json_t *dead, *events, *applied_offset;
} explain_t;

/* The command line; -1 to go on, else the exit status. */
static int parse_args(explain_t *x, int argc, char **argv)
{
    const char *id = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) {
            x->as_json = true;
        } else if (strcmp(argv[i], "--help") == 0) {
            printf("usage: cqrsctl explain <aggregate-id> [--json] [--limit N]"
                   " [--kafka-budget-ms MS]\n\n"
                   "One aggregate across the system: its events in PostgreSQL (the newest N,\n"
                   "default 50), which are still in the outbox, the Kafka partition and offset\n"
                   "of each (looked up within MS milliseconds, default 5000; \"unknown\" beyond),\n"
                   "the document's version in Redis, the partition's applied offset, dead\n"
                   "letters, and the lag (now - time of the oldest event the document does not\n"
                   "show yet). Exit 0 found, 1 unknown aggregate, 2 usage, 3 a dependency is\n"
                   "unavailable.\n");
            return 0;
        } else if ((strcmp(argv[i], "--limit") == 0 || strcmp(argv[i], "--kafka-budget-ms") == 0) &&
                   i + 1 < argc) {
            char *end;
            long v = strtol(argv[i + 1], &end, 10);
            if (*end || v < 1 || v > 1000000) {
                fprintf(stderr, "cqrsctl explain: %s needs a number from 1 to 1000000\n", argv[i]);
                return 2;
            }
            *(strcmp(argv[i], "--limit") == 0 ? &x->limit : &x->budget_ms) = v;
            i++;
        } else if (argv[i][0] != '-' && !id) {
            id = argv[i];
        } else {
            fprintf(stderr, "cqrsctl explain: unexpected argument %s (see --help)\n", argv[i]);
            return 2;
        }
    }
    if (!id || !cqrs_uuid_valid(id)) {
        fprintf(stderr, "cqrsctl explain: give the aggregate id (a UUID); see --help\n");
        return 2;
    }
    for (size_t i = 0; i <= CQRS_UUID_LEN; i++)
        x->lid[i] = (char)(id[i] >= 'A' && id[i] <= 'F' ? id[i] + 32 : id[i]);
    return -1;
}

/* Redis: dead letters, then the document (its type from PostgreSQL, else whichever exists). */
static cqrs_err_t find_document(explain_t *x, cqrs_error_t *err)
{
    char dlq_key[CQRS_KEY_MAX], dlq_shard[CQRS_SHARD_MAX];
    cqrs_err_t rc = cqrsctl_dlq_shard(x->ds, x->lid, dlq_shard, sizeof dlq_shard, err);
    if (rc == CQRS_ERR_OK) {
        cqrs_keys_dlq(dlq_shard, x->lid, dlq_key, sizeof dlq_key);
        rc = cqrs_docstore_dlq_get(x->ds, dlq_key, &x->dl, &x->n_dl, err);
    } else if (rc == CQRS_ERR_NOT_FOUND) {
        rc = CQRS_ERR_OK; /* none */
    }
    int n = cqrs_rows_count(x->ev.rows);
    x->type = n > 0 ? cqrs_rows_get(x->ev.rows, 0, 4) : NULL;
    for (size_t i = 0; rc == CQRS_ERR_OK && !x->type && i < x->n_dl; i++) {
        json_t *b = json_loads(x->dl[i].blob, 0, NULL);
        const char *t = json_string_value(json_object_get(b, "aggregate_type"));
        if (t)
            snprintf(x->type_buf, sizeof x->type_buf, "%s", t);
        json_decref(b);
        if (x->type_buf[0])
            x->type = x->type_buf;
    }
    for (int t = 0; rc == CQRS_ERR_OK && t < TOPIC_TYPES && !x->have_doc; t++) {
        if (x->type && strcmp(x->type, topic_type(t)) != 0)
            continue;
        char k[CQRS_KEY_MAX];
        rc = query_doc_key(x->ds, topic_type(t), x->lid, k, sizeof k, err);
        if (rc == CQRS_ERR_OK)
            rc = cqrs_docstore_get(x->ds, k, NULL, &x->doc_version, err);
        if (rc == CQRS_ERR_OK) {
            x->have_doc = true;
            snprintf(x->key, sizeof x->key, "%s", k);
            if (!x->type)
                x->type = topic_type(t);
        } else if (rc == CQRS_ERR_NOT_FOUND) {
            rc = CQRS_ERR_OK;
            x->doc_version = 0;
        }
    }
    return rc;
}

/* Kafka: the partition of the key and the offset of each published event shown; a dead
 * letter records where its event was read. 0, or the exit status. */
static int locate_in_kafka(explain_t *x)
{
    int n = cqrs_rows_count(x->ev.rows);
    topic_name(x->env->topic_prefix, x->type ? x->type : "unknown", x->topic, sizeof x->topic);
    x->sought = calloc((size_t)n + 1, sizeof *x->sought);
    int64_t since = INT64_MAX;
    /* Events still in the outbox too: the relay deletes a row only after Kafka committed
     * it, so one may already be in Kafka (and even applied). */
    for (int i = 0; x->sought && i < n; i++) {
        x->sought[x->n_sought++].event_id = cqrs_rows_get(x->ev.rows, i, 2);
        int64_t t = cqrs_time_parse_ms(cqrs_rows_get(x->ev.rows, i, 5));
        if (t < since)
            since = t;
    }
    x->partition = -1;
    cqrs_bus_scan_t scan = {.since_ms =
                                since == INT64_MAX ? cqrs_realtime_ms() : since - KAFKA_SLACK_MS,
                            .budget_ms = (int)x->budget_ms,
                            .max_messages = 10000000};
    cqrs_error_t kerr;
    if (!x->sought) {
        fprintf(stderr, "cqrsctl explain: out of memory\n");
        return 1;
    }
    if (cqrs_bus_locate(x->env->kafka_brokers, x->topic, x->lid, &scan, x->sought, x->n_sought,
                        &x->partition, &x->complete, &kerr) != CQRS_ERR_OK) {
        snprintf(x->note, sizeof x->note, "%s", kerr.message);
        x->partition = -1;
    } else if (!x->complete) {
        snprintf(x->note, sizeof x->note, "the scan budget (%ld ms) ran out", x->budget_ms);
    }
    for (size_t i = 0; i < x->n_dl; i++) {
        json_t *b = json_loads(x->dl[i].blob, 0, NULL);
        json_t *p = json_object_get(b, "partition"), *o = json_object_get(b, "offset");
        const char *eid = json_string_value(json_object_get(b, "id"));
        if (x->partition < 0 && json_is_integer(p))
            x->partition = (int32_t)json_integer_value(p);
        for (size_t s = 0; eid && json_is_integer(o) && s < x->n_sought; s++)
            if (x->sought[s].offset < 0 && strcmp(x->sought[s].event_id, eid) == 0)
                x->sought[s].offset = (int64_t)json_integer_value(o);
        json_array_append_new(x->dead, json_pack("{s:I, s:s?, s:s?, s:s?}", "version",
                                                 (json_int_t)x->dl[i].version, "type",
                                                 json_string_value(json_object_get(b, "type")),
                                                 "event_id", eid, "reason", x->dl[i].reason));
        json_decref(b);
    }
    return 0;
}

/* The applied offset of the aggregate's partition in Redis (null when unknown). */
static cqrs_err_t find_applied_offset(explain_t *x, cqrs_error_t *err)
{
    x->applied_offset = json_null();
    if (x->partition < 0)
        return CQRS_ERR_OK;
    char shard[CQRS_SHARD_MAX];
    int64_t off;
    cqrs_keys_shard(cqrs_docstore_prefix(x->ds), x->topic, x->partition, shard, sizeof shard);
    cqrs_err_t rc = cqrs_docstore_offset(x->ds, shard, x->partition, &off, err);
    if (rc == CQRS_ERR_OK)
        x->applied_offset = json_integer((json_int_t)off);
    return rc == CQRS_ERR_NOT_FOUND ? CQRS_ERR_OK : rc;
}

/* The events, oldest first, each where it is: outbox, Kafka, Redis. */
/* The type the projections read an event written as `type` as (upcast.h), in buf; NULL when it
 * is read as written. */
static const char *read_as(const char *type, char *buf, size_t cap)
{
    char name[96];
    int version;
    const cqrs_event_kind_t *k = cqrs_event_type_parse(type, name, sizeof name, &version)
                                     ? cqrs_event_kind(&query_events, name)
                                     : NULL;
    if (!k || version >= k->newest)
        return NULL;
    snprintf(buf, cap, "%s.v%d", name, k->newest);
    return buf;
}

static void event_rows(explain_t *x)
{
    int n = cqrs_rows_count(x->ev.rows);
    size_t s = x->n_sought;
    for (int i = n - 1; i >= 0; i--) {
        int64_t version = atoll(cqrs_rows_get(x->ev.rows, i, 0));
        bool in_outbox = strcmp(cqrs_rows_get(x->ev.rows, i, 6), "t") == 0;
        json_t *kafka;
        /* sought[] was filled newest first, so walk it backwards with the rows. */
        cqrs_bus_sought_t *so = &x->sought[--s];
        if (so->offset >= 0)
            kafka = json_pack("{s:s, s:i, s:I}", "status", "found", "partition", x->partition,
                              "offset", (json_int_t)so->offset);
        else if (in_outbox)
            kafka = json_pack("{s:s}", "status", "not published");
        else
            kafka = json_pack("{s:s}", "status",
                              x->partition >= 0 && x->complete ? "not found" : "unknown");
        const char *redis = "pending", *reason = NULL;
        json_t *d = find_dead_letter(x->dead, version);
        if (version <= x->doc_version) {
            redis = "applied";
        } else if (d) {
            reason = json_string_value(json_object_get(d, "reason"));
            redis = reason && strncmp(reason, PARKED_PREFIX, strlen(PARKED_PREFIX)) == 0
                        ? "parked"
                        : "dead letter";
        }
        char as[128];
        json_array_append_new(
            x->events,
            json_pack("{s:I, s:I, s:s, s:s, s:s*, s:s, s:b, s:o, s:s, s:s?}", "version",
                      (json_int_t)version, "sequence",
                      (json_int_t)atoll(cqrs_rows_get(x->ev.rows, i, 1)), "event_id",
                      cqrs_rows_get(x->ev.rows, i, 2), "type", cqrs_rows_get(x->ev.rows, i, 3),
                      "read_as", read_as(cqrs_rows_get(x->ev.rows, i, 3), as, sizeof as), "time",
                      cqrs_rows_get(x->ev.rows, i, 5), "in_outbox", in_outbox, "kafka", kafka,
                      "redis", redis, "reason", reason));
    }
}

/* Everything about the aggregate into *out (the report --json prints); 0, or the exit status
 * after saying why on stderr. */
static int gather(explain_t *x, json_t **out)
{
    cqrs_error_t err;
    cqrs_err_t rc = cqrs_store_run_tx(x->store, events_tx, &x->ev, &err);
    if (rc != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl explain: PostgreSQL: %s\n", err.message);
        return exit_for(rc);
    }
    rc = find_document(x, &err);
    if (rc != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl explain: Redis: %s\n", err.message);
        return exit_for(rc);
    }
    if (cqrs_rows_count(x->ev.rows) == 0 && !x->have_doc && x->n_dl == 0) {
        fprintf(stderr, "cqrsctl explain: no aggregate %s (no events, document or dead letters)\n",
                x->lid);
        return 1;
    }
    int status = locate_in_kafka(x);
    if (status != 0)
        return status;
    rc = find_applied_offset(x, &err);
    if (rc != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl explain: Redis: %s\n", err.message);
        return exit_for(rc);
    }
    event_rows(x);

    /* Lag: how long the document has been behind — since the oldest event it does not show
     * (also when that one is older than the events shown). */
    int64_t pg_version = atoll(cqrs_rows_get(x->ev.total, 0, 1));
    json_int_t behind = pg_version > x->doc_version ? (json_int_t)(pg_version - x->doc_version) : 0;
    char doc_version_s[24];
    snprintf(doc_version_s, sizeof doc_version_s, "%lld", (long long)x->doc_version);
    oldest_ud_t old = {x->lid, doc_version_s, NULL};
    if (behind > 0 && (rc = cqrs_store_run_tx(x->store, oldest_tx, &old, &err)) != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl explain: PostgreSQL: %s\n", err.message);
        return exit_for(rc);
    }
    const char *oldest =
        old.rows && cqrs_rows_count(old.rows) ? cqrs_rows_get(old.rows, 0, 0) : NULL;
    int64_t now = cqrs_realtime_ms(), t = oldest ? cqrs_time_parse_ms(oldest) : now;
    double lag = now > t ? (double)(now - t) / 1000.0 : 0.0;
    *out = json_pack(
        "{s:s, s:s?, s:I, s:I, s:o, s:{s:s, s:o, s:o, s:s?}, s:f, s:I, s:s?, s:o, s:o}",
        "aggregate_id", x->lid, "aggregate_type", x->type, "version", (json_int_t)pg_version,
        "events_total", (json_int_t)atoll(cqrs_rows_get(x->ev.total, 0, 0)), "document",
        x->have_doc ? json_pack("{s:s, s:I}", "key", x->key, "version", (json_int_t)x->doc_version)
                    : json_null(),
        "kafka", "topic", x->topic, "partition",
        x->partition >= 0 ? json_integer(x->partition) : json_null(), "applied_offset",
        x->applied_offset, "note", x->note[0] ? x->note : NULL, "lag_seconds", lag, "events_behind",
        behind, "oldest_not_visible", oldest, "events", x->events, "dead_letters", x->dead);
    x->events = x->dead = x->applied_offset = NULL; /* stolen */
    cqrs_rows_free(old.rows);
    return 0;
}

int cqrsctl_explain(const cqrsctl_env_t *env, int argc, char **argv)
{
    static explain_t x; /* large; one per process */
    x = (explain_t){.env = env, .limit = 50, .budget_ms = 5000};
    int status = parse_args(&x, argc, argv);
    if (status >= 0)
        return status;
    status = 0;
    char limit_s[24];
    snprintf(limit_s, sizeof limit_s, "%ld", x.limit);
    x.ev = (events_ud_t){x.lid, limit_s, NULL, NULL};
    x.events = json_array();
    x.dead = json_array();
    json_t *out = NULL;
    cqrs_error_t err;
    cqrs_store_config_t sc = {.dsn = env->pg_dsn,
                              .pool_size = 1,
                              .acquire_timeout_ms = 1000,
                              .statement_timeout_ms = 10000,
                              .lock_timeout_ms = 1000,
                              .connect_timeout_s = 5,
                              .max_tx_attempts = 1,
                              .application_name = "cqrsctl-explain"};
    x.store = cqrs_store_new(&sc);
    x.ds = cqrs_docstore_new(env->redis, 5000, &err);
    if (!x.store || !x.ds) {
        fprintf(stderr, "cqrsctl explain: %s\n", x.ds ? "out of memory" : err.message);
        status = 2;
        goto out;
    }
    status = gather(&x, &out);
    if (status == 0 && x.as_json)
        cqrsctl_print_json(out);
    else if (status == 0)
        print_human(out);
out:
    json_decref(out);
    json_decref(x.events);
    json_decref(x.dead);
    json_decref(x.applied_offset);
    free(x.sought);
    cqrs_docstore_dlq_free(x.dl, x.n_dl);
    cqrs_rows_free(x.ev.rows);
    cqrs_rows_free(x.ev.total);
    cqrs_docstore_destroy(x.ds);
    cqrs_store_destroy(x.store);
    return status;
}
