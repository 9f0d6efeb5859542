/* http.h — the HTTP server both daemons use: libmicrohttpd underneath, a route table on top,
 * JSON and RFC 9457 problem replies.
 *
 * Threads: handlers run on the server's worker threads (a pool); a handler must reply exactly
 * once, before it returns. The request object is owned by the server and valid only during the
 * handler call.
 *
 * Answered by this layer before any handler runs: 400 (a query parameter or header whose
 * decoded value holds a NUL, which a C string would cut), 404 (no route), 405 (+Allow), 413
 * (body over the limit; from Content-Length before reading when possible), 415 (non-empty body
 * whose media type is not application/json). HEAD is served wherever GET is.
 */
#ifndef CQRS_HTTP_H
#define CQRS_HTTP_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cqrs/err.h"
#include "cqrs/log.h"

#define CQRS_HTTP_MAX_PARAMS 4
#define CQRS_PROBLEM_BASE "urn:cqrs:problem:"

typedef struct cqrs_http_request cqrs_http_request_t;
typedef struct cqrs_http_server cqrs_http_server_t;

typedef void (*cqrs_http_handler_fn)(cqrs_http_request_t *req, void *ud);

/* What a bearer token may do. admin implies every other scope; metrics is for scrapers. */
typedef enum cqrs_scope {
    CQRS_SCOPE_NONE = 0, /* no token needed (probes) */
    CQRS_SCOPE_READ = 1,
    CQRS_SCOPE_WRITE = 2,
    CQRS_SCOPE_ADMIN = 4,
    CQRS_SCOPE_METRICS = 8,
} cqrs_scope_t;

/* pattern: literal segments and `{name}` segments, e.g. "/v1/products/{id}/price".
 * operation names the route in metrics and logs (e.g. "CreateProduct"). */
typedef struct cqrs_http_route {
    const char *method;
    const char *pattern;
    cqrs_http_handler_fn fn;
    void *ud;
    const char *operation;
    cqrs_scope_t scope;
} cqrs_http_route_t;

/* Bearer tokens, loaded from a file of lines "<name> <token> <scope>[,<scope>…]" (scopes read,
 * write, admin, metrics; '#' starts a comment). Thread-safe; reloadable. */
typedef struct cqrs_http_auth cqrs_http_auth_t;

/* NULL with err when the file cannot be read or a line is malformed. */
cqrs_http_auth_t *cqrs_http_auth_load(const char *path, cqrs_error_t *err);
/* Replaces the tokens with the file's current content; on error keeps the old ones. */
cqrs_err_t cqrs_http_auth_reload(cqrs_http_auth_t *auth, cqrs_error_t *err);
size_t cqrs_http_auth_count(cqrs_http_auth_t *auth);
void cqrs_http_auth_destroy(cqrs_http_auth_t *auth);

typedef struct cqrs_http_config {
    const char *host; /* IPv4 literal to bind, e.g. "127.0.0.1" or "0.0.0.0" */
    uint16_t port;    /* 0 = pick a free port; see cqrs_http_server_port */
    unsigned threads;
    unsigned connection_limit;
    unsigned per_ip_connection_limit; /* 0 = unlimited */
    unsigned connection_timeout_s;
    size_t max_body_bytes;
    unsigned drain_timeout_ms; /* how long stop waits for open connections */
    cqrs_http_auth_t *auth;    /* NULL: no tokens required; borrowed */
    /* NULL, or the detail of the 404/405 a GET or HEAD gets when no GET route serves its path:
     * where reads are served instead (the command API points to the query API). Borrowed. */
    const char *reads_elsewhere;
} cqrs_http_config_t;

/* Matching (pure, exported for tests). On a match returns the route and fills names/values
 * (values point into `scratch`, which must hold strlen(path)+1 bytes). When the path matches
 * but the method does not, returns NULL and writes the allowed methods ("GET, POST") to allow.
 * allow is "" when nothing matched the path. */
typedef struct cqrs_http_params {
    size_t n;
    const char *name[CQRS_HTTP_MAX_PARAMS];
    const char *value[CQRS_HTTP_MAX_PARAMS];
} cqrs_http_params_t;

/* HEAD is answered by the GET route of the path (headers as for GET, no body), and "HEAD"
 * follows "GET" in Allow. */
const cqrs_http_route_t *cqrs_http_route_match(const cqrs_http_route_t *routes, size_t n,
                                               const char *method, const char *path, char *scratch,
                                               cqrs_http_params_t *params, char *allow,
                                               size_t allow_len);

/* The level a libmicrohttpd error-log message is logged at (pure, exported for tests): debug
 * for a client that went away (a normal end, e.g. of an SSE stream), warn for the rest. */
cqrs_log_level_t cqrs_http_mhd_log_level(const char *msg);

/* routes is borrowed and must outlive the server. Returns NULL with err on failure. */
cqrs_http_server_t *cqrs_http_server_new(const cqrs_http_config_t *cfg,
                                         const cqrs_http_route_t *routes, size_t n_routes,
                                         cqrs_error_t *err);
cqrs_err_t cqrs_http_server_start(cqrs_http_server_t *srv, cqrs_error_t *err);
uint16_t cqrs_http_server_port(const cqrs_http_server_t *srv);
/* Stops accepting, lets in-flight requests finish, stops the threads. */
void cqrs_http_server_stop(cqrs_http_server_t *srv);
void cqrs_http_server_destroy(cqrs_http_server_t *srv);

/* Request accessors; returned strings are borrowed for the duration of the handler. */
const char *cqrs_http_method(const cqrs_http_request_t *req);
const char *cqrs_http_path(const cqrs_http_request_t *req);
const char *cqrs_http_param(const cqrs_http_request_t *req, const char *name);
const char *cqrs_http_header(const cqrs_http_request_t *req, const char *name);
const char *cqrs_http_query(const cqrs_http_request_t *req, const char *name);
/* Calls fn for each query argument; used to reject unknown parameters. */
void cqrs_http_query_each(const cqrs_http_request_t *req,
                          void (*fn)(const char *key, const char *value, void *ud), void *ud);
const char *cqrs_http_body(const cqrs_http_request_t *req, size_t *len);
/* The request's W3C traceparent, or a fresh one when it sent none or an invalid one. */
const char *cqrs_http_traceparent(const cqrs_http_request_t *req);

/* Who is calling: the token's name, or "-" when no tokens are configured. */
const char *cqrs_http_caller(const cqrs_http_request_t *req);

/* Appends the server's request counters and latency histograms (Prometheus text). */
struct cqrs_text;
void cqrs_http_server_metrics(cqrs_http_server_t *srv, struct cqrs_text *out);

/* Adds a response header to the reply that follows (copied). */
void cqrs_http_add_header(cqrs_http_request_t *req, const char *name, const char *value);

/* Replies with body serialised compactly as application/json; body is stolen (may be NULL for
 * no body). */
void cqrs_http_reply_json(cqrs_http_request_t *req, unsigned status, json_t *body);

/* Replies with application/problem+json {type: CQRS_PROBLEM_BASE slug, title, status, detail,
 * errors?}; errors is stolen and may be NULL. Extra members may be merged from `extra`
 * (stolen, may be NULL). */
void cqrs_http_reply_problem(cqrs_http_request_t *req, unsigned status, const char *slug,
                             const char *title, const char *detail, json_t *errors, json_t *extra);

/* Replies with a plain text body (copied), for /metrics and probes. */
void cqrs_http_reply_text(cqrs_http_request_t *req, unsigned status, const char *content_type,
                          const char *text);

/* ---- deferred replies and streams ----
 *
 * A handler that must wait (for a document version, for the next change) calls
 * cqrs_http_suspend instead of replying and returns: the connection then waits without a worker
 * thread. cqrs_http_wake (any thread) makes the server call fn(req, ud) on a worker, which
 * replies or suspends again. A wake that comes before the suspension took effect is kept, so
 * none is lost. Suspended requests never time out on their own: whoever suspends keeps a
 * deadline. When the server stops, every suspended request is woken and
 * cqrs_http_stopping(req) is true (a continuation that suspends again then gets 503).
 *
 * Lifetime: req stays valid until its connection closes; cqrs_http_on_close registers fn(ud),
 * called once at that moment — after it, nobody may wake req. */
void cqrs_http_suspend(cqrs_http_request_t *req, cqrs_http_handler_fn fn, void *ud);
void cqrs_http_wake(cqrs_http_request_t *req);
bool cqrs_http_stopping(const cqrs_http_request_t *req);
void cqrs_http_on_close(cqrs_http_request_t *req, void (*fn)(void *ud), void *ud);

/* A streamed reply (chunked): fn(ud, buf, max) writes up to max bytes and returns how many;
 * 0 = nothing to send now (the stream waits for cqrs_http_wake without a thread), < 0 = end.
 * fn runs on worker threads, one call at a time. Headers added before are sent. */
typedef long (*cqrs_http_stream_fn)(void *ud, char *buf, size_t max);
void cqrs_http_reply_stream(cqrs_http_request_t *req, unsigned status, const char *content_type,
                            cqrs_http_stream_fn fn, void *ud);

/* Maps an error to the usual problem reply (CONFLICT 409, NOT_FOUND 404, INVALID 422,
 * UNAVAILABLE/TIMEOUT/RETRY 503 with Retry-After, others 500). */
void cqrs_http_reply_error(cqrs_http_request_t *req, const cqrs_error_t *err);

#endif
