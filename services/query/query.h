/* query.h — the query side's domain: projections from events to documents (pure) and the
 * read routes. Reads come from Redis only.
 */
#ifndef CQRS_SERVICES_QUERY_H
#define CQRS_SERVICES_QUERY_H

#include <cqrs/docstore.h>
#include <cqrs/event.h>
#include <cqrs/http.h>
#include <cqrs/projector.h>

typedef struct query_ctx {
    cqrs_docstore_pool_t *pool;
    int acquire_timeout_ms;
} query_ctx_t;

/* Key of a document in Redis: "cqrs:<type>:{<id>}" (hash tag = the id). */
void doc_key(const char *aggregate_type, const char *id, char *out, size_t cap);

/* Applies one product event to the current document (NULL when none) and returns the new
 * document (new reference) in *out. INVALID when the event type is unknown, its data does not
 * have the expected shape, or it does not fit the document (e.g. created twice). Pure. */
cqrs_err_t product_view_apply(const json_t *doc, const cqrs_event_t *ev, json_t **out,
                              cqrs_error_t *err);

/* The same for order events (order.placed.v1, order.cancelled.v1). Pure. */
cqrs_err_t order_view_apply(const json_t *doc, const cqrs_event_t *ev, json_t **out,
                            cqrs_error_t *err);

/* The projection of product and order events for the projector. */
extern const cqrs_projection_t query_projection;

/* GET /v1/products/{id} and GET /v1/orders/{id}; ud is a query_ctx_t. */
void product_get_handler(cqrs_http_request_t *req, void *ud);
void order_get_handler(cqrs_http_request_t *req, void *ud);

size_t query_routes(query_ctx_t *ctx, cqrs_http_route_t *routes, size_t cap);

#endif
