/* order.c — Order commands: validation, then one transaction that locks the rows, asks the
 * decision (decide.c: the rules, the money) and writes what it returns.
 *
 * PlaceOrder reserves stock on every product of the order, all or nothing. Deadlock freedom:
 * every transaction that locks several products locks them in one statement ordered by id
 * (SELECT … ORDER BY id FOR UPDATE), CancelOrder locks its order first and then its products
 * the same way, and no transaction locks an existing order after a product. Oversell is
 * impossible: stock is checked after the rows are locked, and the CHECK (stock >= 0)
 * constraint backs it up.
 *
 * Money and counts never wrap: decide.c checks every sum and product before anything is
 * written.
 */
#include <cqrs/log.h>
#include <cqrs/outbox.h>
#include <cqrs/util.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "command.h"

#define TS(col) "to_char(" col " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"

/* ---- validation (pure) ------------------------------------------------------------------- */

static int line_cmp(const void *a, const void *b)
{
    return strcmp(((const order_line_input_t *)a)->product_id,
                  ((const order_line_input_t *)b)->product_id);
}

bool order_validate_place(const json_t *body, const domain_limits_t *l, place_order_input_t *in,
                          cqrs_violations_t *v)
{
    static const char *const allowed[] = {"customer_id", "items", NULL};
    static const char *const owned[] = {"id",       "status",    "version",      "total_cents",
                                        "currency", "placed_at", "cancelled_at", NULL};
    static const char *const line_allowed[] = {"product_id", "quantity", NULL};
    static const char *const line_owned[] = {"sku", "name", "unit_price_cents", "line_total_cents",
                                             NULL};
    memset(in, 0, sizeof *in);
    cqrs_v_only(v, body, allowed, owned);
    const char *customer = cqrs_v_string(v, body, "customer_id", true, 36, 36);
    if (customer && !cqrs_uuid_valid(customer))
        cqrs_violation_add(v, 422, "customer_id", "must be a UUID");
    else if (customer)
        for (int i = 0; i <= CQRS_UUID_LEN; i++)
            in->customer_id[i] = (char)tolower((unsigned char)customer[i]);

    const json_t *items = json_object_get(body, "items");
    if (!items) {
        cqrs_violation_add(v, 400, "items", "is required");
        return false;
    }
    if (json_is_null(items)) {
        cqrs_violation_add(v, 422, "items", "must not be null");
        return false;
    }
    if (!json_is_array(items)) {
        cqrs_violation_add(v, 400, "items", "must be an array");
        return false;
    }
    size_t n = json_array_size(items);
    size_t max =
        (size_t)l->order_lines_max < ORDER_LINES_CAP ? (size_t)l->order_lines_max : ORDER_LINES_CAP;
    if (n < 1 || n > max) {
        cqrs_violation_add(v, 422, "items", "must have 1 to %zu lines", max);
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        const json_t *it = json_array_get(items, i);
        snprintf(v->prefix, sizeof v->prefix, "items[%zu]", i);
        if (!json_is_object(it)) {
            cqrs_violation_add(v, json_is_null(it) ? 422 : 400, "", "must be an object");
            continue;
        }
        snprintf(v->prefix, sizeof v->prefix, "items[%zu].", i);
        cqrs_v_only(v, it, line_allowed, line_owned);
        const char *pid = cqrs_v_string(v, it, "product_id", true, 36, 36);
        if (pid && !cqrs_uuid_valid(pid)) {
            cqrs_violation_add(v, 422, "product_id", "must be a UUID");
            pid = NULL;
        }
        order_line_input_t *line = &in->lines[in->n];
        if (cqrs_v_int(v, it, "quantity", true, 1, l->quantity_max, &line->quantity) && pid) {
            for (int k = 0; k <= CQRS_UUID_LEN; k++)
                line->product_id[k] = (char)tolower((unsigned char)pid[k]);
            line->index = i;
            in->n++;
        }
    }
    v->prefix[0] = '\0';
    if (v->status != 0)
        return false;
    qsort(in->lines, in->n, sizeof in->lines[0], line_cmp);
    for (size_t i = 1; i < in->n; i++) {
        if (strcmp(in->lines[i].product_id, in->lines[i - 1].product_id) == 0) {
            char field[48];
            snprintf(field, sizeof field, "items[%zu].product_id", in->lines[i].index);
            cqrs_violation_add(v, 422, field, "the product appears more than once in the order");
        }
    }
    return v->status == 0;
}

/* ---- helpers ----------------------------------------------------------------------------- */

static json_t *order_json(const char *id, const char *customer_id, const char *status,
                          json_t *items, int64_t total, const char *currency, int64_t version,
                          const char *placed_at, const char *cancelled_at)
{
    return json_pack("{s:s, s:s, s:s, s:o, s:I, s:s, s:I, s:s, s:s?}", "id", id, "customer_id",
                     customer_id, "status", status, "items", items, "total_cents",
                     (json_int_t)total, "currency", currency, "version", (json_int_t)version,
                     "placed_at", placed_at, "cancelled_at", cancelled_at);
}

static char *uuid_array(const order_line_input_t *lines, size_t n)
{
    char *s = malloc(n * (CQRS_UUID_LEN + 1) + 3);
    if (!s)
        return NULL;
    size_t used = 0;
    s[used++] = '{';
    for (size_t i = 0; i < n; i++) {
        if (i)
            s[used++] = ',';
        memcpy(s + used, lines[i].product_id, CQRS_UUID_LEN);
        used += CQRS_UUID_LEN;
    }
    s[used++] = '}';
    s[used] = '\0';
    return s;
}

/* ---- PlaceOrder -------------------------------------------------------------------------- */

typedef struct place_ud {
    const command_ctx_t *ctx;
    const place_order_input_t *in;
} place_ud_t;

enum { OL_ID, OL_SKU, OL_NAME, OL_PRICE, OL_CURRENCY, OL_STOCK, OL_STATUS, OL_VERSION, OL_SOLD };

static cqrs_err_t place_tx(cqrs_tx_t *tx, cqrs_command_t *cmd, void *ud, cqrs_error_t *err)
{
    place_ud_t *pu = ud;
    const place_order_input_t *in = pu->in;
    cqrs_rows_t *rows = NULL;
    json_t *lines = NULL;
    product_state_t *products = NULL;
    decision_t d = {0};
    char *ids = uuid_array(in->lines, in->n);
    if (!ids)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    const char *p1[] = {ids};
    cqrs_err_t rc = cqrs_tx_exec(tx,
                                 "SELECT id, sku, name, price_cents, currency, stock, status,"
                                 " version, units_sold FROM products WHERE id = ANY($1::uuid[])"
                                 " ORDER BY id FOR UPDATE",
                                 1, p1, &rows, err);
    free(ids);
    if (rc != CQRS_ERR_OK)
        return rc;

    int nrows = cqrs_rows_count(rows);
    products = calloc((size_t)nrows + 1, sizeof *products);
    if (!products) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (int r = 0; r < nrows; r++)
        products[r] = (product_state_t){.id = cqrs_rows_get(rows, r, OL_ID),
                                        .sku = cqrs_rows_get(rows, r, OL_SKU),
                                        .name = cqrs_rows_get(rows, r, OL_NAME),
                                        .currency = cqrs_rows_get(rows, r, OL_CURRENCY),
                                        .status = cqrs_rows_get(rows, r, OL_STATUS),
                                        .price_cents = rows_int(rows, r, OL_PRICE),
                                        .stock = rows_int(rows, r, OL_STOCK),
                                        .units_sold = rows_int(rows, r, OL_SOLD),
                                        .version = rows_int(rows, r, OL_VERSION)};
    char order_id[CQRS_UUID_LEN + 1];
    cqrs_uuid_v4(order_id);
    if (!decide_place_order(order_id, in, products, (size_t)nrows, &d)) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    if (d.status != 0) {
        command_problem(cmd, &d);
        goto out;
    }

    /* Writes: order, lines, stock, in one statement (the lines are OrderPlaced's items, in
     * request order); then the events in one more. */
    const json_t *placed = d.events[0].data;
    const json_t *items = json_object_get(placed, "items");
    const char *currency = json_string_value(json_object_get(placed, "currency"));
    int64_t total = json_integer_value(json_object_get(placed, "total_cents"));
    lines = json_deep_copy(items);
    for (size_t i = 0; lines && i < json_array_size(lines); i++)
        json_object_set_new(json_array_get(lines, i), "line_no", json_integer((json_int_t)i + 1));
    char *lines_text = lines ? json_dumps(lines, JSON_COMPACT) : NULL;
    if (!lines_text) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    char total_s[24];
    snprintf(total_s, sizeof total_s, "%lld", (long long)total);
    const char *p2[] = {order_id, in->customer_id, total_s, currency, cmd->time, lines_text};
    rc = cqrs_tx_exec(
        tx,
        "WITH o AS (INSERT INTO orders(id, customer_id, status, total_cents, currency, version,"
        "           placed_at) VALUES ($1, $2, 'placed', $3, $4, 1, $5))"
        ", l AS (INSERT INTO order_lines(order_id, line_no, product_id, sku, name,"
        "        unit_price_cents, quantity, line_total_cents)"
        "        SELECT $1::uuid, x.line_no, x.product_id, x.sku, x.name, x.unit_price_cents,"
        "               x.quantity, x.line_total_cents"
        "          FROM jsonb_to_recordset($6::jsonb) AS x(line_no int, product_id uuid, sku text,"
        "               name text, unit_price_cents bigint, quantity bigint,"
        "               line_total_cents bigint))"
        "UPDATE products p SET stock = p.stock - x.quantity,"
        "       units_sold = p.units_sold + x.quantity, version = p.version + 1, updated_at = $5"
        "  FROM jsonb_to_recordset($6::jsonb) AS x(product_id uuid, quantity bigint)"
        " WHERE p.id = x.product_id",
        6, p2, NULL, err);
    free(lines_text);
    if (rc == CQRS_ERR_OK)
        rc = command_record(tx, cmd, pu->ctx, &d, err);
    if (rc == CQRS_ERR_OK) {
        char location[64];
        snprintf(location, sizeof location, "/v1/orders/%s", order_id);
        cqrs_command_reply(cmd, 201,
                           order_json(order_id, in->customer_id, "placed", json_deep_copy(items),
                                      total, currency, 1, cmd->time, NULL),
                           1, location);
    }
out:
    decision_close(&d);
    free(products);
    json_decref(lines);
    cqrs_rows_free(rows);
    return rc;
}

void order_place_handler(cqrs_http_request_t *req, void *ud)
{
    command_ctx_t *ctx = ud;
    cqrs_command_t cmd;
    if (!cqrs_command_begin(&cmd, req, CQRS_CMD_BODY, &ctx->cmd)) {
        cqrs_command_end(&cmd);
        return;
    }
    cqrs_violations_t v;
    cqrs_violations_init(&v);
    place_order_input_t *in = malloc(sizeof *in);
    if (!in) {
        cqrs_http_reply_problem(req, 500, "internal", "Internal Server Error", "out of memory",
                                NULL, NULL);
    } else if (!order_validate_place(cmd.body, &ctx->limits, in, &v)) {
        command_reply_violations(req, &v);
    } else {
        place_ud_t pu = {ctx, in};
        cqrs_command_execute(&cmd, ctx->store, &ctx->cmd, place_tx, &pu);
    }
    free(in);
    cqrs_violations_close(&v);
    cqrs_command_end(&cmd);
}

/* ---- CancelOrder ------------------------------------------------------------------------- */

typedef struct cancel_ud {
    const command_ctx_t *ctx;
    char id[CQRS_UUID_LEN + 1];
} cancel_ud_t;

enum {
    CL_PRODUCT,
    CL_QUANTITY,
    CL_STOCK,
    CL_VERSION,
    CL_LINE_NO,
    CL_SKU,
    CL_NAME,
    CL_PRICE,
    CL_TOTAL
};

static cqrs_err_t cancel_tx(cqrs_tx_t *tx, cqrs_command_t *cmd, void *ud, cqrs_error_t *err)
{
    cancel_ud_t *cu = ud;
    cqrs_rows_t *ord = NULL, *lines = NULL;
    order_line_state_t *ls = NULL;
    decision_t d = {0};
    const char *p[] = {cu->id, cmd->time};
    cqrs_err_t rc = cqrs_tx_exec(tx,
                                 "SELECT customer_id, status, total_cents, currency, version, " TS(
                                     "placed_at") " FROM orders WHERE id = $1 FOR UPDATE",
                                 1, p, &ord, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    if (cqrs_rows_count(ord) == 0) {
        cqrs_command_problem(cmd, 404, "not-found", "Not Found", "no order with this id", NULL);
        goto out;
    }
    order_state_t order = {cu->id, cqrs_rows_get(ord, 0, 1), rows_int(ord, 0, 4)};
    if (!cqrs_command_check_version(cmd, order.version))
        goto out;
    /* Lock the order's products in id order (the same order PlaceOrder uses). */
    rc = cqrs_tx_exec(tx,
                      "SELECT l.product_id, l.quantity, p.stock, p.version, l.line_no, l.sku,"
                      " l.name, l.unit_price_cents, l.line_total_cents"
                      "  FROM order_lines l JOIN products p ON p.id = l.product_id"
                      " WHERE l.order_id = $1 ORDER BY l.product_id FOR UPDATE OF p",
                      1, p, &lines, err);
    if (rc != CQRS_ERR_OK)
        goto out;
    int n = cqrs_rows_count(lines);
    ls = calloc((size_t)n + 1, sizeof *ls);
    if (!ls) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++)
        ls[i] = (order_line_state_t){cqrs_rows_get(lines, i, CL_PRODUCT),
                                     rows_int(lines, i, CL_QUANTITY), rows_int(lines, i, CL_STOCK),
                                     rows_int(lines, i, CL_VERSION)};
    if (!decide_cancel_order(&order, ls, (size_t)n, &cu->ctx->limits, &d)) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    if (d.status != 0) {
        command_problem(cmd, &d);
        goto out;
    }
    /* units_sold - quantity stays >= 0: this order's reservation added that quantity (and
     * CHECK (units_sold >= 0) backs it up); stock + quantity was decided within its maximum. */
    rc = cqrs_tx_exec(tx,
                      "WITH p AS (UPDATE products p SET stock = p.stock + l.quantity,"
                      "   units_sold = p.units_sold - l.quantity, version = p.version + 1,"
                      "   updated_at = $2 FROM order_lines l"
                      "   WHERE l.order_id = $1 AND p.id = l.product_id)"
                      "UPDATE orders SET status = 'cancelled', cancelled_at = $2,"
                      " version = version + 1 WHERE id = $1",
                      2, p, NULL, err);
    if (rc == CQRS_ERR_OK)
        rc = command_record(tx, cmd, cu->ctx, &d, err);
    if (rc != CQRS_ERR_OK)
        goto out;
    json_t *items = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(items, json_null());
    for (int i = 0; i < n; i++)
        json_array_set_new(items, (size_t)(rows_int(lines, i, CL_LINE_NO) - 1),
                           json_pack("{s:s, s:s, s:s, s:I, s:I, s:I}", "product_id",
                                     ls[i].product_id, "sku", cqrs_rows_get(lines, i, CL_SKU),
                                     "name", cqrs_rows_get(lines, i, CL_NAME), "unit_price_cents",
                                     (json_int_t)rows_int(lines, i, CL_PRICE), "quantity",
                                     (json_int_t)ls[i].quantity, "line_total_cents",
                                     (json_int_t)rows_int(lines, i, CL_TOTAL)));
    cqrs_command_reply(cmd, 200,
                       order_json(cu->id, cqrs_rows_get(ord, 0, 0), "cancelled", items,
                                  rows_int(ord, 0, 2), cqrs_rows_get(ord, 0, 3), order.version + 1,
                                  cqrs_rows_get(ord, 0, 5), cmd->time),
                       order.version + 1, NULL);
out:
    decision_close(&d);
    free(ls);
    cqrs_rows_free(ord);
    cqrs_rows_free(lines);
    return rc;
}

void order_cancel_handler(cqrs_http_request_t *req, void *ud)
{
    command_ctx_t *ctx = ud;
    cancel_ud_t cu = {.ctx = ctx};
    if (!command_path_id(req, cu.id))
        return;
    cqrs_command_t cmd;
    if (cqrs_command_begin(&cmd, req, CQRS_CMD_NO_BODY | CQRS_CMD_IF_MATCH, &ctx->cmd)) {
        cqrs_violations_t v;
        cqrs_violations_init(&v);
        if (validate_empty(cmd.body, &v))
            cqrs_command_execute(&cmd, ctx->store, &ctx->cmd, cancel_tx, &cu);
        else
            command_reply_violations(req, &v);
        cqrs_violations_close(&v);
    }
    cqrs_command_end(&cmd);
}
