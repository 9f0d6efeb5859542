/* common.c — helpers every command handler uses. */
#include <cqrs/outbox.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "command.h"

void domain_limits_default(domain_limits_t *l)
{
    l->sku_max = 64;
    l->name_max = 200;
    l->description_max = 4000;
    l->category_max = 64;
    l->reason_max = 200;
    l->price_max = 1000000000;
    l->stock_max = 1000000000;
    l->quantity_max = 1000;
    l->order_lines_max = 50;
}

void command_reply_violations(cqrs_http_request_t *req, cqrs_violations_t *v)
{
    json_t *errors = v->errors;
    v->errors = NULL;
    if (v->status == 400)
        cqrs_http_reply_problem(req, 400, "malformed-request", "Bad Request",
                                "the request body does not have the required shape", errors, NULL);
    else
        cqrs_http_reply_problem(req, 422, "validation-failed", "Unprocessable Content",
                                "one or more fields are invalid", errors, NULL);
}

bool command_path_id(cqrs_http_request_t *req, char out[CQRS_UUID_LEN + 1])
{
    const char *raw = cqrs_http_param(req, "id");
    if (!cqrs_uuid_valid(raw)) {
        cqrs_http_reply_problem(req, 400, "malformed-request", "Bad Request",
                                "the id in the path must be a UUID", NULL, NULL);
        return false;
    }
    for (size_t i = 0; i <= CQRS_UUID_LEN; i++)
        out[i] = (char)tolower((unsigned char)raw[i]);
    return true;
}

bool validate_empty(const json_t *body, cqrs_violations_t *v)
{
    static const char *const none[] = {NULL};
    cqrs_v_only(v, body, none, NULL);
    return v->status == 0;
}

int64_t rows_int(const cqrs_rows_t *rows, int r, int c)
{
    int64_t v = 0;
    const char *s = cqrs_rows_get(rows, r, c);
    if (s)
        cqrs_parse_int64(s, &v);
    return v;
}

json_t *product_row_json(const cqrs_rows_t *rows, int r)
{
    return json_pack(
        "{s:s, s:s, s:s, s:s, s:s, s:I, s:s, s:o, s:I, s:s, s:I, s:I, s:s, s:s}", "id",
        cqrs_rows_get(rows, r, PC_ID), "sku", cqrs_rows_get(rows, r, PC_SKU), "name",
        cqrs_rows_get(rows, r, PC_NAME), "description", cqrs_rows_get(rows, r, PC_DESCRIPTION),
        "category", cqrs_rows_get(rows, r, PC_CATEGORY), "price_cents",
        (json_int_t)rows_int(rows, r, PC_PRICE), "currency", cqrs_rows_get(rows, r, PC_CURRENCY),
        "weight_grams",
        cqrs_rows_get(rows, r, PC_WEIGHT) ? json_integer(rows_int(rows, r, PC_WEIGHT))
                                          : json_null(),
        "stock", (json_int_t)rows_int(rows, r, PC_STOCK), "status",
        cqrs_rows_get(rows, r, PC_STATUS), "units_sold",
        (json_int_t)rows_int(rows, r, PC_UNITS_SOLD), "version",
        (json_int_t)rows_int(rows, r, PC_VERSION), "created_at",
        cqrs_rows_get(rows, r, PC_CREATED_AT), "updated_at", cqrs_rows_get(rows, r, PC_UPDATED_AT));
}

void product_state_of(const cqrs_rows_t *rows, int r, product_state_t *out)
{
    *out = (product_state_t){
        .id = cqrs_rows_get(rows, r, PC_ID),
        .sku = cqrs_rows_get(rows, r, PC_SKU),
        .name = cqrs_rows_get(rows, r, PC_NAME),
        .description = cqrs_rows_get(rows, r, PC_DESCRIPTION),
        .category = cqrs_rows_get(rows, r, PC_CATEGORY),
        .currency = cqrs_rows_get(rows, r, PC_CURRENCY),
        .status = cqrs_rows_get(rows, r, PC_STATUS),
        .price_cents = rows_int(rows, r, PC_PRICE),
        .stock = rows_int(rows, r, PC_STOCK),
        .units_sold = rows_int(rows, r, PC_UNITS_SOLD),
        .version = rows_int(rows, r, PC_VERSION),
    };
}

void command_problem(cqrs_command_t *cmd, decision_t *d)
{
    json_t *extra = d->extra;
    d->extra = NULL;
    cqrs_command_problem(cmd, d->status, d->slug, d->title, d->detail, extra);
}

cqrs_err_t command_record(cqrs_tx_t *tx, cqrs_command_t *cmd, const command_ctx_t *ctx,
                          const decision_t *d, cqrs_error_t *err)
{
    cqrs_event_t *evs = calloc(d->n, sizeof *evs);
    const char **topics = calloc(d->n, sizeof *topics);
    cqrs_err_t rc = CQRS_ERR_OK;
    if (!evs || !topics) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < d->n; i++) {
        const decided_event_t *e = &d->events[i];
        cqrs_event_init(&evs[i], e->type, e->aggregate_type, e->aggregate_id, e->version,
                        json_incref(e->data), cqrs_http_traceparent(cmd->req));
        memcpy(evs[i].time, cmd->time, sizeof evs[i].time);
        topics[i] = strcmp(e->aggregate_type, "order") == 0 ? ctx->order_topic : ctx->product_topic;
    }
    rc = cqrs_outbox_append_many(tx, evs, d->n, topics, err);
out:
    for (size_t i = 0; evs && i < d->n; i++)
        cqrs_event_close(&evs[i]);
    free(evs);
    free(topics);
    return rc;
}
