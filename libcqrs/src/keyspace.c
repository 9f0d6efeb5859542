/* keyspace.c — key names of the read model (keyspace.h). Pure. */
#include "cqrs/keyspace.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

bool cqrs_keys_prefix_valid(const char *prefix)
{
    size_t n = prefix ? strlen(prefix) : 0;
    if (n == 0 || n > CQRS_REDIS_PREFIX_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = prefix[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

void cqrs_keys_shard_gen(const char *prefix, const char *topic, int32_t partition, int64_t gen,
                         char *out, size_t cap)
{
    snprintf(out, cap, "{%s:%s:%d}:g%lld:", prefix, topic, (int)partition, (long long)gen);
}

void cqrs_keys_shards_pattern(const char *prefix, char *out, size_t cap)
{
    snprintf(out, cap, "{%s:*", prefix);
}

void cqrs_keys_shard(const char *prefix, const char *topic, int32_t partition, char *out,
                     size_t cap)
{
    cqrs_keys_shard_gen(prefix, topic, partition, 1, out, cap);
}

bool cqrs_keys_shard_parse(const char *shard, char *pointer, size_t cap, int64_t *gen)
{
    const char *end = shard[0] == '{' ? strstr(shard, "}:g") : NULL;
    if (!end)
        return false;
    char *rest = NULL;
    long long g = strtoll(end + 3, &rest, 10);
    if (g < 1 || !rest || strcmp(rest, ":") != 0)
        return false;
    if (pointer)
        snprintf(pointer, cap, "%.*sgen", (int)(end + 2 - shard), shard);
    if (gen)
        *gen = g;
    return true;
}

void cqrs_keys_in(const char *shard, const char *family, char *out, size_t cap)
{
    snprintf(out, cap, "%s%s", shard, family);
}

void cqrs_keys_doc(const char *shard, const char *id, char *out, size_t cap)
{
    snprintf(out, cap, "%sdoc:%s", shard, id);
}

void cqrs_keys_dlq(const char *shard, const char *id, char *out, size_t cap)
{
    snprintf(out, cap, "%sdlq:%s", shard, id);
}

void cqrs_keys_unknown(const char *shard, const char *id, char *out, size_t cap)
{
    snprintf(out, cap, "%sunknown:%s", shard, id);
}

void cqrs_keys_global(const char *prefix, const char *name, char *out, size_t cap)
{
    snprintf(out, cap, "%s:%s", prefix, name);
}

void cqrs_keys_name(const char *key, char *out, size_t cap)
{
    const char *end = key[0] == '{' ? strstr(key, "}:g") : NULL;
    const char *rest = end ? end + 3 : NULL;
    while (rest && *rest >= '0' && *rest <= '9')
        rest++;
    if (!rest || rest == end + 3 || *rest != ':') {
        snprintf(out, cap, "%s", key);
        return;
    }
    snprintf(out, cap, "%.*s%s", (int)(end + 2 - key), key, rest + 1);
}

const char *cqrs_keys_id(const char *key)
{
    const char *c = strrchr(key, ':');
    return c ? c + 1 : "";
}

/* Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2): seed 0x9747b28c, 4-byte
 * little-endian blocks, the tail mixed in the Java switch's fall-through order. */
uint32_t cqrs_murmur2(const void *key, size_t len)
{
    const uint32_t m = 0x5bd1e995u, seed = 0x9747b28cu;
    const int r = 24;
    const unsigned char *d = key;
    uint32_t h = seed ^ (uint32_t)len;
    size_t blocks = len / 4;
    for (size_t i = 0; i < blocks; i++) {
        const unsigned char *b = d + 4 * i;
        uint32_t k =
            (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
        k *= m;
        k ^= k >> r;
        k *= m;
        h *= m;
        h ^= k;
    }
    const unsigned char *tail = d + 4 * blocks;
    switch (len % 4) {
    case 3:
        h ^= (uint32_t)tail[2] << 16;
        /* fall through */
    case 2:
        h ^= (uint32_t)tail[1] << 8;
        /* fall through */
    case 1:
        h ^= tail[0];
        h *= m;
    }
    h ^= h >> 13;
    h *= m;
    h ^= h >> 15;
    return h;
}

int32_t cqrs_keys_partition(const char *key, int32_t n)
{
    if (n <= 0)
        return 0;
    return (int32_t)((cqrs_murmur2(key, strlen(key)) & 0x7fffffffu) % (uint32_t)n);
}
