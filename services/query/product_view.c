/* product_view.c — documents built from events (pure), and their projection into Redis.
 *
 * Product: {id, sku, name, description, category, price_cents, currency, weight_grams, stock,
 * status, units_sold, version, created_at, updated_at} (weight_grams: null when unknown, as for
 * every product created before product.created.v2). Order: {id, customer_id, status, items,
 * total_cents, currency, version, placed_at, cancelled_at}. Timestamps come from the events,
 * so replaying the same events always yields the same documents.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cqrs/util.h>

#include "query.h"

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

static cqrs_err_t incomplete(const cqrs_event_t *ev, cqrs_error_t *err)
{
    return cqrs_error_set(err, CQRS_ERR_INVALID, "%s data is incomplete", ev->type);
}

/* product.created.v2 (v1 arrives upcast: query_events below). */
static cqrs_err_t product_created(const json_t *doc, const cqrs_event_t *ev, json_t **out,
                                  cqrs_error_t *err)
{
    const char *sku, *name, *description, *category, *currency;
    json_int_t price, stock;
    const json_t *weight = json_object_get(ev->data, "weight_grams");
    if (doc || ev->version != 1)
        return cqrs_error_set(err, CQRS_ERR_INVALID, "product created twice or not at version 1");
    if (!data_string(ev->data, "sku", &sku) || !data_string(ev->data, "name", &name) ||
        !data_string(ev->data, "description", &description) ||
        !data_string(ev->data, "category", &category) ||
        !data_string(ev->data, "currency", &currency) ||
        !data_int(ev->data, "price_cents", &price) ||
        !data_int(ev->data, "initial_stock", &stock) ||
        !(json_is_null(weight) || (json_is_integer(weight) && json_integer_value(weight) >= 0)))
        return incomplete(ev, err);
    *out =
        json_pack("{s:s, s:s, s:s, s:s, s:s, s:I, s:s, s:O, s:I, s:s, s:i, s:I, s:s, s:s}", "id",
                  ev->aggregate_id, "sku", sku, "name", name, "description", description,
                  "category", category, "price_cents", price, "currency", currency, "weight_grams",
                  weight, "stock", stock, "status", "active", "units_sold", 0, "version",
                  (json_int_t)ev->version, "created_at", ev->time, "updated_at", ev->time);
    return *out ? CQRS_ERR_OK : cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
}

/* Every later product event: copy, change, bump version and updated_at. */
/* Changes d (a product document) by ev; d is left as it was when the event is rejected (every
 * check comes before the first change). Members are only ever replaced
 * (json_object_set_new), never changed in place, so a shallow copy of a document shares its
 * unchanged values safely. */
static cqrs_err_t product_change(json_t *d, const cqrs_event_t *ev, cqrs_error_t *err)
{
    const char *t = ev->type;
    const char *s1, *s2, *s3;
    json_int_t i1, i2;
    if (strcmp(t, "product.details-updated.v1") == 0) {
        if (!data_string(ev->data, "name", &s1) || !data_string(ev->data, "description", &s2) ||
            !data_string(ev->data, "category", &s3))
            goto bad;
        json_object_set_new(d, "name", json_string(s1));
        json_object_set_new(d, "description", json_string(s2));
        json_object_set_new(d, "category", json_string(s3));
    } else if (strcmp(t, "product.price-changed.v1") == 0) {
        if (!data_int(ev->data, "price_cents", &i1))
            goto bad;
        json_object_set_new(d, "price_cents", json_integer(i1));
    } else if (strcmp(t, "product.stock-adjusted.v1") == 0) {
        if (!data_int(ev->data, "stock", &i1))
            goto bad;
        json_object_set_new(d, "stock", json_integer(i1));
    } else if (strcmp(t, "product.discontinued.v1") == 0) {
        json_object_set_new(d, "status", json_string("discontinued"));
    } else if (strcmp(t, "product.stock-reserved.v1") == 0 ||
               strcmp(t, "product.stock-released.v1") == 0) {
        if (!data_int(ev->data, "stock", &i1) || !data_int(ev->data, "quantity", &i2))
            goto bad;
        int64_t sold = json_integer_value(json_object_get(d, "units_sold"));
        bool fits = strcmp(t, "product.stock-reserved.v1") == 0
                        ? cqrs_checked_add_i64(sold, i2, &sold)
                        : cqrs_checked_sub_i64(sold, i2, &sold);
        if (!fits) /* no valid history gets here: the command side checks the same sum */
            return cqrs_error_set(err, CQRS_ERR_INVALID, "%s: units_sold out of int64 range",
                                  ev->type);
        json_object_set_new(d, "stock", json_integer(i1));
        json_object_set_new(d, "units_sold", json_integer(sold));
    } else {
        return cqrs_error_set(err, CQRS_ERR_INVALID, "unknown product event type %s", t);
    }
    json_object_set_new(d, "version", json_integer((json_int_t)ev->version));
    json_object_set_new(d, "updated_at", json_string(ev->time));
    /* A document projected before product.created.v2 has no weight: unknown, as v1 says. */
    if (!json_object_get(d, "weight_grams"))
        json_object_set_new(d, "weight_grams", json_null());
    return CQRS_ERR_OK;
bad:
    return incomplete(ev, err);
}

static cqrs_err_t product_changed(const json_t *doc, const cqrs_event_t *ev, json_t **out,
                                  cqrs_error_t *err)
{
    if (!doc)
        return cqrs_error_set(err, CQRS_ERR_INVALID, "%s for a product that does not exist",
                              ev->type);
    json_t *d = json_copy((json_t *)doc); /* shallow: see product_change */
    cqrs_err_t rc = product_change(d, ev, err);
    if (rc != CQRS_ERR_OK) {
        json_decref(d);
        return rc;
    }
    *out = d;
    return CQRS_ERR_OK;
}

cqrs_err_t product_view_apply(const json_t *doc, const cqrs_event_t *ev, json_t **out,
                              cqrs_error_t *err)
{
    *out = NULL;
    if (strcmp(ev->type, "product.created.v2") == 0)
        return product_created(doc, ev, out, err);
    return product_changed(doc, ev, out, err);
}

cqrs_err_t order_view_apply(const json_t *doc, const cqrs_event_t *ev, json_t **out,
                            cqrs_error_t *err)
{
    *out = NULL;
    if (strcmp(ev->type, "order.placed.v1") == 0) {
        const char *customer, *currency;
        json_int_t total;
        const json_t *items = json_object_get(ev->data, "items");
        if (doc || ev->version != 1)
            return cqrs_error_set(err, CQRS_ERR_INVALID, "order placed twice or not at version 1");
        if (!data_string(ev->data, "customer_id", &customer) ||
            !data_string(ev->data, "currency", &currency) ||
            !data_int(ev->data, "total_cents", &total) || !json_is_array(items))
            return incomplete(ev, err);
        *out = json_pack("{s:s, s:s, s:s, s:O, s:I, s:s, s:I, s:s, s:n}", "id", ev->aggregate_id,
                         "customer_id", customer, "status", "placed", "items", items, "total_cents",
                         total, "currency", currency, "version", (json_int_t)ev->version,
                         "placed_at", ev->time, "cancelled_at");
        return *out ? CQRS_ERR_OK : cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    }
    if (strcmp(ev->type, "order.cancelled.v1") == 0) {
        if (!doc)
            return cqrs_error_set(err, CQRS_ERR_INVALID, "cancel of an order that does not exist");
        json_t *d = json_copy((json_t *)doc); /* shallow: see product_changed */
        json_object_set_new(d, "status", json_string("cancelled"));
        json_object_set_new(d, "cancelled_at", json_string(ev->time));
        json_object_set_new(d, "version", json_integer((json_int_t)ev->version));
        *out = d;
        return CQRS_ERR_OK;
    }
    return cqrs_error_set(err, CQRS_ERR_INVALID, "unknown order event type %s", ev->type);
}

static bool query_knows(const cqrs_event_t *ev)
{
    return strcmp(ev->aggregate_type, "product") == 0 || strcmp(ev->aggregate_type, "order") == 0;
}

static cqrs_err_t query_apply(const json_t *doc, const cqrs_event_t *ev, json_t **next,
                              cqrs_error_t *err)
{
    if (strcmp(ev->aggregate_type, "product") == 0)
        return product_view_apply(doc, ev, next, err);
    return order_view_apply(doc, ev, next, err);
}

static cqrs_err_t query_apply_owned(json_t *doc, const cqrs_event_t *ev, json_t **next,
                                    cqrs_error_t *err)
{
    *next = NULL;
    if (doc && strcmp(ev->aggregate_type, "product") == 0 &&
        strcmp(ev->type, "product.created.v2") != 0) {
        cqrs_err_t rc = product_change(doc, ev, err);
        if (rc == CQRS_ERR_OK)
            *next = doc;
        return rc;
    }
    /* creations and orders (short histories): the copying version */
    cqrs_err_t rc = query_apply(doc, ev, next, err);
    if (rc == CQRS_ERR_OK)
        json_decref(doc);
    return rc;
}

/* product.created v1 → v2: weight_grams came with v2; what a v1 event created weighs is
 * unknown (null). */
static cqrs_err_t product_created_v1_v2(json_t *data, const cqrs_event_t *ev, cqrs_error_t *err)
{
    (void)ev;
    if (json_object_set_new(data, "weight_grams", json_null()) != 0)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    return CQRS_ERR_OK;
}

static const cqrs_upcast_fn product_created_up[] = {product_created_v1_v2};

/* Every event type the read model knows, at the version its projections are written against
 * (schemas/events/<type>.v<N>.json), with the upcasters that bring older versions to it. */
static const cqrs_event_kind_t query_kinds[] = {
    {"product.created", 2, product_created_up},
    {"product.details-updated", 1, NULL},
    {"product.price-changed", 1, NULL},
    {"product.stock-adjusted", 1, NULL},
    {"product.stock-reserved", 1, NULL},
    {"product.stock-released", 1, NULL},
    {"product.discontinued", 1, NULL},
    {"order.placed", 1, NULL},
    {"order.cancelled", 1, NULL},
};
const cqrs_event_registry_t query_events = {query_kinds, sizeof query_kinds / sizeof *query_kinds};

const cqrs_projection_t query_projection = {query_knows, query_apply, query_index,
                                            query_apply_owned, &query_events};
