/* routes.c — the command API's route table (SPEC.md, "Domain"). */
#include "command.h"

size_t command_routes(command_ctx_t *ctx, cqrs_http_route_t *routes, size_t cap)
{
    const cqrs_http_route_t table[] = {
        {"POST", "/v1/products", product_create_handler, ctx},
    };
    size_t n = sizeof table / sizeof table[0];
    for (size_t i = 0; i < n && i < cap; i++)
        routes[i] = table[i];
    return n < cap ? n : cap;
}
