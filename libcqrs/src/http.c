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
 * Threads: MHD's internal thread pool; handlers run on those threads.
 */
#include "cqrs/http.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "cqrs/log.h"
#include "cqrs/util.h"

#define MAX_RESPONSE_HEADERS 16

struct cqrs_http_server {
    cqrs_http_config_t cfg;
    const cqrs_http_route_t *routes;
    size_t n_routes;
    struct MHD_Daemon *daemon;
    uint16_t port;
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
    char request_id[72];
    char traceparent[56];
    size_t n_headers;
    char *hname[MAX_RESPONSE_HEADERS];
    char *hvalue[MAX_RESPONSE_HEADERS];
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
        if (strcmp(routes[i].method, method) == 0) {
            *params = tmp;
            return &routes[i];
        }
        if (strstr(allow, routes[i].method) == NULL) {
            int w = snprintf(allow + used, allow_len - used, "%s%s", used ? ", " : "",
                             routes[i].method);
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

const char *cqrs_http_request_id(const cqrs_http_request_t *req)
{
    return req->request_id;
}

const char *cqrs_http_traceparent(const cqrs_http_request_t *req)
{
    return req->traceparent;
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

static void queue(cqrs_http_request_t *req, unsigned status, const char *content_type, char *body,
                  size_t len)
{
    if (req->replied) {
        free(body);
        return;
    }
    req->replied = true;
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
    MHD_queue_response(req->conn, status, resp);
    MHD_destroy_response(resp);
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

/* ---- MHD glue ---------------------------------------------------------------------------- */

static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn)
{
    (void)conn;
    cqrs_http_request_t *req = calloc(1, sizeof *req);
    if (!req)
        return NULL;
    req->srv = cls;
    req->raw_uri = strdup(uri ? uri : "/");
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

static enum MHD_Result first_call(cqrs_http_request_t *req)
{
    const char *rid = cqrs_http_header(req, "X-Request-Id");
    if (request_id_ok(rid))
        snprintf(req->request_id, sizeof req->request_id, "%s", rid);
    else
        cqrs_uuid_v4(req->request_id);
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
    bool has_body = declared > 0 || (te && strcasecmp(te, "identity") != 0);
    if (has_body && !is_json_media_type(cqrs_http_header(req, MHD_HTTP_HEADER_CONTENT_TYPE))) {
        cqrs_http_reply_problem(req, 415, "unsupported-media-type", "Unsupported Media Type",
                                "the request body must be application/json", NULL, NULL);
        return MHD_YES;
    }
    return MHD_YES;
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
    if (!route && allow[0]) {
        cqrs_http_add_header(req, "Allow", allow);
        cqrs_http_reply_problem(req, 405, "method-not-allowed", "Method Not Allowed",
                                "this resource does not support the method", NULL, NULL);
        return;
    }
    if (!route) {
        cqrs_http_reply_problem(req, 404, "not-found", "Not Found", "no such resource", NULL, NULL);
        return;
    }
    route->fn(req, route->ud);
    if (!req->replied) {
        CQRS_LOG_ERROR("handler returned without a reply", "request_id", req->request_id, "path",
                       req->path);
        cqrs_http_reply_problem(req, 500, "internal", "Internal Server Error",
                                "the server failed to handle the request", NULL, NULL);
    }
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
        return first_call(req);
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
    return MHD_YES;
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    msg[strcspn(msg, "\n")] = '\0';
    CQRS_LOG_WARN("http server", "detail", msg);
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
    srv->daemon = MHD_start_daemon(
        flags, srv->cfg.port, NULL, NULL, on_request, srv, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, srv,
        MHD_OPTION_SOCK_ADDR, &addr, MHD_OPTION_THREAD_POOL_SIZE,
        srv->cfg.threads ? srv->cfg.threads : 1, MHD_OPTION_CONNECTION_LIMIT,
        srv->cfg.connection_limit, MHD_OPTION_PER_IP_CONNECTION_LIMIT,
        srv->cfg.per_ip_connection_limit, MHD_OPTION_CONNECTION_TIMEOUT,
        srv->cfg.connection_timeout_s, MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(128 * 1024),
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
    /* Stop accepting; wait (bounded) for open connections to finish their requests. */
    MHD_socket lsock = MHD_quiesce_daemon(srv->daemon);
    if (lsock != MHD_INVALID_SOCKET)
        close(lsock);
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
}

void cqrs_http_server_destroy(cqrs_http_server_t *srv)
{
    if (!srv)
        return;
    cqrs_http_server_stop(srv);
    free(srv);
}
