/* store_int.h — libpq helpers shared inside libcqrs (store.c, eventlog.c, relay.c); never
 * installed. */
#ifndef CQRS_STORE_INT_H
#define CQRS_STORE_INT_H

#include <libpq-fe.h>
#include <stdbool.h>

#include "cqrs/err.h"

/* LISTEN/NOTIFY channel of the outbox: a command's event append notifies it (delivered at
 * commit), the relay listens. */
#define CQRS_OUTBOX_CHANNEL "cqrs_outbox"

/* Connects with timeouts and keepalives set; NULL with err (UNAVAILABLE) on failure. */
PGconn *cqrs__pg_connect(const char *dsn, const char *app_name, unsigned connect_timeout_s,
                         cqrs_error_t *err);

/* Classifies a failed result (see store.h) into err; returns the code. */
cqrs_err_t cqrs__pg_error(PGconn *conn, const PGresult *res, cqrs_error_t *err);

/* Unreplicated commits (see store.c): cqrs__pg_sync_watch() before a statement that commits,
 * cqrs__pg_unreplicated_commit() after it succeeded — true when PostgreSQL cancelled its wait
 * for the synchronous standby, so the success must count as a failure of unknown outcome
 * (false in failpoint builds under CQRS_UNSAFE_TRUST_UNREPLICATED_COMMIT=1, the fault suite's
 * negative control). Both on the thread that runs the statement. */
void cqrs__pg_sync_watch(void);
bool cqrs__pg_unreplicated_commit(void);

/* Runs sql (with params, one statement; or params NULL: several statements) and returns its
 * result — the first failed one, else the last — awaited at most timeout_ms + 1 s (the
 * server's statement_timeout ends anything else first), then a cancel request is sent from a
 * detached thread and it is awaited as long again; still nothing: NULL. *drop: a cancel was
 * sent, so the connection must not be used again (the cancel may land on a later statement).
 * timeout_ms 0: no bound. NULL with *drop false: the query could not be sent. For statements whose
 * commit may wait for a synchronous standby, which statement_timeout does not bound. Starts
 * cqrs__pg_sync_watch() itself. */
PGresult *cqrs__pg_exec_bounded(PGconn *c, const char *sql, int n, const char *const *params,
                                int timeout_ms, bool *drop);

/* The failure says this connection's server is not (or may no longer be) the primary: a
 * read-only server (25006) or an unreplicated commit. The connection must be dropped. */
bool cqrs__pg_wrong_server(const cqrs_error_t *err);

#endif
