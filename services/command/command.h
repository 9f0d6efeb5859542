/* command.h — the command side's domain: products (and, later, orders).
 *
 * Handlers validate (pure), apply business rules and write rows + events + outbox in one
 * transaction through libcqrs; they never see libpq.
 */
#ifndef CQRS_SERVICES_COMMAND_H
#define CQRS_SERVICES_COMMAND_H

#include <cqrs/http.h>
#include <cqrs/json.h>
#include <cqrs/store.h>
#include <stdbool.h>
#include <stdint.h>

/* Value limits of SPEC.md; defaults from product_limits_default(). */
typedef struct product_limits {
    size_t sku_max;
    size_t name_max;
    size_t description_max;
    size_t category_max;
    int64_t price_max;
    int64_t stock_max;
} product_limits_t;

void product_limits_default(product_limits_t *l);

typedef struct command_ctx {
    cqrs_store_t *store;
    const char *product_topic;
    const char *order_topic;
    int max_json_depth;
    product_limits_t limits;
} command_ctx_t;

typedef struct create_product_input {
    const char *sku; /* borrowed from the request body */
    const char *name;
    const char *description; /* "" when absent */
    const char *category;
    const char *currency;
    int64_t price_cents;
    int64_t initial_stock;
} create_product_input_t;

/* Checks a CreateProduct body against the limits; fills `in` and returns true when valid,
 * else records every violation in v. Pure. */
bool product_validate_create(const json_t *body, const product_limits_t *limits,
                             create_product_input_t *in, cqrs_violations_t *v);

/* The ProductCreated event data for a new product (new reference). Pure. */
json_t *product_created_data(const char *id, const create_product_input_t *in);

/* POST /v1/products; ud is a command_ctx_t. */
void product_create_handler(cqrs_http_request_t *req, void *ud);

/* Writes the domain routes into routes[0..cap); returns how many. */
size_t command_routes(command_ctx_t *ctx, cqrs_http_route_t *routes, size_t cap);

/* Shared reply for a body that failed cqrs_json_parse_object (400). */
void command_reply_bad_json(cqrs_http_request_t *req, const cqrs_error_t *err);

/* Shared reply for validation violations (400 or 422 with errors). Takes v's errors. */
void command_reply_violations(cqrs_http_request_t *req, cqrs_violations_t *v);

#endif
