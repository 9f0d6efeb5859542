/* index.c — the read model's indexes (pure: documents in, index changes out).
 *
 * Every list is a sorted set whose members all have score 0 and sort lexicographically; the
 * member encodes the sort key and ends with the document id, so ties break by ascending id and
 * a page is one ZRANGEBYLEX from the previous page's last member (keyset paging):
 *   name      lower-cased name, 0x01, id
 *   price     13-digit price, id          -price    13-digit (10^13-1 - price), id
 *   -updated  13-digit (10^13-1 - updated_at in ms), id
 * Product lists exist per filter: all, status, category, category + status (4 × 4 sorted
 * sets); a product's members for each sort order are also kept in its document hash (k:<sort>)
 * for search. Every index lives in the shard of the documents it lists (query.h, keys). Words of
 * name and description: one set of product ids per word. Top products: one sorted set by units sold
 * (descending), products with units sold only. Customer orders: one sorted set per customer by
 * placed_at (descending).
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cqrs/util.h>

#include "query.h"

#define MAXV 9999999999999LL

const char *const product_sort_names[PRODUCT_SORTS] = {"name", "price", "-price", "-updated"};

int product_sort_parse(const char *s)
{
    for (int i = 0; i < PRODUCT_SORTS; i++)
        if (strcmp(s, product_sort_names[i]) == 0)
            return i;
    return -1;
}

static const char *str(const json_t *doc, const char *f)
{
    const char *v = json_string_value(json_object_get(doc, f));
    return v ? v : "";
}

static long long num(const json_t *doc, const char *f)
{
    return (long long)json_integer_value(json_object_get(doc, f));
}

/* A number as a sort key of exactly 13 digits: clamped to [0, MAXV], so that MAXV - v never
 * goes negative (a '-' would sort before every digit) and no key grows a 14th digit. Prices
 * (at most 10^12 cents) and times (until 2286) fit; units sold can pass 10^13 at the widest
 * settings (10^7 orders of 10^6), and those products tie and then sort by id. */
static long long key13(long long v)
{
    return v < 0 ? 0 : v > MAXV ? MAXV : v;
}

void product_sort_member(const json_t *doc, int sort, char *out, size_t cap)
{
    const char *id = str(doc, "id");
    switch (sort) {
    case SORT_NAME: {
        size_t n = 0;
        for (const char *p = str(doc, "name"); *p && n + 40 < cap; p++)
            out[n++] = (char)tolower((unsigned char)*p);
        snprintf(out + n, cap - n, "\x01%s", id);
        return;
    }
    case SORT_PRICE:
        snprintf(out, cap, "%013lld%s", key13(num(doc, "price_cents")), id);
        return;
    case SORT_PRICE_DESC:
        snprintf(out, cap, "%013lld%s", MAXV - key13(num(doc, "price_cents")), id);
        return;
    default:
        snprintf(out, cap, "%013lld%s", MAXV - key13(cqrs_time_parse_ms(str(doc, "updated_at"))),
                 id);
        return;
    }
}

void product_list_key(const char *shard, int sort, const char *category, const char *status,
                      char *out, size_t cap)
{
    const char *s = product_sort_names[sort];
    if (category && status)
        snprintf(out, cap, "%sidx:products:%s:c=%s|s=%s", shard, s, category, status);
    else if (category)
        snprintf(out, cap, "%sidx:products:%s:c=%s", shard, s, category);
    else if (status)
        snprintf(out, cap, "%sidx:products:%s:s=%s", shard, s, status);
    else
        snprintf(out, cap, "%sidx:products:%s:all", shard, s);
}

void word_key(const char *shard, const char *word, char *out, size_t cap)
{
    snprintf(out, cap, "%sidx:word:%.64s", shard, word);
}

void top_products_key(const char *shard, char *out, size_t cap)
{
    snprintf(out, cap, "%sidx:top-products", shard);
}

size_t split_words(const char *text, char words[][MAX_WORD + 1], size_t max)
{
    size_t n = 0;
    const unsigned char *p = (const unsigned char *)text;
    while (*p && n < max) {
        while (*p && !(isalnum(*p) || *p >= 0x80))
            p++;
        size_t len = 0;
        char w[MAX_WORD + 1];
        while (*p && (isalnum(*p) || *p >= 0x80)) {
            if (len < MAX_WORD)
                w[len++] = (char)tolower(*p);
            p++;
        }
        if (len == 0)
            continue;
        w[len] = '\0';
        bool dup = false;
        for (size_t i = 0; i < n && !dup; i++)
            dup = strcmp(words[i], w) == 0;
        if (!dup)
            memcpy(words[n++], w, len + 1);
    }
    return n;
}

static size_t doc_words(const json_t *doc, char words[][MAX_WORD + 1], size_t max)
{
    size_t len = strlen(str(doc, "name")) + strlen(str(doc, "description")) + 2;
    char *text = malloc(len);
    if (!text)
        return 0;
    snprintf(text, len, "%s %s", str(doc, "name"), str(doc, "description"));
    size_t n = split_words(text, words, max);
    free(text);
    return n;
}

void top_member(const json_t *doc, char *out, size_t cap)
{
    snprintf(out, cap, "%013lld%s", MAXV - key13(num(doc, "units_sold")), str(doc, "id"));
}

void customer_orders_key(const char *shard, const char *customer_id, char *out, size_t cap)
{
    snprintf(out, cap, "%sidx:customer-orders:%s", shard, customer_id);
}

void customer_order_member(const json_t *doc, char *out, size_t cap)
{
    snprintf(out, cap, "%013lld%s", MAXV - key13(cqrs_time_parse_ms(str(doc, "placed_at"))),
             str(doc, "id"));
}

/* ZREM the old member / ZADD the new one wherever they differ. */
static void move(cqrs_index_ops_t *ops, const char *old_key, const char *old_member,
                 const char *new_key, const char *new_member)
{
    if (old_key && new_key && strcmp(old_key, new_key) == 0 && strcmp(old_member, new_member) == 0)
        return;
    if (old_key)
        cqrs_index_ops_add(ops, CQRS_INDEX_ZREM, old_key, 0, old_member, NULL);
    if (new_key)
        cqrs_index_ops_add(ops, CQRS_INDEX_ZADD, new_key, 0, new_member, NULL);
}

static void product_index(const char *shard, const char *key, const json_t *old, const json_t *next,
                          cqrs_index_ops_t *ops)
{
    char ok[4608], nk[4608], om[4608], nm[4608];
    for (int s = 0; s < PRODUCT_SORTS; s++) {
        if (old)
            product_sort_member(old, s, om, sizeof om);
        product_sort_member(next, s, nm, sizeof nm);
        for (int f = 0; f < 4; f++) {
            bool by_cat = f & 1, by_status = f & 2;
            if (old)
                product_list_key(shard, s, by_cat ? str(old, "category") : NULL,
                                 by_status ? str(old, "status") : NULL, ok, sizeof ok);
            product_list_key(shard, s, by_cat ? str(next, "category") : NULL,
                             by_status ? str(next, "status") : NULL, nk, sizeof nk);
            move(ops, old ? ok : NULL, om, nk, nm);
        }
        char field[16];
        snprintf(field, sizeof field, "k:%s", product_sort_names[s]);
        if (!old || strcmp(om, nm) != 0)
            cqrs_index_ops_add(ops, CQRS_INDEX_HSET, key, 0, field, nm);
    }
    /* words */
    static __thread char ow[MAX_DOC_WORDS][MAX_WORD + 1], nw[MAX_DOC_WORDS][MAX_WORD + 1];
    size_t no = old ? doc_words(old, ow, MAX_DOC_WORDS) : 0;
    size_t nn = doc_words(next, nw, MAX_DOC_WORDS);
    const char *id = str(next, "id");
    for (size_t i = 0; i < no; i++) {
        bool kept = false;
        for (size_t k = 0; k < nn && !kept; k++)
            kept = strcmp(ow[i], nw[k]) == 0;
        if (!kept) {
            word_key(shard, ow[i], ok, sizeof ok);
            cqrs_index_ops_add(ops, CQRS_INDEX_SREM, ok, 0, id, NULL);
        }
    }
    for (size_t k = 0; k < nn; k++) {
        bool had = false;
        for (size_t i = 0; i < no && !had; i++)
            had = strcmp(ow[i], nw[k]) == 0;
        if (!had) {
            word_key(shard, nw[k], nk, sizeof nk);
            cqrs_index_ops_add(ops, CQRS_INDEX_SADD, nk, 0, id, NULL);
        }
    }
    /* top products: only those with units sold */
    bool was = old && num(old, "units_sold") > 0, is = num(next, "units_sold") > 0;
    if (was)
        top_member(old, om, sizeof om);
    if (is)
        top_member(next, nm, sizeof nm);
    char top[CQRS_KEY_MAX];
    top_products_key(shard, top, sizeof top);
    move(ops, was ? top : NULL, om, is ? top : NULL, nm);
}

static void order_index(const char *shard, const json_t *old, const json_t *next,
                        cqrs_index_ops_t *ops)
{
    if (old)
        return; /* customer and placed_at never change */
    char k[CQRS_KEY_MAX], m[128];
    customer_orders_key(shard, str(next, "customer_id"), k, sizeof k);
    customer_order_member(next, m, sizeof m);
    cqrs_index_ops_add(ops, CQRS_INDEX_ZADD, k, 0, m, NULL);
}

void query_index(const char *shard, const char *aggregate_type, const char *key, const json_t *old,
                 const json_t *next, cqrs_index_ops_t *ops)
{
    if (strcmp(aggregate_type, "product") == 0)
        product_index(shard, key, old, next, ops);
    else if (strcmp(aggregate_type, "order") == 0)
        order_index(shard, old, next, ops);
}
