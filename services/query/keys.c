/* keys.c — where the query side's documents live: topics per aggregate type, shards per topic
 * (keyspace.h), document keys. The index families are in index.c. */
#include <stdio.h>
#include <string.h>

#include <cqrs/keyspace.h>

#include "query.h"
#include "topics.h"

static topics_t topics;

void query_keys_init(const char *topic_prefix)
{
    topics_init(&topics, topic_prefix);
}

const char *query_topic(const char *aggregate_type)
{
    for (int i = 0; i < TOPIC_TYPES; i++)
        if (strcmp(aggregate_type, topic_type(i)) == 0)
            return topics.name[i];
    return NULL;
}

cqrs_err_t query_shard_count(cqrs_docstore_t *ds, const char *aggregate_type, int32_t *n,
                             cqrs_error_t *err)
{
    const char *topic = query_topic(aggregate_type);
    if (!topic)
        return cqrs_error_set(err, CQRS_ERR_INVALID, "unknown aggregate type %s", aggregate_type);
    cqrs_err_t rc = cqrs_docstore_partitions(ds, topic, n, err);
    if (rc == CQRS_ERR_NOT_FOUND)
        cqrs_error_set(err, CQRS_ERR_NOT_FOUND,
                       "the read model has no layout for %s yet: no projector has recorded it"
                       " (one does as soon as it reaches Kafka)",
                       topic);
    return rc;
}

cqrs_err_t query_layouts_known(cqrs_docstore_t *ds, cqrs_error_t *err)
{
    for (int i = 0; i < TOPIC_TYPES; i++) {
        int32_t n = 0;
        cqrs_err_t rc = query_shard_count(ds, topic_type(i), &n, err);
        if (rc != CQRS_ERR_OK)
            return rc;
    }
    return CQRS_ERR_OK;
}

void query_shard(cqrs_docstore_t *ds, const char *aggregate_type, int32_t i, char *out, size_t cap)
{
    const char *topic = query_topic(aggregate_type);
    int64_t gen = 1;
    cqrs_error_t err;
    /* The shard's pointer (cached): it lives in the shard's slot, so when it cannot be read
     * (and none was known before) the read of the shard that follows fails the same way. */
    if (topic && cqrs_docstore_shard_generation(ds, topic, i, &gen, &err) != CQRS_ERR_OK)
        gen = 1;
    cqrs_keys_shard_gen(cqrs_docstore_prefix(ds), topic ? topic : "", i, gen, out, cap);
}

cqrs_err_t query_doc_key(cqrs_docstore_t *ds, const char *aggregate_type, const char *id, char *out,
                         size_t cap, cqrs_error_t *err)
{
    int32_t n = 0;
    cqrs_err_t rc = query_shard_count(ds, aggregate_type, &n, err);
    if (rc != CQRS_ERR_OK)
        return rc;
    char shard[CQRS_SHARD_MAX];
    query_shard(ds, aggregate_type, cqrs_keys_partition(id, n), shard, sizeof shard);
    cqrs_keys_doc(shard, id, out, cap);
    return CQRS_ERR_OK;
}

bool query_doc_name_req(cqrs_http_request_t *req, query_ctx_t *ctx, const char *aggregate_type,
                        const char *id, char *out, size_t cap)
{
    cqrs_error_t err;
    cqrs_err_t rc;
    cqrs_docstore_t *ds = cqrs_docstore_pool_acquire(ctx->pool, ctx->acquire_timeout_ms);
    if (!ds) {
        rc = cqrs_error_set(&err, CQRS_ERR_UNAVAILABLE, "no free Redis connection");
    } else {
        char key[CQRS_KEY_MAX];
        rc = query_doc_key(ds, aggregate_type, id, key, sizeof key, &err);
        cqrs_docstore_pool_release(ctx->pool, ds);
        if (rc == CQRS_ERR_OK)
            cqrs_keys_name(key, out, cap);
    }
    if (rc == CQRS_ERR_NOT_FOUND) {
        cqrs_http_add_header(req, "Retry-After", "1");
        cqrs_http_reply_problem(req, 503, "not-ready", "Service Unavailable", err.message, NULL,
                                NULL);
    } else if (rc != CQRS_ERR_OK) {
        cqrs_http_reply_error(req, &err);
    }
    return rc == CQRS_ERR_OK;
}
