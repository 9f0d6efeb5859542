/* bus.h — Kafka: topic administration and the idempotent producer settings the relay uses.
 * The consumer side lives in projector.h.
 */
#ifndef CQRS_BUS_H
#define CQRS_BUS_H

#include <librdkafka/rdkafka.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cqrs/err.h"

/* Creates the topics that do not exist yet (existing ones are left alone). partitions ≥ 1,
 * replication -1 = broker default. */
cqrs_err_t cqrs_bus_create_topics(const char *brokers, const char *const *topics, size_t n,
                                  int partitions, int replication, int timeout_ms,
                                  cqrs_error_t *err);

/* A conf with bootstrap servers, client id and `debug` (may be NULL) set; caller owns it. */
rd_kafka_conf_t *cqrs_bus_conf_new(const char *brokers, const char *client_id, cqrs_error_t *err);

/* Sets a property; INVALID with librdkafka's message otherwise. */
cqrs_err_t cqrs_bus_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value,
                             cqrs_error_t *err);

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
