/* End-to-end: what the field's tools expect of both real daemons (issue 21, "HTTP and JSON"):
 *  - integral numbers are integers however written (72794.0, 1e3), also in the stored product;
 *  - a decoded NUL in a query parameter is 400, never a value cut short;
 *  - HEAD wherever GET: /metrics, /healthz, /readyz and the reads, headers only; Allow lists it;
 *  - a read sent to the command API (the Location it returned) is told the query API serves it;
 *  - a malformed Last-Event-ID is 400;
 *  - an SSE client that leaves is logged at debug, not warn. */
#define _GNU_SOURCE /* strcasestr */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include <cqrs/util.h>

#include "daemons.h"
#include "httpc.h"
#include "testenv.h"

static daemons_t D;
static char product_id[37];

static int setup(void **state)
{
    (void)state;
    testenv_require_stack();
    /* keep-alives often, so a departed stream client is written to (and fails) within a second;
     * debug, so the control of the last test sees the lowered message */
    setenv("CQRS_SSE_KEEPALIVE_MS", "200", 1);
    setenv("CQRS_LOG_LEVEL", "debug", 1);
    int rc = daemons_start(&D);
    unsetenv("CQRS_SSE_KEEPALIVE_MS");
    unsetenv("CQRS_LOG_LEVEL");
    return rc;
}

static int teardown(void **state)
{
    (void)state;
    daemons_stop(&D);
    return 0;
}

static json_t *problem(const httpc_response_t *r, int status, const char *slug)
{
    if (r->status != status)
        fail_msg("expected %d %s, got %d %s", status, slug, r->status, r->body ? r->body : "");
    json_t *p = json_loads(r->body, 0, NULL);
    assert_non_null(p);
    char type[96];
    snprintf(type, sizeof type, "urn:cqrs:problem:%s", slug);
    assert_string_equal(json_string_value(json_object_get(p, "type")), type);
    return p;
}

static void test_integral_numbers_are_integers(void **state)
{
    (void)state;
    char body[512];
    snprintf(body, sizeof body,
             "{\"sku\":\"CONF-%s\",\"name\":\"Integral\",\"category\":\"kitchen\","
             "\"price_cents\":1e3,\"currency\":\"EUR\",\"initial_stock\":72794.0}",
             D.prefix);
    httpc_response_t r;
    httpc_request(D.cport, "POST", "/v1/products", "Content-Type: application/json\r\n", body,
                  strlen(body), &r);
    if (r.status != 201)
        fail_msg("POST /v1/products: %d %s", r.status, r.body);
    json_t *p = json_loads(r.body, 0, NULL);
    snprintf(product_id, sizeof product_id, "%s", json_string_value(json_object_get(p, "id")));
    assert_true(json_is_integer(json_object_get(p, "price_cents")));
    assert_int_equal(json_integer_value(json_object_get(p, "price_cents")), 1000);
    assert_int_equal(json_integer_value(json_object_get(p, "stock")), 72794);
    json_decref(p);
    httpc_response_free(&r);

    char path[128];
    snprintf(path, sizeof path, "/v1/products/%s/stock-adjustments", product_id);
    const char *adjust = "{\"delta\":-4.0,\"reason\":\"integral\"}";
    httpc_request(D.cport, "POST", path, "Content-Type: application/json\r\n", adjust,
                  strlen(adjust), &r);
    assert_int_equal(r.status, 200);
    p = json_loads(r.body, 0, NULL);
    assert_int_equal(json_integer_value(json_object_get(p, "stock")), 72790);
    json_decref(p);
    httpc_response_free(&r);
    /* not integral: 400 as before */
    adjust = "{\"delta\":1.5,\"reason\":\"integral\"}";
    httpc_request(D.cport, "POST", path, "Content-Type: application/json\r\n", adjust,
                  strlen(adjust), &r);
    json_decref(problem(&r, 400, "malformed-request"));
    httpc_response_free(&r);

    /* the query side has it at version 2, stock an integer (a liveness bound, not a timing:
     * a new consumer group on a loaded machine may take more than one wait to get there; each
     * wait shorter than the client's 10 s receive timeout) */
    snprintf(path, sizeof path, "/v1/products/%s?min_version=2&wait_ms=5000", product_id);
    for (int i = 0;; i++) {
        httpc_request(D.qport, "GET", path, NULL, NULL, 0, &r);
        if (r.status != 503 || i == 11)
            break;
        httpc_response_free(&r);
    }
    if (r.status != 200)
        fail_msg("GET %s: %d %s", path, r.status, r.body ? r.body : "");
    p = json_loads(r.body, 0, NULL);
    assert_int_equal(json_integer_value(json_object_get(p, "stock")), 72790);
    json_decref(p);
    httpc_response_free(&r);
}

static void test_nul_in_query_parameter_is_400(void **state)
{
    (void)state;
    const char *paths[] = {"/v1/products?category=kitchen%00zzz", "/v1/products?limit=5%00zzz",
                           "/v1/reports/top-products?limit=5%00"};
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        httpc_response_t r;
        httpc_request(D.qport, "GET", paths[i], NULL, NULL, 0, &r);
        json_t *p = problem(&r, 400, "malformed-request");
        assert_non_null(strstr(json_string_value(json_object_get(p, "detail")), "NUL"));
        json_decref(p);
        httpc_response_free(&r);
    }
    httpc_response_t r;
    httpc_request(D.cport, "POST", "/v1/products?x=%00", "Content-Type: application/json\r\n", "{}",
                  2, &r);
    json_decref(problem(&r, 400, "malformed-request"));
    httpc_response_free(&r);
}

static void test_head_wherever_get(void **state)
{
    (void)state;
    char doc[128];
    snprintf(doc, sizeof doc, "/v1/products/%s", product_id);
    struct {
        int port;
        const char *path;
    } reads[] = {{D.cport, "/metrics"},     {D.cport, "/healthz"},
                 {D.cport, "/readyz"},      {D.qport, "/metrics"},
                 {D.qport, "/healthz"},     {D.qport, "/readyz"},
                 {D.qport, "/v1/products"}, {D.qport, doc},
                 {D.qport, "/nope"},        {D.qport, "/v1/reports/top-products"}};
    for (size_t i = 0; i < sizeof reads / sizeof reads[0]; i++) {
        httpc_response_t get, head;
        httpc_request(reads[i].port, "GET", reads[i].path, NULL, NULL, 0, &get);
        httpc_request(reads[i].port, "HEAD", reads[i].path, NULL, NULL, 0, &head);
        if (head.status != get.status || head.body_len != 0)
            fail_msg("HEAD %s: %d with %zu body bytes; GET: %d", reads[i].path, head.status,
                     head.body_len, get.status);
        char a[128], b[128];
        assert_int_equal(httpc_header(&get, "Content-Type", a, sizeof a), 0);
        assert_int_equal(httpc_header(&head, "Content-Type", b, sizeof b), 0);
        assert_string_equal(a, b);
        if (strcmp(reads[i].path, "/metrics") != 0) { /* a scrape's length moves */
            assert_int_equal(httpc_header(&head, "Content-Length", b, sizeof b), 0);
            assert_int_equal(atol(b), (long)get.body_len);
        }
        httpc_response_free(&get);
        httpc_response_free(&head);
    }
    httpc_response_t r;
    httpc_request(D.qport, "DELETE", "/metrics", NULL, NULL, 0, &r);
    char allow[64];
    assert_int_equal(r.status, 405);
    assert_int_equal(httpc_header(&r, "Allow", allow, sizeof allow), 0);
    assert_string_equal(allow, "GET, HEAD");
    httpc_response_free(&r);
}

static void test_read_sent_to_the_command_api(void **state)
{
    (void)state;
    char loc[128];
    snprintf(loc, sizeof loc, "/v1/products/%s", product_id);
    httpc_response_t r;
    httpc_request(D.cport, "GET", loc, NULL, NULL, 0, &r);
    json_t *p = problem(&r, 405, "method-not-allowed");
    assert_non_null(strstr(json_string_value(json_object_get(p, "detail")), "query API"));
    char allow[64];
    assert_int_equal(httpc_header(&r, "Allow", allow, sizeof allow), 0);
    assert_string_equal(allow, "PATCH");
    json_decref(p);
    httpc_response_free(&r);
    /* an order's Location: no route on the command API at all */
    httpc_request(D.cport, "GET", "/v1/orders/6f9619ff-8b86-4011-b42d-00c04fc964ff", NULL, NULL, 0,
                  &r);
    p = problem(&r, 404, "not-found");
    assert_non_null(strstr(json_string_value(json_object_get(p, "detail")), "query API"));
    json_decref(p);
    httpc_response_free(&r);
    /* other methods keep the plain answer */
    httpc_request(D.cport, "DELETE", loc, NULL, NULL, 0, &r);
    p = problem(&r, 405, "method-not-allowed");
    assert_null(strstr(json_string_value(json_object_get(p, "detail")), "query API"));
    json_decref(p);
    httpc_response_free(&r);
}

static void test_malformed_last_event_id_is_400(void **state)
{
    (void)state;
    char path[128];
    snprintf(path, sizeof path, "/v1/products/%s/stream", product_id);
    const char *bad[] = {"Last-Event-ID: abc\r\n", "Last-Event-ID: -1\r\n", "Last-Event-ID: 1x\r\n",
                         "Last-Event-ID: +3\r\n"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        httpc_response_t r;
        httpc_request(D.qport, "GET", path, bad[i], NULL, 0, &r);
        json_t *p = problem(&r, 400, "malformed-request");
        assert_non_null(strstr(json_string_value(json_object_get(p, "detail")), "Last-Event-ID"));
        json_decref(p);
        httpc_response_free(&r);
    }
}

static int connect_to(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

/* Counts the lines of the queryd log holding all of the given words. */
static int log_lines(const char *a, const char *b)
{
    char file[128];
    snprintf(file, sizeof file, "%s/queryd.log", D.logdir);
    FILE *f = fopen(file, "r");
    assert_non_null(f);
    static char line[65536];
    int n = 0;
    while (fgets(line, sizeof line, f))
        n += strstr(line, a) && strstr(line, b);
    fclose(f);
    return n;
}

static void test_departed_stream_client_is_debug(void **state)
{
    (void)state;
    int before = log_lines("\"level\":\"debug\"", "Failed to send");
    for (int i = 0; i < 3; i++) {
        int fd = connect_to(D.qport);
        assert_true(fd >= 0);
        char req[256];
        int n = snprintf(req, sizeof req, "GET /v1/products/%s/stream HTTP/1.1\r\nHost: t\r\n\r\n",
                         product_id);
        assert_int_equal(send(fd, req, (size_t)n, MSG_NOSIGNAL), n);
        char buf[4096];
        ssize_t got = recv(fd, buf, sizeof buf - 1, 0);
        assert_true(got > 0);
        buf[got] = '\0';
        if (strncmp(buf, "HTTP/1.1 200", 12) != 0) /* the stream is open */
            fail_msg("the stream did not open: %s", buf);
        /* leave at once, unread data pending: the kernel resets the connection */
        close(fd);
    }
    /* keep-alives every 200 ms: the writes to the departed clients fail */
    int lowered = 0;
    for (int i = 0; i < 50 && lowered < 1; i++) {
        usleep(100 * 1000);
        lowered = log_lines("\"level\":\"debug\"", "Failed to send") - before;
    }
    assert_int_equal(log_lines("\"level\":\"warn\"", "Failed to send"), 0);
    /* the control: the failures did happen, and were logged at debug */
    assert_true(lowered >= 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_integral_numbers_are_integers),
        cmocka_unit_test(test_nul_in_query_parameter_is_400),
        cmocka_unit_test(test_head_wherever_get),
        cmocka_unit_test(test_read_sent_to_the_command_api),
        cmocka_unit_test(test_malformed_last_event_id_is_400),
        cmocka_unit_test(test_departed_stream_client_is_debug),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
