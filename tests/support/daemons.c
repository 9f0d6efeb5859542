/* daemons.c — see daemons.h. */
#include "daemons.h"

#include <arpa/inet.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <uuid/uuid.h>

#include "httpc.h"
#include "redisdb.h"
#include "testenv.h"

/* The local stack's ports: a server of the stack may be down right now (a fault) and so look
 * free. */
static bool stack_port(int p)
{
    static const char *const vars[] = {"CQRS_PG_PORT",
                                       "CQRS_PG_STANDBY_PORT",
                                       "CQRS_REDIS_PORT",
                                       "CQRS_REDIS_REPLICA_PORT",
                                       "CQRS_KAFKA_PORT",
                                       "CQRS_KAFKA_CONTROLLER_PORT",
                                       "CQRS_KAFKA_PORT_2",
                                       "CQRS_KAFKA_CONTROLLER_PORT_2",
                                       "CQRS_KAFKA_PORT_3",
                                       "CQRS_KAFKA_CONTROLLER_PORT_3",
                                       "CQRS_REDIS_CLUSTER_PORTS",
                                       "CQRS_REDIS_CLUSTER_BUS_PORTS"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        for (char *end; v && *v; v = end) {
            long q = strtol(v, &end, 10);
            if (end == v)
                break;
            if (q == p)
                return true;
        }
    }
    return false;
}

/* The policy of tests/support/ports.sh (shared with tests/support/ports.py). */
int free_port(void)
{
    static unsigned seed;
    if (!seed)
        seed = (unsigned)getpid() ^ (unsigned)time(NULL);
    for (;;) {
        int p = FREE_PORT_MIN + (int)(rand_r(&seed) % (FREE_PORT_MAX - FREE_PORT_MIN));
        if (stack_port(p))
            continue;
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            continue;
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)p)};
        inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
        int rc = bind(fd, (struct sockaddr *)&a, sizeof a);
        close(fd);
        if (rc == 0)
            return p;
    }
}

/* CQRS_TEST_REDIS_CLUSTER=1: the run's read model lives on the stack's Redis Cluster
 * (CQRS_REDIS_CLUSTER_URL, database 0) under a key prefix of its own (its topic prefix), which
 * keeps runs apart as the database number does on a single Redis. */
bool daemons_on_cluster(void)
{
    const char *v = getenv("CQRS_TEST_REDIS_CLUSTER");
    return v && strcmp(v, "1") == 0;
}

static pid_t spawn(const daemons_t *d, const char *path, int port, const char *log,
                   const char *role, const char *extra_env)
{
    pid_t pid = fork();
    if (pid == 0) {
        char p[16];
        snprintf(p, sizeof p, "%d", port);
        setenv("CQRS_HTTP_PORT", p, 1);
        if (role)
            setenv("CQRS_QUERY_ROLE", role, 1);
        setenv("CQRS_RELAY_LEASE_MS", "2000", 0);
        if (daemons_on_cluster()) {
            setenv("CQRS_REDIS_URL", testenv_require("CQRS_REDIS_CLUSTER_URL"), 1);
            setenv("CQRS_REDIS_PREFIX", d->prefix, 1);
        } else if (d->redis_db) {
            char url[1024];
            if (redisdb_url(getenv("CQRS_REDIS_URL"), d->redis_db, url, sizeof url) == 0)
                setenv("CQRS_REDIS_URL", url, 1);
        }
        /* extra_env: "NAME=value;NAME=value" */
        char *env = extra_env ? strdup(extra_env) : NULL, *save = NULL;
        for (char *kv = env ? strtok_r(env, ";", &save) : NULL; kv;
             kv = strtok_r(NULL, ";", &save)) {
            char *eq = strchr(kv, '=');
            if (eq) {
                *eq = '\0';
                setenv(kv, eq + 1, 1);
            }
        }
        setenv("CQRS_TOPIC_PREFIX", d->prefix, 1);
        setenv("CQRS_CONSUMER_GROUP", d->prefix, 1);
        setenv("CQRS_RELAY_POLL_MS", "200", 1);
        setenv("CQRS_HTTP_THREADS", "16", 0);
        setenv("CQRS_PG_POOL_SIZE", "16", 0);
        FILE *f = freopen(log, "a", stdout);
        (void)f;
        dup2(STDOUT_FILENO, STDERR_FILENO);
        execl(path, path, (char *)NULL);
        _exit(127);
    }
    return pid;
}

static int wait_ready(int port, int seconds)
{
    for (int i = 0; i < seconds * 10; i++) {
        httpc_response_t r;
        /* /readyz needs no token */
        int ok = httpc_request(port, "GET", "/readyz", NULL, NULL, 0, &r) == 0 && r.status == 200;
        httpc_response_free(&r);
        if (ok)
            return 0;
        usleep(100 * 1000);
    }
    return -1;
}

void daemons_dump_logs(const daemons_t *d)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "tail -n 40 %s/*.log >&2", d->logdir);
    int rc = system(cmd);
    (void)rc;
}

int daemons_migrate(const daemons_t *d, const char *name)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "CQRS_TOPIC_PREFIX=%s %s migrate > %s/%s.log 2>&1", d->prefix,
             CQRS_CTL, d->logdir, name);
    return system(cmd) == 0 ? 0 : -1;
}

int daemons_start(daemons_t *d)
{
    int db = d->redis_db;
    memset(d, 0, sizeof *d);
    d->redis_db = db;
    d->commandd = d->queryd = -1;
    uuid_t u;
    char id[37];
    uuid_generate_random(u);
    uuid_unparse_lower(u, id);
    snprintf(d->prefix, sizeof d->prefix, "e2e%.8s", id);
    snprintf(d->logdir, sizeof d->logdir, "/tmp/cqrs-e2e-XXXXXX");
    if (!mkdtemp(d->logdir))
        return -1;
    if (daemons_migrate(d, "migrate") != 0) {
        daemons_dump_logs(d);
        return -1;
    }
    if (d->redis_db && !daemons_on_cluster()) { /* on a cluster: a fresh key prefix */
        char url[1024];
        if (redisdb_url(getenv("CQRS_REDIS_URL"), d->redis_db, url, sizeof url) != 0)
            return -1;
        freeReplyObject(redisdb_cmd(url, "FLUSHDB", NULL));
    }
    d->cport = free_port();
    d->qport = free_port();
    char log[128];
    snprintf(log, sizeof log, "%s/commandd.log", d->logdir);
    d->commandd = spawn(d, CQRS_COMMANDD, d->cport, log, NULL, NULL);
    snprintf(log, sizeof log, "%s/queryd.log", d->logdir);
    d->queryd = spawn(d, CQRS_QUERYD, d->qport, log, NULL, NULL);
    if (wait_ready(d->cport, 60) != 0 || wait_ready(d->qport, 60) != 0) {
        daemons_dump_logs(d);
        return -1;
    }
    return 0;
}

int daemons_stop_one(pid_t *pid)
{
    if (*pid <= 0)
        return -1;
    kill(*pid, SIGTERM);
    int rc = -2;
    for (int i = 0; i < 300; i++) {
        int st;
        if (waitpid(*pid, &st, WNOHANG) == *pid) {
            rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            break;
        }
        usleep(100 * 1000);
    }
    if (rc == -2) {
        kill(*pid, SIGKILL);
        waitpid(*pid, NULL, 0);
    }
    *pid = -1;
    return rc;
}

void daemons_stop(daemons_t *d)
{
    daemons_stop_one(&d->commandd);
    daemons_stop_one(&d->queryd);
}

long long pg_count(const char *sql, const char *param)
{
    PGconn *c = PQconnectdb(getenv("CQRS_PG_DSN"));
    const char *p[] = {param};
    PGresult *r = PQexecParams(c, sql, param ? 1 : 0, NULL, p, NULL, NULL, 0);
    long long n =
        PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) > 0 ? atoll(PQgetvalue(r, 0, 0)) : -1;
    PQclear(r);
    PQfinish(c);
    return n;
}

char *pg_text(const char *sql, const char *param)
{
    PGconn *c = PQconnectdb(getenv("CQRS_PG_DSN"));
    const char *p[] = {param};
    PGresult *r = PQexecParams(c, sql, param ? 1 : 0, NULL, p, NULL, NULL, 0);
    char *s = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) > 0 ? strdup(PQgetvalue(r, 0, 0))
                                                                       : NULL;
    PQclear(r);
    PQfinish(c);
    return s;
}

pid_t daemons_spawn_queryd(const daemons_t *d, int port, const char *role, const char *name)
{
    return daemons_spawn_queryd_env(d, port, role, NULL, name);
}

pid_t daemons_spawn_queryd_env(const daemons_t *d, int port, const char *role,
                               const char *extra_env, const char *name)
{
    pid_t pid = daemons_launch_queryd(d, port, role, extra_env, name);
    if (wait_ready(port, 60) != 0) {
        daemons_dump_logs(d);
        daemons_stop_one(&pid);
        return -1;
    }
    return pid;
}

pid_t daemons_launch_queryd(const daemons_t *d, int port, const char *role, const char *extra_env,
                            const char *name)
{
    char log[128];
    snprintf(log, sizeof log, "%s/%s.log", d->logdir, name);
    return spawn(d, CQRS_QUERYD, port, log, role, extra_env);
}

pid_t daemons_launch_commandd(const daemons_t *d, int port, const char *extra_env, const char *name)
{
    char log[128];
    snprintf(log, sizeof log, "%s/%s.log", d->logdir, name);
    return spawn(d, CQRS_COMMANDD, port, log, NULL, extra_env);
}

pid_t daemons_spawn_commandd(const daemons_t *d, int port, const char *extra_env, const char *name)
{
    pid_t pid = daemons_launch_commandd(d, port, extra_env, name);
    if (wait_ready(port, 60) != 0) {
        daemons_dump_logs(d);
        daemons_stop_one(&pid); /* never left running behind the caller's back */
        return -1;
    }
    return pid;
}

static char metrics_auth[256];

int daemons_start_auth(daemons_t *d, const char *auth_header)
{
    snprintf(metrics_auth, sizeof metrics_auth, "%s", auth_header ? auth_header : "");
    return daemons_start(d);
}

long long daemons_metric(int port, const char *name)
{
    httpc_response_t r;
    if (httpc_request(port, "GET", "/metrics", metrics_auth[0] ? metrics_auth : NULL, NULL, 0,
                      &r) != 0 ||
        r.status != 200) {
        httpc_response_free(&r);
        return -1;
    }
    long long v = -1;
    size_t len = strlen(name);
    for (char *line = r.body; line && *line;) {
        if (strncmp(line, name, len) == 0 && line[len] == ' ') {
            v = atoll(line + len + 1);
            break;
        }
        char *nl = strchr(line, '\n');
        line = nl ? nl + 1 : NULL;
    }
    httpc_response_free(&r);
    return v;
}

void testdb_create(testdb_t *db, const char *prefix)
{
    const char *base = getenv("CQRS_PG_DSN");
    snprintf(db->base_dsn, sizeof db->base_dsn, "%s", base ? base : "");
    uuid_t u;
    char id[37];
    uuid_generate_random(u);
    uuid_unparse_lower(u, id);
    snprintf(db->name, sizeof db->name, "%.20s_%.8s", prefix, id);
    char sql[128];
    snprintf(sql, sizeof sql, "CREATE DATABASE %s", db->name);
    pg_count(sql, NULL); /* no rows: -1, fine */
    snprintf(db->dsn, sizeof db->dsn, "%s dbname=%s", db->base_dsn, db->name);
    setenv("CQRS_PG_DSN", db->dsn, 1);
}

void testdb_drop(testdb_t *db)
{
    if (!db->name[0])
        return;
    setenv("CQRS_PG_DSN", db->base_dsn, 1);
    char sql[128];
    snprintf(sql, sizeof sql, "DROP DATABASE IF EXISTS %s", db->name);
    pg_count(sql, NULL);
}

int daemons_ctl(const char *dsn, const char *redis_url, const char *prefix, json_t **out,
                const char *fmt, ...)
{
    char args[512], cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(cmd, sizeof cmd,
             "CQRS_PG_DSN='%s' CQRS_REDIS_URL='%s' CQRS_TOPIC_PREFIX='%s' %s %s 2>/dev/null", dsn,
             redis_url, prefix, CQRS_CTL, args);
    FILE *p = popen(cmd, "r");
    if (!p)
        return -1;
    static char buf[1 << 18];
    size_t n = fread(buf, 1, sizeof buf - 1, p);
    buf[n] = '\0';
    int st = pclose(p);
    if (out)
        *out = json_loads(buf, 0, NULL);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}
