/* order.c — Order commands.
 *
 * PlaceOrder reserves stock on every product of the order, all or nothing. Deadlock freedom:
 * every transaction that locks several products locks them in one statement ordered by id
 * (SELECT … ORDER BY id FOR UPDATE), CancelOrder locks its order first and then its products
 * the same way, and no transaction locks an existing order after a product. Oversell is
 * impossible: stock is checked after the rows are locked, and the CHECK (stock >= 0)
 * constraint backs it up.
 *
 * Money and counts never wrap: at the widest settings one line is 10^12 cents × 10^6 = 10^18
 * and ten of them pass INT64_MAX, so every sum and product of prices, quantities, stock and
 * units sold is computed with cqrs_checked_*_i64 before anything is written; an order whose
 * total cannot be represented is a 422 order-total-out-of-range, never a wrong total or a 500.
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

bool order_price(const place_order_input_t *in, const int64_t *unit_prices, int64_t *line_totals,
                 int64_t *total)
{
    int64_t sum = 0;
    for (size_t i = 0; i < in->n; i++) {
        if (!cqrs_checked_mul_i64(unit_prices[i], in->lines[i].quantity, &line_totals[i]) ||
            !cqrs_checked_add_i64(sum, line_totals[i], &sum))
            return false;
    }
    *total = sum;
    return true;
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

static void event_at(cqrs_event_t *ev, cqrs_command_t *cmd, const char *type, const char *agg_type,
                     const char *id, int64_t version, json_t *data)
{
    cqrs_event_init(ev, type, agg_type, id, version, data, cqrs_http_traceparent(cmd->req));
    memcpy(ev->time, cmd->time, sizeof ev->time);
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
    const command_ctx_t *ctx = pu->ctx;
    cqrs_rows_t *rows = NULL;
    json_t *items = NULL, *lines = NULL, *problem_items = NULL;
    cqrs_event_t *evs = NULL;
    const char **topics = NULL;
    size_t n_evs = 0;
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

    /* Rules, checked on the locked rows. Both lists are sorted by product id. */
    int nrows = cqrs_rows_count(rows);
    problem_items = json_array();
    json_t *unknown = json_array();
    const char *currency = NULL;
    bool mixed = false, inactive = false, sold_out_of_range = false;
    int r = 0;
    int *row_of = calloc(in->n, sizeof *row_of);
    int64_t *prices = calloc(in->n, sizeof *prices),
            *line_totals = calloc(in->n, sizeof *line_totals);
    int64_t total = 0;
    for (size_t i = 0; row_of && prices && line_totals && i < in->n; i++) {
        while (r < nrows && strcmp(cqrs_rows_get(rows, r, OL_ID), in->lines[i].product_id) < 0)
            r++;
        if (r >= nrows || strcmp(cqrs_rows_get(rows, r, OL_ID), in->lines[i].product_id) != 0) {
            char field[48];
            snprintf(field, sizeof field, "items[%zu].product_id", in->lines[i].index);
            json_array_append_new(unknown, json_pack("{s:s, s:s}", "field", field, "message",
                                                     "no product with this id"));
            row_of[i] = -1;
            continue;
        }
        row_of[i] = r;
        prices[i] = rows_int(rows, r, OL_PRICE);
        int64_t sold; /* only checked: the row is updated in SQL */
        if (!cqrs_checked_add_i64(rows_int(rows, r, OL_SOLD), in->lines[i].quantity, &sold))
            sold_out_of_range = true;
        if (strcmp(cqrs_rows_get(rows, r, OL_STATUS), "active") != 0)
            inactive = true;
        if (!currency)
            currency = cqrs_rows_get(rows, r, OL_CURRENCY);
        else if (strcmp(currency, cqrs_rows_get(rows, r, OL_CURRENCY)) != 0)
            mixed = true;
        int64_t stock = rows_int(rows, r, OL_STOCK);
        if (stock < in->lines[i].quantity)
            json_array_append_new(problem_items, json_pack("{s:s, s:I, s:I}", "product_id",
                                                           in->lines[i].product_id, "requested",
                                                           (json_int_t)in->lines[i].quantity,
                                                           "available", (json_int_t)stock));
    }
    if (!row_of || !prices || !line_totals) {
        json_decref(unknown);
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    if (json_array_size(unknown) > 0) {
        cqrs_command_problem(cmd, 422, "validation-failed", "Unprocessable Content",
                             "the order names products that do not exist",
                             json_pack("{s:o}", "errors", unknown));
        goto out;
    }
    json_decref(unknown);
    if (inactive) {
        cqrs_command_problem(cmd, 409, "product-discontinued", "Conflict",
                             "the order names a discontinued product", NULL);
        goto out;
    }
    if (mixed) {
        cqrs_command_problem(cmd, 409, "mixed-currencies", "Conflict",
                             "all products of one order must have the same currency", NULL);
        goto out;
    }
    /* Before the stock: no restocking can make such an order possible (a 409 invites a retry). */
    const char *out_of_range =
        !order_price(in, prices, line_totals, &total)
            ? "the order's total exceeds 9223372036854775807 cents, the largest amount that can "
              "be recorded"
        : sold_out_of_range ? "a product's units sold would exceed 9223372036854775807, the "
                              "largest count that can be recorded"
                            : NULL;
    if (out_of_range) {
        cqrs_command_problem(cmd, 422, "order-total-out-of-range", "Unprocessable Content",
                             out_of_range, NULL);
        goto out;
    }
    if (json_array_size(problem_items) > 0) {
        cqrs_command_problem(cmd, 409, "insufficient-stock", "Conflict",
                             "not enough stock for every line of the order",
                             json_pack("{s:O}", "products", problem_items));
        goto out;
    }

    /* Writes: order, lines, stock, in one statement; then the events in one more. */
    char order_id[CQRS_UUID_LEN + 1];
    cqrs_uuid_v4(order_id);
    size_t n = in->n;
    items = json_array();
    lines = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(items, json_null()); /* filled in request order below */
    evs = calloc(n + 1, sizeof *evs);
    topics = calloc(n + 1, sizeof *topics);
    if (!evs || !topics) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        int row = row_of[i];
        int64_t price = prices[i], q = in->lines[i].quantity;
        json_t *item =
            json_pack("{s:s, s:s, s:s, s:I, s:I, s:I}", "product_id", in->lines[i].product_id,
                      "sku", cqrs_rows_get(rows, row, OL_SKU), "name",
                      cqrs_rows_get(rows, row, OL_NAME), "unit_price_cents", (json_int_t)price,
                      "quantity", (json_int_t)q, "line_total_cents", (json_int_t)line_totals[i]);
        json_array_set(items, in->lines[i].index, item);
        json_t *line = json_deep_copy(item);
        json_object_set_new(line, "line_no", json_integer((json_int_t)in->lines[i].index + 1));
        json_array_append_new(lines, line);
        json_decref(item);
        /* ProductStockReserved, one per product, in product id order; stock - q cannot wrap:
         * 0 < q <= stock was checked above */
        event_at(&evs[1 + i], cmd, "product.stock-reserved.v1", "product", in->lines[i].product_id,
                 rows_int(rows, row, OL_VERSION) + 1,
                 json_pack("{s:s, s:s, s:I, s:I}", "product_id", in->lines[i].product_id,
                           "order_id", order_id, "quantity", (json_int_t)q, "stock",
                           (json_int_t)(rows_int(rows, row, OL_STOCK) - q)));
        topics[1 + i] = ctx->product_topic;
    }
    char *lines_text = json_dumps(lines, JSON_COMPACT);
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
    if (rc != CQRS_ERR_OK)
        goto out;
    event_at(&evs[0], cmd, "order.placed.v1", "order", order_id, 1,
             json_pack("{s:s, s:s, s:O, s:I, s:s}", "order_id", order_id, "customer_id",
                       in->customer_id, "items", items, "total_cents", (json_int_t)total,
                       "currency", currency));
    topics[0] = ctx->order_topic;
    n_evs = n + 1;
    rc = cqrs_outbox_append_many(tx, evs, n_evs, topics, err);
    if (rc == CQRS_ERR_OK) {
        char location[64];
        snprintf(location, sizeof location, "/v1/orders/%s", order_id);
        cqrs_command_reply(cmd, 201,
                           order_json(order_id, in->customer_id, "placed", json_incref(items),
                                      total, currency, 1, cmd->time, NULL),
                           1, location);
    }
out:
    for (size_t i = 0; evs && i < in->n + 1; i++)
        cqrs_event_close(&evs[i]);
    free(evs);
    free(topics);
    free(row_of);
    free(prices);
    free(line_totals);
    json_decref(items);
    json_decref(lines);
    json_decref(problem_items);
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

static cqrs_err_t cancel_tx(cqrs_tx_t *tx, cqrs_command_t *cmd, void *ud, cqrs_error_t *err)
{
    cancel_ud_t *cu = ud;
    cqrs_rows_t *ord = NULL, *lines = NULL;
    cqrs_event_t *evs = NULL;
    const char **topics = NULL;
    int n = 0;
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
    int64_t version = rows_int(ord, 0, 4);
    if (!cqrs_command_check_version(cmd, version))
        goto out;
    if (strcmp(cqrs_rows_get(ord, 0, 1), "placed") != 0) {
        cqrs_command_problem(cmd, 409, "order-not-placed", "Conflict",
                             "only a placed order can be cancelled", NULL);
        goto out;
    }
    /* Lock the order's products in id order (the same order PlaceOrder uses). */
    rc = cqrs_tx_exec(tx,
                      "SELECT l.product_id, l.quantity, p.stock, p.version, l.line_no, l.sku,"
                      " l.name, l.unit_price_cents, l.line_total_cents"
                      "  FROM order_lines l JOIN products p ON p.id = l.product_id"
                      " WHERE l.order_id = $1 ORDER BY l.product_id FOR UPDATE OF p",
                      1, p, &lines, err);
    if (rc != CQRS_ERR_OK)
        goto out;
    n = cqrs_rows_count(lines);
    for (int i = 0; i < n; i++) {
        int64_t restocked;
        if (!cqrs_checked_add_i64(rows_int(lines, i, 2), rows_int(lines, i, 1), &restocked) ||
            restocked > cu->ctx->limits.stock_max) {
            cqrs_command_problem(cmd, 409, "stock-above-maximum", "Conflict",
                                 "releasing the order's stock would exceed a product's maximum",
                                 NULL);
            goto out;
        }
    }
    /* units_sold - quantity stays >= 0: this order's reservation added that quantity (and
     * CHECK (units_sold >= 0) backs it up); stock + quantity was checked above. */
    rc = cqrs_tx_exec(tx,
                      "WITH p AS (UPDATE products p SET stock = p.stock + l.quantity,"
                      "   units_sold = p.units_sold - l.quantity, version = p.version + 1,"
                      "   updated_at = $2 FROM order_lines l"
                      "   WHERE l.order_id = $1 AND p.id = l.product_id)"
                      "UPDATE orders SET status = 'cancelled', cancelled_at = $2,"
                      " version = version + 1 WHERE id = $1",
                      2, p, NULL, err);
    if (rc != CQRS_ERR_OK)
        goto out;
    evs = calloc((size_t)n + 1, sizeof *evs);
    topics = calloc((size_t)n + 1, sizeof *topics);
    if (!evs || !topics) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    json_t *items = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(items, json_null());
    for (int i = 0; i < n; i++) {
        const char *pid = cqrs_rows_get(lines, i, 0);
        int64_t q = rows_int(lines, i, 1); /* stock + q <= stock_max: checked above */
        event_at(&evs[1 + i], cmd, "product.stock-released.v1", "product", pid,
                 rows_int(lines, i, 3) + 1,
                 json_pack("{s:s, s:s, s:I, s:I}", "product_id", pid, "order_id", cu->id,
                           "quantity", (json_int_t)q, "stock",
                           (json_int_t)(rows_int(lines, i, 2) + q)));
        topics[1 + i] = cu->ctx->product_topic;
        json_array_set_new(items, (size_t)(rows_int(lines, i, 4) - 1),
                           json_pack("{s:s, s:s, s:s, s:I, s:I, s:I}", "product_id", pid, "sku",
                                     cqrs_rows_get(lines, i, 5), "name", cqrs_rows_get(lines, i, 6),
                                     "unit_price_cents", (json_int_t)rows_int(lines, i, 7),
                                     "quantity", (json_int_t)q, "line_total_cents",
                                     (json_int_t)rows_int(lines, i, 8)));
    }
    event_at(&evs[0], cmd, "order.cancelled.v1", "order", cu->id, version + 1,
             json_pack("{s:s}", "order_id", cu->id));
    topics[0] = cu->ctx->order_topic;
    rc = cqrs_outbox_append_many(tx, evs, (size_t)n + 1, topics, err);
    if (rc == CQRS_ERR_OK)
        cqrs_command_reply(cmd, 200,
                           order_json(cu->id, cqrs_rows_get(ord, 0, 0), "cancelled", items,
                                      rows_int(ord, 0, 2), cqrs_rows_get(ord, 0, 3), version + 1,
                                      cqrs_rows_get(ord, 0, 5), cmd->time),
                           version + 1, NULL);
    else
        json_decref(items);
out:
    for (int i = 0; evs && i < n + 1; i++)
        cqrs_event_close(&evs[i]);
    free(evs);
    free(topics);
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
