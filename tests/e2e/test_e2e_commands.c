/* End-to-end tests of the command API against the real daemon and PostgreSQL:
 *  - every bad-input case of tests/data/http/commands.json (status, problem type, the field
 *    named, and nothing written);
 *  - concurrency: no oversell, no deadlock across crossing lock orders, one winner among
 *    stale If-Match writers;
 *  - Idempotency-Key: replay, replay after a lost response, concurrent twins run once,
 *    another body → 422;
 *  - money at the widest settings: an order whose total does not fit int64 is a 422
 *    order-total-out-of-range with nothing written, never a wrapped total or a 500. */
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

static daemons_t D;

static int setup(void **state)
{
    (void)state;
    testenv_require_stack();
    return daemons_start(&D);
}

static int teardown(void **state)
{
    (void)state;
    daemons_stop(&D);
    return 0;
}

/* POSTs/… JSON to the daemon on port; returns the parsed body (new reference, NULL when not
 * JSON). */
static json_t *call_at(int port, const char *method, const char *path, const char *headers,
                       const char *body, int *status)
{
    httpc_response_t r;
    char h[512];
    snprintf(h, sizeof h, "Content-Type: application/json\r\n%s", headers ? headers : "");
    httpc_request(port, method, path, body ? h : headers, body, body ? strlen(body) : 0, &r);
    *status = r.status;
    json_t *j = r.body ? json_loads(r.body, 0, NULL) : NULL;
    httpc_response_free(&r);
    return j;
}

static json_t *call(const char *method, const char *path, const char *headers, const char *body,
                    int *status)
{
    return call_at(D.cport, method, path, headers, body, status);
}

static char *create_product(const char *currency, int stock)
{
    char body[256], sku[48], id[37];
    cqrs_uuid_v4(id);
    snprintf(sku, sizeof sku, "T-%.12s", id);
    snprintf(body, sizeof body,
             "{\"sku\":\"%s\",\"name\":\"Test\",\"category\":\"test\",\"price_cents\":100,"
             "\"currency\":\"%s\",\"initial_stock\":%d}",
             sku, currency, stock);
    int st;
    json_t *j = call("POST", "/v1/products", NULL, body, &st);
    assert_int_equal(st, 201);
    char *out = strdup(json_string_value(json_object_get(j, "id")));
    json_decref(j);
    return out;
}

static char *place_order(const char *product, int quantity, int *status)
{
    char body[256];
    snprintf(body, sizeof body,
             "{\"customer_id\":\"6f9619ff-8b86-4011-b42d-00c04fc964ff\",\"items\":"
             "[{\"product_id\":\"%s\",\"quantity\":%d}]}",
             product, quantity);
    json_t *j = call("POST", "/v1/orders", NULL, body, status);
    const char *id = json_string_value(json_object_get(j, "id"));
    char *out = id ? strdup(id) : NULL;
    json_decref(j);
    return out;
}

/* Everything a command could have written. */
static char *write_model_state(void)
{
    return pg_text("SELECT format('%s/%s/%s/%s/%s/%s', (SELECT count(*) FROM events),"
                   " (SELECT count(*) FROM products), (SELECT coalesce(sum(version), 0)"
                   " FROM products), (SELECT count(*) FROM orders), (SELECT coalesce(sum(version),"
                   " 0) FROM orders), (SELECT count(*) FROM idempotency_keys))",
                   NULL);
}

static char *substitute(const char *in, const char *const *names, char *const *values, size_t n)
{
    size_t cap = strlen(in) * 2 + 4096;
    char *out = malloc(cap);
    size_t used = 0;
    for (const char *p = in; *p;) {
        bool hit = false;
        for (size_t i = 0; i < n; i++) {
            size_t len = strlen(names[i]);
            if (strncmp(p, names[i], len) == 0) {
                size_t vlen = strlen(values[i]);
                if (used + vlen + 1 >= cap)
                    out = realloc(out, cap = cap * 2 + vlen);
                memcpy(out + used, values[i], vlen);
                used += vlen;
                p += len;
                hit = true;
                break;
            }
        }
        if (!hit) {
            if (used + 2 >= cap)
                out = realloc(out, cap *= 2);
            out[used++] = *p++;
        }
    }
    out[used] = '\0';
    return out;
}

static void test_bad_input_cases(void **state)
{
    (void)state;
    /* Fixtures the cases refer to. */
    char *product = create_product("EUR", 10), *usd = create_product("USD", 10);
    char *disc = create_product("EUR", 10), *other = create_product("EUR", 10);
    int st;
    char path[128];
    snprintf(path, sizeof path, "/v1/products/%s/discontinue", disc);
    json_decref(call("POST", path, NULL, NULL, &st));
    assert_int_equal(st, 200);
    char *order = place_order(other, 1, &st);
    assert_int_equal(st, 201);
    char *cancelled = place_order(other, 1, &st);
    snprintf(path, sizeof path, "/v1/orders/%s/cancel", cancelled);
    json_decref(call("POST", path, NULL, NULL, &st));
    assert_int_equal(st, 200);
    char missing[37];
    cqrs_uuid_v4(missing);
    const char *names[] = {"{product}", "{usd}",       "{discontinued}",
                           "{order}",   "{cancelled}", "{missing}"};
    char *values[] = {product, usd, disc, order, cancelled, missing};

    char file[256];
    snprintf(file, sizeof file, "%s/http/commands.json", CQRS_TEST_DATA);
    json_error_t jerr;
    json_t *cases = json_load_file(file, 0, &jerr);
    assert_non_null(cases);
    assert_true(json_array_size(cases) >= 40);
    size_t i;
    json_t *c;
    json_array_foreach(cases, i, c)
    {
        const char *name = json_string_value(json_object_get(c, "name"));
        char *before = write_model_state();
        char *p = substitute(json_string_value(json_object_get(c, "path")), names, values, 6);
        /* body */
        char *body = NULL;
        size_t len = 0;
        const json_t *hex = json_object_get(c, "body_hex"), *rep = json_object_get(c, "repeat");
        if (hex) {
            const char *h = json_string_value(hex);
            len = strlen(h) / 2;
            body = malloc(len + 1);
            for (size_t k = 0; k < len; k++)
                sscanf(h + 2 * k, "%2hhx", (unsigned char *)&body[k]);
        } else if (rep) {
            const char *pre = json_string_value(json_object_get(rep, "prefix"));
            const char *fill = json_string_value(json_object_get(rep, "fill"));
            const char *suf = json_string_value(json_object_get(rep, "suffix"));
            size_t count = (size_t)json_integer_value(json_object_get(rep, "count"));
            body = malloc(strlen(pre) + count + strlen(suf) + 1);
            len = (size_t)sprintf(body, "%s", pre);
            memset(body + len, fill[0], count);
            len += count;
            len += (size_t)sprintf(body + len, "%s", suf);
        } else {
            body = substitute(json_string_value(json_object_get(c, "body")), names, values, 6);
            len = strlen(body);
        }
        /* headers */
        char headers[1024] = "";
        const json_t *hs = json_object_get(c, "headers");
        if (!hs) {
            strcpy(headers, "Content-Type: application/json\r\n");
        } else {
            const char *k;
            json_t *v;
            json_object_foreach((json_t *)hs, k, v)
            {
                size_t u = strlen(headers);
                snprintf(headers + u, sizeof headers - u, "%s: %s\r\n", k, json_string_value(v));
            }
        }
        httpc_response_t r;
        httpc_request(D.cport, json_string_value(json_object_get(c, "method")), p, headers, body,
                      len, &r);
        int want = (int)json_integer_value(json_object_get(c, "status"));
        if (r.status != want)
            fail_msg("case '%s': expected %d, got %d: %s", name, want, r.status,
                     r.body ? r.body : "");
        char ct[64] = "";
        httpc_header(&r, "Content-Type", ct, sizeof ct);
        if (strcmp(ct, "application/problem+json") != 0)
            fail_msg("case '%s': content type %s", name, ct);
        json_t *prob = json_loads(r.body, 0, NULL);
        if (!prob)
            fail_msg("case '%s': problem body is not JSON", name);
        const char *type = json_string_value(json_object_get(c, "type"));
        char want_type[96];
        snprintf(want_type, sizeof want_type, "urn:cqrs:problem:%s", type);
        if (type && strcmp(json_string_value(json_object_get(prob, "type")), want_type) != 0)
            fail_msg("case '%s': type %s, expected %s", name,
                     json_string_value(json_object_get(prob, "type")), want_type);
        if (json_integer_value(json_object_get(prob, "status")) != want)
            fail_msg("case '%s': problem status differs", name);
        const char *field = json_string_value(json_object_get(c, "field"));
        if (field) {
            bool named = false;
            size_t k;
            json_t *e;
            json_array_foreach(json_object_get(prob, "errors"), k, e)
            {
                const char *f = json_string_value(json_object_get(e, "field"));
                named |= f && strcmp(f, field) == 0;
            }
            if (!named)
                fail_msg("case '%s': no error names '%s': %s", name, field, r.body);
        }
        char *after = write_model_state();
        if (strcmp(before, after) != 0)
            fail_msg("case '%s' changed the write model: %s → %s", name, before, after);
        free(before);
        free(after);
        json_decref(prob);
        httpc_response_free(&r);
        free(body);
        free(p);
    }
    json_decref(cases);
    /* The daemon is still up and serving. */
    free(create_product("EUR", 1));
    free(product);
    free(usd);
    free(disc);
    free(other);
    free(order);
    free(cancelled);
}

/* ---- concurrency ------------------------------------------------------------------------- */

typedef struct job {
    const char *method;
    char path[128];
    char headers[256];
    char body[512];
    int status;
    char replayed[16];
    char *reply;
} job_t;

static void *run_job(void *arg)
{
    job_t *j = arg;
    httpc_response_t r;
    char h[512];
    snprintf(h, sizeof h, "Content-Type: application/json\r\n%s", j->headers);
    httpc_request(D.cport, j->method, j->path, h, j->body, strlen(j->body), &r);
    j->status = r.status;
    httpc_header(&r, "Idempotent-Replayed", j->replayed, sizeof j->replayed);
    j->reply = r.body ? strdup(r.body) : NULL;
    httpc_response_free(&r);
    return NULL;
}

static void run_all(job_t *jobs, int n)
{
    pthread_t *t = calloc((size_t)n, sizeof *t);
    for (int i = 0; i < n; i++)
        pthread_create(&t[i], NULL, run_job, &jobs[i]);
    for (int i = 0; i < n; i++)
        pthread_join(t[i], NULL);
    free(t);
}

static void free_jobs(job_t *jobs, int n)
{
    for (int i = 0; i < n; i++)
        free(jobs[i].reply);
    free(jobs);
}

static void test_no_oversell(void **state)
{
    (void)state;
    char *product = create_product("EUR", 10);
    int n = 50;
    job_t *jobs = calloc((size_t)n, sizeof *jobs);
    for (int i = 0; i < n; i++) {
        jobs[i].method = "POST";
        strcpy(jobs[i].path, "/v1/orders");
        snprintf(jobs[i].body, sizeof jobs[i].body,
                 "{\"customer_id\":\"6f9619ff-8b86-4011-b42d-00c04fc964ff\",\"items\":"
                 "[{\"product_id\":\"%s\",\"quantity\":1}]}",
                 product);
    }
    run_all(jobs, n);
    int ok = 0, conflict = 0;
    for (int i = 0; i < n; i++) {
        if (jobs[i].status == 201)
            ok++;
        else if (jobs[i].status == 409 && strstr(jobs[i].reply, "insufficient-stock"))
            conflict++;
        else
            fail_msg("unexpected answer %d: %s", jobs[i].status, jobs[i].reply);
    }
    assert_int_equal(ok, 10);
    assert_int_equal(conflict, 40);
    assert_int_equal(pg_count("SELECT stock FROM products WHERE id = $1", product), 0);
    assert_int_equal(pg_count("SELECT units_sold FROM products WHERE id = $1", product), 10);
    assert_int_equal(pg_count("SELECT count(*) FROM events WHERE aggregate_id = $1", product), 11);
    assert_int_equal(pg_count("SELECT version FROM products WHERE id = $1", product), 11);
    free_jobs(jobs, n);
    free(product);
}

static void test_crossing_lock_orders_never_deadlock(void **state)
{
    (void)state;
    char *a = create_product("EUR", 1000), *b = create_product("EUR", 1000);
    int n = 40;
    job_t *jobs = calloc((size_t)n, sizeof *jobs);
    for (int i = 0; i < n; i++) {
        const char *first = i % 2 ? a : b, *second = i % 2 ? b : a;
        jobs[i].method = "POST";
        strcpy(jobs[i].path, "/v1/orders");
        snprintf(jobs[i].body, sizeof jobs[i].body,
                 "{\"customer_id\":\"6f9619ff-8b86-4011-b42d-00c04fc964ff\",\"items\":"
                 "[{\"product_id\":\"%s\",\"quantity\":1},{\"product_id\":\"%s\",\"quantity\":2}]}",
                 first, second);
    }
    run_all(jobs, n);
    for (int i = 0; i < n; i++)
        if (jobs[i].status != 201)
            fail_msg("order %d: %d %s", i, jobs[i].status, jobs[i].reply);
    /* 20 orders take 1 of a and 2 of b, 20 the other way round: 60 of each. */
    assert_int_equal(pg_count("SELECT stock FROM products WHERE id = $1", a), 940);
    assert_int_equal(pg_count("SELECT stock FROM products WHERE id = $1", b), 940);
    assert_int_equal(pg_count("SELECT version FROM products WHERE id = $1", a), 41);
    free_jobs(jobs, n);
    free(a);
    free(b);
}

static void test_stale_if_match_has_one_winner(void **state)
{
    (void)state;
    char *p = create_product("EUR", 5);
    int n = 12;
    job_t *jobs = calloc((size_t)n, sizeof *jobs);
    for (int i = 0; i < n; i++) {
        jobs[i].method = "PATCH";
        snprintf(jobs[i].path, sizeof jobs[i].path, "/v1/products/%s", p);
        strcpy(jobs[i].headers, "If-Match: \"1\"\r\n");
        snprintf(jobs[i].body, sizeof jobs[i].body, "{\"name\":\"writer %d\"}", i);
    }
    run_all(jobs, n);
    int won = 0, lost = 0;
    for (int i = 0; i < n; i++) {
        if (jobs[i].status == 200)
            won++;
        else if (jobs[i].status == 412 && strstr(jobs[i].reply, "\"current_version\":2"))
            lost++;
        else
            fail_msg("writer %d: %d %s", i, jobs[i].status, jobs[i].reply);
    }
    assert_int_equal(won, 1);
    assert_int_equal(lost, n - 1);
    assert_int_equal(pg_count("SELECT version FROM products WHERE id = $1", p), 2);
    free_jobs(jobs, n);
    free(p);
}

/* ---- idempotency ------------------------------------------------------------------------- */

static void test_idempotent_replay(void **state)
{
    (void)state;
    char key[80], hdr[128], id[37], body[256];
    cqrs_uuid_v4(id);
    snprintf(key, sizeof key, "create-%s", id);
    snprintf(hdr, sizeof hdr, "Idempotency-Key: %s\r\n", key);
    snprintf(body, sizeof body,
             "{\"sku\":\"I-%.8s\",\"name\":\"Idem\",\"category\":\"t\",\"price_cents\":1,"
             "\"currency\":\"EUR\",\"initial_stock\":1}",
             id);
    job_t first = {.method = "POST", .path = "/v1/products"}, again = first;
    strcpy(first.headers, hdr);
    strcpy(first.body, body);
    run_job(&first);
    assert_int_equal(first.status, 201);
    assert_string_equal(first.replayed, "");
    /* Same body with other key order and spacing: canonically equal. */
    strcpy(again.headers, hdr);
    snprintf(again.body, sizeof again.body,
             "{ \"initial_stock\":1, \"currency\":\"EUR\", \"price_cents\":1, \"category\":\"t\","
             " \"name\":\"Idem\", \"sku\":\"I-%.8s\" }",
             id);
    run_job(&again);
    assert_int_equal(again.status, 201);
    assert_string_equal(again.replayed, "true");
    assert_string_equal(again.reply, first.reply);
    json_t *j = json_loads(first.reply, 0, NULL);
    const char *pid = json_string_value(json_object_get(j, "id"));
    assert_int_equal(pg_count("SELECT count(*) FROM events WHERE aggregate_id = $1", pid), 1);

    /* The same key with another body. */
    job_t other = {.method = "POST", .path = "/v1/products"};
    strcpy(other.headers, hdr);
    snprintf(other.body, sizeof other.body,
             "{\"sku\":\"J-%.8s\",\"name\":\"Idem\",\"category\":\"t\",\"price_cents\":1,"
             "\"currency\":\"EUR\",\"initial_stock\":1}",
             id);
    run_job(&other);
    assert_int_equal(other.status, 422);
    assert_non_null(strstr(other.reply, "urn:cqrs:problem:idempotency-key-reused"));

    /* A business 4xx is stored and replayed too. */
    job_t fail1 = {.method = "POST"}, fail2;
    snprintf(fail1.path, sizeof fail1.path, "/v1/products/%s/stock-adjustments", pid);
    snprintf(fail1.headers, sizeof fail1.headers, "Idempotency-Key: neg-%s\r\n", id);
    strcpy(fail1.body, "{\"delta\":-5,\"reason\":\"too much\"}");
    fail2 = fail1;
    run_job(&fail1);
    assert_int_equal(fail1.status, 409);
    run_job(&fail2);
    assert_int_equal(fail2.status, 409);
    assert_string_equal(fail2.replayed, "true");
    assert_int_equal(pg_count("SELECT version FROM products WHERE id = $1", pid), 1);
    json_decref(j);
    free(first.reply);
    free(again.reply);
    free(other.reply);
    free(fail1.reply);
    free(fail2.reply);
}

static void test_replay_after_lost_response(void **state)
{
    (void)state;
    char *p = create_product("EUR", 5);
    char id[37], raw[1024], body[] = "{\"delta\":3,\"reason\":\"restock\"}";
    cqrs_uuid_v4(id);
    int n = snprintf(raw, sizeof raw,
                     "POST /v1/products/%s/stock-adjustments HTTP/1.1\r\nHost: x\r\n"
                     "Content-Type: application/json\r\nIdempotency-Key: lost-%s\r\n"
                     "Content-Length: %zu\r\n\r\n%s",
                     p, id, strlen(body), body);
    /* The client sends and gives up without reading the answer (a timeout). */
    int fd = httpc_send_only(D.cport, raw, (size_t)n);
    assert_true(fd >= 0);
    /* It retries with the same key: the command ran once, the stored answer comes back. */
    job_t retry = {.method = "POST"};
    snprintf(retry.path, sizeof retry.path, "/v1/products/%s/stock-adjustments", p);
    snprintf(retry.headers, sizeof retry.headers, "Idempotency-Key: lost-%s\r\n", id);
    strcpy(retry.body, body);
    for (int i = 0; i < 50; i++) {
        if (pg_count("SELECT version FROM products WHERE id = $1", p) == 2)
            break;
        usleep(100 * 1000);
    }
    close(fd);
    run_job(&retry);
    assert_int_equal(retry.status, 200);
    assert_string_equal(retry.replayed, "true");
    assert_int_equal(pg_count("SELECT stock FROM products WHERE id = $1", p), 8);
    assert_int_equal(pg_count("SELECT version FROM products WHERE id = $1", p), 2);
    free(retry.reply);
    free(p);
}

static void test_concurrent_twins_run_once(void **state)
{
    (void)state;
    char *p = create_product("EUR", 5);
    char id[37];
    cqrs_uuid_v4(id);
    int n = 8;
    job_t *jobs = calloc((size_t)n, sizeof *jobs);
    for (int i = 0; i < n; i++) {
        jobs[i].method = "POST";
        snprintf(jobs[i].path, sizeof jobs[i].path, "/v1/products/%s/stock-adjustments", p);
        snprintf(jobs[i].headers, sizeof jobs[i].headers, "Idempotency-Key: twin-%s\r\n", id);
        strcpy(jobs[i].body, "{\"delta\":1,\"reason\":\"twin\"}");
    }
    run_all(jobs, n);
    int fresh = 0;
    for (int i = 0; i < n; i++) {
        if (jobs[i].status == 200 && strcmp(jobs[i].replayed, "true") != 0)
            fresh++;
        else if (!(jobs[i].status == 200 ||
                   (jobs[i].status == 409 && strstr(jobs[i].reply, "idempotency-key-in-flight"))))
            fail_msg("twin %d: %d %s", i, jobs[i].status, jobs[i].reply);
    }
    assert_int_equal(fresh, 1);
    assert_int_equal(pg_count("SELECT stock FROM products WHERE id = $1", p), 6);
    assert_int_equal(pg_count("SELECT version FROM products WHERE id = $1", p), 2);
    free_jobs(jobs, n);
    free(p);
}

/* ---- money at the widest settings ---------------------------------------------------------- */

/* The highest CQRS_LIMIT_PRICE_CENTS and CQRS_LIMIT_QUANTITY cqrs-commandd accepts: one line
 * is 10^18 cents, 9 lines fit int64 (9.0e18 ≤ 2^63 − 1 ≈ 9.22e18), 10 do not. */
#define WIDE_PRICE "1000000000000"
#define WIDE_QUANTITY "1000000"
#define WIDE_PRODUCTS 19

/* A cqrs-commandd with those limits, in a PostgreSQL database and on topics of its own: its
 * products are priced beyond the maxima of schemas/events (the default limits), and
 * test_event_schemas reads the shared database's event log. */
static daemons_t W;
static testdb_t WDB;

static int wide_setup(void **state)
{
    (void)state;
    testdb_create(&WDB, "overflow");
    W = D;
    W.commandd = W.queryd = -1;
    char id[CQRS_UUID_LEN + 1];
    cqrs_uuid_v4(id);
    snprintf(W.prefix, sizeof W.prefix, "e2eovf%.8s", id);
    if (daemons_migrate(&W, "migrate-wide") != 0) {
        daemons_dump_logs(&W);
        testdb_drop(&WDB);
        return -1;
    }
    W.cport = free_port();
    W.commandd = daemons_spawn_commandd(
        &W, W.cport, "CQRS_LIMIT_PRICE_CENTS=" WIDE_PRICE ";CQRS_LIMIT_QUANTITY=" WIDE_QUANTITY,
        "commandd-wide");
    if (W.commandd <= 0) {
        testdb_drop(&WDB);
        return -1;
    }
    return 0;
}

static int wide_teardown(void **state)
{
    (void)state;
    daemons_stop_one(&W.commandd);
    testdb_drop(&WDB);
    return 0;
}

/* POST /v1/orders with the first n products at WIDE_QUANTITY each; the answer in *status and
 * the problem type (or "") in type. */
static void place_wide_order(char *const *products, int n, int *status, char *type, size_t cap)
{
    json_t *items = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(items, json_pack("{s:s, s:I}", "product_id", products[i], "quantity",
                                               (json_int_t)atoll(WIDE_QUANTITY)));
    json_t *order = json_pack("{s:s, s:o}", "customer_id", "6f9619ff-8b86-4011-b42d-00c04fc964ff",
                              "items", items);
    char *body = json_dumps(order, JSON_COMPACT);
    json_t *reply = call_at(W.cport, "POST", "/v1/orders", NULL, body, status);
    const char *t = json_string_value(json_object_get(reply, "type"));
    if (t)
        snprintf(type, cap, "%s", t);
    else
        snprintf(type, cap, "(no problem type; total_cents %lld)",
                 (long long)json_integer_value(json_object_get(reply, "total_cents")));
    json_decref(reply);
    free(body);
    json_decref(order);
}

static void test_order_total_out_of_range(void **state)
{
    (void)state;
    char *products[WIDE_PRODUCTS];
    for (int i = 0; i < WIDE_PRODUCTS; i++) {
        char body[256], id[CQRS_UUID_LEN + 1];
        cqrs_uuid_v4(id);
        snprintf(body, sizeof body,
                 "{\"sku\":\"W-%.12s\",\"name\":\"Wide\",\"category\":\"test\",\"price_cents\":"
                 "%s,\"currency\":\"EUR\",\"initial_stock\":%s}",
                 id, WIDE_PRICE, WIDE_QUANTITY);
        int st;
        json_t *j = call_at(W.cport, "POST", "/v1/products", NULL, body, &st);
        assert_int_equal(st, 201);
        products[i] = strdup(json_string_value(json_object_get(j, "id")));
        json_decref(j);
    }
    /* 10 lines wrapped to a negative total (a 500 from the CHECK), 19 to a positive one (a 201
     * with a wrong total); 10 first, so that each meets full stock. */
    const int lines[] = {10, WIDE_PRODUCTS};
    char failures[1024] = "";
    for (size_t k = 0; k < sizeof lines / sizeof lines[0]; k++) {
        char *before = write_model_state(), type[128];
        int st;
        place_wide_order(products, lines[k], &st, type, sizeof type);
        char *after = write_model_state();
        size_t used = strlen(failures);
        if (st != 422 || strcmp(type, "urn:cqrs:problem:order-total-out-of-range") != 0)
            snprintf(failures + used, sizeof failures - used, "%d lines: %d %s; ", lines[k], st,
                     type);
        else if (strcmp(before, after) != 0)
            snprintf(failures + used, sizeof failures - used, "%d lines wrote: %s → %s; ", lines[k],
                     before, after);
        free(before);
        free(after);
    }
    if (failures[0])
        fail_msg("orders over int64 cents: %s", failures);
    assert_int_equal(pg_count("SELECT count(*) FROM orders", NULL), 0);
    assert_int_equal(pg_count("SELECT count(*) FROM products WHERE stock = " WIDE_QUANTITY
                              " AND units_sold = 0",
                              NULL),
                     WIDE_PRODUCTS);

    /* The bound is exact: 9 lines (9 × 10^18 cents) fit and are placed with their true total. */
    int st;
    char type[128];
    place_wide_order(products, 9, &st, type, sizeof type);
    assert_int_equal(st, 201);
    assert_non_null(strstr(type, "total_cents 9000000000000000000"));
    assert_int_equal(
        pg_count("SELECT count(*) FROM orders WHERE total_cents = 9000000000000000000", NULL), 1);
    for (int i = 0; i < WIDE_PRODUCTS; i++)
        free(products[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_input_cases),
        cmocka_unit_test(test_no_oversell),
        cmocka_unit_test(test_crossing_lock_orders_never_deadlock),
        cmocka_unit_test(test_stale_if_match_has_one_winner),
        cmocka_unit_test(test_idempotent_replay),
        cmocka_unit_test(test_replay_after_lost_response),
        cmocka_unit_test(test_concurrent_twins_run_once),
        cmocka_unit_test_setup_teardown(test_order_total_out_of_range, wide_setup, wide_teardown),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
