/* index.c — the read model's indexes (pure: documents in, index changes out).
 *
 * Every product list is a sorted set whose members all have score 0 and sort lexicographically
 * (Redis compares bytes): member = sort key, id, category tag, so ties break by ascending id
 * and a page is one ZRANGEBYLEX from the previous page's last member (keyset paging).
 * Members are compact and NUL-free (hiredis and the apply script take C strings):
 *   id        the UUID's 128 bits in 19 bytes of 7 bits each, every byte 0x01–0x80 (value + 1),
 *             most significant first — so bytes compare as the UUID text does
 *   numbers   7 such bytes (49 bits): price, 2^49-1 - price, 2^49-1 - updated_at in ms
 *   name      the lower-cased name and 0x01 (a shorter name sorts before its extensions)
 *   tag       4 bytes: 28 bits of a hash of the category; ordering never reaches it (ids are
 *             unique), it lets a walk of a list filter by category (below)
 * Lists (per shard, query.h keys): for each sort order and status one list
 * (idx:p:<sort>:<status>); for the name order also per category and status
 * (idx:p:name:<status>:c=<category>): five members a product, where there were sixteen.
 * Readers merge the status lists for "any status" (exact, like shards); category with another
 * order walks the status lists keeping the members whose tag matches, within a budget (lists.c),
 * and checks each page's documents, so a tag collision costs a shorter page, never a wrong item.
 * Search: one set of compact ids per word (idx:w:<word>) and one hash of search records
 * (idx:p:rec, compact id → status, tag, numeric keys, name key): what a search needs to place a
 * candidate of a rare word in any list without reading its document. Top products: one sorted set
 * by units sold (descending, 13 digits + id text), products with units sold only. Customer
 * orders: one sorted set per customer by placed_at (descending, 13 digits + id text).
 * Every index lives in the shard of the documents it lists.
 */
#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cqrs/util.h>

#include "query.h"

#define MAXV 9999999999999LL
#define MAXV49 ((1LL << 49) - 1)

const char *const product_sort_names[PRODUCT_SORTS] = {"name", "price", "-price", "-updated"};
const char *const product_statuses[PRODUCT_STATUSES] = {"active", "discontinued"};

int product_sort_parse(const char *s)
{
    for (int i = 0; i < PRODUCT_SORTS; i++)
        if (strcmp(s, product_sort_names[i]) == 0)
            return i;
    return -1;
}

int product_status_index(const char *s)
{
    for (int i = 0; s && i < PRODUCT_STATUSES; i++)
        if (strcmp(s, product_statuses[i]) == 0)
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

/* n bytes of 7 bits (value + 1), most significant first. */
static void put7(uint64_t v, int n, char *out)
{
    for (int i = n - 1; i >= 0; i--, v >>= 7)
        out[i] = (char)((v & 0x7f) + 1);
}

static int hexval(char c)
{
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

/* The 133-bit number 0…2^128-1 of the UUID, cut into 19 groups of 7 bits (the first group's
 * top 5 bits are zero). hi:lo hold the 128 bits. */
bool product_id_encode(const char *uuid, char out[PRODUCT_ID_BYTES + 1])
{
    uint64_t hi = 0, lo = 0;
    int digits = 0;
    for (const char *p = uuid; *p; p++) {
        if (*p == '-')
            continue;
        int v = hexval(*p);
        if (v < 0 || digits == 32)
            return false;
        hi = hi << 4 | lo >> 60;
        lo = lo << 4 | (uint64_t)v;
        digits++;
    }
    if (digits != 32)
        return false;
    for (int i = PRODUCT_ID_BYTES - 1; i >= 0; i--) {
        out[i] = (char)((lo & 0x7f) + 1);
        lo = lo >> 7 | hi << 57;
        hi >>= 7;
    }
    out[PRODUCT_ID_BYTES] = '\0';
    return true;
}

bool product_id_decode(const char *enc, char out[CQRS_UUID_LEN + 1])
{
    uint64_t hi = 0, lo = 0;
    for (int i = 0; i < PRODUCT_ID_BYTES; i++) {
        unsigned c = (unsigned char)enc[i];
        if (c < 1 || c > 0x80 || (i == 0 && c - 1 > 3))
            return false;
        hi = hi << 7 | lo >> 57;
        lo = lo << 7 | (c - 1);
    }
    static const char hex[] = "0123456789abcdef";
    int k = 0;
    for (int d = 0; d < 32; d++) {
        if (d == 8 || d == 12 || d == 16 || d == 20)
            out[k++] = '-';
        uint64_t w = d < 16 ? hi : lo;
        out[k++] = hex[w >> (60 - 4 * (d % 16)) & 0xf];
    }
    out[k] = '\0';
    return true;
}

void product_category_tag(const char *category, char out[PRODUCT_TAG_BYTES + 1])
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)category; *p; p++)
        h = (h ^ *p) * 16777619u;
    put7(h >> 4, PRODUCT_TAG_BYTES, out);
    out[PRODUCT_TAG_BYTES] = '\0';
}

/* The sort key part of a member (NUL-terminated), at most cap - 1 bytes of it. */
static void sort_key(const json_t *doc, int sort, char *out, size_t cap)
{
    long long v;
    switch (sort) {
    case SORT_NAME: {
        size_t n = 0;
        for (const char *p = str(doc, "name"); *p && n + 2 < cap; p++)
            out[n++] = (char)tolower((unsigned char)*p);
        out[n++] = '\x01';
        out[n] = '\0';
        return;
    }
    case SORT_PRICE:
        v = key13(num(doc, "price_cents"));
        break;
    case SORT_PRICE_DESC:
        v = MAXV49 - key13(num(doc, "price_cents"));
        break;
    default:
        v = MAXV49 - key13(cqrs_time_parse_ms(str(doc, "updated_at")));
        break;
    }
    put7((uint64_t)v, PRODUCT_NUM_BYTES, out);
    out[PRODUCT_NUM_BYTES] = '\0';
}

/* An id that is not a UUID (never one from the projection) encodes as zeros. */
static void encoded_id(const char *id, char eid[PRODUCT_ID_BYTES + 1])
{
    if (!product_id_encode(id, eid)) {
        memset(eid, 1, PRODUCT_ID_BYTES);
        eid[PRODUCT_ID_BYTES] = '\0';
    }
}

/* key, id, tag */
static void compose(const char *key, const char *id, const char *category, char *out, size_t cap)
{
    char eid[PRODUCT_ID_BYTES + 1], tag[PRODUCT_TAG_BYTES + 1];
    encoded_id(id, eid);
    product_category_tag(category, tag);
    size_t klen = strlen(key), room = cap > PRODUCT_MEMBER_TAIL ? cap - PRODUCT_MEMBER_TAIL - 1 : 0;
    if (klen > room)
        klen = room;
    if (cap == 0)
        return;
    memcpy(out, key, klen);
    snprintf(out + klen, cap - klen, "%s%s", eid, tag);
}

void product_sort_member(const json_t *doc, int sort, char *out, size_t cap)
{
    char key[PRODUCT_KEY_MAX];
    sort_key(doc, sort, key, sizeof key);
    compose(key, str(doc, "id"), str(doc, "category"), out, cap);
}

bool product_member_id(const char *member, char out[CQRS_UUID_LEN + 1])
{
    size_t len = strlen(member);
    return len >= PRODUCT_MEMBER_TAIL && product_id_decode(member + len - PRODUCT_MEMBER_TAIL, out);
}

bool product_member_has_tag(const char *member, const char *tag)
{
    size_t len = strlen(member);
    return len >= PRODUCT_MEMBER_TAIL &&
           memcmp(member + len - PRODUCT_TAG_BYTES, tag, PRODUCT_TAG_BYTES) == 0;
}

/* record: status (its index + '1'), tag, price, 2^49-1 - price, 2^49-1 - updated, name key */
void product_search_record(const json_t *doc, char *out, size_t cap)
{
    char key[PRODUCT_KEY_MAX];
    size_t n = 0;
    int st = product_status_index(str(doc, "status"));
    char head[2 + PRODUCT_TAG_BYTES + 3 * PRODUCT_NUM_BYTES];
    head[n++] = (char)('1' + (st < 0 ? 9 : st));
    product_category_tag(str(doc, "category"), head + n);
    n += PRODUCT_TAG_BYTES;
    for (int s = SORT_PRICE; s < PRODUCT_SORTS; s++, n += PRODUCT_NUM_BYTES)
        sort_key(doc, s, head + n, sizeof head - n);
    head[n] = '\0';
    sort_key(doc, SORT_NAME, key, sizeof key);
    snprintf(out, cap, "%s%s", head, key);
}

bool product_record_member(const char *eid, const char *record, int sort, char *out, size_t cap,
                           int *status, char tag[PRODUCT_TAG_BYTES + 1])
{
    size_t len = strlen(record), head = 1 + PRODUCT_TAG_BYTES + 3 * PRODUCT_NUM_BYTES;
    if (len < head + 1 || strlen(eid) != PRODUCT_ID_BYTES || cap < len + PRODUCT_MEMBER_TAIL + 1)
        return false;
    *status = record[0] - '1';
    memcpy(tag, record + 1, PRODUCT_TAG_BYTES);
    tag[PRODUCT_TAG_BYTES] = '\0';
    size_t n = 0;
    if (sort == SORT_NAME) {
        memcpy(out, record + head, len - head);
        n = len - head;
    } else {
        memcpy(out, record + 1 + PRODUCT_TAG_BYTES + (size_t)(sort - 1) * PRODUCT_NUM_BYTES,
               PRODUCT_NUM_BYTES);
        n = PRODUCT_NUM_BYTES;
    }
    snprintf(out + n, cap - n, "%s%s", eid, tag);
    return true;
}

void product_list_key(const char *shard, int sort, int status, const char *category, char *out,
                      size_t cap)
{
    const char *s = product_sort_names[sort], *st = product_statuses[status];
    if (category && sort == SORT_NAME)
        snprintf(out, cap, "%sidx:p:%s:%s:c=%s", shard, s, st, category);
    else
        snprintf(out, cap, "%sidx:p:%s:%s", shard, s, st);
}

void product_records_key(const char *shard, char *out, size_t cap)
{
    snprintf(out, cap, "%sidx:p:rec", shard);
}

size_t product_list_entries(const char *shard, const json_t *doc, product_entry_t *out)
{
    int st = product_status_index(str(doc, "status"));
    if (st < 0)
        return 0; /* the projection knows no other status */
    size_t n = 0;
    for (int s = 0; s < PRODUCT_SORTS; s++) {
        char member[PRODUCT_MEMBER_MAX];
        product_sort_member(doc, s, member, sizeof member);
        for (int c = 0; c < (s == SORT_NAME ? 2 : 1); c++, n++) {
            product_list_key(shard, s, st, c ? str(doc, "category") : NULL, out[n].key,
                             sizeof out[n].key);
            snprintf(out[n].member, sizeof out[n].member, "%s", member);
        }
    }
    return n;
}

void word_key(const char *shard, const char *word, char *out, size_t cap)
{
    snprintf(out, cap, "%sidx:w:%.64s", shard, word);
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

static void product_index(const char *shard, const json_t *old, const json_t *next,
                          cqrs_index_ops_t *ops)
{
    static __thread product_entry_t oe[PRODUCT_LISTS], ne[PRODUCT_LISTS];
    size_t no = old ? product_list_entries(shard, old, oe) : 0;
    size_t nn = product_list_entries(shard, next, ne);
    for (size_t i = 0; i < PRODUCT_LISTS; i++)
        move(ops, i < no ? oe[i].key : NULL, i < no ? oe[i].member : "", i < nn ? ne[i].key : NULL,
             i < nn ? ne[i].member : "");
    const char *id = str(next, "id");
    char eid[PRODUCT_ID_BYTES + 1];
    encoded_id(id, eid);
    char orec[PRODUCT_MEMBER_MAX], nrec[PRODUCT_MEMBER_MAX], key[4608];
    if (old)
        product_search_record(old, orec, sizeof orec);
    product_search_record(next, nrec, sizeof nrec);
    if (!old || strcmp(orec, nrec) != 0) {
        product_records_key(shard, key, sizeof key);
        cqrs_index_ops_add(ops, CQRS_INDEX_HSET, key, 0, eid, nrec);
    }
    /* words */
    static __thread char ow[MAX_DOC_WORDS][MAX_WORD + 1], nw[MAX_DOC_WORDS][MAX_WORD + 1];
    size_t wo = old ? doc_words(old, ow, MAX_DOC_WORDS) : 0;
    size_t wn = doc_words(next, nw, MAX_DOC_WORDS);
    for (size_t i = 0; i < wo; i++) {
        bool kept = false;
        for (size_t k = 0; k < wn && !kept; k++)
            kept = strcmp(ow[i], nw[k]) == 0;
        if (!kept) {
            word_key(shard, ow[i], key, sizeof key);
            cqrs_index_ops_add(ops, CQRS_INDEX_SREM, key, 0, eid, NULL);
        }
    }
    for (size_t k = 0; k < wn; k++) {
        bool had = false;
        for (size_t i = 0; i < wo && !had; i++)
            had = strcmp(ow[i], nw[k]) == 0;
        if (!had) {
            word_key(shard, nw[k], key, sizeof key);
            cqrs_index_ops_add(ops, CQRS_INDEX_SADD, key, 0, eid, NULL);
        }
    }
    /* top products: only those with units sold */
    bool was = old && num(old, "units_sold") > 0, is = num(next, "units_sold") > 0;
    if (was)
        top_member(old, orec, sizeof orec);
    if (is)
        top_member(next, nrec, sizeof nrec);
    char top[CQRS_KEY_MAX];
    top_products_key(shard, top, sizeof top);
    move(ops, was ? top : NULL, orec, is ? top : NULL, nrec);
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
    (void)key; /* the document's own hash holds no index fields */
    if (strcmp(aggregate_type, "product") == 0)
        product_index(shard, old, next, ops);
    else if (strcmp(aggregate_type, "order") == 0)
        order_index(shard, old, next, ops);
}
