/* product.c — Product commands: validation, then one transaction that locks the row, asks
 * its decision (decide.c) and writes the row and the event.
 *
 * Invariant: a product row's version equals the number of its events; every command bumps
 * both in the same transaction, and events_aggregate_version_key backs it up. The row is
 * locked (FOR UPDATE) before the rules are checked, so concurrent commands on one product
 * serialize and each sees the previous one's result.
 */
#include <cqrs/log.h>
#include <cqrs/util.h>
#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include "command.h"

/* ---- validation (pure) ------------------------------------------------------------------- */

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

bool product_validate_create(const json_t *body, const domain_limits_t *l,
                             create_product_input_t *in, cqrs_violations_t *v)
{
    static const char *const allowed[] = {"sku",           "name",         "description",
                                          "category",      "price_cents",  "currency",
                                          "initial_stock", "weight_grams", NULL};
    memset(in, 0, sizeof *in);
    cqrs_v_only(v, body, allowed, SERVER_OWNED);
    in->sku = cqrs_v_string(v, body, "sku", true, 1, (size_t)l->sku_max);
    if (in->sku && !sku_chars_ok(in->sku)) {
        cqrs_violation_add(v, 422, "sku", "may contain only letters, digits, '.', '_' and '-'");
        in->sku = NULL;
    }
    in->name = cqrs_v_string(v, body, "name", true, 1, (size_t)l->name_max);
    in->description = cqrs_v_string(v, body, "description", false, 0, (size_t)l->description_max);
    if (!in->description)
        in->description = "";
    in->category = cqrs_v_string(v, body, "category", true, 1, (size_t)l->category_max);
    in->currency = cqrs_v_string(v, body, "currency", true, 3, 3);
    if (in->currency && !currency_ok(in->currency)) {
        cqrs_violation_add(v, 422, "currency", "must be 3 upper-case letters (ISO 4217)");
        in->currency = NULL;
    }
    cqrs_v_int(v, body, "price_cents", true, 0, l->price_max, &in->price_cents);
    cqrs_v_int(v, body, "initial_stock", true, 0, l->stock_max, &in->initial_stock);
    in->weight_grams = -1;
    if (json_object_get(body, "weight_grams") &&
        !json_is_null(json_object_get(body, "weight_grams")))
        cqrs_v_int(v, body, "weight_grams", false, 0, PRODUCT_WEIGHT_MAX, &in->weight_grams);
    return v->status == 0;
}

bool product_validate_update_details(const json_t *body, const domain_limits_t *l,
                                     update_details_input_t *in, cqrs_violations_t *v)
{
    static const char *const allowed[] = {"name", "description", "category", NULL};
    static const char *const owned[] = {"id",          "sku",        "version",    "stock",
                                        "status",      "units_sold", "created_at", "updated_at",
                                        "price_cents", "currency",   NULL};
    memset(in, 0, sizeof *in);
    cqrs_v_only(v, body, allowed, owned);
    in->name = cqrs_v_string(v, body, "name", false, 1, (size_t)l->name_max);
    in->description = cqrs_v_string(v, body, "description", false, 0, (size_t)l->description_max);
    in->category = cqrs_v_string(v, body, "category", false, 1, (size_t)l->category_max);
    bool any = json_object_get(body, "name") || json_object_get(body, "description") ||
               json_object_get(body, "category");
    if (!any)
        cqrs_violation_add(v, 422, "", "give at least one of name, description, category");
    return v->status == 0;
}

bool product_validate_change_price(const json_t *body, const domain_limits_t *l,
                                   int64_t *price_cents, cqrs_violations_t *v)
{
    static const char *const allowed[] = {"price_cents", NULL};
    cqrs_v_only(v, body, allowed, SERVER_OWNED);
    cqrs_v_int(v, body, "price_cents", true, 0, l->price_max, price_cents);
    return v->status == 0;
}

bool product_validate_adjust_stock(const json_t *body, const domain_limits_t *l,
                                   adjust_stock_input_t *in, cqrs_violations_t *v)
{
    static const char *const allowed[] = {"delta", "reason", NULL};
    memset(in, 0, sizeof *in);
    cqrs_v_only(v, body, allowed, SERVER_OWNED);
    if (cqrs_v_int(v, body, "delta", true, -l->stock_max, l->stock_max, &in->delta) &&
        in->delta == 0)
        cqrs_violation_add(v, 422, "delta", "must not be 0");
    in->reason = cqrs_v_string(v, body, "reason", true, 0, (size_t)l->reason_max);
    return v->status == 0;
}

/* product.created.v2's data (schemas/events/product.created.v2.json). */
json_t *product_created_data(const char *id, const create_product_input_t *in)
{
    return json_pack("{s:s, s:s, s:s, s:s, s:s, s:I, s:s, s:I, s:o}", "product_id", id, "sku",
                     in->sku, "name", in->name, "description", in->description, "category",
                     in->category, "price_cents", (json_int_t)in->price_cents, "currency",
                     in->currency, "initial_stock", (json_int_t)in->initial_stock, "weight_grams",
                     in->weight_grams < 0 ? json_null() : json_integer(in->weight_grams));
}

/* ---- transactions: load, lock, decide, write ---------------------------------------------- */

/* Locks the product; on 404/412 sets the reply and returns OK with *rows NULL. */
static cqrs_err_t lock_product(cqrs_tx_t *tx, cqrs_command_t *cmd, const char *id,
                               cqrs_rows_t **rows, cqrs_error_t *err)
{
    const char *p[] = {id};
    cqrs_err_t rc = cqrs_tx_exec(
        tx, "SELECT " PRODUCT_COLS " FROM products WHERE id = $1 FOR UPDATE", 1, p, rows, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    if (cqrs_rows_count(*rows) == 0) {
        cqrs_command_problem(cmd, 404, "not-found", "Not Found", "no product with this id", NULL);
    } else if (cqrs_command_check_version(cmd, rows_int(*rows, 0, PC_VERSION))) {
        return CQRS_ERR_OK;
    }
    cqrs_rows_free(*rows);
    *rows = NULL;
    return CQRS_ERR_OK;
}

static cqrs_err_t nomem(cqrs_error_t *err)
{
    return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
}

/* ---- CreateProduct ----------------------------------------------------------------------- */

typedef struct create_ud {
    const command_ctx_t *ctx;
    const create_product_input_t *in;
} create_ud_t;

/* Nothing to lock before the insert: the unique index on sku is the lock, and it decides
 * "sku unique" under any concurrency; its answer goes back through the decision. */
static cqrs_err_t create_tx(cqrs_tx_t *tx, cqrs_command_t *cmd, void *ud, cqrs_error_t *err)
{
    create_ud_t *c = ud;
    char id[CQRS_UUID_LEN + 1], price[24], stock[24], weight[24];
    cqrs_uuid_v4(id);
    decision_t d;
    if (!decide_create_product(id, c->in, false, &d))
        return nomem(err);
    snprintf(price, sizeof price, "%lld", (long long)c->in->price_cents);
    snprintf(stock, sizeof stock, "%lld", (long long)c->in->initial_stock);
    snprintf(weight, sizeof weight, "%lld", (long long)c->in->weight_grams);
    const char *p[] = {id,
                       c->in->sku,
                       c->in->name,
                       c->in->description,
                       c->in->category,
                       price,
                       c->in->currency,
                       stock,
                       cmd->time,
                       c->in->weight_grams < 0 ? NULL : weight};
    cqrs_rows_t *rows = NULL;
    cqrs_err_t rc =
        cqrs_tx_exec(tx,
                     "INSERT INTO products(id, sku, name, description, category,"
                     " price_cents, currency, stock, status, units_sold, version,"
                     " created_at, updated_at, weight_grams) VALUES ($1, $2, $3, $4,"
                     " $5, $6, $7, $8, 'active', 0, 1, $9, $9, $10) RETURNING " PRODUCT_COLS,
                     10, p, &rows, err);
    if (rc == CQRS_ERR_CONFLICT && strcmp(err->where, "products_sku_key") == 0) {
        decision_close(&d);
        if (!decide_create_product(id, c->in, true, &d))
            return nomem(err);
        command_problem(cmd, &d);
        rc = CQRS_ERR_OK;
        goto out;
    }
    if (rc == CQRS_ERR_OK)
        rc = command_record(tx, cmd, c->ctx, &d, err);
    if (rc == CQRS_ERR_OK) {
        char location[64];
        snprintf(location, sizeof location, "/v1/products/%s", id);
        cqrs_command_reply(cmd, 201, product_row_json(rows, 0), 1, location);
    }
out:
    decision_close(&d);
    cqrs_rows_free(rows);
    return rc;
}

void product_create_handler(cqrs_http_request_t *req, void *ud)
{
    command_ctx_t *ctx = ud;
    cqrs_command_t cmd;
    if (!cqrs_command_begin(&cmd, req, CQRS_CMD_BODY, &ctx->cmd))
        goto out;
    cqrs_violations_t v;
    cqrs_violations_init(&v);
    create_product_input_t in;
    if (!product_validate_create(cmd.body, &ctx->limits, &in, &v)) {
        command_reply_violations(req, &v);
    } else {
        create_ud_t c = {ctx, &in};
        cqrs_command_execute(&cmd, ctx->store, &ctx->cmd, create_tx, &c);
    }
    cqrs_violations_close(&v);
out:
    cqrs_command_end(&cmd);
}

/* ---- commands on an existing product ----------------------------------------------------- */

typedef enum product_op { OP_DETAILS, OP_PRICE, OP_STOCK, OP_DISCONTINUE } product_op_t;

typedef struct change_ud {
    const command_ctx_t *ctx;
    product_op_t op;
    char id[CQRS_UUID_LEN + 1];
    update_details_input_t details;
    int64_t price;
    adjust_stock_input_t stock;
} change_ud_t;

static const char *data_str(const json_t *data, const char *field)
{
    return json_string_value(json_object_get(data, field));
}

static const char *data_int(const json_t *data, const char *field, char buf[24])
{
    const json_t *v = json_object_get(data, field);
    if (!v)
        return NULL;
    snprintf(buf, 24, "%lld", (long long)json_integer_value(v));
    return buf;
}

static cqrs_err_t change_tx(cqrs_tx_t *tx, cqrs_command_t *cmd, void *ud, cqrs_error_t *err)
{
    change_ud_t *c = ud;
    cqrs_rows_t *cur = NULL, *upd = NULL;
    decision_t d = {0};
    cqrs_err_t rc = lock_product(tx, cmd, c->id, &cur, err);
    if (rc != CQRS_ERR_OK || !cur)
        return rc;
    product_state_t st;
    product_state_of(cur, 0, &st);
    bool decided = false;
    switch (c->op) {
    case OP_DETAILS:
        decided = decide_update_details(&st, &c->details, &d);
        break;
    case OP_PRICE:
        decided = decide_change_price(&st, c->price, &d);
        break;
    case OP_STOCK:
        decided = decide_adjust_stock(&st, &c->stock, &c->ctx->limits, &d);
        break;
    case OP_DISCONTINUE:
        decided = decide_discontinue(&st, &d);
        break;
    }
    if (!decided) {
        rc = nomem(err);
        goto out;
    }
    if (d.status != 0) {
        command_problem(cmd, &d);
        goto out;
    }
    /* The row takes the values its event carries (NULL: the column stays). */
    const json_t *data = d.events[0].data;
    char price[24], stock[24], version[24];
    snprintf(version, sizeof version, "%lld", (long long)d.events[0].version);
    const char *p[] = {c->id,
                       data_str(data, "name"),
                       data_str(data, "description"),
                       data_str(data, "category"),
                       data_int(data, "price_cents", price),
                       data_int(data, "stock", stock),
                       c->op == OP_DISCONTINUE ? "discontinued" : NULL,
                       version,
                       cmd->time};
    rc = cqrs_tx_exec(tx,
                      "UPDATE products SET name = coalesce($2, name),"
                      " description = coalesce($3, description),"
                      " category = coalesce($4, category),"
                      " price_cents = coalesce($5::bigint, price_cents),"
                      " stock = coalesce($6::bigint, stock), status = coalesce($7, status),"
                      " version = $8, updated_at = $9 WHERE id = $1 RETURNING " PRODUCT_COLS,
                      9, p, &upd, err);
    if (rc == CQRS_ERR_OK)
        rc = command_record(tx, cmd, c->ctx, &d, err);
    if (rc == CQRS_ERR_OK)
        cqrs_command_reply(cmd, 200, product_row_json(upd, 0), d.events[0].version, NULL);
out:
    decision_close(&d);
    cqrs_rows_free(cur);
    cqrs_rows_free(upd);
    return rc;
}

static void change_handler(cqrs_http_request_t *req, command_ctx_t *ctx, product_op_t op)
{
    change_ud_t c = {.ctx = ctx, .op = op};
    cqrs_command_t cmd;
    cqrs_violations_t v;
    cqrs_violations_init(&v);
    int flags = CQRS_CMD_IF_MATCH | (op == OP_DISCONTINUE ? CQRS_CMD_NO_BODY : CQRS_CMD_BODY);
    if (!command_path_id(req, c.id) || !cqrs_command_begin(&cmd, req, flags, &ctx->cmd)) {
        cqrs_violations_close(&v);
        return;
    }
    bool ok = false;
    switch (op) {
    case OP_DETAILS:
        ok = product_validate_update_details(cmd.body, &ctx->limits, &c.details, &v);
        break;
    case OP_PRICE:
        ok = product_validate_change_price(cmd.body, &ctx->limits, &c.price, &v);
        break;
    case OP_STOCK:
        ok = product_validate_adjust_stock(cmd.body, &ctx->limits, &c.stock, &v);
        break;
    case OP_DISCONTINUE:
        ok = validate_empty(cmd.body, &v);
        break;
    }
    if (ok)
        cqrs_command_execute(&cmd, ctx->store, &ctx->cmd, change_tx, &c);
    else
        command_reply_violations(req, &v);
    cqrs_violations_close(&v);
    cqrs_command_end(&cmd);
}

void product_update_details_handler(cqrs_http_request_t *req, void *ud)
{
    change_handler(req, ud, OP_DETAILS);
}

void product_change_price_handler(cqrs_http_request_t *req, void *ud)
{
    change_handler(req, ud, OP_PRICE);
}

void product_adjust_stock_handler(cqrs_http_request_t *req, void *ud)
{
    change_handler(req, ud, OP_STOCK);
}

void product_discontinue_handler(cqrs_http_request_t *req, void *ud)
{
    change_handler(req, ud, OP_DISCONTINUE);
}
