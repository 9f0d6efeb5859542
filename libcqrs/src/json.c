/* json.c — strict request-body parsing and validation helpers (pure). */
#include "cqrs/json.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "cqrs/util.h"

int cqrs_json_depth(const json_t *v)
{
    int max = 0;
    if (json_is_object(v)) {
        const char *k;
        json_t *c;
        json_object_foreach((json_t *)v, k, c)
        {
            int d = cqrs_json_depth(c);
            if (d > max)
                max = d;
        }
        return max + 1;
    }
    if (json_is_array(v)) {
        size_t i;
        json_t *c;
        json_array_foreach(v, i, c)
        {
            int d = cqrs_json_depth(c);
            if (d > max)
                max = d;
        }
        return max + 1;
    }
    return 0;
}

json_t *cqrs_json_parse_object(const char *body, size_t len, int max_depth, cqrs_error_t *err)
{
    if (!body || len == 0) {
        cqrs_error_set(err, CQRS_ERR_INVALID,
                       "the request body is empty; a JSON object is "
                       "required");
        return NULL;
    }
    json_error_t jerr;
    /* jansson validates UTF-8, rejects \u0000 (no JSON_ALLOW_NUL), integers beyond int64 and
     * reals beyond double, and nests at most 2048 deep itself, so deep input cannot exhaust
     * the stack. */
    json_t *v = json_loadb(body, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
    if (!v) {
        cqrs_error_set(err, CQRS_ERR_INVALID, "malformed JSON at line %d, column %d: %s", jerr.line,
                       jerr.column, jerr.text);
        return NULL;
    }
    if (!json_is_object(v)) {
        json_decref(v);
        cqrs_error_set(err, CQRS_ERR_INVALID, "the request body must be a JSON object");
        return NULL;
    }
    if (cqrs_json_depth(v) > max_depth) {
        json_decref(v);
        cqrs_error_set(err, CQRS_ERR_INVALID, "JSON nesting deeper than %d", max_depth);
        return NULL;
    }
    return v;
}

void cqrs_violations_init(cqrs_violations_t *v)
{
    v->errors = json_array();
    v->status = 0;
    v->prefix[0] = '\0';
}

void cqrs_violations_close(cqrs_violations_t *v)
{
    json_decref(v->errors);
    v->errors = NULL;
}

void cqrs_violation_add(cqrs_violations_t *v, int status, const char *field, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    char name[192];
    snprintf(name, sizeof name, "%s%s", v->prefix, field);
    json_array_append_new(v->errors, json_pack("{s:s, s:s}", "field", name, "message", msg));
    /* A syntax-level problem (400) outranks a semantic one (422). */
    if (v->status == 0 || status == 400)
        v->status = status;
}

static const json_t *member(cqrs_violations_t *v, const json_t *obj, const char *field,
                            bool required)
{
    const json_t *m = json_object_get(obj, field);
    if (!m) {
        if (required)
            cqrs_violation_add(v, 400, field, "is required");
        return NULL;
    }
    if (json_is_null(m)) {
        cqrs_violation_add(v, 422, field, "must not be null");
        return NULL;
    }
    return m;
}

const char *cqrs_v_string(cqrs_violations_t *v, const json_t *obj, const char *field, bool required,
                          size_t min_chars, size_t max_chars)
{
    const json_t *m = member(v, obj, field, required);
    if (!m)
        return NULL;
    if (!json_is_string(m)) {
        cqrs_violation_add(v, 400, field, "must be a string");
        return NULL;
    }
    size_t n = cqrs_utf8_length(json_string_value(m), json_string_length(m));
    if (n < min_chars || n > max_chars) {
        if (min_chars == max_chars)
            cqrs_violation_add(v, 422, field, "must be exactly %zu characters", min_chars);
        else
            cqrs_violation_add(v, 422, field, "must be %zu to %zu characters long", min_chars,
                               max_chars);
        return NULL;
    }
    return json_string_value(m);
}

bool cqrs_v_int(cqrs_violations_t *v, const json_t *obj, const char *field, bool required,
                int64_t min, int64_t max, int64_t *out)
{
    const json_t *m = member(v, obj, field, required);
    if (!m)
        return false;
    if (!json_is_integer(m)) {
        cqrs_violation_add(v, 400, field, "must be an integer");
        return false;
    }
    json_int_t i = json_integer_value(m);
    if (i < min || i > max) {
        cqrs_violation_add(v, 422, field, "must be between %lld and %lld", (long long)min,
                           (long long)max);
        return false;
    }
    *out = i;
    return true;
}

static bool in_list(const char *const *list, const char *key)
{
    for (; list && *list; list++)
        if (strcmp(*list, key) == 0)
            return true;
    return false;
}

void cqrs_v_only(cqrs_violations_t *v, const json_t *obj, const char *const *allowed,
                 const char *const *server_owned)
{
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)obj, key, val)
    {
        if (in_list(allowed, key))
            continue;
        if (in_list(server_owned, key))
            cqrs_violation_add(v, 422, key, "is set by the server and cannot be given");
        else
            cqrs_violation_add(v, 422, key, "is not a known field");
    }
}
