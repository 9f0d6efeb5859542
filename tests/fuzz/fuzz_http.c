/* libFuzzer: raw bytes sent to an in-process HTTP server with the route patterns of both
 * daemons, whose handlers run what the daemons run before any storage call: the command
 * pipeline's parsing (body, If-Match, Idempotency-Key) and validation, path ids, query
 * parameters and list cursors. The server must answer or close, never crash, and keep
 * answering a normal request afterwards. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cqrs/command.h>
#include <cqrs/http.h>
#include <cqrs/log.h>

#include "command.h"
#include "query.h"

static cqrs_http_server_t *srv;
static int port;

static void command_like(cqrs_http_request_t *req, void *ud)
{
    (void)ud;
    static const cqrs_command_config_t cfg = {32, 86400};
    domain_limits_t l;
    domain_limits_default(&l);
    cqrs_command_t cmd;
    if (cqrs_command_begin(&cmd, req, CQRS_CMD_BODY | CQRS_CMD_IF_MATCH, &cfg)) {
        cqrs_violations_t v;
        cqrs_violations_init(&v);
        create_product_input_t c;
        if (product_validate_create(cmd.body, &l, &c, &v))
            cqrs_http_reply_json(req, 201, json_object());
        else
            command_reply_violations(req, &v);
        cqrs_violations_close(&v);
    }
    cqrs_command_end(&cmd);
}

static void path_id(cqrs_http_request_t *req, void *ud)
{
    (void)ud;
    char id[CQRS_UUID_LEN + 1];
    if (command_path_id(req, id))
        cqrs_http_reply_json(req, 200, json_pack("{s:s}", "id", id));
}

static void list_like(cqrs_http_request_t *req, void *ud)
{
    (void)ud;
    const char *sort = cqrs_http_query(req, "sort"), *q = cqrs_http_query(req, "q");
    char words[11][MAX_WORD + 1];
    size_t n = q ? split_words(q, words, 11) : 0;
    size_t len = 0;
    const char *cursor = cqrs_http_query(req, "cursor");
    char *raw = cursor ? cqrs_base64url_decode(cursor, &len) : NULL;
    free(raw);
    cqrs_http_reply_json(
        req, 200,
        json_pack("{s:i, s:i}", "sort", sort ? product_sort_parse(sort) : 0, "words", (int)n));
}

static const cqrs_http_route_t ROUTES[] = {
    {"POST", "/v1/products", command_like, NULL, "CreateProduct", CQRS_SCOPE_NONE},
    {"PATCH", "/v1/products/{id}", path_id, NULL, "UpdateProductDetails", CQRS_SCOPE_NONE},
    {"POST", "/v1/orders", command_like, NULL, "PlaceOrder", CQRS_SCOPE_NONE},
    {"POST", "/v1/orders/{id}/cancel", path_id, NULL, "CancelOrder", CQRS_SCOPE_NONE},
    {"GET", "/v1/products/{id}", path_id, NULL, "GetProduct", CQRS_SCOPE_NONE},
    {"GET", "/v1/products", list_like, NULL, "ListProducts", CQRS_SCOPE_NONE},
    {"GET", "/v1/customers/{id}/orders", path_id, NULL, "CustomerOrders", CQRS_SCOPE_NONE},
};

static int exchange(const void *data, size_t size, char *reply, size_t cap, long wait_ms)
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
    ssize_t w = send(fd, data, size, MSG_NOSIGNAL);
    (void)w;
    shutdown(fd, SHUT_WR);
    size_t used = 0;
    ssize_t r;
    while (used + 1 < cap && (r = recv(fd, reply + used, cap - used - 1, 0)) > 0)
        used += (size_t)r;
    reply[used] = '\0';
    close(fd);
    return (int)used;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    cqrs_log_init("fuzz", CQRS_LOG_ERROR);
    cqrs_http_config_t cfg = {.host = "127.0.0.1",
                              .port = 0,
                              .threads = 2,
                              .connection_limit = 4096,
                              .connection_timeout_s = 2,
                              .max_body_bytes = 65536,
                              .drain_timeout_ms = 100};
    cqrs_error_t err;
    srv = cqrs_http_server_new(&cfg, ROUTES, sizeof ROUTES / sizeof ROUTES[0], &err);
    if (!srv || cqrs_http_server_start(srv, &err) != CQRS_ERR_OK)
        abort();
    port = cqrs_http_server_port(srv);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char reply[65536];
    /* an incomplete request is left to the server's own timeouts: don't wait for them */
    exchange(data, size, reply, sizeof reply, 10);
    /* the server still answers a normal request */
    static const char ok[] = "GET /v1/products/6f9619ff-8b86-4011-b42d-00c04fc964ff HTTP/1.1\r\n"
                             "Host: x\r\nConnection: close\r\n\r\n";
    if (exchange(ok, sizeof ok - 1, reply, sizeof reply, 5000) <= 0 ||
        strncmp(reply, "HTTP/1.1 200", 12)) {
        fprintf(stderr, "the server stopped answering: %.200s\n", reply);
        abort();
    }
    return 0;
}
