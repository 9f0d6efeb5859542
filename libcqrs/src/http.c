/* http.c — libmicrohttpd behind a route table, with JSON and RFC 9457 replies.
 *
 * Flow per request (MHD access handler):
 *   1. URI log callback: allocate the request context and keep the raw URI (routing uses the
 *      raw path, so "%2F" or "%00" in a path can never turn into a matching segment).
 *   2. First handler call: answer 413 from Content-Length and 415 from Content-Type before
 *      reading the body.
 *   3. Upload calls: append up to max_body_bytes; past that, drop data and remember (413).
 *   4. Final call: route, then call the handler, which replies exactly once.
 * The context is freed in the request-completed callback.
 *
 * Threads: MHD's internal thread pool; handlers run on those threads. Every reply is queued
 * from an MHD callback of its connection, on that connection's thread: libmicrohttpd 1.0
 * refuses MHD_queue_response anywhere else (#7757). A deferred reply (cqrs_http_suspend) is
 * therefore never queued by the thread that wakes it: cqrs_http_wake resumes the connection,
 * and MHD calls the access handler again, which runs the continuation.
 *
 * Parsing: libmicrohttpd 1.0 (RFC 9110/9112) at client discipline 1, "strict within the RFCs":
 * it answers 400 itself to a request with both Content-Length and Transfer-Encoding or with %00
 * in its path, 501 to any Transfer-Encoding but chunked, and closes the connection on a request
 * line it cannot read (a NUL byte in it, say). Those answers are plain, not problems.
 */
#define _GNU_SOURCE /* accept4 */
#include "cqrs/http.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cqrs/log.h"
#include "cqrs/metrics.h"
#include "cqrs/util.h"

#define MAX_RESPONSE_HEADERS 16

/* Counters of one route (the last slot counts requests no route matched). */
typedef struct route_stats {
    atomic_uint_fast64_t by_status[600];
    cqrs_histogram_t latency;
} route_stats_t;

struct cqrs_http_server {
    cqrs_http_config_t cfg;
    const cqrs_http_route_t *routes;
    size_t n_routes;
    struct MHD_Daemon *daemon;
    uint16_t port;
    route_stats_t *stats; /* n_routes, then N_UNMATCHED (by method) for unmatched requests */
    /* Suspended requests (so stop can wake them) and the wake/suspend handshake. */
    pthread_mutex_t susp_mu;
    cqrs_http_request_t *susp_head;
    atomic_bool stopping;
};

typedef struct token {
    char name[64];
    char *secret;
    size_t len;
    unsigned scopes;
} token_t;

struct cqrs_http_auth {
    char *path;
    pthread_rwlock_t lock;
    token_t *tokens;
    size_t n;
};

struct cqrs_http_request {
    cqrs_http_server_t *srv;
    struct MHD_Connection *conn;
    const char *method;
    char *raw_uri;
    char *path;
    char *scratch;
    cqrs_http_params_t params;
    char *body;
    size_t body_len;
    size_t body_cap;
    bool started;
    bool too_large;
    bool replied;
    bool queue_failed; /* MHD refused the reply: the connection is closed instead */
    char request_id[72];
    char traceparent[56];
    char caller[64];
    int64_t started_us;
    size_t route;
    unsigned status;
    size_t n_headers;
    char *hname[MAX_RESPONSE_HEADERS];
    char *hvalue[MAX_RESPONSE_HEADERS];
    /* Deferred replies (srv->susp_mu guards suspended, wake_pending and the list links). */
    cqrs_http_handler_fn resume_fn;
    void *resume_ud;
    bool suspended;
    bool wake_pending;
    cqrs_http_request_t *susp_prev, *susp_next;
    cqrs_http_stream_fn stream_fn;
    void *stream_ud;
    void (*close_fn)(void *ud);
    void *close_ud;
};

/* ---- routing (pure) ---------------------------------------------------------------------- */

static bool segment_match(const char *pat, size_t plen, const char *seg, size_t slen)
{
    if (plen >= 2 && pat[0] == '{' && pat[plen - 1] == '}')
        return slen > 0;
    return plen == slen && memcmp(pat, seg, plen) == 0;
}

static bool path_match(const char *pattern, const char *path, char *scratch,
                       cqrs_http_params_t *params)
{
    const char *p = pattern, *s = path;
    params->n = 0;
    if (*p != '/' || *s != '/')
        return false;
    while (*p == '/' && *s == '/') {
        p++;
        s++;
        size_t plen = strcspn(p, "/");
        size_t slen = strcspn(s, "/");
        if (!segment_match(p, plen, s, slen))
            return false;
        if (plen >= 2 && p[0] == '{') {
            if (params->n == CQRS_HTTP_MAX_PARAMS)
                return false;
            size_t off = (size_t)(s - path);
            memcpy(scratch + off, s, slen);
            scratch[off + slen] = '\0';
            params->value[params->n] = scratch + off;
            /* The name is the pattern text between the braces; patterns are static. */
            params->name[params->n] = p + 1;
            params->n++;
        }
        p += plen;
        s += slen;
    }
    return *p == '\0' && *s == '\0';
}

static size_t param_name_len(const char *name)
{
    return strcspn(name, "}");
}

const cqrs_http_route_t *cqrs_http_route_match(const cqrs_http_route_t *routes, size_t n,
                                               const char *method, const char *path, char *scratch,
                                               cqrs_http_params_t *params, char *allow,
                                               size_t allow_len)
{
    size_t used = 0;
    if (allow_len)
        allow[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        cqrs_http_params_t tmp;
        if (!path_match(routes[i].pattern, path, scratch, &tmp))
            continue;
        /* HEAD is GET without the body (RFC 9110 §9.3.2): the GET route answers it, and
         * libmicrohttpd sends the headers only. */
        bool is_get = strcmp(routes[i].method, "GET") == 0;
        if (strcmp(routes[i].method, method) == 0 || (is_get && strcmp(method, "HEAD") == 0)) {
            *params = tmp;
            return &routes[i];
        }
        const char *m = is_get ? "GET, HEAD" : routes[i].method;
        if (strstr(allow, routes[i].method) == NULL) {
            int w = snprintf(allow + used, allow_len - used, "%s%s", used ? ", " : "", m);
            if (w > 0 && (size_t)w < allow_len - used)
                used += (size_t)w;
        }
    }
    return NULL;
}

/* ---- request accessors ------------------------------------------------------------------- */

const char *cqrs_http_method(const cqrs_http_request_t *req)
{
    return req->method;
}

const char *cqrs_http_path(const cqrs_http_request_t *req)
{
    return req->path;
}

const char *cqrs_http_param(const cqrs_http_request_t *req, const char *name)
{
    size_t len = strlen(name);
    for (size_t i = 0; i < req->params.n; i++) {
        const char *pn = req->params.name[i];
        if (param_name_len(pn) == len && strncmp(pn, name, len) == 0)
            return req->params.value[i];
    }
    return NULL;
}

const char *cqrs_http_header(const cqrs_http_request_t *req, const char *name)
{
    return MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, name);
}

const char *cqrs_http_query(const cqrs_http_request_t *req, const char *name)
{
    return MHD_lookup_connection_value(req->conn, MHD_GET_ARGUMENT_KIND, name);
}

struct query_iter {
    void (*fn)(const char *, const char *, void *);
    void *ud;
};

static enum MHD_Result query_iter_cb(void *cls, enum MHD_ValueKind kind, const char *key,
                                     const char *value)
{
    (void)kind;
    struct query_iter *it = cls;
    it->fn(key, value, it->ud);
    return MHD_YES;
}

void cqrs_http_query_each(const cqrs_http_request_t *req,
                          void (*fn)(const char *key, const char *value, void *ud), void *ud)
{
    struct query_iter it = {fn, ud};
    MHD_get_connection_values(req->conn, MHD_GET_ARGUMENT_KIND, query_iter_cb, &it);
}

const char *cqrs_http_body(const cqrs_http_request_t *req, size_t *len)
{
    if (len)
        *len = req->body_len;
    return req->body;
}

const char *cqrs_http_traceparent(const cqrs_http_request_t *req)
{
    return req->traceparent;
}

const char *cqrs_http_caller(const cqrs_http_request_t *req)
{
    return req->caller[0] ? req->caller : "-";
}

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* ---- replies ----------------------------------------------------------------------------- */

void cqrs_http_add_header(cqrs_http_request_t *req, const char *name, const char *value)
{
    if (req->n_headers == MAX_RESPONSE_HEADERS)
        return;
    req->hname[req->n_headers] = strdup(name);
    req->hvalue[req->n_headers] = strdup(value);
    req->n_headers++;
}

/* Queues and releases resp. A refusal (a reply from outside an MHD callback of this connection,
 * see the top of this file) is a bug: logged, and the handler's return closes the connection
 * rather than leave the client waiting. */
static void queue_response(cqrs_http_request_t *req, unsigned status, struct MHD_Response *resp)
{
    if (MHD_queue_response(req->conn, status, resp) != MHD_YES) {
        req->queue_failed = true;
        char code[8];
        snprintf(code, sizeof code, "%u", status);
        CQRS_LOG_ERROR("libmicrohttpd refused the reply; closing the connection", "request_id",
                       req->request_id, "status", code);
    }
    MHD_destroy_response(resp);
}

static void queue(cqrs_http_request_t *req, unsigned status, const char *content_type, char *body,
                  size_t len)
{
    if (req->replied) {
        free(body);
        return;
    }
    req->replied = true;
    req->status = status;
    struct MHD_Response *resp = MHD_create_response_from_buffer(
        len, body ? body : (char *)"", body ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
    if (!resp) {
        free(body);
        return;
    }
    if (content_type)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    MHD_add_response_header(resp, "X-Request-Id", req->request_id);
    for (size_t i = 0; i < req->n_headers; i++)
        if (req->hname[i] && req->hvalue[i])
            MHD_add_response_header(resp, req->hname[i], req->hvalue[i]);
    queue_response(req, status, resp);
}

void cqrs_http_reply_json(cqrs_http_request_t *req, unsigned status, json_t *body)
{
    char *text = NULL;
    size_t len = 0;
    if (body) {
        text = json_dumps(body, JSON_COMPACT | JSON_PRESERVE_ORDER);
        json_decref(body);
        len = text ? strlen(text) : 0;
    }
    queue(req, status, body ? "application/json" : NULL, text, len);
}

void cqrs_http_reply_text(cqrs_http_request_t *req, unsigned status, const char *content_type,
                          const char *text)
{
    char *copy = strdup(text ? text : "");
    queue(req, status, content_type, copy, copy ? strlen(copy) : 0);
}

void cqrs_http_reply_problem(cqrs_http_request_t *req, unsigned status, const char *slug,
                             const char *title, const char *detail, json_t *errors, json_t *extra)
{
    char type[128];
    snprintf(type, sizeof type, "%s%s", CQRS_PROBLEM_BASE, slug);
    json_t *p = json_object();
    json_object_set_new(p, "type", json_string(type));
    json_object_set_new(p, "title", json_string(title));
    json_object_set_new(p, "status", json_integer(status));
    json_t *d = detail ? json_string(detail) : NULL;
    json_object_set_new(p, "detail", d ? d : json_string(title));
    if (errors)
        json_object_set_new(p, "errors", errors);
    if (extra) {
        json_object_update_missing(p, extra);
        json_decref(extra);
    }
    char *text = json_dumps(p, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(p);
    queue(req, status, "application/problem+json", text, text ? strlen(text) : 0);
}

void cqrs_http_reply_error(cqrs_http_request_t *req, const cqrs_error_t *err)
{
    switch (err->code) {
    case CQRS_ERR_CONFLICT:
        cqrs_http_reply_problem(req, 409, "conflict", "Conflict", err->message, NULL, NULL);
        return;
    case CQRS_ERR_NOT_FOUND:
        cqrs_http_reply_problem(req, 404, "not-found", "Not Found", err->message, NULL, NULL);
        return;
    case CQRS_ERR_INVALID:
        cqrs_http_reply_problem(req, 422, "invalid", "Unprocessable Content", err->message, NULL,
                                NULL);
        return;
    case CQRS_ERR_UNAVAILABLE:
    case CQRS_ERR_TIMEOUT:
    case CQRS_ERR_RETRY:
        cqrs_http_add_header(req, "Retry-After", "1");
        cqrs_http_reply_problem(req, 503, "dependency-unavailable", "Service Unavailable",
                                "a dependency is unavailable; retry shortly", NULL, NULL);
        CQRS_LOG_WARN("dependency unavailable", "request_id", req->request_id, "error",
                      err->message);
        return;
    default:
        cqrs_http_reply_problem(req, 500, "internal", "Internal Server Error",
                                "the server failed to handle the request", NULL, NULL);
        CQRS_LOG_ERROR("internal error", "request_id", req->request_id, "error", err->message);
        return;
    }
}

/* ---- deferred replies and streams ------------------------------------------------------ */

/* Called with srv->susp_mu held. */
static void susp_link(cqrs_http_request_t *req)
{
    cqrs_http_server_t *srv = req->srv;
    req->suspended = true;
    req->susp_prev = NULL;
    req->susp_next = srv->susp_head;
    if (srv->susp_head)
        srv->susp_head->susp_prev = req;
    srv->susp_head = req;
}

static void susp_unlink(cqrs_http_request_t *req)
{
    cqrs_http_server_t *srv = req->srv;
    if (!req->suspended)
        return;
    if (req->susp_prev)
        req->susp_prev->susp_next = req->susp_next;
    else
        srv->susp_head = req->susp_next;
    if (req->susp_next)
        req->susp_next->susp_prev = req->susp_prev;
    req->susp_prev = req->susp_next = NULL;
    req->suspended = false;
}

void cqrs_http_suspend(cqrs_http_request_t *req, cqrs_http_handler_fn fn, void *ud)
{
    req->resume_fn = fn;
    req->resume_ud = ud;
}

void cqrs_http_wake(cqrs_http_request_t *req)
{
    cqrs_http_server_t *srv = req->srv;
    pthread_mutex_lock(&srv->susp_mu);
    if (req->suspended) {
        susp_unlink(req);
        MHD_resume_connection(req->conn);
    } else {
        req->wake_pending = true;
    }
    pthread_mutex_unlock(&srv->susp_mu);
}

bool cqrs_http_stopping(const cqrs_http_request_t *req)
{
    return atomic_load(&req->srv->stopping);
}

void cqrs_http_on_close(cqrs_http_request_t *req, void (*fn)(void *ud), void *ud)
{
    req->close_fn = fn;
    req->close_ud = ud;
}

/* Suspends the connection unless a wake already came (or the server stops); returns whether
 * it did. Runs on the connection's MHD thread, inside an MHD callback. */
static bool try_suspend(cqrs_http_request_t *req)
{
    cqrs_http_server_t *srv = req->srv;
    pthread_mutex_lock(&srv->susp_mu);
    bool suspend = !req->wake_pending && !atomic_load(&srv->stopping);
    req->wake_pending = false;
    if (suspend) {
        susp_link(req);
        MHD_suspend_connection(req->conn);
    }
    pthread_mutex_unlock(&srv->susp_mu);
    return suspend;
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    cqrs_http_request_t *req = cls;
    for (;;) {
        if (cqrs_http_stopping(req))
            return MHD_CONTENT_READER_END_OF_STREAM;
        long n = req->stream_fn(req->stream_ud, buf, max);
        if (n > 0)
            return n;
        if (n < 0)
            return MHD_CONTENT_READER_END_OF_STREAM;
        if (try_suspend(req))
            return 0; /* nothing yet: MHD calls again after cqrs_http_wake */
    }
}

void cqrs_http_reply_stream(cqrs_http_request_t *req, unsigned status, const char *content_type,
                            cqrs_http_stream_fn fn, void *ud)
{
    if (req->replied)
        return;
    req->stream_fn = fn;
    req->stream_ud = ud;
    struct MHD_Response *resp =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_reader, req, NULL);
    if (!resp) {
        cqrs_http_reply_problem(req, 500, "internal", "Internal Server Error",
                                "cannot create the response", NULL, NULL);
        return;
    }
    req->replied = true;
    req->status = status;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    /* A stream that ends is not followed by another request: close, so a draining server
     * does not wait for the client to hang up. */
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    MHD_add_response_header(resp, "X-Request-Id", req->request_id);
    for (size_t i = 0; i < req->n_headers; i++)
        if (req->hname[i] && req->hvalue[i])
            MHD_add_response_header(resp, req->hname[i], req->hvalue[i]);
    queue_response(req, status, resp);
}

/* ---- MHD glue ---------------------------------------------------------------------------- */

/* Unmatched requests are counted by method, the methods of RFC 9110 and PATCH by name and any
 * other as "other", so a scanner's made-up methods cannot grow the label set. */
static const char *const unmatched_methods[] = {"GET",    "HEAD",    "POST",  "PUT",     "PATCH",
                                                "DELETE", "OPTIONS", "TRACE", "CONNECT", "other"};
#define N_UNMATCHED (sizeof unmatched_methods / sizeof unmatched_methods[0])

static size_t unmatched_slot(const char *method)
{
    for (size_t i = 0; method && i + 1 < N_UNMATCHED; i++)
        if (strcmp(method, unmatched_methods[i]) == 0)
            return i;
    return N_UNMATCHED - 1;
}

static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn)
{
    (void)conn;
    cqrs_http_request_t *req = calloc(1, sizeof *req);
    if (!req)
        return NULL;
    req->srv = cls;
    req->raw_uri = strdup(uri ? uri : "/");
    req->started_us = now_us();
    req->route = req->srv->n_routes; /* unmatched until dispatch says otherwise */
    return req;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)conn;
    (void)toe;
    cqrs_http_request_t *req = *con_cls;
    if (!req)
        return;
    cqrs_http_server_t *srv = req->srv;
    if (req->close_fn)
        req->close_fn(req->close_ud);
    pthread_mutex_lock(&srv->susp_mu);
    susp_unlink(req);
    pthread_mutex_unlock(&srv->susp_mu);
    if (req->status >= 100 && req->status < 600 && srv->stats) {
        size_t slot =
            req->route < srv->n_routes ? req->route : srv->n_routes + unmatched_slot(req->method);
        route_stats_t *rs = &srv->stats[slot];
        atomic_fetch_add(&rs->by_status[req->status], 1);
        double seconds = (double)(now_us() - req->started_us) / 1e6;
        cqrs_histogram_observe(&rs->latency, seconds);
        const cqrs_http_route_t *rt = req->route < srv->n_routes ? &srv->routes[req->route] : NULL;
        /* Probes (no scope) and scrapes (the metrics scope) are not logged: they come every
         * few seconds and say nothing about the service's use. */
        bool quiet = rt && (rt->scope == CQRS_SCOPE_NONE || rt->scope == CQRS_SCOPE_METRICS);
        if (!quiet && cqrs_log_enabled(CQRS_LOG_INFO)) {
            char status[8], ms[24];
            snprintf(status, sizeof status, "%u", req->status);
            snprintf(ms, sizeof ms, "%.3f", seconds * 1000);
            cqrs_log(CQRS_LOG_INFO, "request", "request_id", req->request_id, "method", req->method,
                     "path", req->path, "operation", rt ? rt->operation : NULL, "status", status,
                     "duration_ms", ms, "caller", cqrs_http_caller(req), "traceparent",
                     req->traceparent, (char *)NULL);
        }
    }
    for (size_t i = 0; i < req->n_headers; i++) {
        free(req->hname[i]);
        free(req->hvalue[i]);
    }
    free(req->raw_uri);
    free(req->path);
    free(req->scratch);
    free(req->body);
    free(req);
    *con_cls = NULL;
}

static bool is_json_media_type(const char *ct)
{
    if (!ct)
        return false;
    while (*ct == ' ')
        ct++;
    size_t len = strcspn(ct, "; \t");
    if (len == 16 && strncasecmp(ct, "application/json", 16) == 0)
        return true;
    /* application/<x>+json (RFC 6839 structured syntax suffix) */
    return len > 17 && strncasecmp(ct, "application/", 12) == 0 &&
           strncasecmp(ct + len - 5, "+json", 5) == 0;
}

static bool request_id_ok(const char *s)
{
    size_t n = s ? strlen(s) : 0;
    if (n == 0 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x21 || s[i] > 0x7e || s[i] == '"' || s[i] == '\\')
            return false;
    return true;
}

struct nul_scan {
    enum MHD_ValueKind kind;
    char name[48]; /* the first argument or header holding a NUL ("" when none) */
    bool found;
};

static enum MHD_Result nul_scan_cb(void *cls, enum MHD_ValueKind kind, const char *key,
                                   size_t key_size, const char *value, size_t value_size)
{
    struct nul_scan *s = cls;
    if (strlen(key) == key_size && (!value || strlen(value) == value_size))
        return MHD_YES;
    s->found = true;
    s->kind = kind;
    /* the name up to its NUL, printable ASCII only: it goes into the problem */
    size_t n = 0;
    for (size_t i = 0; i < key_size && key[i] && n + 1 < sizeof s->name; i++)
        s->name[n++] = key[i] >= 0x20 && key[i] < 0x7f ? key[i] : '?';
    s->name[n] = '\0';
    return MHD_NO;
}

/* Handlers see query arguments and headers as C strings, which a decoded NUL (a "%00" in a
 * query, a NUL byte in a header value) would silently cut: "limit=5%00zzz" would read as 5.
 * libmicrohttpd keeps each value's length, so any value whose length is not its C string's is
 * refused here, once for every route (a NUL in the path: libmicrohttpd answers 400 itself,
 * and routing uses the undecoded path anyway). True when the request is clean; otherwise it
 * was answered 400. */
static bool values_are_c_strings(cqrs_http_request_t *req)
{
    struct nul_scan s = {.found = false};
    MHD_get_connection_values_n(req->conn, MHD_GET_ARGUMENT_KIND | MHD_HEADER_KIND, nul_scan_cb,
                                &s);
    if (!s.found)
        return true;
    char detail[160];
    snprintf(detail, sizeof detail, "the %s '%s' contains a NUL character (%s)",
             s.kind == MHD_GET_ARGUMENT_KIND ? "query parameter" : "header", s.name,
             s.kind == MHD_GET_ARGUMENT_KIND ? "%00" : "a zero byte");
    cqrs_http_reply_problem(req, 400, "malformed-request", "Bad Request", detail, NULL, NULL);
    return false;
}

static enum MHD_Result first_call(cqrs_http_request_t *req)
{
    const char *rid = cqrs_http_header(req, "X-Request-Id");
    if (request_id_ok(rid))
        snprintf(req->request_id, sizeof req->request_id, "%s", rid);
    else
        cqrs_request_id(req->request_id);
    const char *tp = cqrs_http_header(req, "traceparent");
    if (cqrs_traceparent_valid(tp))
        snprintf(req->traceparent, sizeof req->traceparent, "%s", tp);
    else
        cqrs_traceparent_new(req->traceparent);

    size_t plen = strcspn(req->raw_uri, "?#");
    req->path = strndup(req->raw_uri, plen);
    req->scratch = malloc(plen + 1);
    if (!req->path || !req->scratch)
        return MHD_NO;
    if (!values_are_c_strings(req))
        return MHD_YES;

    const char *cl = cqrs_http_header(req, MHD_HTTP_HEADER_CONTENT_LENGTH);
    const char *te = cqrs_http_header(req, MHD_HTTP_HEADER_TRANSFER_ENCODING);
    int64_t declared = 0;
    if (cl && cqrs_parse_int64(cl, &declared) && declared > (int64_t)req->srv->cfg.max_body_bytes) {
        char detail[128];
        snprintf(detail, sizeof detail, "the request body is larger than %zu bytes",
                 req->srv->cfg.max_body_bytes);
        cqrs_http_reply_problem(req, 413, "payload-too-large", "Content Too Large", detail, NULL,
                                NULL);
        return MHD_YES;
    }
    /* libmicrohttpd 1.0 lets only "chunked" through (501 for any other coding). */
    bool has_body = declared > 0 || te != NULL;
    if (has_body && !is_json_media_type(cqrs_http_header(req, MHD_HTTP_HEADER_CONTENT_TYPE))) {
        cqrs_http_reply_problem(req, 415, "unsupported-media-type", "Unsupported Media Type",
                                "the request body must be application/json", NULL, NULL);
        return MHD_YES;
    }
    return MHD_YES;
}

/* ---- access control ----------------------------------------------------------------------- */

static unsigned parse_scopes(const char *s)
{
    unsigned v = 0;
    char buf[128];
    snprintf(buf, sizeof buf, "%s", s);
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (strcmp(t, "read") == 0)
            v |= CQRS_SCOPE_READ;
        else if (strcmp(t, "write") == 0)
            v |= CQRS_SCOPE_WRITE;
        else if (strcmp(t, "admin") == 0)
            v |= CQRS_SCOPE_ADMIN;
        else if (strcmp(t, "metrics") == 0)
            v |= CQRS_SCOPE_METRICS;
        else
            return 0;
    }
    return v;
}

static void free_tokens(token_t *t, size_t n)
{
    for (size_t i = 0; t && i < n; i++) {
        if (t[i].secret)
            memset(t[i].secret, 0, t[i].len);
        free(t[i].secret);
    }
    free(t);
}

static cqrs_err_t read_tokens(const char *path, token_t **out, size_t *n, cqrs_error_t *err)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return cqrs_error_set(err, CQRS_ERR_CONFIG, "cannot read the tokens file %s", path);
    token_t *v = NULL;
    size_t cnt = 0, cap = 0;
    char line[1024];
    int lineno = 0;
    cqrs_err_t rc = CQRS_ERR_OK;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        char *hash = strchr(line, '#');
        if (hash)
            *hash = '\0';
        char name[64], secret[512], scopes[128];
        int k = sscanf(line, "%63s %511s %127s", name, secret, scopes);
        if (k <= 0)
            continue;
        unsigned sc = k == 3 ? parse_scopes(scopes) : 0;
        if (k != 3 || sc == 0 || strlen(secret) < 16) {
            rc = cqrs_error_set(err, CQRS_ERR_CONFIG,
                                "%s line %d: expected '<name> <token of 16+ characters> "
                                "<read|write|admin|metrics>[,…]'",
                                path, lineno);
            break;
        }
        if (cnt == cap) {
            cap = cap ? cap * 2 : 8;
            token_t *nv = realloc(v, cap * sizeof *nv);
            if (!nv) {
                rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
                break;
            }
            v = nv;
        }
        token_t *t = &v[cnt++];
        memset(t, 0, sizeof *t);
        snprintf(t->name, sizeof t->name, "%s", name);
        t->secret = strdup(secret);
        t->len = strlen(secret);
        t->scopes = sc;
        memset(secret, 0, sizeof secret);
    }
    fclose(f);
    if (rc != CQRS_ERR_OK) {
        free_tokens(v, cnt);
        return rc;
    }
    *out = v;
    *n = cnt;
    return CQRS_ERR_OK;
}

cqrs_http_auth_t *cqrs_http_auth_load(const char *path, cqrs_error_t *err)
{
    cqrs_http_auth_t *a = calloc(1, sizeof *a);
    if (!a) {
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    a->path = strdup(path);
    pthread_rwlock_init(&a->lock, NULL);
    if (!a->path || read_tokens(path, &a->tokens, &a->n, err) != CQRS_ERR_OK) {
        cqrs_http_auth_destroy(a);
        return NULL;
    }
    return a;
}

cqrs_err_t cqrs_http_auth_reload(cqrs_http_auth_t *a, cqrs_error_t *err)
{
    token_t *t = NULL;
    size_t n = 0;
    cqrs_err_t rc = read_tokens(a->path, &t, &n, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    pthread_rwlock_wrlock(&a->lock);
    token_t *old = a->tokens;
    size_t old_n = a->n;
    a->tokens = t;
    a->n = n;
    pthread_rwlock_unlock(&a->lock);
    free_tokens(old, old_n);
    return CQRS_ERR_OK;
}

size_t cqrs_http_auth_count(cqrs_http_auth_t *a)
{
    pthread_rwlock_rdlock(&a->lock);
    size_t n = a->n;
    pthread_rwlock_unlock(&a->lock);
    return n;
}

void cqrs_http_auth_destroy(cqrs_http_auth_t *a)
{
    if (!a)
        return;
    free_tokens(a->tokens, a->n);
    pthread_rwlock_destroy(&a->lock);
    free(a->path);
    free(a);
}

/* Equal in time that depends only on the configured token's length. */
static bool ct_equal(const char *given, size_t glen, const char *secret, size_t slen)
{
    unsigned char diff = (unsigned char)(glen != slen);
    for (size_t i = 0; i < slen; i++)
        diff |= (unsigned char)(secret[i] ^ (i < glen ? given[i] : 0));
    return diff == 0;
}

static bool authorize(cqrs_http_request_t *req, const cqrs_http_route_t *route)
{
    cqrs_http_auth_t *a = req->srv->cfg.auth;
    const char *h = cqrs_http_header(req, MHD_HTTP_HEADER_AUTHORIZATION);
    const char *given = NULL;
    if (h && strncasecmp(h, "Bearer ", 7) == 0) {
        given = h + 7;
        while (*given == ' ')
            given++;
    }
    unsigned scopes = 0;
    bool known = false;
    if (given && *given) {
        size_t glen = strlen(given);
        pthread_rwlock_rdlock(&a->lock);
        for (size_t i = 0; i < a->n; i++) {
            /* every token is compared: the time does not tell which one matched */
            if (ct_equal(given, glen, a->tokens[i].secret, a->tokens[i].len) && !known) {
                known = true;
                scopes = a->tokens[i].scopes;
                snprintf(req->caller, sizeof req->caller, "%s", a->tokens[i].name);
            }
        }
        pthread_rwlock_unlock(&a->lock);
    }
    if (!known) {
        cqrs_http_add_header(req, "WWW-Authenticate", "Bearer realm=\"cqrs\"");
        cqrs_http_reply_problem(req, 401, "unauthorized", "Unauthorized",
                                given ? "the bearer token is not valid"
                                      : "a bearer token is required (Authorization: Bearer …)",
                                NULL, NULL);
        return false;
    }
    unsigned need = (unsigned)route->scope;
    if (!(scopes & (need | CQRS_SCOPE_ADMIN))) {
        const char *name = need == CQRS_SCOPE_READ    ? "read"
                           : need == CQRS_SCOPE_WRITE ? "write"
                                                      : "metrics";
        char www[128], detail[96];
        snprintf(www, sizeof www,
                 "Bearer realm=\"cqrs\", error=\"insufficient_scope\", scope=\"%s\"", name);
        snprintf(detail, sizeof detail, "this token lacks the '%s' scope", name);
        cqrs_http_add_header(req, "WWW-Authenticate", www);
        cqrs_http_reply_problem(req, 403, "forbidden", "Forbidden", detail, NULL, NULL);
        return false;
    }
    return true;
}

/* ---- metrics --------------------------------------------------------------------------- */

void cqrs_http_server_metrics(cqrs_http_server_t *srv, struct cqrs_text *t)
{
    cqrs_text_printf(t, "# HELP cqrs_http_requests_total HTTP requests answered, by operation, "
                        "method, route and status.\n# TYPE cqrs_http_requests_total counter\n");
    for (size_t r = 0; r < srv->n_routes + N_UNMATCHED; r++) {
        const cqrs_http_route_t *rt = r < srv->n_routes ? &srv->routes[r] : NULL;
        const char *method = rt ? rt->method : unmatched_methods[r - srv->n_routes];
        for (int code = 100; code < 600; code++) {
            uint64_t v = atomic_load(&srv->stats[r].by_status[code]);
            if (v)
                cqrs_text_printf(t,
                                 "cqrs_http_requests_total{operation=\"%s\",method=\"%s\","
                                 "route=\"%s\",status=\"%d\"} %llu\n",
                                 rt ? rt->operation : "unmatched", method,
                                 rt ? rt->pattern : "unmatched", code, (unsigned long long)v);
        }
    }
    cqrs_text_printf(t, "# HELP cqrs_http_request_duration_seconds Time from the request line "
                        "to the end of the response.\n"
                        "# TYPE cqrs_http_request_duration_seconds histogram\n");
    for (size_t r = 0; r < srv->n_routes + N_UNMATCHED; r++) {
        const cqrs_http_route_t *rt = r < srv->n_routes ? &srv->routes[r] : NULL;
        const char *method = rt ? rt->method : unmatched_methods[r - srv->n_routes];
        const cqrs_histogram_t *h = &srv->stats[r].latency;
        if (!atomic_load(&h->count))
            continue;
        char labels[256];
        snprintf(labels, sizeof labels, "operation=\"%s\",method=\"%s\",route=\"%s\"",
                 rt ? rt->operation : "unmatched", method, rt ? rt->pattern : "unmatched");
        cqrs_metric_histogram_samples(t, "cqrs_http_request_duration_seconds", labels, h);
    }
}

/* Calls the handler; when it suspended instead of replying, suspends the connection (or calls
 * its continuation at once when a wake already came). */
static void run_handler(cqrs_http_request_t *req, cqrs_http_handler_fn fn, void *ud)
{
    for (;;) {
        req->resume_fn = NULL;
        fn(req, ud);
        if (req->replied)
            return;
        if (!req->resume_fn) {
            CQRS_LOG_ERROR("handler returned without a reply", "request_id", req->request_id,
                           "path", req->path);
            cqrs_http_reply_problem(req, 500, "internal", "Internal Server Error",
                                    "the server failed to handle the request", NULL, NULL);
            return;
        }
        if (cqrs_http_stopping(req) && fn == req->resume_fn) {
            /* A continuation that keeps waiting while the server stops. */
            cqrs_http_add_header(req, "Retry-After", "1");
            cqrs_http_reply_problem(req, 503, "shutting-down", "Service Unavailable",
                                    "the server is shutting down", NULL, NULL);
            return;
        }
        if (try_suspend(req))
            return;
        fn = req->resume_fn;
        ud = req->resume_ud;
    }
}

static void dispatch(cqrs_http_request_t *req)
{
    cqrs_http_server_t *srv = req->srv;
    if (req->too_large) {
        char detail[128];
        snprintf(detail, sizeof detail, "the request body is larger than %zu bytes",
                 srv->cfg.max_body_bytes);
        cqrs_http_reply_problem(req, 413, "payload-too-large", "Content Too Large", detail, NULL,
                                NULL);
        return;
    }
    /* The empty-body case still needs a non-empty media type check for chunked bodies. */
    if (req->body_len > 0 &&
        !is_json_media_type(cqrs_http_header(req, MHD_HTTP_HEADER_CONTENT_TYPE))) {
        cqrs_http_reply_problem(req, 415, "unsupported-media-type", "Unsupported Media Type",
                                "the request body must be application/json", NULL, NULL);
        return;
    }
    char allow[128];
    const cqrs_http_route_t *route =
        cqrs_http_route_match(srv->routes, srv->n_routes, req->method, req->path, req->scratch,
                              &req->params, allow, sizeof allow);
    /* A read sent to a server that serves none (the command API, whose Location headers name
     * the query API's documents) is told where reads are served. */
    bool read = strcmp(req->method, "GET") == 0 || strcmp(req->method, "HEAD") == 0;
    const char *elsewhere = !route && read ? srv->cfg.reads_elsewhere : NULL;
    if (!route && allow[0]) {
        cqrs_http_add_header(req, "Allow", allow);
        cqrs_http_reply_problem(req, 405, "method-not-allowed", "Method Not Allowed",
                                elsewhere ? elsewhere : "this resource does not support the method",
                                NULL, NULL);
        return;
    }
    if (!route) {
        cqrs_http_reply_problem(req, 404, "not-found", "Not Found",
                                elsewhere ? elsewhere : "no such resource", NULL, NULL);
        return;
    }
    req->route = (size_t)(route - srv->routes);
    if (srv->cfg.auth && route->scope != CQRS_SCOPE_NONE && !authorize(req, route))
        return;
    run_handler(req, route->fn, route->ud);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    (void)cls;
    (void)url;
    (void)version;
    cqrs_http_request_t *req = *con_cls;
    if (!req)
        return MHD_NO;
    if (!req->started) {
        req->started = true;
        req->conn = conn;
        req->method = method;
        enum MHD_Result r = first_call(req);
        return req->queue_failed ? MHD_NO : r;
    }
    if (req->resume_fn && !req->replied && *upload_data_size == 0) {
        /* Resumed after cqrs_http_suspend. */
        run_handler(req, req->resume_fn, req->resume_ud);
        return req->queue_failed ? MHD_NO : MHD_YES;
    }
    if (req->replied) {
        /* Replied early (413/415): discard whatever body still arrives. */
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        if (req->too_large || req->body_len + n > req->srv->cfg.max_body_bytes) {
            req->too_large = true;
            return MHD_YES;
        }
        if (req->body_len + n + 1 > req->body_cap) {
            size_t cap = req->body_cap ? req->body_cap : 1024;
            while (cap < req->body_len + n + 1)
                cap *= 2;
            char *nb = realloc(req->body, cap);
            if (!nb)
                return MHD_NO;
            req->body = nb;
            req->body_cap = cap;
        }
        memcpy(req->body + req->body_len, upload_data, n);
        req->body_len += n;
        req->body[req->body_len] = '\0';
        return MHD_YES;
    }
    dispatch(req);
    return req->queue_failed ? MHD_NO : MHD_YES;
}

cqrs_log_level_t cqrs_http_mhd_log_level(const char *msg)
{
    /* A client that hangs up (an SSE client leaving, a browser tab closed, a probe's
     * connection reset) is normal. libmicrohttpd 1.0 says so in these words: "Failed to send
     * the {response headers,response body,chunked response body,footers} for the request for
     * `…'. Error: <why>" with the reasons below, or on the reading side. */
    static const char *const client_gone[] = {
        "The connection was forcibly closed by remote peer",
        "The socket is no longer available for sending",
        "The socket is not connected",
    };
    if (strncmp(msg, "Failed to send the ", 19) == 0) {
        for (size_t i = 0; i < sizeof client_gone / sizeof client_gone[0]; i++)
            if (strstr(msg, client_gone[i]))
                return CQRS_LOG_DEBUG;
        return CQRS_LOG_WARN;
    }
    if (strncmp(msg, "Connection was closed by remote side", 36) == 0 ||
        strncmp(msg, "Connection socket is closed when reading request", 48) == 0)
        return CQRS_LOG_DEBUG;
    return CQRS_LOG_WARN;
}

__attribute__((format(printf, 2, 0))) static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    msg[strcspn(msg, "\n")] = '\0';
    cqrs_log_level_t level = cqrs_http_mhd_log_level(msg);
    if (cqrs_log_enabled(level))
        cqrs_log(level, "http server", "detail", msg, (char *)NULL);
}

cqrs_http_server_t *cqrs_http_server_new(const cqrs_http_config_t *cfg,
                                         const cqrs_http_route_t *routes, size_t n_routes,
                                         cqrs_error_t *err)
{
    cqrs_http_server_t *srv = calloc(1, sizeof *srv);
    if (!srv) {
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    srv->cfg = *cfg;
    srv->routes = routes;
    srv->n_routes = n_routes;
    srv->stats = calloc(n_routes + N_UNMATCHED, sizeof *srv->stats);
    pthread_mutex_init(&srv->susp_mu, NULL);
    if (!srv->stats) {
        free(srv);
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    return srv;
}

cqrs_err_t cqrs_http_server_start(cqrs_http_server_t *srv, cqrs_error_t *err)
{
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(srv->cfg.port);
    if (inet_pton(AF_INET, srv->cfg.host, &addr.sin_addr) != 1)
        return cqrs_error_set(err, CQRS_ERR_CONFIG, "not an IPv4 address: %s", srv->cfg.host);
    unsigned flags =
        MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ITC | MHD_USE_ERROR_LOG | MHD_ALLOW_SUSPEND_RESUME;
    /* Client discipline 1: RFC 9112's stricter choices (no Content-Length beside chunked, no
     * bare LF, no folded headers, no whitespace in the target), closing request smuggling
     * doors a lenient parser leaves open. */
    srv->daemon = MHD_start_daemon(
        flags, srv->cfg.port, NULL, NULL, on_request, srv, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, srv,
        MHD_OPTION_CLIENT_DISCIPLINE_LVL, (int)1, MHD_OPTION_SOCK_ADDR, &addr,
        MHD_OPTION_THREAD_POOL_SIZE, srv->cfg.threads ? srv->cfg.threads : 1,
        MHD_OPTION_CONNECTION_LIMIT, srv->cfg.connection_limit, MHD_OPTION_PER_IP_CONNECTION_LIMIT,
        srv->cfg.per_ip_connection_limit, MHD_OPTION_CONNECTION_TIMEOUT,
        srv->cfg.connection_timeout_s, MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(32 * 1024),
        MHD_OPTION_URI_LOG_CALLBACK, on_uri, srv, MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv,
        MHD_OPTION_END);
    if (!srv->daemon)
        return cqrs_error_set(err, CQRS_ERR_CONFIG, "cannot listen on %s:%u", srv->cfg.host,
                              (unsigned)srv->cfg.port);
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(srv->daemon, MHD_DAEMON_INFO_BIND_PORT);
    srv->port = info ? info->port : srv->cfg.port;
    return CQRS_ERR_OK;
}

uint16_t cqrs_http_server_port(const cqrs_http_server_t *srv)
{
    return srv->port;
}

void cqrs_http_server_stop(cqrs_http_server_t *srv)
{
    if (!srv || !srv->daemon)
        return;
    /* Stop accepting; wake every suspended request (waits answer 503, streams end); wait
     * (bounded) for open connections to finish their requests. */
    MHD_socket lsock = MHD_quiesce_daemon(srv->daemon);
    if (lsock != MHD_INVALID_SOCKET) {
        /* Connections the kernel has completed and MHD had not accepted yet are served, not
         * reset by the close: accepted here and handed over. Then the socket stops listening
         * (shutdown: Linux refuses new connections from then on), but stays open until
         * MHD_stop_daemon — its threads may still look at it (libmicrohttpd's manual,
         * MHD_quiesce_daemon). */
        int fl = fcntl(lsock, F_GETFL);
        if (fl >= 0 && fcntl(lsock, F_SETFL, fl | O_NONBLOCK) == 0) {
            for (;;) {
                struct sockaddr_storage addr;
                socklen_t len = sizeof addr;
                int fd = accept4(lsock, (struct sockaddr *)&addr, &len, SOCK_CLOEXEC);
                if (fd < 0)
                    break;
                /* on failure MHD closes the socket itself */
                (void)MHD_add_connection(srv->daemon, fd, (struct sockaddr *)&addr, len);
            }
        }
        shutdown(lsock, SHUT_RDWR);
    }
    pthread_mutex_lock(&srv->susp_mu);
    atomic_store(&srv->stopping, true);
    while (srv->susp_head) {
        cqrs_http_request_t *req = srv->susp_head;
        susp_unlink(req);
        MHD_resume_connection(req->conn);
    }
    pthread_mutex_unlock(&srv->susp_mu);
    int64_t deadline = cqrs_monotonic_ms() + (int64_t)srv->cfg.drain_timeout_ms;
    while (cqrs_monotonic_ms() < deadline) {
        const union MHD_DaemonInfo *info =
            MHD_get_daemon_info(srv->daemon, MHD_DAEMON_INFO_CURRENT_CONNECTIONS);
        if (!info || info->num_connections == 0)
            break;
        usleep(20 * 1000);
    }
    MHD_stop_daemon(srv->daemon);
    srv->daemon = NULL;
    if (lsock != MHD_INVALID_SOCKET)
        close(lsock);
}

void cqrs_http_server_destroy(cqrs_http_server_t *srv)
{
    if (!srv)
        return;
    cqrs_http_server_stop(srv);
    free(srv->stats);
    pthread_mutex_destroy(&srv->susp_mu);
    free(srv);
}
