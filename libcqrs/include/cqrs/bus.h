/* bus.h — Kafka: topic administration and the idempotent producer settings the relay uses.
 * The consumer side lives in projector.h.
 */
#ifndef CQRS_BUS_H
#define CQRS_BUS_H

#include <librdkafka/rdkafka.h>
#include <stddef.h>

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

#endif
