/* routes.c — the command API's route table (README "API"; schemas/openapi/command-api.yaml). */
#include "command.h"

size_t command_routes(command_ctx_t *ctx, cqrs_http_route_t *routes, size_t cap)
{
    const cqrs_http_route_t table[] = {
        {"POST", "/v1/products", product_create_handler, ctx, "CreateProduct", CQRS_SCOPE_WRITE},
        {"PATCH", "/v1/products/{id}", product_update_details_handler, ctx, "UpdateProductDetails",
         CQRS_SCOPE_WRITE},
        {"PUT", "/v1/products/{id}/price", product_change_price_handler, ctx, "ChangeProductPrice",
         CQRS_SCOPE_WRITE},
        {"POST", "/v1/products/{id}/stock-adjustments", product_adjust_stock_handler, ctx,
         "AdjustStock", CQRS_SCOPE_WRITE},
        {"POST", "/v1/products/{id}/discontinue", product_discontinue_handler, ctx,
         "DiscontinueProduct", CQRS_SCOPE_WRITE},
        {"POST", "/v1/orders", order_place_handler, ctx, "PlaceOrder", CQRS_SCOPE_WRITE},
        {"POST", "/v1/orders/{id}/cancel", order_cancel_handler, ctx, "CancelOrder",
         CQRS_SCOPE_WRITE},
    };
    size_t n = sizeof table / sizeof table[0];
    for (size_t i = 0; i < n && i < cap; i++)
        routes[i] = table[i];
    return n < cap ? n : cap;
}
