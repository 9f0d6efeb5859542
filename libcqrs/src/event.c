/* event.c — event envelope and its CloudEvents Kafka headers (pure). */
#include "cqrs/event.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void cqrs_event_init(cqrs_event_t *ev, const char *type, const char *aggregate_type,
                     const char *aggregate_id, int64_t version, json_t *data,
                     const char *traceparent)
{
    memset(ev, 0, sizeof *ev);
    cqrs_uuid_v4(ev->id);
    cqrs_time_now_rfc3339(ev->time);
    snprintf(ev->type, sizeof ev->type, "%s", type);
    snprintf(ev->aggregate_type, sizeof ev->aggregate_type, "%s", aggregate_type);
    snprintf(ev->aggregate_id, sizeof ev->aggregate_id, "%s", aggregate_id);
    snprintf(ev->traceparent, sizeof ev->traceparent, "%s", traceparent ? traceparent : "");
    ev->version = version;
    ev->data = data;
}

void cqrs_event_close(cqrs_event_t *ev)
{
    if (!ev)
        return;
    json_decref(ev->data);
    ev->data = NULL;
}

static void add(cqrs_event_headers_t *h, const char *name, const char *value)
{
    if (h->n >= CQRS_EVENT_HEADERS)
        abort(); /* a programming error: CQRS_EVENT_HEADERS is too small */
    h->name[h->n] = name;
    h->value[h->n] = value;
    h->n++;
}

void cqrs_event_headers(const cqrs_event_t *ev, cqrs_event_headers_t *h)
{
    h->n = 0;
    snprintf(h->version_buf, sizeof h->version_buf, "%lld", (long long)ev->version);
    /* The CloudEvents Sequence extension's values compare as strings: zero-padded to a fixed
     * width, "00000000000000000010" sorts after "00000000000000000002". Readers parse it as a
     * decimal number, so the unpadded values of older messages read the same. */
    snprintf(h->sequence_buf, sizeof h->sequence_buf, "%0*lld", CQRS_EVENT_SEQUENCE_DIGITS,
             (long long)ev->sequence);
    add(h, "ce_specversion", "1.0");
    add(h, "ce_id", ev->id);
    add(h, "ce_type", ev->type);
    add(h, "ce_source", ev->source);
    add(h, "ce_subject", ev->aggregate_id);
    add(h, "ce_time", ev->time);
    add(h, "content-type", "application/json");
    add(h, "ce_aggregatetype", ev->aggregate_type);
    add(h, "ce_aggregateversion", h->version_buf);
    add(h, "ce_sequence", h->sequence_buf);
    /* The JSON Schema of the data, by its $id (schemas/events/<ce_type>.json). */
    snprintf(h->dataschema_buf, sizeof h->dataschema_buf, "%s%s", CQRS_EVENT_SCHEMA_PREFIX,
             ev->type);
    add(h, "ce_dataschema", h->dataschema_buf);
    if (ev->traceparent[0])
        add(h, "ce_traceparent", ev->traceparent);
}

static cqrs_err_t copy_header(cqrs_header_lookup_fn lookup, void *ud, const char *name, char *dst,
                              size_t cap, bool required, cqrs_error_t *err)
{
    const char *v = lookup(name, ud);
    if (!v) {
        if (!required) {
            dst[0] = '\0';
            return CQRS_ERR_OK;
        }
        return cqrs_error_set_where(err, CQRS_ERR_INVALID, name, "header %s is missing", name);
    }
    if (strlen(v) >= cap || (required && !*v))
        return cqrs_error_set_where(err, CQRS_ERR_INVALID, name, "header %s is empty or too long",
                                    name);
    memcpy(dst, v, strlen(v) + 1);
    return CQRS_ERR_OK;
}

static bool parse_positive(const char *s, int64_t *out)
{
    return s && cqrs_parse_int64(s, out) && *out >= 1;
}

cqrs_err_t cqrs_event_decode(cqrs_header_lookup_fn lookup, void *ud, const char *value, size_t len,
                             cqrs_event_t *ev, cqrs_error_t *err)
{
    memset(ev, 0, sizeof *ev);
    const char *spec = lookup("ce_specversion", ud);
    if (!spec || strcmp(spec, "1.0") != 0)
        return cqrs_error_set_where(err, CQRS_ERR_INVALID, "ce_specversion",
                                    "not a CloudEvents 1.0 message");
    cqrs_err_t rc;
    if ((rc = copy_header(lookup, ud, "ce_id", ev->id, sizeof ev->id, true, err)) ||
        (rc = copy_header(lookup, ud, "ce_type", ev->type, sizeof ev->type, true, err)) ||
        (rc = copy_header(lookup, ud, "ce_source", ev->source, sizeof ev->source, true, err)) ||
        (rc = copy_header(lookup, ud, "ce_subject", ev->aggregate_id, sizeof ev->aggregate_id, true,
                          err)) ||
        (rc = copy_header(lookup, ud, "ce_time", ev->time, sizeof ev->time, true, err)) ||
        (rc = copy_header(lookup, ud, "ce_aggregatetype", ev->aggregate_type,
                          sizeof ev->aggregate_type, true, err)) ||
        (rc = copy_header(lookup, ud, "ce_traceparent", ev->traceparent, sizeof ev->traceparent,
                          false, err)))
        return rc;
    if (!cqrs_uuid_valid(ev->id) || !cqrs_uuid_valid(ev->aggregate_id))
        return cqrs_error_set(err, CQRS_ERR_INVALID, "ce_id and ce_subject must be UUIDs");
    if (!parse_positive(lookup("ce_aggregateversion", ud), &ev->version))
        return cqrs_error_set_where(err, CQRS_ERR_INVALID, "ce_aggregateversion",
                                    "ce_aggregateversion must be a positive integer");
    if (!parse_positive(lookup("ce_sequence", ud), &ev->sequence))
        return cqrs_error_set_where(err, CQRS_ERR_INVALID, "ce_sequence",
                                    "ce_sequence must be a positive integer");
    json_error_t jerr;
    ev->data = value ? json_loadb(value, len, JSON_REJECT_DUPLICATES, &jerr) : NULL;
    if (!json_is_object(ev->data)) {
        json_decref(ev->data);
        ev->data = NULL;
        return cqrs_error_set(err, CQRS_ERR_INVALID, "event data is not a JSON object");
    }
    return CQRS_ERR_OK;
}

json_t *cqrs_event_to_json(const cqrs_event_t *ev)
{
    return json_pack("{s:s, s:s, s:s, s:s, s:s, s:I, s:I, s:s, s:s, s:O}", "id", ev->id, "type",
                     ev->type, "source", ev->source, "aggregate_type", ev->aggregate_type,
                     "aggregate_id", ev->aggregate_id, "version", (json_int_t)ev->version,
                     "sequence", (json_int_t)ev->sequence, "time", ev->time, "traceparent",
                     ev->traceparent, "data", ev->data ? ev->data : json_null());
}

static cqrs_err_t copy_member(const json_t *obj, const char *name, char *dst, size_t cap,
                              bool required, cqrs_error_t *err)
{
    const char *v = json_string_value(json_object_get(obj, name));
    if (!v && !required) {
        dst[0] = '\0';
        return CQRS_ERR_OK;
    }
    if (!v || strlen(v) >= cap || (required && !*v))
        return cqrs_error_set_where(err, CQRS_ERR_INVALID, name, "%s is missing or too long", name);
    memcpy(dst, v, strlen(v) + 1);
    return CQRS_ERR_OK;
}

cqrs_err_t cqrs_event_from_json(const json_t *obj, cqrs_event_t *ev, cqrs_error_t *err)
{
    memset(ev, 0, sizeof *ev);
    if (!json_is_object(obj))
        return cqrs_error_set(err, CQRS_ERR_INVALID, "the event is not a JSON object");
    cqrs_err_t rc;
    if ((rc = copy_member(obj, "id", ev->id, sizeof ev->id, true, err)) ||
        (rc = copy_member(obj, "type", ev->type, sizeof ev->type, true, err)) ||
        (rc = copy_member(obj, "source", ev->source, sizeof ev->source, true, err)) ||
        (rc = copy_member(obj, "aggregate_type", ev->aggregate_type, sizeof ev->aggregate_type,
                          true, err)) ||
        (rc = copy_member(obj, "aggregate_id", ev->aggregate_id, sizeof ev->aggregate_id, true,
                          err)) ||
        (rc = copy_member(obj, "time", ev->time, sizeof ev->time, true, err)) ||
        (rc = copy_member(obj, "traceparent", ev->traceparent, sizeof ev->traceparent, false, err)))
        return rc;
    if (!cqrs_uuid_valid(ev->id) || !cqrs_uuid_valid(ev->aggregate_id))
        return cqrs_error_set(err, CQRS_ERR_INVALID, "id and aggregate_id must be UUIDs");
    const json_t *version = json_object_get(obj, "version");
    const json_t *sequence = json_object_get(obj, "sequence");
    if (!json_is_integer(version) || json_integer_value(version) < 1 ||
        !json_is_integer(sequence) || json_integer_value(sequence) < 1)
        return cqrs_error_set(err, CQRS_ERR_INVALID,
                              "version and sequence must be positive integers");
    ev->version = (int64_t)json_integer_value(version);
    ev->sequence = (int64_t)json_integer_value(sequence);
    json_t *data = json_object_get(obj, "data");
    if (!json_is_object(data))
        return cqrs_error_set(err, CQRS_ERR_INVALID, "event data is not a JSON object");
    ev->data = json_incref((json_t *)data);
    return CQRS_ERR_OK;
}
