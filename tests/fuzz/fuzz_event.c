/* libFuzzer: Kafka messages as the projector sees them — header lines "name=value", a blank
 * line, then the value — through CloudEvents decoding, the product and order projections
 * (pure) and the index computation, applied twice to reach the "existing document" paths. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "query.h"

typedef struct hdrs {
    char *name[16];
    char *value[16];
    int n;
} hdrs_t;

static const char *lookup(const char *name, void *ud)
{
    hdrs_t *h = ud;
    for (int i = h->n - 1; i >= 0; i--)
        if (strcmp(h->name[i], name) == 0)
            return h->value[i];
    return NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    hdrs_t h = {.n = 0};
    char *p = text, *value = NULL;
    size_t value_len = 0;
    while (p && *p) {
        char *nl = strchr(p, '\n');
        if (nl)
            *nl = '\0';
        if (*p == '\0') { /* blank line: the value follows */
            value = nl ? nl + 1 : NULL;
            value_len = value ? size - (size_t)(value - text) : 0;
            break;
        }
        char *eq = strchr(p, '=');
        if (eq && h.n < 16) {
            *eq = '\0';
            h.name[h.n] = p;
            h.value[h.n] = eq + 1;
            h.n++;
        }
        p = nl ? nl + 1 : NULL;
    }
    cqrs_event_t ev;
    cqrs_error_t err;
    if (cqrs_event_decode(lookup, &h, value, value_len, &ev, &err) == CQRS_ERR_OK) {
        char shard[CQRS_SHARD_MAX], key[CQRS_KEY_MAX];
        cqrs_keys_shard("cqrs", "fuzz", 0, shard, sizeof shard);
        cqrs_keys_doc(shard, ev.aggregate_id, key, sizeof key);
        json_t *doc = NULL, *next = NULL;
        for (int round = 0; round < 2; round++) {
            /* as every reader does: upcast, then apply */
            if (cqrs_projection_apply(&query_projection, doc, &ev, &next, &err) == CQRS_ERR_OK) {
                cqrs_index_ops_t ops = {0};
                query_index(shard, ev.aggregate_type, key, doc, next, &ops);
                cqrs_index_ops_free(&ops);
                json_decref(doc);
                doc = next;
                next = NULL;
            }
        }
        json_decref(doc);
    }
    cqrs_event_close(&ev);
    free(text);
    return 0;
}
