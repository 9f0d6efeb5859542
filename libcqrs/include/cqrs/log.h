/* log.h — one JSON object per line on stdout: {"time","level","service","msg", k: v…}.
 *
 * Thread-safe: each line is formatted in a local buffer and written with one write(2).
 * The level is checked before anything is formatted.
 */
#ifndef CQRS_LOG_H
#define CQRS_LOG_H

#include <stdbool.h>

typedef enum cqrs_log_level {
    CQRS_LOG_DEBUG = 0,
    CQRS_LOG_INFO = 1,
    CQRS_LOG_WARN = 2,
    CQRS_LOG_ERROR = 3,
} cqrs_log_level_t;

/* `service` is copied. Call once at start-up, before threads start. */
void cqrs_log_init(const char *service, cqrs_log_level_t min_level);

/* Parses "debug|info|warn|error"; returns false when unknown. */
bool cqrs_log_level_parse(const char *s, cqrs_log_level_t *out);

bool cqrs_log_enabled(cqrs_log_level_t level);

/* Logs msg with string fields given as key, value pairs ending with NULL:
 *   cqrs_log(CQRS_LOG_INFO, "event applied", "aggregate_id", id, "event_id", eid, NULL);
 * A NULL value is written as JSON null. */
void cqrs_log(cqrs_log_level_t level, const char *msg, ...) __attribute__((sentinel));

/* Registers a secret (copied): from then on every occurrence of it in a line's message and
 * field values is written as "[redacted]" — for values a library may echo in its own messages
 * (librdkafka prints a bad sasl.oauthbearer.config back). Thread-safe. Keeps the last
 * CQRS_LOG_SECRETS_MAX distinct values. */
#define CQRS_LOG_SECRETS_MAX 32
void cqrs_log_add_secret(const char *value);

/* The level is checked before the arguments are evaluated: a field computed for a debug line
 * costs nothing when debug is off. Statements, not expressions. */
#define CQRS_LOG_AT(level, ...)                                                                    \
    do {                                                                                           \
        if (cqrs_log_enabled(level))                                                               \
            cqrs_log(level, __VA_ARGS__, (char *)NULL);                                            \
    } while (0)
#define CQRS_LOG_DEBUG(...) CQRS_LOG_AT(CQRS_LOG_DEBUG, __VA_ARGS__)
#define CQRS_LOG_INFO(...) CQRS_LOG_AT(CQRS_LOG_INFO, __VA_ARGS__)
#define CQRS_LOG_WARN(...) CQRS_LOG_AT(CQRS_LOG_WARN, __VA_ARGS__)
#define CQRS_LOG_ERROR(...) CQRS_LOG_AT(CQRS_LOG_ERROR, __VA_ARGS__)

#endif
