/* verify.c — `cqrsctl verify`: the read model in Redis against the write model in PostgreSQL.
 *
 * Every product and order document is recomputed from the PostgreSQL rows (not copied from
 * Redis) and compared field by field with the stored one; every product must be in each of
 * its lists (product_list_entries: one per sort order and its status, and the name order's of
 * its category and status) under the member its current fields give, and every list must hold
 * exactly as many members as the products that belong to it (a difference is a stray or
 * missing entry); the top-products ranking likewise. Word sets and search records are not
 * checked (no bulk read of them here). Documents go in batches of 1,000, index checks in
 * pipelines, so 100,000 products take seconds.
 */
#include <cqrs/docstore.h>
#include <cqrs/store.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "query.h"
#include "verify.h"

#define TS(col) "to_char(" col " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"

static const char PRODUCTS_SQL[] =
    "SELECT id::text, json_build_object('id', id, 'sku', sku, 'name', name, 'description',"
    " description, 'category', category, 'price_cents', price_cents, 'currency', currency,"
    " 'weight_grams', weight_grams,"
    " 'stock', stock, 'status', status, 'units_sold', units_sold, 'version', version,"
    " 'created_at', " TS("created_at") ", 'updated_at', " TS(
        "updated_at") ")::text"
                      " FROM products ORDER BY id";

static const char ORDERS_SQL[] =
    "SELECT o.id::text, json_build_object('id', o.id, 'customer_id', o.customer_id, 'status',"
    " o.status, 'items', (SELECT json_agg(json_build_object('product_id', l.product_id, 'sku',"
    " l.sku, 'name', l.name, 'unit_price_cents', l.unit_price_cents, 'quantity', l.quantity,"
    " 'line_total_cents', l.line_total_cents) ORDER BY l.line_no) FROM order_lines l"
    " WHERE l.order_id = o.id), 'total_cents', o.total_cents, 'currency', o.currency,"
    " 'version', o.version, 'placed_at', " TS(
        "o.placed_at") ", 'cancelled_at',"
                       " CASE WHEN o.cancelled_at IS NULL THEN NULL ELSE " TS(
                           "o.cancelled_at") " END)::text"
                                             " FROM orders o ORDER BY o.id";

enum { MISSING, VERSION, FIELDS, INDEX_MISSING, INDEX_COUNT, KINDS };
static const char *const KIND_NAMES[KINDS] = {"missing document", "wrong version", "wrong fields",
                                              "missing index entry",
                                              "index size differs (stray or missing entries)"};

typedef struct drift {
    size_t count[KINDS];
    json_t *examples[KINDS]; /* first few ids (or keys) */
} drift_t;

static void note(drift_t *d, int kind, const char *what)
{
    if (d->count[kind]++ < 5)
        json_array_append_new(d->examples[kind], json_string(what));
}

typedef struct rows_ud {
    const char *sql;
    cqrs_rows_t *rows;
} rows_ud_t;

static cqrs_err_t select_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    rows_ud_t *r = ud;
    return cqrs_tx_exec(tx, r->sql, 0, NULL, &r->rows, err);
}

/* Compares one kind of document; for products also collects the index expectations. */
static cqrs_err_t compare_docs(cqrs_store_t *store, cqrs_docstore_t *ds, const char *type,
                               const char *sql, drift_t *d, json_t *expected_products,
                               size_t *checked, cqrs_error_t *err)
{
    rows_ud_t r = {sql, NULL};
    cqrs_err_t rc = cqrs_store_run_tx(store, select_tx, &r, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    int n = cqrs_rows_count(r.rows);
    enum { BATCH = 1000 };
    static char keys[BATCH][CQRS_KEY_MAX];
    const char *kp[BATCH];
    char *jsons[BATCH];
    for (int start = 0; rc == CQRS_ERR_OK && start < n; start += BATCH) {
        int m = n - start < BATCH ? n - start : BATCH;
        for (int i = 0; i < m; i++) {
            rc = query_doc_key(ds, type, cqrs_rows_get(r.rows, start + i, 0), keys[i],
                               sizeof keys[i], err);
            if (rc == CQRS_ERR_NOT_FOUND)
                keys[i][0] = '\0'; /* no layout: nothing projected, the document is missing */
            else if (rc != CQRS_ERR_OK)
                break;
            rc = CQRS_ERR_OK;
            kp[i] = keys[i];
        }
        if (rc != CQRS_ERR_OK)
            break;
        rc = cqrs_docstore_get_many(ds, kp, (size_t)m, jsons, err);
        for (int i = 0; rc == CQRS_ERR_OK && i < m; i++) {
            const char *id = cqrs_rows_get(r.rows, start + i, 0);
            json_t *want = json_loads(cqrs_rows_get(r.rows, start + i, 1), 0, NULL);
            json_t *got = jsons[i] ? json_loads(jsons[i], 0, NULL) : NULL;
            if (!got) {
                note(d, MISSING, id);
            } else if (json_integer_value(json_object_get(got, "version")) !=
                       json_integer_value(json_object_get(want, "version"))) {
                note(d, VERSION, id);
            } else if (!json_equal(got, want)) {
                note(d, FIELDS, id);
            }
            if (expected_products && want)
                json_array_append(expected_products, want);
            json_decref(want);
            json_decref(got);
            free(jsons[i]);
            (*checked)++;
        }
    }
    cqrs_rows_free(r.rows);
    return rc;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Every product in each of its lists; every list as large as its products. */
static cqrs_err_t check_indexes(cqrs_docstore_t *ds, json_t *products, drift_t *d,
                                cqrs_error_t *err)
{
    size_t n = json_array_size(products), per = PRODUCT_LISTS + 1;
    size_t total = n * per;
    char **keys = calloc(total + 1, sizeof *keys), **members = calloc(total + 1, sizeof *members);
    bool *present = calloc(total + 1, sizeof *present);
    cqrs_err_t rc = CQRS_ERR_OK;
    size_t k = 0;
    if (!keys || !members || !present) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    int32_t shards = 0;
    rc = query_shard_count(ds, "product", &shards, err);
    if (rc == CQRS_ERR_NOT_FOUND)
        rc = CQRS_ERR_OK; /* no layout: no product was projected (compare_docs said so) */
    for (size_t i = 0; rc == CQRS_ERR_OK && shards > 0 && i < n; i++) {
        json_t *p = json_array_get(products, i);
        char shard[CQRS_SHARD_MAX];
        const char *id = json_string_value(json_object_get(p, "id"));
        query_shard(ds, "product", cqrs_keys_partition(id ? id : "", shards), shard, sizeof shard);
        static product_entry_t entries[PRODUCT_LISTS];
        size_t m = product_list_entries(shard, p, entries);
        for (size_t e = 0; e < m; e++) {
            keys[k] = strdup(entries[e].key);
            members[k] = strdup(entries[e].member);
            k++;
        }
        if (json_integer_value(json_object_get(p, "units_sold")) > 0) {
            char member[128];
            top_member(p, member, sizeof member);
            char top[CQRS_KEY_MAX];
            top_products_key(shard, top, sizeof top);
            keys[k] = strdup(top);
            members[k] = strdup(member);
            k++;
        }
    }
    for (size_t start = 0; rc == CQRS_ERR_OK && start < k; start += 10000) {
        size_t m = k - start < 10000 ? k - start : 10000;
        rc = cqrs_docstore_zcontains_many(ds, (const char *const *)keys + start,
                                          (const char *const *)members + start, m, present + start,
                                          err);
    }
    for (size_t i = 0; rc == CQRS_ERR_OK && i < k; i++)
        if (!present[i]) {
            char id[CQRS_UUID_LEN + 1];
            size_t len = strlen(members[i]);
            if (!product_member_id(members[i], id)) /* top products: the id's text ends it */
                snprintf(id, sizeof id, "%s", len >= 36 ? members[i] + len - 36 : members[i]);
            note(d, INDEX_MISSING, id);
        }
    /* sizes: the expected count of each distinct key */
    if (rc == CQRS_ERR_OK && k > 0) {
        char **sorted = malloc(k * sizeof *sorted);
        memcpy(sorted, keys, k * sizeof *sorted);
        qsort(sorted, k, sizeof *sorted, cmp_str);
        size_t distinct = 0;
        char **uk = malloc(k * sizeof *uk);
        long long *want = calloc(k, sizeof *want), *got = calloc(k, sizeof *got);
        for (size_t i = 0; i < k; i++) {
            if (distinct == 0 || strcmp(uk[distinct - 1], sorted[i]) != 0)
                uk[distinct++] = sorted[i];
            want[distinct - 1]++;
        }
        rc = cqrs_docstore_zcard_many(ds, (const char *const *)uk, distinct, got, err);
        for (size_t i = 0; rc == CQRS_ERR_OK && i < distinct; i++)
            if (got[i] != want[i])
                note(d, INDEX_COUNT, uk[i]);
        free(sorted);
        free(uk);
        free(want);
        free(got);
    }
out:
    for (size_t i = 0; i < k; i++) {
        free(keys[i]);
        free(members[i]);
    }
    free(keys);
    free(members);
    free(present);
    return rc;
}

int cqrsctl_verify(const char *pg_dsn, const cqrs_redis_config_t *redis, bool as_json)
{
    cqrs_store_config_t sc = {.dsn = pg_dsn,
                              .pool_size = 1,
                              .acquire_timeout_ms = 1000,
                              .statement_timeout_ms = 300000,
                              .lock_timeout_ms = 1000,
                              .connect_timeout_s = 5,
                              .max_tx_attempts = 1,
                              .application_name = "cqrsctl-verify"};
    cqrs_store_t *store = cqrs_store_new(&sc);
    cqrs_error_t err;
    cqrs_docstore_t *ds = cqrs_docstore_new(redis, 10000, &err);
    drift_t d;
    memset(&d, 0, sizeof d);
    for (int i = 0; i < KINDS; i++)
        d.examples[i] = json_array();
    json_t *products = json_array();
    size_t n_products = 0, n_orders = 0;
    cqrs_err_t rc = !store || !ds ? CQRS_ERR_CONFIG : CQRS_ERR_OK;
    if (rc == CQRS_ERR_OK)
        rc = compare_docs(store, ds, "product", PRODUCTS_SQL, &d, products, &n_products, &err);
    if (rc == CQRS_ERR_OK)
        rc = compare_docs(store, ds, "order", ORDERS_SQL, &d, NULL, &n_orders, &err);
    if (rc == CQRS_ERR_OK)
        rc = check_indexes(ds, products, &d, &err);
    int status;
    if (rc != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl verify: %s\n", err.message);
        status = rc == CQRS_ERR_UNAVAILABLE ? 3 : 1;
    } else {
        size_t drift = 0;
        for (int i = 0; i < KINDS; i++)
            drift += d.count[i];
        status = drift ? 1 : 0;
        if (as_json) {
            json_t *out =
                json_pack("{s:b, s:I, s:I, s:[]}", "match", drift == 0, "products",
                          (json_int_t)n_products, "orders", (json_int_t)n_orders, "drift");
            for (int i = 0; i < KINDS; i++)
                if (d.count[i])
                    json_array_append_new(json_object_get(out, "drift"),
                                          json_pack("{s:s, s:I, s:O}", "kind", KIND_NAMES[i],
                                                    "count", (json_int_t)d.count[i], "first",
                                                    d.examples[i]));
            char *text = json_dumps(out, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
            printf("%s\n", text);
            free(text);
            json_decref(out);
        } else {
            printf("checked %zu products and %zu orders (documents, fields, lists)\n", n_products,
                   n_orders);
            for (int i = 0; i < KINDS; i++) {
                if (!d.count[i])
                    continue;
                char *first = json_dumps(d.examples[i], JSON_COMPACT);
                printf("DRIFT %-48s %6zu  first: %s\n", KIND_NAMES[i], d.count[i], first);
                free(first);
            }
            printf(drift ? "the read model differs from the write model\n"
                         : "the read model matches the write model\n");
        }
    }
    for (int i = 0; i < KINDS; i++)
        json_decref(d.examples[i]);
    json_decref(products);
    cqrs_docstore_destroy(ds);
    cqrs_store_destroy(store);
    return status;
}
