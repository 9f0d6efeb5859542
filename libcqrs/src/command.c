/* command.c — the shared command pipeline (see command.h).
 *
 * Transaction layout with an Idempotency-Key:
 *   INSERT key row ON CONFLICT DO NOTHING   (a twin in flight makes this wait on its row lock)
 *     └ conflict → read the stored response (replay) or the other body's hash (422); lock the
 *       row (WAL) so that the COMMIT waits for the synchronous standby (the answer must be
 *       durable before it is given again); commit
 *   SAVEPOINT cmd
 *   body (rows + events)
 *     └ business 4xx → ROLLBACK TO SAVEPOINT cmd
 *   UPDATE key row SET response
 *   COMMIT
 * Without a key the savepoint is not needed: a business 4xx rolls the transaction back.
 */
#include "cqrs/command.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cqrs/failpoint.h"
#include "cqrs/json.h"
#include "cqrs/log.h"

/* Private code: the body set a 4xx reply; roll back, then answer it. */
#define BUSINESS_REPLY CQRS_ERR_STATE

bool cqrs_if_match_parse(const char *value, int64_t *out)
{
    if (!value)
        return false;
    while (*value == ' ')
        value++;
    if (strcmp(value, "*") == 0) {
        *out = CQRS_IF_MATCH_ANY;
        return true;
    }
    size_t len = strlen(value);
    while (len > 0 && value[len - 1] == ' ')
        len--;
    if (len < 3 || len > 21 || value[0] != '"' || value[len - 1] != '"')
        return false;
    char digits[24];
    memcpy(digits, value + 1, len - 2);
    digits[len - 2] = '\0';
    for (char *d = digits; *d; d++)
        if (*d < '0' || *d > '9')
            return false;
    int64_t v;
    if (!cqrs_parse_int64(digits, &v) || v < 1)
        return false;
    *out = v;
    return true;
}

bool cqrs_idempotency_key_valid(const char *key)
{
    size_t n = key ? strlen(key) : 0;
    if (n < 1 || n > 255)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)key[i] < 0x20 || (unsigned char)key[i] > 0x7e)
            return false;
    return true;
}

static void bad_request(cqrs_http_request_t *req, const char *detail)
{
    cqrs_http_reply_problem(req, 400, "malformed-request", "Bad Request", detail, NULL, NULL);
}

bool cqrs_command_begin(cqrs_command_t *cmd, cqrs_http_request_t *req, int flags,
                        const cqrs_command_config_t *cfg)
{
    memset(cmd, 0, sizeof *cmd);
    cmd->req = req;
    cmd->if_match = CQRS_IF_MATCH_NONE;
    cqrs_time_now_rfc3339(cmd->time);

    const char *im = cqrs_http_header(req, "If-Match");
    if (im && (flags & CQRS_CMD_IF_MATCH)) {
        if (!cqrs_if_match_parse(im, &cmd->if_match)) {
            bad_request(req, "If-Match must be a version in quotes, e.g. \"3\", or *");
            return false;
        }
    }
    const char *key = cqrs_http_header(req, "Idempotency-Key");
    if (key) {
        if (!cqrs_idempotency_key_valid(key)) {
            bad_request(req, "Idempotency-Key must be 1 to 255 printable ASCII characters");
            return false;
        }
        cmd->has_key = true;
        snprintf(cmd->key, sizeof cmd->key, "%s", key);
    }

    size_t len;
    const char *body = cqrs_http_body(req, &len);
    cqrs_error_t err;
    if (len == 0 && (flags & CQRS_CMD_NO_BODY)) {
        cmd->body = json_object();
    } else {
        cmd->body = cqrs_json_parse_object(body, len, cfg->max_json_depth, &err);
        if (!cmd->body) {
            bad_request(req, err.message);
            return false;
        }
    }
    cmd->canonical = json_dumps(cmd->body, JSON_COMPACT | JSON_SORT_KEYS);
    /* scope: caller (the token's name; "-" without tokens) + method + path */
    const char *caller = cqrs_http_caller(req);
    size_t slen = strlen(caller) + strlen(cqrs_http_method(req)) + strlen(cqrs_http_path(req)) + 3;
    cmd->scope = malloc(slen);
    if (!cmd->canonical || !cmd->scope) {
        cqrs_http_reply_problem(req, 500, "internal", "Internal Server Error", "out of memory",
                                NULL, NULL);
        return false;
    }
    snprintf(cmd->scope, slen, "%s %s %s", caller, cqrs_http_method(req), cqrs_http_path(req));
    return true;
}

void cqrs_command_end(cqrs_command_t *cmd)
{
    json_decref(cmd->body);
    json_decref(cmd->reply);
    free(cmd->scope);
    free(cmd->canonical);
    free(cmd->stored_body);
    free(cmd->stored_headers);
    memset(cmd, 0, sizeof *cmd);
}

void cqrs_command_reply(cqrs_command_t *cmd, unsigned status, json_t *body, int64_t etag_version,
                        const char *location)
{
    json_decref(cmd->reply);
    cmd->status = status;
    cmd->reply = body;
    cmd->etag_version = etag_version;
    snprintf(cmd->location, sizeof cmd->location, "%s", location ? location : "");
}

void cqrs_command_problem(cqrs_command_t *cmd, unsigned status, const char *slug, const char *title,
                          const char *detail, json_t *extra)
{
    char type[128];
    snprintf(type, sizeof type, "%s%s", CQRS_PROBLEM_BASE, slug);
    json_t *p = json_pack("{s:s, s:s, s:i, s:s}", "type", type, "title", title, "status",
                          (int)status, "detail", detail ? detail : title);
    if (extra) {
        json_object_update_missing(p, extra);
        json_decref(extra);
    }
    cqrs_command_reply(cmd, status, p, 0, NULL);
}

bool cqrs_command_check_version(cqrs_command_t *cmd, int64_t current)
{
    if (cmd->if_match == CQRS_IF_MATCH_NONE || cmd->if_match == CQRS_IF_MATCH_ANY ||
        cmd->if_match == current)
        return true;
    char detail[128];
    snprintf(detail, sizeof detail, "If-Match asked for version %lld; the current version is %lld",
             (long long)cmd->if_match, (long long)current);
    cqrs_command_problem(cmd, 412, "precondition-failed", "Precondition Failed", detail,
                         json_pack("{s:I}", "current_version", (json_int_t)current));
    return false;
}

typedef struct run_ctx {
    cqrs_command_t *cmd;
    const cqrs_command_config_t *cfg;
    cqrs_command_fn fn;
    void *ud;
} run_ctx_t;

static cqrs_err_t claim_key(cqrs_tx_t *tx, run_ctx_t *rc, cqrs_error_t *err)
{
    cqrs_command_t *cmd = rc->cmd;
    char ttl[32];
    snprintf(ttl, sizeof ttl, "%lld seconds", (long long)rc->cfg->idempotency_ttl_s);
    const char *p[] = {cmd->scope, cmd->key, cmd->canonical, ttl};
    for (int attempt = 0; attempt < 2; attempt++) {
        cqrs_rows_t *rows = NULL;
        cqrs_err_t e = cqrs_tx_exec(tx,
                                    "INSERT INTO idempotency_keys(scope, key, request_hash,"
                                    " expires_at) VALUES ($1, $2, sha256(convert_to($3, 'UTF8')),"
                                    " now() + $4::interval) ON CONFLICT DO NOTHING RETURNING 1",
                                    4, p, &rows, err);
        int inserted = cqrs_rows_count(rows);
        cqrs_rows_free(rows);
        if (e != CQRS_ERR_OK)
            return e;
        if (inserted)
            return CQRS_ERR_OK;
        e = cqrs_tx_exec(tx,
                         "SELECT request_hash = sha256(convert_to($3, 'UTF8')), status,"
                         " headers::text, body, expires_at < now()"
                         " FROM idempotency_keys WHERE scope = $1 AND key = $2",
                         3, p, &rows, err);
        if (e != CQRS_ERR_OK)
            return e;
        if (cqrs_rows_count(rows) == 0) {
            cqrs_rows_free(rows); /* deleted meanwhile (expired): claim it again */
            continue;
        }
        bool same = strcmp(cqrs_rows_get(rows, 0, 0), "t") == 0;
        bool expired = strcmp(cqrs_rows_get(rows, 0, 4), "t") == 0;
        const char *status = cqrs_rows_get(rows, 0, 1);
        if (expired) {
            cqrs_rows_free(rows);
            e = cqrs_tx_exec(tx, "DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2", 2, p,
                             NULL, err);
            if (e != CQRS_ERR_OK)
                return e;
            continue;
        }
        if (!same) {
            cmd->replay = 2;
        } else if (status) {
            cmd->replay = 1;
            cmd->stored_status = (unsigned)atoi(status);
            const char *h = cqrs_rows_get(rows, 0, 2), *b = cqrs_rows_get(rows, 0, 3);
            cmd->stored_headers = h ? strdup(h) : NULL;
            cmd->stored_body = b ? strdup(b) : NULL;
        } else {
            /* A committed row always has its response; a NULL status means a bug. */
            cqrs_rows_free(rows);
            return cqrs_error_set(err, CQRS_ERR_INTERNAL, "idempotency key without response");
        }
        cqrs_rows_free(rows);
        /* The stored answer may exist on this server only: committed here after a cancelled
         * wait for the synchronous standby (store.c), on a primary whose standby was
         * promoted since. Locking its row writes WAL (an xid alone does not), so this
         * transaction's COMMIT waits for the standby to have everything up to it, the stored
         * answer included; one that is not confirmed fails the replay (503, like the first
         * attempt) instead of acknowledging a command the promoted standby never saw. KEY
         * SHARE: compatible with a twin's update of the answer. */
        e = cqrs_tx_exec(tx,
                         "SELECT 1 FROM idempotency_keys WHERE scope = $1 AND key = $2"
                         " FOR KEY SHARE",
                         2, p, &rows, err);
        int locked = cqrs_rows_count(rows);
        cqrs_rows_free(rows);
        if (e == CQRS_ERR_OK && locked != 1) /* deleted meanwhile (expired): nothing was locked */
            return cqrs_error_set(err, CQRS_ERR_RETRY, "idempotency key deleted under us");
        return e;
    }
    return cqrs_error_set(err, CQRS_ERR_RETRY, "idempotency key changed under us");
}

static cqrs_err_t store_response(cqrs_tx_t *tx, cqrs_command_t *cmd, cqrs_error_t *err)
{
    char status[8], etag[32];
    snprintf(status, sizeof status, "%u", cmd->status);
    json_t *h = json_object();
    if (cmd->etag_version > 0) {
        snprintf(etag, sizeof etag, "\"%lld\"", (long long)cmd->etag_version);
        json_object_set_new(h, "ETag", json_string(etag));
    }
    if (cmd->location[0])
        json_object_set_new(h, "Location", json_string(cmd->location));
    char *headers = json_dumps(h, JSON_COMPACT);
    json_decref(h);
    char *body = cmd->reply ? json_dumps(cmd->reply, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    const char *p[] = {cmd->scope, cmd->key, status, headers, body};
    cqrs_err_t e = cqrs_tx_exec(tx,
                                "UPDATE idempotency_keys SET status = $3, headers = $4::jsonb,"
                                " body = $5 WHERE scope = $1 AND key = $2",
                                5, p, NULL, err);
    free(headers);
    free(body);
    return e;
}

static cqrs_err_t run_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    run_ctx_t *rc = ud;
    cqrs_command_t *cmd = rc->cmd;
    /* A retried attempt starts from scratch. */
    json_decref(cmd->reply);
    cmd->reply = NULL;
    cmd->status = 0;
    cmd->replay = 0;
    free(cmd->stored_body);
    free(cmd->stored_headers);
    cmd->stored_body = cmd->stored_headers = NULL;
    cqrs_err_t e;
    if (cmd->has_key) {
        e = claim_key(tx, rc, err);
        if (e != CQRS_ERR_OK || cmd->replay)
            return e;
        e = cqrs_tx_exec(tx, "SAVEPOINT cmd", 0, NULL, NULL, err);
        if (e != CQRS_ERR_OK)
            return e;
    }
    e = rc->fn(tx, cmd, rc->ud, err);
    if (e != CQRS_ERR_OK)
        return e;
    if (cmd->status == 0)
        return cqrs_error_set(err, CQRS_ERR_INTERNAL, "command produced no reply");
    if (cmd->status >= 400) {
        if (!cmd->has_key)
            return BUSINESS_REPLY;
        e = cqrs_tx_exec(tx, "ROLLBACK TO SAVEPOINT cmd", 0, NULL, NULL, err);
        if (e != CQRS_ERR_OK)
            return e;
    }
    e = cmd->has_key ? store_response(tx, cmd, err) : CQRS_ERR_OK;
    if (e == CQRS_ERR_OK && CQRS_FAILPOINT("command-before-commit"))
        return cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "failpoint command-before-commit");
    return e;
}

static void reply_now(cqrs_command_t *cmd)
{
    cqrs_http_request_t *req = cmd->req;
    if (cmd->etag_version > 0) {
        char etag[32];
        snprintf(etag, sizeof etag, "\"%lld\"", (long long)cmd->etag_version);
        cqrs_http_add_header(req, "ETag", etag);
    }
    if (cmd->location[0])
        cqrs_http_add_header(req, "Location", cmd->location);
    json_t *body = cmd->reply;
    cmd->reply = NULL;
    if (cmd->status >= 400) {
        char *text = json_dumps(body, JSON_COMPACT | JSON_PRESERVE_ORDER);
        json_decref(body);
        cqrs_http_reply_text(req, cmd->status, "application/problem+json", text ? text : "{}");
        free(text);
    } else {
        cqrs_http_reply_json(req, cmd->status, body);
    }
}

static void replay_stored(cqrs_command_t *cmd)
{
    cqrs_http_request_t *req = cmd->req;
    json_t *h = cmd->stored_headers ? json_loads(cmd->stored_headers, 0, NULL) : NULL;
    const char *name;
    json_t *v;
    json_object_foreach(h, name, v)
    {
        if (json_is_string(v))
            cqrs_http_add_header(req, name, json_string_value(v));
    }
    json_decref(h);
    cqrs_http_add_header(req, "Idempotent-Replayed", "true");
    cqrs_http_reply_text(req, cmd->stored_status,
                         cmd->stored_status >= 400 ? "application/problem+json"
                                                   : "application/json",
                         cmd->stored_body ? cmd->stored_body : "");
}

void cqrs_command_execute(cqrs_command_t *cmd, cqrs_store_t *store,
                          const cqrs_command_config_t *cfg, cqrs_command_fn fn, void *ud)
{
    run_ctx_t rc = {cmd, cfg, fn, ud};
    cqrs_error_t err;
    cqrs_error_clear(&err);
    cqrs_err_t e = cqrs_store_run_tx(store, run_tx, &rc, &err);
    if (e == CQRS_ERR_OK)
        CQRS_FAILPOINT("command-after-commit");
    /* Negative control of the fault suite (failpoint builds only): a success that was never
     * committed. */
    if (e != CQRS_ERR_OK && e != BUSINESS_REPLY && cmd->status > 0 && cmd->status < 300 &&
        !cmd->replay && CQRS_UNSAFE("ACK_UNCOMMITTED"))
        e = CQRS_ERR_OK;
    if (e == BUSINESS_REPLY || (e == CQRS_ERR_OK && !cmd->replay)) {
        reply_now(cmd);
        return;
    }
    if (e == CQRS_ERR_OK && cmd->replay == 1) {
        replay_stored(cmd);
        return;
    }
    if (e == CQRS_ERR_OK && cmd->replay == 2) {
        cqrs_http_reply_problem(cmd->req, 422, "idempotency-key-reused", "Unprocessable Content",
                                "this Idempotency-Key was used with another request body", NULL,
                                NULL);
        return;
    }
    if (e == CQRS_ERR_RETRY && cmd->has_key) {
        /* Still locked by its twin after every retry. */
        cqrs_http_reply_problem(cmd->req, 409, "idempotency-key-in-flight", "Conflict",
                                "a request with this Idempotency-Key is still being processed",
                                NULL, NULL);
        return;
    }
    if (e == CQRS_ERR_RETRY) {
        cqrs_http_add_header(cmd->req, "Retry-After", "1");
        cqrs_http_reply_problem(cmd->req, 503, "contention", "Service Unavailable",
                                "the command kept colliding with others; retry", NULL, NULL);
        return;
    }
    cqrs_http_reply_error(cmd->req, &err);
}
