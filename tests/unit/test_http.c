/* Unit tests of http.c: route matching (pure), and a real server on a free loopback port for
 * the answers the layer gives before any handler runs (404, 405, 413, 415) and the problem
 * format. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <cqrs/http.h>

#include "httpc.h"

static void echo(cqrs_http_request_t *req, void *ud)
{
    (void)ud;
    size_t len;
    const char *body = cqrs_http_body(req, &len);
    const char *id = cqrs_http_param(req, "id");
    cqrs_http_reply_json(req, 200,
                         json_pack("{s:s?, s:I, s:s}", "id", id, "len", (json_int_t)len, "tp",
                                   cqrs_http_traceparent(req)));
    (void)body;
}

static void silent(cqrs_http_request_t *req, void *ud)
{
    (void)req;
    (void)ud;
}

static const cqrs_http_route_t ROUTES[] = {
    {"GET", "/v1/things/{id}", echo, NULL, "Echo", CQRS_SCOPE_NONE},
    {"PUT", "/v1/things/{id}", echo, NULL, "Echo", CQRS_SCOPE_NONE},
    {"POST", "/v1/things", echo, NULL, "Echo", CQRS_SCOPE_NONE},
    {"POST", "/v1/things/{id}/cancel", echo, NULL, "Echo", CQRS_SCOPE_NONE},
    {"GET", "/v1/silent", silent, NULL, "Silent", CQRS_SCOPE_NONE},
};
#define N_ROUTES (sizeof ROUTES / sizeof ROUTES[0])

static void test_route_match(void **state)
{
    (void)state;
    char scratch[256], allow[64];
    cqrs_http_params_t p;
    const cqrs_http_route_t *r =
        cqrs_http_route_match(ROUTES, N_ROUTES, "GET", "/v1/things/abc", scratch, &p, allow, 64);
    assert_ptr_equal(r, &ROUTES[0]);
    assert_int_equal(p.n, 1);
    assert_string_equal(p.value[0], "abc");
    r = cqrs_http_route_match(ROUTES, N_ROUTES, "POST", "/v1/things/abc/cancel", scratch, &p, allow,
                              64);
    assert_ptr_equal(r, &ROUTES[3]);
    /* path known, method not: NULL with Allow */
    r = cqrs_http_route_match(ROUTES, N_ROUTES, "DELETE", "/v1/things/abc", scratch, &p, allow, 64);
    assert_null(r);
    assert_string_equal(allow, "GET, HEAD, PUT");
    /* HEAD is served by the GET route (RFC 9110 §9.3.2) */
    r = cqrs_http_route_match(ROUTES, N_ROUTES, "HEAD", "/v1/things/abc", scratch, &p, allow, 64);
    assert_ptr_equal(r, &ROUTES[0]);
    assert_string_equal(p.value[0], "abc");
    /* ... and only where GET is */
    r = cqrs_http_route_match(ROUTES, N_ROUTES, "HEAD", "/v1/things", scratch, &p, allow, 64);
    assert_null(r);
    assert_string_equal(allow, "POST");
    /* unknown paths: NULL, empty Allow */
    const char *unknown[] = {
        "/v1/things/", "/v1/things//cancel", "/v1/things/a/b",      "/v1/thing",
        "/",           "v1/things",          "/v1/things/a/cancel/"};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        r = cqrs_http_route_match(ROUTES, N_ROUTES, "GET", unknown[i], scratch, &p, allow, 64);
        assert_null(r);
        assert_string_equal(allow, "");
    }
}

/* A client that hung up is normal (debug); anything else libmicrohttpd reports stays warn. */
static void test_mhd_log_level(void **state)
{
    (void)state;
    assert_int_equal(cqrs_http_mhd_log_level("Failed to send the chunked response body for the "
                                             "request for `/v1/products/x/stream'. Error: The "
                                             "connection was forcibly closed by remote peer"),
                     CQRS_LOG_DEBUG);
    assert_int_equal(cqrs_http_mhd_log_level("Failed to send the response body for the request "
                                             "for `/metrics'. Error: The socket is no longer "
                                             "available for sending"),
                     CQRS_LOG_DEBUG);
    assert_int_equal(cqrs_http_mhd_log_level("Failed to send the response headers for the request "
                                             "for `/'. Error: The socket is not connected"),
                     CQRS_LOG_DEBUG);
    assert_int_equal(
        cqrs_http_mhd_log_level("Connection was closed by remote side with incomplete request."),
        CQRS_LOG_DEBUG);
    assert_int_equal(cqrs_http_mhd_log_level("Failed to send the chunked response body for the "
                                             "request for `/'. Error: Not enough system "
                                             "resources to serve the request"),
                     CQRS_LOG_WARN);
    assert_int_equal(cqrs_http_mhd_log_level("Failed to bind to port 8081: Address in use"),
                     CQRS_LOG_WARN);
}

#define READS_ELSEWHERE "reads are served by the query API"

static cqrs_http_server_t *srv;
static int port;

static int start(void **state)
{
    (void)state;
    cqrs_http_config_t cfg = {.host = "127.0.0.1",
                              .port = 0,
                              .threads = 2,
                              .connection_limit = 64,
                              .connection_timeout_s = 5,
                              .max_body_bytes = 1024,
                              .drain_timeout_ms = 1000,
                              .reads_elsewhere = READS_ELSEWHERE};
    cqrs_error_t err;
    srv = cqrs_http_server_new(&cfg, ROUTES, N_ROUTES, &err);
    if (!srv || cqrs_http_server_start(srv, &err) != CQRS_ERR_OK)
        return -1;
    port = cqrs_http_server_port(srv);
    return port > 0 ? 0 : -1;
}

static int stop(void **state)
{
    (void)state;
    cqrs_http_server_destroy(srv);
    return 0;
}

static json_t *problem(const httpc_response_t *r, int status, const char *slug)
{
    char ct[128];
    assert_int_equal(r->status, status);
    assert_int_equal(httpc_header(r, "Content-Type", ct, sizeof ct), 0);
    assert_string_equal(ct, "application/problem+json");
    json_t *p = json_loads(r->body, 0, NULL);
    assert_non_null(p);
    char type[128];
    snprintf(type, sizeof type, "%s%s", CQRS_PROBLEM_BASE, slug);
    assert_string_equal(json_string_value(json_object_get(p, "type")), type);
    assert_int_equal(json_integer_value(json_object_get(p, "status")), status);
    assert_non_null(json_string_value(json_object_get(p, "title")));
    assert_non_null(json_string_value(json_object_get(p, "detail")));
    return p;
}

static void test_ok_and_request_id(void **state)
{
    (void)state;
    httpc_response_t r;
    assert_int_equal(
        httpc_request(port, "GET", "/v1/things/42",
                      "X-Request-Id: req-1\r\n"
                      "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n",
                      NULL, 0, &r),
        0);
    assert_int_equal(r.status, 200);
    char rid[64];
    assert_int_equal(httpc_header(&r, "X-Request-Id", rid, sizeof rid), 0);
    assert_string_equal(rid, "req-1");
    json_t *b = json_loads(r.body, 0, NULL);
    assert_string_equal(json_string_value(json_object_get(b, "id")), "42");
    assert_string_equal(json_string_value(json_object_get(b, "tp")),
                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    json_decref(b);
    httpc_response_free(&r);
}

static void test_404_and_405(void **state)
{
    (void)state;
    httpc_response_t r;
    httpc_request(port, "GET", "/nope", NULL, NULL, 0, &r);
    json_decref(problem(&r, 404, "not-found"));
    httpc_response_free(&r);
    /* An encoded slash never becomes a path separator. */
    httpc_request(port, "GET", "/v1/things/a%2Fcancel", NULL, NULL, 0, &r);
    assert_int_equal(r.status, 200);
    httpc_response_free(&r);
    httpc_request(port, "POST", "/v1/things/a%2Fcancel", NULL, NULL, 0, &r);
    assert_int_equal(r.status, 405);
    httpc_response_free(&r);
    httpc_request(port, "DELETE", "/v1/things/1", NULL, NULL, 0, &r);
    json_t *p = problem(&r, 405, "method-not-allowed");
    assert_string_equal(json_string_value(json_object_get(p, "detail")),
                        "this resource does not support the method");
    json_decref(p);
    char allow[64];
    assert_int_equal(httpc_header(&r, "Allow", allow, sizeof allow), 0);
    assert_string_equal(allow, "GET, HEAD, PUT");
    httpc_response_free(&r);
}

/* A GET or HEAD no GET route serves is told where reads are (cfg.reads_elsewhere). */
static void test_reads_elsewhere(void **state)
{
    (void)state;
    httpc_response_t r;
    const char *methods[] = {"GET", "HEAD"};
    for (size_t i = 0; i < 2; i++) {
        httpc_request(port, methods[i], "/v1/things", NULL, NULL, 0, &r);
        assert_int_equal(r.status, 405);
        char allow[64];
        assert_int_equal(httpc_header(&r, "Allow", allow, sizeof allow), 0);
        assert_string_equal(allow, "POST");
        if (i == 0) {
            json_t *p = problem(&r, 405, "method-not-allowed");
            assert_string_equal(json_string_value(json_object_get(p, "detail")), READS_ELSEWHERE);
            json_decref(p);
        }
        httpc_response_free(&r);
    }
    httpc_request(port, "GET", "/v1/nothing/here", NULL, NULL, 0, &r);
    json_t *p = problem(&r, 404, "not-found");
    assert_string_equal(json_string_value(json_object_get(p, "detail")), READS_ELSEWHERE);
    json_decref(p);
    httpc_response_free(&r);
}

/* HEAD: the GET answer's status and headers, no body. */
static void test_head(void **state)
{
    (void)state;
    httpc_response_t get, head;
    httpc_request(port, "GET", "/v1/things/42", NULL, NULL, 0, &get);
    assert_int_equal(get.status, 200);
    httpc_request(port, "HEAD", "/v1/things/42", NULL, NULL, 0, &head);
    assert_int_equal(head.status, 200);
    assert_int_equal(head.body_len, 0);
    char a[64], b[64];
    assert_int_equal(httpc_header(&get, "Content-Type", a, sizeof a), 0);
    assert_int_equal(httpc_header(&head, "Content-Type", b, sizeof b), 0);
    assert_string_equal(a, b);
    assert_int_equal(httpc_header(&head, "Content-Length", b, sizeof b), 0);
    assert_int_equal(atoi(b), (int)get.body_len);
    httpc_response_free(&get);
    httpc_response_free(&head);
}

/* A decoded NUL in a query parameter would cut the C string a handler reads: 400. */
static void test_nul_in_query_is_400(void **state)
{
    (void)state;
    const char *paths[] = {"/v1/things/42?limit=5%00zzz", "/v1/things/42?category=kitchen%00zzz",
                           "/v1/things/42?a%00b=1", "/v1/things/42?ok=1&x=%00"};
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        httpc_response_t r;
        httpc_request(port, "GET", paths[i], NULL, NULL, 0, &r);
        if (r.status != 400)
            fail_msg("%s: %d %s", paths[i], r.status, r.body ? r.body : "");
        json_t *p = problem(&r, 400, "malformed-request");
        assert_non_null(strstr(json_string_value(json_object_get(p, "detail")), "NUL"));
        json_decref(p);
        httpc_response_free(&r);
    }
    /* an encoded NUL-free value still passes */
    httpc_response_t r;
    httpc_request(port, "GET", "/v1/things/42?limit=5%20zzz", NULL, NULL, 0, &r);
    assert_int_equal(r.status, 200);
    httpc_response_free(&r);
}

static void test_413_from_content_length_and_from_chunks(void **state)
{
    (void)state;
    char big[2048];
    memset(big, 'x', sizeof big);
    httpc_response_t r;
    httpc_request(port, "POST", "/v1/things", "Content-Type: application/json\r\n", big, sizeof big,
                  &r);
    json_decref(problem(&r, 413, "payload-too-large"));
    httpc_response_free(&r);

    char raw[4096];
    int n = snprintf(raw, sizeof raw,
                     "POST /v1/things HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     "400\r\n");
    memset(raw + n, 'y', 1024);
    n += 1024;
    n += snprintf(raw + n, sizeof raw - (size_t)n, "\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n");
    httpc_raw(port, raw, (size_t)n, &r);
    json_decref(problem(&r, 413, "payload-too-large"));
    httpc_response_free(&r);

    /* exactly at the limit is fine */
    httpc_request(port, "POST", "/v1/things", "Content-Type: application/json\r\n", big, 1024, &r);
    assert_int_equal(r.status, 200);
    httpc_response_free(&r);
}

static void test_415(void **state)
{
    (void)state;
    httpc_response_t r;
    httpc_request(port, "POST", "/v1/things", "Content-Type: text/plain\r\n", "{}", 2, &r);
    json_decref(problem(&r, 415, "unsupported-media-type"));
    httpc_response_free(&r);
    httpc_request(port, "POST", "/v1/things", NULL, "{}", 2, &r);
    assert_int_equal(r.status, 415);
    httpc_response_free(&r);
    /* an empty body needs no media type; JSON with parameters or a +json suffix is JSON */
    httpc_request(port, "POST", "/v1/things", NULL, NULL, 0, &r);
    assert_int_equal(r.status, 200);
    httpc_response_free(&r);
    httpc_request(port, "POST", "/v1/things", "Content-Type: Application/JSON; charset=utf-8\r\n",
                  "{}", 2, &r);
    assert_int_equal(r.status, 200);
    httpc_response_free(&r);
    httpc_request(port, "POST", "/v1/things", "Content-Type: application/merge-patch+json\r\n",
                  "{}", 2, &r);
    assert_int_equal(r.status, 200);
    httpc_response_free(&r);
}

static void test_handler_without_reply_is_500(void **state)
{
    (void)state;
    httpc_response_t r;
    httpc_request(port, "GET", "/v1/silent", NULL, NULL, 0, &r);
    json_decref(problem(&r, 500, "internal"));
    httpc_response_free(&r);
}

int main(void)
{
    const struct CMUnitTest pure[] = {cmocka_unit_test(test_route_match),
                                      cmocka_unit_test(test_mhd_log_level)};
    const struct CMUnitTest live[] = {
        cmocka_unit_test(test_ok_and_request_id),
        cmocka_unit_test(test_404_and_405),
        cmocka_unit_test(test_reads_elsewhere),
        cmocka_unit_test(test_head),
        cmocka_unit_test(test_nul_in_query_is_400),
        cmocka_unit_test(test_413_from_content_length_and_from_chunks),
        cmocka_unit_test(test_415),
        cmocka_unit_test(test_handler_without_reply_is_500),
    };
    int failed = cmocka_run_group_tests_name("route", pure, NULL, NULL);
    failed += cmocka_run_group_tests_name("server", live, start, stop);
    return failed;
}
