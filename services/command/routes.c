/* routes.c — the command API's route table (SPEC.md, "Domain"). */
#include "command.h"

size_t command_routes(command_ctx_t *ctx, cqrs_http_route_t *routes, size_t cap)
{
    const cqrs_http_route_t table[] = {
        {"POST", "/v1/products", product_create_handler, ctx},
        {"PATCH", "/v1/products/{id}", product_update_details_handler, ctx},
        {"PUT", "/v1/products/{id}/price", product_change_price_handler, ctx},
        {"POST", "/v1/products/{id}/stock-adjustments", product_adjust_stock_handler, ctx},
        {"POST", "/v1/products/{id}/discontinue", product_discontinue_handler, ctx},
        {"POST", "/v1/orders", order_place_handler, ctx},
        {"POST", "/v1/orders/{id}/cancel", order_cancel_handler, ctx},
    };
    size_t n = sizeof table / sizeof table[0];
    for (size_t i = 0; i < n && i < cap; i++)
        routes[i] = table[i];
    return n < cap ? n : cap;
}
