/* decide.c — the business rules of the commands, as pure decisions.
 *
 * DESIGN. Each rule of the command table (README "Commands"; schemas/problems.md for the
 * answers) is decided here, on the rows the transaction has locked and the validated command,
 * and nowhere else: the transaction bodies in product.c and order.c load, lock, call one of
 * these and write the events they return (and the row values those events carry). No I/O, no
 * clock, no random ids: the same input always gives the same events, which is what lets
 * tests/unit/test_decisions.c check every rule without a database.
 *
 * Money and counts never wrap: at the widest settings one line is 10^12 cents × 10^6 = 10^18
 * and ten of them pass INT64_MAX, so every sum and product of prices, quantities, stock and
 * units sold is computed with cqrs_checked_*_i64; what cannot be represented is a problem
 * (422 order-total-out-of-range, 409 stock-above-maximum), never a wrong number or a 500.
 */
#include <cqrs/util.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "command.h"

void decision_close(decision_t *d)
{
    for (size_t i = 0; d->events && i < d->n; i++)
        json_decref(d->events[i].data);
    free(d->events);
    json_decref(d->extra);
    memset(d, 0, sizeof *d);
}

static void decision_init(decision_t *d)
{
    memset(d, 0, sizeof *d);
}

/* Always true: a problem is a decision. extra is stolen. */
static bool problem(decision_t *d, unsigned status, const char *slug, json_t *extra,
                    const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static bool problem(decision_t *d, unsigned status, const char *slug, json_t *extra,
                    const char *fmt, ...)
{
    d->status = status;
    d->slug = slug;
    d->title = status == 409 ? "Conflict" : "Unprocessable Content";
    d->extra = extra;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->detail, sizeof d->detail, fmt, ap);
    va_end(ap);
    return true;
}

static bool events_alloc(decision_t *d, size_t n)
{
    d->events = calloc(n, sizeof *d->events);
    return d->events != NULL;
}

/* Event i (of those events_alloc made room for); data stolen. False when data is NULL (out of
 * memory). */
static bool emit(decision_t *d, size_t i, const char *type, const char *agg_type, const char *id,
                 int64_t version, json_t *data)
{
    if (!data)
        return false;
    decided_event_t *e = &d->events[i];
    e->type = type;
    e->aggregate_type = agg_type;
    snprintf(e->aggregate_id, sizeof e->aggregate_id, "%s", id);
    e->version = version;
    e->data = data;
    if (d->n < i + 1)
        d->n = i + 1;
    return true;
}

/* One event on a product: cur's version + 1. */
static bool product_event(const product_state_t *cur, const char *type, json_t *data, decision_t *d)
{
    if (!events_alloc(d, 1)) {
        json_decref(data);
        return false;
    }
    if (!emit(d, 0, type, "product", cur->id, cur->version + 1, data)) {
        decision_close(d);
        return false;
    }
    return true;
}

/* ---- products ---------------------------------------------------------------------------- */

bool decide_create_product(const char *id, const create_product_input_t *in, bool sku_taken,
                           decision_t *d)
{
    decision_init(d);
    if (sku_taken) /* rule: sku unique */
        return problem(d, 409, "duplicate-sku", NULL, "a product with sku '%.64s' already exists",
                       in->sku);
    product_state_t none = {.id = id, .version = 0};
    return product_event(&none, "product.created.v2", product_created_data(id, in), d);
}

bool decide_update_details(const product_state_t *cur, const update_details_input_t *in,
                           decision_t *d)
{
    /* rules "at least one field; null not allowed" are product_validate_update_details' */
    decision_init(d);
    return product_event(cur, "product.details-updated.v1",
                         json_pack("{s:s, s:s, s:s, s:s}", "product_id", cur->id, "name",
                                   in->name ? in->name : cur->name, "description",
                                   in->description ? in->description : cur->description, "category",
                                   in->category ? in->category : cur->category),
                         d);
}

bool decide_change_price(const product_state_t *cur, int64_t price_cents, decision_t *d)
{
    decision_init(d);
    return product_event(cur, "product.price-changed.v1",
                         json_pack("{s:s, s:I, s:I}", "product_id", cur->id, "price_cents",
                                   (json_int_t)price_cents, "previous_price_cents",
                                   (json_int_t)cur->price_cents),
                         d);
}

bool decide_adjust_stock(const product_state_t *cur, const adjust_stock_input_t *in,
                         const domain_limits_t *l, decision_t *d)
{
    decision_init(d);
    /* stock >= 0, so only a positive delta can overflow: that is above any maximum */
    int64_t stock = 0;
    bool fits = cqrs_checked_add_i64(cur->stock, in->delta, &stock);
    if (fits && stock < 0) /* rule: stock never below 0 */
        return problem(d, 409, "insufficient-stock", NULL,
                       "the stock is %lld; removing %lld would make it negative",
                       (long long)cur->stock, (long long)-in->delta);
    if (!fits || stock > l->stock_max) /* rule: resulting stock within its limit */
        return problem(d, 409, "stock-above-maximum", NULL,
                       "the stock would exceed its maximum of %lld", (long long)l->stock_max);
    return product_event(cur, "product.stock-adjusted.v1",
                         json_pack("{s:s, s:I, s:s, s:I}", "product_id", cur->id, "delta",
                                   (json_int_t)in->delta, "reason", in->reason, "stock",
                                   (json_int_t)stock),
                         d);
}

bool decide_discontinue(const product_state_t *cur, decision_t *d)
{
    decision_init(d);
    if (strcmp(cur->status, "active") != 0) /* rule: only an active product */
        return problem(d, 409, "product-not-active", NULL,
                       "only an active product can be discontinued");
    return product_event(cur, "product.discontinued.v1", json_pack("{s:s}", "product_id", cur->id),
                         d);
}

/* ---- orders ------------------------------------------------------------------------------ */

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

/* The rules of PlaceOrder, in the order their answers rank: unknown products (422), a
 * discontinued one (409), mixed currencies (409), a total or a units-sold count that cannot be
 * recorded (422: no restocking can make such an order possible, so it ranks before the stock,
 * whose 409 invites a retry), then the stock of every line (409, listing each short line). All
 * or nothing: any problem, no event. */
static bool place_rules(const place_order_input_t *in, const product_state_t *const *row_of,
                        const int64_t *prices, int64_t *line_totals, int64_t *total, decision_t *d)
{
    json_t *unknown = json_array(), *short_lines = json_array();
    if (!unknown || !short_lines) {
        json_decref(unknown);
        json_decref(short_lines);
        return false;
    }
    const char *currency = NULL;
    bool mixed = false, inactive = false, sold_out_of_range = false;
    for (size_t i = 0; i < in->n; i++) {
        const order_line_input_t *line = &in->lines[i];
        const product_state_t *p = row_of[i];
        if (!p) {
            char field[48];
            snprintf(field, sizeof field, "items[%zu].product_id", line->index);
            json_array_append_new(unknown, json_pack("{s:s, s:s}", "field", field, "message",
                                                     "no product with this id"));
            continue;
        }
        int64_t sold;
        if (!cqrs_checked_add_i64(p->units_sold, line->quantity, &sold))
            sold_out_of_range = true;
        if (strcmp(p->status, "active") != 0)
            inactive = true;
        if (!currency)
            currency = p->currency;
        else if (strcmp(currency, p->currency) != 0)
            mixed = true;
        if (p->stock < line->quantity)
            json_array_append_new(short_lines,
                                  json_pack("{s:s, s:I, s:I}", "product_id", line->product_id,
                                            "requested", (json_int_t)line->quantity, "available",
                                            (json_int_t)p->stock));
    }
    bool priced = !inactive && !mixed && json_array_size(unknown) == 0 &&
                  order_price(in, prices, line_totals, total);
    if (json_array_size(unknown) > 0) {
        json_decref(short_lines);
        return problem(d, 422, "validation-failed", json_pack("{s:o}", "errors", unknown),
                       "the order names products that do not exist");
    }
    json_decref(unknown);
    if (inactive || mixed || !priced || sold_out_of_range) {
        json_decref(short_lines);
        if (inactive)
            return problem(d, 409, "product-discontinued", NULL,
                           "the order names a discontinued product");
        if (mixed)
            return problem(d, 409, "mixed-currencies", NULL,
                           "all products of one order must have the same currency");
        if (!priced)
            return problem(d, 422, "order-total-out-of-range", NULL,
                           "the order's total exceeds 9223372036854775807 cents, the largest "
                           "amount that can be recorded");
        return problem(d, 422, "order-total-out-of-range", NULL,
                       "a product's units sold would exceed 9223372036854775807, the largest "
                       "count that can be recorded");
    }
    if (json_array_size(short_lines) > 0)
        return problem(d, 409, "insufficient-stock", json_pack("{s:o}", "products", short_lines),
                       "not enough stock for every line of the order");
    json_decref(short_lines);
    return true;
}

bool decide_place_order(const char *order_id, const place_order_input_t *in,
                        const product_state_t *products, size_t n_products, decision_t *d)
{
    decision_init(d);
    bool ok = false;
    json_t *items = NULL;
    const product_state_t **row_of = calloc(in->n, sizeof *row_of);
    int64_t *prices = calloc(in->n, sizeof *prices),
            *line_totals = calloc(in->n, sizeof *line_totals);
    int64_t total = 0;
    if (!row_of || !prices || !line_totals)
        goto out;
    /* both lists sorted by product id: a merge */
    for (size_t i = 0, r = 0; i < in->n; i++) {
        while (r < n_products && strcmp(products[r].id, in->lines[i].product_id) < 0)
            r++;
        if (r < n_products && strcmp(products[r].id, in->lines[i].product_id) == 0) {
            row_of[i] = &products[r];
            prices[i] = products[r].price_cents;
        }
    }
    if (!place_rules(in, row_of, prices, line_totals, &total, d))
        goto out;
    if (d->status != 0) {
        ok = true;
        goto out;
    }
    items = json_array();
    if (!items || !events_alloc(d, in->n + 1))
        goto out;
    for (size_t i = 0; i < in->n; i++)
        json_array_append_new(items, json_null()); /* set in request order below */
    for (size_t i = 0; i < in->n; i++) {
        const product_state_t *p = row_of[i];
        const char *pid = in->lines[i].product_id;
        int64_t q = in->lines[i].quantity;
        json_array_set_new(items, in->lines[i].index,
                           json_pack("{s:s, s:s, s:s, s:I, s:I, s:I}", "product_id", pid, "sku",
                                     p->sku, "name", p->name, "unit_price_cents",
                                     (json_int_t)prices[i], "quantity", (json_int_t)q,
                                     "line_total_cents", (json_int_t)line_totals[i]));
        /* stock - q cannot wrap: 0 < q <= stock was checked */
        if (!emit(d, 1 + i, "product.stock-reserved.v1", "product", pid, p->version + 1,
                  json_pack("{s:s, s:s, s:I, s:I}", "product_id", pid, "order_id", order_id,
                            "quantity", (json_int_t)q, "stock", (json_int_t)(p->stock - q))))
            goto out;
    }
    if (!emit(d, 0, "order.placed.v1", "order", order_id, 1,
              json_pack("{s:s, s:s, s:O, s:I, s:s}", "order_id", order_id, "customer_id",
                        in->customer_id, "items", items, "total_cents", (json_int_t)total,
                        "currency", row_of[0]->currency)))
        goto out;
    ok = true;
out:
    if (!ok)
        decision_close(d);
    json_decref(items);
    free(row_of);
    free(prices);
    free(line_totals);
    return ok;
}

bool decide_cancel_order(const order_state_t *order, const order_line_state_t *lines, size_t n,
                         const domain_limits_t *l, decision_t *d)
{
    decision_init(d);
    if (strcmp(order->status, "placed") != 0) /* rule: only a placed order */
        return problem(d, 409, "order-not-placed", NULL, "only a placed order can be cancelled");
    for (size_t i = 0; i < n; i++) {
        int64_t restocked;
        if (!cqrs_checked_add_i64(lines[i].product_stock, lines[i].quantity, &restocked) ||
            restocked > l->stock_max)
            return problem(d, 409, "stock-above-maximum", NULL,
                           "releasing the order's stock would exceed a product's maximum");
    }
    if (!events_alloc(d, n + 1))
        return false;
    bool ok = emit(d, 0, "order.cancelled.v1", "order", order->id, order->version + 1,
                   json_pack("{s:s}", "order_id", order->id));
    for (size_t i = 0; ok && i < n; i++) /* stock + quantity <= stock_max: checked above */
        ok = emit(d, 1 + i, "product.stock-released.v1", "product", lines[i].product_id,
                  lines[i].product_version + 1,
                  json_pack("{s:s, s:s, s:I, s:I}", "product_id", lines[i].product_id, "order_id",
                            order->id, "quantity", (json_int_t)lines[i].quantity, "stock",
                            (json_int_t)(lines[i].product_stock + lines[i].quantity)));
    if (!ok)
        decision_close(d);
    return ok;
}
