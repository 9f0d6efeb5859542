/* json.h — strict parsing of request bodies and field-by-field validation that collects every
 * violation into an RFC 9457 `errors` array.
 *
 * Strict means: one JSON object, no duplicate keys, valid UTF-8, no NUL character in a member
 * name, integers that fit int64, nesting no deeper than a limit. A "\u0000" inside a string value
 * is valid JSON and is loaded; cqrs_v_string refuses it (422 naming the field). Problem texts
 * never carry the parser's internals (its flag names).
 */
#ifndef CQRS_JSON_H
#define CQRS_JSON_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "cqrs/err.h"

/* Parses body as one JSON object. Returns a new reference, or NULL with err (INVALID) set and
 * err->message a human sentence. An empty body is an error too. */
json_t *cqrs_json_parse_object(const char *body, size_t len, int max_depth, cqrs_error_t *err);

/* Depth of a value: scalars 0, [] / {} 1, [[1]] 2. */
int cqrs_json_depth(const json_t *v);

/* Violations collected while validating one request. status is 400 when any violation is a
 * syntax-level one (missing field, wrong type), else 422 when any, else 0. */
typedef struct cqrs_violations {
    json_t *errors; /* array of {field, message}; owned */
    int status;
    char prefix[64]; /* prepended to field names, e.g. "items[2]." for nested objects */
} cqrs_violations_t;

void cqrs_violations_init(cqrs_violations_t *v);
void cqrs_violations_close(cqrs_violations_t *v);
void cqrs_violation_add(cqrs_violations_t *v, int status, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* String member `field` of obj. Missing → 400 when required (NULL returned, no violation when
 * optional), null → 422, not a string → 400, containing the NUL character (\u0000) → 422,
 * length outside [min_chars, max_chars] (code points) → 422. Returns the borrowed string only when
 * valid. */
const char *cqrs_v_string(cqrs_violations_t *v, const json_t *obj, const char *field, bool required,
                          size_t min_chars, size_t max_chars);

/* Integer member: missing → 400 when required, null → 422, not an integer → 400, outside
 * [min, max] → 422. An integer is any integral number however written (72794.0, 1e3), as in
 * JSON Schema 2020-12; 1.5 is not one. Returns true and sets *out only when present and valid. */
bool cqrs_v_int(cqrs_violations_t *v, const json_t *obj, const char *field, bool required,
                int64_t min, int64_t max, int64_t *out);

/* Flags every member of obj that is not in `allowed` (NULL-terminated): members named in
 * `server_owned` as "server-owned", others as "unknown field"; both 422. */
void cqrs_v_only(cqrs_violations_t *v, const json_t *obj, const char *const *allowed,
                 const char *const *server_owned);

#endif
