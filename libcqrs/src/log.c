/* log.c — JSON lines on stdout.
 *
 * Invariant: one line per call, written with a single write(2) so lines of concurrent threads
 * never interleave (stdout is a pipe or file; writes up to PIPE_BUF are atomic on pipes, and
 * lines are capped at 8 KiB). Registered secrets are replaced in the message and every field
 * value before anything is formatted, under one mutex that only lines with a secret registered
 * take.
 */
#include "cqrs/log.h"

#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "cqrs/util.h"

static char g_service[64] = "cqrs";
static cqrs_log_level_t g_min = CQRS_LOG_INFO;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

static pthread_mutex_t g_secrets_mu = PTHREAD_MUTEX_INITIALIZER;
static char *g_secrets[CQRS_LOG_SECRETS_MAX];
static size_t g_next_secret;
static atomic_bool g_have_secrets;

void cqrs_log_add_secret(const char *value)
{
    if (!value || !*value)
        return;
    pthread_mutex_lock(&g_secrets_mu);
    bool known = false;
    for (size_t i = 0; i < CQRS_LOG_SECRETS_MAX && !known; i++)
        known = g_secrets[i] && strcmp(g_secrets[i], value) == 0;
    char *copy = known ? NULL : strdup(value);
    if (copy) {
        /* A ring: the oldest value goes first. */
        size_t i = g_next_secret++ % CQRS_LOG_SECRETS_MAX;
        free(g_secrets[i]);
        g_secrets[i] = copy;
        atomic_store(&g_have_secrets, true);
    }
    pthread_mutex_unlock(&g_secrets_mu);
}

/* s with every registered secret replaced, in buf (size bytes), or s itself when it holds
 * none. */
static const char *scrub(const char *s, char *buf, size_t size)
{
    if (!s || !atomic_load(&g_have_secrets))
        return s;
    static const char mark[] = "[redacted]";
    bool changed = false;
    size_t o = 0;
    pthread_mutex_lock(&g_secrets_mu);
    const char *p = s;
    while (*p && o + 1 < size) {
        size_t hit = 0;
        for (size_t i = 0; i < CQRS_LOG_SECRETS_MAX && !hit; i++) {
            size_t len = g_secrets[i] ? strlen(g_secrets[i]) : 0;
            if (len && strncmp(p, g_secrets[i], len) == 0)
                hit = len;
        }
        if (hit) {
            for (size_t k = 0; mark[k] && o + 1 < size; k++)
                buf[o++] = mark[k];
            p += hit;
            changed = true;
        } else {
            buf[o++] = *p++;
        }
    }
    /* Cut short: the rest (a secret in it too, maybe) is dropped, never passed on as is. */
    if (*p)
        changed = true;
    pthread_mutex_unlock(&g_secrets_mu);
    buf[o] = '\0';
    return changed ? buf : s;
}

void cqrs_log_init(const char *service, cqrs_log_level_t min_level)
{
    snprintf(g_service, sizeof g_service, "%s", service ? service : "cqrs");
    g_min = min_level;
}

bool cqrs_log_level_parse(const char *s, cqrs_log_level_t *out)
{
    for (int i = 0; i < 4; i++) {
        if (s && strcasecmp(s, level_names[i]) == 0) {
            *out = (cqrs_log_level_t)i;
            return true;
        }
    }
    return false;
}

bool cqrs_log_enabled(cqrs_log_level_t level)
{
    return level >= g_min;
}

void cqrs_log(cqrs_log_level_t level, const char *msg, ...)
{
    if (!cqrs_log_enabled(level))
        return;
    char now[CQRS_TIME_LEN + 1];
    cqrs_time_now_rfc3339(now);
    json_t *line = json_object();
    if (!line)
        return;
    json_object_set_new(line, "time", json_string(now));
    json_object_set_new(line, "level", json_string(level_names[level]));
    json_object_set_new(line, "service", json_string(g_service));
    char clean[4096];
    msg = scrub(msg, clean, sizeof clean);
    json_object_set_new(line, "msg", json_string(msg ? msg : ""));
    va_list ap;
    va_start(ap, msg);
    for (;;) {
        const char *key = va_arg(ap, const char *);
        if (!key)
            break;
        const char *val = scrub(va_arg(ap, const char *), clean, sizeof clean);
        /* json_string rejects invalid UTF-8; fall back so a hostile value cannot drop a line. */
        json_t *v = val ? json_string(val) : json_null();
        if (!v)
            v = json_string("<invalid utf-8>");
        json_object_set_new(line, key, v);
    }
    va_end(ap);
    char buf[8192];
    size_t n = json_dumpb(line, buf, sizeof buf - 1, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(line);
    if (n == 0 || n > sizeof buf - 1)
        return;
    buf[n++] = '\n';
    ssize_t w = write(STDOUT_FILENO, buf, n);
    (void)w;
}
