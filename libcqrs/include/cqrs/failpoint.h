/* failpoint.h — deterministic fault injection for tests.
 *
 * CQRS_FAILPOINT("relay-before-commit") is a no-op unless the build defines
 * CQRS_ENABLE_FAILPOINTS (CMake option, on in the test build, off in release builds). When it
 * does, the environment variable CQRS_FAILPOINTS="name=action[,name=action…]" arms points:
 *   kill      SIGKILL this process
 *   stop      SIGSTOP this process (a pause: resume it with SIGCONT)
 *   delay:N   sleep N milliseconds
 *   error     the macro evaluates to true: the caller fails as if a dependency failed
 * Each armed point fires every time it is reached; "name=action*1" fires once.
 */
#ifndef CQRS_FAILPOINT_H
#define CQRS_FAILPOINT_H

#include <stdbool.h>

#ifdef CQRS_ENABLE_FAILPOINTS
bool cqrs__failpoint(const char *name);
#define CQRS_FAILPOINT(name) cqrs__failpoint(name)
#else
#define CQRS_FAILPOINT(name) false
#endif

#endif
