/* Hostile input against both real daemons: the corpus tests/data/http/hostile.json (raw
 * requests, each with its expected status and, when the application answers, its problem
 * type; status 0 means the server rightly waits for bytes that never come), then connection
 * abuse — slowloris clients, idle connections past the inactivity timeout, more connections
 * than the per-address limit, clients that never read. After each case both daemons still
 * answer, and nothing was written. */
#define _GNU_SOURCE /* strcasestr */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "daemons.h"
#include "httpc.h"
#include "testenv.h"

static daemons_t D;

static int setup(void **state)
{
    (void)state;
    testenv_require_stack();
    /* tight limits so the abuse tests run in seconds */
    setenv("CQRS_HTTP_TIMEOUT_S", "2", 1);
    setenv("CQRS_HTTP_MAX_CONNECTIONS_PER_IP", "64", 1);
    int rc = daemons_start(&D);
    unsetenv("CQRS_HTTP_TIMEOUT_S");
    unsetenv("CQRS_HTTP_MAX_CONNECTIONS_PER_IP");
    return rc;
}

static int teardown(void **state)
{
    (void)state;
    daemons_stop(&D);
    return 0;
}

static int dial(int port, int wait_ms)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct timeval tv = {wait_ms / 1000, (wait_ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Sends raw and reads the answer's status line and body (NUL-terminated); 0 = no answer. */
static int exchange(int port, const char *raw, size_t len, char *body, size_t cap)
{
    int fd = dial(port, 2000);
    if (fd < 0)
        return -1;
    size_t off = 0;
    while (off < len) {
        ssize_t w = send(fd, raw + off, len - off, MSG_NOSIGNAL);
        if (w <= 0)
            break;
        off += (size_t)w;
    }
    char buf[65536];
    size_t used = 0;
    ssize_t r;
    while (used + 1 < sizeof buf && (r = recv(fd, buf + used, sizeof buf - used - 1, 0)) > 0) {
        used += (size_t)r;
        buf[used] = '\0';
        /* a complete answer: don't wait for a keep-alive connection to time out */
        const char *end = strstr(buf, "\r\n\r\n");
        const char *cl = strcasestr(buf, "\r\nContent-Length:");
        if (end && cl && cl < end && used >= (size_t)(end + 4 - buf) + (size_t)atol(cl + 17))
            break;
    }
    buf[used] = '\0';
    close(fd);
    int status = 0;
    if (sscanf(buf, "HTTP/1.%*d %d", &status) != 1)
        return 0;
    const char *b = strstr(buf, "\r\n\r\n");
    snprintf(body, cap, "%s", b ? b + 4 : "");
    return status;
}

static char *build(const json_t *c, size_t *len)
{
    const json_t *raw = json_object_get(c, "raw");
    if (raw) {
        *len = json_string_length(raw);
        char *out = malloc(*len + 1);
        memcpy(out, json_string_value(raw), *len + 1);
        return out;
    }
    const json_t *r = json_object_get(c, "repeat");
    const char *prefix = json_string_value(json_object_get(r, "prefix"));
    const char *suffix = json_string_value(json_object_get(r, "suffix"));
    const char *fill = json_string_value(json_object_get(r, "fill"));
    const char *line = json_string_value(json_object_get(r, "fill_line"));
    const char *body = json_string_value(json_object_get(r, "body"));
    size_t count = (size_t)json_integer_value(json_object_get(r, "count"));
    size_t cap = strlen(prefix) + (suffix ? strlen(suffix) : 0) + (body ? strlen(body) : 0) +
                 count * ((fill ? strlen(fill) : 0) + (line ? strlen(line) + 8 : 0)) + 64;
    char *out = malloc(cap);
    size_t n = 0;
    if (body) { /* prefix has {len} */
        const char *at = strstr(prefix, "{len}");
        n += (size_t)snprintf(out + n, cap - n, "%.*s%zu%s%s", (int)(at - prefix), prefix,
                              strlen(body), at + 5, body);
    } else {
        n += (size_t)snprintf(out + n, cap - n, "%s", prefix);
        for (size_t i = 0; i < count; i++) {
            if (fill)
                n += (size_t)snprintf(out + n, cap - n, "%s", fill);
            if (line) {
                const char *at = strstr(line, "{i}");
                if (at)
                    n += (size_t)snprintf(out + n, cap - n, "%.*s%zu%s", (int)(at - line), line, i,
                                          at + 3);
                else
                    n += (size_t)snprintf(out + n, cap - n, "%s", line);
            }
        }
        if (suffix)
            n += (size_t)snprintf(out + n, cap - n, "%s", suffix);
    }
    *len = n;
    return out;
}

static void both_alive(const char *after)
{
    httpc_response_t r;
    int ports[] = {D.cport, D.qport};
    for (int i = 0; i < 2; i++) {
        httpc_request(ports[i], "GET", "/healthz", NULL, NULL, 0, &r);
        if (r.status != 200)
            fail_msg("after '%s' the daemon on port %d does not answer", after, ports[i]);
        httpc_response_free(&r);
    }
    assert_int_equal(kill(D.commandd, 0), 0);
    assert_int_equal(kill(D.queryd, 0), 0);
}

static void test_hostile_corpus(void **state)
{
    (void)state;
    char file[256];
    snprintf(file, sizeof file, "%s/http/hostile.json", CQRS_TEST_DATA);
    json_error_t jerr;
    json_t *cases = json_load_file(file, JSON_ALLOW_NUL, &jerr);
    assert_non_null(cases);
    assert_true(json_array_size(cases) >= 40);
    char *before = pg_text("SELECT (SELECT count(*) FROM events) || '/' ||"
                           " (SELECT count(*) FROM products)",
                           NULL);
    size_t i;
    json_t *c;
    json_array_foreach(cases, i, c)
    {
        const char *name = json_string_value(json_object_get(c, "name"));
        int port = strcmp(json_string_value(json_object_get(c, "daemon")), "command") == 0
                       ? D.cport
                       : D.qport;
        size_t len;
        char *raw = build(c, &len);
        char body[65536];
        int got = exchange(port, raw, len, body, sizeof body);
        free(raw);
        int want = (int)json_integer_value(json_object_get(c, "status"));
        if (got != want)
            fail_msg("'%s': status %d, expected %d", name, got, want);
        const char *type = json_string_value(json_object_get(c, "type"));
        if (type) {
            json_t *p = json_loads(body, 0, NULL);
            char want_type[96];
            snprintf(want_type, sizeof want_type, "urn:cqrs:problem:%s", type);
            if (!p || strcmp(json_string_value(json_object_get(p, "type")), want_type) != 0)
                fail_msg("'%s': problem %s, expected %s", name, body, want_type);
            json_decref(p);
        }
        both_alive(name);
    }
    char *after = pg_text("SELECT (SELECT count(*) FROM events) || '/' ||"
                          " (SELECT count(*) FROM products)",
                          NULL);
    assert_string_equal(before, after);
    free(before);
    free(after);
    json_decref(cases);
}

static void test_slowloris_does_not_starve_others(void **state)
{
    (void)state;
    int slow[20];
    const char *req = "GET /v1/products HTTP/1.1\r\nHost: x\r\n";
    for (int i = 0; i < 20; i++)
        slow[i] = dial(D.qport, 500);
    /* a byte every 100 ms from each slow client, while normal clients are served */
    for (size_t k = 0; k < strlen(req); k++) {
        for (int i = 0; i < 20; i++)
            if (slow[i] >= 0)
                send(slow[i], req + k, 1, MSG_NOSIGNAL);
        if (k % 5 == 0) {
            httpc_response_t r;
            httpc_request(D.qport, "GET", "/v1/products?limit=1", NULL, NULL, 0, &r);
            assert_int_equal(r.status, 200);
            httpc_response_free(&r);
        }
        usleep(100 * 1000);
    }
    for (int i = 0; i < 20; i++)
        if (slow[i] >= 0)
            close(slow[i]);
    both_alive("slowloris");
}

static void test_idle_connections_are_closed(void **state)
{
    (void)state;
    int fd = dial(D.qport, 5000);
    assert_true(fd >= 0);
    char b;
    /* CQRS_HTTP_TIMEOUT_S=2: the server closes the silent connection (recv sees EOF) */
    ssize_t r = recv(fd, &b, 1, 0);
    assert_int_equal(r, 0);
    close(fd);
}

static void test_per_address_limit(void **state)
{
    (void)state;
    int fds[80], open_n = 0;
    for (int i = 0; i < 80; i++) {
        fds[i] = dial(D.qport, 500);
        if (fds[i] >= 0)
            open_n++;
    }
    /* past the limit (64) the server closes new connections at once */
    int refused = 0;
    for (int i = 64; i < 80; i++) {
        char b;
        if (fds[i] < 0 || recv(fds[i], &b, 1, 0) == 0)
            refused++;
    }
    assert_true(refused > 0);
    for (int i = 0; i < 80; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    usleep(300 * 1000);
    both_alive("per-address limit");
}

static void test_clients_that_never_read(void **state)
{
    (void)state;
    /* 8 clients pipeline many requests for big pages and never read the answers */
    int fds[8];
    char req[] = "GET /v1/products?limit=100 HTTP/1.1\r\nHost: x\r\n\r\n";
    for (int i = 0; i < 8; i++) {
        fds[i] = dial(D.qport, 200);
        int one = 1024;
        setsockopt(fds[i], SOL_SOCKET, SO_RCVBUF, &one, sizeof one);
        for (int k = 0; k < 200; k++)
            if (send(fds[i], req, sizeof req - 1, MSG_NOSIGNAL | MSG_DONTWAIT) <= 0)
                break;
    }
    for (int k = 0; k < 5; k++) {
        httpc_response_t r;
        httpc_request(D.qport, "GET", "/v1/products?limit=1", NULL, NULL, 0, &r);
        assert_int_equal(r.status, 200);
        httpc_response_free(&r);
    }
    for (int i = 0; i < 8; i++)
        close(fds[i]);
    both_alive("clients that never read");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hostile_corpus),
        cmocka_unit_test(test_slowloris_does_not_starve_others),
        cmocka_unit_test(test_idle_connections_are_closed),
        cmocka_unit_test(test_per_address_limit),
        cmocka_unit_test(test_clients_that_never_read),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
