/* verify.h — `cqrsctl verify`. Returns the exit status: 0 match, 1 drift (or failure),
 * 3 a dependency is unavailable. */
#ifndef CQRSCTL_VERIFY_H
#define CQRSCTL_VERIFY_H

#include <cqrs/redis.h>
#include <stdbool.h>

int cqrsctl_verify(const char *pg_dsn, const cqrs_redis_config_t *redis, bool as_json);

#endif
