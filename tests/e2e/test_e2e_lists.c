/* End-to-end tests of lists, search and reports through both daemons: a catalogue of 300
 * products; every filter × sort × search combination paged through and compared with the set
 * and order computed here from the command side's answers; paging while other products
 * change; a price change moving a product; a discontinued product leaving the active filter;
 * customer order lists and the top-products ranking after orders and cancellations; bad
 * parameters → 400. Run again as test_e2e_lists_tiny_budget (failpoint lists-tiny-budget):
 * every walk runs out of budget at once, so pages come short or empty with cursors. */
#include <ctype.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include <cqrs/util.h>

#include "daemons.h"
#include "httpc.h"
#include "testenv.h"

#define N 300
static daemons_t D;
static json_t *docs[N]; /* the command side's last answer per product */
static const char *const ADJ[] = {"red", "green", "blue", "shiny", "old"};
static const char *const NOUN[] = {"apple", "kettle", "Lamp", "mug", "chair", "apple pie"};

static json_t *call(int port, const char *method, const char *path, const char *body, int *status)
{
    httpc_response_t r;
    httpc_request(port, method, path, body ? "Content-Type: application/json\r\n" : NULL, body,
                  body ? strlen(body) : 0, &r);
    *status = r.status;
    json_t *j = r.body ? json_loads(r.body, 0, NULL) : NULL;
    httpc_response_free(&r);
    return j;
}

static long long I(const json_t *d, const char *f)
{
    return (long long)json_integer_value(json_object_get(d, f));
}

static const char *S(const json_t *d, const char *f)
{
    const char *s = json_string_value(json_object_get(d, f));
    return s ? s : "";
}

static void wait_projected(int i)
{
    char path[96];
    snprintf(path, sizeof path, "/v1/products/%s", S(docs[i], "id"));
    for (int t = 0; t < 600; t++) {
        int st;
        json_t *d = call(D.qport, "GET", path, NULL, &st);
        bool ok = st == 200 && I(d, "version") == I(docs[i], "version");
        json_decref(d);
        if (ok)
            return;
        usleep(50 * 1000);
    }
    fail_msg("product %d never reached version %lld on the query side", i, I(docs[i], "version"));
}

static int setup(void **state)
{
    (void)state;
    testenv_require_stack();
    D.redis_db = 13; /* the lists must hold this run's products only */
    if (daemons_start(&D) != 0)
        return -1;
    char run[37];
    cqrs_uuid_v4(run);
    for (int i = 0; i < N; i++) {
        char body[512];
        snprintf(body, sizeof body,
                 "{\"sku\":\"L-%.8s-%d\",\"name\":\"%s %s %d\",\"description\":\"%s\","
                 "\"category\":\"%s-c%d\",\"price_cents\":%d,\"currency\":\"EUR\","
                 "\"initial_stock\":100}",
                 run, i, ADJ[i % 5], NOUN[i % 6], i, i % 4 == 0 ? "Great for tea." : "", run, i % 5,
                 (i * 7919) % 1000);
        int st;
        docs[i] = call(D.cport, "POST", "/v1/products", body, &st);
        if (st != 201)
            return -1;
    }
    for (int i = 0; i < N; i += 7) {
        char path[96];
        int st;
        snprintf(path, sizeof path, "/v1/products/%s/discontinue", S(docs[i], "id"));
        json_decref(docs[i]);
        docs[i] = call(D.cport, "POST", path, NULL, &st);
        if (st != 200)
            return -1;
    }
    for (int i = 0; i < N; i++)
        wait_projected(i);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    daemons_stop(&D);
    for (int i = 0; i < N; i++)
        json_decref(docs[i]);
    return 0;
}

/* ---- the expected answers, computed here ---- */

static int g_sort;

static void lower(const char *s, char *out, size_t cap)
{
    size_t n = 0;
    for (; *s && n + 1 < cap; s++)
        out[n++] = (char)tolower((unsigned char)*s);
    out[n] = '\0';
}

static int cmp_docs(const void *a, const void *b)
{
    const json_t *x = *(json_t *const *)a, *y = *(json_t *const *)b;
    int c = 0;
    if (g_sort == 0) {
        char lx[256], ly[256];
        lower(S(x, "name"), lx, sizeof lx);
        lower(S(y, "name"), ly, sizeof ly);
        c = strcmp(lx, ly);
    } else if (g_sort == 1 || g_sort == 2) {
        long long px = I(x, "price_cents"), py = I(y, "price_cents");
        c = px < py ? -1 : px > py;
        if (g_sort == 2)
            c = -c;
    } else {
        c = -strcmp(S(x, "updated_at"), S(y, "updated_at"));
    }
    return c ? c : strcmp(S(x, "id"), S(y, "id"));
}

static bool has_word(const json_t *d, const char *word)
{
    char text[1024];
    snprintf(text, sizeof text, "%s %s", S(d, "name"), S(d, "description"));
    for (char *p = text; *p;) {
        while (*p && !isalnum((unsigned char)*p))
            p++;
        char *w = p;
        while (*p && isalnum((unsigned char)*p)) {
            *p = (char)tolower((unsigned char)*p);
            p++;
        }
        if (p > w && (size_t)(p - w) == strlen(word) && strncmp(w, word, strlen(word)) == 0)
            return true;
    }
    return false;
}

static size_t expected(const char *category, const char *status, const char *q, int sort,
                       json_t **out)
{
    size_t n = 0;
    for (int i = 0; i < N; i++) {
        if (category && strcmp(S(docs[i], "category"), category) != 0)
            continue;
        if (status && strcmp(S(docs[i], "status"), status) != 0)
            continue;
        if (q) {
            char words[128];
            snprintf(words, sizeof words, "%s", q);
            bool all = true;
            for (char *save = NULL, *w = strtok_r(words, " ", &save); w;
                 w = strtok_r(NULL, " ", &save)) {
                char lw[64];
                lower(w, lw, sizeof lw);
                all = all && has_word(docs[i], lw);
            }
            if (!all)
                continue;
        }
        out[n++] = docs[i];
    }
    g_sort = sort;
    qsort(out, n, sizeof *out, cmp_docs);
    return n;
}

/* Pages shorter than the limit that still had a cursor (a walk's budget ran out). */
static int g_short_pages;

/* Pages through a list; returns the ids in order (caller frees). */
static size_t page_through(const char *query, char ids[][40], size_t cap, int limit)
{
    char cursor[8192] = "";
    size_t n = 0;
    for (int pages = 0; pages < 1000; pages++) {
        char path[9000];
        snprintf(path, sizeof path, "/v1/products?%s%slimit=%d%s%s", query, *query ? "&" : "",
                 limit, *cursor ? "&cursor=" : "", cursor);
        int st;
        json_t *page = call(D.qport, "GET", path, NULL, &st);
        if (st != 200)
            fail_msg("GET %s: %d", path, st);
        assert_true(json_array_size(json_object_get(page, "items")) <= (size_t)limit);
        size_t i;
        json_t *it;
        json_array_foreach(json_object_get(page, "items"), i, it)
        {
            if (n < cap)
                snprintf(ids[n], 40, "%s", S(it, "id"));
            n++;
        }
        const char *next = json_string_value(json_object_get(page, "next_cursor"));
        if (!next) {
            json_decref(page);
            break;
        }
        g_short_pages += json_array_size(json_object_get(page, "items")) < (size_t)limit;
        snprintf(cursor, sizeof cursor, "%s", next);
        json_decref(page);
    }
    return n;
}

static void test_every_filter_sort_and_search(void **state)
{
    (void)state;
    static const char *const sorts[] = {"name", "price", "-price", "-updated"};
    char cat[80];
    snprintf(cat, sizeof cat, "%s", S(docs[2], "category"));
    const char *cats[] = {NULL, cat};
    const char *statuses[] = {NULL, "active", "discontinued"};
    const char *qs[] = {NULL, "apple", "RED apple", "tea", "nothing-matches-this"};
    static json_t *want[N];
    static char got[N + 10][40];
    int combos = 0;
    for (int s = 0; s < 4; s++)
        for (int c = 0; c < 2; c++)
            for (int st = 0; st < 3; st++)
                for (int qi = 0; qi < 5; qi++) {
                    char query[512] = "";
                    size_t len = 0;
                    len += (size_t)snprintf(query + len, sizeof query - len, "sort=%s", sorts[s]);
                    if (cats[c])
                        len += (size_t)snprintf(query + len, sizeof query - len, "&category=%s",
                                                cats[c]);
                    if (statuses[st])
                        len += (size_t)snprintf(query + len, sizeof query - len, "&status=%s",
                                                statuses[st]);
                    if (qs[qi]) {
                        char enc[64];
                        snprintf(enc, sizeof enc, "%s", qs[qi]);
                        for (char *p = enc; *p; p++)
                            if (*p == ' ')
                                *p = '+';
                        len += (size_t)snprintf(query + len, sizeof query - len, "&q=%s", enc);
                    }
                    size_t nw = expected(cats[c], statuses[st], qs[qi], s, want);
                    size_t ng = page_through(query, got, N + 10, 17);
                    if (ng != nw)
                        fail_msg("%s: %zu items, expected %zu", query, ng, nw);
                    for (size_t i = 0; i < nw; i++)
                        if (strcmp(got[i], S(want[i], "id")) != 0)
                            fail_msg("%s: item %zu is %s, expected %s", query, i, got[i],
                                     S(want[i], "id"));
                    combos++;
                }
    assert_int_equal(combos, 120);
    /* test_e2e_lists_tiny_budget: the budgets did run out (and the pages above still added
     * up exactly) */
    const char *fp = getenv("CQRS_FAILPOINTS");
    if (fp && strstr(fp, "lists-tiny-budget"))
        assert_true(g_short_pages > 100);
}

typedef struct churn {
    volatile bool stop;
    int changed;
} churn_t;

static void *change_prices(void *arg)
{
    churn_t *c = arg;
    for (int k = 0; !c->stop; k++) {
        int i = (k * 37) % N;
        char path[96], body[64];
        snprintf(path, sizeof path, "/v1/products/%s/price", S(docs[i], "id"));
        snprintf(body, sizeof body, "{\"price_cents\":%d}", (k * 13) % 1000);
        int st;
        json_t *d = call(D.cport, "PUT", path, body, &st);
        if (st == 200) {
            json_decref(docs[i]);
            docs[i] = d;
            c->changed++;
        } else {
            json_decref(d);
        }
    }
    return NULL;
}

static void test_paging_while_others_change(void **state)
{
    (void)state;
    /* Prices change while we page in name order: no name changes, so every product must be
     * seen exactly once. */
    churn_t c = {0};
    pthread_t t;
    pthread_create(&t, NULL, change_prices, &c);
    static char got[N + 10][40];
    size_t n = page_through("sort=name", got, N + 10, 7);
    c.stop = true;
    pthread_join(t, NULL);
    assert_true(c.changed > 0);
    assert_int_equal(n, N);
    for (size_t i = 0; i < n; i++)
        for (size_t k = i + 1; k < n; k++)
            if (strcmp(got[i], got[k]) == 0)
                fail_msg("duplicate %s", got[i]);
    for (int i = 0; i < N; i++)
        wait_projected(i);
}

static void test_price_change_and_discontinue_move_products(void **state)
{
    (void)state;
    int i = 5, st;
    char path[96];
    snprintf(path, sizeof path, "/v1/products/%s/price", S(docs[i], "id"));
    json_decref(docs[i]);
    docs[i] = call(D.cport, "PUT", path, "{\"price_cents\":5000}", &st);
    assert_int_equal(st, 200);
    wait_projected(i);
    json_t *page = call(D.qport, "GET", "/v1/products?sort=-price&limit=1", NULL, &st);
    assert_string_equal(S(json_array_get(json_object_get(page, "items"), 0), "id"),
                        S(docs[i], "id"));
    json_decref(page);

    snprintf(path, sizeof path, "/v1/products/%s/discontinue", S(docs[i], "id"));
    json_decref(docs[i]);
    docs[i] = call(D.cport, "POST", path, NULL, &st);
    assert_int_equal(st, 200);
    wait_projected(i);
    page = call(D.qport, "GET", "/v1/products?sort=-price&status=active&limit=1", NULL, &st);
    assert_string_not_equal(S(json_array_get(json_object_get(page, "items"), 0), "id"),
                            S(docs[i], "id"));
    json_decref(page);
    page = call(D.qport, "GET", "/v1/products?sort=-price&status=discontinued&limit=1", NULL, &st);
    assert_string_equal(S(json_array_get(json_object_get(page, "items"), 0), "id"),
                        S(docs[i], "id"));
    json_decref(page);
}

static void test_customer_orders_and_top_products(void **state)
{
    (void)state;
    char customer[37];
    cqrs_uuid_v4(customer);
    char order_ids[5][40];
    int a = 1, b = 2, st; /* products 1 and 2 are active (not multiples of 7) */
    for (int k = 0; k < 5; k++) {
        char body[512];
        snprintf(body, sizeof body,
                 "{\"customer_id\":\"%s\",\"items\":[{\"product_id\":\"%s\",\"quantity\":%d},"
                 "{\"product_id\":\"%s\",\"quantity\":1}]}",
                 customer, S(docs[a], "id"), k + 1, S(docs[b], "id"));
        json_t *o = call(D.cport, "POST", "/v1/orders", body, &st);
        assert_int_equal(st, 201);
        snprintf(order_ids[k], sizeof order_ids[k], "%s", S(o, "id"));
        json_decref(o);
        usleep(5 * 1000); /* distinct placed_at */
    }
    char path[128];
    snprintf(path, sizeof path, "/v1/orders/%s/cancel", order_ids[4]); /* 5 of a, 1 of b */
    json_decref(call(D.cport, "POST", path, NULL, &st));
    assert_int_equal(st, 200);
    /* a: 1+2+3+4 = 10 sold, b: 4 sold */
    json_t *top = NULL;
    for (int t = 0; t < 600; t++) {
        json_decref(top);
        top = call(D.qport, "GET", "/v1/reports/top-products?limit=100", NULL, &st);
        json_t *first = json_array_get(json_object_get(top, "items"), 0);
        json_t *second = json_array_get(json_object_get(top, "items"), 1);
        if (first && second && I(first, "units_sold") == 10 && I(second, "units_sold") == 4)
            break;
        usleep(50 * 1000);
    }
    json_t *items = json_object_get(top, "items");
    assert_int_equal(json_array_size(items), 2); /* products with none sold are left out */
    assert_string_equal(S(json_array_get(items, 0), "product_id"), S(docs[a], "id"));
    assert_int_equal(I(json_array_get(items, 0), "units_sold"), 10);
    assert_string_equal(S(json_array_get(items, 0), "sku"), S(docs[a], "sku"));
    assert_string_equal(S(json_array_get(items, 1), "product_id"), S(docs[b], "id"));
    json_decref(top);

    /* newest first, paged by 2; the orders' own topic may be projected later than the
     * products': paged through again until all five are there (a hole never fills) */
    snprintf(path, sizeof path, "/v1/customers/%s/orders?limit=2", customer);
    char seen[6][40];
    size_t n = 0;
    for (int t = 0; t < 300 && n != 5; t++, usleep(n == 5 ? 0 : 100 * 1000)) {
        n = 0;
        char cursor[512] = "";
        for (int p = 0; p < 10; p++) {
            char full[1024];
            snprintf(full, sizeof full, "%s%s%s", path, *cursor ? "&cursor=" : "", cursor);
            json_t *page = call(D.qport, "GET", full, NULL, &st);
            assert_int_equal(st, 200);
            size_t i;
            json_t *it;
            json_array_foreach(json_object_get(page, "items"), i, it)
            {
                if (n < 6)
                    snprintf(seen[n], 40, "%s", S(it, "id"));
                n++;
            }
            const char *next = json_string_value(json_object_get(page, "next_cursor"));
            if (!next) {
                json_decref(page);
                break;
            }
            snprintf(cursor, sizeof cursor, "%s", next);
            json_decref(page);
        }
    }
    assert_int_equal(n, 5);
    for (int k = 0; k < 5; k++)
        assert_string_equal(seen[k], order_ids[4 - k]);
}

static void test_bad_parameters(void **state)
{
    (void)state;
    const char *bad[] = {
        "/v1/products?sort=color",
        "/v1/products?limit=0",
        "/v1/products?limit=101",
        "/v1/products?limit=99999999999999999999",
        "/v1/products?limit=ten",
        "/v1/products?cursor=%%%",
        "/v1/products?cursor=bm90LWEtY3Vyc29y",
        "/v1/products?status=sold",
        "/v1/products?colour=red",
        "/v1/products?q=%21%21%21",
        "/v1/products?q=a+b+c+d+e+f+g+h+i+j+k",
        "/v1/reports/top-products?limit=500",
        "/v1/customers/not-a-uuid/orders",
        "/v1/customers/6f9619ff-8b86-4011-b42d-00c04fc964ff/orders?sort=name",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        httpc_response_t r;
        httpc_request(D.qport, "GET", bad[i], NULL, NULL, 0, &r);
        char ct[64] = "";
        httpc_header(&r, "Content-Type", ct, sizeof ct);
        if (r.status != 400 || strcmp(ct, "application/problem+json") != 0)
            fail_msg("%s: %d %s", bad[i], r.status, ct);
        httpc_response_free(&r);
    }
    /* q over 200 characters */
    char longq[300] = "/v1/products?q=";
    memset(longq + strlen(longq), 'a', 210);
    httpc_response_t r;
    httpc_request(D.qport, "GET", longq, NULL, NULL, 0, &r);
    assert_int_equal(r.status, 400);
    httpc_response_free(&r);
    /* a cursor of the name order used with the price order */
    int st;
    json_t *page = call(D.qport, "GET", "/v1/products?limit=1", NULL, &st);
    char path[600];
    snprintf(path, sizeof path, "/v1/products?sort=price&cursor=%s", S(page, "next_cursor"));
    json_decref(page);
    httpc_request(D.qport, "GET", path, NULL, NULL, 0, &r);
    assert_int_equal(r.status, 400);
    httpc_response_free(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_filter_sort_and_search),
        cmocka_unit_test(test_paging_while_others_change),
        cmocka_unit_test(test_price_change_and_discontinue_move_products),
        cmocka_unit_test(test_customer_orders_and_top_products),
        cmocka_unit_test(test_bad_parameters),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
