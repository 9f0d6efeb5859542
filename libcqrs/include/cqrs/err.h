/* err.h — the one error enum of libcqrs and the optional detail out-parameter.
 *
 * Codes are 0 (OK) or negative. The classes matter more than the codes: callers map
 * INVALID → 400/422, CONFLICT → 409, NOT_FOUND → 404, UNAVAILABLE → 503 (retryable),
 * everything else → 500. The third column of the map says what each code means; what went
 * wrong travels in cqrs_error_t.message.
 */
#ifndef CQRS_ERR_H
#define CQRS_ERR_H

#include <stddef.h>

#define CQRS_ERRNO_MAP(X)                                                                          \
    X(OK, 0, "ok")                                                                                 \
    X(INVALID, -1, "invalid input")                                                                \
    X(CONFLICT, -2, "conflict")                                                                    \
    X(NOT_FOUND, -3, "not found")                                                                  \
    X(UNAVAILABLE, -4, "dependency unavailable")                                                   \
    X(TIMEOUT, -5, "timed out")                                                                    \
    X(RETRY, -6, "transient failure, retry")                                                       \
    X(NOMEM, -7, "out of memory")                                                                  \
    X(CONFIG, -8, "bad configuration")                                                             \
    X(STATE, -9, "wrong state")                                                                    \
    X(INTERNAL, -10, "internal error")

typedef enum cqrs_err {
#define CQRS__ERR_ENUM(name, val, str) CQRS_ERR_##name = (val),
    CQRS_ERRNO_MAP(CQRS__ERR_ENUM)
#undef CQRS__ERR_ENUM
} cqrs_err_t;

/* Detail of a failure. `where` names the constraint, field or key the failure is about
 * (for example the unique constraint a duplicate violated), empty when none. */
typedef struct cqrs_error {
    cqrs_err_t code;
    char message[256];
    char where[64];
} cqrs_error_t;

/* Fills *err (when err is not NULL) and returns code, so callers can write
 * `return cqrs_error_set(err, CQRS_ERR_INVALID, "bad %s", x);`. */
cqrs_err_t cqrs_error_set(cqrs_error_t *err, cqrs_err_t code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Like cqrs_error_set, also records `where` (may be NULL). */
cqrs_err_t cqrs_error_set_where(cqrs_error_t *err, cqrs_err_t code, const char *where,
                                const char *fmt, ...) __attribute__((format(printf, 4, 5)));

void cqrs_error_clear(cqrs_error_t *err);

#endif
