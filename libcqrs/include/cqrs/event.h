/* event.h — the event envelope and its CloudEvents 1.0 Kafka binding (binary mode).
 *
 * The Kafka value is the event's data as JSON; every attribute travels in a header:
 * ce_specversion, ce_id, ce_type (versioned: "<name>.v<N>", upcast.h), ce_source, ce_subject
 * (aggregate id), ce_time, content-type, ce_dataschema (the $id of the data's JSON Schema,
 * "urn:cqrs:event:<ce_type>": schemas/events/<ce_type>.json), and the extensions
 * ce_aggregatetype, ce_aggregateversion, ce_sequence, ce_traceparent. Pure code: no I/O.
 * Decoding does not need ce_dataschema (messages written before it have none).
 *
 * ce_sequence is the CloudEvents Sequence extension: the event log's global sequence, written
 * with leading zeros to CQRS_EVENT_SEQUENCE_DIGITS digits so that values sort as strings (as
 * the extension requires); it is read as a decimal number, so unpadded values (messages written
 * before the padding) are accepted too.
 */
#ifndef CQRS_EVENT_H
#define CQRS_EVENT_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "cqrs/err.h"
#include "cqrs/util.h"

typedef struct cqrs_event {
    char id[CQRS_UUID_LEN + 1];
    char type[96];           /* e.g. "product.created.v1" */
    char source[64];         /* e.g. "/cqrs-commandd" */
    char aggregate_type[32]; /* e.g. "product" */
    char aggregate_id[CQRS_UUID_LEN + 1];
    int64_t version;
    int64_t sequence; /* position in the event log; 0 until stored */
    char time[CQRS_TIME_LEN + 1];
    char traceparent[56];
    json_t *data; /* owned reference */
} cqrs_event_t;

/* Fills id, time and the given fields; takes ownership of data. */
void cqrs_event_init(cqrs_event_t *ev, const char *type, const char *aggregate_type,
                     const char *aggregate_id, int64_t version, json_t *data,
                     const char *traceparent);
void cqrs_event_close(cqrs_event_t *ev);

#define CQRS_EVENT_HEADERS 16
/* Width of ce_sequence: 20 digits hold any non-negative int64 (19) with one to spare. */
#define CQRS_EVENT_SEQUENCE_DIGITS 20
/* ce_dataschema = this prefix and the event's type: the $id of its data's JSON Schema. */
#define CQRS_EVENT_SCHEMA_PREFIX "urn:cqrs:event:"

typedef struct cqrs_event_headers {
    size_t n;
    const char *name[CQRS_EVENT_HEADERS];
    const char *value[CQRS_EVENT_HEADERS]; /* point into ev or into the buffers below */
    char version_buf[24];
    char sequence_buf[24];
    char dataschema_buf[128];
} cqrs_event_headers_t;

/* Header list of ev; values borrowed from ev and h, valid while both live. */
void cqrs_event_headers(const cqrs_event_t *ev, cqrs_event_headers_t *h);

/* Looks a header value up by name; returns a borrowed NUL-terminated string or NULL. */
typedef const char *(*cqrs_header_lookup_fn)(const char *name, void *ud);

/* Rebuilds an event from headers and value; everything is checked (spec version, UUIDs,
 * positive version, JSON object data). INVALID with a reason otherwise. */
cqrs_err_t cqrs_event_decode(cqrs_header_lookup_fn lookup, void *ud, const char *value, size_t len,
                             cqrs_event_t *ev, cqrs_error_t *err);

/* The event as one JSON object (all attributes and data), e.g. for a dead-letter store. New
 * reference. */
json_t *cqrs_event_to_json(const cqrs_event_t *ev);

/* The inverse of cqrs_event_to_json (other members, e.g. a dead letter's topic, are ignored),
 * checked like cqrs_event_decode; ev->data is a new reference (cqrs_event_close). INVALID
 * with a reason otherwise. */
cqrs_err_t cqrs_event_from_json(const json_t *obj, cqrs_event_t *ev, cqrs_error_t *err);

#endif
