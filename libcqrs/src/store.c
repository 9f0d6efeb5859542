/* store.c — PostgreSQL pool, transactions with contention retry, and migrations.
 *
 * Pool: a fixed array of slots, each lazily connected; acquire waits on a condition variable
 * with a deadline (UNAVAILABLE when it passes) so a burst never queues without bound. A
 * connection that failed is dropped and reopened on its next use, so the daemon recovers from
 * a PostgreSQL restart without being restarted itself.
 *
 * Connections carry statement_timeout, lock_timeout and TCP keepalives so that no call can
 * hang on a dead server. Every connection of libcqrs (pool, relay, migrations) is opened by
 * cqrs__pg_connect, which keeps the DSN's own settings (TLS, password file, hosts) as given.
 */
#include "cqrs/store.h"

#include <errno.h>
#include <poll.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cqrs/failpoint.h"
#include "cqrs/log.h"
#include "cqrs/util.h"
#include "store_int.h"

/* Statements are prepared once per connection and found again by the address of their text
 * (callers pass string literals); the text is compared too, so a reused address never runs
 * the wrong statement. */
#define STMT_CACHE 64

typedef struct stmt {
    const char *key;
    char *text;
    char name[16];
} stmt_t;

typedef struct conn_slot {
    PGconn *conn;
    bool busy;
    int n_stmts;
    stmt_t stmts[STMT_CACHE];
} conn_slot_t;

struct cqrs_store {
    cqrs_store_config_t cfg;
    char *dsn;
    char *app_name;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    conn_slot_t *slots;
    atomic_int reachable; /* cqrs_store_reachable() */
};

struct cqrs_tx {
    PGconn *conn;
    conn_slot_t *slot; /* NULL: no statement cache */
};

struct cqrs_rows {
    PGresult *res;
};

/* Set on this thread when PostgreSQL cancelled a commit's wait for its synchronous standby
 * (statement_timeout, a cancel request): the server then reports success, with only a WARNING
 * saying that the transaction "has already committed locally, but might not have been
 * replicated to the standby". On a primary whose standby was promoted that commit exists only
 * on a server about to be fenced, so it must count as failed, not as done. Recognised by the
 * function that raises it (SyncRepWaitForLSN, PostgreSQL 9.1 to 17), which every notice
 * carries whatever the server's language. Notices are delivered on the thread that runs the
 * statement, so a thread-local flag is the statement's own. */
static _Thread_local bool sync_wait_cancelled;

static void on_notice(void *arg, const PGresult *res)
{
    (void)arg;
    const char *fn = PQresultErrorField(res, PG_DIAG_SOURCE_FUNCTION);
    const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    char line[256];
    snprintf(line, sizeof line, "%s", msg ? msg : "");
    line[strcspn(line, "\n")] = '\0';
    if (fn && strcmp(fn, "SyncRepWaitForLSN") == 0) {
        sync_wait_cancelled = true;
        CQRS_LOG_WARN("PostgreSQL cancelled a commit's wait for its synchronous standby: the "
                      "commit is not counted as done",
                      "detail", line);
        return;
    }
    CQRS_LOG_DEBUG("postgres notice", "detail", line);
}

void cqrs__pg_sync_watch(void)
{
    sync_wait_cancelled = false;
}

bool cqrs__pg_unreplicated_commit(void)
{
    bool seen = sync_wait_cancelled;
    sync_wait_cancelled = false;
    return seen && !CQRS_UNSAFE("TRUST_UNREPLICATED_COMMIT");
}

/* libpq's message on one line. It writes a line per host and address it tried, each maybe
 * followed by a tab-indented hint ("Is the server running on that host…"): the hints are left
 * out and the attempts joined with "; ", so that the one that says why TLS or the password
 * was refused is kept even when it is not the first. */
static void one_line(char *out, size_t n, const char *msg)
{
    size_t len = 0;
    bool skip = false;
    for (const char *p = msg; *p && len + 1 < n; p++) {
        if (p == msg || p[-1] == '\n') {
            skip = *p == '\t';
            if (!skip && len > 0 && len + 3 < n) {
                out[len++] = ';';
                out[len++] = ' ';
            }
        }
        if (!skip && *p != '\n')
            out[len++] = *p;
    }
    out[len] = '\0';
}

cqrs_err_t cqrs_pg_dsn_check(const char *dsn, cqrs_error_t *err)
{
    char *why = NULL;
    PQconninfoOption *opts = PQconninfoParse(dsn ? dsn : "", &why);
    PQfreemem(why); /* may quote the password: never shown */
    if (!opts)
        return cqrs_error_set(err, CQRS_ERR_CONFIG,
                              "CQRS_PG_DSN cannot be parsed: it must be key=value pairs or a "
                              "postgresql:// URI (libpq's reason is not shown: it may quote the "
                              "password; percent-encode special characters in a URI)");
    for (PQconninfoOption *o = opts; o->keyword; o++)
        if (strcmp(o->keyword, "password") == 0 && o->val && *o->val)
            cqrs_log_add_secret(o->val);
    PQconninfoFree(opts);
    return CQRS_ERR_OK;
}

PGconn *cqrs__pg_connect(const char *dsn, const char *app_name, unsigned connect_timeout_s,
                         cqrs_error_t *err)
{
    /* A DSN libpq cannot parse makes it quote the offending text (possibly the password) in
     * its error: say so without it. */
    if (cqrs_pg_dsn_check(dsn, err) != CQRS_ERR_OK)
        return NULL;
    char timeout[16];
    snprintf(timeout, sizeof timeout, "%u", connect_timeout_s ? connect_timeout_s : 5);
    /* expand_dbname=1: `dsn` may itself be a conninfo string or URI, expanded in place of
     * "dbname". Keywords after it override the DSN's (libpq: the last value wins); these are
     * the ones libcqrs owns: the role's application_name and the bounded waits (the relay's
     * heartbeat budget counts on connect_timeout). Everything else is the DSN's alone: host,
     * hostaddr, sslmode, sslrootcert, sslcert, sslkey, sslcrl, passfile, password,
     * target_session_attrs... (unit test: test_store_conninfo). */
    const char *keys[] = {"dbname",           "application_name", "connect_timeout",
                          "keepalives",       "keepalives_idle",  "keepalives_interval",
                          "keepalives_count", "tcp_user_timeout", NULL};
    const char *vals[] = {dsn, app_name ? app_name : "cqrs", timeout, "1", "5", "2", "3", "10000",
                          NULL};
    PGconn *c = PQconnectdbParams(keys, vals, 1);
    if (!c || PQstatus(c) != CONNECTION_OK) {
        /* libpq's messages name the host and port, never the password */
        char msg[220];
        one_line(msg, sizeof msg, c ? PQerrorMessage(c) : "out of memory");
        cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "cannot connect to PostgreSQL: %s", msg);
        PQfinish(c);
        return NULL;
    }
    PQsetNoticeReceiver(c, on_notice, NULL);
    return c;
}

cqrs_err_t cqrs__pg_error(PGconn *conn, const PGresult *res, cqrs_error_t *err)
{
    if (PQstatus(conn) != CONNECTION_OK) {
        char msg[220];
        one_line(msg, sizeof msg, PQerrorMessage(conn));
        return cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "PostgreSQL connection lost: %s", msg);
    }
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *msg = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    const char *constraint = res ? PQresultErrorField(res, PG_DIAG_CONSTRAINT_NAME) : NULL;
    if (!msg)
        msg = PQerrorMessage(conn);
    if (!state)
        return cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "PostgreSQL: %s", msg);
    if (strcmp(state, "23505") == 0)
        return cqrs_error_set_where(err, CQRS_ERR_CONFLICT, constraint, "%s", msg);
    /* serialization_failure, deadlock_detected, lock_not_available */
    if (strcmp(state, "40001") == 0 || strcmp(state, "40P01") == 0 || strcmp(state, "55P03") == 0)
        return cqrs_error_set(err, CQRS_ERR_RETRY, "%s", msg);
    /* 25006 read_only_sql_transaction: this connection's server is a standby (a DSN without
     * target_session_attrs=read-write, or a server demoted under it); the caller drops the
     * connection (cqrs__pg_wrong_server) and the next one finds the primary. */
    if (strcmp(state, "25006") == 0)
        return cqrs_error_set_where(err, CQRS_ERR_UNAVAILABLE, state,
                                    "PostgreSQL server is read-only (a standby?): %s", msg);
    /* class 08 connection exception, 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot
     * connect now, 57014 query canceled (statement timeout) */
    if (strncmp(state, "08", 2) == 0 || strcmp(state, "57P01") == 0 ||
        strcmp(state, "57P02") == 0 || strcmp(state, "57P03") == 0 || strcmp(state, "57014") == 0)
        return cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "%s", msg);
    return cqrs_error_set_where(err, CQRS_ERR_INTERNAL, state, "SQL error %s: %s", state, msg);
}

bool cqrs__pg_wrong_server(const cqrs_error_t *err)
{
    return err && err->code == CQRS_ERR_UNAVAILABLE &&
           (strcmp(err->where, "25006") == 0 || strcmp(err->where, "unreplicated-commit") == 0);
}

static void slot_reset(conn_slot_t *slot)
{
    PQfinish(slot->conn);
    slot->conn = NULL;
    for (int i = 0; i < slot->n_stmts; i++)
        free(slot->stmts[i].text);
    slot->n_stmts = 0;
}

cqrs_store_t *cqrs_store_new(const cqrs_store_config_t *cfg)
{
    cqrs_store_t *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->cfg = *cfg;
    if (s->cfg.pool_size == 0)
        s->cfg.pool_size = 1;
    if (s->cfg.max_tx_attempts == 0)
        s->cfg.max_tx_attempts = 1;
    s->dsn = strdup(cfg->dsn ? cfg->dsn : "");
    s->app_name = strdup(cfg->application_name ? cfg->application_name : "cqrs");
    s->slots = calloc(s->cfg.pool_size, sizeof *s->slots);
    if (!s->dsn || !s->app_name || !s->slots) {
        cqrs_store_destroy(s);
        return NULL;
    }
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    atomic_init(&s->reachable, -1);
    return s;
}

void cqrs_store_destroy(cqrs_store_t *s)
{
    if (!s)
        return;
    if (s->slots) {
        for (unsigned i = 0; i < s->cfg.pool_size; i++)
            slot_reset(&s->slots[i]);
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
    }
    free(s->slots);
    free(s->dsn);
    free(s->app_name);
    free(s);
}

static int acquire_slot(cqrs_store_t *s)
{
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += s->cfg.acquire_timeout_ms / 1000;
    deadline.tv_nsec += (long)(s->cfg.acquire_timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&s->mu);
    int slot = -1;
    for (;;) {
        for (unsigned i = 0; i < s->cfg.pool_size; i++) {
            if (!s->slots[i].busy) {
                slot = (int)i;
                break;
            }
        }
        if (slot >= 0) {
            s->slots[slot].busy = true;
            break;
        }
        if (pthread_cond_timedwait(&s->cv, &s->mu, &deadline) == ETIMEDOUT)
            break;
    }
    pthread_mutex_unlock(&s->mu);
    return slot;
}

static void release_slot(cqrs_store_t *s, int slot)
{
    pthread_mutex_lock(&s->mu);
    s->slots[slot].busy = false;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* Makes sure slot's connection is usable (the slot is owned by the caller). */
static cqrs_err_t slot_conn(cqrs_store_t *s, int slot, PGconn **out, cqrs_error_t *err)
{
    PGconn *c = s->slots[slot].conn;
    if (c && PQstatus(c) != CONNECTION_OK) {
        slot_reset(&s->slots[slot]);
        c = NULL;
    }
    if (!c) {
        c = cqrs__pg_connect(s->dsn, s->app_name, s->cfg.connect_timeout_s, err);
        if (!c)
            return CQRS_ERR_UNAVAILABLE;
        char sql[160];
        snprintf(sql, sizeof sql, "SET statement_timeout = %u; SET lock_timeout = %u",
                 s->cfg.statement_timeout_ms, s->cfg.lock_timeout_ms);
        PGresult *r = PQexec(c, sql);
        cqrs_err_t rc = CQRS_ERR_OK;
        if (PQresultStatus(r) != PGRES_COMMAND_OK)
            rc = cqrs__pg_error(c, r, err);
        PQclear(r);
        if (rc != CQRS_ERR_OK) {
            PQfinish(c);
            return rc;
        }
        s->slots[slot].conn = c;
    }
    *out = c;
    return CQRS_ERR_OK;
}

/* What a finished use of a connection says about PostgreSQL: any answer (an error too) means
 * it was reached; a connection that could not be made or broke means it was not. */
static void observe(cqrs_store_t *s, PGconn *c, cqrs_err_t rc)
{
    atomic_store(&s->reachable, c && (rc == CQRS_ERR_OK || PQstatus(c) == CONNECTION_OK));
}

int cqrs_store_reachable(cqrs_store_t *s)
{
    return atomic_load(&s->reachable);
}

static cqrs_err_t exec_simple(PGconn *c, const char *sql, cqrs_error_t *err)
{
    PGresult *r = PQexec(c, sql);
    cqrs_err_t rc = CQRS_ERR_OK;
    if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK)
        rc = cqrs__pg_error(c, r, err);
    PQclear(r);
    return rc;
}

cqrs_err_t cqrs_store_ping(cqrs_store_t *s, cqrs_error_t *err)
{
    int slot = acquire_slot(s);
    if (slot < 0)
        return cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "no free PostgreSQL connection");
    PGconn *c = NULL;
    cqrs_err_t rc = slot_conn(s, slot, &c, err);
    if (rc == CQRS_ERR_OK)
        rc = exec_simple(c, "SELECT 1", err);
    observe(s, c, rc);
    release_slot(s, slot);
    return rc;
}

static void backoff(unsigned attempt)
{
    /* 5 ms, 10 ms, 20 ms … capped at 200 ms, with jitter so that retrying transactions that
     * collided once do not collide again in lock-step. */
    unsigned base = 5u << (attempt < 6 ? attempt : 6);
    if (base > 200)
        base = 200;
    unsigned jitter = (unsigned)(rand() % (int)(base / 2 + 1));
    usleep((base / 2 + jitter) * 1000u);
}

/* A COMMIT that reported success after its wait for the synchronous standby was cancelled:
 * on this server only, which may be a primary whose standby was promoted (then it is lost
 * once this one is fenced) or may stay the primary (then it holds). Unknown, like a commit
 * whose answer never came: the caller answers 503 and an Idempotency-Key retry settles it. */
static cqrs_err_t unreplicated(cqrs_error_t *err)
{
    return cqrs_error_set_where(
        err, CQRS_ERR_UNAVAILABLE, "unreplicated-commit",
        "PostgreSQL committed on its server only: the wait for the synchronous "
        "standby was cancelled, so the commit is not known to be durable");
}

/* Cancel threads running at once, in the whole process. A cancel to an unreachable server
 * can take minutes before libpq 17 (no connect timeout), so they are capped; one over the cap
 * is not sent (logged), and its connection is given up after the second wait all the same. */
#define CANCELS_MAX 16
static atomic_int cancels_running;

static void *cancel_main(void *arg)
{
    PGcancel *k = arg;
    char errbuf[256];
    if (!PQcancel(k, errbuf, sizeof errbuf)) {
        errbuf[strcspn(errbuf, "\n")] = '\0';
        CQRS_LOG_WARN("cannot cancel a PostgreSQL statement", "error", errbuf);
    }
    PQfreeCancel(k);
    atomic_fetch_sub(&cancels_running, 1);
    return NULL;
}

/* Sends a cancel request for c's running statement from a detached thread: PQcancel connects
 * without a timeout before libpq 17, and no caller may wait on it. */
static void cancel_async(PGconn *c)
{
    PGcancel *k = PQgetCancel(c);
    if (!k)
        return;
    if (atomic_fetch_add(&cancels_running, 1) < CANCELS_MAX) {
        pthread_attr_t attr;
        pthread_t t;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, cancel_main, k);
        pthread_attr_destroy(&attr);
        if (rc == 0)
            return;
    }
    CQRS_LOG_WARN("cancel not sent: earlier cancels have not returned (the connection is given up "
                  "after its wait all the same)");
    atomic_fetch_sub(&cancels_running, 1);
    PQfreeCancel(k);
}

/* Until c has a result ready (or is broken): false once the bound ran out twice (the second
 * time after a cancel). *deadline and *drop carry over from one result to the next. */
static bool await_result(PGconn *c, int timeout_ms, int64_t *deadline, bool *drop)
{
    int64_t wait_ms = (int64_t)timeout_ms + 1000;
    for (;;) {
        /* first what libpq (or OpenSSL) already holds, then the socket */
        if (!PQconsumeInput(c) || !PQisBusy(c))
            return true; /* PQgetResult reports a broken connection */
        int64_t left = timeout_ms > 0 ? *deadline - cqrs_monotonic_ms() : INT32_MAX;
        if (left <= 0) {
            if (*drop)
                return false; /* unanswered even after the cancel */
            CQRS_LOG_WARN("PostgreSQL statement unanswered after its timeout (a commit waiting "
                          "for a synchronous standby?): cancelling it");
            cancel_async(c);
            *drop = true; /* the cancel may land later, on a next statement: never reuse c */
            *deadline = cqrs_monotonic_ms() + wait_ms;
            continue;
        }
        struct pollfd pfd = {.fd = PQsocket(c), .events = POLLIN};
        if (pfd.fd < 0 || (poll(&pfd, 1, (int)left) < 0 && errno != EINTR))
            return true;
    }
}

PGresult *cqrs__pg_exec_bounded(PGconn *c, const char *sql, int n, const char *const *params,
                                int timeout_ms, bool *drop)
{
    *drop = false;
    cqrs__pg_sync_watch();
    int sent =
        params ? PQsendQueryParams(c, sql, n, NULL, params, NULL, NULL, 0) : PQsendQuery(c, sql);
    if (!sent)
        return NULL;
    /* A second more than the server's own statement_timeout, which ends everything else
     * first: a cancel from here is never racing one of the server's. 0: no bound, like the
     * server's. The bound covers every result of a multi-statement string: the commit of its
     * implicit transaction (and its wait for the standby) comes before the last one. */
    int64_t deadline = cqrs_monotonic_ms() + (int64_t)timeout_ms + 1000;
    /* The first failed result, else the last one (several statements in one string). */
    PGresult *r, *out = NULL;
    for (;;) {
        if (!await_result(c, timeout_ms, &deadline, drop)) {
            PQclear(out);
            return NULL;
        }
        if ((r = PQgetResult(c)) == NULL)
            break;
        ExecStatusType st = PQresultStatus(out);
        if (out && st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
            PQclear(r);
            continue;
        }
        PQclear(out);
        out = r;
    }
    return out;
}

/* COMMIT through cqrs__pg_exec_bounded: statement_timeout itself does not cover a commit's
 * wait for the synchronous standby (PostgreSQL disables it before committing), which lasts as
 * long as no standby confirms — forever on a primary whose standby was promoted. Past
 * timeout_ms (the pool's statement timeout; 30 s for migrations) a cancel request ends that wait
 * and the answer comes back as a success with the unreplicated warning; no answer within as long
 * again and the connection is given up. Either way the outcome is unknown: UNAVAILABLE (503; an
 * Idempotency-Key retry settles it). *drop: the connection must not be used again. */
static cqrs_err_t commit_bounded(PGconn *c, int timeout_ms, bool *drop, cqrs_error_t *err)
{
    PGresult *r = cqrs__pg_exec_bounded(c, "COMMIT", 0, NULL, timeout_ms, drop);
    if (!r && *drop)
        return cqrs_error_set_where(err, CQRS_ERR_UNAVAILABLE, "unreplicated-commit",
                                    "PostgreSQL did not answer COMMIT, even after a cancel: its "
                                    "outcome is unknown");
    cqrs_err_t rc = CQRS_ERR_OK;
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
        rc = cqrs__pg_error(c, r, err);
    PQclear(r);
    if (rc == CQRS_ERR_OK && cqrs__pg_unreplicated_commit())
        rc = unreplicated(err);
    return rc;
}

cqrs_err_t cqrs_store_run_tx(cqrs_store_t *s, cqrs_tx_fn fn, void *ud, cqrs_error_t *err)
{
    cqrs_error_t own = {0};
    if (!err)
        err = &own; /* its `where` decides whether the connection is dropped */
    int slot = acquire_slot(s);
    if (slot < 0)
        return cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "no free PostgreSQL connection");
    cqrs_err_t rc = CQRS_ERR_OK;
    for (unsigned attempt = 0; attempt < s->cfg.max_tx_attempts; attempt++) {
        PGconn *c = NULL;
        bool drop = false;
        err->code = CQRS_ERR_OK; /* a stale `where` must not drop this attempt's connection */
        err->where[0] = '\0';
        rc = slot_conn(s, slot, &c, err);
        if (rc != CQRS_ERR_OK) {
            observe(s, NULL, rc);
            break;
        }
        rc = exec_simple(c, "BEGIN", err);
        if (rc == CQRS_ERR_OK) {
            cqrs_tx_t tx = {c, &s->slots[slot]};
            rc = fn(&tx, ud, err);
            if (rc == CQRS_ERR_OK)
                rc = commit_bounded(c, (int)s->cfg.statement_timeout_ms, &drop, err);
        }
        observe(s, c, rc);
        if (drop || (rc != CQRS_ERR_OK && cqrs__pg_wrong_server(err))) {
            /* A server that is not (or may no longer be) the primary, or a COMMIT still
             * unanswered: no ROLLBACK; the next use reconnects, and libpq's
             * target_session_attrs=read-write finds the primary. */
            slot_reset(&s->slots[slot]);
        } else if (rc != CQRS_ERR_OK && PQstatus(c) == CONNECTION_OK &&
                   PQtransactionStatus(c) != PQTRANS_IDLE) {
            cqrs_error_t ignored;
            exec_simple(c, "ROLLBACK", &ignored);
        }
        if (rc != CQRS_ERR_RETRY)
            break;
        backoff(attempt);
    }
    release_slot(s, slot);
    return rc;
}

/* The cached prepared statement for sql, preparing it on first use; NULL with err on failure
 * (or when the cache is full: then the caller's statement runs unprepared). */
static const stmt_t *prepared(cqrs_tx_t *tx, const char *sql, int nparams, cqrs_error_t *err)
{
    conn_slot_t *slot = tx->slot;
    for (int i = 0; i < slot->n_stmts; i++)
        if (slot->stmts[i].key == sql && strcmp(slot->stmts[i].text, sql) == 0)
            return &slot->stmts[i];
    if (slot->n_stmts == STMT_CACHE) {
        static const stmt_t unnamed = {NULL, NULL, ""};
        PGresult *r = PQprepare(tx->conn, "", sql, nparams, NULL);
        bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        if (!ok)
            cqrs__pg_error(tx->conn, r, err);
        PQclear(r);
        return ok ? &unnamed : NULL;
    }
    stmt_t *st = &slot->stmts[slot->n_stmts];
    snprintf(st->name, sizeof st->name, "cqrs_%d", slot->n_stmts);
    PGresult *r = PQprepare(tx->conn, st->name, sql, nparams, NULL);
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    if (!ok)
        cqrs__pg_error(tx->conn, r, err);
    PQclear(r);
    if (!ok)
        return NULL;
    st->key = sql;
    st->text = strdup(sql);
    if (!st->text) {
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    slot->n_stmts++;
    return st;
}

cqrs_err_t cqrs_tx_exec(cqrs_tx_t *tx, const char *sql, int nparams, const char *const *params,
                        cqrs_rows_t **rows, cqrs_error_t *err)
{
    if (rows)
        *rows = NULL;
    PGresult *r = NULL;
    const stmt_t *stmt = tx->slot ? prepared(tx, sql, nparams, err) : NULL;
    if (tx->slot && !stmt)
        return err ? err->code : CQRS_ERR_INTERNAL;
    if (stmt)
        r = PQexecPrepared(tx->conn, stmt->name, nparams, params, NULL, NULL, 0);
    else
        r = PQexecParams(tx->conn, sql, nparams, NULL, params, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        cqrs_err_t rc = cqrs__pg_error(tx->conn, r, err);
        PQclear(r);
        return rc;
    }
    if (rows) {
        *rows = malloc(sizeof **rows);
        if (!*rows) {
            PQclear(r);
            return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        }
        (*rows)->res = r;
    } else {
        PQclear(r);
    }
    return CQRS_ERR_OK;
}

cqrs_err_t cqrs_tx_stream(cqrs_tx_t *tx, const char *sql, int nparams, const char *const *params,
                          cqrs_row_fn fn, void *ud, cqrs_error_t *err)
{
    if (!PQsendQueryParams(tx->conn, sql, nparams, NULL, params, NULL, NULL, 0))
        return cqrs__pg_error(tx->conn, NULL, err);
    PQsetSingleRowMode(tx->conn);
    cqrs_err_t rc = CQRS_ERR_OK;
    enum { MAX_COLS = 64 };
    const char *values[MAX_COLS];
    PGresult *r;
    while ((r = PQgetResult(tx->conn)) != NULL) {
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_SINGLE_TUPLE && rc == CQRS_ERR_OK) {
            int n = PQnfields(r) < MAX_COLS ? PQnfields(r) : MAX_COLS;
            for (int i = 0; i < n; i++)
                values[i] = PQgetisnull(r, 0, i) ? NULL : PQgetvalue(r, 0, i);
            rc = fn(ud, n, values, err);
        } else if (st != PGRES_SINGLE_TUPLE && st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK &&
                   rc == CQRS_ERR_OK) {
            rc = cqrs__pg_error(tx->conn, r, err);
        }
        PQclear(r); /* after a stop, the remaining rows are read and dropped */
    }
    return rc;
}

/* The result of the FETCH in flight (NULL with err when it failed); reads to the end. */
static PGresult *fetch_result(PGconn *c, cqrs_err_t *rc, cqrs_error_t *err)
{
    PGresult *out = NULL, *r;
    while ((r = PQgetResult(c)) != NULL) {
        if (!out && PQresultStatus(r) == PGRES_TUPLES_OK) {
            out = r;
            continue;
        }
        if (*rc == CQRS_ERR_OK)
            *rc = cqrs__pg_error(c, r, err);
        PQclear(r);
    }
    if (!out && *rc == CQRS_ERR_OK)
        *rc = cqrs__pg_error(c, NULL, err);
    return out;
}

cqrs_err_t cqrs_tx_cursor(cqrs_tx_t *tx, const char *sql, int batch, cqrs_row_fn fn, void *ud,
                          cqrs_error_t *err)
{
    size_t len = strlen(sql) + 64;
    char *declare = malloc(len);
    if (!declare)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    snprintf(declare, len, "DECLARE cqrs_cursor NO SCROLL CURSOR FOR %s", sql);
    cqrs_err_t rc = exec_simple(tx->conn, declare, err);
    free(declare);
    char fetch[64];
    snprintf(fetch, sizeof fetch, "FETCH %d FROM cqrs_cursor", batch > 0 ? batch : 1000);
    enum { MAX_COLS = 64 };
    const char *values[MAX_COLS];
    /* Double-buffered: the server produces the next batch while fn consumes this one. */
    PGresult *r = NULL;
    if (rc == CQRS_ERR_OK) {
        if (!PQsendQuery(tx->conn, fetch))
            rc = cqrs__pg_error(tx->conn, NULL, err);
        else
            r = fetch_result(tx->conn, &rc, err);
    }
    while (rc == CQRS_ERR_OK && r) {
        int rows = PQntuples(r), n = PQnfields(r) < MAX_COLS ? PQnfields(r) : MAX_COLS;
        bool more = rows > 0 && PQsendQuery(tx->conn, fetch);
        for (int i = 0; i < rows && rc == CQRS_ERR_OK; i++) {
            for (int k = 0; k < n; k++)
                values[k] = PQgetisnull(r, i, k) ? NULL : PQgetvalue(r, i, k);
            rc = fn(ud, n, values, err);
        }
        PQclear(r);
        r = NULL;
        if (more) {
            cqrs_err_t frc = CQRS_ERR_OK;
            cqrs_error_t ferr;
            r = fetch_result(tx->conn, &frc, &ferr); /* always consumed, also after a stop */
            if (rc == CQRS_ERR_OK && frc != CQRS_ERR_OK) {
                rc = frc;
                *err = ferr;
            }
        } else if (rows > 0 && rc == CQRS_ERR_OK) {
            rc = cqrs__pg_error(tx->conn, NULL, err);
        }
    }
    PQclear(r);
    if (rc == CQRS_ERR_OK)
        rc = exec_simple(tx->conn, "CLOSE cqrs_cursor", err);
    return rc;
}

int cqrs_rows_count(const cqrs_rows_t *rows)
{
    return rows ? PQntuples(rows->res) : 0;
}

const char *cqrs_rows_get(const cqrs_rows_t *rows, int row, int col)
{
    if (!rows || row >= PQntuples(rows->res) || col >= PQnfields(rows->res) ||
        PQgetisnull(rows->res, row, col))
        return NULL;
    return PQgetvalue(rows->res, row, col);
}

void cqrs_rows_free(cqrs_rows_t *rows)
{
    if (!rows)
        return;
    PQclear(rows->res);
    free(rows);
}

/* ---- migrations -------------------------------------------------------------------------- */

#define MIGRATION_LOCK_KEY "4242001"

cqrs_err_t cqrs_store_migrate(const char *dsn, const cqrs_embedded_file_t *files, int *applied,
                              cqrs_error_t *err)
{
    *applied = 0;
    PGconn *c = cqrs__pg_connect(dsn, "cqrsctl-migrate", 5, err);
    if (!c)
        return CQRS_ERR_UNAVAILABLE;
    cqrs_err_t rc = exec_simple(c, "SELECT pg_advisory_lock(" MIGRATION_LOCK_KEY ")", err);
    if (rc != CQRS_ERR_OK)
        goto out;
    rc = exec_simple(c,
                     "CREATE TABLE IF NOT EXISTS schema_migrations ("
                     " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
                     err);
    if (rc != CQRS_ERR_OK)
        goto out;
    for (const cqrs_embedded_file_t *f = files; f->name; f++) {
        const char *p[] = {f->name};
        PGresult *r = PQexecParams(c, "SELECT 1 FROM schema_migrations WHERE name = $1", 1, NULL, p,
                                   NULL, NULL, 0);
        if (PQresultStatus(r) != PGRES_TUPLES_OK) {
            rc = cqrs__pg_error(c, r, err);
            PQclear(r);
            goto out;
        }
        bool done = PQntuples(r) > 0;
        PQclear(r);
        if (done)
            continue;
        rc = exec_simple(c, "BEGIN", err);
        if (rc == CQRS_ERR_OK)
            rc = exec_simple(c, f->text, err);
        if (rc == CQRS_ERR_OK) {
            r = PQexecParams(c, "INSERT INTO schema_migrations(name) VALUES ($1)", 1, NULL, p, NULL,
                             NULL, 0);
            if (PQresultStatus(r) != PGRES_COMMAND_OK)
                rc = cqrs__pg_error(c, r, err);
            PQclear(r);
        }
        if (rc == CQRS_ERR_OK) {
            /* bounded like the daemons' commits: 30 s for the standby (no statement_timeout
             * is set on this connection) */
            bool drop;
            rc = commit_bounded(c, 30000, &drop, err);
            if (drop && rc == CQRS_ERR_OK)
                rc = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE,
                                    "COMMIT answered only after a cancel; run the migration again");
        }
        if (rc != CQRS_ERR_OK) {
            char where[64];
            snprintf(where, sizeof where, "%s", f->name);
            if (err)
                snprintf(err->where, sizeof err->where, "%s", where);
            if (PQtransactionStatus(c) != PQTRANS_ACTIVE) { /* not a COMMIT given up on */
                cqrs_error_t ignored;
                exec_simple(c, "ROLLBACK", &ignored);
            }
            goto out;
        }
        CQRS_LOG_INFO("migration applied", "name", f->name);
        (*applied)++;
    }
out:
    PQfinish(c);
    return rc;
}
