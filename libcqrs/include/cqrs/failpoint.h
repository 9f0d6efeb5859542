/* failpoint.h — deterministic fault injection for tests.
 *
 * CQRS_FAILPOINT("relay-before-commit") is a no-op unless the build defines
 * CQRS_ENABLE_FAILPOINTS (CMake option, on in the test build, off in release builds). When it
 * does, the environment variable CQRS_FAILPOINTS="name=action[,name=action…]" arms points:
 *   kill      SIGKILL this process
 *   stop      SIGSTOP this process (a pause: resume it with SIGCONT); "pause" is the same
 *   delay:N   sleep N milliseconds
 *   error     the macro evaluates to true: the caller fails as if a dependency failed
 * Each armed point fires every time it is reached; "name=action*N" fires the first N times
 * (per process).
 *
 * The points (README.md, "Fault-injection suite", has the scenarios that use them):
 *   command-before-commit   cqrs-commandd: a command's rows, events and outbox rows are
 *                           written, COMMIT not yet sent (error: the command fails, rolled back)
 *   command-after-commit    cqrs-commandd: COMMIT done, the HTTP answer not yet queued
 *   relay-after-read        relay: outbox rows read, nothing produced yet
 *   relay-after-delivery    relay: every delivery report OK, the batch not yet recorded
 *   relay-before-commit     relay: batch recorded in relay_inflight, Kafka commit not yet sent
 *   relay-after-commit      relay: Kafka committed (acknowledged), outbox rows not yet deleted
 *   relay-delete-lost       relay (error): the delete after a Kafka commit is skipped and the
 *                           leader goes on, as after an asynchronous delete lost with a
 *                           connection that outlived a failover
 *   relay-delete-published  relay: the same point (error: the delete of the published rows
 *                           fails as a timed-out one would, and is retried alone)
 *   relay-abandon-after-cas relay supervisor: a stuck worker given up (state ABANDONED), its
 *                           thread not yet detached (delay:N: the worker may return and free
 *                           itself meanwhile)
 *   projector-after-apply   cqrs-queryd: the event applied in Redis, its Kafka offset not yet
 *                           stored for commit
 *   projector-before-apply  cqrs-queryd: the document read and the next one computed, the
 *                           apply script not yet run (delay:N widens the window in which
 *                           cqrsctl dlq retry or a rebuild changes the document meanwhile)
 *   lists-tiny-budget       cqrs-queryd: every walk of a product list (a category in another
 *                           sort order, a search) looks at 3 entries per list and search
 *                           never takes its small path (error: on; short pages with cursors)
 *   rebuild-after-targets   cqrsctl rebuild: a build worker read its share's row versions, its
 *                           events' cursor not yet opened (delay:N: commands committed
 *                           meanwhile reach aggregates the build already wrote whole)
 *   scan-after-node         libcqrs docstore: a walk of every node (SCAN: the rebuild's
 *                           clean-up, its carry-over) finished one node, the next not begun
 *                           (delay:N: slots move behind the walk)
 *   rebuild-before-swap     cqrsctl rebuild: every check of the switch passed, SWAPDB not yet
 *                           sent (delay:N longer than the 10 s pause: the swap must be refused)
 *
 * CQRS_UNSAFE(name) is true when the environment variable CQRS_UNSAFE_<name> is "1" in a
 * failpoint build; always false otherwise. It switches on deliberately wrong behaviour so that
 * the fault suite can prove its checker catches it (a negative control):
 *   CQRS_UNSAFE_ACK_UNCOMMITTED=1   cqrs-commandd answers a command's success even when its
 *                                   transaction failed and was rolled back
 *   CQRS_UNSAFE_RELAY_DELETE_FIRST=1
 *                                   the relay deletes a batch's outbox rows before publishing
 *                                   it (at most once)
 *   CQRS_UNSAFE_NO_LOSS_DETECTION=1 cqrs-queryd's projector neither checks the store's
 *                                   incarnation nor the partition offsets it recorded, and
 *                                   does not audit them (offsets only grow): a store that lost
 *                                   writes is not noticed
 *   CQRS_UNSAFE_RELAY_NO_PG_TIMEOUTS=1
 *                                   the relay's PostgreSQL connection has no statement_timeout
 *                                   or lock_timeout (as before issue 16): only the supervisor's
 *                                   cancel ends a wait on a held lock
 *   CQRS_UNSAFE_REDIS_NO_HOST_CHECK=1
 *                                   rediss:// connections check the server's certificate chain
 *                                   but not its name (what hiredis ≤ 1.4.1 does alone): a
 *                                   trusted certificate for another host is accepted
 *   CQRS_UNSAFE_TRUST_UNREPLICATED_COMMIT=1
 *                                   a COMMIT that PostgreSQL reports as done after its wait
 *                                   for the synchronous standby was cancelled ("committed
 *                                   locally") counts as done, in the pool and the relay
 */
#ifndef CQRS_FAILPOINT_H
#define CQRS_FAILPOINT_H

#include <stdbool.h>

#ifdef CQRS_ENABLE_FAILPOINTS
bool cqrs__failpoint(const char *name);
bool cqrs__unsafe(const char *name);
#define CQRS_FAILPOINT(name) cqrs__failpoint(name)
#define CQRS_UNSAFE(name) cqrs__unsafe(name)
#else
#define CQRS_FAILPOINT(name) false
#define CQRS_UNSAFE(name) false
#endif

#endif
