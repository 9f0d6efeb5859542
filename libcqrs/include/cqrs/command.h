/* command.h — the HTTP semantics every command shares: body parsing, If-Match, the
 * Idempotency-Key protocol, one transaction, and the reply.
 *
 * A handler calls cqrs_command_begin (which answers 400 itself for a malformed body, If-Match
 * or Idempotency-Key), validates, then cqrs_command_execute with its transaction body. The body
 * may run more than once (contention retries). It either fills a 2xx reply
 * (cqrs_command_reply) after writing rows and events, or a business 4xx
 * (cqrs_command_problem) at any point — even after a failed statement — and returns OK; the
 * runner then undoes everything the body wrote. An error return (UNAVAILABLE, INTERNAL, …)
 * rolls everything back and answers 5xx.
 *
 * Idempotency-Key (scope = caller + method + path): the first final response (2xx or business
 * 4xx) is stored in the same transaction as the change and replayed, with
 * `Idempotent-Replayed: true`, to a retry with the same canonical body; another body → 422. A
 * twin arriving while the first is in flight waits on the key's row lock and then replays; if
 * the wait outlasts the retries it gets 409. Answers given before the key is looked at (400,
 * 413, 415, 422 for invalid input) are not stored: they depend only on the request.
 */
#ifndef CQRS_COMMAND_H
#define CQRS_COMMAND_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "cqrs/err.h"
#include "cqrs/http.h"
#include "cqrs/store.h"
#include "cqrs/util.h"

#define CQRS_IF_MATCH_NONE (-1) /* no If-Match header */
#define CQRS_IF_MATCH_ANY 0     /* If-Match: * */

enum cqrs_command_flags {
    CQRS_CMD_BODY = 1,     /* a JSON object body is required */
    CQRS_CMD_NO_BODY = 2,  /* empty body or {} */
    CQRS_CMD_IF_MATCH = 4, /* the command targets one existing aggregate: If-Match applies */
};

typedef struct cqrs_command {
    cqrs_http_request_t *req;
    json_t *body; /* owned; {} for an empty body */
    int64_t if_match;
    bool has_key;
    char key[256];
    char *scope;                  /* owned */
    char *canonical;              /* owned: body with sorted keys, compact */
    char time[CQRS_TIME_LEN + 1]; /* the command's time: events and rows share it */
    /* reply, set by the transaction body */
    unsigned status;
    json_t *reply; /* owned */
    int64_t etag_version;
    char location[160];
    /* internal */
    int replay; /* 0 none, 1 replay stored response, 2 key reused with another body */
    unsigned stored_status;
    char *stored_body;
    char *stored_headers;
} cqrs_command_t;

typedef struct cqrs_command_config {
    int max_json_depth;
    int64_t idempotency_ttl_s;
} cqrs_command_config_t;

/* Parses what every command shares. Returns false after replying 400 itself. */
bool cqrs_command_begin(cqrs_command_t *cmd, cqrs_http_request_t *req, int flags,
                        const cqrs_command_config_t *cfg);
void cqrs_command_end(cqrs_command_t *cmd);

/* Reply helpers for the transaction body. body is stolen. etag_version 0 = no ETag. */
void cqrs_command_reply(cqrs_command_t *cmd, unsigned status, json_t *body, int64_t etag_version,
                        const char *location);
void cqrs_command_problem(cqrs_command_t *cmd, unsigned status, const char *slug, const char *title,
                          const char *detail, json_t *extra);

/* For commands on one existing aggregate, after locking it: true when If-Match allows the
 * current version; otherwise sets the 412 reply (with current_version) and returns false. */
bool cqrs_command_check_version(cqrs_command_t *cmd, int64_t current_version);

typedef cqrs_err_t (*cqrs_command_fn)(cqrs_tx_t *tx, cqrs_command_t *cmd, void *ud,
                                      cqrs_error_t *err);

/* Runs fn in one transaction with the Idempotency-Key protocol and replies. */
void cqrs_command_execute(cqrs_command_t *cmd, cqrs_store_t *store,
                          const cqrs_command_config_t *cfg, cqrs_command_fn fn, void *ud);

/* Parses an If-Match value: "\"N\"" (N ≥ 1) or "*". Pure. */
bool cqrs_if_match_parse(const char *value, int64_t *out);

/* 1–255 printable ASCII characters. Pure. */
bool cqrs_idempotency_key_valid(const char *key);

#endif
