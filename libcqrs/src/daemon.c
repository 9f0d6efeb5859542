/* daemon.c — the boot every daemon shares (daemon.h lists its steps in order).
 *
 * Runs on the main thread, once per process. Signals are blocked before any thread starts, so
 * only the main thread's sigwait sees SIGTERM, SIGINT and SIGHUP. Readiness fails before the
 * listener closes (load balancers stop sending first); what holds connections open (def->drain)
 * ends before the listener drains; components stop after it, so no request finds them gone.
 */
#include "cqrs/daemon.h"

#include "cqrs/bus.h"
#include "cqrs/log.h"
#include "cqrs/version.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SHARED_N 12

typedef struct daemon {
    const cqrs_daemon_def_t *def;
    cqrs_config_entry_t *entries;
    size_t n_entries;
    atomic_bool draining;
    cqrs_http_server_t *http; /* set before the server starts: handlers only see it set */
    cqrs_http_route_t routes[CQRS_DAEMON_MAX_ROUTES];
} daemon_t;

static void shared_entries(cqrs_daemon_settings_t *s, const char *default_port,
                           cqrs_config_entry_t *out)
{
    const cqrs_config_entry_t e[SHARED_N] = {
        {"CQRS_HTTP_HOST", CQRS_CONFIG_STRING, "127.0.0.1", 0, 0,
         "IPv4 address the HTTP API binds (0.0.0.0 in containers)", &s->http_host, NULL},
        {"CQRS_HTTP_PORT", CQRS_CONFIG_INT, default_port, 0, 65535,
         "HTTP API port (0 picks a free port, logged at start-up)", &s->http_port, NULL},
        {"CQRS_HTTP_THREADS", CQRS_CONFIG_INT, "8", 1, 256, "HTTP worker threads", &s->http_threads,
         NULL},
        {"CQRS_HTTP_MAX_CONNECTIONS", CQRS_CONFIG_INT, "1024", 1, 65536,
         "open connections accepted at once", &s->http_max_connections, NULL},
        {"CQRS_HTTP_MAX_CONNECTIONS_PER_IP", CQRS_CONFIG_INT, "0", 0, 65536,
         "open connections per client address (0 = no limit)", &s->http_max_connections_per_ip,
         NULL},
        {"CQRS_HTTP_TIMEOUT_S", CQRS_CONFIG_INT, "30", 1, 3600, "idle connection timeout, seconds",
         &s->http_timeout_s, NULL},
        {"CQRS_MAX_BODY_BYTES", CQRS_CONFIG_INT, "1048576", 1024, 67108864,
         "largest request body accepted (413 above)", &s->max_body_bytes, NULL},
        {"CQRS_MAX_JSON_DEPTH", CQRS_CONFIG_INT, "32", 2, 1000,
         "deepest JSON nesting accepted (400 above)", &s->max_json_depth, NULL},
        {"CQRS_SHUTDOWN_GRACE_MS", CQRS_CONFIG_INT, "10000", 0, 600000,
         "how long SIGTERM waits for in-flight requests", &s->shutdown_grace_ms, NULL},
        {"CQRS_LOG_LEVEL", CQRS_CONFIG_ENUM, "info", 0, 0, "log level", &s->log_level,
         "debug|info|warn|error"},
        {"CQRS_AUTH_TOKENS_FILE", CQRS_CONFIG_STRING, "", 0, 0,
         "file of bearer tokens ('<name> <token> <scopes>' per line; reloaded on SIGHUP); empty:"
         " no tokens required",
         &s->auth_tokens_file, NULL},
        {"CQRS_SHUTDOWN_DELAY_MS", CQRS_CONFIG_INT, "0", 0, 60000,
         "on SIGTERM, how long /readyz fails before the listener closes (endpoint propagation)",
         &s->shutdown_delay_ms, NULL},
    };
    memcpy(out, e, sizeof e);
}

static void block_signals(sigset_t *set)
{
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(set);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, set, NULL);
}

/* Waits for SIGTERM or SIGINT and returns it; on each SIGHUP reloads auth (when not NULL). */
static int wait_signal(const sigset_t *set, cqrs_http_auth_t *auth)
{
    for (;;) {
        int sig = 0;
        if (sigwait(set, &sig) != 0)
            continue;
        if (sig != SIGHUP)
            return sig;
        if (!auth)
            continue;
        cqrs_error_t err;
        if (cqrs_http_auth_reload(auth, &err) == CQRS_ERR_OK) {
            char n[16];
            snprintf(n, sizeof n, "%zu", cqrs_http_auth_count(auth));
            CQRS_LOG_INFO("tokens reloaded", "tokens", n);
        } else {
            CQRS_LOG_ERROR("tokens not reloaded; the old ones stay", "error", err.message);
        }
    }
}

static void healthz(cqrs_http_request_t *req, void *ud)
{
    (void)ud;
    cqrs_http_reply_json(req, 200, json_pack("{s:s}", "status", "ok"));
}

static void readyz(cqrs_http_request_t *req, void *ud)
{
    daemon_t *d = ud;
    if (atomic_load(&d->draining)) {
        cqrs_http_reply_problem(req, 503, "not-ready", "Service Unavailable", "draining", NULL,
                                NULL);
        return;
    }
    d->def->ready(req, d->def->app);
}

static void metrics(cqrs_http_request_t *req, void *ud)
{
    daemon_t *d = ud;
    cqrs_text_t t = {0};
    if (d->http)
        cqrs_http_server_metrics(d->http, &t);
    cqrs_version_metrics(&t, d->def->program);
    cqrs_metrics_process(&t);
    d->def->metrics(d->def->app, &t);
    cqrs_http_reply_text(req, 200, "text/plain; version=0.0.4; charset=utf-8", t.buf ? t.buf : "");
    cqrs_text_free(&t);
}

static size_t build_routes(daemon_t *d, bool all)
{
    cqrs_http_route_t *r = d->routes;
    size_t n = d->def->routes(d->def->app, all, r, CQRS_DAEMON_MAX_ROUTES - 3);
    r[n++] = (cqrs_http_route_t){"GET", "/healthz", healthz, d, "Healthz", CQRS_SCOPE_NONE};
    r[n++] = (cqrs_http_route_t){"GET", "/readyz", readyz, d, "Readyz", CQRS_SCOPE_NONE};
    r[n++] = (cqrs_http_route_t){"GET", "/metrics", metrics, d, "Metrics", CQRS_SCOPE_METRICS};
    return n;
}

/* The command line: -1 to run the daemon, else the exit status. */
static int command_line(daemon_t *d, int argc, char **argv)
{
    const char *program = d->def->program;
    if (argc < 2)
        return -1;
    const char *arg = argv[1];
    if (argc == 2 && (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0)) {
        printf("%s — %s\n\nusage: %s [--help | --version | --routes]\n\n"
               "Configured by the environment:\n\n",
               program, d->def->summary, program);
        cqrs_config_print_help(d->entries, d->n_entries, stdout);
        cqrs_bus_print_help(stdout);
        return 0;
    }
    if (argc == 2 && strcmp(arg, "--version") == 0) {
        cqrs_version_print(stdout, program);
        return 0;
    }
    /* The route table, one "METHOD PATTERN" per line (the tests compare it with the OpenAPI
     * documents). */
    if (argc == 2 && strcmp(arg, "--routes") == 0) {
        size_t n = build_routes(d, true);
        for (size_t i = 0; i < n; i++)
            printf("%s %s\n", d->routes[i].method, d->routes[i].pattern);
        return 0;
    }
    if (argc > 2)
        fprintf(stderr, "%s: takes at most one option\n", program);
    else
        fprintf(stderr, "%s: unknown option '%s'\n", program, arg);
    fprintf(stderr, "usage: %s [--help | --version | --routes]\n", program);
    return 2;
}

/* Configuration and the checks that need no server; -1 when it is good, else 2. */
static int configure(daemon_t *d, const char *argv0)
{
    const cqrs_daemon_def_t *def = d->def;
    if (cqrs_config_load(d->entries, d->n_entries, NULL, NULL, stderr) != 0) {
        fprintf(stderr, "%s: bad configuration (see --help)\n", def->program);
        return 2;
    }
    int rc = 2;
    /* Every Kafka client reads the operator's librdkafka properties: a bad one is a
     * configuration error now, not at the first connection. */
    if (cqrs_bus_check_properties(stderr) != 0) {
        fprintf(stderr, "%s: bad Kafka client properties (see --help)\n", def->program);
        goto fail;
    }
    if (def->check && def->check(def->app, argv0) != 0)
        goto fail;
    return -1;
fail:
    cqrs_config_free(d->entries, d->n_entries);
    return rc;
}

/* From the components' start to their stop; the exit status. */
static int run(daemon_t *d, cqrs_http_auth_t *auth, const sigset_t *sigs)
{
    const cqrs_daemon_def_t *def = d->def;
    const cqrs_daemon_settings_t *s = def->shared;
    cqrs_error_t err;
    int rc = def->start(def->app);
    if (rc != 0)
        goto out;
    rc = 1;
    size_t n = build_routes(d, false);
    cqrs_http_config_t hc = {
        .host = s->http_host,
        .port = (uint16_t)s->http_port,
        .threads = (unsigned)s->http_threads,
        .connection_limit = (unsigned)s->http_max_connections,
        .per_ip_connection_limit = (unsigned)s->http_max_connections_per_ip,
        .connection_timeout_s = (unsigned)s->http_timeout_s,
        .max_body_bytes = (size_t)s->max_body_bytes,
        .drain_timeout_ms = (unsigned)s->shutdown_grace_ms,
        .auth = auth,
        .reads_elsewhere = def->reads_elsewhere,
    };
    d->http = cqrs_http_server_new(&hc, d->routes, n, &err);
    if (!d->http || cqrs_http_server_start(d->http, &err) != CQRS_ERR_OK) {
        CQRS_LOG_ERROR("cannot start the HTTP server", "error", err.message);
        goto out;
    }
    char port[8];
    snprintf(port, sizeof port, "%u", (unsigned)cqrs_http_server_port(d->http));
    if (def->listening_key)
        CQRS_LOG_INFO("listening", "host", s->http_host, "port", port, def->listening_key,
                      *def->listening_value);
    else
        CQRS_LOG_INFO("listening", "host", s->http_host, "port", port);

    int sig = wait_signal(sigs, auth);
    CQRS_LOG_INFO("shutting down", "signal", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    atomic_store(&d->draining, true);
    if (s->shutdown_delay_ms > 0)
        usleep((useconds_t)s->shutdown_delay_ms * 1000);
    rc = 0;
out:
    if (def->drain)
        def->drain(def->app);
    cqrs_http_server_destroy(d->http);
    def->stop(def->app);
    return rc;
}

int cqrs_daemon_main(const cqrs_daemon_def_t *def, int argc, char **argv)
{
    static daemon_t d;
    d.def = def;
    d.n_entries = SHARED_N + def->n_settings;
    d.entries = calloc(d.n_entries, sizeof *d.entries);
    if (!d.entries) {
        fprintf(stderr, "%s: out of memory\n", def->program);
        return 1;
    }
    shared_entries(def->shared, def->default_port, d.entries);
    memcpy(d.entries + SHARED_N, def->settings, def->n_settings * sizeof *d.entries);

    int rc = command_line(&d, argc, argv);
    if (rc < 0)
        rc = configure(&d, argv[0]);
    if (rc >= 0)
        goto out;

    cqrs_log_level_t level = CQRS_LOG_INFO;
    cqrs_log_level_parse(def->shared->log_level, &level);
    cqrs_log_init(def->program, level);

    /* Bad tokens are a configuration error: exit 2 before anything starts. */
    cqrs_http_auth_t *auth = NULL;
    if (def->shared->auth_tokens_file[0]) {
        cqrs_error_t aerr;
        auth = cqrs_http_auth_load(def->shared->auth_tokens_file, &aerr);
        if (!auth) {
            fprintf(stderr, "%s: CQRS_AUTH_TOKENS_FILE: %s\n", argv[0], aerr.message);
            cqrs_config_free(d.entries, d.n_entries);
            rc = 2;
            goto out;
        }
    }

    sigset_t sigs;
    block_signals(&sigs);
    rc = run(&d, auth, &sigs);
    cqrs_http_auth_destroy(auth);
    CQRS_LOG_INFO("stopped");
    cqrs_config_free(d.entries, d.n_entries);
out:
    free(d.entries);
    return rc;
}
