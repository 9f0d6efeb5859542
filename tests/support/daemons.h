/* daemons.h — starting the real daemons for e2e tests.
 *
 * daemons_start() migrates (with a fresh topic prefix, so runs never see each other's
 * events), starts cqrs-commandd and cqrs-queryd on free ports with their logs in a temporary
 * folder, and waits until both are ready. Needs CQRS_PG_DSN, CQRS_KAFKA_BROKERS and
 * CQRS_REDIS_URL (testenv_require). */
#ifndef CQRS_TEST_DAEMONS_H
#define CQRS_TEST_DAEMONS_H

#include <stdbool.h>
#include <sys/types.h>

typedef struct daemons {
    int redis_db; /* set before daemons_start: the Redis database of this run (0 default) */
    int cport, qport;
    pid_t commandd, queryd;
    char prefix[32];
    char logdir[64];
} daemons_t;

/* True when CQRS_TEST_REDIS_CLUSTER=1: the daemons' read model is on the stack's Redis Cluster
 * (CQRS_REDIS_CLUSTER_URL) under the run's own key prefix (CQRS_REDIS_PREFIX = the topic
 * prefix) instead of a database of the single Redis. */
bool daemons_on_cluster(void);

/* 0 on success; on failure prints the logs and returns -1. A run with redis_db ≠ 0 starts
 * from an empty Redis database (FLUSHDB) of its own. */
int daemons_start(daemons_t *d);
/* cqrsctl migrate for d's topic prefix (and the stack's database), logging to
 * <logdir>/<name>.log; 0 on success. */
int daemons_migrate(const daemons_t *d, const char *name);

/* daemons_start, remembering an Authorization header line ("Authorization: Bearer …\r\n")
 * for daemons_metric when tokens are configured (CQRS_AUTH_TOKENS_FILE in the environment). */
int daemons_start_auth(daemons_t *d, const char *auth_header);

/* SIGTERM, wait up to 30 s; returns the exit status, 128+signal, or -2 when it had to be
 * killed. */
int daemons_stop_one(pid_t *pid);
void daemons_stop(daemons_t *d);
void daemons_dump_logs(const daemons_t *d);

/* Starts another cqrs-queryd of the same run (same topics and consumer group) on port, with
 * CQRS_QUERY_ROLE=role (NULL: default), logging to <logdir>/<name>.log; waits until ready.
 * Returns its pid, -1 on failure. */
pid_t daemons_spawn_queryd(const daemons_t *d, int port, const char *role, const char *name);
/* The same with extra environment ("NAME=value;NAME=value", may be NULL). */
pid_t daemons_spawn_queryd_env(const daemons_t *d, int port, const char *role,
                               const char *extra_env, const char *name);

/* The same without waiting for readiness (an instance expected to be not ready at first); the
 * caller stops it with daemons_stop_one. */
pid_t daemons_launch_queryd(const daemons_t *d, int port, const char *role, const char *extra_env,
                            const char *name);

/* Starts another cqrs-commandd of the same run on port with extra environment
 * ("NAME=value;NAME=value", may be NULL), logging to <logdir>/<name>.log; waits until ready.
 * Returns its pid; -1 when it did not become ready (it is stopped then). */
pid_t daemons_spawn_commandd(const daemons_t *d, int port, const char *extra_env, const char *name);

/* The same without waiting for readiness (a daemon expected to stay not ready); the caller
 * stops it with daemons_stop_one. */
pid_t daemons_launch_commandd(const daemons_t *d, int port, const char *extra_env,
                              const char *name);

/* A sample of /metrics on port (integer part), -1 when absent or unreachable. */
long long daemons_metric(int port, const char *name);

/* Runs cqrsctl of this build with dsn, redis_url and the topic prefix as its settings and the
 * arguments fmt makes; returns its exit status, and with out its stdout as JSON (NULL when it
 * is not JSON; the caller decrefs). stderr is dropped. */
struct json_t;
int daemons_ctl(const char *dsn, const char *redis_url, const char *prefix, struct json_t **out,
                const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* A single number from SQL on CQRS_PG_DSN ($1 = param, may be NULL); -1 on error. */
long long pg_count(const char *sql, const char *param);

/* The first value of a SQL query as a malloc'ed string (caller frees); NULL on error. */
char *pg_text(const char *sql, const char *param);

/* A PostgreSQL database of a test's own on the stack's server (named <prefix>_<random>):
 * create points CQRS_PG_DSN at it (daemons started afterwards use it) and fills dsn; drop
 * restores CQRS_PG_DSN and drops the database. */
typedef struct testdb {
    char base_dsn[512];
    char dsn[640];
    char name[40];
} testdb_t;
void testdb_create(testdb_t *db, const char *prefix);
void testdb_drop(testdb_t *db);

/* A free TCP port on 127.0.0.1, by the one policy of the test suite (tests/support/ports.sh):
 * a random port in [FREE_PORT_MIN, FREE_PORT_MAX), below Linux's ephemeral range (32768+), not
 * one of the local stack's (CQRS_*_PORT), that binds now. */
#define FREE_PORT_MIN 20000
#define FREE_PORT_MAX 32000
int free_port(void);

#endif
