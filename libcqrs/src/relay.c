/* relay.c — the outbox relay: its thread, its supervisor, and one Kafka transaction per batch
 * (the event log and outbox writes are eventlog.c).
 *
 * DESIGN (see outbox.h for the guarantees)
 *  - Leadership: a lease row in PostgreSQL (relay_leader), taken when expired, renewed every
 *    lease/5 — also while waiting on Kafka — as long as it has not expired, and given up when
 *    a renewal fails. Taking it bumps the epoch; every relay write checks owner + epoch in the
 *    same statement.
 *  - Fencing in Kafka: one transactional.id for all relays of a deployment; init_transactions
 *    by a new leader aborts and fences the old one's open transaction.
 *  - One batch = one Kafka transaction: produce, wait for every delivery report, record the
 *    batch in relay_inflight (with one check message's partition and offset), commit, then
 *    delete the rows and the record in one statement, committed asynchronously (one
 *    synchronous PostgreSQL commit per round: the record's; a lost delete leaves a record
 *    that the next leader settles, below). A batch is recorded only where no record is: one
 *    still there (a delete lost while the connection lived on — a pooler or proxy keeping it
 *    across a failover —, or a batch whose Kafka transaction was aborted) is settled first,
 *    as after a takeover. After a takeover the new leader first
 *    runs init_transactions — which returns only once the previous transaction is complete,
 *    its commit or abort markers written — and only then looks the check message up with a
 *    read_committed consumer: visible → the batch is in Kafka, delete its rows; not visible →
 *    it was aborted, publish again. (Before the markers are written a read_committed reader's
 *    end stops short of the transaction, so the lookup would mistake a commit for an abort.)
 *  - A delete that fails after a successful commit needs no lookup: the leader keeps the
 *    batch's sequences and retries that delete alone before anything else; no round runs
 *    meanwhile. Losing the lease drops them; the next leader settles the record as above.
 *  - Completeness and order: every row still in the outbox, in sequence order; an aggregate's
 *    events have increasing sequences (its row lock orders its transactions), and the
 *    producer keeps partition order (idempotent, key = aggregate id).
 *  - Wake-up: LISTEN cqrs_outbox (NOTIFYed at commit), plus a fallback poll.
 *  - Runs on its own thread with its own PostgreSQL connection and producer.
 *  - Bounded waits: the connection's lock_timeout is at most half the lease and its
 *    statement_timeout at most a quarter of stall_ms, so a lock held on the relay's tables
 *    ends a statement with a timeout: logged, counted, retried after a pause that doubles
 *    each time in a row. After a timeout or a failed record, and at the start of a leadership,
 *    the leader checks with NOWAIT that it could record and delete a batch before producing
 *    it, so a lock that is still held costs a refused check, not a produced and aborted
 *    batch (the first round to meet a new lock may abort one). The leader keeps its
 *    leadership while its lease can still be renewed and gives it up when it cannot. Every
 *    relay write checks owner + epoch with FOR SHARE on the relay_leader row, so a takeover
 *    cannot commit in the middle of it. The Idempotency-Key cleanup deletes small batches,
 *    each under a quarter-lease statement_timeout and after a renewal.
 *  - Supervision: the worker beats a heartbeat around every call that can wait (each bounded
 *    by statement_timeout, lease/3 or RELAY_CALL_MAX_MS), and stall_ms is at least
 *    CQRS_RELAY_STALL_MIN_MS and the lease, so only a call that does not return goes without
 *    a beat for stall_ms. Then the supervisor has its running statement cancelled (PQcancel,
 *    sent from a detached thread: it has no connect timeout before libpq 17 and must never
 *    hold the supervisor up); only if that does not free it within a grace period is it
 *    abandoned and replaced. The leader flag, epoch, backlog gauges and health flags are the
 *    worker's own and published to the shared stats only while it is the current worker, so
 *    an abandoned one that wakes up cannot unseat its successor (the counters accumulate from
 *    every worker); it aborts what it was doing, frees its
 *    connection and producer and exits. A worker/supervisor CAS on its state decides who
 *    frees it: after the supervisor's successful CAS the worker may be freed at any moment,
 *    so the supervisor touches nothing of it any more.
 */
#define _GNU_SOURCE /* pthread_timedjoin_np */
#include "cqrs/outbox.h"

#include <librdkafka/rdkafka.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cqrs/bus.h"
#include "cqrs/failpoint.h"
#include "cqrs/log.h"
#include "cqrs/metrics.h"
#include "cqrs/util.h"
#include "store_int.h"

/* application_name of the relay's connection (pg_stat_activity, tests count them). */
#define RELAY_APP_NAME "cqrs-relay"
/* The longest fixed wait of one call between two heartbeats: connecting to PostgreSQL and
 * creating the topics. The other waits are statement_timeout (at most stall_ms / 4) and
 * lease/3 (Kafka transaction calls; stall_ms is at least the lease). */
#define RELAY_CALL_MAX_MS (CQRS_RELAY_STALL_MIN_MS / 2)
#define RELAY_CONNECT_TIMEOUT_S (RELAY_CALL_MAX_MS / 1000)
/* PQcancel threads of one relay running at once (a cancel without connect timeout can hang). */
#define RELAY_CANCELS_MAX 2
/* The longest pause between retries after timeouts in a row. */
#define RELAY_BACKOFF_MAX_MS 30000

/* ---- relay ------------------------------------------------------------------------------- */

typedef struct slot {
    int64_t sequence;
    double occurred_at; /* epoch seconds */
    rd_kafka_resp_err_t result;
    int32_t partition;
    int64_t offset;
    bool done;
} slot_t;

/* The steps of a round (relay_round), each timed into its own histogram. */
enum {
    PHASE_READ,
    PHASE_CHECK,
    PHASE_PRODUCE,
    PHASE_ACK,
    PHASE_RECORD,
    PHASE_COMMIT,
    PHASE_DELETE,
    RELAY_PHASES
};
static const char *const relay_phase_names[RELAY_PHASES] = {"read",   "check",  "produce", "ack",
                                                            "record", "commit", "delete"};

/* What outlives a worker: counters, leadership view, latency (shared by the supervisor and
 * every worker it ever started; freed with the last reference). The flags and the epoch are
 * written under mu by the current worker only (see publish()). */
typedef struct relay_shared {
    atomic_int refs;
    pthread_mutex_t mu;
    atomic_bool leader, kafka_up, pg_up;
    atomic_bool kafka_known; /* kafka_up was observed by the current leadership */
    atomic_int_fast64_t epoch, backlog;
    atomic_uint_fast64_t published, failed, aborted, changes, recovered, restarts, pg_timeouts;
    _Atomic double oldest_age_s;
    atomic_int cancels; /* PQcancel threads still running */
    cqrs_histogram_t latency;
    cqrs_histogram_t pickup;              /* event time → read from the outbox */
    cqrs_histogram_t phase[RELAY_PHASES]; /* duration of each step of a round */
} relay_shared_t;

static void shared_unref(relay_shared_t *sh)
{
    if (sh && atomic_fetch_sub(&sh->refs, 1) == 1) {
        pthread_mutex_destroy(&sh->mu);
        free(sh);
    }
}

/* Worker states: the supervisor moves RUNNING → ABANDONED, the worker RUNNING → EXITED when it
 * returns; whoever loses that race knows the other one owns the cleanup. */
enum { WORKER_RUNNING, WORKER_ABANDONED, WORKER_EXITED };

/* One relay thread. The supervisor replaces a worker that stopped making progress (a call
 * into a library that does not return) and that cancelling its statement did not free: the
 * stuck one is abandoned — it can no longer lead, since its lease lapses, Kafka fences its
 * producer and PostgreSQL refuses its epoch — and frees itself when it returns. */
typedef struct relay_worker {
    cqrs_relay_config_t cfg; /* timeouts already clamped (worker_new) */
    char *dsn, *brokers, *source, *client_id, *txn_id;
    char **topics;
    bool topics_ready;
    char owner[128];
    pthread_t thread;
    atomic_bool stop;
    atomic_int state;              /* WORKER_* */
    atomic_int_fast64_t heartbeat; /* monotonic ms of the last sign of progress */
    relay_shared_t *sh;
    PGconn *conn;
    /* Cancels conn's running statement from the supervisor: taken (and freed) by whoever uses
     * it first, under cancel_mu; remade by the worker while conn lives. */
    pthread_mutex_t cancel_mu;
    PGcancel *cancel;
    rd_kafka_t *rk;
    bool leading;       /* this worker holds the lease (epoch below) */
    int64_t epoch;      /* of its current or last leadership */
    bool txn_ready;     /* init_transactions done on rk */
    bool txn_open;      /* a Kafka transaction begun and not yet committed or aborted */
    bool need_recovery; /* after taking over: resolve relay_inflight first */
    bool check_first;   /* check that a batch could be recorded before producing it */
    int undelivered;    /* batches in a row that timed out in Kafka (batch_give_up) */
    /* A batch committed in Kafka whose rows are not deleted yet ("{1,2,…}"): the delete is
     * retried alone before anything else while this leadership lasts. */
    char *published_seqs;
    bool timed_out; /* a statement of this loop iteration hit a timeout */
    int backoff_ms; /* current pause after timeouts (0: none) */
    int64_t next_timeout_log;
    uint64_t timeouts_unlogged;
    int64_t next_renew;  /* monotonic ms */
    int64_t lease_until; /* monotonic ms: after this, assume the lease is gone */
    int64_t next_housekeeping, next_stats;
} relay_worker_t;

struct cqrs_relay {
    cqrs_relay_config_t cfg; /* strings borrowed from the worker template below */
    relay_worker_t *tmpl;    /* holds the copied configuration */
    relay_shared_t *sh;
    relay_worker_t *current;
    int64_t cancelled_beat; /* current's heartbeat when its statement was cancelled (-1) */
    int64_t cancelled_at;   /* monotonic ms of that cancel */
    pthread_t supervisor;
    bool running;
    atomic_bool stop;
};

static void worker_free(relay_worker_t *r)
{
    if (!r)
        return;
    pthread_mutex_destroy(&r->cancel_mu);
    PQfreeCancel(r->cancel);
    free(r->published_seqs);
    free(r->dsn);
    free(r->brokers);
    free(r->source);
    free(r->client_id);
    free(r->txn_id);
    for (size_t i = 0; r->topics && i < r->cfg.n_topics; i++)
        free(r->topics[i]);
    free(r->topics);
    shared_unref(r->sh);
    free(r);
}

/* A worker with its own copy of cfg and a reference to sh. */
static relay_worker_t *worker_new(const cqrs_relay_config_t *cfg, relay_shared_t *sh,
                                  cqrs_error_t *err)
{
    relay_worker_t *r = calloc(1, sizeof *r);
    if (!r) {
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    atomic_fetch_add(&sh->refs, 1);
    r->sh = sh;
    pthread_mutex_init(&r->cancel_mu, NULL);
    r->cfg = *cfg;
    r->dsn = strdup(cfg->dsn);
    r->brokers = strdup(cfg->brokers);
    r->source = strdup(cfg->source ? cfg->source : "/cqrs");
    r->client_id = strdup(cfg->client_id ? cfg->client_id : "cqrs-relay");
    r->txn_id = strdup(cfg->transactional_id ? cfg->transactional_id : "cqrs-relay");
    r->topics = calloc(cfg->n_topics + 1, sizeof *r->topics);
    for (size_t i = 0; r->topics && i < cfg->n_topics; i++)
        r->topics[i] = strdup(cfg->topics[i]);
    r->cfg.topics = (const char *const *)r->topics;
    if (!r->dsn || !r->brokers || !r->source || !r->client_id || !r->txn_id || !r->topics) {
        worker_free(r);
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    if (r->cfg.batch_size <= 0)
        r->cfg.batch_size = 500;
    if (r->cfg.poll_interval_ms <= 0)
        r->cfg.poll_interval_ms = 1000;
    if (r->cfg.message_timeout_ms <= 0)
        r->cfg.message_timeout_ms = 30000;
    if (r->cfg.lease_ms <= 0)
        r->cfg.lease_ms = 5000;
    if (r->cfg.stall_ms <= 0)
        r->cfg.stall_ms = 60000;
    if (r->cfg.statement_timeout_ms <= 0)
        r->cfg.statement_timeout_ms = 5000;
    if (r->cfg.lock_timeout_ms <= 0)
        r->cfg.lock_timeout_ms = 2000;
    /* A healthy worker beats at least every RELAY_CALL_MAX_MS, lease/3 or statement_timeout
     * (see the DESIGN note): a shorter patience would cancel and replace it. */
    if (r->cfg.stall_ms < CQRS_RELAY_STALL_MIN_MS)
        r->cfg.stall_ms = CQRS_RELAY_STALL_MIN_MS;
    if (r->cfg.stall_ms < r->cfg.lease_ms)
        r->cfg.stall_ms = r->cfg.lease_ms;
    /* No statement may outlast the supervisor's patience, and no lock wait may outlast the
     * lease: a leader that waited on a lock still holds its lease when the wait ends. */
    if (r->cfg.statement_timeout_ms > r->cfg.stall_ms / 4)
        r->cfg.statement_timeout_ms = r->cfg.stall_ms / 4 > 0 ? r->cfg.stall_ms / 4 : 1;
    if (r->cfg.lock_timeout_ms > r->cfg.lease_ms / 2)
        r->cfg.lock_timeout_ms = r->cfg.lease_ms / 2 > 0 ? r->cfg.lease_ms / 2 : 1;
    if (r->cfg.lock_timeout_ms > r->cfg.statement_timeout_ms)
        r->cfg.lock_timeout_ms = r->cfg.statement_timeout_ms;
    /* Negative control (failpoint builds): the relay's connection without timeouts, as before
     * issue 16, so that only the supervisor's cancel ends a wait on a held lock. */
    if (CQRS_UNSAFE("RELAY_NO_PG_TIMEOUTS"))
        r->cfg.statement_timeout_ms = r->cfg.lock_timeout_ms = 0;
    char host[64] = "host", id[CQRS_UUID_LEN + 1];
    gethostname(host, sizeof host - 1);
    cqrs_uuid_v4(id);
    snprintf(r->owner, sizeof r->owner, "%s/%d/%.8s", host, (int)getpid(), id);
    atomic_store(&r->heartbeat, cqrs_monotonic_ms());
    return r;
}

static void beat(relay_worker_t *r)
{
    atomic_store(&r->heartbeat, cqrs_monotonic_ms());
}

static bool abandoned(relay_worker_t *r)
{
    return atomic_load(&r->state) == WORKER_ABANDONED;
}

/* Stores v in a shared flag unless the supervisor gave this worker up: its successor owns
 * the flags then. */
static void publish(relay_worker_t *r, atomic_bool *flag, bool v)
{
    pthread_mutex_lock(&r->sh->mu);
    if (!abandoned(r))
        atomic_store(flag, v);
    pthread_mutex_unlock(&r->sh->mu);
}

/* What this instance knows of Kafka: only the leader talks to it, so the flag is stored
 * while leading, and an outcome settled after the lease went is not news. */
static void publish_kafka(relay_worker_t *r, bool up)
{
    pthread_mutex_lock(&r->sh->mu);
    if (!abandoned(r) && r->leading) {
        atomic_store(&r->sh->kafka_up, up);
        atomic_store(&r->sh->kafka_known, true);
    }
    pthread_mutex_unlock(&r->sh->mu);
}

/* Leadership gone (or new): what it saw of Kafka and of the outbox is no longer this
 * instance's to report (a standby neither talks to Kafka nor counts the outbox). */
static void forget_leader_view(relay_worker_t *r)
{
    pthread_mutex_lock(&r->sh->mu);
    if (!abandoned(r)) {
        atomic_store(&r->sh->kafka_known, false);
        atomic_store(&r->sh->backlog, -1);
    }
    pthread_mutex_unlock(&r->sh->mu);
}

static void dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    (void)opaque;
    slot_t *s = m->_private;
    if (s) {
        s->result = m->err;
        s->partition = m->partition;
        s->offset = m->offset;
        s->done = true;
    }
}

static rd_kafka_t *producer_new(relay_worker_t *r, cqrs_error_t *err)
{
    char timeout[16], txn_timeout[16];
    snprintf(timeout, sizeof timeout, "%d", r->cfg.message_timeout_ms);
    snprintf(txn_timeout, sizeof txn_timeout, "%d",
             r->cfg.message_timeout_ms > 60000 ? r->cfg.message_timeout_ms : 60000);
    /* Transactions imply idempotence (acks=all, no reordering or duplicates from retries).
     * murmur2 so that Java clients sharing the topics pick the same partition for a key.
     * retry.backoff.ms: the first step of the exponential backoff (KIP-580, librdkafka >= 2.3;
     * capped by retry.backoff.max.ms, 1 s) of retried requests — produce after a leader
     * change, EndTxn — so a blip costs milliseconds, not 100 ms+. (AddPartitionsToTxn's
     * CONCURRENT_TRANSACTIONS between back-to-back transactions is not one of them: librdkafka
     * retries it after a fixed 20 ms.) An operator's Kafka properties may override the
     * tunables, never the guarantees: bus.c. */
    const char *const own[][2] = {
        {"transactional.id", r->txn_id},
        {"transaction.timeout.ms", txn_timeout},
        {"message.timeout.ms", timeout},
        {"linger.ms", "0"},
        {"retry.backoff.ms", "10"},
        {"partitioner", "murmur2_random"},
        {NULL, NULL},
    };
    rd_kafka_conf_t *conf = cqrs_bus_conf_new(r->brokers, r->client_id, own, err);
    if (!conf)
        return NULL;
    rd_kafka_conf_set_dr_msg_cb(conf, dr_cb);
    return cqrs_bus_client_new(RD_KAFKA_PRODUCER, conf, "producer", err);
}

static void drop_producer(relay_worker_t *r)
{
    if (r->rk) {
        /* An open transaction is aborted now (briefly: Kafka is usually there when it is
         * PostgreSQL that failed) rather than left to the transaction timeout or the next
         * leader's init_transactions: until then read_committed consumers stop at its first
         * message on every partition it wrote. It was never committed, so its rows stay in
         * the outbox either way. A transaction whose commit is under way refuses the abort. */
        if (r->txn_open) {
            rd_kafka_error_t *e = rd_kafka_abort_transaction(r->rk, 2000);
            if (e)
                rd_kafka_error_destroy(e);
            beat(r);
        }
        /* Anything unacknowledged stays in the outbox; the transaction is aborted by Kafka
         * (or by the next init_transactions). */
        rd_kafka_purge(r->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        rd_kafka_poll(r->rk, 0);
        rd_kafka_destroy(r->rk);
        r->rk = NULL;
        beat(r);
    }
    r->txn_ready = false;
    r->txn_open = false;
    r->undelivered = 0;
}

static void step_down(relay_worker_t *r, const char *why)
{
    /* What this leadership knew about its last batch goes with it: the record stays, and
     * whoever leads next settles it after init_transactions. */
    free(r->published_seqs);
    r->published_seqs = NULL;
    if (r->leading) {
        r->leading = false;
        publish(r, &r->sh->leader, false);
        forget_leader_view(r);
        if (!atomic_load(&r->stop))
            CQRS_LOG_WARN("outbox relay lost leadership", "reason", why);
    }
    drop_producer(r);
}

/* Makes (or remakes, after the supervisor used it) the cancel object of conn. */
static void arm_cancel(relay_worker_t *r)
{
    pthread_mutex_lock(&r->cancel_mu);
    if (!r->cancel && r->conn)
        r->cancel = PQgetCancel(r->conn);
    pthread_mutex_unlock(&r->cancel_mu);
}

/* Closes conn and the cancel object that belongs to it. */
static void close_pg(relay_worker_t *r)
{
    pthread_mutex_lock(&r->cancel_mu);
    PQfreeCancel(r->cancel);
    r->cancel = NULL;
    pthread_mutex_unlock(&r->cancel_mu);
    PQfinish(r->conn);
    r->conn = NULL;
}

static void drop_pg(relay_worker_t *r)
{
    close_pg(r);
    publish(r, &r->sh->pg_up, false);
    step_down(r, "PostgreSQL connection lost");
}

/* A statement that failed: logged, and the connection dropped when broken. A timeout
 * (lock_timeout, statement_timeout, or the supervisor's cancel) is expected while someone
 * holds a lock on the relay's tables: it is counted, logged at most every 10 s, and makes the
 * main loop pause before trying again. */
static void statement_failed(relay_worker_t *r, const PGresult *res, const char *what)
{
    cqrs_error_t err;
    cqrs__pg_error(r->conn, res, &err);
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    /* 55P03 lock_not_available, 57014 query_canceled */
    bool timeout = state && (strcmp(state, "55P03") == 0 || strcmp(state, "57014") == 0);
    if (timeout) {
        r->timed_out = true;
        atomic_fetch_add(&r->sh->pg_timeouts, 1);
        int64_t now = cqrs_monotonic_ms();
        if (now >= r->next_timeout_log) {
            char more[24];
            snprintf(more, sizeof more, "%llu", (unsigned long long)r->timeouts_unlogged);
            CQRS_LOG_WARN("relay statement timed out (a lock held on the relay's tables?);"
                          " retrying after a pause",
                          "statement", what, "error", err.message, "unlogged_since_last", more);
            r->next_timeout_log = now + 10000;
            r->timeouts_unlogged = 0;
        } else {
            r->timeouts_unlogged++;
        }
    } else {
        CQRS_LOG_WARN("relay statement failed", "statement", what, "error", err.message);
    }
    /* a broken connection, or one to a read-only server (a standby): the next one finds the
     * primary (target_session_attrs=read-write) */
    if (PQstatus(r->conn) != CONNECTION_OK || cqrs__pg_wrong_server(&err))
        drop_pg(r);
}

/* After a statement that succeeded: true (and the connection dropped, leadership with it)
 * when its commit's wait for the synchronous standby was cancelled — it exists on this
 * server only, which may be a primary whose standby was promoted: a batch recorded or deleted
 * there must not count (store.c, cqrs__pg_unreplicated_commit). */
static bool unreplicated(relay_worker_t *r, const char *what)
{
    if (!cqrs__pg_unreplicated_commit())
        return false;
    CQRS_LOG_WARN("relay statement committed on its PostgreSQL server only (the wait for the "
                  "synchronous standby was cancelled): not counted; reconnecting",
                  "statement", what);
    drop_pg(r);
    return true;
}

/* PQexecParams (or, p NULL, PQexec) with its answer awaited at most statement_timeout + 1 s,
 * then cancelled (store.c, cqrs__pg_exec_bounded): statement_timeout does not bound a commit's
 * wait for a synchronous standby, which never ends on a primary whose standby was promoted.
 * Once a cancel was sent the statement counts as failed whatever its answer, and the
 * connection is dropped (r->conn NULL on return; leadership goes with it). */
static PGresult *exec_bounded(relay_worker_t *r, const char *what, const char *sql, int n,
                              const char *const *p)
{
    bool drop;
    PGresult *res = cqrs__pg_exec_bounded(r->conn, sql, n, p, r->cfg.statement_timeout_ms, &drop);
    beat(r);
    if (drop) {
        ExecStatusType st = PQresultStatus(res);
        bool unreplicated = cqrs__pg_unreplicated_commit(); /* (said once, here) */
        /* Negative control (failpoint builds): trust a success, as a client without this
         * check would. */
        if ((st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) && !unreplicated &&
            CQRS_UNSAFE("TRUST_UNREPLICATED_COMMIT"))
            return res;
        CQRS_LOG_WARN("relay statement cancelled after its timeout (a commit waiting for a "
                      "synchronous standby?): not counted; reconnecting",
                      "statement", what);
        PQclear(res);
        drop_pg(r);
        return NULL;
    }
    return res;
}

/* Runs a statement; NULL when it failed (see statement_failed). */
static PGresult *exec_params(relay_worker_t *r, const char *what, const char *sql, int n,
                             const char *const *p)
{
    if (!r->conn)
        return NULL;
    PGresult *res = exec_bounded(r, what, sql, n, p);
    if (!r->conn)
        return NULL; /* given up (exec_bounded dropped the connection) */
    ExecStatusType st = PQresultStatus(res);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        statement_failed(r, res, what);
        PQclear(res);
        return NULL;
    }
    if (unreplicated(r, what)) {
        PQclear(res);
        return NULL;
    }
    return res;
}

/* A relay write: owner and epoch are $1 and $2 (every write checks them), then up to 4 more
 * parameters. */
static PGresult *exec_relay(relay_worker_t *r, const char *what, const char *sql, int n,
                            const char *const *extra)
{
    char epoch[24];
    snprintf(epoch, sizeof epoch, "%lld", (long long)r->epoch);
    const char *p[6] = {r->owner, epoch};
    for (int i = 0; i < n && i < 4; i++)
        p[2 + i] = extra[i];
    return exec_params(r, what, sql, 2 + n, p);
}

/* The lease was taken or renewed at now: renew after a fifth of it; our clock's view of its end
 * keeps a fifth as margin for the round trip. */
static void lease_granted(relay_worker_t *r, int64_t now)
{
    r->next_renew = now + r->cfg.lease_ms / 5;
    r->lease_until = now + r->cfg.lease_ms * 4 / 5;
}

/* Renews the lease when due. false when leadership is gone. */
static bool renew(relay_worker_t *r, bool force)
{
    if (!r->leading || !r->conn)
        return false;
    int64_t now = cqrs_monotonic_ms();
    if (!force && now < r->next_renew)
        return true;
    char lease[24];
    snprintf(lease, sizeof lease, "%d milliseconds", r->cfg.lease_ms);
    const char *x[] = {lease};
    /* An expired lease is not renewed: a takeover may be under way. clock_timestamp(), not
     * now(): a statement that waited on a lock must not count from when it started. */
    PGresult *res =
        exec_relay(r, "lease renewal",
                   "UPDATE relay_leader SET expires_at = clock_timestamp() + $3::interval"
                   " WHERE id = 1 AND owner = $1 AND epoch = $2"
                   " AND expires_at > clock_timestamp() RETURNING 1",
                   1, x);
    bool ok = res && PQntuples(res) == 1;
    bool refused = res && !ok; /* expired, or the row is someone else's now */
    PQclear(res);
    if (!ok) {
        if (!refused && cqrs_monotonic_ms() < r->lease_until && r->conn)
            return true; /* a hiccup (a timeout, say); the lease still runs */
        step_down(r, refused ? "lease expired or taken over" : "lease not renewed");
        return false;
    }
    lease_granted(r, now);
    return true;
}

/* Sleeps up to ms, renewing the lease meanwhile; wakes early on stop, and on NOTIFY when
 * notify_wakes (a pause after timeouts is not cut short by new work). */
static void wait_for_work(relay_worker_t *r, int ms, bool notify_wakes)
{
    /* Notifications that arrived while the last round ran were read by libpq along with
     * query results and wait in its queue: the socket will not signal them again. */
    if (r->conn && r->leading && notify_wakes) {
        bool queued = false;
        PGnotify *n;
        while ((n = PQnotifies(r->conn)) != NULL) {
            queued = true;
            PQfreemem(n);
        }
        if (queued)
            return;
    }
    int64_t until = cqrs_monotonic_ms() + ms;
    while (!atomic_load(&r->stop)) {
        beat(r);
        arm_cancel(r);
        int64_t left = until - cqrs_monotonic_ms();
        if (left <= 0)
            return;
        int slice = left > 100 ? 100 : (int)left;
        if (r->leading && !renew(r, false))
            return;
        if (r->conn) {
            struct pollfd pfd = {.fd = PQsocket(r->conn), .events = POLLIN};
            if (poll(&pfd, 1, slice) > 0) {
                if (!PQconsumeInput(r->conn)) {
                    drop_pg(r);
                    return;
                }
                bool woke = false;
                PGnotify *n;
                while ((n = PQnotifies(r->conn)) != NULL) {
                    woke = true;
                    PQfreemem(n);
                }
                if (woke && r->leading && notify_wakes)
                    return;
            }
        } else {
            usleep((useconds_t)slice * 1000);
        }
    }
}

/* Connects with the relay's timeouts, LISTENs, and prepares the cancel object. */
static bool connect_pg(relay_worker_t *r)
{
    if (r->conn)
        return true;
    cqrs_error_t err;
    r->conn = cqrs__pg_connect(r->dsn, RELAY_APP_NAME, RELAY_CONNECT_TIMEOUT_S, &err);
    beat(r);
    publish(r, &r->sh->pg_up, r->conn != NULL);
    if (!r->conn) {
        CQRS_LOG_WARN("outbox relay cannot reach PostgreSQL", "error", err.message);
        return false;
    }
    char sql[160];
    snprintf(sql, sizeof sql,
             "SET statement_timeout = %d; SET lock_timeout = %d; LISTEN " CQRS_OUTBOX_CHANNEL,
             r->cfg.statement_timeout_ms, r->cfg.lock_timeout_ms);
    PGresult *res = PQexec(r->conn, sql);
    bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
    if (!ok)
        statement_failed(r, res, "connection set-up");
    PQclear(res);
    if (!ok) {
        if (r->conn)
            drop_pg(r);
        return false;
    }
    arm_cancel(r);
    return true;
}

static bool try_lead(relay_worker_t *r)
{
    char lease[24];
    snprintf(lease, sizeof lease, "%d milliseconds", r->cfg.lease_ms);
    const char *p[] = {r->owner, lease};
    PGresult *res = exec_params(r, "election",
                                "UPDATE relay_leader SET owner = $1, epoch = epoch + 1,"
                                " since = now(), expires_at = clock_timestamp() + $2::interval"
                                " WHERE id = 1 AND expires_at < clock_timestamp() RETURNING epoch",
                                2, p);
    bool got = res && PQntuples(res) == 1;
    int64_t epoch = 0;
    if (got)
        cqrs_parse_int64(PQgetvalue(res, 0, 0), &epoch);
    PQclear(res);
    if (!got)
        return false;
    r->epoch = epoch;
    r->leading = true;
    r->next_stats = 0; /* the backlog gauges were cleared with the last leadership */
    pthread_mutex_lock(&r->sh->mu);
    if (!abandoned(r)) {
        atomic_store(&r->sh->epoch, epoch);
        atomic_store(&r->sh->leader, true);
        atomic_fetch_add(&r->sh->changes, 1);
        atomic_store(&r->sh->kafka_known, false);
    }
    pthread_mutex_unlock(&r->sh->mu);
    lease_granted(r, cqrs_monotonic_ms());
    /* recover() may only look at Kafka after this leadership's init_transactions, which a
     * fresh producer runs (see the DESIGN note). */
    drop_producer(r);
    r->need_recovery = true;
    r->check_first = true;
    char e[24];
    snprintf(e, sizeof e, "%lld", (long long)epoch);
    CQRS_LOG_INFO("outbox relay is the leader", "owner", r->owner, "epoch", e);
    return true;
}

/* Creates the producer and fences earlier leaders (init_transactions). */
static bool ready_producer(relay_worker_t *r)
{
    cqrs_error_t err;
    if (!r->rk) {
        r->rk = producer_new(r, &err);
        if (!r->rk) {
            CQRS_LOG_ERROR("outbox relay cannot create a producer", "error", err.message);
            return false;
        }
    }
    if (r->txn_ready)
        return true;
    /* Short, resumable waits so that the lease keeps being renewed. */
    rd_kafka_error_t *e = rd_kafka_init_transactions(r->rk, r->cfg.lease_ms / 3);
    beat(r);
    if (e) {
        CQRS_LOG_WARN("Kafka transactions not ready yet", "error", rd_kafka_error_string(e));
        bool fatal = rd_kafka_error_is_fatal(e);
        rd_kafka_error_destroy(e);
        publish_kafka(r, false);
        if (fatal)
            drop_producer(r);
        return false;
    }
    r->txn_ready = true;
    return true;
}

/* Header values are not NUL-terminated. */
static bool header_int(rd_kafka_headers_t *h, const char *name, int64_t *out)
{
    const void *v;
    size_t n;
    char buf[32];
    if (!h || rd_kafka_header_get_last(h, name, &v, &n) != 0 || n >= sizeof buf)
        return false;
    memcpy(buf, v, n);
    buf[n] = '\0';
    return cqrs_parse_int64(buf, out);
}

/* 1: the message at topic/partition/offset with ce_sequence seq is committed (visible to
 * read_committed); 0: it is not (aborted); -1: cannot tell now. */
static int committed_in_kafka(relay_worker_t *r, const char *topic, int32_t partition,
                              int64_t offset, int64_t seq)
{
    cqrs_error_t err;
    char group[160];
    snprintf(group, sizeof group, "%s-check", r->txn_id);
    const char *const own[][2] = {
        {"group.id", group},
        {"isolation.level", "read_committed"},
        {"enable.partition.eof", "true"},
        {"enable.auto.commit", "false"},
        {NULL, NULL},
    };
    rd_kafka_conf_t *conf = cqrs_bus_conf_new(r->brokers, "cqrs-relay-check", own, &err);
    rd_kafka_t *c = conf ? cqrs_bus_client_new(RD_KAFKA_CONSUMER, conf, "consumer", &err) : NULL;
    if (!c) {
        CQRS_LOG_WARN("cannot look the last batch up in Kafka", "error", err.message);
        return -1;
    }
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, topic, partition)->offset = offset;
    rd_kafka_assign(c, l);
    rd_kafka_topic_partition_list_destroy(l);
    int verdict = -1;
    int64_t short_end_since = 0; /* when the partition was first seen ending before it */
    int64_t until = cqrs_monotonic_ms() + 15000;
    while (verdict < 0 && cqrs_monotonic_ms() < until && !atomic_load(&r->stop)) {
        beat(r);
        renew(r, false);
        rd_kafka_message_t *m = rd_kafka_consumer_poll(c, 200);
        if (!m)
            continue;
        if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) {
            /* The end without the message: aborted — but only if that end lies beyond it. A
             * read_committed end (the last stable offset) beyond the check message means its
             * transaction was decided, and a committed one would have been delivered first.
             * An end at or before it says nothing yet: a partition leader elected a moment
             * ago (its broker died) can serve a high watermark still behind the messages it
             * holds, and taking that for an abort published a committed batch twice (fault
             * suite, kafka-controller-kill). Then keep polling (below). */
            if (m->offset > offset) {
                verdict = 0;
            } else if (!short_end_since) {
                short_end_since = cqrs_monotonic_ms();
                char end[24], chk[24];
                snprintf(end, sizeof end, "%lld", (long long)m->offset);
                snprintf(chk, sizeof chk, "%lld", (long long)offset);
                CQRS_LOG_WARN("last batch lookup: the partition ends before its check message "
                              "(a new partition leader?); looking again",
                              "topic", topic, "end", end, "check_offset", chk);
            }
        } else if (!m->err) {
            rd_kafka_headers_t *h = NULL;
            int64_t got = -1;
            rd_kafka_message_headers(m, &h);
            header_int(h, "ce_sequence", &got);
            verdict = (m->offset == offset && got == seq) ? 1 : 0;
        }
        rd_kafka_message_destroy(m);
    }
    /* Still ending before the check message 10 s later, with nothing delivered: no leader
     * lags that long (followers fetch every 500 ms); the log was cut below it (an unclean
     * leader election, a recreated topic), so the batch is not in Kafka: publish it again. */
    if (verdict < 0 && short_end_since && cqrs_monotonic_ms() - short_end_since >= 10000) {
        CQRS_LOG_WARN("last batch lookup: the partition still ends before its check message "
                      "after 10 s (truncated: an unclean leader election?); the batch is not in "
                      "Kafka",
                      "topic", topic);
        verdict = 0;
    }
    rd_kafka_consumer_close(c);
    rd_kafka_destroy(c);
    beat(r);
    return verdict;
}

/* After taking over: settle the batch the previous leader was committing, if any. Only after
 * this leadership's init_transactions (r->txn_ready): before it, the previous transaction's
 * markers may not be written yet and a committed batch would look aborted. */
static bool recover(relay_worker_t *r)
{
    if (!r->txn_ready)
        return false;
    /* Negative control of the fault suite (failpoint builds only): the record is dropped
     * without the Kafka lookup, so a batch committed in Kafka whose delete never happened (a
     * crash after the commit, a lost asynchronous delete) is published again. */
    if (CQRS_UNSAFE("RELAY_SKIP_RECOVERY")) {
        PQclear(exec_relay(r, "unsafe record drop",
                           "DELETE FROM relay_inflight WHERE id = 1 AND EXISTS (SELECT 1 FROM"
                           " relay_leader WHERE id = 1 AND owner = $1 AND epoch = $2 FOR SHARE)",
                           0, NULL));
        return true;
    }
    PGresult *res = exec_params(r, "in-flight batch read",
                                "SELECT sequences::text, check_topic, check_partition,"
                                " check_offset, check_sequence FROM relay_inflight WHERE id = 1",
                                0, NULL);
    if (!res)
        return false;
    if (PQntuples(res) == 0) {
        PQclear(res);
        return true;
    }
    int64_t part = 0, off = 0, seq = 0;
    cqrs_parse_int64(PQgetvalue(res, 0, 2), &part);
    cqrs_parse_int64(PQgetvalue(res, 0, 3), &off);
    cqrs_parse_int64(PQgetvalue(res, 0, 4), &seq);
    char *seqs = strdup(PQgetvalue(res, 0, 0));
    char *topic = strdup(PQgetvalue(res, 0, 1));
    PQclear(res);
    int verdict = committed_in_kafka(r, topic, (int32_t)part, off, seq);
    bool ok = verdict >= 0;
    if (verdict >= 0) {
        const char *x[] = {seqs, verdict == 1 ? "t" : "f"};
        res = exec_relay(r, "in-flight batch settlement",
                         "WITH ok AS (SELECT 1 FROM relay_leader"
                         "            WHERE id = 1 AND owner = $1 AND epoch = $2 FOR SHARE)"
                         ", i AS (DELETE FROM relay_inflight WHERE id = 1"
                         "        AND EXISTS (SELECT 1 FROM ok))"
                         "DELETE FROM outbox WHERE $4::boolean AND sequence = ANY($3::bigint[])"
                         " AND EXISTS (SELECT 1 FROM ok)",
                         2, x);
        ok = res != NULL;
        if (res && verdict == 1)
            atomic_fetch_add(&r->sh->recovered, (uint64_t)atoll(PQcmdTuples(res)));
        PQclear(res);
        if (ok)
            CQRS_LOG_INFO(verdict == 1 ? "the last recorded batch is in Kafka; its rows deleted"
                                       : "the last recorded batch was aborted; publishing it "
                                         "again",
                          "topic", topic);
    }
    free(seqs);
    free(topic);
    return ok;
}

/* The oldest batch_size outbox rows and their events. The outbox rows come first, from the
 * outbox's own index, and each event is then looked up by its key: a subquery that the planner
 * cannot flatten (OFFSET 0) makes it a nested loop of index lookups, so the read costs in
 * proportion to the batch whatever the size of the event log (kept forever). Left to itself,
 * the planner joined the two by walking events_pkey or by hashing all of events. */
static const char *const SELECT_BATCH =
    "SELECT o.sequence, o.topic, e.event_id, e.event_type, e.aggregate_type, e.aggregate_id,"
    "       e.version,"
    "       to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),"
    "       coalesce(e.traceparent, ''), e.data::text, extract(epoch FROM e.occurred_at)"
    "  FROM (SELECT sequence, topic FROM outbox ORDER BY sequence LIMIT $1) o"
    "  CROSS JOIN LATERAL (SELECT * FROM events WHERE events.sequence = o.sequence"
    "                      OFFSET 0) e"
    " ORDER BY o.sequence";

/* The rows of a batch committed in Kafka ($3) and its record, deleted if owner $1 and epoch
 * $2 still lead. FOR SHARE: a takeover cannot commit while the delete runs, and one that
 * committed meanwhile is seen (the row is re-checked at its newest version).
 * Committed asynchronously (synchronous_commit off for this transaction only: the setting in
 * force at commit decides): the round does not wait for its WAL flush nor for a synchronous
 * standby. A delete that is lost (a crash before the WAL reached the disk, a promoted standby
 * that never received it) leaves the record and the rows, and whoever leads next — after a
 * crash or failover the connection, and with it the leadership, is gone — settles the record
 * first (recover()): the batch is found in Kafka and its rows deleted, never published twice.
 * The next round's record is a synchronous commit, which flushes this one's WAL too. */
static const char *const DELETE_PUBLISHED =
    "WITH ok AS (SELECT 1 FROM relay_leader"
    "            WHERE id = 1 AND owner = $1 AND epoch = $2 FOR SHARE)"
    ", async AS (SELECT set_config('synchronous_commit', 'off', true))"
    ", i AS (DELETE FROM relay_inflight WHERE id = 1"
    "        AND EXISTS (SELECT 1 FROM ok))"
    "DELETE FROM outbox WHERE sequence = ANY($3::bigint[])"
    " AND EXISTS (SELECT 1 FROM ok) AND EXISTS (SELECT 1 FROM async)";

/* Whether the batch could be recorded and deleted now: NOWAIT on the table locks and on the
 * rows that the record and the delete take, all released at once (one implicit
 * transaction). A held lock costs this refused statement (55P03, counted as a timeout), not
 * a produced and aborted batch. */
static const char *const CHECK_WRITABLE =
    "LOCK TABLE relay_leader IN ROW SHARE MODE NOWAIT;"
    "LOCK TABLE relay_inflight, outbox IN ROW EXCLUSIVE MODE NOWAIT;"
    "SELECT 1 FROM relay_leader WHERE id = 1 FOR SHARE NOWAIT;"
    "SELECT 1 FROM relay_inflight WHERE id = 1 FOR NO KEY UPDATE NOWAIT";

static bool record_writable(relay_worker_t *r)
{
    if (!r->conn)
        return false;
    /* its row locks give it a commit to replicate */
    PGresult *res = exec_bounded(r, "batch record check", CHECK_WRITABLE, 0, NULL);
    if (!r->conn)
        return false;
    bool ok = PQresultStatus(res) == PGRES_TUPLES_OK;
    if (!ok)
        statement_failed(r, res, "batch record check");
    else if (unreplicated(r, "batch record check"))
        ok = false;
    PQclear(res);
    return ok;
}

/* Retries the delete of a batch committed in Kafka (r->published_seqs) that failed after the
 * commit: the commit succeeded, so nothing needs checking in Kafka. */
static bool delete_published(relay_worker_t *r)
{
    const char *d[] = {r->published_seqs};
    PGresult *res = exec_relay(r, "published rows delete (retry)", DELETE_PUBLISHED, 1, d);
    if (!res)
        return false; /* retried after a pause, unless the lease went with the connection */
    CQRS_LOG_INFO("published rows deleted on retry", "rows", PQcmdTuples(res));
    PQclear(res);
    free(r->published_seqs);
    r->published_seqs = NULL;
    return true;
}

/* Aborts the open transaction (if any) in resumable slices of lease/3, each after a renewal
 * when one is due, so that an abort after a timed-out record (which may have waited half the
 * lease) never outlives the lease unrenewed. A lease lost meanwhile drops the producer, which
 * aborts too; a producer that cannot abort within 10 s is dropped (init_transactions aborts
 * for it). */
static void abort_txn(relay_worker_t *r)
{
    if (!r->rk)
        return;
    atomic_fetch_add(&r->sh->aborted, 1);
    int64_t deadline = cqrs_monotonic_ms() + 10000;
    rd_kafka_error_t *e = NULL;
    for (;;) {
        if (r->leading)
            renew(r, false);
        if (!r->rk)
            return;
        e = rd_kafka_abort_transaction(r->rk, r->cfg.lease_ms / 3);
        beat(r);
        if (!e || !rd_kafka_error_is_retriable(e) || cqrs_monotonic_ms() >= deadline)
            break;
        rd_kafka_error_destroy(e);
    }
    if (!e)
        r->txn_open = false;
    if (e) {
        CQRS_LOG_WARN("abort_transaction failed; recreating the producer", "error",
                      rd_kafka_error_string(e));
        rd_kafka_error_destroy(e);
        drop_producer(r);
    }
}

#ifndef RELAY_UNDELIVERED_MAX /* a build may set it (-D): measuring batch_give_up's rule */
#define RELAY_UNDELIVERED_MAX 2
#endif

/* One batch on its way through a round (relay_round): read, check, produce, await, record,
 * commit, settle. */
typedef struct batch {
    PGresult *rows; /* the outbox rows and their events, until produced */
    int n;          /* rows read */
    slot_t *slots;  /* one per row: delivery report and timing */
    int produced;
    bool failed;       /* a produce or a delivery failed: the batch is aborted and retried */
    bool reports_due;  /* delivery reports still outstanding (they would land in slots) */
    bool timed_out;    /* a message not delivered in time (or purged with its transaction) */
    char *check_topic; /* the last row's topic: its message is the batch's check */
    char *seqs;        /* "{s1,s2,…}" of the produced rows */
    double read_at;    /* wall clock, seconds: when the rows were read */
    int64_t t0, t[RELAY_PHASES];
} batch_t;

static void batch_free(batch_t *b)
{
    PQclear(b->rows);
    free(b->slots);
    free(b->check_topic);
    free(b->seqs);
}

/* Marks the end of phase ph (its time since the previous mark goes to its histogram). */
static void phase_done(relay_worker_t *r, batch_t *b, int ph)
{
    int64_t now = cqrs_monotonic_us();
    int64_t from = b->t0;
    for (int i = ph - 1; i >= 0; i--)
        if (b->t[i]) {
            from = b->t[i];
            break;
        }
    b->t[ph] = now;
    cqrs_histogram_observe(&r->sh->phase[ph], (double)(now - from) / 1e6);
}

/* Negative control of the fault suite (CQRS_UNSAFE_RELAY_DELETE_FIRST=1, failpoint builds
 * only): the batch leaves the outbox before it is published — at most once — so a crash in
 * between loses it. */
static void unsafe_delete_first(relay_worker_t *r, batch_t *b)
{
    size_t cap = (size_t)b->n * 21 + 3, used = 0;
    char *arr = malloc(cap);
    if (!arr)
        return;
    arr[used++] = '{';
    for (int i = 0; i < b->n; i++)
        used += (size_t)snprintf(arr + used, cap - used, "%s%s", i ? "," : "",
                                 PQgetvalue(b->rows, i, 0));
    arr[used++] = '}';
    arr[used] = '\0';
    const char *d[] = {arr};
    PQclear(exec_relay(r, "unsafe delete",
                       "DELETE FROM outbox WHERE sequence = ANY($3::bigint[]) AND EXISTS"
                       " (SELECT 1 FROM relay_leader WHERE id = 1 AND owner = $1 AND epoch = $2"
                       "  FOR SHARE)",
                       1, d));
    free(arr);
}

/* Read: the oldest rows of the outbox. The rows read, -1 on failure. */
static int batch_read(relay_worker_t *r, batch_t *b)
{
    char limit[16];
    snprintf(limit, sizeof limit, "%d", r->cfg.batch_size);
    const char *p[] = {limit};
    b->rows = exec_params(r, "outbox read", SELECT_BATCH, 1, p);
    if (!b->rows)
        return -1;
    b->n = PQntuples(b->rows);
    if (b->n == 0)
        return 0;
    phase_done(r, b, PHASE_READ);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    b->read_at = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
    return b->n;
}

/* Produce: one Kafka transaction holding every row, in order. false when it could not even
 * begin (the producer is gone); a failed produce sets b->failed. */
static bool batch_produce(relay_worker_t *r, batch_t *b)
{
    rd_kafka_error_t *e = rd_kafka_begin_transaction(r->rk);
    if (e) {
        CQRS_LOG_WARN("begin_transaction failed", "error", rd_kafka_error_string(e));
        rd_kafka_error_destroy(e);
        drop_producer(r);
        return false;
    }
    r->txn_open = true;
    b->slots = calloc((size_t)b->n, sizeof *b->slots);
    b->failed = b->slots == NULL;
    PGresult *res = b->rows;
    const char *last_topic = NULL; /* in res */
    for (int i = 0; !b->failed && i < b->n && !atomic_load(&r->stop); i++) {
        cqrs_event_t ev;
        memset(&ev, 0, sizeof ev);
        cqrs_parse_int64(PQgetvalue(res, i, 0), &ev.sequence);
        const char *topic = PQgetvalue(res, i, 1);
        snprintf(ev.id, sizeof ev.id, "%s", PQgetvalue(res, i, 2));
        snprintf(ev.type, sizeof ev.type, "%s", PQgetvalue(res, i, 3));
        snprintf(ev.aggregate_type, sizeof ev.aggregate_type, "%s", PQgetvalue(res, i, 4));
        snprintf(ev.aggregate_id, sizeof ev.aggregate_id, "%s", PQgetvalue(res, i, 5));
        cqrs_parse_int64(PQgetvalue(res, i, 6), &ev.version);
        snprintf(ev.time, sizeof ev.time, "%s", PQgetvalue(res, i, 7));
        snprintf(ev.traceparent, sizeof ev.traceparent, "%s", PQgetvalue(res, i, 8));
        snprintf(ev.source, sizeof ev.source, "%s", r->source);
        const char *data = PQgetvalue(res, i, 9);
        size_t data_len = (size_t)PQgetlength(res, i, 9);
        b->slots[i].sequence = ev.sequence;
        b->slots[i].occurred_at = atof(PQgetvalue(res, i, 10));
        last_topic = topic;

        cqrs_event_headers_t h;
        cqrs_event_headers(&ev, &h);
        rd_kafka_headers_t *hdrs = rd_kafka_headers_new(h.n);
        for (size_t k = 0; k < h.n; k++)
            rd_kafka_header_add(hdrs, h.name[k], -1, h.value[k], -1);
        rd_kafka_resp_err_t kerr;
        for (;;) {
            kerr = rd_kafka_producev(
                r->rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(ev.aggregate_id, CQRS_UUID_LEN),
                RD_KAFKA_V_VALUE((void *)data, data_len), RD_KAFKA_V_HEADERS(hdrs),
                RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_OPAQUE(&b->slots[i]),
                RD_KAFKA_V_END);
            if (kerr != RD_KAFKA_RESP_ERR__QUEUE_FULL)
                break;
            /* Room comes as deliveries end (at the latest after message.timeout.ms). */
            rd_kafka_poll(r->rk, 100);
            beat(r);
            if (!renew(r, false))
                break;
        }
        if (kerr != RD_KAFKA_RESP_ERR_NO_ERROR) {
            rd_kafka_headers_destroy(hdrs); /* not taken over on failure */
            CQRS_LOG_WARN("produce failed", "event_id", ev.id, "error", rd_kafka_err2str(kerr));
            b->failed = true;
            break;
        }
        b->produced++;
    }
    /* The check message's topic: the last produced row's. */
    b->check_topic = last_topic ? strdup(last_topic) : NULL;
    PQclear(b->rows);
    b->rows = NULL;
    phase_done(r, b, PHASE_PRODUCE);
    return true;
}

/* Await: every delivery report, renewing the lease meanwhile (Kafka may be slow or down). */
static void batch_await(relay_worker_t *r, batch_t *b)
{
    int64_t deadline = cqrs_monotonic_ms() + r->cfg.message_timeout_ms + 5000;
    for (;;) {
        int pending = 0;
        for (int i = 0; i < b->produced; i++)
            pending += !b->slots[i].done;
        /* No producer: the lease went while waiting for room in its queue. */
        if (pending == 0 || !r->rk || cqrs_monotonic_ms() > deadline)
            break;
        rd_kafka_poll(r->rk, 50);
        beat(r);
        if (!renew(r, false))
            break;
    }
    phase_done(r, b, PHASE_ACK);
    if (b->produced > 0)
        CQRS_FAILPOINT("relay-after-delivery");
    for (int i = 0; i < b->produced; i++)
        if (!b->slots[i].done || b->slots[i].result != RD_KAFKA_RESP_ERR_NO_ERROR) {
            b->reports_due = b->reports_due || !b->slots[i].done;
            rd_kafka_resp_err_t res = b->slots[i].result;
            b->timed_out =
                b->timed_out || !b->slots[i].done || res == RD_KAFKA_RESP_ERR__MSG_TIMED_OUT ||
                res == RD_KAFKA_RESP_ERR__TIMED_OUT || res == RD_KAFKA_RESP_ERR__PURGE_QUEUE ||
                res == RD_KAFKA_RESP_ERR__PURGE_INFLIGHT;
            if (!b->failed)
                CQRS_LOG_WARN("event not delivered; the batch is aborted and retried", "error",
                              rd_kafka_err2str(b->slots[i].done ? b->slots[i].result
                                                                : RD_KAFKA_RESP_ERR__TIMED_OUT));
            b->failed = true;
        }
}

/* Gives up a batch that is not to be committed: its transaction aborted, or the producer
 * dropped when delivery reports are still due (they would land in freed slots; Kafka — or the
 * next init_transactions — aborts its transaction). */
static void batch_give_up(relay_worker_t *r, batch_t *b)
{
    atomic_fetch_add(&r->sh->failed, (uint64_t)(b->failed ? b->produced : 0));
    publish_kafka(r, !b->failed);
    /* A second batch in a row that timed out in Kafka replaces the producer too (a new
     * producer's count starts again), so that the next one starts again from the bootstrap
     * servers: librdkafka 2.14 decommissions a broker that a metadata response leaves out (a
     * KRaft broker fenced for a moment after a pause) and can then go on without a leader for
     * the partitions, every batch timing out, for minutes after Kafka is back (fault suite,
     * kafka-pause). A refusal (a message too large, an authorisation) is not counted: a new
     * producer would be refused the same. */
    r->undelivered = b->timed_out ? r->undelivered + 1 : 0;
    if (r->rk && (b->reports_due || r->undelivered >= RELAY_UNDELIVERED_MAX)) {
        if (!b->reports_due)
            CQRS_LOG_WARN("a second batch in a row timed out in Kafka; replacing the producer");
        atomic_fetch_add(&r->sh->aborted, 1);
        drop_producer(r);
    } else {
        abort_txn(r);
    }
}

/* Record: the batch in relay_inflight, with its last message as the check, before the
 * commit. true when recorded. */
static bool batch_record(relay_worker_t *r, batch_t *b)
{
    size_t cap = (size_t)b->produced * 21 + 3, used = 0;
    b->seqs = malloc(cap);
    if (!b->seqs) {
        abort_txn(r);
        return false;
    }
    b->seqs[used++] = '{';
    for (int i = 0; i < b->produced; i++)
        used += (size_t)snprintf(b->seqs + used, cap - used, "%s%lld", i ? "," : "",
                                 (long long)b->slots[i].sequence);
    b->seqs[used++] = '}';
    b->seqs[used] = '\0';
    slot_t *check = &b->slots[b->produced - 1];
    char part[12], off[24], seq[24];
    snprintf(part, sizeof part, "%d", check->partition);
    snprintf(off, sizeof off, "%lld", (long long)check->offset);
    snprintf(seq, sizeof seq, "%lld", (long long)check->sequence);
    /* The check message's topic is the last row's. */
    const char *x[] = {b->seqs, b->check_topic ? b->check_topic : "", part, off};
    /* Only where no record is: one still there is a batch not settled yet — its delete lost
     * (committed asynchronously, DELETE_PUBLISHED, then lost while this connection lived on: a
     * pooler or proxy keeping the socket across a failover) or its Kafka transaction aborted
     * — and writing over it could publish that batch's rows twice. It is settled first by the
     * Kafka lookup (recover()). Result: (leads, recorded). */
    bool overwrite = CQRS_UNSAFE("RELAY_RECORD_OVERWRITE"); /* the fault suite's control */
    char sql[900];
    snprintf(sql, sizeof sql,
             "WITH ok AS (SELECT 1 FROM relay_leader"
             "            WHERE id = 1 AND owner = $1 AND epoch = $2 FOR SHARE)"
             ", ins AS (INSERT INTO relay_inflight(id, epoch, sequences, check_topic,"
             " check_partition, check_offset, check_sequence)"
             " SELECT 1, $2, $3::bigint[], $4, $5, $6, %s FROM ok ON CONFLICT (id) %s"
             " RETURNING 1)"
             "SELECT (SELECT count(*) FROM ok), (SELECT count(*) FROM ins)",
             seq,
             overwrite ? "DO UPDATE SET epoch = EXCLUDED.epoch, sequences = EXCLUDED.sequences,"
                         " check_topic = EXCLUDED.check_topic,"
                         " check_partition = EXCLUDED.check_partition,"
                         " check_offset = EXCLUDED.check_offset,"
                         " check_sequence = EXCLUDED.check_sequence"
                       : "DO NOTHING");
    PGresult *ins = exec_relay(r, "batch record", sql, 4, x);
    bool answered = ins != NULL;
    bool leads = ins && PQntuples(ins) == 1 && strcmp(PQgetvalue(ins, 0, 0), "1") == 0;
    bool recorded = leads && strcmp(PQgetvalue(ins, 0, 1), "1") == 0;
    PQclear(ins);
    if (!recorded) {
        /* A failed statement (a lock timeout, say) is retried by the next round with the
         * lease kept, after a check that it could record; a refused one means the lease is
         * someone else's; a record in the way is settled first. */
        r->check_first = true;
        if (r->rk)
            abort_txn(r);
        if (answered && !leads) {
            step_down(r, "could not record the batch (lease lost)");
        } else if (leads) {
            CQRS_LOG_WARN("the last recorded batch is not settled (its delete lost?); settling "
                          "it first");
            r->need_recovery = true;
        }
        return false;
    }
    phase_done(r, b, PHASE_RECORD);
    return true;
}

/* Commit: the Kafka transaction. true when committed; otherwise the record stays for
 * whoever leads next (this leader too, after a new election). */
static bool batch_commit(relay_worker_t *r, batch_t *b)
{
    CQRS_FAILPOINT("relay-before-commit");
    /* Resumable: each wait of lease/3 comes after a renewal when one is due (the record may
     * have waited half the lease), and a timed-out commit is called again. */
    int64_t commit_deadline = cqrs_monotonic_ms() + r->cfg.message_timeout_ms;
    rd_kafka_error_t *e = NULL;
    for (;;) {
        if (!renew(r, false))
            break;
        e = rd_kafka_commit_transaction(r->rk, r->cfg.lease_ms / 3);
        beat(r);
        if (!e || !rd_kafka_error_is_retriable(e) || cqrs_monotonic_ms() >= commit_deadline)
            break;
        rd_kafka_error_destroy(e);
        e = NULL;
    }
    if (!r->leading) {
        /* The lease went (the producer with it) before the commit was settled: the record
         * stays for the next leader, which looks the batch up after init_transactions. */
        if (e)
            rd_kafka_error_destroy(e);
        return false;
    }
    if (e) {
        CQRS_LOG_WARN("commit_transaction failed", "error", rd_kafka_error_string(e));
        bool abortable = rd_kafka_error_txn_requires_abort(e);
        bool retriable = rd_kafka_error_is_retriable(e);
        rd_kafka_error_destroy(e);
        if (abortable) {
            abort_txn(r);
            r->need_recovery = true; /* its record stays: settled (aborted) before the next */
        } else
            step_down(r, retriable ? "commit_transaction still unsettled after "
                                     "CQRS_KAFKA_MESSAGE_TIMEOUT_MS (its transaction coordinator "
                                     "moving?)"
                                   : "fenced or fatal producer error");
        return false;
    }
    r->txn_open = false;
    r->undelivered = 0;
    phase_done(r, b, PHASE_COMMIT);
    CQRS_FAILPOINT("relay-after-commit");
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double now_s = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
    for (int i = 0; i < b->produced; i++) {
        cqrs_histogram_observe(&r->sh->latency, now_s - b->slots[i].occurred_at);
        /* how long it waited in the outbox, once per event published */
        cqrs_histogram_observe(&r->sh->pickup, b->read_at - b->slots[i].occurred_at);
    }
    atomic_fetch_add(&r->sh->published, (uint64_t)b->produced);
    publish_kafka(r, true);
    return true;
}

/* Settle: the published rows and the record deleted (asynchronous commit, DELETE_PUBLISHED);
 * a delete that fails is retried alone before the next round (see the DESIGN note). */
static void batch_settle(relay_worker_t *r, batch_t *b)
{
    const char *d[] = {b->seqs};
    PGresult *del = NULL;
    if (CQRS_FAILPOINT("relay-delete-lost")) {
        /* As an asynchronous delete acknowledged and then lost with a connection that lived
         * on: nothing deleted, and the leader goes on as if it had been. */
        phase_done(r, b, PHASE_DELETE);
        return;
    }
    if (CQRS_FAILPOINT("relay-delete-published"))
        r->timed_out = true; /* as a timed-out delete: pause, then retry */
    else
        del = exec_relay(r, "published rows delete", DELETE_PUBLISHED, 1, d);
    if (!del && r->leading) {
        CQRS_LOG_WARN("published rows not deleted yet; the delete is retried before the next "
                      "round");
        r->published_seqs = b->seqs;
        b->seqs = NULL;
    }
    PQclear(del);
    phase_done(r, b, PHASE_DELETE);
}

static void log_slow_round(const batch_t *b)
{
    if (b->t[PHASE_DELETE] - b->t0 <= 250000)
        return;
    char phases[200];
    size_t used = 0;
    int64_t from = b->t0;
    for (int i = 0; i < RELAY_PHASES; i++) {
        if (!b->t[i])
            continue;
        used +=
            (size_t)snprintf(phases + used, sizeof phases - used, "%s%s %lld ms", used ? ", " : "",
                             relay_phase_names[i], (long long)(b->t[i] - from) / 1000);
        from = b->t[i];
        if (used >= sizeof phases)
            break;
    }
    CQRS_LOG_WARN("slow relay round", "phases", phases);
}

/* Publishes one batch as one Kafka transaction; returns the rows read, -1 on failure. */
static int relay_round(relay_worker_t *r)
{
    batch_t b = {.t0 = cqrs_monotonic_us()};
    int n = batch_read(r, &b);
    if (n <= 0) {
        batch_free(&b);
        return n;
    }
    /* After a failed record (a lock held on the relay's tables, say) and at the start of a
     * leadership, the leader first checks with NOWAIT that it could record and delete the
     * batch, so that a held lock costs a refused check rather than a produced and aborted
     * batch; otherwise the round spares that synchronous commit. */
    if (r->check_first) {
        if (!record_writable(r)) {
            batch_free(&b);
            return -1;
        }
        r->check_first = false;
        phase_done(r, &b, PHASE_CHECK);
    }
    if (CQRS_UNSAFE("RELAY_DELETE_FIRST"))
        unsafe_delete_first(r, &b);
    CQRS_FAILPOINT("relay-after-read");
    if (!batch_produce(r, &b)) {
        batch_free(&b);
        return -1;
    }
    batch_await(r, &b);
    int rc = n;
    /* A worker the supervisor gave up (stuck until now) leaves the batch to its successor. */
    if (b.failed || b.produced == 0 || !r->leading || abandoned(r)) {
        batch_give_up(r, &b);
        rc = b.failed ? 0 : rc;
    } else if (!batch_record(r, &b)) {
        rc = -1;
    } else if (!batch_commit(r, &b)) {
        rc = 0;
    } else {
        batch_settle(r, &b);
        log_slow_round(&b);
    }
    batch_free(&b);
    return rc;
}

/* Sets the connection's statement_timeout (ms; 0: none). */
static bool set_statement_timeout(relay_worker_t *r, int ms)
{
    char sql[64];
    snprintf(sql, sizeof sql, "SET statement_timeout = %d", ms);
    PGresult *res = exec_params(r, "statement_timeout change", sql, 0, NULL);
    PQclear(res);
    return res != NULL;
}

#define HOUSEKEEPING_BATCH 500
#define HOUSEKEEPING_MAX_BATCHES 20

/* Expired Idempotency-Key rows, deleted by the leader in small batches so that no long
 * delete ever competes with commands, and so that the cleanup never costs the lease: each
 * batch runs right after a renewal check, under a statement_timeout of a quarter of the lease
 * (a renewal is due every fifth, and the lease is assumed gone after four fifths). */
static void housekeeping(relay_worker_t *r)
{
    int bound = r->cfg.lease_ms / 4;
    if (bound > r->cfg.statement_timeout_ms)
        bound = r->cfg.statement_timeout_ms;
    if (!set_statement_timeout(r, bound))
        return;
    for (int i = 0; i < HOUSEKEEPING_MAX_BATCHES && !atomic_load(&r->stop); i++) {
        beat(r);
        if (!renew(r, false))
            break;
        char limit[16];
        snprintf(limit, sizeof limit, "%d", HOUSEKEEPING_BATCH);
        const char *p[] = {limit};
        PGresult *res = exec_params(r, "idempotency key cleanup",
                                    "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY("
                                    "SELECT ctid FROM idempotency_keys WHERE expires_at < now()"
                                    " LIMIT $1::int))",
                                    1, p);
        if (!res)
            break;
        int n = atoi(PQcmdTuples(res));
        PQclear(res);
        if (n < HOUSEKEEPING_BATCH)
            break;
    }
    /* Never go on with the cleanup's timeout: reconnect if it cannot be restored. */
    if (r->conn && !set_statement_timeout(r, r->cfg.statement_timeout_ms) && r->conn)
        drop_pg(r);
}

/* The backlog gauges. Not a relay statement: a count(*) of a long backlog that outlasts the
 * statement_timeout is neither a lock timeout nor a reason to pause; it is skipped for a
 * while. Published only by the current worker while it leads, whether or not Kafka can be
 * reached: the lease is PostgreSQL's, and the gauges matter most while Kafka is away. */
static void refresh_stats(relay_worker_t *r)
{
    PGresult *res = PQexec(r->conn, "SELECT count(*), coalesce(extract(epoch FROM now() -"
                                    " min(created_at)), 0) FROM outbox");
    beat(r);
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1) {
        pthread_mutex_lock(&r->sh->mu);
        if (!abandoned(r) && r->leading) {
            atomic_store(&r->sh->backlog, atoll(PQgetvalue(res, 0, 0)));
            atomic_store(&r->sh->oldest_age_s, atof(PQgetvalue(res, 0, 1)));
        }
        pthread_mutex_unlock(&r->sh->mu);
    } else {
        CQRS_LOG_DEBUG("outbox statistics not refreshed", "error", PQerrorMessage(r->conn));
        r->next_stats = cqrs_monotonic_ms() + 30000;
        if (PQstatus(r->conn) != CONNECTION_OK)
            drop_pg(r);
    }
    PQclear(res);
}

/* One pass of the relay loop: connect, lead (or stand by), publish one batch. true when
 * there is more to do at once (a full batch went out, or leadership was just lost). */
static bool relay_step(relay_worker_t *r)
{
    if (atomic_load(&r->stop))
        return false;
    if (!connect_pg(r))
        return false;
    if (!r->leading && !try_lead(r))
        return false; /* stand by; the leader's lease is checked again at the next poll */
    if (!renew(r, false))
        return true;
    /* Before anything that needs Kafka (topics, producer, recovery), which fails or waits
     * while it is down. */
    int64_t now = cqrs_monotonic_ms();
    if (now >= r->next_stats && r->conn) {
        r->next_stats = now + 2000;
        refresh_stats(r);
    }
    /* A committed batch whose delete failed: nothing else until its rows are gone. */
    if (r->published_seqs && !delete_published(r))
        return false;
    if (!r->topics_ready && r->cfg.n_topics > 0) {
        cqrs_error_t err;
        cqrs_err_t rc = cqrs_bus_create_topics(r->brokers, r->cfg.topics, r->cfg.n_topics,
                                               r->cfg.topic_partitions, r->cfg.topic_replication,
                                               RELAY_CALL_MAX_MS, &err);
        beat(r);
        if (rc != CQRS_ERR_OK) {
            publish_kafka(r, false);
            CQRS_LOG_WARN("cannot ensure the topics yet", "error", err.message);
            return false;
        }
        r->topics_ready = true;
    }
    if (atomic_load(&r->stop) || !ready_producer(r))
        return false;
    if (r->need_recovery) {
        if (!recover(r))
            return false;
        r->need_recovery = false;
    }
    now = cqrs_monotonic_ms();
    if (now >= r->next_housekeeping) {
        housekeeping(r);
        r->next_housekeeping = now + 60000;
    }
    if (atomic_load(&r->stop))
        return false;
    if (!r->conn || !r->leading)
        return true;
    return relay_round(r) >= r->cfg.batch_size;
}

static void *relay_main(void *arg)
{
    relay_worker_t *r = arg;
    while (!atomic_load(&r->stop)) {
        beat(r);
        arm_cancel(r);
        bool more = relay_step(r);
        if (r->timed_out) {
            /* A lock held on the relay's tables: pause, twice as long each time in a row (up
             * to twice the lease, at most RELAY_BACKOFF_MAX_MS), renewing the lease meanwhile,
             * then try again. */
            r->timed_out = false;
            r->check_first = true;
            int cap = r->cfg.lease_ms > RELAY_BACKOFF_MAX_MS / 2 ? RELAY_BACKOFF_MAX_MS
                                                                 : r->cfg.lease_ms * 2;
            if (cap < r->cfg.poll_interval_ms)
                cap = r->cfg.poll_interval_ms;
            r->backoff_ms = r->backoff_ms ? r->backoff_ms * 2 : r->cfg.poll_interval_ms;
            if (r->backoff_ms > cap)
                r->backoff_ms = cap;
            wait_for_work(r, r->backoff_ms, false);
        } else {
            r->backoff_ms = 0;
            if (!more)
                wait_for_work(r, r->cfg.poll_interval_ms, true);
        }
    }
    if (r->rk && r->txn_ready)
        rd_kafka_flush(r->rk, 2000);
    drop_producer(r);
    if (r->conn && r->leading) {
        /* Hand over at once instead of making the others wait out the lease. */
        PGresult *res = exec_relay(r, "hand-over",
                                   "UPDATE relay_leader SET expires_at = '-infinity'"
                                   " WHERE id = 1 AND owner = $1 AND epoch = $2",
                                   0, NULL);
        PQclear(res);
    }
    if (r->leading) {
        r->leading = false;
        publish(r, &r->sh->leader, false);
        forget_leader_view(r);
    }
    close_pg(r);
    int running = WORKER_RUNNING;
    if (!atomic_compare_exchange_strong(&r->state, &running, WORKER_EXITED)) {
        CQRS_LOG_WARN("an abandoned relay worker returned; its connection and producer are "
                      "freed");
        worker_free(r); /* detached: nobody joins it */
    }
    return NULL;
}

/* ---- supervisor ---------------------------------------------------------------------- */

static bool worker_start(cqrs_relay_t *relay, cqrs_error_t *err)
{
    relay_worker_t *w = worker_new(&relay->cfg, relay->sh, err);
    if (!w)
        return false;
    if (pthread_create(&w->thread, NULL, relay_main, w) != 0) {
        worker_free(w);
        cqrs_error_set(err, CQRS_ERR_INTERNAL, "cannot start the relay thread");
        return false;
    }
    relay->current = w;
    relay->cancelled_beat = -1;
    return true;
}

typedef struct cancel_job {
    PGcancel *cancel;
    relay_shared_t *sh; /* a reference: the relay may be destroyed meanwhile */
} cancel_job_t;

static void *cancel_main(void *arg)
{
    cancel_job_t *job = arg;
    char errbuf[256];
    if (!PQcancel(job->cancel, errbuf, sizeof errbuf)) {
        errbuf[strcspn(errbuf, "\n")] = '\0';
        CQRS_LOG_WARN("cannot cancel the relay's statement", "error", errbuf);
    }
    PQfreeCancel(job->cancel);
    atomic_fetch_sub(&job->sh->cancels, 1);
    shared_unref(job->sh);
    free(job);
    return NULL;
}

/* Cancels the worker's running PostgreSQL statement, if any. The cancel object is taken, so
 * that the worker can neither free it meanwhile nor reuse it, and handed to a detached
 * thread: PQcancel connects without a timeout (before libpq 17), and the supervisor must
 * never wait on it. At most RELAY_CANCELS_MAX such threads run at once. */
static void cancel_statement(relay_worker_t *w)
{
    pthread_mutex_lock(&w->cancel_mu);
    PGcancel *c = w->cancel;
    w->cancel = NULL;
    pthread_mutex_unlock(&w->cancel_mu);
    if (!c)
        return;
    relay_shared_t *sh = w->sh;
    cancel_job_t *job = NULL;
    if (atomic_fetch_add(&sh->cancels, 1) >= RELAY_CANCELS_MAX) {
        CQRS_LOG_WARN("earlier cancels of the relay's statements have not returned; not sending "
                      "another one");
        goto fail;
    }
    job = malloc(sizeof *job);
    if (!job)
        goto fail;
    atomic_fetch_add(&sh->refs, 1);
    *job = (cancel_job_t){.cancel = c, .sh = sh};
    pthread_attr_t attr;
    pthread_t t;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&t, &attr, cancel_main, job);
    pthread_attr_destroy(&attr);
    if (rc == 0)
        return;
    CQRS_LOG_WARN("cannot start a thread to cancel the relay's statement");
    atomic_fetch_sub(&sh->refs, 1); /* the relay still holds its own */
    free(job);
fail:
    atomic_fetch_sub(&sh->cancels, 1);
    PQfreeCancel(c);
}

/* Gives the current worker up: a worker that exited meanwhile is joined and freed instead.
 * Once the CAS to ABANDONED succeeded the worker may return and free itself at any moment,
 * so nothing of it is touched afterwards: its thread id is copied first. */
static void abandon(cqrs_relay_t *relay)
{
    relay_worker_t *w = relay->current;
    pthread_t thread = w->thread;
    relay->current = NULL;
    atomic_store(&w->stop, true);
    pthread_mutex_lock(&relay->sh->mu);
    int running = WORKER_RUNNING;
    bool gave_up = atomic_compare_exchange_strong(&w->state, &running, WORKER_ABANDONED);
    if (gave_up)
        atomic_store(&relay->sh->leader, false);
    pthread_mutex_unlock(&relay->sh->mu);
    if (gave_up) {
        CQRS_FAILPOINT("relay-abandon-after-cas");
        pthread_detach(thread);
    } else {
        pthread_join(thread, NULL);
        worker_free(w);
    }
}

static void *supervisor_main(void *arg)
{
    cqrs_relay_t *relay = arg;
    int stall = relay->cfg.stall_ms;
    int grace = stall / 2 < 10000 ? stall / 2 : 10000;
    char ms[24];
    snprintf(ms, sizeof ms, "%d", stall);
    while (!atomic_load(&relay->stop)) {
        usleep(200 * 1000);
        relay_worker_t *w = relay->current;
        if (!w)
            continue;
        int64_t hb = atomic_load(&w->heartbeat), now = cqrs_monotonic_ms();
        if (now - hb < stall) {
            relay->cancelled_beat = -1;
            continue;
        }
        if (relay->cancelled_beat != hb) {
            /* Usually a statement waiting on something: cancelling it frees the worker. */
            CQRS_LOG_WARN("the outbox relay made no progress; cancelling its PostgreSQL "
                          "statement",
                          "stall_ms", ms);
            cancel_statement(w);
            relay->cancelled_beat = hb;
            relay->cancelled_at = cqrs_monotonic_ms();
            continue;
        }
        if (now - relay->cancelled_at < grace)
            continue;
        CQRS_LOG_ERROR("the outbox relay made no progress, even after a cancel (a Kafka or "
                       "PostgreSQL call does not return); abandoning it and starting a new one",
                       "stall_ms", ms);
        abandon(relay);
        atomic_fetch_add(&relay->sh->restarts, 1);
        cqrs_error_t err;
        if (!worker_start(relay, &err))
            CQRS_LOG_ERROR("cannot start a new relay worker", "error", err.message);
    }
    relay_worker_t *w = relay->current;
    if (w) {
        atomic_store(&w->stop, true);
        /* Bounded: a worker that does not finish in time is abandoned like a stuck one. */
        struct timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += 20;
        if (pthread_timedjoin_np(w->thread, NULL, &deadline) == 0) {
            worker_free(w);
            relay->current = NULL;
        } else {
            cancel_statement(w);
            abandon(relay);
        }
    }
    return NULL;
}

cqrs_relay_t *cqrs_relay_new(const cqrs_relay_config_t *cfg, cqrs_error_t *err)
{
    cqrs_relay_t *relay = calloc(1, sizeof *relay);
    relay_shared_t *sh = calloc(1, sizeof *sh);
    if (!relay || !sh) {
        free(relay);
        free(sh);
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    atomic_store(&sh->refs, 1);
    pthread_mutex_init(&sh->mu, NULL);
    atomic_store(&sh->backlog, -1);
    relay->sh = sh;
    /* The template worker owns the copied configuration that every worker copies again. */
    relay->tmpl = worker_new(cfg, sh, err);
    if (!relay->tmpl) {
        shared_unref(sh);
        free(relay);
        return NULL;
    }
    relay->cfg = relay->tmpl->cfg;
    relay->cfg.dsn = relay->tmpl->dsn;
    relay->cfg.brokers = relay->tmpl->brokers;
    relay->cfg.source = relay->tmpl->source;
    relay->cfg.client_id = relay->tmpl->client_id;
    relay->cfg.transactional_id = relay->tmpl->txn_id;
    return relay;
}

cqrs_err_t cqrs_relay_start(cqrs_relay_t *relay, cqrs_error_t *err)
{
    /* rd_kafka_new checks what no single property shows (max.in.flight above 5 or retries 0
     * with idempotence, transaction.timeout.ms below message.timeout.ms): at start-up, once. */
    rd_kafka_t *trial = producer_new(relay->tmpl, err);
    if (!trial)
        return err ? err->code : CQRS_ERR_CONFIG;
    rd_kafka_destroy(trial);
    atomic_store(&relay->stop, false);
    if (!worker_start(relay, err))
        return err ? err->code : CQRS_ERR_INTERNAL;
    if (pthread_create(&relay->supervisor, NULL, supervisor_main, relay) != 0) {
        relay_worker_t *w = relay->current;
        atomic_store(&w->stop, true);
        pthread_join(w->thread, NULL);
        worker_free(w);
        relay->current = NULL;
        return cqrs_error_set(err, CQRS_ERR_INTERNAL, "cannot start the relay supervisor");
    }
    relay->running = true;
    return CQRS_ERR_OK;
}

void cqrs_relay_stop(cqrs_relay_t *relay)
{
    if (!relay || !relay->running)
        return;
    atomic_store(&relay->stop, true);
    pthread_join(relay->supervisor, NULL);
    relay->running = false;
}

void cqrs_relay_stats(cqrs_relay_t *relay, cqrs_relay_stats_t *out)
{
    relay_shared_t *sh = relay->sh;
    out->leader = atomic_load(&sh->leader);
    out->kafka_up = atomic_load(&sh->kafka_up);
    out->kafka_known = atomic_load(&sh->kafka_known);
    out->pg_up = atomic_load(&sh->pg_up);
    out->epoch = atomic_load(&sh->epoch);
    out->published = atomic_load(&sh->published);
    out->failed = atomic_load(&sh->failed);
    out->aborted = atomic_load(&sh->aborted);
    out->leadership_changes = atomic_load(&sh->changes);
    out->recovered = atomic_load(&sh->recovered);
    out->restarts = atomic_load(&sh->restarts);
    out->pg_timeouts = atomic_load(&sh->pg_timeouts);
    out->backlog = atomic_load(&sh->backlog);
    out->oldest_age_s = atomic_load(&sh->oldest_age_s);
}

const struct cqrs_histogram *cqrs_relay_latency(cqrs_relay_t *relay)
{
    return &relay->sh->latency;
}

void cqrs_relay_metrics(cqrs_relay_t *relay, struct cqrs_text *t)
{
    cqrs_metric_histogram(t, "cqrs_relay_publish_latency_seconds",
                          "From an event's commit to Kafka's acknowledgement.",
                          &relay->sh->latency);
    cqrs_metric_histogram(t, "cqrs_relay_pickup_seconds",
                          "From an event's time (its command) to its read from the outbox by "
                          "the leading relay.",
                          &relay->sh->pickup);
    cqrs_text_printf(t, "# HELP cqrs_relay_round_phase_seconds Duration of each step of a relay "
                        "round (read, check, produce, ack, record, commit, delete).\n"
                        "# TYPE cqrs_relay_round_phase_seconds histogram\n");
    for (int i = 0; i < RELAY_PHASES; i++) {
        char labels[32];
        snprintf(labels, sizeof labels, "phase=\"%s\"", relay_phase_names[i]);
        cqrs_metric_histogram_samples(t, "cqrs_relay_round_phase_seconds", labels,
                                      &relay->sh->phase[i]);
    }
}

void cqrs_relay_destroy(cqrs_relay_t *relay)
{
    if (!relay)
        return;
    cqrs_relay_stop(relay);
    worker_free(relay->tmpl);
    shared_unref(relay->sh);
    free(relay);
}
