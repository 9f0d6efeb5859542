/* httpc.h — a minimal blocking HTTP/1.1 client for tests (Connection: close, 10 s timeouts). */
#ifndef CQRS_TEST_HTTPC_H
#define CQRS_TEST_HTTPC_H

#include <stddef.h>

typedef struct httpc_response {
    int connected; /* 1 once the connection was made (0: refused) */
    int status;    /* 0 when the exchange failed */
    char *head;    /* raw header block, NUL-terminated */
    char *body;    /* NUL-terminated */
    size_t body_len;
} httpc_response_t;

/* extra_headers: "Name: value\r\n…" or NULL. body may be NULL. Returns 0 on success. */
int httpc_request(int port, const char *method, const char *path, const char *extra_headers,
                  const char *body, size_t body_len, httpc_response_t *resp);

/* Sends raw bytes and reads the answer (for malformed requests). */
int httpc_raw(int port, const char *raw, size_t len, httpc_response_t *resp);

/* Sends raw bytes and returns the open socket without reading (a client that gave up);
 * the caller closes it. -1 on failure. */
int httpc_send_only(int port, const char *raw, size_t len);

/* Value of a response header (case-insensitive name) copied into out; 0 when found. */
int httpc_header(const httpc_response_t *resp, const char *name, char *out, size_t cap);

void httpc_response_free(httpc_response_t *resp);

#endif
