/* daemon.h — the boot every daemon shares: command line, configuration, log, tokens, signals,
 * the HTTP server with its probes and /metrics, readiness, drain and shutdown.
 *
 * A daemon describes what is its own in a cqrs_daemon_def_t (settings, checks, components,
 * routes, readiness, metrics) and hands it to cqrs_daemon_main, which runs, in order:
 *
 *   command line   no argument runs the daemon; --help (-h), --version, --routes print to
 *                  stdout and exit 0; anything else is a usage error on stderr (exit 2)
 *   configuration  the shared settings then the daemon's own; every bad value listed, exit 2;
 *                  librdkafka properties checked; def->check (exit 2 when it fails)
 *   log            JSON lines at CQRS_LOG_LEVEL, named def->program
 *   tokens         CQRS_AUTH_TOKENS_FILE loaded (a bad file: exit 2), reloaded on SIGHUP
 *   signals        SIGTERM, SIGINT, SIGHUP blocked in every thread, SIGPIPE ignored
 *   components     def->start (the relay, the projector, ...); its status on failure
 *   HTTP           the daemon's routes + GET /healthz, /readyz, /metrics; "listening" logged
 *   wait           until SIGTERM or SIGINT
 *   drain          /readyz fails, CQRS_SHUTDOWN_DELAY_MS passes, def->drain, the listener
 *                  drains in-flight requests (CQRS_SHUTDOWN_GRACE_MS), def->stop, exit 0.
 */
#ifndef CQRS_DAEMON_H
#define CQRS_DAEMON_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include "cqrs/config.h"
#include "cqrs/http.h"
#include "cqrs/metrics.h"

/* Settings every daemon has (HTTP server, logging, shutdown). */
typedef struct cqrs_daemon_settings {
    char *http_host;
    int64_t http_port;
    int64_t http_threads;
    int64_t http_max_connections;
    int64_t http_max_connections_per_ip;
    int64_t http_timeout_s;
    int64_t max_body_bytes;
    int64_t max_json_depth;
    int64_t shutdown_grace_ms;
    char *log_level;
    char *auth_tokens_file;
    int64_t shutdown_delay_ms;
} cqrs_daemon_settings_t;

/* Most routes a daemon has, the probes and /metrics included. */
#define CQRS_DAEMON_MAX_ROUTES 32

/* What is a daemon's own. Every hook gets app; all are borrowed for the life of the process. */
typedef struct cqrs_daemon_def {
    const char *program; /* "cqrs-commandd": log name, messages, --version */
    const char *summary; /* one line for --help: what the daemon is */
    const char *default_port;
    cqrs_daemon_settings_t *shared;      /* filled with the shared settings */
    const cqrs_config_entry_t *settings; /* the daemon's own, after the shared ones */
    size_t n_settings;
    void *app;

    /* Checks of loaded settings beyond their table (NULL: none): prints why to stderr and
     * returns non-zero to exit 2. argv0 as the process was called. */
    int (*check)(void *app, const char *argv0);
    /* Starts the components (stores, relay, projector...); logs and returns the exit status
     * (1, or 2 for a configuration error) when one cannot start, else 0. def->stop runs
     * either way. */
    int (*start)(void *app);
    /* The daemon's own routes into out[0..max), returned count. all: every route the daemon
     * can serve (--routes, before configuration), else those of this configuration. */
    size_t (*routes)(void *app, bool all, cqrs_http_route_t *out, size_t max);
    /* GET /readyz while not draining: replies 200 or 503. */
    cqrs_http_handler_fn ready;
    /* GET /metrics: appends the daemon's own metrics (the HTTP server's, build and process
     * metrics come first). */
    void (*metrics)(void *app, cqrs_text_t *out);
    /* After the shutdown delay, before the listener drains (NULL: nothing): ends what holds
     * connections open (long polls, streams). Also on a failed start. */
    void (*drain)(void *app);
    /* After the listener has drained: stops and frees the components, started or not. */
    void (*stop)(void *app);

    const char *reads_elsewhere; /* cqrs_http_config_t.reads_elsewhere (NULL: none) */
    /* An extra field of the "listening" line (NULL: none), e.g. "role"; its value is read
     * after configuration. */
    const char *listening_key;
    char *const *listening_value;
} cqrs_daemon_def_t;

/* Runs the daemon as above; returns the process's exit status. Once per process. */
int cqrs_daemon_main(const cqrs_daemon_def_t *def, int argc, char **argv);

#endif
