/* routes.c — the query API (README "API"; schemas/openapi/query-api.yaml): answers from Redis
 * only. */
#include <cqrs/util.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "query.h"

struct unknown_params {
    const char *const *allowed;
    char first_unknown[64];
};

static void check_param(const char *key, const char *value, void *ud)
{
    struct unknown_params *u = ud;
    if ((value && !cqrs_utf8_valid(value)) || !cqrs_utf8_valid(key)) {
        if (!u->first_unknown[0])
            snprintf(u->first_unknown, sizeof u->first_unknown, "(invalid UTF-8)");
        return;
    }
    for (const char *const *a = u->allowed; *a; a++)
        if (strcmp(*a, key) == 0)
            return;
    if (!u->first_unknown[0])
        snprintf(u->first_unknown, sizeof u->first_unknown, "%s", key);
}

bool query_only_params(cqrs_http_request_t *req, const char *const *allowed)
{
    struct unknown_params u = {allowed, ""};
    cqrs_http_query_each(req, check_param, &u);
    if (!u.first_unknown[0])
        return true;
    char detail[128];
    snprintf(detail, sizeof detail, "unknown query parameter '%.60s'", u.first_unknown);
    cqrs_http_reply_problem(req, 400, "malformed-request", "Bad Request", detail, NULL, NULL);
    return false;
}

bool query_path_id(cqrs_http_request_t *req, char out[CQRS_UUID_LEN + 1])
{
    const char *raw = cqrs_http_param(req, "id");
    if (!cqrs_uuid_valid(raw)) {
        cqrs_http_reply_problem(req, 400, "malformed-request", "Bad Request",
                                "the id in the path must be a UUID", NULL, NULL);
        return false;
    }
    for (size_t i = 0; i <= CQRS_UUID_LEN; i++)
        out[i] = (char)tolower((unsigned char)raw[i]);
    return true;
}

cqrs_err_t query_read_doc(query_ctx_t *ctx, const char *aggregate_type, const char *id,
                          const char *name, int64_t min_version, char **json, int64_t *version,
                          cqrs_error_t *err)
{
    if (ctx->cache && cqrs_doccache_get(ctx->cache, name, min_version, json, version))
        return CQRS_ERR_OK;
    cqrs_doccache_ticket_t t = {0};
    if (ctx->cache)
        t = cqrs_doccache_ticket(ctx->cache, name);
    cqrs_docstore_t *ds = cqrs_docstore_pool_acquire(ctx->pool, ctx->acquire_timeout_ms);
    if (!ds)
        return cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "no free Redis connection");
    /* The key in the generation readers follow now: a rebuild's switch moves it. */
    char key[CQRS_KEY_MAX];
    cqrs_err_t rc = query_doc_key(ds, aggregate_type, id, key, sizeof key, err);
    if (rc == CQRS_ERR_OK)
        rc = cqrs_docstore_get(ds, key, json, version, err);
    cqrs_docstore_pool_release(ctx->pool, ds);
    if (rc == CQRS_ERR_OK && ctx->cache)
        cqrs_doccache_put(ctx->cache, name, t, *version, *json, strlen(*json));
    return rc;
}

/* One read of a document, possibly waiting (read-your-writes) across suspensions. */
typedef struct doc_read {
    query_ctx_t *ctx;
    const char *type;
    char id[CQRS_UUID_LEN + 1];
    char key[CQRS_KEY_MAX]; /* the document's name (keyspace.h): what waits are keyed by */
    int64_t min_version;
    int64_t deadline_ms;
    bool parked; /* a wait is registered with the hub */
    cqrs_http_request_t *req;
} doc_read_t;

static void doc_read_free(void *ud)
{
    doc_read_t *r = ud;
    if (r->parked) /* the hub must never wake a finished request */
        cqrs_waiters_cancel(r->ctx->waiters, r->key, r->req);
    free(r);
}

static void reply_doc(cqrs_http_request_t *req, const char *json, int64_t version)
{
    char etag[32];
    snprintf(etag, sizeof etag, "\"%lld\"", (long long)version);
    cqrs_http_add_header(req, "ETag", etag);
    const char *inm = cqrs_http_header(req, "If-None-Match");
    if (inm && (strcmp(inm, etag) == 0 || strcmp(inm, "*") == 0)) {
        cqrs_http_reply_json(req, 304, NULL);
        return;
    }
    /* The stored text is already the compact document; send it as is. */
    cqrs_http_reply_text(req, 200, "application/json", json);
}

static void doc_read_step(cqrs_http_request_t *req, void *ud)
{
    doc_read_t *r = ud;
    query_ctx_t *ctx = r->ctx;
    if (r->parked) { /* woken: by the hub (which forgot the wait) or by a shutdown */
        cqrs_waiters_cancel(ctx->waiters, r->key, req);
        r->parked = false;
    }
    for (int pass = 0;; pass++) {
        char *json = NULL;
        int64_t version = 0;
        cqrs_error_t err;
        cqrs_err_t rc =
            query_read_doc(ctx, r->type, r->id, r->key, r->min_version, &json, &version, &err);
        bool reached = rc == CQRS_ERR_OK && version >= r->min_version;
        if (rc == CQRS_ERR_NOT_FOUND && r->min_version <= 0) {
            cqrs_http_reply_problem(req, 404, "not-found", "Not Found",
                                    strcmp(r->type, "order") == 0 ? "no order with this id"
                                                                  : "no product with this id",
                                    NULL, NULL);
            return;
        }
        if (reached || (rc != CQRS_ERR_OK && rc != CQRS_ERR_NOT_FOUND)) {
            if (r->parked)
                cqrs_waiters_cancel(ctx->waiters, r->key, req);
            if (reached)
                reply_doc(req, json, version);
            else
                cqrs_http_reply_error(req, &err);
            free(json);
            return;
        }
        free(json);
        if (pass == 1) {
            /* Parked before this second read: an announcement after it wakes the request. */
            cqrs_http_suspend(req, doc_read_step, r);
            return;
        }
        if (cqrs_http_stopping(req) || (ctx->waiters && cqrs_waiters_closed(ctx->waiters))) {
            cqrs_http_add_header(req, "Retry-After", "1");
            cqrs_http_reply_problem(req, 503, "shutting-down", "Service Unavailable",
                                    "the server is shutting down; retry on another instance", NULL,
                                    NULL);
            return;
        }
        if (!ctx->waiters || cqrs_monotonic_ms() >= r->deadline_ms) {
            char detail[160];
            snprintf(detail, sizeof detail,
                     "the document did not reach version %lld in time; retry later",
                     (long long)r->min_version);
            cqrs_http_add_header(req, "Retry-After", "1");
            cqrs_http_reply_problem(req, 503, "version-not-reached", "Service Unavailable", detail,
                                    NULL,
                                    json_pack("{s:I}", "min_version", (json_int_t)r->min_version));
            return;
        }
        if (!cqrs_waiters_wait(ctx->waiters, r->key, r->min_version, r->deadline_ms, req)) {
            cqrs_http_add_header(req, "Retry-After", "1");
            cqrs_http_reply_problem(req, 503, "overloaded", "Service Unavailable",
                                    "too many requests are waiting; retry shortly", NULL, NULL);
            return;
        }
        r->parked = true;
    }
}

/* A non-negative integer query parameter no larger than max; absent → def. false (400
 * answered) when malformed. */
static bool int_param(cqrs_http_request_t *req, const char *name, int64_t max, int64_t def,
                      int64_t *out)
{
    const char *v = cqrs_http_query(req, name);
    if (!v) {
        *out = def;
        return true;
    }
    int64_t n;
    if (!cqrs_parse_int64(v, &n) || n < 0 || n > max) {
        char detail[128];
        snprintf(detail, sizeof detail, "%s must be an integer from 0 to %lld", name,
                 (long long)max);
        cqrs_http_reply_problem(req, 400, "malformed-request", "Bad Request", detail,
                                json_pack("[{s:s,s:s}]", "field", name, "message", detail), NULL);
        return false;
    }
    *out = n;
    return true;
}

static void get_document(cqrs_http_request_t *req, query_ctx_t *ctx, const char *type)
{
    static const char *const allowed[] = {"min_version", "wait_ms", NULL};
    char id[CQRS_UUID_LEN + 1];
    int64_t min_version, wait_ms;
    if (!query_only_params(req, allowed) || !query_path_id(req, id) ||
        !int_param(req, "min_version", INT64_C(9007199254740991), 0, &min_version) ||
        !int_param(req, "wait_ms", WAIT_MAX_MS, ctx->wait_default_ms, &wait_ms))
        return;
    doc_read_t *r = calloc(1, sizeof *r);
    if (!r) {
        cqrs_error_t e;
        cqrs_error_set(&e, CQRS_ERR_NOMEM, "out of memory");
        cqrs_http_reply_error(req, &e);
        return;
    }
    r->ctx = ctx;
    r->type = type;
    snprintf(r->id, sizeof r->id, "%s", id);
    if (!query_doc_name_req(req, ctx, type, id, r->key, sizeof r->key)) {
        free(r);
        return;
    }
    r->min_version = min_version;
    r->deadline_ms = cqrs_monotonic_ms() + wait_ms;
    r->req = req;
    cqrs_http_on_close(req, doc_read_free, r);
    doc_read_step(req, r);
}

void product_get_handler(cqrs_http_request_t *req, void *ud)
{
    get_document(req, ud, "product");
}

void order_get_handler(cqrs_http_request_t *req, void *ud)
{
    get_document(req, ud, "order");
}

size_t query_routes(query_ctx_t *ctx, cqrs_http_route_t *routes, size_t cap)
{
    const cqrs_http_route_t table[] = {
        {"GET", "/v1/products/{id}", product_get_handler, ctx, "GetProduct", CQRS_SCOPE_READ},
        {"GET", "/v1/products/{id}/stream", product_stream_handler, ctx, "WatchProduct",
         CQRS_SCOPE_READ},
        {"GET", "/v1/orders/{id}", order_get_handler, ctx, "GetOrder", CQRS_SCOPE_READ},
        {"GET", "/v1/products", product_list_handler, ctx, "ListProducts", CQRS_SCOPE_READ},
        {"GET", "/v1/customers/{id}/orders", customer_orders_handler, ctx, "CustomerOrders",
         CQRS_SCOPE_READ},
        {"GET", "/v1/reports/top-products", top_products_handler, ctx, "TopProducts",
         CQRS_SCOPE_READ},
    };
    size_t n = sizeof table / sizeof table[0];
    for (size_t i = 0; i < n && i < cap; i++)
        routes[i] = table[i];
    return n < cap ? n : cap;
}
