/* lists.c — GET /v1/products (filters, search, sort, keyset paging),
 * GET /v1/customers/{id}/orders and GET /v1/reports/top-products. Redis only.
 *
 * Every list is kept per shard (query.h, keys) and read from all shards of its topic, merged
 * by member: members are unique (they end with the id) and totally ordered, so "after the
 * last member" is a cursor valid across shards — no duplicates, no holes.
 *
 * Cost: without q, one pipelined ZRANGEBYLEX of limit + 1 members per shard (one round trip;
 * S × (limit + 1) members read for a page of limit) and one pipelined read of the page's
 * documents. With q, cqrs_docstore_search per shard: proportional to the rarest word's
 * products when it is rare (≤ SEARCH_SMALL), else a walk of at most SEARCH_BUDGET / S index
 * entries per shard and request (a shorter page, with a cursor to continue).
 *
 * Cursors are opaque: base64url("v1|<sort>|<last member>").
 */
#include <cqrs/keyspace.h>
#include <cqrs/metrics.h>
#include <cqrs/util.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "query.h"

#define SEARCH_SMALL 2000
#define SEARCH_BUDGET 5000
#define MAX_Q_CHARS 200
#define MAX_Q_WORDS 10

static void bad(cqrs_http_request_t *req, const char *detail)
{
    cqrs_http_reply_problem(req, 400, "malformed-request", "Bad Request", detail, NULL, NULL);
}

/* limit: absent → def; not an integer in 1..100 → 400 (false). */
static bool parse_limit(cqrs_http_request_t *req, int def, size_t *out)
{
    const char *s = cqrs_http_query(req, "limit");
    int64_t v = def;
    if (s && (!cqrs_parse_int64(s, &v) || v < 1 || v > 100)) {
        bad(req, "limit must be an integer from 1 to 100");
        return false;
    }
    *out = (size_t)v;
    return true;
}

static char *encode_cursor(const char *tag, const char *member)
{
    size_t len = strlen(tag) + strlen(member) + 8;
    char *raw = malloc(len);
    if (!raw)
        return NULL;
    int n = snprintf(raw, len, "v1|%s|%s", tag, member);
    char *c = cqrs_base64url_encode(raw, (size_t)n);
    free(raw);
    return c;
}

/* The member a cursor points after; NULL (and 400 replied) when it is malformed or belongs to
 * another kind of list. *member stays NULL when there is no cursor. */
static bool decode_cursor(cqrs_http_request_t *req, const char *tag, char **member)
{
    *member = NULL;
    const char *c = cqrs_http_query(req, "cursor");
    if (!c)
        return true;
    size_t len = 0;
    char *raw = strlen(c) <= 16384 ? cqrs_base64url_decode(c, &len) : NULL;
    size_t tlen = strlen(tag);
    if (!raw || len < tlen + 5 || strncmp(raw, "v1|", 3) != 0 || strncmp(raw + 3, tag, tlen) != 0 ||
        raw[3 + tlen] != '|' || memchr(raw, '\0', len)) {
        free(raw);
        bad(req, "the cursor is malformed or belongs to another list or sort order");
        return false;
    }
    *member = strdup(raw + 4 + tlen);
    free(raw);
    return *member != NULL;
}

static cqrs_docstore_t *acquire(cqrs_http_request_t *req, query_ctx_t *ctx)
{
    cqrs_docstore_t *ds = cqrs_docstore_pool_acquire(ctx->pool, ctx->acquire_timeout_ms);
    if (!ds) {
        cqrs_error_t e;
        cqrs_error_set(&e, CQRS_ERR_UNAVAILABLE, "no free Redis connection");
        cqrs_http_reply_error(req, &e);
    }
    return ds;
}

/* The documents of members (id = their last 36 characters; shards[i] the shard member i came
 * from), in order; missing ones skipped. With raw set, the stored JSON texts are appended to it
 * as array elements, as they are (no parsing: a page costs what its bytes cost); otherwise
 * parsed into items. */
static cqrs_err_t load_documents(cqrs_docstore_t *ds, const char *type, char **members,
                                 const int32_t *shards, size_t n, json_t *items, cqrs_text_t *raw,
                                 cqrs_error_t *err)
{
    char(*keys)[CQRS_KEY_MAX] = calloc(n ? n : 1, sizeof *keys);
    const char **kp = calloc(n ? n : 1, sizeof *kp);
    char **jsons = calloc(n ? n : 1, sizeof *jsons);
    cqrs_err_t rc = CQRS_ERR_OK;
    if (!keys || !kp || !jsons) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(members[i]);
        char shard[CQRS_SHARD_MAX];
        query_shard(ds, type, shards[i], shard, sizeof shard);
        cqrs_keys_doc(shard, len >= 36 ? members[i] + len - 36 : "", keys[i], sizeof keys[i]);
        kp[i] = keys[i];
    }
    rc = cqrs_docstore_get_many(ds, kp, n, jsons, err);
    size_t appended = 0;
    for (size_t i = 0; rc == CQRS_ERR_OK && i < n; i++) {
        if (!jsons[i])
            continue;
        if (raw) {
            cqrs_text_printf(raw, "%s%s", appended++ ? "," : "", jsons[i]);
            continue;
        }
        json_t *d = json_loads(jsons[i], 0, NULL);
        if (d)
            json_array_append_new(items, d);
    }
out:
    for (size_t i = 0; jsons && i < n; i++)
        free(jsons[i]);
    free(jsons);
    free(kp);
    free(keys);
    return rc;
}

/* Finishes {"items":[…],"next_cursor":…} (cursors are base64url: no escaping needed). */
static void reply_items(cqrs_http_request_t *req, cqrs_err_t rc, const cqrs_error_t *err,
                        cqrs_text_t *body, const char *next)
{
    if (rc != CQRS_ERR_OK) {
        cqrs_text_free(body);
        cqrs_http_reply_error(req, err);
        return;
    }
    if (next)
        cqrs_text_printf(body, "],\"next_cursor\":\"%s\"}", next);
    else
        cqrs_text_printf(body, "],\"next_cursor\":null}");
    cqrs_http_reply_text(req, 200, "application/json", body->buf ? body->buf : "");
    cqrs_text_free(body);
}

/* A merged page: the members of every shard's list, in order. */
typedef struct page {
    char **members; /* borrowed from the per-shard arrays */
    int32_t *shards;
    size_t n;
    char ***per; /* per shard: its members (owned) */
    size_t *counts;
    int32_t n_shards;
} page_t;

static void page_free(page_t *p)
{
    for (int32_t i = 0; p->per && i < p->n_shards; i++)
        cqrs_docstore_strings_free(p->per[i], p->counts[i]);
    free(p->per);
    free(p->counts);
    free(p->members);
    free(p->shards);
    memset(p, 0, sizeof *p);
}

/* Merges the per-shard arrays (each sorted) into p->members, at most max of them, only those
 * not past `upto` (NULL: no bound). */
static void page_merge(page_t *p, size_t max, const char *upto)
{
    size_t total = 0;
    for (int32_t i = 0; i < p->n_shards; i++)
        total += p->counts[i];
    p->members = calloc(total + 1, sizeof *p->members);
    p->shards = calloc(total + 1, sizeof *p->shards);
    size_t *at = calloc((size_t)p->n_shards + 1, sizeof *at);
    p->n = 0;
    while (p->members && p->shards && at && p->n < max) {
        int32_t best = -1;
        for (int32_t i = 0; i < p->n_shards; i++)
            if (at[i] < p->counts[i] &&
                (best < 0 || strcmp(p->per[i][at[i]], p->per[best][at[best]]) < 0))
                best = i;
        if (best < 0 || (upto && strcmp(p->per[best][at[best]], upto) > 0))
            break;
        p->members[p->n] = p->per[best][at[best]++];
        p->shards[p->n++] = best;
    }
    free(at);
}

/* Reads up to limit members after `after` of the list that key_of names in every shard of
 * type, merged: p->n ≤ limit. */
static cqrs_err_t
read_merged(cqrs_docstore_t *ds, const char *type,
            void (*key_of)(const char *shard, const void *arg, char *out, size_t cap),
            const void *arg, const char *after, size_t limit, page_t *p, cqrs_error_t *err)
{
    memset(p, 0, sizeof *p);
    cqrs_err_t rc = query_shard_count(ds, type, &p->n_shards, err);
    if (rc == CQRS_ERR_NOT_FOUND)
        return CQRS_ERR_OK; /* nothing projected yet: an empty list */
    if (rc != CQRS_ERR_OK)
        return rc;
    size_t n = (size_t)p->n_shards;
    char(*keys)[4608] = calloc(n, sizeof *keys);
    const char **kp = calloc(n, sizeof *kp);
    p->per = calloc(n, sizeof *p->per);
    p->counts = calloc(n, sizeof *p->counts);
    if (!keys || !kp || !p->per || !p->counts) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        char shard[CQRS_SHARD_MAX];
        query_shard(ds, type, (int32_t)i, shard, sizeof shard);
        key_of(shard, arg, keys[i], sizeof keys[i]);
        kp[i] = keys[i];
    }
    rc = cqrs_docstore_range_many(ds, kp, n, after, limit, p->per, p->counts, err);
    if (rc == CQRS_ERR_OK)
        page_merge(p, limit, NULL);
out:
    free(keys);
    free(kp);
    return rc;
}

/* A page of a plain (lexicographic) index: limit + 1 members tell whether more follow. */
static void reply_page(cqrs_http_request_t *req, query_ctx_t *ctx, const char *type,
                       void (*key_of)(const char *shard, const void *arg, char *out, size_t cap),
                       const void *arg, const char *tag, size_t limit, const char *after)
{
    cqrs_docstore_t *ds = acquire(req, ctx);
    if (!ds)
        return;
    page_t p;
    cqrs_error_t err;
    cqrs_text_t body = {0};
    cqrs_text_printf(&body, "{\"items\":[");
    cqrs_err_t rc = read_merged(ds, type, key_of, arg, after, limit + 1, &p, &err);
    char *next = NULL;
    if (rc == CQRS_ERR_OK) {
        size_t page = p.n > limit ? limit : p.n;
        if (p.n > limit)
            next = encode_cursor(tag, p.members[limit - 1]);
        rc = load_documents(ds, type, p.members, p.shards, page, NULL, &body, &err);
    }
    cqrs_docstore_pool_release(ctx->pool, ds);
    page_free(&p);
    reply_items(req, rc, &err, &body, next);
    free(next);
}

typedef struct list_arg {
    int sort;
    const char *category, *status;
} list_arg_t;

static void list_key_of(const char *shard, const void *arg, char *out, size_t cap)
{
    const list_arg_t *a = arg;
    product_list_key(shard, a->sort, a->category, a->status, out, cap);
}

static void customer_key_of(const char *shard, const void *arg, char *out, size_t cap)
{
    customer_orders_key(shard, arg, out, cap);
}

static void top_key_of(const char *shard, const void *arg, char *out, size_t cap)
{
    (void)arg;
    top_products_key(shard, out, cap);
}

/* Search in every shard, merged. A shard whose walk stopped early (its budget spent) is
 * complete only up to where it stopped (its next): the page holds no member past the lowest
 * such point, and the cursor continues from there — so no member is skipped. */
static cqrs_err_t search_merged(cqrs_docstore_t *ds, const cqrs_search_t *base,
                                char *const *word_of, size_t n_words, const list_arg_t *la,
                                page_t *p, char **next_member, cqrs_error_t *err)
{
    memset(p, 0, sizeof *p);
    *next_member = NULL;
    cqrs_err_t rc = query_shard_count(ds, "product", &p->n_shards, err);
    if (rc == CQRS_ERR_NOT_FOUND)
        return CQRS_ERR_OK;
    if (rc != CQRS_ERR_OK)
        return rc;
    size_t n = (size_t)p->n_shards;
    p->per = calloc(n, sizeof *p->per);
    p->counts = calloc(n, sizeof *p->counts);
    if (!p->per || !p->counts)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    char *frontier = NULL; /* the lowest point where a shard stopped early */
    size_t budget = base->budget / n > 100 ? base->budget / n : 100;
    for (size_t i = 0; rc == CQRS_ERR_OK && i < n; i++) {
        char shard[CQRS_SHARD_MAX], index[4608], prefix[CQRS_KEY_MAX];
        char set_keys[MAX_Q_WORDS][CQRS_KEY_MAX];
        const char *sets[MAX_Q_WORDS];
        query_shard(ds, "product", (int32_t)i, shard, sizeof shard);
        product_list_key(shard, la->sort, la->category, la->status, index, sizeof index);
        for (size_t w = 0; w < n_words; w++) {
            word_key(shard, word_of[w], set_keys[w], sizeof set_keys[w]);
            sets[w] = set_keys[w];
        }
        cqrs_keys_doc(shard, "", prefix, sizeof prefix);
        cqrs_search_t q = *base;
        q.index = index;
        q.sets = sets;
        q.budget = budget;
        q.doc_prefix = prefix;
        q.doc_suffix = "";
        char *stop = NULL;
        rc = cqrs_docstore_search(ds, &q, &p->per[i], &p->counts[i], &stop, err);
        if (stop && (!frontier || strcmp(stop, frontier) < 0)) {
            free(frontier);
            frontier = stop;
        } else {
            free(stop);
        }
    }
    if (rc == CQRS_ERR_OK) {
        page_merge(p, base->limit, frontier);
        if (p->n == base->limit)
            *next_member = strdup(p->members[p->n - 1]);
        else if (frontier)
            *next_member = strdup(frontier);
    }
    free(frontier);
    return rc;
}

void product_list_handler(cqrs_http_request_t *req, void *ud)
{
    query_ctx_t *ctx = ud;
    static const char *const names[] = {"category", "status", "q", "sort", "limit", "cursor", NULL};
    if (!query_only_params(req, names))
        return;
    const char *sort_s = cqrs_http_query(req, "sort");
    int sort = sort_s ? product_sort_parse(sort_s) : SORT_NAME;
    if (sort < 0) {
        bad(req, "sort must be one of name, price, -price, -updated");
        return;
    }
    size_t limit;
    if (!parse_limit(req, 20, &limit))
        return;
    const char *status = cqrs_http_query(req, "status");
    if (status && strcmp(status, "active") != 0 && strcmp(status, "discontinued") != 0) {
        bad(req, "status must be active or discontinued");
        return;
    }
    const char *category = cqrs_http_query(req, "category");
    if (category && (!*category || cqrs_utf8_length(category, strlen(category)) > 64)) {
        bad(req, "category must be 1 to 64 characters");
        return;
    }
    const char *q = cqrs_http_query(req, "q");
    static __thread char words[MAX_Q_WORDS + 1][MAX_WORD + 1];
    size_t n_words = 0;
    if (q) {
        if (cqrs_utf8_length(q, strlen(q)) > MAX_Q_CHARS) {
            bad(req, "q must be at most 200 characters");
            return;
        }
        n_words = split_words(q, words, MAX_Q_WORDS + 1);
        if (n_words == 0 || n_words > MAX_Q_WORDS) {
            bad(req, "q must contain 1 to 10 words");
            return;
        }
    }
    char *after = NULL;
    if (!decode_cursor(req, product_sort_names[sort], &after))
        return;
    list_arg_t la = {sort, category, status};
    if (!q) {
        reply_page(req, ctx, "product", list_key_of, &la, product_sort_names[sort], limit, after);
        free(after);
        return;
    }
    char *word_of[MAX_Q_WORDS];
    for (size_t i = 0; i < n_words; i++)
        word_of[i] = words[i];
    char field[16];
    snprintf(field, sizeof field, "k:%s", product_sort_names[sort]);
    cqrs_search_t s = {.n_sets = n_words,
                       .after = after,
                       .limit = limit,
                       .budget = SEARCH_BUDGET,
                       .small_max = SEARCH_SMALL,
                       .sort_field = field};
    cqrs_docstore_t *ds = acquire(req, ctx);
    if (!ds) {
        free(after);
        return;
    }
    char *next_member = NULL, *next = NULL;
    page_t p;
    cqrs_error_t err;
    cqrs_text_t body = {0};
    cqrs_text_printf(&body, "{\"items\":[");
    cqrs_err_t rc = search_merged(ds, &s, word_of, n_words, &la, &p, &next_member, &err);
    if (rc == CQRS_ERR_OK)
        rc = load_documents(ds, "product", p.members, p.shards, p.n, NULL, &body, &err);
    cqrs_docstore_pool_release(ctx->pool, ds);
    if (next_member)
        next = encode_cursor(product_sort_names[sort], next_member);
    page_free(&p);
    free(next_member);
    free(after);
    reply_items(req, rc, &err, &body, next);
    free(next);
}

void customer_orders_handler(cqrs_http_request_t *req, void *ud)
{
    query_ctx_t *ctx = ud;
    static const char *const names[] = {"limit", "cursor", NULL};
    if (!query_only_params(req, names))
        return;
    char id[CQRS_UUID_LEN + 1];
    if (!query_path_id(req, id))
        return;
    size_t limit;
    if (!parse_limit(req, 20, &limit))
        return;
    char *after = NULL;
    if (!decode_cursor(req, "orders", &after))
        return;
    reply_page(req, ctx, "order", customer_key_of, id, "orders", limit, after);
    free(after);
}

void top_products_handler(cqrs_http_request_t *req, void *ud)
{
    query_ctx_t *ctx = ud;
    static const char *const names[] = {"limit", NULL};
    if (!query_only_params(req, names))
        return;
    size_t limit;
    if (!parse_limit(req, 10, &limit))
        return;
    cqrs_docstore_t *ds = acquire(req, ctx);
    if (!ds)
        return;
    page_t p;
    cqrs_error_t err;
    json_t *docs = json_array();
    cqrs_err_t rc = read_merged(ds, "product", top_key_of, NULL, NULL, limit, &p, &err);
    if (rc == CQRS_ERR_OK)
        rc = load_documents(ds, "product", p.members, p.shards, p.n, docs, NULL, &err);
    cqrs_docstore_pool_release(ctx->pool, ds);
    page_free(&p);
    if (rc != CQRS_ERR_OK) {
        json_decref(docs);
        cqrs_http_reply_error(req, &err);
        return;
    }
    json_t *items = json_array();
    size_t i;
    json_t *d;
    json_array_foreach(docs, i, d)
    {
        json_array_append_new(
            items, json_pack("{s:O, s:O, s:O, s:O}", "product_id", json_object_get(d, "id"), "sku",
                             json_object_get(d, "sku"), "name", json_object_get(d, "name"),
                             "units_sold", json_object_get(d, "units_sold")));
    }
    json_decref(docs);
    cqrs_http_reply_json(req, 200, json_pack("{s:o}", "items", items));
}
