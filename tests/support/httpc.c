/* httpc.c — see httpc.h. Only what the tests need: Content-Length or read-to-EOF bodies. */
#include "httpc.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static int connect_local(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct timeval tv = {10, 0};
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

int httpc_raw(int port, const char *raw, size_t len, httpc_response_t *resp)
{
    memset(resp, 0, sizeof *resp);
    int fd = connect_local(port);
    if (fd < 0)
        return -1;
    resp->connected = 1;
    size_t off = 0;
    while (off < len) {
        ssize_t w = send(fd, raw + off, len - off, MSG_NOSIGNAL);
        if (w <= 0)
            break; /* the server may answer (413) and close before reading everything */
        off += (size_t)w;
    }
    shutdown(fd, SHUT_WR);
    size_t cap = 8192, used = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (used + 4096 + 1 > cap) {
            cap *= 2;
            buf = realloc(buf, cap);
        }
        ssize_t r = recv(fd, buf + used, cap - used - 1, 0);
        if (r <= 0)
            break;
        used += (size_t)r;
    }
    close(fd);
    buf[used] = '\0';
    char *end = strstr(buf, "\r\n\r\n");
    if (!end || sscanf(buf, "HTTP/1.%*d %d", &resp->status) != 1) {
        free(buf);
        resp->status = 0;
        return -1; /* connected, but no complete answer */
    }
    size_t head_len = (size_t)(end - buf) + 2;
    resp->head = strndup(buf, head_len);
    resp->body = strdup(end + 4);
    resp->body_len = used - head_len - 2;
    free(buf);
    return 0;
}

int httpc_send_only(int port, const char *raw, size_t len)
{
    int fd = connect_local(port);
    if (fd < 0)
        return -1;
    if (send(fd, raw, len, MSG_NOSIGNAL) != (ssize_t)len) {
        close(fd);
        return -1;
    }
    return fd;
}

int httpc_request(int port, const char *method, const char *path, const char *extra_headers,
                  const char *body, size_t body_len, httpc_response_t *resp)
{
    size_t cap = 1024 + strlen(path) + (extra_headers ? strlen(extra_headers) : 0) + body_len;
    char *req = malloc(cap);
    int n = snprintf(req, cap,
                     "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s"
                     "Content-Length: %zu\r\n\r\n",
                     method, path, extra_headers ? extra_headers : "", body ? body_len : 0);
    if (body && body_len)
        memcpy(req + n, body, body_len);
    int rc = httpc_raw(port, req, (size_t)n + (body ? body_len : 0), resp);
    free(req);
    return rc;
}

int httpc_header(const httpc_response_t *resp, const char *name, char *out, size_t cap)
{
    size_t nlen = strlen(name);
    for (const char *line = resp->head; line && *line;) {
        const char *eol = strstr(line, "\r\n");
        if (!eol)
            break;
        if (strncasecmp(line, name, nlen) == 0 && line[nlen] == ':') {
            const char *v = line + nlen + 1;
            while (*v == ' ')
                v++;
            snprintf(out, cap, "%.*s", (int)(eol - v), v);
            return 0;
        }
        line = eol + 2;
    }
    return -1;
}

void httpc_response_free(httpc_response_t *resp)
{
    free(resp->head);
    free(resp->body);
    memset(resp, 0, sizeof *resp);
}
