/* Unit tests of the command decisions (services/command/decide.c), data-driven: every rule of the
 * command table, through the same validation and decision the daemon runs, without a database.
 *
 * tests/data/decisions/<command>/{valid,invalid}/<case>/:
 *   input       the request body (empty: none)
 *   state.json  the locked rows: {"product":{…}} | {"products":[…]} (sorted by id) |
 *               {"order":{…},"lines":[…]} | {"sku_taken":true}
 *   valid:      events.json, the events decided: [{type,aggregate_type,aggregate_id,version,data}]
 *   invalid:    status (400/409/422); problem (the problem type, when the decision answers);
 *               field (a validation error names it); extra.json (the problem's extra members)
 * A new aggregate gets NEW_ID, a new order ORDER_ID. */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "command.h"

#define NEW_ID "00000000-0000-4000-8000-0000000000bb"
#define ORDER_ID "00000000-0000-4000-8000-0000000000aa"

static char *slurp(const char *dir, const char *name, size_t *len)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = malloc(1 << 16);
    assert_non_null(buf);
    *len = fread(buf, 1, (1 << 16) - 1, f);
    buf[*len] = '\0';
    fclose(f);
    return buf;
}

static json_t *load_json(const char *dir, const char *name)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    json_error_t jerr;
    return json_load_file(path, 0, &jerr);
}

static const char *s_of(const json_t *o, const char *k)
{
    return json_string_value(json_object_get(o, k));
}

static int64_t i_of(const json_t *o, const char *k)
{
    return (int64_t)json_integer_value(json_object_get(o, k));
}

static void product_of(const json_t *j, product_state_t *p)
{
    *p = (product_state_t){s_of(j, "id"),          s_of(j, "sku"),         s_of(j, "name"),
                           s_of(j, "description"), s_of(j, "category"),    s_of(j, "currency"),
                           s_of(j, "status"),      i_of(j, "price_cents"), i_of(j, "stock"),
                           i_of(j, "units_sold"),  i_of(j, "version")};
}

/* The outcome of one case: 0 and the decision, or the validation's status and its errors. */
typedef struct outcome {
    int status;
    json_t *errors;
    decision_t d;
} outcome_t;

static void run_command(const char *command, const json_t *body, const json_t *state, outcome_t *o)
{
    domain_limits_t l;
    domain_limits_default(&l);
    cqrs_violations_t v;
    cqrs_violations_init(&v);
    product_state_t cur;
    product_of(json_object_get(state, "product"), &cur);
    bool valid = false, decided = false;
    if (strcmp(command, "create_product") == 0) {
        create_product_input_t in;
        valid = product_validate_create(body, &l, &in, &v);
        if (valid)
            decided = decide_create_product(
                NEW_ID, &in, json_is_true(json_object_get(state, "sku_taken")), &o->d);
    } else if (strcmp(command, "update_product_details") == 0) {
        update_details_input_t in;
        valid = product_validate_update_details(body, &l, &in, &v);
        if (valid)
            decided = decide_update_details(&cur, &in, &o->d);
    } else if (strcmp(command, "change_product_price") == 0) {
        int64_t price = 0;
        valid = product_validate_change_price(body, &l, &price, &v);
        if (valid)
            decided = decide_change_price(&cur, price, &o->d);
    } else if (strcmp(command, "adjust_stock") == 0) {
        adjust_stock_input_t in;
        valid = product_validate_adjust_stock(body, &l, &in, &v);
        if (valid)
            decided = decide_adjust_stock(&cur, &in, &l, &o->d);
    } else if (strcmp(command, "discontinue_product") == 0) {
        valid = validate_empty(body, &v);
        if (valid)
            decided = decide_discontinue(&cur, &o->d);
    } else if (strcmp(command, "place_order") == 0) {
        static place_order_input_t in;
        product_state_t products[8];
        const json_t *rows = json_object_get(state, "products");
        size_t n = json_array_size(rows);
        assert_true(n <= 8);
        for (size_t i = 0; i < n; i++)
            product_of(json_array_get(rows, i), &products[i]);
        valid = order_validate_place(body, &l, &in, &v);
        if (valid)
            decided = decide_place_order(ORDER_ID, &in, products, n, &o->d);
    } else if (strcmp(command, "cancel_order") == 0) {
        const json_t *oj = json_object_get(state, "order"), *lj = json_object_get(state, "lines");
        order_state_t order = {s_of(oj, "id"), s_of(oj, "status"), i_of(oj, "version")};
        order_line_state_t lines[8];
        size_t n = json_array_size(lj);
        assert_true(n <= 8);
        for (size_t i = 0; i < n; i++) {
            const json_t *x = json_array_get(lj, i);
            lines[i] = (order_line_state_t){s_of(x, "product_id"), i_of(x, "quantity"),
                                            i_of(x, "product_stock"), i_of(x, "product_version")};
        }
        valid = validate_empty(body, &v);
        if (valid)
            decided = decide_cancel_order(&order, lines, n, &l, &o->d);
    } else {
        fail_msg("no command %s", command);
    }
    if (valid)
        assert_true(decided); /* no allocation fails here */
    o->status = valid ? (int)o->d.status : v.status;
    o->errors = json_incref(v.errors);
    cqrs_violations_close(&v);
}

static json_t *events_json(const decision_t *d)
{
    json_t *a = json_array();
    for (size_t i = 0; i < d->n; i++) {
        const decided_event_t *e = &d->events[i];
        json_array_append_new(a, json_pack("{s:s, s:s, s:s, s:I, s:O}", "type", e->type,
                                           "aggregate_type", e->aggregate_type, "aggregate_id",
                                           e->aggregate_id, "version", (json_int_t)e->version,
                                           "data", e->data));
    }
    return a;
}

static void check_case(const char *command, const char *dir, const char *name, bool expect_valid)
{
    size_t len = 0;
    char *text = slurp(dir, "input", &len);
    json_t *body = NULL;
    if (text && len > 0) {
        cqrs_error_t err;
        body = cqrs_json_parse_object(text, len, 32, &err);
        if (!body)
            fail_msg("%s/%s: the input does not parse", command, name);
    } else {
        body = json_object(); /* no body: the command pipeline hands over {} */
    }
    json_t *state = load_json(dir, "state.json");
    if (!state)
        state = json_object();
    outcome_t o = {0};
    run_command(command, body, state, &o);
    if (expect_valid) {
        if (o.status != 0)
            fail_msg("%s/%s: expected events, got %d %s", command, name, o.status,
                     o.d.slug ? o.d.slug : "(validation)");
        json_t *want = load_json(dir, "events.json"), *got = events_json(&o.d);
        assert_non_null(want);
        if (!json_equal(want, got)) {
            char *g = json_dumps(got, JSON_INDENT(1));
            fail_msg("%s/%s: other events decided:\n%s", command, name, g);
        }
        json_decref(want);
        json_decref(got);
    } else {
        char *status = slurp(dir, "status", &len);
        assert_non_null(status);
        if (o.status != atoi(status))
            fail_msg("%s/%s: expected %d, got %d", command, name, atoi(status), o.status);
        free(status);
        /* all or nothing: a problem carries no event */
        assert_int_equal(o.d.n, 0);
        char *problem = slurp(dir, "problem", &len);
        if (problem) {
            problem[strcspn(problem, "\n")] = '\0';
            if (!o.d.slug || strcmp(o.d.slug, problem) != 0)
                fail_msg("%s/%s: expected problem %s, got %s", command, name, problem,
                         o.d.slug ? o.d.slug : "a validation error");
            assert_true(o.d.detail[0] != '\0');
            free(problem);
        }
        json_t *extra = load_json(dir, "extra.json");
        if (extra && !json_equal(extra, o.d.extra))
            fail_msg("%s/%s: other problem members", command, name);
        json_decref(extra);
        char *field = slurp(dir, "field", &len);
        if (field) {
            field[strcspn(field, "\n")] = '\0';
            bool named = false;
            size_t i;
            json_t *it;
            json_array_foreach(o.errors, i, it)
            {
                const char *f = json_string_value(json_object_get(it, "field"));
                named |= f && strcmp(f, field) == 0;
            }
            if (!named)
                fail_msg("%s/%s: no error names field '%s'", command, name, field);
            free(field);
        }
    }
    decision_close(&o.d);
    json_decref(o.errors);
    json_decref(state);
    json_decref(body);
    free(text);
}

static int run_dir(const char *command, const char *kind)
{
    char dir[512];
    snprintf(dir, sizeof dir, "%s/decisions/%s/%s", CQRS_TEST_DATA, command, kind);
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    int cases = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char cdir[1024];
        snprintf(cdir, sizeof cdir, "%s/%s", dir, e->d_name);
        check_case(command, cdir, e->d_name, strcmp(kind, "valid") == 0);
        cases++;
    }
    closedir(d);
    return cases;
}

/* Each command has cases that pass and cases that are refused. */
static void run_command_cases(void **state)
{
    const char *command = *state;
    int valid = run_dir(command, "valid"), invalid = run_dir(command, "invalid");
    print_message("%s: %d valid, %d invalid cases\n", command, valid, invalid);
    assert_true(valid > 0);
    assert_true(invalid > 0);
}

/* The money of an order is checked: the largest line totals that fit, and one cent more. */
static void test_order_price_checked(void **state)
{
    (void)state;
    place_order_input_t *in = calloc(1, sizeof *in);
    assert_non_null(in);
    in->n = 2;
    in->lines[0].quantity = 1;
    in->lines[1].quantity = 1;
    int64_t prices[2] = {INT64_MAX - 1, 1}, totals[2], total = -1;
    assert_true(order_price(in, prices, totals, &total));
    assert_true(total == INT64_MAX);
    prices[1] = 2;
    total = -1;
    assert_false(order_price(in, prices, totals, &total));
    assert_true(total == -1); /* untouched */
    free(in);
}

int main(void)
{
    static const char *const commands[] = {"create_product",       "update_product_details",
                                           "change_product_price", "adjust_stock",
                                           "discontinue_product",  "place_order",
                                           "cancel_order"};
#define CASES(i)                                                                                   \
    {                                                                                              \
        commands[i], run_command_cases, NULL, NULL, (void *)commands[i]                            \
    }
    const struct CMUnitTest tests[] = {
        CASES(0), CASES(1), CASES(2), CASES(3),
        CASES(4), CASES(5), CASES(6), cmocka_unit_test(test_order_price_checked),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
