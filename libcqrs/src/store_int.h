/* store_int.h — libpq helpers shared inside libcqrs (store.c, outbox.c); never installed. */
#ifndef CQRS_STORE_INT_H
#define CQRS_STORE_INT_H

#include <libpq-fe.h>

#include "cqrs/err.h"

/* Connects with timeouts and keepalives set; NULL with err (UNAVAILABLE) on failure. */
PGconn *cqrs__pg_connect(const char *dsn, const char *app_name, unsigned connect_timeout_s,
                         cqrs_error_t *err);

/* Classifies a failed result (see store.h) into err; returns the code. */
cqrs_err_t cqrs__pg_error(PGconn *conn, const PGresult *res, cqrs_error_t *err);

#endif
