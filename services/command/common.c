/* common.c — helpers every command handler uses. */
#include <ctype.h>
#include <stdio.h>
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
        "{s:s, s:s, s:s, s:s, s:s, s:I, s:s, s:I, s:s, s:I, s:I, s:s, s:s}", "id",
        cqrs_rows_get(rows, r, PC_ID), "sku", cqrs_rows_get(rows, r, PC_SKU), "name",
        cqrs_rows_get(rows, r, PC_NAME), "description", cqrs_rows_get(rows, r, PC_DESCRIPTION),
        "category", cqrs_rows_get(rows, r, PC_CATEGORY), "price_cents",
        (json_int_t)rows_int(rows, r, PC_PRICE), "currency", cqrs_rows_get(rows, r, PC_CURRENCY),
        "stock", (json_int_t)rows_int(rows, r, PC_STOCK), "status",
        cqrs_rows_get(rows, r, PC_STATUS), "units_sold",
        (json_int_t)rows_int(rows, r, PC_UNITS_SOLD), "version",
        (json_int_t)rows_int(rows, r, PC_VERSION), "created_at",
        cqrs_rows_get(rows, r, PC_CREATED_AT), "updated_at", cqrs_rows_get(rows, r, PC_UPDATED_AT));
}
