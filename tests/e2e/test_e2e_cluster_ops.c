/* End-to-end test of the operator's tools with the read model on the stack's Redis Cluster
 * (CQRS_REDIS_CLUSTER_URL, a key prefix of the run's own): cqrsctl verify finds drift, explain
 * follows an aggregate, dlq lists, and rebuild writes a new generation beside the live one and
 * switches to it under commands and reads — no failed command or read, no version going
 * backwards, the drift gone, verify passing, the old generation's keys deleted on every
 * node. The test's own Redis calls go through the platform's cluster client (rcluster.h). */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <hiredis/hiredis.h>
#include <jansson.h>

#include <cqrs/keyspace.h>
#include <cqrs/rcluster.h>
#include <cqrs/util.h>

#include "daemons.h"
#include "httpc.h"
#include "testenv.h"

#define N_PRODUCTS 20

static daemons_t D;
static testdb_t DB;
static char ids[N_PRODUCTS][40];
static cqrs_rconn_t *rc;
static cqrs_redis_target_t target;

static int setup(void **state)
{
    (void)state;
    testenv_require_stack();
    testdb_create(&DB, "clusterops");
    setenv("CQRS_TEST_REDIS_CLUSTER", "1", 1);
    cqrs_redis_config_t c = {.url = (char *)testenv_require("CQRS_REDIS_CLUSTER_URL")};
    cqrs_error_t err;
    if (cqrs_redis_target_init(&target, &c, &err) != CQRS_ERR_OK)
        return -1;
    rc = cqrs_rconn_new(&target, 2000);
    return rc ? daemons_start(&D) : -1;
}

static int teardown(void **state)
{
    (void)state;
    daemons_stop(&D);
    testdb_drop(&DB);
    cqrs_rconn_free(rc);
    cqrs_redis_target_close(&target);
    return 0;
}

/* One command on the cluster, routed by its key (argv[1]). */
static redisReply *cmd(int argc, const char **argv)
{
    redisReply *r = NULL;
    cqrs_error_t err;
    if (cqrs_rconn_command(rc, argv[1], argc, argv, NULL, &r, &err) != CQRS_ERR_OK)
        fail_msg("cluster: %s", err.message);
    return r;
}

static int ctl(const char *args, char *out, size_t cap)
{
    char line[2048];
    snprintf(line, sizeof line,
             "CQRS_PG_DSN='%s' CQRS_REDIS_URL='%s' CQRS_REDIS_PREFIX='%s' CQRS_TOPIC_PREFIX='%s' "
             "%s %s 2>&1",
             DB.dsn, getenv("CQRS_REDIS_CLUSTER_URL"), D.prefix, D.prefix, CQRS_CTL, args);
    FILE *p = popen(line, "r");
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = '\0';
    return WEXITSTATUS(pclose(p));
}

static int verify_until_match(int tries)
{
    static char out[65536];
    int st = 1;
    for (int t = 0; t < tries && st != 0; t++) {
        st = ctl("verify", out, sizeof out);
        if (st != 0)
            usleep(250 * 1000);
    }
    if (st != 0)
        fprintf(stderr, "verify: %s", out);
    return st;
}

static int call(int port, const char *method, const char *path, const char *body, json_t **out)
{
    httpc_response_t r;
    httpc_request(port, method, path, body ? "Content-Type: application/json\r\n" : NULL, body,
                  body ? strlen(body) : 0, &r);
    int st = r.status;
    if (out)
        *out = json_loads(r.body ? r.body : "", 0, NULL);
    httpc_response_free(&r);
    return st;
}

static atomic_bool stop_load;
static atomic_long commands_ok, commands_failed, reads_ok, reads_failed, backwards;

static void *writer(void *arg)
{
    (void)arg;
    unsigned seed = 3;
    while (!atomic_load(&stop_load)) {
        char path[128];
        snprintf(path, sizeof path, "/v1/products/%.36s/stock-adjustments",
                 ids[rand_r(&seed) % N_PRODUCTS]);
        int st = call(D.cport, "POST", path, "{\"delta\":2,\"reason\":\"cluster\"}", NULL);
        atomic_fetch_add(st == 200 ? &commands_ok : &commands_failed, 1);
    }
    return NULL;
}

static void *reader(void *arg)
{
    (void)arg;
    int64_t last[N_PRODUCTS] = {0};
    unsigned seed = 5;
    while (!atomic_load(&stop_load)) {
        int i = (int)(rand_r(&seed) % N_PRODUCTS);
        char path[128];
        snprintf(path, sizeof path, "/v1/products/%.36s", ids[i]);
        json_t *j = NULL;
        if (call(D.qport, "GET", path, NULL, &j) != 200 || !j) {
            atomic_fetch_add(&reads_failed, 1);
        } else {
            int64_t v = json_integer_value(json_object_get(j, "version"));
            if (v < last[i])
                atomic_fetch_add(&backwards, 1);
            last[i] = v;
            atomic_fetch_add(&reads_ok, 1);
        }
        json_decref(j);
    }
    return NULL;
}

/* Keys matching pattern on every primary of the cluster. */
static size_t count_keys(const char *pattern)
{
    cqrs_error_t err;
    size_t nodes = cqrs_rconn_nodes(rc, &err), total = 0;
    for (size_t i = 0; i < nodes; i++) {
        const char *argv[] = {"KEYS", pattern};
        redisReply *r = NULL;
        assert_int_equal(cqrs_rconn_command_node(rc, i, 2, argv, NULL, &r, &err), CQRS_ERR_OK);
        total += r->type == REDIS_REPLY_ARRAY ? r->elements : 0;
        freeReplyObject(r);
    }
    return total;
}

static void test_operator_tools_on_a_cluster(void **state)
{
    (void)state;
    for (int i = 0; i < N_PRODUCTS; i++) {
        char body[256];
        snprintf(body, sizeof body,
                 "{\"sku\":\"CL-%s-%d\",\"name\":\"Cluster lamp %d\",\"category\":\"cl%d\","
                 "\"price_cents\":%d,\"currency\":\"EUR\",\"initial_stock\":100000}",
                 D.prefix, i, i, i % 3, 700 + i);
        json_t *p = NULL;
        assert_int_equal(call(D.cport, "POST", "/v1/products", body, &p), 201);
        snprintf(ids[i], sizeof ids[i], "%s", json_string_value(json_object_get(p, "id")));
        json_decref(p);
    }
    assert_int_equal(verify_until_match(120), 0);
    static char out[65536];
    /* explain and dlq on the cluster */
    char args[128];
    snprintf(args, sizeof args, "explain %s", ids[0]);
    assert_int_equal(ctl(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "applied"));
    assert_int_equal(ctl("dlq list", out, sizeof out), 0);
    assert_non_null(strstr(out, "no aggregate is held"));

    /* drift: a wrong name in product 0's document, found by verify */
    char topic[64], shard[CQRS_SHARD_MAX], key[CQRS_KEY_MAX];
    snprintf(topic, sizeof topic, "%s.product.events", D.prefix);
    const char *lay[] = {"HGET", NULL, topic};
    char layout[64];
    cqrs_keys_global(D.prefix, "layout", layout, sizeof layout);
    lay[1] = layout;
    redisReply *r = cmd(3, lay);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    int parts = atoi(r->str);
    freeReplyObject(r);
    cqrs_keys_shard(D.prefix, topic, cqrs_keys_partition(ids[0], parts), shard, sizeof shard);
    cqrs_keys_doc(shard, ids[0], key, sizeof key);
    const char *get[] = {"HGET", key, "json"};
    r = cmd(3, get);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    json_t *doc = json_loads(r->str, 0, NULL);
    freeReplyObject(r);
    json_object_set_new(doc, "name", json_string("Drifted"));
    char *drifted = json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(doc);
    const char *set[] = {"HSET", key, "json", drifted};
    freeReplyObject(cmd(4, set));
    free(drifted);
    assert_int_equal(ctl("verify", out, sizeof out), 1);

    /* rebuild under commands and reads */
    pthread_t w, rd;
    pthread_create(&w, NULL, writer, NULL);
    pthread_create(&rd, NULL, reader, NULL);
    usleep(500 * 1000);
    int st = ctl("rebuild", out, sizeof out);
    usleep(500 * 1000);
    atomic_store(&stop_load, true);
    pthread_join(w, NULL);
    pthread_join(rd, NULL);
    fprintf(stderr, "rebuild: %scommands %ld ok, reads %ld ok\n", out, atomic_load(&commands_ok),
            atomic_load(&reads_ok));
    assert_int_equal(st, 0);
    assert_non_null(strstr(out, "switched"));
    assert_int_equal(atomic_load(&commands_failed), 0);
    assert_int_equal(atomic_load(&reads_failed), 0);
    assert_int_equal(atomic_load(&backwards), 0);
    assert_true(atomic_load(&reads_ok) > 10);
    assert_int_equal(verify_until_match(120), 0);
    /* generation 1 is gone from every node; generation 2 holds the read model */
    char pattern[128];
    snprintf(pattern, sizeof pattern, "{%s:*}:g1:*", D.prefix);
    assert_int_equal(count_keys(pattern), 0);
    snprintf(pattern, sizeof pattern, "{%s:*}:g2:doc:*", D.prefix);
    assert_int_equal(count_keys(pattern), N_PRODUCTS);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_operator_tools_on_a_cluster),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
