/* command.h — the command side's domain: products and orders.
 *
 * Handlers validate (pure functions below), then run one transaction through libcqrs's
 * command pipeline (If-Match, Idempotency-Key, retries): rules, rows, events, outbox. They
 * never see libpq.
 */
#ifndef CQRS_SERVICES_COMMAND_H
#define CQRS_SERVICES_COMMAND_H

#include <cqrs/command.h>
#include <cqrs/http.h>
#include <cqrs/json.h>
#include <cqrs/store.h>
#include <stdbool.h>
#include <stdint.h>

/* Value limits of SPEC.md (defaults from domain_limits_default, configurable). */
typedef struct domain_limits {
    int64_t sku_max;
    int64_t name_max;
    int64_t description_max;
    int64_t category_max;
    int64_t reason_max;
    int64_t price_max;
    int64_t stock_max;
    int64_t quantity_max;
    int64_t order_lines_max;
} domain_limits_t;

void domain_limits_default(domain_limits_t *l);

typedef struct command_ctx {
    cqrs_store_t *store;
    const char *product_topic;
    const char *order_topic;
    cqrs_command_config_t cmd;
    domain_limits_t limits;
} command_ctx_t;

/* ---- validation (pure) ---- */

typedef struct create_product_input {
    const char *sku; /* borrowed from the request body */
    const char *name;
    const char *description; /* "" when absent */
    const char *category;
    const char *currency;
    int64_t price_cents;
    int64_t initial_stock;
} create_product_input_t;

bool product_validate_create(const json_t *body, const domain_limits_t *l,
                             create_product_input_t *in, cqrs_violations_t *v);

typedef struct update_details_input {
    const char *name, *description, *category; /* NULL = unchanged */
} update_details_input_t;

bool product_validate_update_details(const json_t *body, const domain_limits_t *l,
                                     update_details_input_t *in, cqrs_violations_t *v);
bool product_validate_change_price(const json_t *body, const domain_limits_t *l,
                                   int64_t *price_cents, cqrs_violations_t *v);

typedef struct adjust_stock_input {
    int64_t delta;
    const char *reason;
} adjust_stock_input_t;

bool product_validate_adjust_stock(const json_t *body, const domain_limits_t *l,
                                   adjust_stock_input_t *in, cqrs_violations_t *v);

/* Commands without parameters: the body must be {} (or empty). */
bool validate_empty(const json_t *body, cqrs_violations_t *v);

#define ORDER_LINES_CAP 1000

typedef struct order_line_input {
    char product_id[CQRS_UUID_LEN + 1]; /* lower case */
    int64_t quantity;
    size_t index; /* position in the request's items */
} order_line_input_t;

typedef struct place_order_input {
    char customer_id[CQRS_UUID_LEN + 1];
    size_t n;
    order_line_input_t lines[ORDER_LINES_CAP]; /* sorted by product_id */
} place_order_input_t;

bool order_validate_place(const json_t *body, const domain_limits_t *l, place_order_input_t *in,
                          cqrs_violations_t *v);

/* The money of an order, decided on its locked products (pure): line_totals[i] =
 * unit_prices[i] × in->lines[i].quantity (both arrays in in->lines' order) and *total their sum,
 * in cents. False, with *total untouched, when a line total or the sum does not fit int64:
 * total_cents is a bigint row and an int64 in every event and document, so such an order cannot
 * be represented and PlaceOrder answers 422 order-total-out-of-range. */
bool order_price(const place_order_input_t *in, const int64_t *unit_prices, int64_t *line_totals,
                 int64_t *total);

/* The ProductCreated event data (new reference). Pure. */
json_t *product_created_data(const char *id, const create_product_input_t *in);

/* ---- handlers (ud = command_ctx_t) ---- */

void product_create_handler(cqrs_http_request_t *req, void *ud);
void product_update_details_handler(cqrs_http_request_t *req, void *ud);
void product_change_price_handler(cqrs_http_request_t *req, void *ud);
void product_adjust_stock_handler(cqrs_http_request_t *req, void *ud);
void product_discontinue_handler(cqrs_http_request_t *req, void *ud);
void order_place_handler(cqrs_http_request_t *req, void *ud);
void order_cancel_handler(cqrs_http_request_t *req, void *ud);

size_t command_routes(command_ctx_t *ctx, cqrs_http_route_t *routes, size_t cap);

/* ---- shared by the handlers (common.c) ---- */

/* Replies 400/422 for violations (takes v's errors). */
void command_reply_violations(cqrs_http_request_t *req, cqrs_violations_t *v);

/* Copies the {id} path parameter, lower-cased, into out; replies 400 and returns false when it
 * is not a UUID. */
bool command_path_id(cqrs_http_request_t *req, char out[CQRS_UUID_LEN + 1]);

/* Columns of a product row as served (timestamps formatted), for SELECT and RETURNING. */
#define PRODUCT_COLS                                                                               \
    "id, sku, name, description, category, price_cents, currency, stock, status, units_sold, "     \
    "version, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), "       \
    "to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"

enum {
    PC_ID,
    PC_SKU,
    PC_NAME,
    PC_DESCRIPTION,
    PC_CATEGORY,
    PC_PRICE,
    PC_CURRENCY,
    PC_STOCK,
    PC_STATUS,
    PC_UNITS_SOLD,
    PC_VERSION,
    PC_CREATED_AT,
    PC_UPDATED_AT
};

/* The product document of row r (PRODUCT_COLS), as the query side serves it. */
json_t *product_row_json(const cqrs_rows_t *rows, int r);
int64_t rows_int(const cqrs_rows_t *rows, int r, int c);

#endif
