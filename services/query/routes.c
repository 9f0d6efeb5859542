/* routes.c — the query API (SPEC.md, "Read model"): answers from Redis only. */
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

static void get_document(cqrs_http_request_t *req, query_ctx_t *ctx, const char *type)
{
    static const char *const allowed[] = {NULL};
    char id[CQRS_UUID_LEN + 1];
    if (!query_only_params(req, allowed) || !query_path_id(req, id))
        return;
    char key[96];
    doc_key(type, id, key, sizeof key);

    cqrs_docstore_t *ds = cqrs_docstore_pool_acquire(ctx->pool, ctx->acquire_timeout_ms);
    if (!ds) {
        cqrs_error_t e;
        cqrs_error_set(&e, CQRS_ERR_UNAVAILABLE, "no free Redis connection");
        cqrs_http_reply_error(req, &e);
        return;
    }
    char *json = NULL;
    int64_t version = 0;
    cqrs_error_t err;
    cqrs_err_t rc = cqrs_docstore_get(ds, key, &json, &version, &err);
    cqrs_docstore_pool_release(ctx->pool, ds);
    if (rc == CQRS_ERR_NOT_FOUND) {
        cqrs_http_reply_problem(req, 404, "not-found", "Not Found", "no product with this id", NULL,
                                NULL);
        return;
    }
    if (rc != CQRS_ERR_OK) {
        cqrs_http_reply_error(req, &err);
        return;
    }
    char etag[32];
    snprintf(etag, sizeof etag, "\"%lld\"", (long long)version);
    cqrs_http_add_header(req, "ETag", etag);
    const char *inm = cqrs_http_header(req, "If-None-Match");
    if (inm && (strcmp(inm, etag) == 0 || strcmp(inm, "*") == 0)) {
        free(json);
        cqrs_http_reply_json(req, 304, NULL);
        return;
    }
    /* The stored text is already the compact document; send it as is. */
    cqrs_http_reply_text(req, 200, "application/json", json);
    free(json);
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
