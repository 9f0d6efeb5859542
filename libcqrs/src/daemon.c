/* daemon.c — signals and the settings both daemons share. */
#include "cqrs/daemon.h"

#include "cqrs/bus.h"
#include "cqrs/log.h"
#include "cqrs/version.h"

#include <pthread.h>

#include <stdio.h>
#include <string.h>

void cqrs_daemon_block_signals(sigset_t *set)
{
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(set);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, set, NULL);
}

int cqrs_daemon_wait(const sigset_t *set, cqrs_http_auth_t *auth)
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

void cqrs_daemon_settings_entries(cqrs_daemon_settings_t *s, const char *default_port,
                                  cqrs_config_entry_t *out)
{
    const cqrs_config_entry_t e[CQRS_DAEMON_SETTINGS_N] = {
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

void cqrs_daemon_http_config(const cqrs_daemon_settings_t *s, cqrs_http_config_t *out)
{
    memset(out, 0, sizeof *out);
    out->host = s->http_host;
    out->port = (uint16_t)s->http_port;
    out->threads = (unsigned)s->http_threads;
    out->connection_limit = (unsigned)s->http_max_connections;
    out->per_ip_connection_limit = (unsigned)s->http_max_connections_per_ip;
    out->connection_timeout_s = (unsigned)s->http_timeout_s;
    out->max_body_bytes = (size_t)s->max_body_bytes;
    out->drain_timeout_ms = (unsigned)s->shutdown_grace_ms;
}

void cqrs_daemon_healthz(cqrs_http_request_t *req, void *ud)
{
    (void)ud;
    cqrs_http_reply_json(req, 200, json_pack("{s:s}", "status", "ok"));
}

int cqrs_daemon_cli(const cqrs_daemon_cli_t *cli, int argc, char **argv)
{
    if (argc < 2)
        return -1;
    const char *arg = argv[1];
    if (argc == 2 && (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0)) {
        printf("%s — %s\n\nusage: %s [--help | --version | --routes]\n\n"
               "Configured by the environment:\n\n",
               cli->program, cli->summary, cli->program);
        cqrs_config_print_help(cli->entries, cli->n_entries, stdout);
        cqrs_bus_print_help(stdout);
        return 0;
    }
    if (argc == 2 && strcmp(arg, "--version") == 0) {
        cqrs_version_print(stdout, cli->program);
        return 0;
    }
    if (argc == 2 && strcmp(arg, "--routes") == 0) {
        cli->print_routes();
        return 0;
    }
    if (argc > 2)
        fprintf(stderr, "%s: takes at most one option\n", cli->program);
    else
        fprintf(stderr, "%s: unknown option '%s'\n", cli->program, arg);
    fprintf(stderr, "usage: %s [--help | --version | --routes]\n", cli->program);
    return 2;
}

void cqrs_daemon_print_routes(const cqrs_http_route_t *routes, size_t n)
{
    for (size_t i = 0; i < n; i++)
        printf("%s %s\n", routes[i].method, routes[i].pattern);
}
