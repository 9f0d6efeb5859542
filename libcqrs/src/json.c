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

/* What a client is told about JSON jansson could not load: jansson's own text only where it
 * speaks of JSON alone (a token, a duplicate member, a number); otherwise, or should a text ever
 * name one of jansson's flags (JSON_…), a sentence of ours. Library internals never reach a
 * problem. */
static const char *syntax_error_text(const json_error_t *jerr, int max_depth, char *buf, size_t cap)
{
    bool own_text = strstr(jerr->text, "JSON_") == NULL;
    switch (json_error_code(jerr)) {
    case json_error_invalid_syntax:
    case json_error_duplicate_key:
    case json_error_numeric_overflow:
        return own_text ? jerr->text : "invalid JSON";
    case json_error_invalid_utf8:
        return "the body is not valid UTF-8";
    case json_error_premature_end_of_input:
        return "the JSON text ends too early";
    case json_error_end_of_input_expected:
        return "more text follows the JSON value";
    case json_error_null_byte_in_key:
        return "a member name contains the NUL character (\\u0000)";
    case json_error_null_character:
        return "a string contains the NUL character (\\u0000)";
    case json_error_stack_overflow:
        snprintf(buf, cap, "JSON nesting deeper than %d", max_depth);
        return buf;
    default:
        return "invalid JSON";
    }
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
    /* jansson validates UTF-8, rejects integers beyond int64 and reals beyond double, and nests
     * at most 2048 deep itself, so deep input cannot exhaust the stack. A "\u0000" in a string
     * is valid JSON: it is loaded (JSON_ALLOW_NUL) and cqrs_v_string rejects it as the field's
     * fault, naming the field; only a member name with it is refused here. */
    json_t *v =
        json_loadb(body, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    if (!v) {
        char text[96];
        cqrs_error_set(err, CQRS_ERR_INVALID, "malformed JSON at line %d, column %d: %s", jerr.line,
                       jerr.column, syntax_error_text(&jerr, max_depth, text, sizeof text));
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
    /* Loaded with JSON_ALLOW_NUL: a "\u0000" stays in the value, and C strings (PostgreSQL
     * text, Redis documents) would cut it there. */
    if (memchr(json_string_value(m), '\0', json_string_length(m))) {
        cqrs_violation_add(v, 422, field, "must not contain the NUL character (\\u0000)");
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
    json_int_t i;
    if (json_is_integer(m)) {
        i = json_integer_value(m);
    } else if (json_is_real(m)) {
        /* JSON Schema counts 3.0 and 1e3 as integers: any integral number is one, however
         * written. Doubles beyond int64 are integral but out of range; the cast is defined
         * only inside the window. */
        double d = json_real_value(m);
        if (!(d >= -9223372036854775808.0 && d < 9223372036854775808.0)) {
            cqrs_violation_add(v, 422, field, "must be between %lld and %lld", (long long)min,
                               (long long)max);
            return false;
        }
        i = (json_int_t)d;
        if ((double)i != d) {
            cqrs_violation_add(v, 400, field, "must be an integer");
            return false;
        }
    } else {
        cqrs_violation_add(v, 400, field, "must be an integer");
        return false;
    }
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
