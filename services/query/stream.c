/* stream.c — GET /v1/products/{id}/stream (README "API", Watch; schemas/openapi/query-api.yaml):
 * Server-Sent Events.
 *
 * On connect the current document (unless Last-Event-ID says the client has it), then one
 * message per change: "event: product", "id: <version>", "data: <document>". Changes close
 * together are merged (the reader sends the latest document), so the versions a client sees
 * only grow. A comment line is sent as keep-alive; a client that went away is noticed when a
 * write fails (at the latest at the next keep-alive) and its watch is ended by the close hook.
 */
#include <cqrs/util.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "query.h"

typedef struct stream {
    query_ctx_t *ctx;
    cqrs_watch_t *watch;
    char id[CQRS_UUID_LEN + 1];
    char key[CQRS_KEY_MAX]; /* the document's name (keyspace.h) */
    int64_t sent;           /* version the client has */
    bool need_read;         /* read the store at the next call */
    char *out;              /* pending bytes */
    size_t out_len, out_off;
} stream_t;

static void stream_close(void *ud)
{
    stream_t *st = ud;
    cqrs_watch_end(st->watch);
    free(st->out);
    free(st);
}

static void set_out(stream_t *st, char *text)
{
    free(st->out);
    st->out = text;
    st->out_len = text ? strlen(text) : 0;
    st->out_off = 0;
}

static long stream_read(void *ud, char *buf, size_t max)
{
    stream_t *st = ud;
    if (st->out_off == st->out_len) {
        cqrs_watch_events_t ev;
        cqrs_watch_poll(st->watch, &ev);
        if (ev.closed)
            return -1;
        if (ev.announced > st->sent || ev.reset)
            st->need_read = true;
        if (st->need_read) {
            char *json = NULL;
            int64_t version = 0;
            cqrs_error_t err;
            /* An announced version is in Redis already: never settle for an older cache entry. */
            cqrs_err_t rc =
                query_read_doc(st->ctx, "product", st->id, st->key,
                               ev.announced > st->sent ? ev.announced : 0, &json, &version, &err);
            if (rc == CQRS_ERR_OK || rc == CQRS_ERR_NOT_FOUND)
                st->need_read = false; /* else retried at the next wake (poll or keep-alive) */
            if (rc == CQRS_ERR_OK && version > st->sent) {
                size_t cap = strlen(json) + 64;
                char *msg = malloc(cap);
                if (msg) {
                    snprintf(msg, cap, "event: product\nid: %lld\ndata: %s\n\n", (long long)version,
                             json);
                    set_out(st, msg);
                    st->sent = version;
                }
            }
            free(json);
        }
        if (st->out_off == st->out_len && ev.keepalive_due)
            set_out(st, strdup(": keep-alive\n\n"));
        if (st->out_off == st->out_len)
            return 0; /* nothing now: wait for the next change */
    }
    size_t n = st->out_len - st->out_off;
    if (n > max)
        n = max;
    memcpy(buf, st->out + st->out_off, n);
    st->out_off += n;
    return (long)n;
}

void product_stream_handler(cqrs_http_request_t *req, void *ud)
{
    query_ctx_t *ctx = ud;
    static const char *const allowed[] = {NULL};
    char id[CQRS_UUID_LEN + 1];
    if (!query_only_params(req, allowed) || !query_path_id(req, id))
        return;
    /* Last-Event-ID: the version the client already has — an integer ≥ 0, as the OpenAPI
     * document says; anything else is 400, as a malformed If-Match is on the command side. */
    const char *last = cqrs_http_header(req, "Last-Event-ID");
    int64_t have = 0;
    if (last &&
        (!*last || strspn(last, "0123456789") != strlen(last) || !cqrs_parse_int64(last, &have))) {
        cqrs_http_reply_problem(req, 400, "malformed-request", "Bad Request",
                                "Last-Event-ID must be a version: an integer from 0",
                                json_pack("[{s:s,s:s}]", "field", "Last-Event-ID", "message",
                                          "must be an integer from 0"),
                                NULL);
        return;
    }
    if (!ctx->waiters) {
        cqrs_http_reply_problem(req, 503, "overloaded", "Service Unavailable",
                                "streams are not available on this instance", NULL, NULL);
        return;
    }
    stream_t *st = calloc(1, sizeof *st);
    if (!st) {
        cqrs_error_t e;
        cqrs_error_set(&e, CQRS_ERR_NOMEM, "out of memory");
        cqrs_http_reply_error(req, &e);
        return;
    }
    st->ctx = ctx;
    snprintf(st->id, sizeof st->id, "%s", id);
    if (!query_doc_name_req(req, ctx, "product", id, st->key, sizeof st->key)) {
        free(st);
        return;
    }
    st->need_read = true;
    if (have > 0)
        st->sent = have;
    st->watch = cqrs_watch_begin(ctx->waiters, st->key, req);
    if (!st->watch) {
        free(st);
        cqrs_http_add_header(req, "Retry-After", "5");
        cqrs_http_reply_problem(req, 503, "overloaded", "Service Unavailable",
                                "too many open streams; retry later", NULL, NULL);
        return;
    }
    cqrs_http_on_close(req, stream_close, st);
    cqrs_http_add_header(req, "X-Accel-Buffering", "no");
    cqrs_http_reply_stream(req, 200, "text/event-stream", stream_read, st);
}
