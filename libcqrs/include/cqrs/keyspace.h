/* keyspace.h — the one owner of the read model's platform keys in Redis.
 *
 * Every key carries the deployment prefix (CQRS_REDIS_PREFIX, default "cqrs"), so several
 * deployments can share one Redis or one cluster. The read model of a topic with P partitions
 * is split into P *shards*, one per partition: shard (topic, p) holds the documents of the
 * aggregates the relay puts in partition p, their index entries, the partition's offset and
 * the shard's meta and dead letters — and every one of its keys starts with the hash tag
 * "{<prefix>:<topic>:<p>}", so in a Redis Cluster they share one slot and one event's apply
 * stays one atomic script. Keys of a shard: <shard>meta (hash: incarnation, created,
 * paused_until), <shard>offsets (hash: partition → next offset), <shard>dlq:index,
 * <shard>dlq:undecodable, <shard>dlq:<aggregate id>, <shard>doc:<aggregate id>, and the domain's
 * index families (services/query/keys.c) — where <shard> is "{<prefix>:<topic>:<p>}:g<N>:".
 *
 * Generations: a rebuild writes a new generation N+1 of a topic's shards beside the live one
 * (the same slots), then switches each shard's pointer "{<prefix>:<topic>:<p>}:gen" (absent:
 * generation 1), which readers follow; the old generation is deleted afterwards. Every write
 * checks its shard's pointer in the script that writes, so none lands in a generation that
 * was switched away.
 *
 * Keys outside every shard (each used alone, so any slot will do): <prefix>:layout (hash:
 * topic → its partition count, written by the projector from Kafka's metadata: how a reader
 * finds an aggregate's shard), <prefix>:refill, <prefix>:rebuild:lease, <prefix>:rebuild:garbage,
 * and the change channel <prefix>:changes:<db>.
 *
 * An aggregate's shard is its partition: (murmur2(id) & 0x7fffffff) % P, what the relay's
 * murmur2_random partitioner (and every Java client) picks for the key.
 */
#ifndef CQRS_KEYSPACE_H
#define CQRS_KEYSPACE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CQRS_REDIS_PREFIX_MAX 32
/* Room for any shard prefix: "{" prefix ":" topic (Kafka: ≤ 249) ":" partition "}:" */
#define CQRS_SHARD_MAX (CQRS_REDIS_PREFIX_MAX + 249 + 16)
/* Room for any platform key of a shard with an aggregate id (or a UUID-sized suffix). */
#define CQRS_KEY_MAX (CQRS_SHARD_MAX + 64)
#define CQRS_MAX_SHARDS 1024 /* partitions per topic this read model accepts */

/* Families of a shard (appended to the shard prefix). */
#define CQRS_SHARD_META "meta"
#define CQRS_SHARD_OFFSETS "offsets"
#define CQRS_SHARD_DLQ_INDEX "dlq:index"
#define CQRS_SHARD_UNDECODABLE "dlq:undecodable"

/* True when prefix is 1–32 of [A-Za-z0-9._-]. */
bool cqrs_keys_prefix_valid(const char *prefix);

/* The shard prefix of generation 1 (a deployment's first), "{<prefix>:<topic>:<partition>}:g1:",
 * into out (cap ≥ CQRS_SHARD_MAX). */
void cqrs_keys_shard(const char *prefix, const char *topic, int32_t partition, char *out,
                     size_t cap);
/* The shard prefix of generation gen (≥ 1). */
void cqrs_keys_shard_gen(const char *prefix, const char *topic, int32_t partition, int64_t gen,
                         char *out, size_t cap);
/* A SCAN pattern every shard key of the deployment matches, "{<prefix>:*" (a valid prefix has
 * no glob character). */
void cqrs_keys_shards_pattern(const char *prefix, char *out, size_t cap);
/* From a shard prefix: its generation pointer "{…}:gen" into pointer (may be NULL) and its
 * generation into *gen (may be NULL); false when shard is not a shard prefix. */
bool cqrs_keys_shard_parse(const char *shard, char *pointer, size_t cap, int64_t *gen);
/* <shard><family>, e.g. cqrs_keys_in(shard, CQRS_SHARD_META, …). */
void cqrs_keys_in(const char *shard, const char *family, char *out, size_t cap);
/* <shard>doc:<id>, <shard>dlq:<id>, <shard>unknown:<id>. */
void cqrs_keys_doc(const char *shard, const char *id, char *out, size_t cap);
void cqrs_keys_dlq(const char *shard, const char *id, char *out, size_t cap);
void cqrs_keys_unknown(const char *shard, const char *id, char *out, size_t cap);
/* A key outside every shard: "<prefix>:<name>" (layout, refill, rebuild:lease, changes:<db>). */
void cqrs_keys_global(const char *prefix, const char *name, char *out, size_t cap);
/* The generation-free name of a shard key ("{…}:g3:doc:x" → "{…}:doc:x"): what the change
 * feed announces and readers wait on and cache by, the same across a rebuild's switch. A key
 * that is not a shard's is copied as it is. */
void cqrs_keys_name(const char *key, char *out, size_t cap);
/* The aggregate id at the end of a shard key ("…doc:<id>", "…dlq:<id>"); "" if none. */
const char *cqrs_keys_id(const char *key);

/* Kafka's murmur2 of a key (the Java client's Utils.murmur2). */
uint32_t cqrs_murmur2(const void *key, size_t len);
/* The partition (and so the shard) of a key among n: (murmur2 & 0x7fffffff) % n. */
int32_t cqrs_keys_partition(const char *key, int32_t n);

#endif
