/* ops.h — the cqrsctl subcommands that live in files of their own (`explain`, `dlq`,
 * `rebuild`; `verify` is verify.h) and the helpers they share. Each subcommand returns the exit
 * status: 0 success, 1 failed or unknown aggregate, 2 usage, 3 a dependency is unavailable. */
#ifndef CQRSCTL_OPS_H
#define CQRSCTL_OPS_H

#include <cqrs/docstore.h>
#include <cqrs/redis.h>
#include <jansson.h>

typedef struct cqrsctl_env {
    const char *pg_dsn;
    const cqrs_redis_config_t *redis; /* the Redis settings (redis.h) */
    const char *kafka_brokers;
    const char *topic_prefix;
} cqrsctl_env_t;

/* argv[0] is "explain"; argv[1…] its arguments. */
int cqrsctl_explain(const cqrsctl_env_t *env, int argc, char **argv);

/* argv[0] is "dlq"; argv[1] the action (list, show, retry, drop). */
int cqrsctl_dlq(const cqrsctl_env_t *env, int argc, char **argv);

/* argv[0] is "rebuild". */
int cqrsctl_rebuild(const cqrsctl_env_t *env, int argc, char **argv);

/* Every shard of the read model (each topic's partitions as the layout records them; a topic
 * with no layout has none yet): *shards (free) holds *n prefixes. */
typedef char cqrsctl_shard_t[CQRS_SHARD_MAX];
cqrs_err_t cqrsctl_all_shards(cqrs_docstore_t *ds, cqrsctl_shard_t **shards, size_t *n,
                              cqrs_error_t *err);

/* The shard holding an aggregate's dead letters (its shard in the product or the order read
 * model, whichever holds any) into shard: NOT_FOUND when neither does. */
cqrs_err_t cqrsctl_dlq_shard(cqrs_docstore_t *ds, const char *id, char *shard, size_t cap,
                             cqrs_error_t *err);

/* Prints a JSON value (indented) on stdout. */
void cqrsctl_print_json(json_t *v);

#endif
