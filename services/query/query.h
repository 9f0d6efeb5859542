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

/* Reads an aggregate's document: from the cache (by the document's name) when it holds version
 * ≥ min_version, else from Redis in the generation readers follow (filling the cache).
 * NOT_FOUND when absent; *json malloc'ed. */
cqrs_err_t query_read_doc(query_ctx_t *ctx, const char *aggregate_type, const char *id,
                          const char *name, int64_t min_version, char **json, int64_t *version,
                          cqrs_error_t *err);

/* ---- keys (keys.c): where the domain's documents and indexes live ----
 * Products and orders come from their own topics (named in topics.h); the read model of each is
 * sharded by partition (keyspace.h). A document is <shard>doc:<id> in its aggregate's shard; the
 * index families, all inside a shard, are (index.c): <shard>idx:p:<sort>:<status> and
 * <shard>idx:p:name:<status>:c=<category> (lists), <shard>idx:p:rec (search records),
 * <shard>idx:w:<word>, <shard>idx:top-products, <shard>idx:customer-orders:<customer id>. A list
 * read reads every shard of its topic and merges. */
/* Sets the topic prefix (CQRS_TOPIC_PREFIX) once, before any other call. */
void query_keys_init(const char *topic_prefix);
/* The topic of an aggregate type (product, order); NULL for another type. */
const char *query_topic(const char *aggregate_type);
/* How many shards the type's read model has (its topic's partitions, from the layout the
 * projector records): NOT_FOUND when none is recorded yet (no projector has reached Kafka). */
cqrs_err_t query_shard_count(cqrs_docstore_t *ds, const char *aggregate_type, int32_t *n,
                             cqrs_error_t *err);
/* Whether every type's layout is recorded (reads of any kind can find their shards): NOT_FOUND
 * naming the first topic without one, as query_shard_count. */
cqrs_err_t query_layouts_known(cqrs_docstore_t *ds, cqrs_error_t *err);
/* The prefix of shard i of a type, in the generation readers follow (cap ≥ CQRS_SHARD_MAX). */
void query_shard(cqrs_docstore_t *ds, const char *aggregate_type, int32_t i, char *out, size_t cap);
/* The key of an aggregate's document (cap ≥ CQRS_KEY_MAX): NOT_FOUND as query_shard_count. */
cqrs_err_t query_doc_key(cqrs_docstore_t *ds, const char *aggregate_type, const char *id, char *out,
                         size_t cap, cqrs_error_t *err);
/* The name of an aggregate's document (its key without the generation: what the change feed
 * announces, keyspace.h), with a connection of ctx's pool; answers 503 and returns false when
 * there is none or no layout is recorded yet. */
bool query_doc_name_req(cqrs_http_request_t *req, query_ctx_t *ctx, const char *aggregate_type,
                        const char *id, char *out, size_t cap);

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
/* The event types the read model knows, with their upcasters (product_view.c). */
extern const cqrs_event_registry_t query_events;

/* ---- indexes (index.c, pure) ---- */

enum { SORT_NAME, SORT_PRICE, SORT_PRICE_DESC, SORT_UPDATED_DESC, PRODUCT_SORTS };
extern const char *const product_sort_names[PRODUCT_SORTS];
/* The statuses the projection gives a product; a list of "any status" merges one list each. */
#define PRODUCT_STATUSES 2
extern const char *const product_statuses[PRODUCT_STATUSES];
#define MAX_WORD 64
#define MAX_DOC_WORDS 256

/* Member layout (index.c): sort key, compact id, category tag. */
#define PRODUCT_ID_BYTES 19
#define PRODUCT_TAG_BYTES 4
#define PRODUCT_NUM_BYTES 7
#define PRODUCT_MEMBER_TAIL (PRODUCT_ID_BYTES + PRODUCT_TAG_BYTES)
#define PRODUCT_KEY_MAX 4096
#define PRODUCT_MEMBER_MAX (PRODUCT_KEY_MAX + 64)
/* The lists a product is in: one per sort order (its status's), and the name order's per
 * category and status. */
#define PRODUCT_LISTS (PRODUCT_SORTS + 1)

/* -1 when not one of name, price, -price, -updated. */
int product_sort_parse(const char *s);
/* The index of a status in product_statuses; -1 when none (or s NULL). */
int product_status_index(const char *s);
/* A UUID (text, any case) as PRODUCT_ID_BYTES NUL-free bytes that compare as the lower-case
 * text does; false when it is not a UUID. */
bool product_id_encode(const char *uuid, char out[PRODUCT_ID_BYTES + 1]);
/* The inverse (lower-case text); false when enc is not such an encoding. */
bool product_id_decode(const char *enc, char out[CQRS_UUID_LEN + 1]);
/* PRODUCT_TAG_BYTES NUL-free bytes from a hash of the category (equal categories, equal tags;
 * different ones rarely). */
void product_category_tag(const char *category, char out[PRODUCT_TAG_BYTES + 1]);
/* A product's member in the lists of a sort order (cap ≥ PRODUCT_MEMBER_MAX). */
void product_sort_member(const json_t *doc, int sort, char *out, size_t cap);
/* The id of a product list member (text); false when it is not one. */
bool product_member_id(const char *member, char out[CQRS_UUID_LEN + 1]);
/* Whether a product list member carries this category tag. */
bool product_member_has_tag(const char *member, const char *tag);
/* The search record of a product (cap ≥ PRODUCT_MEMBER_MAX): what it takes to place it in any
 * list — status, category tag, sort keys — kept in the shard's records hash by compact id. */
void product_search_record(const json_t *doc, char *out, size_t cap);
/* From a compact id and its record: the member in the lists of sort (cap ≥ PRODUCT_MEMBER_MAX),
 * the status index (-1…: unknown) and the category tag. False when the record is malformed. */
bool product_record_member(const char *eid, const char *record, int sort, char *out, size_t cap,
                           int *status, char tag[PRODUCT_TAG_BYTES + 1]);
/* Index keys of a shard (shard: its prefix). The list of a sort order and status (an index
 * of product_statuses); with category (only kept for SORT_NAME; ignored for the others) the
 * name order's list of that category and status. */
void product_list_key(const char *shard, int sort, int status, const char *category, char *out,
                      size_t cap);
/* The shard's hash of search records (compact id → product_search_record). */
void product_records_key(const char *shard, char *out, size_t cap);
typedef struct product_entry {
    char key[4608];
    char member[PRODUCT_MEMBER_MAX];
} product_entry_t;
/* The lists a product belongs to and its member in each (at most PRODUCT_LISTS; none for a
 * status the projection does not give): what the projection writes and verify checks. */
size_t product_list_entries(const char *shard, const json_t *doc, product_entry_t *out);
void word_key(const char *shard, const char *word, char *out, size_t cap);
void top_products_key(const char *shard, char *out, size_t cap);
/* Distinct lower-cased words (ASCII letters and digits, and any non-ASCII byte, are word
 * characters; at most MAX_WORD bytes kept of each); returns how many, at most max. */
size_t split_words(const char *text, char words[][MAX_WORD + 1], size_t max);
void top_member(const json_t *doc, char *out, size_t cap);
void customer_orders_key(const char *shard, const char *customer_id, char *out, size_t cap);
void customer_order_member(const json_t *doc, char *out, size_t cap);
/* The index changes from old to next for the document at key (cqrs_projection_t.index). */
void query_index(const char *shard, const char *aggregate_type, const char *key, const json_t *old,
                 const json_t *next, cqrs_index_ops_t *ops);

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
