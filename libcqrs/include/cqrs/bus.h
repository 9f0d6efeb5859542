/* bus.h — Kafka: every client's configuration, topic administration, finding a key's messages.
 * The consumer side lives in projector.h, the relay's producer in outbox.h.
 *
 * Every Kafka client of the product gets its configuration from cqrs_bus_conf_new, in this
 * order: bootstrap servers, client id, keep-alives and `debug` (CQRS_KAFKA_DEBUG); the client's
 * own settings; then the operator's librdkafka properties, which therefore override the
 * client's tunables (linger.ms, fetch.wait.max.ms, client.id, …):
 *
 *   CQRS_KAFKA_PROPERTIES_FILE        a file of `name=value` lines (`#` comments)
 *   CQRS_KAFKA_PROPERTY_<NAME>        one property, winning over the file; NAME maps as in
 *                                     Confluent's images: lower case, `___` → `-`, `__` → `_`,
 *                                     `_` → `.` (SASL_MECHANISMS → sasl.mechanisms)
 *   CQRS_KAFKA_PROPERTY_<NAME>_FILE   its value read from a file (trailing newline trimmed),
 *                                     the `<VAR>_FILE` convention of secrets; wins over
 *                                     CQRS_KAFKA_PROPERTY_<NAME>
 *
 * The properties the product's guarantees rest on, or that a setting of its own sets, are
 * refused (cqrs_bus_property_refused says why). Values of secret properties
 * (cqrs_bus_property_secret) are never printed: not in errors, logs or --help.
 */
#ifndef CQRS_BUS_H
#define CQRS_BUS_H

#include <librdkafka/rdkafka.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "cqrs/err.h"

/* Creates the topics that do not exist yet (existing ones are left alone). partitions ≥ 1,
 * replication -1 = broker default. */
cqrs_err_t cqrs_bus_create_topics(const char *brokers, const char *const *topics, size_t n,
                                  int partitions, int replication, int timeout_ms,
                                  cqrs_error_t *err);

#define CQRS_KAFKA_PROPERTY_PREFIX "CQRS_KAFKA_PROPERTY_"
#define CQRS_KAFKA_PROPERTIES_FILE "CQRS_KAFKA_PROPERTIES_FILE"

/* A client's configuration, in the order above. `brokers` may be NULL (no bootstrap servers);
 * `own` is the client's own settings, {"name", "value"} pairs up to {NULL, NULL} (may be NULL).
 * CONFIG when a property is bad, with a message naming it and where it was set (never a secret's
 * value). Caller owns the conf (rd_kafka_conf_destroy, or cqrs_bus_client_new takes it). */
rd_kafka_conf_t *cqrs_bus_conf_new(const char *brokers, const char *client_id,
                                   const char *const own[][2], cqrs_error_t *err);

/* rd_kafka_new, taking conf in every case. CONFIG with librdkafka's reason (`what` names the
 * client, e.g. "producer"), any secret value of conf cut out of it. */
rd_kafka_t *cqrs_bus_client_new(rd_kafka_type_t type, rd_kafka_conf_t *conf, const char *what,
                                cqrs_error_t *err);

/* Start-up check (both daemons and cqrsctl, right after their settings): reads the operator's
 * properties, sets them on a scratch configuration and creates (then destroys) a client from
 * it without brokers — so unknown names, bad values, refused properties, unreadable files and
 * what only rd_kafka_new checks (CA and key files, the SASL mechanism) are all reported at
 * once, one line each on `errors` (may be NULL), naming the variable or file line. Returns the
 * number of problems (0 = none). */
int cqrs_bus_check_properties(FILE *errors);

/* For --help: CQRS_KAFKA_DEBUG, CQRS_KAFKA_PROPERTIES_FILE and CQRS_KAFKA_PROPERTY_<NAME> in the
 * format of the settings table, and the refused properties. */
void cqrs_bus_print_help(FILE *out);

/* The pieces, exposed for tests. */

/* One property the operator set. */
typedef struct cqrs_bus_prop {
    char *name;   /* librdkafka's name, e.g. "sasl.password" */
    char *value;  /* secret when cqrs_bus_property_secret(name) */
    char *source; /* where it was set, for messages: "CQRS_KAFKA_PROPERTY_X", "<var>: <file>:<n>" */
} cqrs_bus_prop_t;

typedef struct cqrs_bus_props {
    cqrs_bus_prop_t *v;
    size_t n;
} cqrs_bus_props_t;

/* The property a CQRS_KAFKA_PROPERTY_<NAME> variable sets, from NAME (without the prefix):
 * lower case, then `___` → `-`, `__` → `_`, `_` → `.`. False when NAME has a character other
 * than letters, digits and `_`, when the result is empty, starts or ends with `.` or has `..`,
 * or when it does not fit in size. */
bool cqrs_bus_property_name(const char *name, char *out, size_t size);

/* Why the product refuses an operator's value for a property (its guarantees rest on the
 * value it sets, or a setting of its own sets it), aliases included; NULL when accepted. */
const char *cqrs_bus_property_refused(const char *name);

/* True when a property's value is never shown: a name with `password`, `secret`, `key`,
 * `token` or `credential` in it (but not a `*.location`, a path), and sasl.oauthbearer.config
 * and sasl.oauthbearer.extensions. */
bool cqrs_bus_property_secret(const char *name);

/* Adds the `name=value` lines of a properties file (blank lines and `#` comments skipped,
 * blanks around name and value trimmed; a later line replaces an earlier one). Every bad line
 * is reported to `errors` (may be NULL) as "<var>: <path>:<line>: …", never with its value;
 * returns their number (an unreadable file counts one). `var` names the setting that named
 * the file. */
int cqrs_bus_props_read_file(const char *var, const char *path, cqrs_bus_props_t *props,
                             FILE *errors);

/* The operator's properties from `env` ("NAME=value" strings, NULL-terminated, like environ;
 * NULL = the process environment): CQRS_KAFKA_PROPERTIES_FILE first, then every
 * CQRS_KAFKA_PROPERTY_<NAME>, then every CQRS_KAFKA_PROPERTY_<NAME>_FILE — each replacing an
 * earlier value of the same property. A name ending in _FILE reads a file unless the name
 * with `.file` is itself a property librdkafka knows (then `<NAME>_FILE_FILE` reads one).
 * Reports every bad variable, line, file and refused property to `errors` (may be NULL) and
 * returns their number; what librdkafka rejects is found by cqrs_bus_props_apply. */
int cqrs_bus_props_load(char *const *env, cqrs_bus_props_t *props, FILE *errors);

/* Sets every property on conf; reports each librdkafka rejects (unknown name, bad value — a
 * secret's value never shown) and returns their number. */
int cqrs_bus_props_apply(const cqrs_bus_props_t *props, rd_kafka_conf_t *conf, FILE *errors);

void cqrs_bus_props_free(cqrs_bus_props_t *props);

/* Sets a property; INVALID with librdkafka's message otherwise. */
cqrs_err_t cqrs_bus_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value,
                             cqrs_error_t *err);

/* Why a client cannot work (cqrs_bus_stats_health). */
typedef struct cqrs_bus_health {
    char why[320];     /* "" when healthy */
    char topic[256];   /* with partition: the partition without a (connected) leader */
    int32_t partition; /* -1 unless the reason is such a partition */
} cqrs_bus_health_t;

/* Whether a client can work, from one of its statistics documents (statistics.interval.ms):
 * a consumer group handler that is up (it knows and reaches its coordinator), at least one
 * broker up, and for every partition it reads or has messages queued for a known leader that
 * the client holds a connection to. false with the first reason found in h; a document that
 * does not parse is taken as healthy (nothing to act on). The owner decides how long
 * "unhealthy" may last: the projector replaces its consumer after CQRS_BUS_STALL_MS
 * (librdkafka 2.14 can leave a client without a coordinator or a partition leader for
 * minutes after a broker briefly dropped out of the metadata: a KRaft broker fenced for a
 * moment after a pause). */
bool cqrs_bus_stats_health(const char *json, size_t len, cqrs_bus_health_t *h);

/* How long a long-lived client may stay unhealthy (cqrs_bus_stats_health) before its owner
 * replaces it, and how often its statistics come. */
#ifndef CQRS_BUS_STALL_MS /* a build may set it (-D): measuring the watchdog's effect */
#define CQRS_BUS_STALL_MS 30000
#endif
#define CQRS_BUS_STATS_INTERVAL "5000"

/* One message sought by cqrs_bus_locate: in event_id, out offset (-1 unless found). */
typedef struct cqrs_bus_sought {
    const char *event_id; /* the ce_id header */
    int64_t offset;
} cqrs_bus_sought_t;

/* Bounds of a cqrs_bus_locate scan. */
typedef struct cqrs_bus_scan {
    int64_t since_ms;    /* start at the first message stamped at or after this time */
    int budget_ms;       /* stop reading after this long (metadata calls included) */
    size_t max_messages; /* and after this many messages */
} cqrs_bus_scan_t;

/* Where the relay's messages with key `key` landed in topic: the partition the key hashes to
 * (murmur2_random, the relay's partitioner) is read with read_committed from scan->since_ms to
 * its end, within the budget, and each sought ce_id gets its offset. *partition receives the
 * key's partition; *complete is true when the scan reached the end of the partition, so an
 * event not found is not in Kafka (yet), and false when the budget ran out first (not found
 * = unknown). UNAVAILABLE when Kafka does not answer, NOT_FOUND when the topic does not
 * exist. Never blocks longer than about budget_ms. */
cqrs_err_t cqrs_bus_locate(const char *brokers, const char *topic, const char *key,
                           const cqrs_bus_scan_t *scan, cqrs_bus_sought_t *sought, size_t n,
                           int32_t *partition, bool *complete, cqrs_error_t *err);

#endif
