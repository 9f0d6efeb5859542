/* dlq.c — `cqrsctl dlq list|show|retry|drop`: the dead-letter store of the read model.
 *
 * retry runs an aggregate's held events, in version order, through the same pure projection
 * cqrs-queryd uses (services/query `query_projection`) and the same docstore apply script, so
 * the document and every index change together, exactly as if the projector had applied them.
 * Each applied version leaves the store at once; when none is left the aggregate is released
 * and the projector applies its next events itself. The projector may park more events
 * meanwhile: retry reads the store again until it is empty or an event still fails, which
 * then stays with its new reason (exit 1). Re-running retry is harmless: an event the document
 * already shows is a duplicate and is only removed.
 *
 * drop deletes the dead letters and releases the aggregate without applying anything: the
 * document stays behind PostgreSQL (and its next event is held as a gap) until a rebuild.
 */
#include <cqrs/docstore.h>
#include <cqrs/event.h>
#include <cqrs/projector.h>
#include <cqrs/util.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ops.h"
#include "query.h"

#define MAX_PASSES 20

static void usage(FILE *f)
{
    fprintf(f, "usage: cqrsctl dlq list [--json]\n"
               "       cqrsctl dlq show <aggregate-id> [--json]\n"
               "       cqrsctl dlq retry <aggregate-id> [--json]\n"
               "       cqrsctl dlq drop <aggregate-id> --yes [--json]\n\n"
               "The read model's dead letters: events the projection rejected (unknown type,\n"
               "invalid data) or that came after a gap, and the later events of the same\n"
               "aggregate parked behind them.\n"
               "  list   aggregates held: how many events, the first version, its reason\n"
               "  show   every held event of an aggregate with its reason\n"
               "  retry  apply the held events in version order through the projection; the\n"
               "         aggregate is released when all apply (exit 1 when one still fails)\n"
               "  drop   delete the aggregate's dead letters and release it; the document then\n"
               "         lags behind PostgreSQL until a rebuild\n"
               "Exit 0 done, 1 failed or nothing held, 2 usage, 3 Redis unavailable.\n");
}

static int exit_for(cqrs_err_t rc)
{
    return rc == CQRS_ERR_UNAVAILABLE ? 3 : 1;
}

static void time_text(int64_t ms, char out[CQRS_TIME_LEN + 1])
{
    time_t s = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&s, &tm);
    size_t len = strftime(out, CQRS_TIME_LEN + 1, "%Y-%m-%dT%H:%M:%S", &tm);
    if (len == 19)
        snprintf(out + len, CQRS_TIME_LEN + 1 - len, ".%03uZ", (unsigned)((uint64_t)ms % 1000u));
}

static cqrs_err_t list_shard(cqrs_docstore_t *ds, const char *shard, json_t *list,
                             cqrs_error_t *err);
static int print_list(json_t *list, long long undecodable, bool as_json);

cqrs_err_t cqrsctl_all_shards(cqrs_docstore_t *ds, cqrsctl_shard_t **shards, size_t *n,
                              cqrs_error_t *err)
{
    static const char *const types[] = {"product", "order"};
    int32_t counts[2] = {0, 0};
    *shards = NULL;
    *n = 0;
    for (size_t t = 0; t < 2; t++) {
        cqrs_err_t rc = query_shard_count(ds, types[t], &counts[t], err);
        if (rc == CQRS_ERR_NOT_FOUND)
            counts[t] = 0;
        else if (rc != CQRS_ERR_OK)
            return rc;
    }
    *shards = calloc((size_t)(counts[0] + counts[1]) + 1, sizeof **shards);
    if (!*shards)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    for (size_t t = 0; t < 2; t++)
        for (int32_t i = 0; i < counts[t]; i++)
            query_shard(ds, types[t], i, (*shards)[(*n)++], CQRS_SHARD_MAX);
    return CQRS_ERR_OK;
}

cqrs_err_t cqrsctl_dlq_shard(cqrs_docstore_t *ds, const char *id, char *shard, size_t cap,
                             cqrs_error_t *err)
{
    static const char *const types[] = {"product", "order"};
    for (size_t t = 0; t < 2; t++) {
        int32_t n = 0;
        cqrs_err_t rc = query_shard_count(ds, types[t], &n, err);
        if (rc == CQRS_ERR_NOT_FOUND)
            continue;
        if (rc != CQRS_ERR_OK)
            return rc;
        char key[CQRS_KEY_MAX];
        query_shard(ds, types[t], cqrs_keys_partition(id, n), shard, cap);
        cqrs_keys_dlq(shard, id, key, sizeof key);
        cqrs_dead_letter_t *dl = NULL;
        size_t k = 0;
        rc = cqrs_docstore_dlq_get(ds, key, &dl, &k, err);
        cqrs_docstore_dlq_free(dl, k);
        if (rc != CQRS_ERR_OK)
            return rc;
        if (k > 0)
            return CQRS_ERR_OK;
    }
    return cqrs_error_set(err, CQRS_ERR_NOT_FOUND, "no dead letters for %s", id);
}

static int cmd_list(cqrs_docstore_t *ds, bool as_json)
{
    long long undecodable = 0;
    cqrs_error_t err;
    cqrsctl_shard_t *shards = NULL;
    size_t n_shards = 0;
    json_t *list = json_array();
    cqrs_err_t rc = cqrsctl_all_shards(ds, &shards, &n_shards, &err);
    for (size_t s = 0; rc == CQRS_ERR_OK && s < n_shards; s++) {
        long long u = 0;
        const char *sp = shards[s];
        rc = cqrs_docstore_dlq_counts(ds, &sp, 1, NULL, &u, &err);
        undecodable += u;
        if (rc == CQRS_ERR_OK)
            rc = list_shard(ds, shards[s], list, &err);
    }
    free(shards);
    if (rc != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl dlq list: %s\n", err.message);
        json_decref(list);
        return exit_for(rc);
    }
    return print_list(list, undecodable, as_json);
}

/* Appends the aggregates a shard's dead-letter index holds to list. */
static cqrs_err_t list_shard(cqrs_docstore_t *ds, const char *shard, json_t *list,
                             cqrs_error_t *err)
{
    char **ids = NULL;
    int64_t *since = NULL;
    size_t n = 0;
    cqrs_err_t rc = cqrs_docstore_dlq_index(ds, shard, &ids, &since, &n, err);
    for (size_t i = 0; rc == CQRS_ERR_OK && i < n; i++) {
        char key[CQRS_KEY_MAX];
        cqrs_dead_letter_t *dl = NULL;
        size_t k = 0;
        cqrs_keys_dlq(shard, ids[i], key, sizeof key);
        rc = cqrs_docstore_dlq_get(ds, key, &dl, &k, err);
        if (rc != CQRS_ERR_OK || k == 0) {
            cqrs_docstore_dlq_free(dl, k);
            continue; /* released between the two reads */
        }
        json_t *b = json_loads(dl[0].blob, 0, NULL);
        char t[CQRS_TIME_LEN + 1];
        time_text(since[i], t);
        json_array_append_new(
            list,
            json_pack("{s:s, s:s?, s:s, s:I, s:I, s:s?, s:s?}", "aggregate_id", ids[i],
                      "aggregate_type", json_string_value(json_object_get(b, "aggregate_type")),
                      "since", t, "count", (json_int_t)k, "first_version",
                      (json_int_t)dl[0].version, "type",
                      json_string_value(json_object_get(b, "type")), "reason", dl[0].reason));
        json_decref(b);
        cqrs_docstore_dlq_free(dl, k);
    }
    cqrs_docstore_strings_free(ids, n);
    free(since);
    return rc;
}

static int print_list(json_t *list, long long undecodable, bool as_json)
{
    if (as_json) {
        json_t *out =
            json_pack("{s:o, s:I}", "aggregates", list, "undecodable", (json_int_t)undecodable);
        cqrsctl_print_json(out);
        json_decref(out);
        return 0;
    }
    if (json_array_size(list) == 0) {
        printf("no aggregate is held by dead letters\n");
    } else {
        printf("%-36s %-8s %-24s %5s %5s  %s\n", "aggregate", "type", "held since", "count",
               "first", "reason of the first");
        size_t i;
        json_t *e;
        json_array_foreach(list, i, e)
        {
            const char *type = json_string_value(json_object_get(e, "aggregate_type"));
            printf("%-36s %-8s %-24s %5lld %5lld  %s (%s)\n",
                   json_string_value(json_object_get(e, "aggregate_id")), type ? type : "?",
                   json_string_value(json_object_get(e, "since")),
                   (long long)json_integer_value(json_object_get(e, "count")),
                   (long long)json_integer_value(json_object_get(e, "first_version")),
                   json_string_value(json_object_get(e, "reason")),
                   json_string_value(json_object_get(e, "type")));
        }
    }
    printf("undecodable messages (the shards' " CQRS_SHARD_UNDECODABLE "): %lld\n", undecodable);
    json_decref(list);
    return 0;
}

static int cmd_show(cqrs_docstore_t *ds, const char *id, bool as_json)
{
    char key[CQRS_KEY_MAX];
    cqrs_dead_letter_t *dl = NULL;
    size_t n = 0;
    cqrs_error_t err;
    char shard[CQRS_SHARD_MAX];
    cqrs_err_t rc = cqrsctl_dlq_shard(ds, id, shard, sizeof shard, &err);
    if (rc == CQRS_ERR_OK) {
        cqrs_keys_dlq(shard, id, key, sizeof key);
        rc = cqrs_docstore_dlq_get(ds, key, &dl, &n, &err);
    } else if (rc == CQRS_ERR_NOT_FOUND) {
        rc = CQRS_ERR_OK; /* n = 0: none */
    }
    if (rc != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl dlq show: %s\n", err.message);
        return exit_for(rc);
    }
    json_t *list = json_array();
    for (size_t i = 0; i < n; i++) {
        json_t *b = json_loads(dl[i].blob, 0, NULL);
        json_array_append_new(list, json_pack("{s:I, s:s?, s:o}", "version",
                                              (json_int_t)dl[i].version, "reason", dl[i].reason,
                                              "event", b ? b : json_string(dl[i].blob)));
    }
    cqrs_docstore_dlq_free(dl, n);
    if (as_json) {
        json_t *out = json_pack("{s:s, s:o}", "aggregate_id", id, "dead_letters", list);
        cqrsctl_print_json(out);
        json_decref(out);
    } else if (n == 0) {
        printf("no dead letters for %s\n", id);
        json_decref(list);
    } else {
        size_t i;
        json_t *e;
        json_array_foreach(list, i, e)
        {
            json_t *b = json_object_get(e, "event");
            char *data = json_dumps(json_object_get(b, "data"), JSON_COMPACT);
            printf("version %lld  %s  %s\n  event %s at %s, read from %s partition %lld offset "
                   "%lld\n  reason: %s\n  data: %s\n",
                   (long long)json_integer_value(json_object_get(e, "version")),
                   json_string_value(json_object_get(b, "type")),
                   json_string_value(json_object_get(b, "aggregate_type")),
                   json_string_value(json_object_get(b, "id")),
                   json_string_value(json_object_get(b, "time")),
                   json_string_value(json_object_get(b, "topic")),
                   (long long)json_integer_value(json_object_get(b, "partition")),
                   (long long)json_integer_value(json_object_get(b, "offset")),
                   json_string_value(json_object_get(e, "reason")), data ? data : "null");
            free(data);
        }
        json_decref(list);
    }
    return n > 0 ? 0 : 1;
}

/* Applies one held event; OK with *applied, or a reason in err->message why it cannot be
 * applied (INVALID), or STATE (the document moved: read again), or a Redis failure. */
static cqrs_err_t retry_one(cqrs_docstore_t *ds, const char *shard, const char *dlq_key,
                            const cqrs_dead_letter_t *d, bool *applied, cqrs_error_t *err)
{
    const cqrs_projection_t *proj = &query_projection;
    cqrs_event_t ev;
    json_t *blob = json_loads(d->blob, 0, NULL), *doc = NULL, *next = NULL;
    char *text = NULL, *next_text = NULL;
    cqrs_index_ops_t ops = {0};
    int64_t cur = 0;
    char key[CQRS_KEY_MAX];
    cqrs_err_t rc = cqrs_event_from_json(blob, &ev, err);
    *applied = false;
    if (rc != CQRS_ERR_OK)
        goto out;
    if (ev.version != d->version) {
        rc = cqrs_error_set(err, CQRS_ERR_INVALID, "stored under version %lld but is version %lld",
                            (long long)d->version, (long long)ev.version);
        goto out;
    }
    if (!proj->knows(&ev)) {
        rc = cqrs_error_set(err, CQRS_ERR_INVALID, "unknown aggregate type");
        goto out;
    }
    cqrs_keys_doc(shard, ev.aggregate_id, key, sizeof key);
    rc = cqrs_docstore_get(ds, key, &text, &cur, err);
    if (rc == CQRS_ERR_NOT_FOUND)
        rc = CQRS_ERR_OK;
    if (rc != CQRS_ERR_OK)
        goto out;
    if (ev.version <= cur)
        goto out; /* the document shows it already: only to be removed */
    if (ev.version > cur + 1) {
        rc = cqrs_error_set(err, CQRS_ERR_INVALID, "gap: the document is at version %lld",
                            (long long)cur);
        goto out;
    }
    doc = text ? json_loads(text, 0, NULL) : NULL;
    if (text && !doc) {
        rc = cqrs_error_set(err, CQRS_ERR_INVALID, "the stored document is not JSON");
        goto out;
    }
    cqrs_error_t perr;
    if (cqrs_projection_apply(proj, doc, &ev, &next, &perr) != CQRS_ERR_OK) {
        rc = cqrs_error_set(err, CQRS_ERR_INVALID, "%s", perr.message);
        goto out;
    }
    next_text = json_dumps(next, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (proj->index)
        proj->index(shard, ev.aggregate_type, key, doc, next, &ops);
    if (!next_text || ops.nomem) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    /* The offset was recorded when the event was parked: apply_held leaves offsets alone. The
     * script writes only while the document is still at cur (else STATE: read again). */
    cqrs_apply_t a = {.key = key,
                      .version = ev.version,
                      .json = next_text,
                      .dlq_key = dlq_key,
                      .aggregate_id = ev.aggregate_id,
                      .blob = d->blob,
                      .ops = ops.v,
                      .n_ops = ops.n,
                      .shard = shard,
                      .partition = (int32_t)json_integer_value(json_object_get(blob, "partition")),
                      .next_offset =
                          (int64_t)json_integer_value(json_object_get(blob, "offset")) + 1,
                      .base_version = cur};
    cqrs_apply_result_t res;
    rc = cqrs_docstore_apply_held(ds, &a, &res, err);
    if (rc == CQRS_ERR_OK && res == CQRS_APPLY_RESET)
        rc = cqrs_error_set(err, CQRS_ERR_STATE,
                            "the read model store lost its data; the projector refills it");
    *applied = rc == CQRS_ERR_OK && res == CQRS_APPLY_APPLIED;
out:
    cqrs_index_ops_free(&ops);
    free(text);
    free(next_text);
    json_decref(doc);
    json_decref(next);
    json_decref(blob);
    cqrs_event_close(&ev);
    return rc;
}

static int cmd_retry(cqrs_docstore_t *ds, const char *id, bool as_json)
{
    char key[CQRS_KEY_MAX], shard[CQRS_SHARD_MAX];
    json_t *steps = json_array();
    bool released = false, failed = false, any = false;
    cqrs_error_t err;
    cqrs_err_t rc = cqrsctl_dlq_shard(ds, id, shard, sizeof shard, &err);
    if (rc == CQRS_ERR_NOT_FOUND) {
        fprintf(stderr, "cqrsctl dlq retry: no dead letters for %s\n", id);
        json_decref(steps);
        return 1;
    }
    cqrs_keys_dlq(shard, id, key, sizeof key);
    for (int pass = 0; pass < MAX_PASSES && !released && !failed && rc == CQRS_ERR_OK; pass++) {
        cqrs_dead_letter_t *dl = NULL;
        size_t n = 0;
        rc = cqrs_docstore_dlq_get(ds, key, &dl, &n, &err);
        if (rc != CQRS_ERR_OK)
            break;
        if (n == 0) {
            released = any; /* nothing held (any more) */
            cqrs_docstore_dlq_free(dl, n);
            break;
        }
        any = true;
        bool progress = false;
        for (size_t i = 0; i < n && !failed && rc == CQRS_ERR_OK; i++) {
            bool applied = false;
            cqrs_error_t e;
            cqrs_err_t r = retry_one(ds, shard, key, &dl[i], &applied, &e);
            if (r == CQRS_ERR_STATE) {
                progress = true;
                break; /* read the store again */
            }
            if (r == CQRS_ERR_INVALID) {
                failed = true;
                rc = cqrs_docstore_dlq_set_reason(ds, key, dl[i].version, e.message, &err);
                json_array_append_new(steps, json_pack("{s:I, s:s, s:s}", "version",
                                                       (json_int_t)dl[i].version, "result",
                                                       "still fails", "reason", e.message));
                break;
            }
            if (r != CQRS_ERR_OK) {
                rc = r;
                err = e;
                break;
            }
            rc = cqrs_docstore_dlq_remove(ds, shard, key, id, dl[i].version, &released, &err);
            progress = true;
            json_array_append_new(steps,
                                  json_pack("{s:I, s:s}", "version", (json_int_t)dl[i].version,
                                            "result", applied ? "applied" : "already applied"));
        }
        cqrs_docstore_dlq_free(dl, n);
        if (!progress)
            break;
    }
    if (rc != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl dlq retry: %s\n", err.message);
        json_decref(steps);
        return exit_for(rc);
    }
    if (!any) {
        fprintf(stderr, "cqrsctl dlq retry: no dead letters for %s\n", id);
        json_decref(steps);
        return 1;
    }
    if (as_json) {
        json_t *out =
            json_pack("{s:s, s:b, s:o}", "aggregate_id", id, "released", released, "steps", steps);
        cqrsctl_print_json(out);
        json_decref(out);
    } else {
        size_t i;
        json_t *s;
        json_array_foreach(steps, i, s)
        {
            const char *reason = json_string_value(json_object_get(s, "reason"));
            printf("version %lld: %s%s%s\n",
                   (long long)json_integer_value(json_object_get(s, "version")),
                   json_string_value(json_object_get(s, "result")), reason ? ": " : "",
                   reason ? reason : "");
        }
        printf(released ? "%s released: the projector applies its next events again\n"
                        : "%s is still held (cqrsctl dlq show %s)\n",
               id, id);
        json_decref(steps);
    }
    return released ? 0 : 1;
}

static int cmd_drop(cqrs_docstore_t *ds, const char *id, bool yes, bool as_json)
{
    if (!yes) {
        fprintf(stderr,
                "cqrsctl dlq drop: this deletes the held events of %s without applying"
                " them; the document then lags behind PostgreSQL until a rebuild."
                " Add --yes to do it.\n",
                id);
        return 2;
    }
    char key[CQRS_KEY_MAX], shard[CQRS_SHARD_MAX];
    size_t dropped = 0;
    cqrs_error_t err;
    cqrs_err_t rc = cqrsctl_dlq_shard(ds, id, shard, sizeof shard, &err);
    if (rc == CQRS_ERR_OK) {
        cqrs_keys_dlq(shard, id, key, sizeof key);
        rc = cqrs_docstore_dlq_drop(ds, shard, key, id, &dropped, &err);
    } else if (rc == CQRS_ERR_NOT_FOUND) {
        rc = CQRS_ERR_OK; /* dropped = 0: none */
    }
    if (rc != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl dlq drop: %s\n", err.message);
        return exit_for(rc);
    }
    if (dropped == 0) {
        fprintf(stderr, "cqrsctl dlq drop: no dead letters for %s\n", id);
        return 1;
    }
    const char *warning = "the document may lag behind PostgreSQL until a rebuild (cqrsctl "
                          "rebuild); its next event is held as a gap";
    if (as_json) {
        json_t *out = json_pack("{s:s, s:I, s:b, s:s}", "aggregate_id", id, "dropped",
                                (json_int_t)dropped, "released", 1, "warning", warning);
        cqrsctl_print_json(out);
        json_decref(out);
    } else {
        printf("dropped %zu dead letters of %s; released\nwarning: %s\n", dropped, id, warning);
    }
    return 0;
}

int cqrsctl_dlq(const cqrsctl_env_t *env, int argc, char **argv)
{
    const char *action = NULL, *id = NULL;
    bool as_json = false, yes = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(argv[i], "--json") == 0) {
            as_json = true;
        } else if (strcmp(argv[i], "--yes") == 0) {
            yes = true;
        } else if (argv[i][0] != '-' && !action) {
            action = argv[i];
        } else if (argv[i][0] != '-' && !id) {
            id = argv[i];
        } else {
            fprintf(stderr, "cqrsctl dlq: unexpected argument %s\n\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
    bool list = action && strcmp(action, "list") == 0;
    bool known = action && (list || strcmp(action, "show") == 0 || strcmp(action, "retry") == 0 ||
                            strcmp(action, "drop") == 0);
    if (!known || (list && id) || (!list && (!id || !cqrs_uuid_valid(id)))) {
        fprintf(stderr, "cqrsctl dlq: %s\n\n",
                !known ? "give an action: list, show, retry or drop"
                : list ? "list takes no aggregate id"
                       : "give the aggregate id (a UUID)");
        usage(stderr);
        return 2;
    }
    char lid[CQRS_UUID_LEN + 1] = "";
    for (size_t i = 0; id && i <= CQRS_UUID_LEN; i++)
        lid[i] = (char)(id[i] >= 'A' && id[i] <= 'F' ? id[i] + 32 : id[i]);
    cqrs_error_t err;
    cqrs_docstore_t *ds = cqrs_docstore_new(env->redis, 5000, &err);
    if (!ds) {
        fprintf(stderr, "cqrsctl dlq: %s\n", err.message);
        return 2;
    }
    int status;
    if (list)
        status = cmd_list(ds, as_json);
    else if (strcmp(action, "show") == 0)
        status = cmd_show(ds, lid, as_json);
    else if (strcmp(action, "retry") == 0)
        status = cmd_retry(ds, lid, as_json);
    else
        status = cmd_drop(ds, lid, yes, as_json);
    cqrs_docstore_destroy(ds);
    return status;
}
