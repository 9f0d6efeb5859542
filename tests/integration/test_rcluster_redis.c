/* Integration tests of rcluster.c against real servers: a Redis Cluster whose seed is
 * CQRS_REDIS_CLUSTER_URL (three primaries; tests/run.sh starts one) — writes to keys of many
 * slots land on their primaries and read back, a pipeline across every primary, and a slot
 * migrated by hand as `redis-cli --cluster reshard` does it (SETSLOT IMPORTING/MIGRATING,
 * MIGRATE, SETSLOT NODE), with ASK followed during the migration and MOVED after it, each
 * counted by the source node's own error statistics; a walk of every node (the rebuild's
 * clean-up) while a slot moves behind it (failpoint scan-after-node, a failpoint build) — and
 * the stack's plain Redis
 * (CQRS_REDIS_URL), where the same connection is a single server, unchanged.
 *
 * The cluster is reached with its URL alone (no TLS settings: those of the environment are
 * the stack's Redis's). Keys are this run's own (rc:itest:<pid>:<time>…) and deleted at the
 * end; the migrated slot is moved back. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include <cqrs/docstore.h>
#include <cqrs/rcluster.h>

#include "redisdb.h"
#include "testenv.h"

#define MAX_ARGS 16

static char run[64]; /* this run's key prefix */

static cqrs_rconn_t *connect_to(const cqrs_redis_config_t *c)
{
    cqrs_redis_target_t t;
    cqrs_error_t err;
    if (cqrs_redis_target_init(&t, c, &err) != CQRS_ERR_OK)
        fail_msg("%s", err.message);
    cqrs_rconn_t *rc = cqrs_rconn_new(&t, 3000);
    cqrs_redis_target_close(&t);
    assert_non_null(rc);
    return rc;
}

static cqrs_rconn_t *cluster(void)
{
    cqrs_redis_config_t c = {.url = (char *)testenv_require("CQRS_REDIS_CLUSTER_URL")};
    return connect_to(&c);
}

/* The arguments after `n` (NULL-terminated) as an argv. */
static int collect(const char **argv, const char *a0, va_list ap)
{
    int argc = 0;
    for (const char *a = a0; a && argc < MAX_ARGS; a = va_arg(ap, const char *))
        argv[argc++] = a;
    return argc;
}

/* A command routed by key; fails the test unless OK with a reply that is not an error. */
static redisReply *run_cmd(cqrs_rconn_t *rc, const char *key, const char *a0, ...)
{
    const char *argv[MAX_ARGS];
    va_list ap;
    va_start(ap, a0);
    int argc = collect(argv, a0, ap);
    va_end(ap);
    redisReply *r = NULL;
    cqrs_error_t err;
    if (cqrs_rconn_command(rc, key, argc, argv, NULL, &r, &err) != CQRS_ERR_OK)
        fail_msg("%s %s: %s", a0, key ? key : "", err.message);
    if (r->type == REDIS_REPLY_ERROR)
        fail_msg("%s %s: %s", a0, key ? key : "", r->str);
    return r;
}

/* A command on primary i; as run_cmd. */
static redisReply *on_node(cqrs_rconn_t *rc, size_t i, const char *a0, ...)
{
    const char *argv[MAX_ARGS];
    va_list ap;
    va_start(ap, a0);
    int argc = collect(argv, a0, ap);
    va_end(ap);
    redisReply *r = NULL;
    cqrs_error_t err;
    if (cqrs_rconn_command_node(rc, i, argc, argv, NULL, &r, &err) != CQRS_ERR_OK)
        fail_msg("%s on node %zu: %s", a0, i, err.message);
    if (r->type == REDIS_REPLY_ERROR)
        fail_msg("%s on node %zu: %s", a0, i, r->str);
    return r;
}

static void expect_string_at(cqrs_rconn_t *rc, const char *key, const char *value)
{
    redisReply *r = run_cmd(rc, key, "GET", key, NULL);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_string_equal(r->str, value);
    freeReplyObject(r);
}

/* How many keys starting with prefix primary i holds (SCAN). */
static long keys_on(cqrs_rconn_t *rc, size_t i, const char *prefix)
{
    char match[128], cursor[32] = "0";
    long n = 0;
    snprintf(match, sizeof match, "%s*", prefix);
    do {
        redisReply *r = on_node(rc, i, "SCAN", cursor, "MATCH", match, "COUNT", "1000", NULL);
        assert_int_equal(r->type, REDIS_REPLY_ARRAY);
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        n += (long)r->element[1]->elements;
        freeReplyObject(r);
    } while (strcmp(cursor, "0") != 0);
    return n;
}

static void delete_keys(cqrs_rconn_t *rc, const char *prefix, int n)
{
    char key[128];
    for (int i = 0; i < n; i++) {
        snprintf(key, sizeof key, "%s%d", prefix, i);
        freeReplyObject(run_cmd(rc, key, "DEL", key, NULL));
    }
}

static void test_writes_land_on_every_primary(void **state)
{
    (void)state;
    cqrs_rconn_t *rc = cluster();
    char prefix[96], key[128], value[128];
    snprintf(prefix, sizeof prefix, "%s:w:", run);
    for (int i = 0; i < 300; i++) {
        snprintf(key, sizeof key, "%s%d", prefix, i);
        snprintf(value, sizeof value, "value-%d", i);
        freeReplyObject(run_cmd(rc, key, "SET", key, value, NULL));
    }
    assert_true(cqrs_rconn_is_cluster(rc));
    for (int i = 0; i < 300; i++) {
        snprintf(key, sizeof key, "%s%d", prefix, i);
        snprintf(value, sizeof value, "value-%d", i);
        expect_string_at(rc, key, value);
    }
    cqrs_error_t err;
    size_t n = cqrs_rconn_nodes(rc, &err);
    assert_int_equal(n, 3);
    long total = 0;
    for (size_t i = 0; i < n; i++) {
        long here = keys_on(rc, i, prefix);
        assert_true(here > 0); /* 300 keys of as many slots: every primary has some */
        total += here;
    }
    assert_int_equal(total, 300); /* and each key is on exactly one */
    delete_keys(rc, prefix, 300);
    cqrs_rconn_free(rc);
}

static void test_pipeline_across_every_primary(void **state)
{
    (void)state;
    cqrs_rconn_t *rc = cluster();
    enum { N = 60 };
    char prefix[96], keys[N][128], values[N][32];
    const char *set[N][3], *get[N][2];
    cqrs_rcmd_t sets[N], gets[N];
    redisReply *replies[N];
    cqrs_error_t err;
    snprintf(prefix, sizeof prefix, "%s:p:", run);
    for (int i = 0; i < N; i++) {
        snprintf(keys[i], sizeof keys[i], "%s%d", prefix, i);
        snprintf(values[i], sizeof values[i], "v%d", i * 7);
        set[i][0] = "SET", set[i][1] = keys[i], set[i][2] = values[i];
        get[i][0] = "GET", get[i][1] = keys[i];
        sets[i] = (cqrs_rcmd_t){keys[i], 3, set[i], NULL};
        gets[i] = (cqrs_rcmd_t){keys[i], 2, get[i], NULL};
    }
    if (cqrs_rconn_pipeline(rc, N, sets, replies, &err) != CQRS_ERR_OK)
        fail_msg("pipeline: %s", err.message);
    for (int i = 0; i < N; i++) {
        assert_int_equal(replies[i]->type, REDIS_REPLY_STATUS);
        freeReplyObject(replies[i]);
    }
    if (cqrs_rconn_pipeline(rc, N, gets, replies, &err) != CQRS_ERR_OK)
        fail_msg("pipeline: %s", err.message);
    for (int i = 0; i < N; i++) {
        assert_int_equal(replies[i]->type, REDIS_REPLY_STRING);
        assert_string_equal(replies[i]->str, values[i]);
        freeReplyObject(replies[i]);
    }
    size_t n = cqrs_rconn_nodes(rc, &err);
    assert_int_equal(n, 3);
    for (size_t i = 0; i < n; i++)
        assert_true(keys_on(rc, i, prefix) > 0);
    delete_keys(rc, prefix, N);
    cqrs_rconn_free(rc);
}

/* ---- resharding ------------------------------------------------------------------------ */

static char *node_id(cqrs_rconn_t *rc, size_t i)
{
    redisReply *r = on_node(rc, i, "CLUSTER", "MYID", NULL);
    char *id = strdup(r->str);
    freeReplyObject(r);
    return id;
}

static long long keys_in_slot(cqrs_rconn_t *rc, size_t i, const char *slot)
{
    redisReply *r = on_node(rc, i, "CLUSTER", "COUNTKEYSINSLOT", slot, NULL);
    long long n = r->integer;
    freeReplyObject(r);
    return n;
}

/* How many errors of a kind (MOVED, ASK) primary i has answered (INFO errorstats, Redis 7). */
static long errors_sent(cqrs_rconn_t *rc, size_t i, const char *kind)
{
    redisReply *r = on_node(rc, i, "INFO", "errorstats", NULL);
    char want[64];
    snprintf(want, sizeof want, "errorstat_%s:count=", kind);
    const char *p = strstr(r->str, want);
    long n = p ? strtol(p + strlen(want), NULL, 10) : 0;
    freeReplyObject(r);
    return n;
}

/* SETSLOT slot NODE to on every primary, the target and the source first (as redis-cli). */
static void assign_slot(cqrs_rconn_t *rc, size_t n, const char *slot, size_t from, size_t to,
                        const char *to_id)
{
    freeReplyObject(on_node(rc, to, "CLUSTER", "SETSLOT", slot, "NODE", to_id, NULL));
    freeReplyObject(on_node(rc, from, "CLUSTER", "SETSLOT", slot, "NODE", to_id, NULL));
    for (size_t i = 0; i < n; i++)
        if (i != from && i != to)
            freeReplyObject(on_node(rc, i, "CLUSTER", "SETSLOT", slot, "NODE", to_id, NULL));
}

static void test_resharding_is_followed(void **state)
{
    (void)state;
    cqrs_rconn_t *rc = cluster();
    char k1[128], k2[128], k3[128], slot[16], name[300], *port;
    snprintf(k1, sizeof k1, "{%s:m}:1", run);
    snprintf(k2, sizeof k2, "{%s:m}:2", run);
    snprintf(k3, sizeof k3, "{%s:m}:3", run);
    snprintf(slot, sizeof slot, "%u", cqrs_redis_key_slot(k1, strlen(k1)));
    freeReplyObject(run_cmd(rc, k1, "SET", k1, "one", NULL));
    freeReplyObject(run_cmd(rc, k2, "SET", k2, "two", NULL));
    cqrs_error_t err;
    size_t n = cqrs_rconn_nodes(rc, &err), src = n, dst;
    assert_true(n >= 2);
    for (size_t i = 0; i < n; i++)
        if (keys_in_slot(rc, i, slot) == 2)
            src = i;
    assert_true(src < n);
    dst = (src + 1) % n;
    char *src_id = node_id(rc, src), *dst_id = node_id(rc, dst);
    assert_true(cqrs_rconn_node_name(rc, dst, name, sizeof name));
    port = strrchr(name, ':');
    *port++ = '\0';

    /* the migration, half done: k1 moved, k2 not yet */
    freeReplyObject(on_node(rc, dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id, NULL));
    freeReplyObject(on_node(rc, src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id, NULL));
    freeReplyObject(on_node(rc, src, "MIGRATE", name, port, "", "0", "5000", "KEYS", k1, NULL));
    uint64_t epoch = cqrs_rconn_map_epoch(rc);
    long asks = errors_sent(rc, src, "ASK");
    expect_string_at(rc, k1, "one"); /* ASK → ASKING + GET on the target */
    expect_string_at(rc, k2, "two"); /* still on the source */
    freeReplyObject(run_cmd(rc, k3, "SET", k3, "three", NULL)); /* a new key: on the target */
    const char *g1[] = {"GET", k1}, *g2[] = {"GET", k2}, *g3[] = {"GET", k3};
    cqrs_rcmd_t gets[] = {{k1, 2, g1, NULL}, {k2, 2, g2, NULL}, {k3, 2, g3, NULL}};
    redisReply *rs[3];
    if (cqrs_rconn_pipeline(rc, 3, gets, rs, &err) != CQRS_ERR_OK)
        fail_msg("pipeline: %s", err.message);
    assert_string_equal(rs[0]->str, "one");
    assert_string_equal(rs[1]->str, "two");
    assert_string_equal(rs[2]->str, "three");
    for (int i = 0; i < 3; i++)
        freeReplyObject(rs[i]);
    assert_true(errors_sent(rc, src, "ASK") >= asks + 3);
    assert_int_equal(keys_in_slot(rc, dst, slot), 2);
    assert_int_equal(keys_in_slot(rc, src, slot), 1);
    assert_int_equal(cqrs_rconn_map_epoch(rc), epoch); /* ASK left the map alone */

    /* the migration ends: the slot is the target's, the source answers MOVED */
    freeReplyObject(on_node(rc, src, "MIGRATE", name, port, "", "0", "5000", "KEYS", k2, NULL));
    assign_slot(rc, n, slot, src, dst, dst_id);
    long moved = errors_sent(rc, src, "MOVED");
    expect_string_at(rc, k1, "one");
    assert_int_equal(errors_sent(rc, src, "MOVED"), moved + 1);
    expect_string_at(rc, k2, "two"); /* after a refresh of the whole map */
    expect_string_at(rc, k3, "three");
    assert_int_equal(errors_sent(rc, src, "MOVED"), moved + 1);
    assert_true(cqrs_rconn_map_epoch(rc) > epoch);

    /* and back, as it was */
    assert_true(cqrs_rconn_node_name(rc, src, name, sizeof name));
    port = strrchr(name, ':');
    *port++ = '\0';
    freeReplyObject(on_node(rc, src, "CLUSTER", "SETSLOT", slot, "IMPORTING", dst_id, NULL));
    freeReplyObject(on_node(rc, dst, "CLUSTER", "SETSLOT", slot, "MIGRATING", src_id, NULL));
    freeReplyObject(
        on_node(rc, dst, "MIGRATE", name, port, "", "0", "5000", "KEYS", k1, k2, k3, NULL));
    assign_slot(rc, n, slot, dst, src, src_id);
    expect_string_at(rc, k3, "three");
    assert_int_equal(keys_in_slot(rc, src, slot), 3);
    freeReplyObject(run_cmd(rc, k1, "DEL", k1, k2, k3, NULL));
    free(src_id);
    free(dst_id);
    cqrs_rconn_free(rc);
}

/* ---- a walk of every node while a slot moves -------------------------------------------- */

typedef struct walk {
    cqrs_docstore_t *ds;
    const char *pattern, *prefix;
    size_t n;
    cqrs_err_t rc;
    cqrs_error_t err;
} walk_t;

static void *walk_main(void *ud)
{
    walk_t *w = ud;
    const char *prefixes[] = {w->prefix};
    w->rc = cqrs_docstore_delete_keys(w->ds, w->pattern, prefixes, 1, &w->n, &w->err);
    return NULL;
}

/* The rebuild's clean-up (cqrs_docstore_delete_keys: SCAN node by node) while a slot moves,
 * whole, from a node the walk has not reached yet to the first node, which it has walked
 * (failpoint scan-after-node holds the walk after that node). The walk saw no MOVED: it learns
 * of the move from the map it asks for after the walk, walks again and deletes every key. */
static void test_a_walk_sees_a_slot_moved_behind_it(void **state)
{
    (void)state;
    enum { K = 50 };
    cqrs_rconn_t *rc = cluster();
    cqrs_error_t err;
    size_t n = cqrs_rconn_nodes(rc, &err), src = 0;
    assert_true(n >= 2);
    /* a shard whose slot is not on node 0, the first the walk visits */
    char shard[128], key[192], slot[16], name[300], *port;
    for (int t = 0; src == 0 && t < 64; t++) {
        snprintf(shard, sizeof shard, "{%s:walk:%d}:g1:", run, t);
        snprintf(slot, sizeof slot, "%u", cqrs_redis_key_slot(shard, strlen(shard)));
        freeReplyObject(run_cmd(rc, shard, "SET", shard, "x", NULL));
        for (size_t i = 1; i < n; i++)
            if (keys_in_slot(rc, i, slot) > 0)
                src = i;
        if (src == 0)
            freeReplyObject(run_cmd(rc, shard, "DEL", shard, NULL));
    }
    assert_true(src > 0);
    for (int i = 0; i < K; i++) {
        snprintf(key, sizeof key, "%sdoc:%d", shard, i);
        freeReplyObject(run_cmd(rc, key, "SET", key, "x", NULL));
    }
    char *src_id = node_id(rc, src), *dst_id = node_id(rc, 0);
    assert_true(cqrs_rconn_node_name(rc, 0, name, sizeof name));
    port = strrchr(name, ':');
    *port++ = '\0';

    cqrs_redis_config_t c = {.url = (char *)testenv_require("CQRS_REDIS_CLUSTER_URL")};
    walk_t w = {.ds = cqrs_docstore_new(&c, 3000, &err), .prefix = shard};
    assert_non_null(w.ds);
    char pattern[160];
    snprintf(pattern, sizeof pattern, "{%s:walk:*", run);
    w.pattern = pattern;
    setenv("CQRS_FAILPOINTS", "scan-after-node=delay:2000*1", 1);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, walk_main, &w), 0);
    usleep(500 * 1000); /* node 0 walked; the walk waits before the next node */

    /* the slot moves to node 0 with its keys, as redis-cli --cluster reshard moves it */
    freeReplyObject(on_node(rc, 0, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id, NULL));
    freeReplyObject(on_node(rc, src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id, NULL));
    for (int i = -1; i < K; i++) {
        if (i < 0)
            snprintf(key, sizeof key, "%s", shard);
        else
            snprintf(key, sizeof key, "%sdoc:%d", shard, i);
        redisReply *r = on_node(rc, src, "MIGRATE", name, port, key, "0", "5000", NULL);
        assert_int_equal(r->type, REDIS_REPLY_STATUS);
        freeReplyObject(r);
    }
    assign_slot(rc, n, slot, src, 0, dst_id);
    assert_int_equal(keys_in_slot(rc, 0, slot), K + 1);

    assert_int_equal(pthread_join(th, NULL), 0);
    unsetenv("CQRS_FAILPOINTS");
    if (w.rc != CQRS_ERR_OK)
        fail_msg("delete_keys: %s", w.err.message);
    assert_int_equal(w.n, K + 1);
    assert_int_equal(keys_in_slot(rc, 0, slot), 0);
    assert_int_equal(keys_in_slot(rc, src, slot), 0);

    /* and back, as it was (the slot is empty now) */
    assign_slot(rc, n, slot, 0, src, src_id);
    cqrs_docstore_destroy(w.ds);
    free(src_id);
    free(dst_id);
    cqrs_rconn_free(rc);
}

/* ---- a single server ------------------------------------------------------------------- */

static void test_single_server_unchanged(void **state)
{
    (void)state;
    char url[1024], key[128];
    if (redisdb_url(testenv_require("CQRS_REDIS_URL"), 12, url, sizeof url) != 0)
        fail_msg("CQRS_REDIS_URL is not a Redis URL");
    cqrs_redis_config_t c = redisdb_config(url);
    cqrs_rconn_t *rc = connect_to(&c);
    snprintf(key, sizeof key, "%s:single", run);
    freeReplyObject(run_cmd(rc, key, "SET", key, "here", NULL));
    assert_false(cqrs_rconn_is_cluster(rc));
    expect_string_at(rc, key, "here");
    /* in the URL's database, as a bare connection sees it */
    redisReply *r = redisdb_cmd(url, "GET %s", key);
    assert_non_null(r);
    assert_string_equal(r->str, "here");
    freeReplyObject(r);
    /* an error reply is the caller's */
    const char *argv[] = {"LPUSH", key, "x"};
    cqrs_error_t err;
    assert_int_equal(cqrs_rconn_command(rc, key, 3, argv, NULL, &r, &err), CQRS_ERR_OK);
    assert_int_equal(r->type, REDIS_REPLY_ERROR);
    assert_non_null(strstr(r->str, "WRONGTYPE"));
    freeReplyObject(r);
    assert_int_equal(cqrs_rconn_nodes(rc, &err), 1);
    const char *del[] = {"DEL", key};
    assert_int_equal(cqrs_rconn_command_node(rc, 0, 2, del, NULL, &r, &err), CQRS_ERR_OK);
    assert_int_equal(r->integer, 1);
    freeReplyObject(r);
    cqrs_rconn_free(rc);
}

int main(void)
{
    snprintf(run, sizeof run, "rc:itest:%d:%lld", (int)getpid(), (long long)time(NULL));
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_writes_land_on_every_primary),
        cmocka_unit_test(test_pipeline_across_every_primary),
        cmocka_unit_test(test_resharding_is_followed),
        cmocka_unit_test(test_a_walk_sees_a_slot_moved_behind_it),
        cmocka_unit_test(test_single_server_unchanged),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
