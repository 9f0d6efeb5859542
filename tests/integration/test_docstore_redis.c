/* Integration tests of docstore.c against the real Redis of the stack (a private database
 * number): the atomic apply of document + index + offset (exactly stored version + 1),
 * duplicates, gaps and dead letters holding back their own aggregate only, the store checks
 * (incarnation, the partition's offset, the base version a document was computed from),
 * undecodable messages recorded with their offset, the rebuild swap refused once its pause
 * lapsed, recovery from a flushed script cache, and a fast failure when Redis is
 * unreachable. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include <cqrs/docstore.h>
#include <cqrs/util.h>

#include "redisdb.h"
#include "testenv.h"

static char url[1024];
static cqrs_redis_config_t redis; /* the environment's Redis settings with url */
static cqrs_docstore_t *ds;
/* Each test writes into a shard of its own (keyspace.h): its document, dead letters, meta,
 * offsets and index keys share one hash tag. */
static char agg[37], shard[CQRS_SHARD_MAX], key[CQRS_KEY_MAX], offsets[CQRS_KEY_MAX],
    dlq[CQRS_KEY_MAX], meta[CQRS_KEY_MAX], idx_a[CQRS_KEY_MAX], idx_b[CQRS_KEY_MAX],
    idx_c[CQRS_KEY_MAX], dlq_index[CQRS_KEY_MAX], undecodable[CQRS_KEY_MAX];
/* What a projector remembers: the shard's incarnation, the offset it recorded last. */
static char incarnation[CQRS_INCARNATION_LEN + 1];
static int64_t written;

static int setup(void **state)
{
    (void)state;
    if (redisdb_url(testenv_require("CQRS_REDIS_URL"), 15, url, sizeof url) != 0)
        return -1;
    freeReplyObject(redisdb_cmd(url, "FLUSHDB", NULL));
    cqrs_error_t err;
    redis = redisdb_config(url);
    ds = cqrs_docstore_new(&redis, 2000, &err);
    return ds ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    cqrs_docstore_destroy(ds);
    return 0;
}

static int fresh_keys(void **state)
{
    (void)state;
    cqrs_uuid_v4(agg);
    char topic[64];
    snprintf(topic, sizeof topic, "itest-%s", agg);
    cqrs_keys_shard("cqrs", topic, 0, shard, sizeof shard);
    cqrs_keys_doc(shard, agg, key, sizeof key);
    cqrs_keys_dlq(shard, agg, dlq, sizeof dlq);
    cqrs_keys_in(shard, CQRS_SHARD_OFFSETS, offsets, sizeof offsets);
    cqrs_keys_in(shard, CQRS_SHARD_META, meta, sizeof meta);
    cqrs_keys_in(shard, CQRS_SHARD_DLQ_INDEX, dlq_index, sizeof dlq_index);
    cqrs_keys_in(shard, CQRS_SHARD_UNDECODABLE, undecodable, sizeof undecodable);
    cqrs_keys_in(shard, "idx:a", idx_a, sizeof idx_a);
    cqrs_keys_in(shard, "idx:b", idx_b, sizeof idx_b);
    cqrs_keys_in(shard, "idx:c", idx_c, sizeof idx_c);
    written = -1;
    cqrs_error_t err;
    int64_t stored = 0;
    if (cqrs_docstore_shard_open(ds, shard, 0, incarnation, &stored, &err) != CQRS_ERR_OK ||
        stored != -1)
        return -1;
    return 0;
}

static cqrs_apply_result_t apply_ops(const char *k, const char *d, int64_t v, const char *json,
                                     int64_t next_offset, const cqrs_index_op_t *ops, size_t n_ops,
                                     bool dead)
{
    cqrs_apply_result_t res = 99;
    cqrs_error_t err;
    /* As the projector does: the base is the version read before computing the document. */
    int64_t base = 0;
    if (cqrs_docstore_get(ds, k, NULL, &base, &err) != CQRS_ERR_OK)
        base = 0;
    cqrs_apply_t a = {.key = k,
                      .version = v,
                      .json = json,
                      .dlq_key = d,
                      .aggregate_id = agg,
                      .blob = "{\"event\":true}",
                      .reason = "rejected by the projection",
                      .ops = ops,
                      .n_ops = n_ops,
                      .shard = shard,
                      .partition = 0,
                      .next_offset = next_offset,
                      .incarnation = incarnation,
                      .offset_mode = CQRS_OFFSET_EXPECT,
                      .prev_offset = written,
                      .base_version = base};
    cqrs_err_t rc = dead ? cqrs_docstore_dead_letter(ds, &a, &res, &err)
                         : cqrs_docstore_apply(ds, &a, &res, &err);
    if (rc != CQRS_ERR_OK)
        fail_msg("apply: %s", err.message);
    if (res != CQRS_APPLY_RESET && res != CQRS_APPLY_OFFSET_MOVED && res != CQRS_APPLY_STALE)
        written = next_offset;
    return res;
}

static cqrs_apply_result_t apply(int64_t v, const char *json, int64_t next_offset)
{
    return apply_ops(key, dlq, v, json, next_offset, NULL, 0, false);
}

static void expect_doc(const char *k, int64_t v, const char *json)
{
    char *got = NULL;
    int64_t version = 0;
    cqrs_error_t err;
    assert_int_equal(cqrs_docstore_get(ds, k, &got, &version, &err), CQRS_ERR_OK);
    assert_int_equal(version, v);
    assert_string_equal(got, json);
    free(got);
}

static int64_t offset(void)
{
    int64_t off = -1;
    cqrs_error_t err;
    assert_int_equal(cqrs_docstore_offset(ds, shard, 0, &off, &err), CQRS_ERR_OK);
    return off;
}

static long long integer(const char *fmt, const char *arg)
{
    redisReply *r = redisdb_cmd(url, fmt, arg);
    assert_non_null(r);
    long long v = r->type == REDIS_REPLY_INTEGER  ? r->integer
                  : r->type == REDIS_REPLY_STRING ? atoll(r->str)
                                                  : -1;
    freeReplyObject(r);
    return v;
}

static void test_absent_document(void **state)
{
    (void)state;
    int64_t v;
    cqrs_error_t err;
    assert_int_equal(cqrs_docstore_get(ds, key, NULL, &v, &err), CQRS_ERR_NOT_FOUND);
    assert_int_equal(cqrs_docstore_offset(ds, shard, 0, &v, &err), CQRS_ERR_NOT_FOUND);
}

static void test_document_index_and_offset_change_together(void **state)
{
    (void)state;
    cqrs_index_op_t add[] = {{CQRS_INDEX_ZADD, idx_a, 5, agg, NULL},
                             {CQRS_INDEX_ZADD, idx_b, 7, agg, NULL}};
    assert_int_equal(apply_ops(key, dlq, 1, "{\"v\":1}", 11, add, 2, false), CQRS_APPLY_APPLIED);
    expect_doc(key, 1, "{\"v\":1}");
    assert_int_equal(offset(), 11);
    char cmd[CQRS_KEY_MAX + 64];
    snprintf(cmd, sizeof cmd, "ZSCORE %s %s", idx_a, agg);
    assert_int_equal(integer(cmd, NULL), 5);
    /* A duplicate changes no index. */
    cqrs_index_op_t move[] = {{CQRS_INDEX_ZREM, idx_a, 0, agg, NULL},
                              {CQRS_INDEX_ZADD, idx_c, 9, agg, NULL}};
    assert_int_equal(apply_ops(key, dlq, 1, "{\"v\":9}", 11, move, 2, false), CQRS_APPLY_DUPLICATE);
    assert_int_equal(integer(cmd, NULL), 5);
    assert_int_equal(apply_ops(key, dlq, 2, "{\"v\":2}", 12, move, 2, false), CQRS_APPLY_APPLIED);
    assert_int_equal(integer(cmd, NULL), -1); /* removed: nil */
    snprintf(cmd, sizeof cmd, "ZSCORE %s %s", idx_c, agg);
    assert_int_equal(integer(cmd, NULL), 9);
    assert_int_equal(offset(), 12);
}

static void test_duplicates_are_skipped(void **state)
{
    (void)state;
    assert_int_equal(apply(1, "{\"v\":1}", 11), CQRS_APPLY_APPLIED);
    assert_int_equal(apply(1, "{\"v\":\"other\"}", 11), CQRS_APPLY_DUPLICATE);
    expect_doc(key, 1, "{\"v\":1}");
    assert_int_equal(apply(2, "{\"v\":2}", 12), CQRS_APPLY_APPLIED);
    /* a redelivered old event (a partition sent back) records where the reading stands */
    assert_int_equal(apply(1, "{}", 13), CQRS_APPLY_DUPLICATE);
    expect_doc(key, 2, "{\"v\":2}");
    assert_int_equal(offset(), 13);
}

static void test_gap_is_held_not_papered_over(void **state)
{
    (void)state;
    assert_int_equal(apply(1, "{\"v\":1}", 11), CQRS_APPLY_APPLIED);
    /* v3 before v2: parked as a dead letter, the document stays at v1 */
    assert_int_equal(apply(3, "{\"v\":3}", 13), CQRS_APPLY_GAP);
    expect_doc(key, 1, "{\"v\":1}");
    assert_int_equal(integer("HEXISTS %s 3", dlq), 1);
    assert_int_equal(offset(), 13); /* the partition goes on */
    /* even the missing v2 now waits behind the held aggregate, in order */
    assert_int_equal(apply(2, "{\"v\":2}", 14), CQRS_APPLY_HELD);
    expect_doc(key, 1, "{\"v\":1}");
    assert_int_equal(integer("HLEN %s", dlq), 4); /* two events, two reasons */
}

static void test_dead_letter_holds_back_its_aggregate_only(void **state)
{
    (void)state;
    char other_key[CQRS_KEY_MAX], other_dlq[CQRS_KEY_MAX], other[64];
    snprintf(other, sizeof other, "%s-other", agg);
    cqrs_keys_doc(shard, other, other_key, sizeof other_key);
    cqrs_keys_dlq(shard, other, other_dlq, sizeof other_dlq);
    assert_int_equal(apply(1, "{\"v\":1}", 1), CQRS_APPLY_APPLIED);
    assert_int_equal(apply_ops(key, dlq, 2, NULL, 2, NULL, 0, true), CQRS_APPLY_DEAD);
    char zs[CQRS_KEY_MAX + 64];
    snprintf(zs, sizeof zs, "ZSCORE %s %s", dlq_index, agg);
    assert_int_equal(integer(zs, NULL) > 0, 1);
    assert_int_equal(apply(3, "{\"v\":3}", 3), CQRS_APPLY_HELD);
    expect_doc(key, 1, "{\"v\":1}");
    /* another aggregate on the same partition goes on */
    assert_int_equal(apply_ops(other_key, other_dlq, 1, "{\"o\":1}", 4, NULL, 0, false),
                     CQRS_APPLY_APPLIED);
    assert_int_equal(apply_ops(other_key, other_dlq, 2, "{\"o\":2}", 5, NULL, 0, false),
                     CQRS_APPLY_APPLIED);
    expect_doc(other_key, 2, "{\"o\":2}");
    assert_int_equal(offset(), 5);
}

static void test_lost_store_is_detected(void **state)
{
    (void)state;
    freeReplyObject(redisdb_cmd(url, "DEL %s", meta));
    assert_int_equal(apply(1, "{\"v\":1}", 1), CQRS_APPLY_RESET);
    int64_t v;
    cqrs_error_t err;
    assert_int_equal(cqrs_docstore_get(ds, key, NULL, &v, &err), CQRS_ERR_NOT_FOUND);
    assert_int_equal(cqrs_docstore_offset(ds, shard, 0, &v, &err), CQRS_ERR_NOT_FOUND);
    char before[CQRS_INCARNATION_LEN + 1];
    snprintf(before, sizeof before, "%s", incarnation);
    int64_t stored = 0;
    assert_int_equal(cqrs_docstore_shard_open(ds, shard, 0, incarnation, &stored, &err),
                     CQRS_ERR_OK);
    assert_string_not_equal(incarnation, before); /* a new store, a new incarnation */
    assert_int_equal(stored, -1);
    written = -1;
    assert_int_equal(apply(1, "{\"v\":1}", 1), CQRS_APPLY_APPLIED);
}

/* Issue 16, defect 2: a projector that remembers another incarnation (the store was emptied
 * and another projector gave it a new one) must not write — it would record its in-memory
 * position as the applied offset of a store that holds nothing. */
static void test_other_incarnation_is_refused(void **state)
{
    (void)state;
    assert_int_equal(apply(1, "{\"v\":1}", 1), CQRS_APPLY_APPLIED);
    char mine[CQRS_INCARNATION_LEN + 1];
    snprintf(mine, sizeof mine, "%s", incarnation);
    freeReplyObject(redisdb_cmd(url, "HSET %s incarnation someone-else", meta));
    assert_int_equal(apply(2, "{\"v\":2}", 2), CQRS_APPLY_RESET);
    expect_doc(key, 1, "{\"v\":1}");
    assert_int_equal(offset(), 1);
    /* a gap would have been held as a dead letter: nothing is */
    assert_int_equal(apply(5, "{\"v\":5}", 3), CQRS_APPLY_RESET);
    assert_int_equal(integer("EXISTS %s", dlq), 0);
    char restore[CQRS_KEY_MAX + 64];
    snprintf(restore, sizeof restore, "HSET %s incarnation %%s", meta);
    freeReplyObject(redisdb_cmd(url, restore, mine));
}

/* Issue 16, defect 3: a store that lost its last writes (an asynchronous failover, a restart
 * with appendfsync everysec) keeps its meta key; its partition offset is behind the one the
 * projector recorded last. The write is refused (nothing parked as a gap, the offset not moved
 * past the lost events) so the projector can go back and re-apply. */
static void test_offset_behind_is_refused(void **state)
{
    (void)state;
    assert_int_equal(apply(1, "{\"v\":1}", 11), CQRS_APPLY_APPLIED);
    assert_int_equal(apply(2, "{\"v\":2}", 12), CQRS_APPLY_APPLIED);
    /* roll the store back to before v2: document and offset, as a replica that missed it */
    freeReplyObject(redisdb_cmd(url, "HSET %s v 1 json {\"v\":1}", key));
    freeReplyObject(redisdb_cmd(url, "HSET %s 0 11", offsets));
    assert_int_equal(apply(3, "{\"v\":3}", 13), CQRS_APPLY_OFFSET_MOVED);
    expect_doc(key, 1, "{\"v\":1}");
    assert_int_equal(offset(), 11);
    assert_int_equal(integer("EXISTS %s", dlq), 0); /* no gap dead letter */
    /* the projector goes back to 11 and re-applies */
    written = 11;
    assert_int_equal(apply(2, "{\"v\":2}", 12), CQRS_APPLY_APPLIED);
    assert_int_equal(apply(3, "{\"v\":3}", 13), CQRS_APPLY_APPLIED);
    expect_doc(key, 3, "{\"v\":3}");
    /* an offset ahead of the recorded one (another writer) is refused as well */
    freeReplyObject(redisdb_cmd(url, "HSET %s 0 20", offsets));
    assert_int_equal(apply(4, "{\"v\":4}", 14), CQRS_APPLY_OFFSET_MOVED);
    expect_doc(key, 3, "{\"v\":3}");
}

/* Issue 16, defect 1: the document was computed from version `base`; when the stored one moved
 * meanwhile (dlq retry released the aggregate, a rebuild switched), the script must not write
 * it — and never an empty document. */
static void test_document_of_another_base_is_refused(void **state)
{
    (void)state;
    assert_int_equal(apply(1, "{\"v\":1}", 1), CQRS_APPLY_APPLIED);
    cqrs_apply_result_t res = 99;
    cqrs_error_t err;
    /* The projector saw version 0 (absent) and so computed nothing for version 2 (a gap): */
    cqrs_apply_t a = {.key = key,
                      .version = 2,
                      .json = NULL,
                      .dlq_key = dlq,
                      .aggregate_id = agg,
                      .blob = "{}",
                      .shard = shard,
                      .next_offset = 2,
                      .incarnation = incarnation,
                      .offset_mode = CQRS_OFFSET_EXPECT,
                      .prev_offset = written,
                      .base_version = 0};
    assert_int_equal(cqrs_docstore_apply(ds, &a, &res, &err), CQRS_ERR_OK);
    assert_int_equal(res, CQRS_APPLY_STALE);
    expect_doc(key, 1, "{\"v\":1}");
    /* A document computed from version 0 is refused at version 1 too. */
    a.json = "{\"v\":\"from nothing\"}";
    assert_int_equal(cqrs_docstore_apply(ds, &a, &res, &err), CQRS_ERR_OK);
    assert_int_equal(res, CQRS_APPLY_STALE);
    /* Even at the right base an empty document is never stored. */
    a.base_version = 1;
    a.json = "";
    assert_int_equal(cqrs_docstore_apply(ds, &a, &res, &err), CQRS_ERR_OK);
    assert_int_equal(res, CQRS_APPLY_STALE);
    expect_doc(key, 1, "{\"v\":1}");
    assert_int_equal(offset(), 1); /* nothing recorded: the event is computed again */
    a.json = "{\"v\":2}";
    assert_int_equal(cqrs_docstore_apply(ds, &a, &res, &err), CQRS_ERR_OK);
    assert_int_equal(res, CQRS_APPLY_APPLIED);
    expect_doc(key, 2, "{\"v\":2}");
}

/* Issue 16, defect 5: an undecodable message is kept once, with its offset recorded. */
static void test_undecodable_records_its_offset(void **state)
{
    (void)state;
    char llen[CQRS_KEY_MAX + 64];
    snprintf(llen, sizeof llen, "LLEN %s", undecodable);
    cqrs_apply_t a = {.shard = shard,
                      .partition = 0,
                      .next_offset = 8,
                      .blob = "{\"payload\":\"junk\"}",
                      .incarnation = incarnation,
                      .offset_mode = CQRS_OFFSET_EXPECT,
                      .prev_offset = -1};
    cqrs_apply_result_t res = 99;
    cqrs_error_t err;
    assert_int_equal(cqrs_docstore_undecodable(ds, &a, &res, &err), CQRS_ERR_OK);
    assert_int_equal(res, CQRS_APPLY_APPLIED);
    assert_int_equal(offset(), 8);
    assert_int_equal(integer(llen, NULL), 1);
    /* a projector that does not know it was recorded (prev -1) is refused: not kept twice */
    assert_int_equal(cqrs_docstore_undecodable(ds, &a, &res, &err), CQRS_ERR_OK);
    assert_int_equal(res, CQRS_APPLY_OFFSET_MOVED);
    assert_int_equal(integer(llen, NULL), 1);
}

/* Issue 16, defect 7, with generations (issue 18): a rebuild's switch of a shard happens only
 * while its pause is still in force; once switched, a write into the old generation is refused
 * (GENERATION) and the new one holds the incarnation. */
static void test_switch_refused_once_the_pause_lapsed(void **state)
{
    (void)state;
    assert_int_equal(apply(1, "{\"v\":1}", 1), CQRS_APPLY_APPLIED);
    char topic[64], next[CQRS_SHARD_MAX], ptr[CQRS_KEY_MAX];
    snprintf(topic, sizeof topic, "itest-%s", agg);
    cqrs_keys_shard_gen("cqrs", topic, 0, 2, next, sizeof next);
    cqrs_keys_shard_parse(next, ptr, sizeof ptr, NULL);
    cqrs_error_t err;
    int64_t token = 0;
    const char *shards[] = {shard};
    assert_int_equal(cqrs_docstore_pause(ds, shards, 1, 50, &token, &err), CQRS_ERR_OK);
    assert_true(token > 0);
    /* paused: the projector's write waits */
    cqrs_apply_result_t res = 99;
    cqrs_apply_t a = {.key = key,
                      .version = 2,
                      .json = "{\"v\":2}",
                      .dlq_key = dlq,
                      .aggregate_id = agg,
                      .blob = "{}",
                      .shard = shard,
                      .next_offset = 2,
                      .incarnation = incarnation,
                      .offset_mode = CQRS_OFFSET_EXPECT,
                      .prev_offset = written,
                      .base_version = 1};
    assert_int_equal(cqrs_docstore_apply(ds, &a, &res, &err), CQRS_ERR_RETRY);
    usleep(200 * 1000); /* a stall longer than the pause */
    assert_int_equal(cqrs_docstore_switch_shard(ds, shard, next, token, false, &err),
                     CQRS_ERR_TIMEOUT);
    redisReply *r = redisdb_cmd(url, "GET %s", ptr);
    assert_int_equal(r->type, REDIS_REPLY_NIL); /* still generation 1 */
    freeReplyObject(r);
    /* another pause than ours does not count either */
    int64_t theirs = 0;
    assert_int_equal(cqrs_docstore_pause(ds, shards, 1, 10000, &theirs, &err), CQRS_ERR_OK);
    assert_int_equal(cqrs_docstore_switch_shard(ds, shard, next, token, false, &err),
                     CQRS_ERR_TIMEOUT);
    /* within our pause it switches: the pointer, the incarnation */
    assert_int_equal(cqrs_docstore_switch_shard(ds, shard, next, theirs, false, &err), CQRS_ERR_OK);
    r = redisdb_cmd(url, "GET %s", ptr);
    assert_string_equal(r->str, "2");
    freeReplyObject(r);
    char inc[CQRS_INCARNATION_LEN + 1];
    int64_t stored = 0;
    assert_int_equal(cqrs_docstore_shard_open(ds, next, 0, inc, &stored, &err), CQRS_ERR_OK);
    assert_string_equal(inc, incarnation);
    /* the old generation takes no write any more, paused or not */
    assert_int_equal(cqrs_docstore_apply(ds, &a, &res, &err), CQRS_ERR_OK);
    assert_int_equal(res, CQRS_APPLY_GENERATION);
    expect_doc(key, 1, "{\"v\":1}");
    assert_int_equal(cqrs_docstore_shard_open(ds, shard, 0, inc, &stored, &err), CQRS_ERR_STATE);
    char cur[CQRS_SHARD_MAX];
    assert_int_equal(cqrs_docstore_current_shard(ds, topic, 0, cur, sizeof cur, &err), CQRS_ERR_OK);
    assert_string_equal(cur, next);
    /* the new generation is not paused: the write lands there */
    char next_key[CQRS_KEY_MAX], next_dlq[CQRS_KEY_MAX];
    cqrs_keys_doc(next, agg, next_key, sizeof next_key);
    cqrs_keys_dlq(next, agg, next_dlq, sizeof next_dlq);
    a.key = next_key;
    a.dlq_key = next_dlq;
    a.shard = next;
    a.version = 1;
    a.base_version = 0;
    a.offset_mode = CQRS_OFFSET_RAISE;
    assert_int_equal(cqrs_docstore_apply(ds, &a, &res, &err), CQRS_ERR_OK);
    assert_int_equal(res, CQRS_APPLY_APPLIED);
    /* a forced switch ignores the pause (a switch that must go on) */
    char third[CQRS_SHARD_MAX];
    cqrs_keys_shard_gen("cqrs", topic, 0, 3, third, sizeof third);
    assert_int_equal(cqrs_docstore_switch_shard(ds, next, third, 0, true, &err), CQRS_ERR_OK);
    r = redisdb_cmd(url, "GET %s", ptr);
    assert_string_equal(r->str, "3");
    freeReplyObject(r);
}

/* Readers follow each shard's generation pointer, cached, and forget it on the change feed's
 * "*"; a pointer that cannot be read answers the last one known. */
static void test_readers_follow_the_generation(void **state)
{
    (void)state;
    char topic[64], ptr[CQRS_KEY_MAX];
    snprintf(topic, sizeof topic, "itest-%s", agg);
    cqrs_keys_shard_parse(shard, ptr, sizeof ptr, NULL);
    cqrs_error_t err;
    int64_t gen = 0;
    assert_int_equal(cqrs_docstore_shard_generation(ds, topic, 0, &gen, &err), CQRS_ERR_OK);
    assert_int_equal(gen, 1);
    char set[CQRS_KEY_MAX + 16];
    snprintf(set, sizeof set, "SET %s %%s", ptr);
    freeReplyObject(redisdb_cmd(url, set, "4"));
    assert_int_equal(cqrs_docstore_shard_generation(ds, topic, 0, &gen, &err), CQRS_ERR_OK);
    assert_int_equal(gen, 1); /* cached */
    cqrs_docstore_generations_forget();
    assert_int_equal(cqrs_docstore_shard_generation(ds, topic, 0, &gen, &err), CQRS_ERR_OK);
    assert_int_equal(gen, 4);
    /* another shard of the topic has its own */
    assert_int_equal(cqrs_docstore_shard_generation(ds, topic, 1, &gen, &err), CQRS_ERR_OK);
    assert_int_equal(gen, 1);
    /* and without the announcement, within the cache's lifetime */
    freeReplyObject(redisdb_cmd(url, set, "5"));
    usleep((CQRS_GENERATION_TTL_MS + 100) * 1000);
    assert_int_equal(cqrs_docstore_shard_generation(ds, topic, 0, &gen, &err), CQRS_ERR_OK);
    assert_int_equal(gen, 5);
    /* never back within a process, unless told (the store was found empty) */
    freeReplyObject(redisdb_cmd(url, set, "2"));
    usleep((CQRS_GENERATION_TTL_MS + 100) * 1000);
    assert_int_equal(cqrs_docstore_shard_generation(ds, topic, 0, &gen, &err), CQRS_ERR_OK);
    assert_int_equal(gen, 5);
    cqrs_docstore_generations_forget();
    assert_int_equal(cqrs_docstore_shard_generation(ds, topic, 0, &gen, &err), CQRS_ERR_OK);
    assert_int_equal(gen, 2);
}

/* One rebuild at a time: the lease is taken, renewed by its holder, refused to another. */
static void test_lease(void **state)
{
    (void)state;
    char name[64], mine[37], theirs[37];
    snprintf(name, sizeof name, "itest-lease-%s", agg);
    cqrs_uuid_v4(mine);
    cqrs_uuid_v4(theirs);
    cqrs_error_t err;
    int64_t left = 0;
    assert_int_equal(cqrs_docstore_lease(ds, name, mine, 5000, &left, &err), CQRS_ERR_OK);
    assert_int_equal(cqrs_docstore_lease(ds, name, mine, 5000, &left, &err), CQRS_ERR_OK);
    assert_int_equal(cqrs_docstore_lease(ds, name, theirs, 5000, &left, &err), CQRS_ERR_CONFLICT);
    assert_true(left > 0 && left <= 5000);
    assert_int_equal(cqrs_docstore_unlease(ds, name, theirs, &err), CQRS_ERR_OK); /* not theirs */
    assert_int_equal(cqrs_docstore_lease(ds, name, theirs, 5000, &left, &err), CQRS_ERR_CONFLICT);
    assert_int_equal(cqrs_docstore_unlease(ds, name, mine, &err), CQRS_ERR_OK);
    assert_int_equal(cqrs_docstore_lease(ds, name, theirs, 100, &left, &err), CQRS_ERR_OK);
    usleep(300 * 1000); /* a holder that died: its lease lapses */
    assert_int_equal(cqrs_docstore_lease(ds, name, mine, 5000, &left, &err), CQRS_ERR_OK);
}

/* Keys of one generation of a shard are copied to another and deleted, on every node; the
 * walk goes page by page (SCAN COUNT 1000), each page's COPY or UNLINK commands pipelined:
 * BULK keys span several pages, and every one of them is copied and deleted. A deletion by
 * prefixes deletes the keys of those shards only, whatever else the pattern matches. */
static void test_copy_and_delete_a_generation(void **state)
{
    (void)state;
    enum { BULK = 2500 };
    assert_int_equal(apply(1, "{\"v\":1}", 7), CQRS_APPLY_APPLIED);
    char topic[64], next[CQRS_SHARD_MAX], pattern[CQRS_KEY_MAX], name[CQRS_KEY_MAX];
    snprintf(topic, sizeof topic, "itest-%s", agg);
    cqrs_keys_shard_gen("cqrs", topic, 0, 2, next, sizeof next);
    redisContext *c = redisdb_connect(url);
    assert_non_null(c);
    for (int i = 0; i < BULK; i++) {
        snprintf(name, sizeof name, "%sbulk:%d", shard, i);
        assert_int_equal(redisAppendCommand(c, "SET %s %d", name, i), REDIS_OK);
    }
    for (int i = 0; i < BULK; i++) {
        redisReply *r = NULL;
        assert_int_equal(redisGetReply(c, (void **)&r), REDIS_OK);
        assert_int_equal(r->type, REDIS_REPLY_STATUS);
        freeReplyObject(r);
    }
    redisFree(c);
    cqrs_error_t err;
    size_t n = 0;
    assert_int_equal(cqrs_docstore_copy_shard_keys(ds, shard, next, CQRS_SHARD_OFFSETS, &n, &err),
                     CQRS_ERR_OK);
    assert_int_equal(n, 1);
    int64_t off = 0;
    assert_int_equal(cqrs_docstore_offset(ds, next, 0, &off, &err), CQRS_ERR_OK);
    assert_int_equal(off, 7);
    assert_int_equal(cqrs_docstore_copy_shard_keys(ds, shard, next, "bulk:*", &n, &err),
                     CQRS_ERR_OK);
    assert_int_equal(n, BULK);
    snprintf(name, sizeof name, "%sbulk:%d", next, BULK - 1);
    redisReply *got = redisdb_cmd(url, "GET %s", name);
    assert_non_null(got);
    assert_int_equal(got->type, REDIS_REPLY_STRING);
    assert_int_equal(atoi(got->str), BULK - 1);
    freeReplyObject(got);
    /* keys of another shard (partition 1) and of generation 10 of this one (g1 is a prefix of
     * g10 but "g1:" is not) under the same pattern: not of the prefixes */
    char other[CQRS_SHARD_MAX], other_key[CQRS_KEY_MAX], g10[CQRS_SHARD_MAX], g10_key[CQRS_KEY_MAX];
    cqrs_keys_shard_gen("cqrs", topic, 1, 1, other, sizeof other);
    snprintf(other_key, sizeof other_key, "%sbulk:0", other);
    freeReplyObject(redisdb_cmd(url, "SET %s x", other_key));
    cqrs_keys_shard_gen("cqrs", topic, 0, 10, g10, sizeof g10);
    snprintf(g10_key, sizeof g10_key, "%sbulk:0", g10);
    freeReplyObject(redisdb_cmd(url, "SET %s x", g10_key));
    const char *only[] = {shard};
    snprintf(pattern, sizeof pattern, "{cqrs:%s:*", topic);
    assert_int_equal(cqrs_docstore_delete_keys(ds, pattern, only, 1, &n, &err), CQRS_ERR_OK);
    assert_int_equal(n, 3 + BULK); /* doc, offsets, meta, the bulk keys */
    const char *stay[] = {other_key, g10_key};
    for (int i = 0; i < 2; i++) {
        redisReply *kept = redisdb_cmd(url, "EXISTS %s", stay[i]);
        assert_non_null(kept);
        assert_int_equal(kept->integer, 1);
        freeReplyObject(kept);
    }
    assert_int_equal(cqrs_docstore_offset(ds, shard, 0, &off, &err), CQRS_ERR_NOT_FOUND);
    assert_int_equal(cqrs_docstore_offset(ds, next, 0, &off, &err), CQRS_ERR_OK);
    snprintf(pattern, sizeof pattern, "%s*", shard);
    redisReply *left = redisdb_cmd(url, "KEYS %s", pattern);
    assert_non_null(left);
    assert_int_equal(left->elements, 0);
    freeReplyObject(left);
    /* the other generation's copies stay */
    snprintf(pattern, sizeof pattern, "%sbulk:*", next);
    assert_int_equal(cqrs_docstore_delete_keys(ds, pattern, NULL, 0, &n, &err), CQRS_ERR_OK);
    assert_int_equal(n, BULK);
    snprintf(pattern, sizeof pattern, "{cqrs:%s:*", topic);
    const char *theirs[] = {other, g10};
    assert_int_equal(cqrs_docstore_delete_keys(ds, pattern, theirs, 2, &n, &err), CQRS_ERR_OK);
    assert_int_equal(n, 2);
}

/* Issue 18: one shard that lost its data (a cluster node that came back empty) is a reset for
 * its own partition only: another shard's writes go on under the incarnation they know. */
static void test_a_lost_shard_resets_alone(void **state)
{
    (void)state;
    assert_int_equal(apply(1, "{\"v\":1}", 1), CQRS_APPLY_APPLIED);
    char other_shard[CQRS_SHARD_MAX], other_key[CQRS_KEY_MAX], other_dlq[CQRS_KEY_MAX];
    char other_inc[CQRS_INCARNATION_LEN + 1], topic[64];
    snprintf(topic, sizeof topic, "itest-%s", agg);
    cqrs_keys_shard("cqrs", topic, 1, other_shard, sizeof other_shard);
    cqrs_keys_doc(other_shard, agg, other_key, sizeof other_key);
    cqrs_keys_dlq(other_shard, agg, other_dlq, sizeof other_dlq);
    cqrs_error_t err;
    int64_t stored = 0;
    assert_int_equal(cqrs_docstore_shard_open(ds, other_shard, 1, other_inc, &stored, &err),
                     CQRS_ERR_OK);
    assert_string_not_equal(other_inc, incarnation);   /* each shard has its own */
    freeReplyObject(redisdb_cmd(url, "DEL %s", meta)); /* shard 0 lost its data */
    assert_int_equal(apply(2, "{\"v\":2}", 2), CQRS_APPLY_RESET);
    cqrs_apply_t a = {.key = other_key,
                      .version = 1,
                      .json = "{\"o\":1}",
                      .dlq_key = other_dlq,
                      .aggregate_id = agg,
                      .blob = "{}",
                      .shard = other_shard,
                      .partition = 1,
                      .next_offset = 5,
                      .incarnation = other_inc,
                      .offset_mode = CQRS_OFFSET_EXPECT,
                      .prev_offset = -1,
                      .base_version = 0};
    cqrs_apply_result_t res = 99;
    assert_int_equal(cqrs_docstore_apply(ds, &a, &res, &err), CQRS_ERR_OK);
    assert_int_equal(res, CQRS_APPLY_APPLIED);
    /* progress reads both in one round trip: shard 0 without incarnation, shard 1 at 5 */
    const char *shards[] = {shard, other_shard};
    int32_t parts[] = {0, 1};
    char incs[2][CQRS_INCARNATION_LEN + 1];
    int64_t offs[2];
    int64_t gens[2];
    assert_int_equal(cqrs_docstore_progress(ds, shards, parts, 2, incs, offs, gens, &err),
                     CQRS_ERR_OK);
    assert_int_equal(gens[0], 1);
    assert_string_equal(incs[0], "");
    assert_int_equal(offs[0], 1); /* the document and offset survive in this simulation */
    assert_string_equal(incs[1], other_inc);
    assert_int_equal(offs[1], 5);
}

/* The layout: recorded once per topic, never overwritten; readers cache it. */
static void test_layout_is_recorded_once(void **state)
{
    (void)state;
    char topic[64];
    snprintf(topic, sizeof topic, "itest-%s", agg);
    int32_t n = 0, rec = 0;
    cqrs_error_t err;
    assert_int_equal(cqrs_docstore_layout_get(ds, topic, &n, &err), CQRS_ERR_NOT_FOUND);
    assert_int_equal(cqrs_docstore_partitions(ds, topic, &n, &err), CQRS_ERR_NOT_FOUND);
    assert_int_equal(cqrs_docstore_layout_set(ds, topic, 6, &rec, &err), CQRS_ERR_OK);
    assert_int_equal(rec, 6);
    assert_int_equal(cqrs_docstore_layout_set(ds, topic, 12, &rec, &err), CQRS_ERR_OK);
    assert_int_equal(rec, 6); /* the first count stays: a change is reported, not taken */
    char sh[CQRS_SHARD_MAX], want[CQRS_SHARD_MAX];
    assert_int_equal(cqrs_docstore_shard_of(ds, topic, agg, sh, sizeof sh, &err), CQRS_ERR_OK);
    cqrs_keys_shard("cqrs", topic, cqrs_keys_partition(agg, 6), want, sizeof want);
    assert_string_equal(sh, want);
    /* cached: answers with the layout gone */
    freeReplyObject(redisdb_cmd(url, "DEL cqrs:layout", NULL));
    assert_int_equal(cqrs_docstore_partitions(ds, topic, &n, &err), CQRS_ERR_OK);
    assert_int_equal(n, 6);
}

/* Lists of several shards in one round trip, each from a cursor. */
static void test_range_many(void **state)
{
    (void)state;
    freeReplyObject(redisdb_cmd(url, "ZADD %s 0 a 0 c 0 e", idx_a));
    freeReplyObject(redisdb_cmd(url, "ZADD %s 0 b 0 d", idx_b));
    const char *keys[] = {idx_a, idx_b, idx_c};
    char **members[3];
    size_t counts[3];
    cqrs_error_t err;
    assert_int_equal(cqrs_docstore_range_many(ds, keys, 3, "a", 2, members, counts, &err),
                     CQRS_ERR_OK);
    assert_int_equal(counts[0], 2);
    assert_string_equal(members[0][0], "c");
    assert_string_equal(members[0][1], "e");
    assert_int_equal(counts[1], 2);
    assert_string_equal(members[1][0], "b");
    assert_int_equal(counts[2], 0);
    for (int i = 0; i < 3; i++)
        cqrs_docstore_strings_free(members[i], counts[i]);
}

static void test_script_cache_flush_is_survived(void **state)
{
    (void)state;
    assert_int_equal(apply(1, "{\"v\":1}", 1), CQRS_APPLY_APPLIED);
    freeReplyObject(redisdb_cmd(url, "SCRIPT FLUSH", NULL));
    /* The next apply meets NOSCRIPT and loads the script again. */
    assert_int_equal(apply(2, "{\"v\":2}", 2), CQRS_APPLY_APPLIED);
    expect_doc(key, 2, "{\"v\":2}");
}

static void test_unreachable_redis_is_unavailable(void **state)
{
    (void)state;
    cqrs_error_t err;
    char dead_url[] = "redis://127.0.0.1:1/0";
    cqrs_redis_config_t dead_redis = {.url = dead_url};
    cqrs_docstore_t *dead = cqrs_docstore_new(&dead_redis, 500, &err);
    assert_non_null(dead);
    int64_t v;
    assert_int_equal(cqrs_docstore_get(dead, "k", NULL, &v, &err), CQRS_ERR_UNAVAILABLE);
    cqrs_apply_result_t res;
    cqrs_apply_t a = {
        .key = "{s}:g1:k", .version = 1, .json = "{}", .dlq_key = "{s}:g1:d", .shard = "{s}:g1:"};
    assert_int_equal(cqrs_docstore_apply(dead, &a, &res, &err), CQRS_ERR_UNAVAILABLE);
    cqrs_docstore_destroy(dead);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_absent_document, fresh_keys),
        cmocka_unit_test_setup(test_a_lost_shard_resets_alone, fresh_keys),
        cmocka_unit_test_setup(test_layout_is_recorded_once, fresh_keys),
        cmocka_unit_test_setup(test_range_many, fresh_keys),
        cmocka_unit_test_setup(test_document_index_and_offset_change_together, fresh_keys),
        cmocka_unit_test_setup(test_duplicates_are_skipped, fresh_keys),
        cmocka_unit_test_setup(test_gap_is_held_not_papered_over, fresh_keys),
        cmocka_unit_test_setup(test_dead_letter_holds_back_its_aggregate_only, fresh_keys),
        cmocka_unit_test_setup(test_lost_store_is_detected, fresh_keys),
        cmocka_unit_test_setup(test_other_incarnation_is_refused, fresh_keys),
        cmocka_unit_test_setup(test_offset_behind_is_refused, fresh_keys),
        cmocka_unit_test_setup(test_document_of_another_base_is_refused, fresh_keys),
        cmocka_unit_test_setup(test_undecodable_records_its_offset, fresh_keys),
        cmocka_unit_test_setup(test_switch_refused_once_the_pause_lapsed, fresh_keys),
        cmocka_unit_test_setup(test_readers_follow_the_generation, fresh_keys),
        cmocka_unit_test_setup(test_lease, fresh_keys),
        cmocka_unit_test_setup(test_copy_and_delete_a_generation, fresh_keys),
        cmocka_unit_test_setup(test_script_cache_flush_is_survived, fresh_keys),
        cmocka_unit_test(test_unreachable_redis_is_unavailable),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
