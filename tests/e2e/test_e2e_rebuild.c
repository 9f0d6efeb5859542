/* End-to-end test of `cqrsctl rebuild`, in a PostgreSQL database and a Redis database of its
 * own (10): under a steady stream of commands and reads the rebuild writes a new generation
 * beside the live one and switches to it; no read fails, no read sees a version go backwards,
 * no command fails, drift injected into the live read model before the rebuild is gone,
 * `cqrsctl verify` passes after the switch and the old generation is deleted. The spill path
 * (at most 7 aggregates in memory) and a build held between reading the rows' versions and the
 * log while every product changes (aggregates written during the read, then read back for
 * their later events) give the same read model. A rebuild that
 * stalls past its pause before the switch (failpoint) switches nothing, and the live read
 * model stays complete. */
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

#include <cqrs/util.h>

#include "daemons.h"
#include "httpc.h"
#include "redisdb.h"
#include "testenv.h"

#define LIVE_DB 10
#define N_PRODUCTS 30

static daemons_t D;
static testdb_t DB;
static char live_url[1024];
static char ids[N_PRODUCTS][40];

static int setup(void **state)
{
    (void)state;
    testenv_require_stack();
    testdb_create(&DB, "rebuild");
    redisdb_url(getenv("CQRS_REDIS_URL"), LIVE_DB, live_url, sizeof live_url);
    D.redis_db = LIVE_DB;
    return daemons_start(&D);
}

static int teardown(void **state)
{
    (void)state;
    daemons_stop(&D);
    testdb_drop(&DB);
    return 0;
}

static int call_status(const char *method, const char *path, const char *body, json_t **out)
{
    httpc_response_t r;
    httpc_request(D.cport, method, path, body ? "Content-Type: application/json\r\n" : NULL, body,
                  body ? strlen(body) : 0, &r);
    int st = r.status;
    if (out)
        *out = json_loads(r.body ? r.body : "", 0, NULL);
    httpc_response_free(&r);
    return st;
}

/* Runs cqrsctl with the test's databases (and env, e.g. failpoints); returns its exit status,
 * output in out. */
static int ctl_env(const char *env, const char *args, char *out, size_t cap)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "%s CQRS_PG_DSN='%s' CQRS_REDIS_URL='%s' CQRS_TOPIC_PREFIX='%s' %s %s 2>&1", env,
             DB.dsn, live_url, D.prefix, CQRS_CTL, args);
    FILE *p = popen(cmd, "r");
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = '\0';
    return WEXITSTATUS(pclose(p));
}

static int ctl(const char *args, char *out, size_t cap)
{
    return ctl_env("", args, out, cap);
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
        fprintf(stderr, "verify: %s\n", out);
    return st;
}

static atomic_bool stop_load;
static atomic_long commands_ok, commands_failed, reads_ok, reads_failed, backwards;

static void *writer(void *arg)
{
    (void)arg;
    unsigned seed = 7;
    while (!atomic_load(&stop_load)) {
        int i = (int)(rand_r(&seed) % N_PRODUCTS);
        char path[128], body[256];
        int st;
        if (rand_r(&seed) % 4 == 0) {
            snprintf(body, sizeof body,
                     "{\"customer_id\":\"6f9619ff-8b86-4011-b42d-00c04fc964ff\",\"items\":["
                     "{\"product_id\":\"%.36s\",\"quantity\":1}]}",
                     ids[i]);
            st = call_status("POST", "/v1/orders", body, NULL);
        } else {
            snprintf(path, sizeof path, "/v1/products/%.36s/stock-adjustments", ids[i]);
            st = call_status("POST", path, "{\"delta\":3,\"reason\":\"rebuild test\"}", NULL);
        }
        atomic_fetch_add(st >= 200 && st < 300 ? &commands_ok : &commands_failed, 1);
    }
    return NULL;
}

static void *reader(void *arg)
{
    (void)arg;
    int64_t last[N_PRODUCTS] = {0};
    unsigned seed = 11;
    while (!atomic_load(&stop_load)) {
        int i = (int)(rand_r(&seed) % N_PRODUCTS);
        char path[128];
        snprintf(path, sizeof path, "/v1/products/%.36s", ids[i]);
        httpc_response_t r;
        httpc_request(D.qport, "GET", path, NULL, NULL, 0, &r);
        json_t *j = r.status == 200 ? json_loads(r.body, 0, NULL) : NULL;
        if (!j) {
            atomic_fetch_add(&reads_failed, 1);
            fprintf(stderr, "read failed: %d %s\n", r.status, r.body ? r.body : "");
        } else {
            int64_t v = json_integer_value(json_object_get(j, "version"));
            if (v < last[i]) {
                atomic_fetch_add(&backwards, 1);
                fprintf(stderr, "product %d went back from %lld to %lld\n", i, (long long)last[i],
                        (long long)v);
            }
            last[i] = v;
            atomic_fetch_add(&reads_ok, 1);
        }
        json_decref(j);
        httpc_response_free(&r);
    }
    return NULL;
}

static void test_rebuild_under_load(void **state)
{
    (void)state;
    for (int i = 0; i < N_PRODUCTS; i++) {
        char body[256];
        snprintf(body, sizeof body,
                 "{\"sku\":\"RB-%s-%d\",\"name\":\"Rebuilt lamp %d\",\"description\":\"oak and "
                 "steel\",\"category\":\"%s\",\"price_cents\":%d,\"currency\":\"EUR\","
                 "\"initial_stock\":100000}",
                 D.prefix, i, i,
                 /* a category that looks like a generation: deleting generation 1 must not
                  * touch the live lists that carry it in their key */
                 i % 3 == 0   ? "rb0"
                 : i % 3 == 1 ? "rb1"
                              : "rb}:g1:x",
                 500 + i);
        json_t *p = NULL;
        assert_int_equal(call_status("POST", "/v1/products", body, &p), 201);
        snprintf(ids[i], sizeof ids[i], "%s", json_string_value(json_object_get(p, "id")));
        json_decref(p);
    }
    assert_int_equal(verify_until_match(120), 0);

    /* Drift the live read model: a wrong name (same version) and a stray list entry. */
    char key[CQRS_KEY_MAX], shard[CQRS_SHARD_MAX];
    assert_int_equal(redisdb_shard(live_url, D.prefix, "product", ids[0], shard, sizeof shard), 0);
    cqrs_keys_doc(shard, ids[0], key, sizeof key);
    redisContext *c = redisdb_connect(live_url);
    assert_non_null(c);
    redisReply *rj = redisCommand(c, "HGET %s json", key);
    assert_non_null(rj);
    json_t *doc = json_loads(rj->str, 0, NULL);
    freeReplyObject(rj);
    json_object_set_new(doc, "name", json_string("Drifted"));
    char *drifted = json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(doc);
    freeReplyObject(redisCommand(c, "HSET %s json %s", key, drifted));
    free(drifted);
    freeReplyObject(redisCommand(c, "ZADD %sidx:p:name:active 0 stray-entry", shard));
    static char out[65536];
    assert_int_equal(ctl("verify", out, sizeof out), 1);

    /* Usage errors change nothing (the scratch database of earlier versions is gone). */
    assert_int_equal(ctl("rebuild --scratch-db 6", out, sizeof out), 2);
    assert_non_null(strstr(out, "generation"));
    assert_int_equal(ctl("rebuild --projection nonsense", out, sizeof out), 2);

    pthread_t w, r1, r2;
    pthread_create(&w, NULL, writer, NULL);
    pthread_create(&r1, NULL, reader, NULL);
    pthread_create(&r2, NULL, reader, NULL);
    usleep(1000 * 1000);
    long commands_before = atomic_load(&commands_ok);
    int st = ctl("rebuild", out, sizeof out);
    long commands_during = atomic_load(&commands_ok) - commands_before;
    usleep(1000 * 1000);
    atomic_store(&stop_load, true);
    pthread_join(w, NULL);
    pthread_join(r1, NULL);
    pthread_join(r2, NULL);
    fprintf(stderr, "rebuild: %s", out);
    fprintf(stderr, "commands %ld ok (%ld during the rebuild), reads %ld ok\n",
            atomic_load(&commands_ok), commands_during, atomic_load(&reads_ok));
    assert_int_equal(st, 0);
    assert_non_null(strstr(out, "switched"));
    assert_true(commands_during > 0); /* the rebuild ran under load */
    assert_int_equal(atomic_load(&commands_failed), 0);
    assert_int_equal(atomic_load(&reads_failed), 0);
    assert_int_equal(atomic_load(&backwards), 0);
    assert_true(atomic_load(&reads_ok) > 100);

    /* The new generation matches the write model (drift gone), and keeps following it. */
    assert_int_equal(verify_until_match(120), 0);
    assert_int_equal(redisdb_shard(live_url, D.prefix, "product", ids[0], shard, sizeof shard), 0);
    assert_non_null(strstr(shard, "}:g2:")); /* readers follow generation 2 */
    cqrs_keys_doc(shard, ids[0], key, sizeof key);
    rj = redisCommand(c, "HGET %s json", key);
    assert_int_equal(rj->type, REDIS_REPLY_STRING);
    assert_null(strstr(rj->str, "Drifted"));
    freeReplyObject(rj);
    char path[128];
    snprintf(path, sizeof path, "/v1/products/%.36s/stock-adjustments", ids[1]);
    json_t *p = NULL;
    assert_int_equal(call_status("POST", path, "{\"delta\":1,\"reason\":\"after\"}", &p), 200);
    long long v = json_integer_value(json_object_get(p, "version"));
    json_decref(p);
    snprintf(path, sizeof path, "/v1/products/%.36s?min_version=%lld&wait_ms=5000", ids[1], v);
    httpc_response_t r;
    httpc_request(D.qport, "GET", path, NULL, NULL, 0, &r);
    assert_int_equal(r.status, 200);
    httpc_response_free(&r);
    assert_int_equal(verify_until_match(120), 0);

    /* Again with at most 7 aggregates in memory: the spill path (documents written out, read
     * back for later events and for their list entries) gives the same read model. */
    assert_int_equal(ctl("rebuild --max-in-memory 7", out, sizeof out), 0);
    assert_int_equal(verify_until_match(120), 0);

    /* An aggregate that reaches the version its row had when the build began is written whole
     * at once, while the log is still read. Held between reading those versions and opening
     * its events' cursor (failpoint), the build meets events committed meanwhile for
     * aggregates it already wrote: it reads them back and goes on with them in memory — with
     * at most 5 in memory, most are written again at a spill, the last ones at the end — and
     * the result matches. */
    char cmd[2048];
    snprintf(
        cmd, sizeof cmd,
        "CQRS_FAILPOINTS=rebuild-after-targets=delay:3000 CQRS_PG_DSN='%s' "
        "CQRS_REDIS_URL='%s' CQRS_TOPIC_PREFIX='%s' %s rebuild --jobs 1 --max-in-memory 5 2>&1",
        DB.dsn, live_url, D.prefix, CQRS_CTL);
    FILE *rb = popen(cmd, "r");
    assert_non_null(rb);
    static char line[4096];
    bool held = false;
    while (!held && fgets(line, sizeof line, rb))
        held = strstr(line, "rebuild-after-targets") != NULL;
    assert_true(held);
    for (int i = 0; i < N_PRODUCTS; i++) {
        snprintf(path, sizeof path, "/v1/products/%.36s/stock-adjustments", ids[i]);
        assert_int_equal(call_status("POST", path, "{\"delta\":1,\"reason\":\"meanwhile\"}", NULL),
                         200);
    }
    size_t got = fread(out, 1, sizeof out - 1, rb);
    out[got] = '\0';
    int rb_status = pclose(rb);
    fprintf(stderr, "rebuild held after the versions: %s", out);
    assert_true(WIFEXITED(rb_status) && WEXITSTATUS(rb_status) == 0);
    const char *meanwhile = strstr(out, "aggregates written meanwhile, ");
    assert_non_null(meanwhile);
    long long reread = atoll(meanwhile + strlen("aggregates written meanwhile, "));
    assert_true(reread >= 1); /* the path was taken (the products without dead letters) */
    assert_int_equal(verify_until_match(120), 0);

    /* The old generations are gone; the live one (4) holds the read model — every key of
     * this run's shards is of generation 4 (the generation right after the tag: a category
     * may hold "}:g1:" further on, and its lists must stay). */
    char pattern[128];
    snprintf(pattern, sizeof pattern, "{cqrs:%s.*", D.prefix);
    redisReply *k = redisCommand(c, "KEYS %s", pattern);
    assert_non_null(k);
    size_t live = 0, tricky = 0;
    for (size_t i = 0; i < k->elements; i++) {
        const char *name = k->element[i]->str, *after = strstr(name, "}:");
        assert_non_null(after);
        if (strncmp(after, "}:gen", 5) == 0)
            continue; /* the shard's pointer */
        if (strncmp(after, "}:g4:", 5) != 0)
            fail_msg("a key of another generation is left: %s", name);
        live++;
        tricky += strstr(after + 5, "}:g1:") != NULL;
    }
    assert_true(live > N_PRODUCTS);
    assert_true(tricky > 0); /* the category lists that look like generation 1 are there */
    freeReplyObject(k);
    redisFree(c);
}

/* Issue 16, defect 7: cqrsctl stalls between its last check of the pause and the swap, longer
 * than the pause lasts (failpoint rebuild-before-swap=delay:11000 > the 10 s pause). The live
 * projector goes on meanwhile, after the offsets were copied; swapping now would put a
 * generation live that misses those events. The swap must be refused and nothing change. */
static void test_switch_after_the_pause_lapsed_is_refused(void **state)
{
    (void)state;
    atomic_store(&stop_load, false);
    atomic_store(&commands_failed, 0);
    pthread_t w;
    pthread_create(&w, NULL, writer, NULL);
    usleep(500 * 1000);
    static char out[65536];
    const char *args = "rebuild";
    long before = atomic_load(&commands_ok);
    int st = ctl_env("CQRS_FAILPOINTS=rebuild-before-swap=delay:11000", args, out, sizeof out);
    long during = atomic_load(&commands_ok) - before;
    atomic_store(&stop_load, true);
    pthread_join(w, NULL);
    fprintf(stderr, "stalled rebuild (exit %d, %ld commands meanwhile): %s", st, during, out);
    assert_true(during > 0);
    assert_int_not_equal(st, 0);
    assert_non_null(strstr(out, "nothing switched"));
    assert_int_equal(atomic_load(&commands_failed), 0);
    /* the live read model kept every event */
    assert_int_equal(verify_until_match(120), 0);
    /* and a rebuild without the stall switches */
    assert_int_equal(ctl(args, out, sizeof out), 0);
    assert_int_equal(verify_until_match(120), 0);
}

/* Review of issue 18: one rebuild at a time (a lease), and what a dead run left is deleted by
 * the next one. */
static void test_one_rebuild_at_a_time_and_leftovers(void **state)
{
    (void)state;
    static char out[65536];
    redisContext *c = redisdb_connect(live_url);
    assert_non_null(c);
    freeReplyObject(redisCommand(c, "SET cqrs:rebuild:lease someone-else PX 60000"));
    assert_int_equal(ctl("rebuild", out, sizeof out), 2);
    assert_non_null(strstr(out, "another rebuild is running"));
    freeReplyObject(redisCommand(c, "DEL cqrs:rebuild:lease"));
    /* a run that died while it built generation 9 of shard 0 */
    char topic[96], key[CQRS_KEY_MAX], member[160];
    snprintf(topic, sizeof topic, "%s.product.events", D.prefix);
    snprintf(key, sizeof key, "{cqrs:%s:0}:g9:doc:left-behind", topic);
    snprintf(member, sizeof member, "%s 0 9", topic);
    freeReplyObject(redisCommand(c, "HSET %s v 1", key));
    freeReplyObject(redisCommand(c, "SADD cqrs:rebuild:garbage %s", member));
    assert_int_equal(ctl("rebuild", out, sizeof out), 0);
    assert_non_null(strstr(out, "earlier runs left"));
    redisReply *r = redisCommand(c, "EXISTS %s", key);
    assert_int_equal(r->integer, 0);
    freeReplyObject(r);
    r = redisCommand(c, "SCARD cqrs:rebuild:garbage");
    assert_int_equal(r->integer, 0); /* the old generation was deleted too */
    freeReplyObject(r);
    r = redisCommand(c, "EXISTS cqrs:rebuild:lease");
    assert_int_equal(r->integer, 0); /* given up */
    freeReplyObject(r);
    redisFree(c);
    assert_int_equal(verify_until_match(120), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rebuild_under_load),
        cmocka_unit_test(test_switch_after_the_pause_lapsed_is_refused),
        cmocka_unit_test(test_one_rebuild_at_a_time_and_leftovers),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
