/* lists.c — GET /v1/products (filters, search, sort, keyset paging),
 * GET /v1/customers/{id}/orders and GET /v1/reports/top-products. Redis only.
 *
 * Every list is kept per shard (query.h, keys) and read from all shards of its topic, merged
 * by member: members are unique (they hold the id) and totally ordered, so "after the last
 * member" is a cursor valid across shards — no duplicates, no holes. Product lists are kept per
 * sort order and status (and, for the name order, per category and status: index.c); "any
 * status" merges the status lists the same way.
 *
 * Cost: a product list by sort order, status and (name order only) category: one pipelined
 * ZRANGEBYLEX of limit + 1 members per shard and status (one round trip; S × statuses ×
 * (limit + 1) members read) and one pipelined read of the page's documents. A category with
 * another sort order walks that order's status lists keeping the category's members: at most
 * LIST_BUDGET members looked at per request (LIST_BUDGET / sources per list, at least 100); when
 * that runs out the page is shorter (even empty) and its next_cursor continues where the walk
 * stopped. With q, per shard: proportional to the rarest word's products when it has at most
 * SEARCH_SMALL of them in the shard (their search records are read and placed here), else the
 * same walk checking every word, at most SEARCH_BUDGET per request. Either way no request reads
 * more than a fixed number of index entries, whatever the catalogue's size.
 *
 * Cursors are opaque: base64url("v2|<sort>|<last member>") (v1 cursors, of the 16-list layout,
 * are refused as malformed).
 */
#include <cqrs/failpoint.h>
#include <cqrs/keyspace.h>
#include <cqrs/metrics.h>
#include <cqrs/util.h>
#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "query.h"

#define SEARCH_SMALL 2000
#define SEARCH_BUDGET 5000
#define LIST_BUDGET 5000
#define WALK_MIN 100
/* a list key: the shard, the family, a category of at most 64 characters (256 bytes) */
#define INDEX_KEY_MAX (CQRS_SHARD_MAX + 320)
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
    int n = snprintf(raw, len, "v2|%s|%s", tag, member);
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
    if (!raw || len < tlen + 5 || strncmp(raw, "v2|", 3) != 0 || strncmp(raw + 3, tag, tlen) != 0 ||
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

/* The id of a member of a list (text, into out): product lists hold compact ids (index.c),
 * top products and customer orders end with the id's text. */
typedef bool (*id_of_fn)(const char *member, char out[CQRS_UUID_LEN + 1]);

static bool text_id_of(const char *member, char out[CQRS_UUID_LEN + 1])
{
    size_t len = strlen(member);
    if (len < CQRS_UUID_LEN)
        return false;
    memcpy(out, member + len - CQRS_UUID_LEN, CQRS_UUID_LEN + 1);
    return true;
}

/* The documents of members (shards[i] the shard member i came from), in order; missing ones
 * skipped, and with category set those of another category (a category tag matched by
 * chance). With raw set, the stored JSON texts are appended to it as array elements, as they
 * are (no parsing unless category is set: a page costs what its bytes cost); otherwise parsed
 * into items. */
static cqrs_err_t load_documents(cqrs_docstore_t *ds, const char *type, id_of_fn id_of,
                                 char **members, const int32_t *shards, size_t n,
                                 const char *category, json_t *items, cqrs_text_t *raw,
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
        char shard[CQRS_SHARD_MAX], id[CQRS_UUID_LEN + 1];
        query_shard(ds, type, shards[i], shard, sizeof shard);
        cqrs_keys_doc(shard, id_of(members[i], id) ? id : "", keys[i], sizeof keys[i]);
        kp[i] = keys[i];
    }
    rc = cqrs_docstore_get_many(ds, kp, n, jsons, err);
    size_t appended = 0;
    for (size_t i = 0; rc == CQRS_ERR_OK && i < n; i++) {
        if (!jsons[i])
            continue;
        json_t *d = raw && !category ? NULL : json_loads(jsons[i], 0, NULL);
        const char *c = d ? json_string_value(json_object_get(d, "category")) : NULL;
        if (category && (!c || strcmp(c, category) != 0)) {
            json_decref(d);
            continue;
        }
        if (raw) {
            json_decref(d);
            cqrs_text_printf(raw, "%s%s", appended++ ? "," : "", jsons[i]);
            continue;
        }
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

/* A merged page: the members of every source (a list of a shard), in order. */
typedef struct page {
    char **members; /* borrowed from the per-source arrays */
    int32_t *shards;
    size_t n;
    char ***per; /* per source: its members (owned) */
    size_t *counts;
    size_t n_sources;
    size_t per_shard; /* sources per shard: source i is in shard i / per_shard */
} page_t;

static void page_free(page_t *p)
{
    for (size_t i = 0; p->per && i < p->n_sources; i++)
        cqrs_docstore_strings_free(p->per[i], p->counts[i]);
    free(p->per);
    free(p->counts);
    free(p->members);
    free(p->shards);
    memset(p, 0, sizeof *p);
}

/* Sizes p for n_shards × per_shard sources; false when out of memory. */
static bool page_alloc(page_t *p, int32_t n_shards, size_t per_shard)
{
    memset(p, 0, sizeof *p);
    p->per_shard = per_shard;
    p->n_sources = (size_t)n_shards * per_shard;
    p->per = calloc(p->n_sources + 1, sizeof *p->per);
    p->counts = calloc(p->n_sources + 1, sizeof *p->counts);
    return p->per && p->counts;
}

/* Merges the per-source arrays (each sorted) into p->members, at most max of them, only those
 * not past `upto` (NULL: no bound). */
static void page_merge(page_t *p, size_t max, const char *upto)
{
    size_t total = 0;
    for (size_t i = 0; i < p->n_sources; i++)
        total += p->counts[i];
    p->members = calloc(total + 1, sizeof *p->members);
    p->shards = calloc(total + 1, sizeof *p->shards);
    size_t *at = calloc(p->n_sources + 1, sizeof *at);
    p->n = 0;
    while (p->members && p->shards && at && p->n < max) {
        size_t best = SIZE_MAX;
        for (size_t i = 0; i < p->n_sources; i++)
            if (at[i] < p->counts[i] &&
                (best == SIZE_MAX || strcmp(p->per[i][at[i]], p->per[best][at[best]]) < 0))
                best = i;
        if (best == SIZE_MAX || (upto && strcmp(p->per[best][at[best]], upto) > 0))
            break;
        /* The same member from two lists of one shard (a status change between their reads:
         * the member has no status in it): once. */
        if (p->n > 0 && strcmp(p->members[p->n - 1], p->per[best][at[best]]) == 0) {
            at[best]++;
            continue;
        }
        p->members[p->n] = p->per[best][at[best]++];
        p->shards[p->n++] = (int32_t)(best / p->per_shard);
    }
    free(at);
}

/* The key of list j (< per_shard) of a shard. */
typedef void (*key_of_fn)(const char *shard, const void *arg, size_t j, char *out, size_t cap);

/* Reads up to limit members after `after` of the lists that key_of names (per_shard of them)
 * in every shard of type, merged: p->n ≤ limit. */
static cqrs_err_t read_merged(cqrs_docstore_t *ds, const char *type, key_of_fn key_of,
                              const void *arg, size_t per_shard, const char *after, size_t limit,
                              page_t *p, cqrs_error_t *err)
{
    memset(p, 0, sizeof *p);
    int32_t n_shards = 0;
    cqrs_err_t rc = query_shard_count(ds, type, &n_shards, err);
    if (rc == CQRS_ERR_NOT_FOUND)
        return CQRS_ERR_OK; /* nothing projected yet: an empty list */
    if (rc != CQRS_ERR_OK)
        return rc;
    size_t n = (size_t)n_shards * per_shard;
    char(*keys)[INDEX_KEY_MAX] = calloc(n, sizeof *keys);
    const char **kp = calloc(n, sizeof *kp);
    if (!keys || !kp || !page_alloc(p, n_shards, per_shard)) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        char shard[CQRS_SHARD_MAX];
        query_shard(ds, type, (int32_t)(i / per_shard), shard, sizeof shard);
        key_of(shard, arg, i % per_shard, keys[i], sizeof keys[i]);
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

/* A page of plain (lexicographic) indexes: limit + 1 members tell whether more follow. */
static void reply_page(cqrs_http_request_t *req, query_ctx_t *ctx, const char *type, id_of_fn id_of,
                       key_of_fn key_of, const void *arg, size_t per_shard, const char *tag,
                       size_t limit, const char *after)
{
    cqrs_docstore_t *ds = acquire(req, ctx);
    if (!ds)
        return;
    page_t p;
    cqrs_error_t err;
    cqrs_text_t body = {0};
    cqrs_text_printf(&body, "{\"items\":[");
    cqrs_err_t rc = read_merged(ds, type, key_of, arg, per_shard, after, limit + 1, &p, &err);
    char *next = NULL;
    if (rc == CQRS_ERR_OK) {
        size_t page = p.n > limit ? limit : p.n;
        if (p.n > limit)
            next = encode_cursor(tag, p.members[limit - 1]);
        rc = load_documents(ds, type, id_of, p.members, p.shards, page, NULL, NULL, &body, &err);
    }
    cqrs_docstore_pool_release(ctx->pool, ds);
    page_free(&p);
    reply_items(req, rc, &err, &body, next);
    free(next);
}

/* A product list request: sort order, category (NULL: any), statuses read (one, or every
 * one). The lists read are the sort order's status lists — by category too for the name order;
 * for another order a category is the tag the walk keeps. */
typedef struct list_arg {
    int sort;
    const char *category;
    int statuses[PRODUCT_STATUSES];
    size_t n_statuses;
    char tag[PRODUCT_TAG_BYTES + 1];
} list_arg_t;

static bool list_walks(const list_arg_t *a)
{
    return a->category && a->sort != SORT_NAME;
}

static void list_key_of(const char *shard, const void *arg, size_t j, char *out, size_t cap)
{
    const list_arg_t *a = arg;
    product_list_key(shard, a->sort, a->statuses[j], a->category, out, cap);
}

static void customer_key_of(const char *shard, const void *arg, size_t j, char *out, size_t cap)
{
    (void)j;
    customer_orders_key(shard, arg, out, cap);
}

static void top_key_of(const char *shard, const void *arg, size_t j, char *out, size_t cap)
{
    (void)arg;
    (void)j;
    top_products_key(shard, out, cap);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The small path's candidates (pairs of compact id, search record) as members of la's lists
 * after `after`, sorted: those of another status (than la's, or than only when ≥ 0) or
 * category tag left out. */
static char **place_candidates(char **items, size_t n_items, const list_arg_t *la, int only,
                               const char *after, size_t *n)
{
    *n = 0;
    char **out = calloc(n_items / 2 + 1, sizeof *out);
    for (size_t i = 0; out && i + 1 < n_items; i += 2) {
        char m[PRODUCT_MEMBER_MAX], tag[PRODUCT_TAG_BYTES + 1];
        int st = -1;
        if (!product_record_member(items[i], items[i + 1], la->sort, m, sizeof m, &st, tag))
            continue;
        bool status_ok = false;
        for (size_t k = 0; k < la->n_statuses; k++)
            status_ok = status_ok || (la->statuses[k] == st && (only < 0 || only == st));
        if (!status_ok || (la->category && strcmp(tag, la->tag) != 0) ||
            (after && strcmp(m, after) <= 0))
            continue;
        if ((out[*n] = strdup(m)) != NULL)
            (*n)++;
    }
    if (out)
        qsort(out, *n, sizeof *out, cmp_str);
    return out;
}

/* A walk of la's lists in every shard (with words: a search), merged. A list whose walk
 * stopped early (its budget spent) is complete only up to where it stopped: the page holds no
 * member past the lowest such point, and the cursor continues from there — so no member is
 * skipped. */
static cqrs_err_t walk_merged(cqrs_docstore_t *ds, const list_arg_t *la, char *const *word_of,
                              size_t n_words, const char *after, size_t limit, page_t *p,
                              char **next_member, cqrs_error_t *err)
{
    memset(p, 0, sizeof *p);
    *next_member = NULL;
    int32_t n_shards = 0;
    cqrs_err_t rc = query_shard_count(ds, "product", &n_shards, err);
    if (rc == CQRS_ERR_NOT_FOUND)
        return CQRS_ERR_OK;
    if (rc != CQRS_ERR_OK)
        return rc;
    if (!page_alloc(p, n_shards, la->n_statuses))
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    char *frontier = NULL; /* the lowest point where a list's walk stopped early */
    size_t total = n_words ? SEARCH_BUDGET : LIST_BUDGET;
    size_t budget = total / p->n_sources > WALK_MIN ? total / p->n_sources : WALK_MIN;
    bool tiny = CQRS_FAILPOINT("lists-tiny-budget"); /* tests: budgets spent at once */
    if (tiny)
        budget = 3;
    for (size_t i = 0; rc == CQRS_ERR_OK && i < p->n_sources; i++) {
        int32_t s = (int32_t)(i / p->per_shard);
        size_t j = i % p->per_shard;
        char shard[CQRS_SHARD_MAX], index[INDEX_KEY_MAX], records[CQRS_KEY_MAX];
        char set_keys[MAX_Q_WORDS][CQRS_KEY_MAX];
        const char *sets[MAX_Q_WORDS];
        query_shard(ds, "product", s, shard, sizeof shard);
        list_key_of(shard, la, j, index, sizeof index);
        product_records_key(shard, records, sizeof records);
        for (size_t w = 0; w < n_words; w++) {
            word_key(shard, word_of[w], set_keys[w], sizeof set_keys[w]);
            sets[w] = set_keys[w];
        }
        cqrs_walk_t q = {.index = index,
                         .records = n_words ? records : NULL,
                         .sets = sets,
                         .n_sets = n_words,
                         .after = after,
                         .limit = limit,
                         .budget = budget,
                         .small_max = tiny ? 0 : SEARCH_SMALL,
                         .suffix = list_walks(la) ? la->tag : NULL,
                         .id_len = PRODUCT_ID_BYTES,
                         .id_skip = PRODUCT_TAG_BYTES};
        char **items = NULL, *stop = NULL;
        size_t n_items = 0;
        bool small = false;
        rc = cqrs_docstore_walk(ds, &q, &items, &n_items, &stop, &small, err);
        if (rc == CQRS_ERR_OK && small) {
            /* every candidate of the shard, whatever the list: placed once, in the shard's
             * first source, whose other lists are then not read (a later list turning small
             * — the words changed meanwhile — keeps its own status only) */
            p->per[i] = place_candidates(items, n_items, la, j == 0 ? -1 : la->statuses[j], after,
                                         &p->counts[i]);
            cqrs_docstore_strings_free(items, n_items);
            free(stop);
            if (j == 0)
                i += p->per_shard - 1;
            continue;
        }
        p->per[i] = items;
        p->counts[i] = n_items;
        if (stop && (!frontier || strcmp(stop, frontier) < 0)) {
            free(frontier);
            frontier = stop;
        } else {
            free(stop);
        }
    }
    if (rc == CQRS_ERR_OK) {
        page_merge(p, limit, frontier);
        if (p->n == limit)
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
    if (status && product_status_index(status) < 0) {
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
    list_arg_t la = {.sort = sort, .category = category};
    if (status)
        la.statuses[la.n_statuses++] = product_status_index(status);
    else
        for (int i = 0; i < PRODUCT_STATUSES; i++)
            la.statuses[la.n_statuses++] = i;
    if (category)
        product_category_tag(category, la.tag);
    if (!q && !list_walks(&la)) {
        reply_page(req, ctx, "product", product_member_id, list_key_of, &la, la.n_statuses,
                   product_sort_names[sort], limit, after);
        free(after);
        return;
    }
    char *word_of[MAX_Q_WORDS];
    for (size_t i = 0; i < n_words; i++)
        word_of[i] = words[i];
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
    cqrs_err_t rc = walk_merged(ds, &la, word_of, n_words, after, limit, &p, &next_member, &err);
    if (rc == CQRS_ERR_OK)
        rc = load_documents(ds, "product", product_member_id, p.members, p.shards, p.n, category,
                            NULL, &body, &err);
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
    reply_page(req, ctx, "order", text_id_of, customer_key_of, id, 1, "orders", limit, after);
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
    cqrs_err_t rc = read_merged(ds, "product", top_key_of, NULL, 1, NULL, limit, &p, &err);
    if (rc == CQRS_ERR_OK)
        rc = load_documents(ds, "product", text_id_of, p.members, p.shards, p.n, NULL, docs, NULL,
                            &err);
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
