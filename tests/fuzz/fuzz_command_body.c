/* libFuzzer: request bodies through the strict JSON parser and every command's validation
 * (services/command), as the daemon runs them before touching PostgreSQL. Nothing may crash,
 * leak or read out of bounds; a valid body must yield its input (sku etc. borrowed from it). */
#include <stdint.h>
#include <stdlib.h>

#include "command.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cqrs_error_t err;
    json_t *body = cqrs_json_parse_object((const char *)data, size, 32, &err);
    if (!body)
        return 0;
    domain_limits_t l;
    domain_limits_default(&l);
    cqrs_violations_t v;

    create_product_input_t c;
    cqrs_violations_init(&v);
    if (product_validate_create(body, &l, &c, &v))
        json_decref(product_created_data("6f9619ff-8b86-4011-b42d-00c04fc964ff", &c));
    cqrs_violations_close(&v);

    update_details_input_t u;
    cqrs_violations_init(&v);
    product_validate_update_details(body, &l, &u, &v);
    cqrs_violations_close(&v);

    int64_t price;
    cqrs_violations_init(&v);
    product_validate_change_price(body, &l, &price, &v);
    cqrs_violations_close(&v);

    adjust_stock_input_t a;
    cqrs_violations_init(&v);
    product_validate_adjust_stock(body, &l, &a, &v);
    cqrs_violations_close(&v);

    place_order_input_t *o = malloc(sizeof *o);
    cqrs_violations_init(&v);
    if (o && order_validate_place(body, &l, o, &v))
        for (size_t i = 1; i < o->n; i++)
            if (o->lines[i - 1].quantity < 1) /* validated lines are in range */
                abort();
    cqrs_violations_close(&v);
    free(o);

    cqrs_violations_init(&v);
    validate_empty(body, &v);
    cqrs_violations_close(&v);
    json_decref(body);
    return 0;
}
