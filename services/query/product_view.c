/* product_view.c — the Product document, built from product events (pure), and its
 * projection into Redis.
 *
 * Document: {id, sku, name, description, category, price_cents, currency, stock, status,
 * units_sold, version, created_at, updated_at}; timestamps come from the events, so replaying
 * the same events always yields the same document.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "query.h"

void product_doc_key(const char *id, char *out, size_t cap)
{
    snprintf(out, cap, "cqrs:product:{%s}", id);
}

static bool data_string(const json_t *data, const char *field, const char **out)
{
    const json_t *v = json_object_get(data, field);
    if (!json_is_string(v))
        return false;
    *out = json_string_value(v);
    return true;
}

static bool data_int(const json_t *data, const char *field, json_int_t *out)
{
    const json_t *v = json_object_get(data, field);
    if (!json_is_integer(v))
        return false;
    *out = json_integer_value(v);
    return true;
}

static cqrs_err_t apply_created(const json_t *doc, const cqrs_event_t *ev, json_t **out,
                                cqrs_error_t *err)
{
    const char *sku, *name, *description, *category, *currency;
    json_int_t price, stock;
    if (doc || ev->version != 1)
        return cqrs_error_set(err, CQRS_ERR_INVALID, "product created twice or not at version 1");
    if (!data_string(ev->data, "sku", &sku) || !data_string(ev->data, "name", &name) ||
        !data_string(ev->data, "description", &description) ||
        !data_string(ev->data, "category", &category) ||
        !data_string(ev->data, "currency", &currency) ||
        !data_int(ev->data, "price_cents", &price) || !data_int(ev->data, "initial_stock", &stock))
        return cqrs_error_set(err, CQRS_ERR_INVALID, "product.created.v1 data is incomplete");
    *out = json_pack("{s:s, s:s, s:s, s:s, s:s, s:I, s:s, s:I, s:s, s:i, s:I, s:s, s:s}", "id",
                     ev->aggregate_id, "sku", sku, "name", name, "description", description,
                     "category", category, "price_cents", price, "currency", currency, "stock",
                     stock, "status", "active", "units_sold", 0, "version", (json_int_t)ev->version,
                     "created_at", ev->time, "updated_at", ev->time);
    return *out ? CQRS_ERR_OK : cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
}

cqrs_err_t product_view_apply(const json_t *doc, const cqrs_event_t *ev, json_t **out,
                              cqrs_error_t *err)
{
    *out = NULL;
    if (strcmp(ev->type, "product.created.v1") == 0)
        return apply_created(doc, ev, out, err);
    return cqrs_error_set(err, CQRS_ERR_INVALID, "unknown product event type %s", ev->type);
}

cqrs_err_t query_project_event(void *ud, cqrs_docstore_t *ds, const cqrs_event_t *ev,
                               const cqrs_delivery_t *at, cqrs_error_t *err)
{
    (void)ud;
    if (strcmp(ev->aggregate_type, "product") != 0)
        return cqrs_error_set(err, CQRS_ERR_INVALID, "unknown aggregate type %s",
                              ev->aggregate_type);
    char key[96];
    product_doc_key(ev->aggregate_id, key, sizeof key);
    char *text = NULL;
    int64_t version = 0;
    cqrs_err_t rc = cqrs_docstore_get(ds, key, &text, &version, err);
    if (rc == CQRS_ERR_NOT_FOUND)
        version = 0;
    else if (rc != CQRS_ERR_OK)
        return rc;

    json_t *doc = NULL, *next = NULL;
    char *next_text = NULL;
    cqrs_apply_result_t result;
    if (ev->version <= version) {
        /* Already applied: only record the offset. */
        rc = cqrs_docstore_apply(ds, key, ev->version, "", at->offsets_key, at->partition,
                                 at->offset + 1, &result, err);
        goto out;
    }
    if (ev->version > version + 1) {
        rc = cqrs_error_set(err, CQRS_ERR_STATE,
                            "gap: document %s is at version %lld, event "
                            "has %lld",
                            ev->aggregate_id, (long long)version, (long long)ev->version);
        goto out;
    }
    if (text) {
        json_error_t jerr;
        doc = json_loads(text, 0, &jerr);
        if (!doc) {
            rc = cqrs_error_set(err, CQRS_ERR_INTERNAL, "stored document %s is not JSON", key);
            goto out;
        }
    }
    rc = product_view_apply(doc, ev, &next, err);
    if (rc != CQRS_ERR_OK)
        goto out;
    next_text = json_dumps(next, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!next_text) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    rc = cqrs_docstore_apply(ds, key, ev->version, next_text, at->offsets_key, at->partition,
                             at->offset + 1, &result, err);
    if (rc == CQRS_ERR_OK && result == CQRS_APPLY_GAP)
        rc = cqrs_error_set(err, CQRS_ERR_STATE, "gap at %s", key);
out:
    free(next_text);
    json_decref(next);
    json_decref(doc);
    free(text);
    return rc;
}
