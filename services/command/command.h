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

/* Value limits (README "API", Limits; defaults from domain_limits_default, configurable). */
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

/* A product's weight in grams, at most (1,000 t: a fixed bound, as for the schema). */
#define PRODUCT_WEIGHT_MAX 1000000000LL

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
    int64_t weight_grams; /* -1 when not given (unknown) */
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

/* ---- decisions (pure, decide.c) ----
 *
 * A decision takes the locked rows and the validated command and returns the events to record,
 * or the problem to answer; it does no I/O and reads no clock (new ids come in). The transaction
 * code loads and locks the rows, calls the decision and writes what it returns: the rows' new
 * values are read off the events' data (stock, price, details …), so rows and events cannot
 * disagree. Every sum of money or stock is checked (cqrs_checked_*_i64): what would overflow is a
 * problem, never a wrapped number. Each decide_* fills *d (which it initialises) and returns
 * true, or returns false when memory ran out (d is then empty). */

typedef struct decided_event {
    const char *type;           /* static string, e.g. "product.stock-adjusted.v1" */
    const char *aggregate_type; /* "product" or "order" */
    char aggregate_id[CQRS_UUID_LEN + 1];
    int64_t version; /* the aggregate's version after this event */
    json_t *data;    /* owned */
} decided_event_t;

typedef struct decision {
    unsigned status;   /* 0: the events below; else the problem's HTTP status (409, 422) */
    const char *slug;  /* problem type, e.g. "insufficient-stock" (static) */
    const char *title; /* static */
    char detail[256];
    json_t *extra; /* problem members (owned, may be NULL) */
    size_t n;
    decided_event_t *events; /* owned; n of them when status is 0 */
} decision_t;

void decision_close(decision_t *d);

/* A product row as locked (borrowed strings). */
typedef struct product_state {
    const char *id, *sku, *name, *description, *category, *currency, *status;
    int64_t price_cents, stock, units_sold, version;
} product_state_t;

/* An order row as locked, and its lines joined to their locked products. */
typedef struct order_state {
    const char *id, *status;
    int64_t version;
} order_state_t;

typedef struct order_line_state {
    const char *product_id;
    int64_t quantity;
    int64_t product_stock, product_version;
} order_line_state_t;

/* CreateProduct. sku_taken: another product has this sku (the unique index says so — the only
 * place that can tell under concurrency). */
bool decide_create_product(const char *id, const create_product_input_t *in, bool sku_taken,
                           decision_t *d);
/* The product commands on cur (locked, never NULL: 404 and If-Match are the loader's). */
bool decide_update_details(const product_state_t *cur, const update_details_input_t *in,
                           decision_t *d);
bool decide_change_price(const product_state_t *cur, int64_t price_cents, decision_t *d);
bool decide_adjust_stock(const product_state_t *cur, const adjust_stock_input_t *in,
                         const domain_limits_t *l, decision_t *d);
bool decide_discontinue(const product_state_t *cur, decision_t *d);
/* PlaceOrder: products are the locked rows of in's product ids that exist, sorted by id.
 * events[0] is OrderPlaced (its data's items in request order), then one ProductStockReserved
 * per line in product id order. */
bool decide_place_order(const char *order_id, const place_order_input_t *in,
                        const product_state_t *products, size_t n_products, decision_t *d);
/* CancelOrder: events[0] is OrderCancelled, then one ProductStockReleased per line. */
bool decide_cancel_order(const order_state_t *order, const order_line_state_t *lines, size_t n,
                         const domain_limits_t *l, decision_t *d);

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
    "to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), weight_grams"

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
    PC_UPDATED_AT,
    PC_WEIGHT /* NULL when unknown */
};

/* The product of row r (PRODUCT_COLS) as a decision sees it (strings borrowed from rows). */
void product_state_of(const cqrs_rows_t *rows, int r, product_state_t *out);

/* Answers d's problem (takes d's extra). */
void command_problem(cqrs_command_t *cmd, decision_t *d);

/* Appends d's events to the outbox in one statement, at the command's time and trace context,
 * each to its aggregate type's topic. */
cqrs_err_t command_record(cqrs_tx_t *tx, cqrs_command_t *cmd, const command_ctx_t *ctx,
                          const decision_t *d, cqrs_error_t *err);

/* The product document of row r (PRODUCT_COLS), as the query side serves it. */
json_t *product_row_json(const cqrs_rows_t *rows, int r);
int64_t rows_int(const cqrs_rows_t *rows, int r, int c);

#endif
