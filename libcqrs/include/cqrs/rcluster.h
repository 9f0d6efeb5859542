/* rcluster.h — one logical Redis connection that is either a single server or a Redis Cluster.
 *
 * A cqrs_rconn_t is made without connecting. Its first use connects to the target's server (the
 * *seed*) with cqrs_redis_connect and asks `CLUSTER SLOTS`:
 *   - "ERR This instance has cluster support disabled" → single mode: one hiredis context,
 *     every command goes to it once, unchanged (error replies such as LOADING come back to the
 *     caller as replies, a lost connection is UNAVAILABLE and the next call reconnects);
 *   - a slot map → cluster mode: the 16384 slots → their primary's announced host:port, one
 *     context per primary made lazily with cqrs_redis_connect on a copy of the target with the
 *     host and port replaced (same TLS files, same TLS server name, same user). The target's
 *     database must be 0 (a cluster has no other): CONFIG otherwise.
 * The seed's ACL user needs `+cluster|slots` and, for a cluster, `+asking`.
 *
 * In cluster mode a command is routed by the slot of its route key and follows MOVED (the slot
 * is updated and the whole map refreshed) and ASK (ASKING + the command on the named node, the
 * map untouched); TRYAGAIN, CLUSTERDOWN, LOADING, MASTERDOWN and lost or refused connections
 * are retried with a short backoff (after a map refresh from any known node) until the call's
 * deadline: timeout_ms from the call's start, which also bounds every connect and read. A
 * command whose connection broke after it was sent may have run: it is sent again, so what is
 * sent through a cluster must be safe to repeat (the docstore's scripts are: versioned).
 *
 * Not thread-safe: one thread owns a cqrs_rconn_t (CONVENTIONS.md, Threads).
 */
#ifndef CQRS_RCLUSTER_H
#define CQRS_RCLUSTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cqrs/err.h"
#include "cqrs/redis.h"

struct redisReply;

#define CQRS_REDIS_SLOTS 16384

typedef struct cqrs_rconn cqrs_rconn_t;

/* The cluster slot of a key: CRC16/XMODEM of its hash tag (the part between the first '{' and
 * the first '}' after it, when not empty) or of the whole key, mod 16384. */
unsigned cqrs_redis_key_slot(const char *key, size_t len);

/* A connection to t's server (copied: t may go away), not yet connected. timeout_ms bounds
 * every call (≤ 0: 2000). NULL only when out of memory. Free with cqrs_rconn_free. */
cqrs_rconn_t *cqrs_rconn_new(const cqrs_redis_target_t *t, int timeout_ms);

/* Drops every connection and forgets the mode and the map: the next call starts over from the
 * seed. */
void cqrs_rconn_close(cqrs_rconn_t *rc);

/* Closes and frees; NULL is a no-op. */
void cqrs_rconn_free(cqrs_rconn_t *rc);

/* True in cluster mode, known after the first successful call (false before). */
bool cqrs_rconn_is_cluster(const cqrs_rconn_t *rc);

/* Runs one command (argv[0..argc), lens NULL: NUL-terminated strings) on the node serving the
 * slot of route_key (NUL-terminated; NULL: any node — the first primary, or the single
 * server). OK with *out the reply, which the caller frees with freeReplyObject: error replies
 * other than the redirections and retried states above are replies too (NOSCRIPT, WRONGTYPE,
 * CROSSSLOT…), for the caller to interpret. UNAVAILABLE (naming the node and its last answer)
 * when the deadline passed, CONFIG for a database ≠ 0 on a cluster or a refused CLUSTER SLOTS;
 * *out NULL then. */
cqrs_err_t cqrs_rconn_command(cqrs_rconn_t *rc, const char *route_key, int argc, const char **argv,
                              const size_t *lens, struct redisReply **out, cqrs_error_t *err);

/* One command of a pipeline (fields as cqrs_rconn_command's arguments; all borrowed). */
typedef struct cqrs_rcmd {
    const char *route_key;
    int argc;
    const char **argv;
    const size_t *lens;
} cqrs_rcmd_t;

/* Runs n commands as pipelines, one per node: every node's commands are sent before any reply
 * is read. replies[i] is the reply of cmds[i] (caller frees each with freeReplyObject), in the
 * original order whatever the nodes. Commands answered with a redirection or a retried state
 * (and those of a node whose connection broke) are redone one by one as cqrs_rconn_command
 * does, within the same deadline. On failure every replies[i] is NULL and the error is
 * returned. Single mode: one pipeline, as today. */
cqrs_err_t cqrs_rconn_pipeline(cqrs_rconn_t *rc, size_t n, const cqrs_rcmd_t *cmds,
                               struct redisReply **replies, cqrs_error_t *err);

/* Per-node commands (SCAN, DBSIZE, FLUSHDB, SCRIPT LOAD): the number of primaries of the
 * current map, sorted by address (1 in single mode; 0 with err when the server cannot be
 * reached). A map change may renumber them: cqrs_rconn_map_epoch tells, so that a walk over
 * every node (a SCAN copy) can start over when the keys moved under it. */
size_t cqrs_rconn_nodes(cqrs_rconn_t *rc, cqrs_error_t *err);

/* Increases whenever the map changes: a MOVED, or a refresh that found it changed. */
uint64_t cqrs_rconn_map_epoch(const cqrs_rconn_t *rc);

/* Cluster mode: the next call that needs the map (cqrs_rconn_nodes, a command) asks the
 * cluster for it again (a change found increases the epoch) — for a walk of every node that
 * must learn whether slots moved under it unseen. No-op in single mode. */
void cqrs_rconn_map_stale(cqrs_rconn_t *rc);

/* Writes primary i's "host:port" into out (cap bytes); false when i is out of range. */
bool cqrs_rconn_node_name(const cqrs_rconn_t *rc, size_t i, char *out, size_t cap);

/* Runs a command on primary i (< cqrs_rconn_nodes), with no routing: redirections are replies
 * to the caller; LOADING, MASTERDOWN, TRYAGAIN, CLUSTERDOWN and connection failures are
 * retried on that same node until the deadline. Reply and errors as cqrs_rconn_command. */
cqrs_err_t cqrs_rconn_command_node(cqrs_rconn_t *rc, size_t i, int argc, const char **argv,
                                   const size_t *lens, struct redisReply **out, cqrs_error_t *err);

#endif
