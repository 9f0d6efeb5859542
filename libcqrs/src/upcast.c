/* upcast.c — see upcast.h. */
#include "cqrs/upcast.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

bool cqrs_event_type_parse(const char *type, char *name, size_t cap, int *version)
{
    const char *dot = type ? strrchr(type, '.') : NULL;
    if (!dot || dot == type || dot[1] != 'v' || dot[2] < '1' || dot[2] > '9')
        return false;
    char *end;
    long n = strtol(dot + 2, &end, 10);
    if (*end || n < 1 || n > 1000000)
        return false;
    size_t len = (size_t)(dot - type);
    if (len >= cap)
        return false;
    memcpy(name, type, len);
    name[len] = '\0';
    *version = (int)n;
    return true;
}

const cqrs_event_kind_t *cqrs_event_kind(const cqrs_event_registry_t *reg, const char *name)
{
    for (size_t i = 0; reg && i < reg->n; i++)
        if (strcmp(reg->kinds[i].name, name) == 0)
            return &reg->kinds[i];
    return NULL;
}

#ifdef CQRS_ENABLE_FAILPOINTS
/* CQRS_TEST_UNKNOWN_EVENT_TYPES (upcast.h): a comma-separated list of exact types. */
static bool pretend_unknown(const char *type)
{
    const char *list = getenv("CQRS_TEST_UNKNOWN_EVENT_TYPES");
    size_t len = strlen(type);
    for (const char *p = list; p && *p;) {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        if (n == len && strncmp(p, type, n) == 0)
            return true;
        p = comma ? comma + 1 : NULL;
    }
    return false;
}
#else
#define pretend_unknown(type) false
#endif

cqrs_err_t cqrs_event_upcast(const cqrs_event_registry_t *reg, cqrs_event_t *ev, cqrs_error_t *err)
{
    char name[sizeof ev->type];
    int version;
    if (!cqrs_event_type_parse(ev->type, name, sizeof name, &version))
        return cqrs_error_set_where(err, CQRS_ERR_INVALID, "ce_type",
                                    "event type %s is not of the form <name>.v<N>", ev->type);
    const cqrs_event_kind_t *k = cqrs_event_kind(reg, name);
    if (!k || pretend_unknown(ev->type))
        return cqrs_error_set_where(err, CQRS_ERR_INVALID, "ce_type",
                                    "event type %s is unknown to this build: upgrade the reader, "
                                    "then retry its dead letters (cqrsctl dlq retry)",
                                    ev->type);
    if (version > k->newest)
        return cqrs_error_set_where(err, CQRS_ERR_INVALID, "ce_type",
                                    "event type %s is newer than this build knows (%s.v%d): "
                                    "upgrade the reader, then retry its dead letters (cqrsctl dlq "
                                    "retry)",
                                    ev->type, name, k->newest);
    if (version == k->newest)
        return CQRS_ERR_OK;
    /* On a copy, so that a failing upcaster leaves ev as it was. */
    json_t *data = json_deep_copy(ev->data);
    if (!data)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    for (int v = version; v < k->newest; v++) {
        cqrs_err_t rc = k->up[v - 1](data, ev, err);
        if (rc != CQRS_ERR_OK) {
            json_decref(data);
            return rc;
        }
    }
    char type[sizeof ev->type];
    int n = snprintf(type, sizeof type, "%s.v%d", name, k->newest);
    if (n < 0 || (size_t)n >= sizeof type) {
        json_decref(data);
        return cqrs_error_set(err, CQRS_ERR_INVALID, "event type %s.v%d is too long", name,
                              k->newest);
    }
    json_decref(ev->data);
    ev->data = data;
    memcpy(ev->type, type, (size_t)n + 1);
    return CQRS_ERR_OK;
}
