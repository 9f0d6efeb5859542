/* upcast.h — versioned event types and upcasters.
 *
 * An event type is "<name>.v<N>" (product.created.v2). The log is kept forever and replayed,
 * and Kafka keeps what its retention keeps, so every version ever written is read again; a
 * projection is written against the newest version of each type only, and what is older is
 * brought up to it first by upcasters: pure functions from version N's data to N+1's, run in
 * turn (v1 → v2 → v3). Writers write the newest version only.
 *
 * A registry lists the types a reader knows, each with its newest version and its upcasters.
 * cqrs_event_upcast brings an event to the newest version (renaming its type, replacing its
 * data); a type it does not know, or a version newer than it knows — an old reader meeting what
 * a newer writer sent, in a rolling deployment — is INVALID with a reason that says so, which
 * the projector turns into a dead letter holding its aggregate: never a crash, never a skip.
 * Once the reader is upgraded, `cqrsctl dlq retry` applies what was parked. Pure code.
 *
 * Test switch (failpoint builds only): CQRS_TEST_UNKNOWN_EVENT_TYPES="t1,t2" makes the
 * registry pretend not to know those exact types (e.g. product.created.v2): the rolling
 * deployment's old reader, played by one build.
 */
#ifndef CQRS_UPCAST_H
#define CQRS_UPCAST_H

#include <stdbool.h>
#include <stddef.h>

#include "cqrs/err.h"
#include "cqrs/event.h"

/* Version N's data → version N+1's, in place (data is the event's object; ev is read only for
 * context: its id, time, aggregate). INVALID with a reason when the data cannot be carried
 * over. */
typedef cqrs_err_t (*cqrs_upcast_fn)(json_t *data, const cqrs_event_t *ev, cqrs_error_t *err);

typedef struct cqrs_event_kind {
    const char *name;         /* the type without its version: "product.created" */
    int newest;               /* the version projections are written against (>= 1) */
    const cqrs_upcast_fn *up; /* newest - 1 functions: up[i] takes v(i+1) to v(i+2) */
} cqrs_event_kind_t;

typedef struct cqrs_event_registry {
    const cqrs_event_kind_t *kinds;
    size_t n;
} cqrs_event_registry_t;

/* Splits "<name>.v<N>" into name (NUL-terminated, cap bytes) and N >= 1. false when type is not
 * of that form or name does not fit. */
bool cqrs_event_type_parse(const char *type, char *name, size_t cap, int *version);

/* The kind of name in reg, NULL when none. */
const cqrs_event_kind_t *cqrs_event_kind(const cqrs_event_registry_t *reg, const char *name);

/* Brings ev to the newest version reg knows of its type: its upcasters in turn, then ev->type
 * renamed. OK also when ev is already at the newest version; on failure ev is unchanged.
 * INVALID (where = "ce_type") when the type is not "<name>.v<N>", unknown to reg, or newer than
 * the newest version reg knows; INVALID from an upcaster as it says. */
cqrs_err_t cqrs_event_upcast(const cqrs_event_registry_t *reg, cqrs_event_t *ev, cqrs_error_t *err);

#endif
