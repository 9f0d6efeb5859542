/* End-to-end tests of the change feed (issue "read-your-writes, live updates, cache"):
 *  - a command followed at once by GET ?min_version=N answers version N on an instance that
 *    does not project; a version that never comes → 503 version-not-reached after wait_ms;
 *  - 500 waiting reads on an instance with 2 worker threads: other reads still answer, and
 *    one change answers all 500;
 *  - a stream delivers each change in order, keep-alives, Last-Event-ID resumes, the cap on
 *    open streams holds and a client that went away frees its slot;
 *  - reads through the cache while one product is hammered never go backwards and end equal
 *    to Redis; the subscription killed and restored flushes the cache;
 *  - a serving instance is not ready while the read model has no layout (every read would
 *    answer 503), and turns ready once a projector recorded it.
 * Redis database 11 of the stack, flushed at the start. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <cmocka.h>
#include <hiredis/hiredis.h>
#include <jansson.h>

#include <cqrs/util.h>

#include "daemons.h"
#include "httpc.h"
#include "redisdb.h"
#include "testenv.h"

#define REDIS_DB 11
#define MAX_STREAMS 3

static daemons_t D;
static int sport; /* cqrs-queryd with role serve: HTTP only, no projector */
static pid_t serve_pid = -1;
static char redis_url[1024];

static int setup(void **state)
{
    (void)state;
    testenv_require_stack();
    setenv("CQRS_HTTP_THREADS", "2", 1);
    setenv("CQRS_SSE_KEEPALIVE_MS", "400", 1);
    D.redis_db = REDIS_DB;
    if (daemons_start(&D) != 0)
        return -1;
    if (redisdb_url(getenv("CQRS_REDIS_URL"), REDIS_DB, redis_url, sizeof redis_url) != 0)
        return -1;
    setenv("CQRS_QUERY_MAX_STREAMS", "3", 1);
    sport = free_port();
    serve_pid = daemons_spawn_queryd(&D, sport, "serve", "serve");
    unsetenv("CQRS_QUERY_MAX_STREAMS");
    return serve_pid > 0 ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    daemons_stop_one(&serve_pid);
    daemons_stop(&D);
    return 0;
}

static int64_t now_ms(void)
{
    return cqrs_monotonic_ms();
}

static json_t *command(const char *method, const char *path, const char *body)
{
    httpc_response_t r;
    httpc_request(D.cport, method, path, "Content-Type: application/json\r\n", body,
                  body ? strlen(body) : 0, &r);
    if (r.status < 200 || r.status > 299) {
        fprintf(stderr, "%s %s: %d %s\n", method, path, r.status, r.body ? r.body : "");
        fail_msg("command failed with %d", r.status);
    }
    json_t *j = json_loads(r.body, 0, NULL);
    httpc_response_free(&r);
    assert_non_null(j);
    return j;
}

/* Creates a product; returns its id in out. */
static void create_product(const char *sku, char out[37])
{
    char body[256];
    snprintf(
        body, sizeof body,
        "{\"sku\":\"%s-%s\",\"name\":\"Live widget\",\"category\":\"live\",\"price_cents\":100,"
        "\"currency\":\"EUR\",\"initial_stock\":10}",
        D.prefix, sku);
    json_t *doc = command("POST", "/v1/products", body);
    snprintf(out, 37, "%s", json_string_value(json_object_get(doc, "id")));
    json_decref(doc);
}

static int64_t adjust(const char *id)
{
    char path[128];
    snprintf(path, sizeof path, "/v1/products/%s/stock-adjustments", id);
    json_t *doc = command("POST", path, "{\"delta\":1,\"reason\":\"live test\"}");
    int64_t v = json_integer_value(json_object_get(doc, "version"));
    json_decref(doc);
    return v;
}

static int64_t doc_version(const httpc_response_t *r)
{
    json_t *j = json_loads(r->body ? r->body : "", 0, NULL);
    int64_t v = j ? json_integer_value(json_object_get(j, "version")) : -1;
    json_decref(j);
    return v;
}

static void test_min_version_on_serving_instance(void **state)
{
    (void)state;
    for (int i = 0; i < 10; i++) {
        char sku[32], id[37], path[160];
        snprintf(sku, sizeof sku, "RYW-%d", i);
        create_product(sku, id);
        snprintf(path, sizeof path, "/v1/products/%s?min_version=1", id);
        httpc_response_t r;
        httpc_request(sport, "GET", path, NULL, NULL, 0, &r);
        assert_int_equal(r.status, 200);
        assert_int_equal(doc_version(&r), 1);
        httpc_response_free(&r);

        int64_t v = adjust(id);
        assert_int_equal(v, 2);
        snprintf(path, sizeof path, "/v1/products/%s?min_version=2&wait_ms=5000", id);
        httpc_request(sport, "GET", path, NULL, NULL, 0, &r);
        assert_int_equal(r.status, 200);
        assert_int_equal(doc_version(&r), 2);
        char etag[32];
        assert_int_equal(httpc_header(&r, "ETag", etag, sizeof etag), 0);
        assert_string_equal(etag, "\"2\"");
        httpc_response_free(&r);
    }
}

static void test_min_version_timeout_and_bad_params(void **state)
{
    (void)state;
    char id[37], path[160];
    create_product("RYW-TIMEOUT", id);
    snprintf(path, sizeof path, "/v1/products/%s?min_version=99&wait_ms=300", id);
    httpc_response_t r;
    int64_t t0 = now_ms();
    httpc_request(sport, "GET", path, NULL, NULL, 0, &r);
    int64_t took = now_ms() - t0;
    assert_int_equal(r.status, 503);
    assert_non_null(strstr(r.body, "\"urn:cqrs:problem:version-not-reached\""));
    char ra[16];
    assert_int_equal(httpc_header(&r, "Retry-After", ra, sizeof ra), 0);
    httpc_response_free(&r);
    assert_true(took >= 290);
    assert_true(took < 5000);

    /* An absent document counts as version 0: waited for (503), not 404. */
    char absent[37];
    cqrs_uuid_v4(absent);
    snprintf(path, sizeof path, "/v1/products/%s?min_version=1&wait_ms=100", absent);
    httpc_request(sport, "GET", path, NULL, NULL, 0, &r);
    assert_int_equal(r.status, 503);
    httpc_response_free(&r);
    snprintf(path, sizeof path, "/v1/products/%s", absent);
    httpc_request(sport, "GET", path, NULL, NULL, 0, &r);
    assert_int_equal(r.status, 404);
    httpc_response_free(&r);

    const char *bad[] = {"min_version=-1", "min_version=abc", "wait_ms=10001",
                         "min_version=1&wait_ms=x", "min_version=99999999999999999999"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(path, sizeof path, "/v1/products/%s?%s", id, bad[i]);
        httpc_request(sport, "GET", path, NULL, NULL, 0, &r);
        if (r.status != 400)
            fail_msg("%s: %d", bad[i], r.status);
        assert_non_null(strstr(r.body, "malformed-request"));
        httpc_response_free(&r);
    }
}

static int connect_to(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void send_all(int fd, const char *s)
{
    size_t len = strlen(s), off = 0;
    while (off < len) {
        ssize_t n = write(fd, s + off, len - off);
        assert_true(n > 0);
        off += (size_t)n;
    }
}

/* Reads until the peer closes or the buffer holds a complete response with a body of
 * Content-Length bytes; returns the bytes read (NUL-terminated in buf). */
static size_t read_response(int fd, char *buf, size_t cap, int timeout_ms)
{
    size_t len = 0;
    int64_t deadline = now_ms() + timeout_ms;
    while (len + 1 < cap && now_ms() < deadline) {
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, (int)(deadline - now_ms())) <= 0)
            break;
        ssize_t n = read(fd, buf + len, cap - 1 - len);
        if (n <= 0)
            break;
        len += (size_t)n;
        buf[len] = '\0';
        char *end = strstr(buf, "\r\n\r\n");
        char *cl = strcasestr(buf, "Content-Length:");
        if (end && cl && cl < end && (size_t)(end + 4 - buf) + (size_t)atol(cl + 15) <= len)
            break;
    }
    buf[len] = '\0';
    return len;
}

static void test_500_waiters(void **state)
{
    (void)state;
    enum { N = 500 };
    char id[37], req[256];
    create_product("RYW-MANY", id);
    /* Visible on the serving instance first. */
    snprintf(req, sizeof req, "/v1/products/%s?min_version=1", id);
    httpc_response_t r;
    httpc_request(sport, "GET", req, NULL, NULL, 0, &r);
    assert_int_equal(r.status, 200);
    httpc_response_free(&r);

    static int fds[N];
    snprintf(req, sizeof req,
             "GET /v1/products/%s?min_version=2&wait_ms=10000 HTTP/1.1\r\nHost: t\r\n"
             "Connection: close\r\n\r\n",
             id);
    for (int i = 0; i < N; i++) {
        fds[i] = connect_to(sport);
        assert_true(fds[i] >= 0);
        send_all(fds[i], req);
    }
    long long waiting = -1;
    for (int i = 0; i < 100 && waiting != N; i++) {
        usleep(50 * 1000);
        waiting = daemons_metric(sport, "cqrs_query_waiting_reads");
    }
    assert_int_equal(waiting, N);

    /* With 2 worker threads and 500 parked reads, another read still answers. */
    char path[128];
    snprintf(path, sizeof path, "/v1/products/%s", id);
    httpc_request(sport, "GET", path, NULL, NULL, 0, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(doc_version(&r), 1);
    httpc_response_free(&r);

    assert_int_equal(adjust(id), 2);
    static char buf[8192];
    for (int i = 0; i < N; i++) {
        read_response(fds[i], buf, sizeof buf, 10000);
        close(fds[i]);
        if (strncmp(buf, "HTTP/1.1 200", 12) != 0 || !strstr(buf, "\"version\":2"))
            fail_msg("waiter %d got: %.200s", i, buf);
    }
    assert_int_equal(daemons_metric(sport, "cqrs_query_waiting_reads"), 0);
}

/* ---- Server-Sent Events ---- */

typedef struct sse {
    int fd;
    char raw[1 << 16];
    size_t raw_len;
    bool head_done;
    int status;
    size_t pos;         /* parse position in raw (after the head) */
    char text[1 << 16]; /* de-chunked body */
    size_t text_len;
} sse_t;

static int sse_open(sse_t *s, const char *id, const char *last_event_id)
{
    memset(s, 0, sizeof *s);
    s->fd = connect_to(sport);
    if (s->fd < 0)
        return -1;
    char req[512];
    snprintf(req, sizeof req,
             "GET /v1/products/%s/stream HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n"
             "%s%s%s\r\n",
             id, last_event_id ? "Last-Event-ID: " : "", last_event_id ? last_event_id : "",
             last_event_id ? "\r\n" : "");
    send_all(s->fd, req);
    return 0;
}

/* Moves complete chunks from raw into text. */
static void sse_dechunk(sse_t *s)
{
    if (!s->head_done) {
        char *end = strstr(s->raw, "\r\n\r\n");
        if (!end)
            return;
        s->head_done = true;
        s->status = atoi(s->raw + 9);
        s->pos = (size_t)(end + 4 - s->raw);
        if (!strcasestr(s->raw, "Transfer-Encoding: chunked")) {
            /* not chunked (an error answer): take the body as is */
            memcpy(s->text, s->raw + s->pos, s->raw_len - s->pos);
            s->text_len = s->raw_len - s->pos;
            s->pos = s->raw_len;
            return;
        }
    }
    for (;;) {
        char *line_end = strstr(s->raw + s->pos, "\r\n");
        if (!line_end)
            return;
        size_t size = strtoul(s->raw + s->pos, NULL, 16);
        size_t data = (size_t)(line_end + 2 - s->raw);
        if (data + size + 2 > s->raw_len)
            return;
        memcpy(s->text + s->text_len, s->raw + data, size);
        s->text_len += size;
        s->text[s->text_len] = '\0';
        s->pos = data + size + 2;
    }
}

/* Reads for up to timeout_ms or until text contains needle (NULL: read the whole time). */
static bool sse_read(sse_t *s, const char *needle, int timeout_ms)
{
    int64_t deadline = now_ms() + timeout_ms;
    for (;;) {
        if (needle && strstr(s->text, needle))
            return true;
        int64_t left = deadline - now_ms();
        if (left <= 0)
            return false;
        struct pollfd p = {s->fd, POLLIN, 0};
        if (poll(&p, 1, (int)left) <= 0)
            continue;
        ssize_t n = read(s->fd, s->raw + s->raw_len, sizeof s->raw - 1 - s->raw_len);
        if (n <= 0)
            return needle && strstr(s->text, needle);
        s->raw_len += (size_t)n;
        s->raw[s->raw_len] = '\0';
        sse_dechunk(s);
    }
}

/* The ids of the "event: product" messages in text, in order; each message's data must be a
 * document whose version equals its id. */
static size_t sse_ids(const sse_t *s, int64_t *ids, size_t cap)
{
    size_t n = 0;
    const char *p = s->text;
    while ((p = strstr(p, "event: product\nid: ")) && n < cap) {
        int64_t id = atoll(p + 19);
        const char *data = strstr(p, "\ndata: ");
        assert_non_null(data);
        const char *end = strchr(data + 7, '\n');
        assert_non_null(end);
        char *doc = strndup(data + 7, (size_t)(end - data - 7));
        json_t *j = json_loads(doc, 0, NULL);
        free(doc);
        assert_non_null(j);
        assert_int_equal(json_integer_value(json_object_get(j, "version")), id);
        json_decref(j);
        ids[n++] = id;
        p = end;
    }
    return n;
}

static void test_stream_in_order_and_resume(void **state)
{
    (void)state;
    char id[37], path[160];
    create_product("SSE-1", id);
    snprintf(path, sizeof path, "/v1/products/%s?min_version=1", id);
    httpc_response_t r;
    httpc_request(sport, "GET", path, NULL, NULL, 0, &r);
    httpc_response_free(&r);

    static sse_t s;
    assert_int_equal(sse_open(&s, id, NULL), 0);
    assert_true(sse_read(&s, "id: 1\n", 5000));
    assert_int_equal(s.status, 200);
    assert_non_null(strcasestr(s.raw, "Content-Type: text/event-stream"));
    for (int i = 0; i < 10; i++)
        assert_int_equal(adjust(id), 2 + i);
    assert_true(sse_read(&s, "id: 11\n", 10000));
    int64_t ids[64];
    size_t n = sse_ids(&s, ids, 64);
    assert_true(n >= 2);
    assert_int_equal(ids[0], 1);
    for (size_t i = 1; i < n; i++)
        assert_true(ids[i] > ids[i - 1]); /* merged changes allowed, never backwards */
    assert_int_equal(ids[n - 1], 11);
    /* Keep-alive comments (every 400 ms here). */
    assert_true(sse_read(&s, ": keep-alive\n\n", 3000));
    close(s.fd);

    /* Resume with Last-Event-ID: nothing old is repeated, the next change arrives. */
    assert_int_equal(sse_open(&s, id, "11"), 0);
    sse_read(&s, NULL, 900);
    assert_int_equal(s.status, 200);
    assert_null(strstr(s.text, "event: product"));
    assert_non_null(strstr(s.text, ": keep-alive"));
    assert_int_equal(adjust(id), 12);
    assert_true(sse_read(&s, "id: 12\n", 10000));
    n = sse_ids(&s, ids, 64);
    assert_int_equal(n, 1);
    assert_int_equal(ids[0], 12);
    close(s.fd);

    /* A client that is behind gets the current document at once. */
    assert_int_equal(sse_open(&s, id, "5"), 0);
    assert_true(sse_read(&s, "id: 12\n", 5000));
    assert_int_equal(sse_ids(&s, ids, 64), 1);
    close(s.fd);
}

static void test_stream_cap_and_disconnect(void **state)
{
    (void)state;
    char id[37];
    create_product("SSE-CAP", id);
    /* Streams of the previous test are gone once a keep-alive to them failed. */
    long long open = -1;
    for (int i = 0; i < 100 && open != 0; i++) {
        open = daemons_metric(sport, "cqrs_query_open_streams");
        if (open != 0)
            usleep(100 * 1000);
    }
    assert_int_equal(open, 0);
    static sse_t s[MAX_STREAMS + 1];
    for (int i = 0; i < MAX_STREAMS; i++) {
        assert_int_equal(sse_open(&s[i], id, NULL), 0);
        assert_true(sse_read(&s[i], "\n\n", 5000)); /* a message or a keep-alive */
        assert_int_equal(s[i].status, 200);
    }
    assert_int_equal(daemons_metric(sport, "cqrs_query_open_streams"), MAX_STREAMS);
    assert_int_equal(sse_open(&s[MAX_STREAMS], id, NULL), 0);
    assert_true(sse_read(&s[MAX_STREAMS], "overloaded", 5000));
    assert_int_equal(s[MAX_STREAMS].status, 503);
    close(s[MAX_STREAMS].fd);

    /* A client goes away: the next keep-alive write fails and its slot is freed. */
    close(s[0].fd);
    open = -1;
    for (int i = 0; i < 100 && open != MAX_STREAMS - 1; i++) {
        usleep(100 * 1000);
        open = daemons_metric(sport, "cqrs_query_open_streams");
    }
    assert_int_equal(open, MAX_STREAMS - 1);
    assert_int_equal(sse_open(&s[0], id, NULL), 0);
    assert_true(sse_read(&s[0], "\n\n", 5000));
    assert_int_equal(s[0].status, 200);
    for (int i = 0; i < MAX_STREAMS; i++)
        close(s[i].fd);
}

/* ---- the cache ---- */

typedef struct hammer {
    char id[37];
    int n;
} hammer_t;

static void *hammer_main(void *arg)
{
    hammer_t *h = arg;
    for (int i = 0; i < h->n; i++)
        adjust(h->id);
    return NULL;
}

static long long redis_version(const char *id)
{
    char key[CQRS_KEY_MAX];
    assert_int_equal(redisdb_doc_key(redis_url, D.prefix, "product", id, key, sizeof key), 0);
    redisContext *c = redisdb_connect(redis_url);
    assert_non_null(c);
    redisReply *r = redisCommand(c, "HGET %s v", key);
    long long v = r && r->type == REDIS_REPLY_STRING ? atoll(r->str) : -1;
    freeReplyObject(r);
    redisFree(c);
    return v;
}

static void test_cache_never_goes_backwards(void **state)
{
    (void)state;
    static hammer_t h = {.n = 150};
    create_product("CACHE-HAMMER", h.id);
    char path[160];
    snprintf(path, sizeof path, "/v1/products/%s?min_version=1", h.id);
    httpc_response_t r;
    httpc_request(sport, "GET", path, NULL, NULL, 0, &r);
    httpc_response_free(&r);
    long long hits0 = daemons_metric(sport, "cqrs_cache_hits_total");

    pthread_t t;
    pthread_create(&t, NULL, hammer_main, &h);
    snprintf(path, sizeof path, "/v1/products/%s", h.id);
    int64_t last = 0;
    int reads = 0;
    for (;;) {
        httpc_request(sport, "GET", path, NULL, NULL, 0, &r);
        assert_int_equal(r.status, 200);
        int64_t v = doc_version(&r);
        httpc_response_free(&r);
        if (v < last)
            fail_msg("read version %lld after %lld", (long long)v, (long long)last);
        last = v;
        reads++;
        if (v == 1 + h.n)
            break;
        if (reads > 200000)
            fail_msg("never saw the last version");
    }
    pthread_join(t, NULL);
    assert_int_equal(last, 1 + h.n);
    assert_int_equal(redis_version(h.id), 1 + h.n);
    /* And reads after the storm keep answering the last version (from the cache). */
    for (int i = 0; i < 20; i++) {
        httpc_request(sport, "GET", path, NULL, NULL, 0, &r);
        assert_int_equal(doc_version(&r), 1 + h.n);
        httpc_response_free(&r);
    }
    assert_true(daemons_metric(sport, "cqrs_cache_hits_total") > hits0 + 10);
}

static void test_feed_reconnect_flushes_cache(void **state)
{
    (void)state;
    char id[37], path[160], key[CQRS_KEY_MAX];
    create_product("CACHE-FLUSH", id);
    snprintf(path, sizeof path, "/v1/products/%s?min_version=1", id);
    httpc_response_t r;
    httpc_request(sport, "GET", path, NULL, NULL, 0, &r);
    if (r.status != 200)
        fail_msg("GET %s: connected %d status %d", path, r.connected, r.status);
    char *doc = strdup(r.body);
    httpc_response_free(&r);
    snprintf(path, sizeof path, "/v1/products/%s", id);
    httpc_request(sport, "GET", path, NULL, NULL, 0, &r); /* now cached */
    httpc_response_free(&r);

    /* Change the document in Redis without announcing it: the cache does not know. */
    json_t *j = json_loads(doc, 0, NULL);
    free(doc);
    json_object_set_new(j, "name", json_string("Changed behind the cache"));
    char *changed = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(j);
    assert_int_equal(redisdb_doc_key(redis_url, D.prefix, "product", id, key, sizeof key), 0);
    redisContext *c = redisdb_connect(redis_url);
    assert_non_null(c);
    freeReplyObject(redisCommand(c, "HSET %s json %s", key, changed));
    free(changed);
    httpc_request(sport, "GET", path, NULL, NULL, 0, &r);
    assert_null(strstr(r.body, "Changed behind the cache")); /* served from the cache */
    httpc_response_free(&r);

    /* Drop the subscription: on resubscribing, the cache is flushed. */
    long long reconnects = daemons_metric(sport, "cqrs_changefeed_reconnects_total");
    freeReplyObject(redisCommand(c, "CLIENT KILL TYPE pubsub"));
    redisFree(c);
    long long now = reconnects;
    for (int i = 0; i < 100 && now <= reconnects; i++) {
        usleep(100 * 1000);
        now = daemons_metric(sport, "cqrs_changefeed_reconnects_total");
    }
    assert_true(now > reconnects);
    assert_int_equal(daemons_metric(sport, "cqrs_changefeed_connected"), 1);
    httpc_request(sport, "GET", path, NULL, NULL, 0, &r);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body, "Changed behind the cache"));
    httpc_response_free(&r);
}

static void test_shutdown_answers_waiting_reads(void **state)
{
    (void)state;
    int port = free_port();
    pid_t pid = daemons_spawn_queryd(&D, port, "serve", "serve-shutdown");
    assert_true(pid > 0);
    char absent[37], req[256];
    cqrs_uuid_v4(absent);
    snprintf(req, sizeof req,
             "GET /v1/products/%s?min_version=1&wait_ms=10000 HTTP/1.1\r\nHost: t\r\n"
             "Connection: close\r\n\r\n",
             absent);
    int fd = connect_to(port);
    assert_true(fd >= 0);
    send_all(fd, req);
    long long waiting = -1;
    for (int i = 0; i < 100 && waiting != 1; i++) {
        usleep(50 * 1000);
        waiting = daemons_metric(port, "cqrs_query_waiting_reads");
    }
    assert_int_equal(waiting, 1);
    static sse_t s;
    memset(&s, 0, sizeof s);
    s.fd = connect_to(port);
    snprintf(req, sizeof req, "GET /v1/products/%s/stream HTTP/1.1\r\nHost: t\r\n\r\n", absent);
    send_all(s.fd, req);
    assert_true(sse_read(&s, ": keep-alive", 5000)); /* open, nothing to send but keep-alives */
    int64_t t0 = now_ms();
    assert_int_equal(daemons_stop_one(&pid), 0); /* SIGTERM: exit 0 */
    static char buf[8192];
    read_response(fd, buf, sizeof buf, 5000);
    close(fd);
    assert_true(now_ms() - t0 < 9000); /* not the 10 s wait */
    if (strncmp(buf, "HTTP/1.1 503", 12) != 0 || !strstr(buf, "shutting-down"))
        fail_msg("waiting read at shutdown got: %.300s", buf);
    /* The stream ended (its connection closed) instead of holding the shutdown. */
    sse_read(&s, NULL, 500);
    char probe;
    assert_true(read(s.fd, &probe, 1) <= 0);
    close(s.fd);
}

/* The status and body of GET path on port (0: no answer). */
static int get_status(int port, const char *path, char *body, size_t cap)
{
    httpc_response_t r;
    httpc_request(port, "GET", path, NULL, NULL, 0, &r);
    int st = r.status;
    snprintf(body, cap, "%s", r.body ? r.body : "");
    httpc_response_free(&r);
    return st;
}

static void test_ready_once_the_layout_is_known(void **state)
{
    (void)state;
    /* a deployment of its own (topic prefix, consumer group) whose topics no projector saw yet */
    static daemons_t E;
    E = D;
    char u[37];
    cqrs_uuid_v4(u);
    snprintf(E.prefix, sizeof E.prefix, "lay%.8s", u);
    int port = free_port();
    pid_t serve = daemons_launch_queryd(&E, port, "serve", NULL, "serve-layout");
    assert_true(serve > 0);
    static char body[4096];
    int st = 0;
    for (int i = 0; i < 600 && st == 0; i++) { /* until the listener answers */
        usleep(100 * 1000);
        st = get_status(port, "/readyz", body, sizeof body);
    }
    if (st != 503 || !strstr(body, "no layout for"))
        fail_msg("a serving instance without a layout: /readyz %d %s", st, body);
    char absent[37], path[128];
    cqrs_uuid_v4(absent);
    snprintf(path, sizeof path, "/v1/products/%s", absent);
    st = get_status(port, path, body, sizeof body);
    if (st != 503 || !strstr(body, "urn:cqrs:problem:not-ready"))
        fail_msg("a read without a layout: %d %s", st, body);

    /* the control: the topics made and a projector of that deployment started, the same
     * instance turns ready and reads answer */
    assert_int_equal(daemons_migrate(&E, "migrate-layout"), 0);
    pid_t project = daemons_launch_queryd(&E, free_port(), "project", NULL, "project-layout");
    assert_true(project > 0);
    for (int i = 0; i < 600 && st != 200; i++) {
        usleep(100 * 1000);
        st = get_status(port, "/readyz", body, sizeof body);
    }
    if (st != 200)
        fail_msg("the layout recorded, /readyz still %d %s", st, body);
    assert_int_equal(get_status(port, path, body, sizeof body), 404);
    assert_int_equal(daemons_stop_one(&project), 0);
    assert_int_equal(daemons_stop_one(&serve), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_min_version_on_serving_instance),
        cmocka_unit_test(test_min_version_timeout_and_bad_params),
        cmocka_unit_test(test_500_waiters),
        cmocka_unit_test(test_stream_in_order_and_resume),
        cmocka_unit_test(test_stream_cap_and_disconnect),
        cmocka_unit_test(test_cache_never_goes_backwards),
        cmocka_unit_test(test_feed_reconnect_flushes_cache),
        cmocka_unit_test(test_shutdown_answers_waiting_reads),
        cmocka_unit_test(test_ready_once_the_layout_is_known),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
