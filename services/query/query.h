/* query.h — the query side's domain: projections from events to documents (pure) and the
 * read routes. Reads come from Redis only.
 */
#ifndef CQRS_SERVICES_QUERY_H
#define CQRS_SERVICES_QUERY_H

#include <cqrs/doccache.h>
#include <cqrs/docstore.h>
#include <cqrs/event.h>
#include <cqrs/http.h>
#include <cqrs/projector.h>
#include <cqrs/waiters.h>

typedef struct query_ctx {
    cqrs_docstore_pool_t *pool;
    int acquire_timeout_ms;
    cqrs_doccache_t *cache;  /* NULL: no cache */
    cqrs_waiters_t *waiters; /* NULL: min_version is not waited for, no streams */
    int wait_default_ms;     /* wait_ms when absent */
} query_ctx_t;

#define WAIT_MAX_MS 10000

/* Reads the document at key: from the cache when it holds version ≥ min_version, else from
 * Redis (filling the cache). NOT_FOUND when absent; *json malloc'ed. */
cqrs_err_t query_read_doc(query_ctx_t *ctx, const char *key, int64_t min_version, char **json,
                          int64_t *version, cqrs_error_t *err);

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

/* ---- indexes (index.c, pure) ---- */

enum { SORT_NAME, SORT_PRICE, SORT_PRICE_DESC, SORT_UPDATED_DESC, PRODUCT_SORTS };
extern const char *const product_sort_names[PRODUCT_SORTS];
#define MAX_WORD 64
#define MAX_DOC_WORDS 256
#define TOP_PRODUCTS_KEY "cqrs:idx:top-products"

/* -1 when not one of name, price, -price, -updated. */
int product_sort_parse(const char *s);
void product_sort_member(const json_t *doc, int sort, char *out, size_t cap);
/* category / status NULL: not filtered by it. */
void product_list_key(int sort, const char *category, const char *status, char *out, size_t cap);
void word_key(const char *word, char *out, size_t cap);
/* Distinct lower-cased words (ASCII letters and digits, and any non-ASCII byte, are word
 * characters; at most MAX_WORD bytes kept of each); returns how many, at most max. */
size_t split_words(const char *text, char words[][MAX_WORD + 1], size_t max);
void top_member(const json_t *doc, char *out, size_t cap);
void customer_orders_key(const char *customer_id, char *out, size_t cap);
void customer_order_member(const json_t *doc, char *out, size_t cap);
/* The index changes from old to next for the document at key (cqrs_projection_t.index). */
void query_index(const char *key, const json_t *old, const json_t *next, cqrs_index_ops_t *ops);

/* Answers 400 and returns false when the request has a query parameter not in allowed
 * (NULL-terminated), or one that is not valid UTF-8. */
bool query_only_params(cqrs_http_request_t *req, const char *const *allowed);

/* Copies the {id} path parameter, lower-cased, into out; answers 400 and returns false when it
 * is not a UUID. */
bool query_path_id(cqrs_http_request_t *req, char out[CQRS_UUID_LEN + 1]);

/* GET /v1/products/{id} and GET /v1/orders/{id}; ud is a query_ctx_t. */
void product_get_handler(cqrs_http_request_t *req, void *ud);
void order_get_handler(cqrs_http_request_t *req, void *ud);
/* GET /v1/products, GET /v1/customers/{id}/orders, GET /v1/reports/top-products (lists.c). */
void product_list_handler(cqrs_http_request_t *req, void *ud);
void customer_orders_handler(cqrs_http_request_t *req, void *ud);
void top_products_handler(cqrs_http_request_t *req, void *ud);

/* GET /v1/products/{id}/stream: Server-Sent Events (stream.c). */
void product_stream_handler(cqrs_http_request_t *req, void *ud);

size_t query_routes(query_ctx_t *ctx, cqrs_http_route_t *routes, size_t cap);

#endif
