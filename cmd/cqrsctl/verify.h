/* verify.h — `cqrsctl verify`. Returns the exit status: 0 match, 1 drift (or failure),
 * 3 a dependency is unavailable. */
#ifndef CQRSCTL_VERIFY_H
#define CQRSCTL_VERIFY_H

#include <stdbool.h>

int cqrsctl_verify(const char *pg_dsn, const char *redis_url, bool as_json);

#endif
