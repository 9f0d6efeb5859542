/* store.h — PostgreSQL access: a bounded connection pool, transactions with automatic retry of
 * contention failures, and migrations.
 *
 * Nothing outside libcqrs sees libpq: statements take text parameters and return rows of text.
 * Error classes: unique violation → CONFLICT (err->where = constraint name); serialization
 * failure, deadlock, lock timeout → retried inside cqrs_store_run_tx, RETRY when attempts run
 * out; connection failure → UNAVAILABLE; other SQL errors → INTERNAL.
 *
 * Thread-safe: the pool. Not thread-safe: a cqrs_tx_t (owned by the thread that runs the tx).
 */
#ifndef CQRS_STORE_H
#define CQRS_STORE_H

#include <stdbool.h>
#include <stddef.h>

#include "cqrs/embed.h"
#include "cqrs/err.h"

typedef struct cqrs_store cqrs_store_t;
typedef struct cqrs_tx cqrs_tx_t;
typedef struct cqrs_rows cqrs_rows_t;

typedef struct cqrs_store_config {
    const char *dsn;    /* libpq connection string or URI */
    unsigned pool_size; /* connections, opened lazily */
    unsigned acquire_timeout_ms;
    unsigned statement_timeout_ms;
    unsigned lock_timeout_ms;
    unsigned connect_timeout_s;
    unsigned max_tx_attempts; /* for contention retries */
    const char *application_name;
} cqrs_store_config_t;

/* Start-up check of a DSN (key=value string or postgresql:// URI): CONFIG when libpq cannot
 * parse it, with a message of our own — libpq's quotes the text it choked on, which may be the
 * password. A password it holds is registered with cqrs_log_add_secret. */
cqrs_err_t cqrs_pg_dsn_check(const char *dsn, cqrs_error_t *err);

/* Does not connect; the first use does. Returns NULL only on allocation failure. */
cqrs_store_t *cqrs_store_new(const cqrs_store_config_t *cfg);
void cqrs_store_destroy(cqrs_store_t *store);

/* SELECT 1 on a pooled connection. */
cqrs_err_t cqrs_store_ping(cqrs_store_t *store, cqrs_error_t *err);

/* What the last ping or transaction found: 1 PostgreSQL answered (an error is an answer
 * too), 0 it could not be reached or the connection broke, -1 nothing tried yet (a wait for
 * a free connection tries nothing). */
int cqrs_store_reachable(cqrs_store_t *store);

/* The body of a transaction. Return OK to commit; anything else rolls back and is returned.
 * It may run more than once (contention retry): it must not have side effects outside tx. */
typedef cqrs_err_t (*cqrs_tx_fn)(cqrs_tx_t *tx, void *ud, cqrs_error_t *err);

/* BEGIN (READ COMMITTED); fn; COMMIT. Retries on serialization failure, deadlock and lock
 * timeout, with jittered backoff, up to max_tx_attempts. */
cqrs_err_t cqrs_store_run_tx(cqrs_store_t *store, cqrs_tx_fn fn, void *ud, cqrs_error_t *err);

/* Runs sql with text parameters (NULL entries are SQL NULL). *rows (when rows is not NULL)
 * receives the result; caller frees with cqrs_rows_free. sql is prepared once per connection
 * and cached by its address: pass string literals (other strings work, but each new text
 * costs a PREPARE). One statement per call. */
cqrs_err_t cqrs_tx_exec(cqrs_tx_t *tx, const char *sql, int nparams, const char *const *params,
                        cqrs_rows_t **rows, cqrs_error_t *err);

/* Runs one query and hands its rows to fn one at a time as they arrive (libpq single-row mode:
 * memory stays flat however many rows there are); fn returning other than OK stops it (that
 * code is returned). values[i] is NULL for SQL NULL; borrowed for the call. For the rest of
 * the transaction the connection is busy until this returns. */
typedef cqrs_err_t (*cqrs_row_fn)(void *ud, int ncols, const char *const *values,
                                  cqrs_error_t *err);
cqrs_err_t cqrs_tx_stream(cqrs_tx_t *tx, const char *sql, int nparams, const char *const *params,
                          cqrs_row_fn fn, void *ud, cqrs_error_t *err);

/* The same through a cursor fetched `batch` rows at a time (fewer, larger results than
 * single-row mode for long scans). sql takes no parameters. */
cqrs_err_t cqrs_tx_cursor(cqrs_tx_t *tx, const char *sql, int batch, cqrs_row_fn fn, void *ud,
                          cqrs_error_t *err);

int cqrs_rows_count(const cqrs_rows_t *rows);
/* Borrowed until cqrs_rows_free; NULL for SQL NULL. */
const char *cqrs_rows_get(const cqrs_rows_t *rows, int row, int col);
void cqrs_rows_free(cqrs_rows_t *rows);

/* Applies the migrations not yet recorded in schema_migrations, each in its own transaction,
 * in name order, under an advisory lock so concurrent migrators wait. files ends with a NULL
 * name. *applied receives how many ran. */
cqrs_err_t cqrs_store_migrate(const char *dsn, const cqrs_embedded_file_t *files, int *applied,
                              cqrs_error_t *err);

#endif
