/* kafka_check.h — reads a topic back from the beginning (read_committed, no group) and checks
 * what the relay promises: every (aggregate, version) exactly once, in version order per
 * aggregate. */
#ifndef CQRS_TEST_KAFKA_CHECK_H
#define CQRS_TEST_KAFKA_CHECK_H

#include <stddef.h>
#include <stdint.h>

typedef struct kafka_check {
    size_t messages;     /* read */
    size_t duplicates;   /* (aggregate, version) seen before */
    size_t out_of_order; /* version not previous + 1 within its aggregate */
    char first_problem[256];
} kafka_check_t;

/* Reads topics until `expected` messages arrived or timeout_s passed (then also waits one
 * more second for stray duplicates). Returns 0 when it could read at all. */
int kafka_check_topics(const char *brokers, const char *const *topics, size_t n_topics,
                       size_t expected, int timeout_s, kafka_check_t *out);

/* The value of header `header` of the message at topic/partition/offset (read_committed), read
 * back from Kafka: malloc'ed; "(another message)" when another offset came; NULL when nothing
 * came within 10 s. */
char *kafka_header_at(const char *brokers, const char *topic, int32_t partition, int64_t offset,
                      const char *header);

#endif
