/* product.c — Product commands: validation, rules, rows + events in one transaction.
 *
 * Invariant: a product row's version equals the number of its events; each command bumps
 * both in the same transaction (events_aggregate_version_key backs it up).
 */
#include <cqrs/log.h>
#include <cqrs/outbox.h>
#include <cqrs/util.h>
#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include "command.h"

void product_limits_default(product_limits_t *l)
{
    l->sku_max = 64;
    l->name_max = 200;
    l->description_max = 4000;
    l->category_max = 64;
    l->price_max = 1000000000;
    l->stock_max = 1000000000;
}

static bool sku_chars_ok(const char *s)
{
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '.' && *s != '_' && *s != '-')
            return false;
    return true;
}

static bool currency_ok(const char *s)
{
    return strlen(s) == 3 && isupper((unsigned char)s[0]) && isupper((unsigned char)s[1]) &&
           isupper((unsigned char)s[2]);
}

static const char *const SERVER_OWNED[] = {"id",         "version",    "stock",      "status",
                                           "units_sold", "created_at", "updated_at", NULL};

bool product_validate_create(const json_t *body, const product_limits_t *l,
                             create_product_input_t *in, cqrs_violations_t *v)
{
    static const char *const allowed[] = {"sku",         "name",     "description",   "category",
                                          "price_cents", "currency", "initial_stock", NULL};
    memset(in, 0, sizeof *in);
    cqrs_v_only(v, body, allowed, SERVER_OWNED);
    in->sku = cqrs_v_string(v, body, "sku", true, 1, l->sku_max);
    if (in->sku && !sku_chars_ok(in->sku)) {
        cqrs_violation_add(v, 422, "sku", "may contain only letters, digits, '.', '_' and '-'");
        in->sku = NULL;
    }
    in->name = cqrs_v_string(v, body, "name", true, 1, l->name_max);
    in->description = cqrs_v_string(v, body, "description", false, 0, l->description_max);
    if (!in->description)
        in->description = "";
    in->category = cqrs_v_string(v, body, "category", true, 1, l->category_max);
    in->currency = cqrs_v_string(v, body, "currency", true, 3, 3);
    if (in->currency && !currency_ok(in->currency)) {
        cqrs_violation_add(v, 422, "currency", "must be 3 upper-case letters (ISO 4217)");
        in->currency = NULL;
    }
    cqrs_v_int(v, body, "price_cents", true, 0, l->price_max, &in->price_cents);
    cqrs_v_int(v, body, "initial_stock", true, 0, l->stock_max, &in->initial_stock);
    return v->status == 0;
}

json_t *product_created_data(const char *id, const create_product_input_t *in)
{
    return json_pack("{s:s, s:s, s:s, s:s, s:s, s:I, s:s, s:I}", "product_id", id, "sku", in->sku,
                     "name", in->name, "description", in->description, "category", in->category,
                     "price_cents", (json_int_t)in->price_cents, "currency", in->currency,
                     "initial_stock", (json_int_t)in->initial_stock);
}

void command_reply_bad_json(cqrs_http_request_t *req, const cqrs_error_t *err)
{
    cqrs_http_reply_problem(req, 400, "malformed-request", "Bad Request", err->message, NULL, NULL);
}

void command_reply_violations(cqrs_http_request_t *req, cqrs_violations_t *v)
{
    json_t *errors = v->errors;
    v->errors = NULL;
    if (v->status == 400)
        cqrs_http_reply_problem(req, 400, "malformed-request", "Bad Request",
                                "the request body does not have the required shape", errors, NULL);
    else
        cqrs_http_reply_problem(req, 422, "validation-failed", "Unprocessable Content",
                                "one or more fields are invalid", errors, NULL);
}

typedef struct create_tx {
    const command_ctx_t *ctx;
    const create_product_input_t *in;
    const char *traceparent;
    char id[CQRS_UUID_LEN + 1];
    char time[CQRS_TIME_LEN + 1];
} create_tx_t;

static cqrs_err_t create_product_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    create_tx_t *c = ud;
    char price[24], stock[24];
    snprintf(price, sizeof price, "%lld", (long long)c->in->price_cents);
    snprintf(stock, sizeof stock, "%lld", (long long)c->in->initial_stock);
    cqrs_event_t ev;
    cqrs_event_init(&ev, "product.created.v1", "product", c->id, 1,
                    product_created_data(c->id, c->in), c->traceparent);
    /* Row and event share one timestamp so a rebuild from events gives the same document. */
    memcpy(c->time, ev.time, sizeof c->time);
    const char *p[] = {c->id,           c->in->sku, c->in->name,     c->in->description,
                       c->in->category, price,      c->in->currency, stock,
                       ev.time};
    cqrs_err_t rc = cqrs_tx_exec(tx,
                                 "INSERT INTO products(id, sku, name, description, category,"
                                 " price_cents, currency, stock, status, units_sold, version,"
                                 " created_at, updated_at)"
                                 " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'active', 0, 1, $9, $9)",
                                 9, p, NULL, err);
    if (rc == CQRS_ERR_OK)
        rc = cqrs_outbox_append(tx, &ev, c->ctx->product_topic, err);
    cqrs_event_close(&ev);
    return rc;
}

void product_create_handler(cqrs_http_request_t *req, void *ud)
{
    command_ctx_t *ctx = ud;
    size_t len;
    const char *body = cqrs_http_body(req, &len);
    cqrs_error_t err;
    json_t *doc = cqrs_json_parse_object(body, len, ctx->max_json_depth, &err);
    if (!doc) {
        command_reply_bad_json(req, &err);
        return;
    }
    cqrs_violations_t v;
    cqrs_violations_init(&v);
    create_product_input_t in;
    if (!product_validate_create(doc, &ctx->limits, &in, &v)) {
        command_reply_violations(req, &v);
        goto out;
    }
    create_tx_t c = {.ctx = ctx, .in = &in, .traceparent = cqrs_http_traceparent(req)};
    cqrs_uuid_v4(c.id);
    cqrs_err_t rc = cqrs_store_run_tx(ctx->store, create_product_tx, &c, &err);
    if (rc == CQRS_ERR_CONFLICT && strcmp(err.where, "products_sku_key") == 0) {
        char detail[160];
        snprintf(detail, sizeof detail, "a product with sku '%s' already exists", in.sku);
        cqrs_http_reply_problem(req, 409, "duplicate-sku", "Conflict", detail, NULL, NULL);
        goto out;
    }
    if (rc != CQRS_ERR_OK) {
        cqrs_http_reply_error(req, &err);
        goto out;
    }
    char location[64];
    snprintf(location, sizeof location, "/v1/products/%s", c.id);
    cqrs_http_add_header(req, "Location", location);
    cqrs_http_add_header(req, "ETag", "\"1\"");
    CQRS_LOG_INFO("product created", "request_id", cqrs_http_request_id(req), "aggregate_id", c.id,
                  "traceparent", c.traceparent);
    cqrs_http_reply_json(req, 201,
                         json_pack("{s:s, s:i, s:s, s:s, s:s, s:s, s:I, s:s, s:I, s:s, s:s, s:s}",
                                   "id", c.id, "version", 1, "sku", in.sku, "name", in.name,
                                   "description", in.description, "category", in.category,
                                   "price_cents", (json_int_t)in.price_cents, "currency",
                                   in.currency, "stock", (json_int_t)in.initial_stock, "status",
                                   "active", "created_at", c.time, "updated_at", c.time));
out:
    cqrs_violations_close(&v);
    json_decref(doc);
}
