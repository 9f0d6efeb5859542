/* daemon.h — process plumbing shared by both daemons: signals and the common settings. */
#ifndef CQRS_DAEMON_H
#define CQRS_DAEMON_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include "cqrs/config.h"
#include "cqrs/http.h"

/* Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (call before starting threads,
 * which inherit the mask) and ignores SIGPIPE. */
void cqrs_daemon_block_signals(sigset_t *set);

/* Waits for SIGTERM or SIGINT and returns it; on each SIGHUP reloads auth (when not NULL). */
int cqrs_daemon_wait(const sigset_t *set, cqrs_http_auth_t *auth);

/* Settings both daemons share (HTTP server, logging, shutdown). */
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

#define CQRS_DAEMON_SETTINGS_N 12

/* Writes the shared entries (pointing into s) into out[0..CQRS_DAEMON_SETTINGS_N). */
void cqrs_daemon_settings_entries(cqrs_daemon_settings_t *s, const char *default_port,
                                  cqrs_config_entry_t *out);

/* GET /healthz of every daemon: 200 {"status":"ok"} while the process runs. */
void cqrs_daemon_healthz(cqrs_http_request_t *req, void *ud);

/* --routes: the route table, one "METHOD PATTERN" per line (the tests compare it with the
 * OpenAPI documents). */
void cqrs_daemon_print_routes(const cqrs_http_route_t *routes, size_t n);

/* The command line every daemon takes. No argument runs the daemon (configured by its
 * environment); --help (-h), --version and --routes print to stdout and exit 0; anything else,
 * or more than one argument, is a usage error on stderr (exit 2). Returns -1 to run the daemon,
 * else the exit status. */
typedef struct cqrs_daemon_cli {
    const char *program; /* "cqrs-commandd" */
    const char *summary; /* one line: what the daemon is */
    const cqrs_config_entry_t *entries;
    size_t n_entries;
    void (*print_routes)(void);
} cqrs_daemon_cli_t;

int cqrs_daemon_cli(const cqrs_daemon_cli_t *cli, int argc, char **argv);

/* HTTP server config from the shared settings. */
void cqrs_daemon_http_config(const cqrs_daemon_settings_t *s, cqrs_http_config_t *out);

#endif
