/* test_rcluster.c — the cluster client (libcqrs/src/rcluster.c) against a fake: the key slots
 * of the cluster spec, and the redirections through the real hiredis path, against an
 * in-process server (a thread on loopback ports speaking enough RESP: CLUSTER SLOTS with the
 * map a test sets, MOVED/ASK/TRYAGAIN/CLUSTERDOWN on cue, a node that dies) which records what
 * each node received. The real cluster: tests/integration/test_rcluster_redis.c. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cqrs/rcluster.h>

/* ---- the fake -------------------------------------------------------------------------- */

#define NODES 3
#define CONNS 32

typedef struct conn {
    int fd, node;
    bool asking; /* the last command was ASKING */
    redisReader *rd;
    char out[65536];
    size_t out_len;
} conn_t;

typedef struct range {
    int start, end, node;
} range_t;

/* What a test may change (under mu) and what the fake records. A hook answers a command first
 * (returns the RESP text, or NULL for the default answer); it runs under mu. */
static struct {
    pthread_mutex_t mu;
    pthread_t thread;
    bool stop;
    int lfd[NODES], port[NODES];
    bool down[NODES]; /* listener and connections closed */
    bool single;      /* answer CLUSTER SLOTS as a non-cluster server */
    range_t map[8];
    int n_map;
    const char *(*hook)(int node, bool asking, int argc, char **argv);
    int received[NODES];            /* commands received per node */
    int hold_node, hold_until_node; /* node whose replies wait until the other has… */
    int hold_count;                 /* …received this many commands (0: no hold) */
    conn_t conns[CONNS];
    char log[1 << 16]; /* "<node> <arg> <arg>…\n" per command */
    size_t log_len;
    char reply[4096]; /* a hook's or the default answer */
} F;

static void set_map(int n, const range_t *m)
{
    memcpy(F.map, m, (size_t)n * sizeof *m);
    F.n_map = n;
}

static const char *slots_reply(void)
{
    size_t at = (size_t)snprintf(F.reply, sizeof F.reply, "*%d\r\n", F.n_map);
    for (int i = 0; i < F.n_map; i++)
        at +=
            (size_t)snprintf(F.reply + at, sizeof F.reply - at,
                             "*3\r\n:%d\r\n:%d\r\n*3\r\n$9\r\n127.0.0.1\r\n:%d\r\n$40\r\n%040d\r\n",
                             F.map[i].start, F.map[i].end, F.port[F.map[i].node], F.map[i].node);
    return F.reply;
}

static const char *bulk(const char *s)
{
    snprintf(F.reply, sizeof F.reply, "$%zu\r\n%s\r\n", strlen(s), s);
    return F.reply;
}

static const char *answer(int node, bool asking, int argc, char **argv)
{
    const char *hooked = F.hook ? F.hook(node, asking, argc, argv) : NULL;
    if (hooked)
        return hooked;
    if (argc == 2 && !strcasecmp(argv[0], "CLUSTER") && !strcasecmp(argv[1], "SLOTS"))
        return F.single ? "-ERR This instance has cluster support disabled\r\n" : slots_reply();
    if (!strcasecmp(argv[0], "ASKING") || !strcasecmp(argv[0], "SET") ||
        !strcasecmp(argv[0], "SELECT"))
        return "+OK\r\n";
    if (!strcasecmp(argv[0], "PING"))
        return "+PONG\r\n";
    if (argc == 2 && !strcasecmp(argv[0], "GET")) {
        char v[300];
        snprintf(v, sizeof v, "node%d:%.200s", node, argv[1]);
        return bulk(v);
    }
    return "-ERR unknown command\r\n";
}

static void close_conn(conn_t *c)
{
    close(c->fd);
    redisReaderFree(c->rd);
    memset(c, 0, sizeof *c);
    c->fd = -1;
}

static void serve(conn_t *c)
{
    char buf[16384];
    ssize_t got = read(c->fd, buf, sizeof buf);
    if (got <= 0) {
        close_conn(c);
        return;
    }
    redisReaderFeed(c->rd, buf, (size_t)got);
    void *r;
    while (redisReaderGetReply(c->rd, &r) == REDIS_OK && r) {
        redisReply *cmd = r;
        char *argv[64];
        int argc = 0;
        size_t at = F.log_len;
        at += (size_t)snprintf(F.log + at, sizeof F.log - at, "%d", c->node);
        for (size_t i = 0; i < cmd->elements && argc < 64; i++) {
            argv[argc++] = cmd->element[i]->str;
            at += (size_t)snprintf(F.log + at, sizeof F.log - at, " %s", cmd->element[i]->str);
        }
        at += (size_t)snprintf(F.log + at, sizeof F.log - at, "\n");
        F.log_len = at < sizeof F.log ? at : sizeof F.log - 1;
        F.received[c->node]++;
        bool asking = c->asking;
        c->asking = !strcasecmp(argv[0], "ASKING");
        const char *a = answer(c->node, asking, argc, argv);
        size_t n = strlen(a);
        if (c->out_len + n <= sizeof c->out) {
            memcpy(c->out + c->out_len, a, n);
            c->out_len += n;
        }
        freeReplyObject(cmd);
    }
}

static void flush_conn(conn_t *c)
{
    if (F.hold_count && c->node == F.hold_node && F.received[F.hold_until_node] < F.hold_count)
        return;
    size_t done = 0;
    while (done < c->out_len) {
        ssize_t w = write(c->fd, c->out + done, c->out_len - done);
        if (w <= 0)
            break;
        done += (size_t)w;
    }
    c->out_len = 0;
}

static void *fake_main(void *arg)
{
    (void)arg;
    for (;;) {
        struct pollfd p[NODES + CONNS];
        int who[NODES + CONNS], n = 0;
        pthread_mutex_lock(&F.mu);
        if (F.stop) {
            pthread_mutex_unlock(&F.mu);
            return NULL;
        }
        for (int i = 0; i < NODES; i++) {
            if (F.down[i] && F.lfd[i] >= 0) {
                close(F.lfd[i]);
                F.lfd[i] = -1;
            }
            if (F.lfd[i] >= 0) {
                p[n] = (struct pollfd){.fd = F.lfd[i], .events = POLLIN};
                who[n++] = -1 - i;
            }
        }
        for (int k = 0; k < CONNS; k++) {
            conn_t *c = &F.conns[k];
            if (c->fd >= 0 && F.down[c->node])
                close_conn(c);
            if (c->fd >= 0) {
                flush_conn(c);
                p[n] = (struct pollfd){.fd = c->fd, .events = POLLIN};
                who[n++] = k;
            }
        }
        pthread_mutex_unlock(&F.mu);
        if (poll(p, (nfds_t)n, 5) <= 0)
            continue;
        pthread_mutex_lock(&F.mu);
        for (int j = 0; j < n; j++) {
            if (!p[j].revents)
                continue;
            if (who[j] < 0) {
                int fd = accept(p[j].fd, NULL, NULL);
                int k = 0;
                while (k < CONNS && F.conns[k].fd >= 0)
                    k++;
                if (fd >= 0 && k < CONNS)
                    F.conns[k] = (conn_t){.fd = fd, .node = -1 - who[j], .rd = redisReaderCreate()};
                else if (fd >= 0)
                    close(fd);
            } else if (F.conns[who[j]].fd >= 0) {
                serve(&F.conns[who[j]]);
            }
        }
        pthread_mutex_unlock(&F.mu);
    }
}

static int fake_start(void **state)
{
    (void)state;
    memset(&F, 0, sizeof F);
    pthread_mutex_init(&F.mu, NULL);
    for (int k = 0; k < CONNS; k++)
        F.conns[k].fd = -1;
    for (int i = 0; i < NODES; i++) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t len = sizeof a;
        F.lfd[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (F.lfd[i] < 0 || bind(F.lfd[i], (struct sockaddr *)&a, sizeof a) != 0 ||
            listen(F.lfd[i], 16) != 0 || getsockname(F.lfd[i], (struct sockaddr *)&a, &len) != 0)
            return -1;
        F.port[i] = ntohs(a.sin_port);
    }
    set_map(1, (range_t[]){{0, 16383, 0}});
    return pthread_create(&F.thread, NULL, fake_main, NULL) == 0 ? 0 : -1;
}

static int fake_stop(void **state)
{
    (void)state;
    pthread_mutex_lock(&F.mu);
    F.stop = true;
    pthread_mutex_unlock(&F.mu);
    pthread_join(F.thread, NULL);
    for (int k = 0; k < CONNS; k++)
        if (F.conns[k].fd >= 0)
            close_conn(&F.conns[k]);
    for (int i = 0; i < NODES; i++)
        if (F.lfd[i] >= 0)
            close(F.lfd[i]);
    pthread_mutex_destroy(&F.mu);
    return 0;
}

/* How many times node received exactly this command line ("GET foo"). */
static int seen(int node, const char *line)
{
    char want[256];
    snprintf(want, sizeof want, "%d %s\n", node, line);
    int n = 0;
    pthread_mutex_lock(&F.mu);
    for (const char *p = F.log; (p = strstr(p, want)) != NULL; p += strlen(want))
        if (p == F.log || p[-1] == '\n')
            n++;
    pthread_mutex_unlock(&F.mu);
    return n;
}

static void with_fake(void (*fn)(void))
{
    pthread_mutex_lock(&F.mu);
    fn();
    pthread_mutex_unlock(&F.mu);
}

/* ---- the client under test ------------------------------------------------------------- */

static cqrs_rconn_t *client(int db, int timeout_ms)
{
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d/%d", F.port[0], db);
    cqrs_redis_config_t cfg = {.url = url};
    cqrs_redis_target_t t;
    cqrs_error_t err;
    assert_int_equal(cqrs_redis_target_init(&t, &cfg, &err), CQRS_ERR_OK);
    cqrs_rconn_t *rc = cqrs_rconn_new(&t, timeout_ms);
    cqrs_redis_target_close(&t);
    assert_non_null(rc);
    return rc;
}

/* GET key through rc: OK and the value, or the error code (value ""). */
static cqrs_err_t get(cqrs_rconn_t *rc, const char *key, char *value, size_t cap, cqrs_error_t *err)
{
    const char *argv[] = {"GET", key};
    redisReply *r = NULL;
    value[0] = '\0';
    cqrs_err_t code = cqrs_rconn_command(rc, key, 2, argv, NULL, &r, err);
    if (code == CQRS_ERR_OK) {
        assert_non_null(r);
        snprintf(value, cap, "%s", r->str ? r->str : "");
    } else {
        assert_null(r);
    }
    freeReplyObject(r);
    return code;
}

static void expect_get(cqrs_rconn_t *rc, const char *key, const char *value)
{
    char got[300];
    cqrs_error_t err = {0};
    if (get(rc, key, got, sizeof got, &err) != CQRS_ERR_OK)
        fail_msg("GET %s: %s", key, err.message);
    assert_string_equal(got, value);
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- key slots ------------------------------------------------------------------------- */

static unsigned slot_of(const char *key)
{
    return cqrs_redis_key_slot(key, strlen(key));
}

static void test_key_slots(void **state)
{
    (void)state;
    /* the answers of `redis-cli cluster keyslot` (Redis 7.0.15) */
    assert_int_equal(slot_of("foo"), 12182);
    assert_int_equal(slot_of("123456789"), 12739); /* CRC16/XMODEM check value 0x31C3 */
    assert_int_equal(slot_of(""), 0);
    assert_int_equal(slot_of("{user1000}.following"), 3443);
    assert_int_equal(slot_of("{user1000}.followers"), 3443);
    assert_int_equal(slot_of("foo{}{bar}"), 8363); /* an empty first tag: the whole key */
    assert_int_equal(slot_of("{}"), 15257);
    assert_int_equal(slot_of("foo{{bar}}zap"), 4015); /* the tag is "{bar" */
    assert_int_equal(slot_of("foo{{bar}}zap"), slot_of("{bar"));
    assert_int_equal(slot_of("foo{bar}{zap}"), slot_of("bar")); /* the first tag only */
    assert_int_equal(slot_of("a{b"), 13340);                    /* no closing brace */
    /* the length is honoured: a NUL or what follows it takes part only when counted */
    assert_int_equal(cqrs_redis_key_slot("foox", 3), 12182);
    assert_int_not_equal(cqrs_redis_key_slot("foo\0", 4), 12182);
}

/* ---- single mode ----------------------------------------------------------------------- */

static const char *loading_hook(int node, bool asking, int argc, char **argv)
{
    (void)node, (void)asking;
    if (argc == 2 && !strcmp(argv[0], "GET") && !strcmp(argv[1], "busy"))
        return "-LOADING Redis is loading the dataset in memory\r\n";
    return NULL;
}

static void single_server(void)
{
    F.single = true;
    F.hook = loading_hook;
}

static void test_single_mode_passes_commands_through(void **state)
{
    (void)state;
    with_fake(single_server);
    cqrs_rconn_t *rc = client(3, 1000);
    assert_false(cqrs_rconn_is_cluster(rc));
    expect_get(rc, "foo", "node0:foo");
    assert_false(cqrs_rconn_is_cluster(rc));
    assert_int_equal(seen(0, "CLUSTER SLOTS"), 1);
    assert_int_equal(seen(0, "SELECT 3"), 1); /* the URL's database, as before */
    /* an error reply is the caller's, even one a cluster would retry: one attempt */
    const char *argv[] = {"GET", "busy"};
    redisReply *r = NULL;
    cqrs_error_t err;
    assert_int_equal(cqrs_rconn_command(rc, "busy", 2, argv, NULL, &r, &err), CQRS_ERR_OK);
    assert_int_equal(r->type, REDIS_REPLY_ERROR);
    assert_non_null(strstr(r->str, "LOADING"));
    freeReplyObject(r);
    assert_int_equal(seen(0, "GET busy"), 1);
    /* a pipeline is one pipeline to the one server, replies in order */
    const char *a[] = {"GET", "a"}, *b[] = {"GET", "b"}, *c[] = {"PING"};
    cqrs_rcmd_t cmds[] = {{"a", 2, a, NULL}, {"b", 2, b, NULL}, {NULL, 1, c, NULL}};
    redisReply *rs[3];
    assert_int_equal(cqrs_rconn_pipeline(rc, 3, cmds, rs, &err), CQRS_ERR_OK);
    assert_string_equal(rs[0]->str, "node0:a");
    assert_string_equal(rs[1]->str, "node0:b");
    assert_string_equal(rs[2]->str, "PONG");
    for (int i = 0; i < 3; i++)
        freeReplyObject(rs[i]);
    assert_int_equal(cqrs_rconn_nodes(rc, &err), 1);
    assert_int_equal(seen(0, "CLUSTER SLOTS"), 1); /* the mode is learnt once */
    cqrs_rconn_free(rc);
}

static void test_single_mode_unreachable_fails_fast(void **state)
{
    (void)state;
    with_fake(single_server);
    cqrs_rconn_t *rc = client(0, 1000);
    expect_get(rc, "foo", "node0:foo");
    pthread_mutex_lock(&F.mu);
    F.down[0] = true;
    pthread_mutex_unlock(&F.mu);
    usleep(50 * 1000);
    char v[300];
    cqrs_error_t err;
    long long t0 = now_ms();
    assert_int_equal(get(rc, "foo", v, sizeof v, &err), CQRS_ERR_UNAVAILABLE);
    assert_int_equal(get(rc, "foo", v, sizeof v, &err), CQRS_ERR_UNAVAILABLE);
    assert_true(now_ms() - t0 < 500); /* no retries until the deadline, as before */
    char port[16];
    snprintf(port, sizeof port, ":%d", F.port[0]);
    assert_non_null(strstr(err.message, port));
    cqrs_rconn_free(rc);
}

/* ---- cluster mode ---------------------------------------------------------------------- */

static void test_cluster_mode_refuses_another_database(void **state)
{
    (void)state;
    cqrs_rconn_t *rc = client(2, 1000);
    char v[300];
    cqrs_error_t err;
    assert_int_equal(get(rc, "foo", v, sizeof v, &err), CQRS_ERR_CONFIG);
    assert_non_null(strstr(err.message, "database 2"));
    assert_int_equal(seen(0, "SELECT 2"), 0);
    cqrs_rconn_free(rc);
}

/* node 0 serves everything until the first GET foo, which moves the upper half to node 1 */
static const char *moving_hook(int node, bool asking, int argc, char **argv)
{
    (void)asking;
    if (node == 0 && argc == 2 && !strcmp(argv[0], "GET") && slot_of(argv[1]) >= 8192) {
        set_map(2, (range_t[]){{0, 8191, 0}, {8192, 16383, 1}});
        snprintf(F.reply, sizeof F.reply, "-MOVED %u 127.0.0.1:%d\r\n", slot_of(argv[1]),
                 F.port[1]);
        return F.reply;
    }
    return NULL;
}

static void hook_moving(void)
{
    F.hook = moving_hook;
}

static void test_moved_is_followed_and_the_map_refreshed(void **state)
{
    (void)state;
    with_fake(hook_moving);
    cqrs_rconn_t *rc = client(0, 1000);
    expect_get(rc, "bar", "node0:bar"); /* slot 5061 */
    assert_true(cqrs_rconn_is_cluster(rc));
    uint64_t epoch = cqrs_rconn_map_epoch(rc);
    expect_get(rc, "foo", "node1:foo"); /* slot 12182: MOVED, then node 1 */
    assert_int_equal(seen(0, "GET foo"), 1);
    assert_int_equal(seen(1, "GET foo"), 1);
    /* the retry went by the MOVED alone; the whole map is refreshed at the next call, so
     * another moved slot goes straight to node 1 */
    assert_int_equal(seen(0, "CLUSTER SLOTS") + seen(1, "CLUSTER SLOTS"), 1);
    expect_get(rc, "123456789", "node1:123456789"); /* slot 12739 */
    assert_int_equal(seen(0, "GET 123456789"), 0);
    assert_int_equal(seen(0, "CLUSTER SLOTS") + seen(1, "CLUSTER SLOTS"), 2);
    assert_true(cqrs_rconn_map_epoch(rc) > epoch);
    expect_get(rc, "bar", "node0:bar");
    cqrs_rconn_free(rc);
}

/* slot 12182 is migrating from node 0 to node 1: node 0 says ASK, node 1 serves it only
 * after ASKING (MOVED back otherwise, as a real importing node does) */
static const char *asking_hook(int node, bool asking, int argc, char **argv)
{
    if (argc != 2 || strcmp(argv[0], "GET") != 0 || strcmp(argv[1], "foo") != 0)
        return NULL;
    if (node == 0)
        snprintf(F.reply, sizeof F.reply, "-ASK 12182 127.0.0.1:%d\r\n", F.port[1]);
    else if (!asking)
        snprintf(F.reply, sizeof F.reply, "-MOVED 12182 127.0.0.1:%d\r\n", F.port[0]);
    else
        return NULL;
    return F.reply;
}

static void hook_asking(void)
{
    F.hook = asking_hook;
}

static void test_ask_sends_asking_and_keeps_the_map(void **state)
{
    (void)state;
    with_fake(hook_asking);
    cqrs_rconn_t *rc = client(0, 1000);
    expect_get(rc, "foo", "node1:foo");
    assert_int_equal(seen(1, "ASKING"), 1);
    assert_int_equal(seen(1, "GET foo"), 1);
    expect_get(rc, "foo", "node1:foo");
    /* the map still says node 0: each GET asks it first, and nobody refreshed */
    assert_int_equal(seen(0, "GET foo"), 2);
    assert_int_equal(seen(1, "ASKING"), 2);
    assert_int_equal(seen(0, "CLUSTER SLOTS") + seen(1, "CLUSTER SLOTS"), 1);
    cqrs_rconn_free(rc);
}

static int tryagain_left;

static const char *tryagain_hook(int node, bool asking, int argc, char **argv)
{
    (void)node, (void)asking;
    if (argc == 2 && !strcmp(argv[0], "GET") && tryagain_left > 0) {
        tryagain_left--;
        return "-TRYAGAIN Multiple keys request during rehashing of slot\r\n";
    }
    return NULL;
}

static void hook_tryagain(void)
{
    F.hook = tryagain_hook;
    tryagain_left = 3;
}

static void test_tryagain_is_retried_until_success(void **state)
{
    (void)state;
    with_fake(hook_tryagain);
    cqrs_rconn_t *rc = client(0, 1000);
    expect_get(rc, "foo", "node0:foo");
    assert_int_equal(seen(0, "GET foo"), 4);
    cqrs_rconn_free(rc);
}

static const char *down_hook(int node, bool asking, int argc, char **argv)
{
    (void)node, (void)asking, (void)argc;
    return strcmp(argv[0], "GET") == 0 ? "-CLUSTERDOWN The cluster is down\r\n" : NULL;
}

static void hook_down(void)
{
    F.hook = down_hook;
}

static void test_clusterdown_gives_up_at_the_deadline(void **state)
{
    (void)state;
    with_fake(hook_down);
    cqrs_rconn_t *rc = client(0, 300);
    char v[300];
    cqrs_error_t err;
    long long t0 = now_ms();
    assert_int_equal(get(rc, "foo", v, sizeof v, &err), CQRS_ERR_UNAVAILABLE);
    long long took = now_ms() - t0;
    assert_in_range(took, 280, 600);
    char node[32];
    snprintf(node, sizeof node, "127.0.0.1:%d", F.port[0]);
    assert_non_null(strstr(err.message, node));
    assert_non_null(strstr(err.message, "CLUSTERDOWN"));
    assert_true(seen(0, "GET foo") >= 3); /* retried, with a backoff: not a busy loop */
    assert_true(seen(0, "GET foo") < 100);
    cqrs_rconn_free(rc);
}

static void split_map(void)
{
    set_map(2, (range_t[]){{0, 8191, 0}, {8192, 16383, 1}});
}

static void node1_dies(void)
{
    F.down[1] = true;
    set_map(1, (range_t[]){{0, 16383, 0}});
}

static void test_dead_node_refreshes_the_map(void **state)
{
    (void)state;
    with_fake(split_map);
    cqrs_rconn_t *rc = client(0, 1000);
    expect_get(rc, "foo", "node1:foo");
    with_fake(node1_dies); /* its slots fail over to node 0 */
    usleep(50 * 1000);
    expect_get(rc, "foo", "node0:foo");
    assert_int_equal(seen(0, "CLUSTER SLOTS"), 2);
    cqrs_rconn_free(rc);
}

static void test_pipeline_across_nodes_in_order(void **state)
{
    (void)state;
    with_fake(split_map);
    cqrs_rconn_t *rc = client(0, 1000);
    cqrs_error_t err;
    assert_int_equal(cqrs_rconn_nodes(rc, &err), 2);
    const char *keys[] = {"foo", "bar", "123456789", "{a}1", "{user1000}x", "zz"};
    cqrs_rcmd_t cmds[6];
    const char *argv[6][2];
    int upper = 0;
    for (int i = 0; i < 6; i++) {
        argv[i][0] = "GET";
        argv[i][1] = keys[i];
        cmds[i] = (cqrs_rcmd_t){keys[i], 2, argv[i], NULL};
        upper += slot_of(keys[i]) >= 8192;
    }
    /* the node served first (the lower address) answers only once the other one has all of its
     * commands: a client that read a node's replies before sending to the next would wait
     * until its deadline */
    pthread_mutex_lock(&F.mu);
    F.hold_node = F.port[0] < F.port[1] ? 0 : 1;
    F.hold_until_node = 1 - F.hold_node;
    F.hold_count = F.received[F.hold_until_node] + (F.hold_until_node ? upper : 6 - upper);
    pthread_mutex_unlock(&F.mu);
    redisReply *rs[6];
    if (cqrs_rconn_pipeline(rc, 6, cmds, rs, &err) != CQRS_ERR_OK)
        fail_msg("pipeline: %s", err.message);
    for (int i = 0; i < 6; i++) {
        char want[64];
        snprintf(want, sizeof want, "node%d:%s", slot_of(keys[i]) >= 8192 ? 1 : 0, keys[i]);
        assert_string_equal(rs[i]->str, want);
        freeReplyObject(rs[i]);
    }
    assert_int_equal(seen(1, "GET foo") + seen(1, "GET 123456789"), 2);
    cqrs_rconn_free(rc);
}

/* In a pipeline, foo is MOVED (to node 0) and bar asked to TRYAGAIN once. */
static int bar_tries;

static const char *pipeline_hook(int node, bool asking, int argc, char **argv)
{
    (void)asking;
    if (argc != 2 || strcmp(argv[0], "GET") != 0)
        return NULL;
    if (node == 1 && !strcmp(argv[1], "foo")) {
        set_map(1, (range_t[]){{0, 16383, 0}});
        snprintf(F.reply, sizeof F.reply, "-MOVED 12182 127.0.0.1:%d\r\n", F.port[0]);
        return F.reply;
    }
    if (!strcmp(argv[1], "bar") && bar_tries++ == 0)
        return "-TRYAGAIN Multiple keys request during rehashing of slot\r\n";
    return NULL;
}

static void hook_pipeline(void)
{
    split_map();
    F.hook = pipeline_hook;
    bar_tries = 0;
}

static void test_pipeline_redoes_redirected_commands(void **state)
{
    (void)state;
    with_fake(hook_pipeline);
    cqrs_rconn_t *rc = client(0, 1000);
    const char *a[] = {"GET", "foo"}, *b[] = {"GET", "bar"}, *c[] = {"GET", "zz"};
    cqrs_rcmd_t cmds[] = {{"foo", 2, a, NULL}, {"bar", 2, b, NULL}, {"zz", 2, c, NULL}};
    redisReply *rs[3];
    cqrs_error_t err;
    if (cqrs_rconn_pipeline(rc, 3, cmds, rs, &err) != CQRS_ERR_OK)
        fail_msg("pipeline: %s", err.message);
    assert_string_equal(rs[0]->str, "node0:foo");
    assert_string_equal(rs[1]->str, "node0:bar");
    assert_string_equal(rs[2]->str, slot_of("zz") >= 8192 ? "node1:zz" : "node0:zz");
    for (int i = 0; i < 3; i++)
        freeReplyObject(rs[i]);
    assert_int_equal(seen(1, "GET foo"), 1);
    assert_int_equal(seen(0, "GET foo"), 1);
    assert_int_equal(seen(0, "GET bar"), 2);
    cqrs_rconn_free(rc);
}

static void test_pipeline_failure_returns_no_replies(void **state)
{
    (void)state;
    with_fake(hook_down);
    cqrs_rconn_t *rc = client(0, 200);
    const char *a[] = {"PING"}, *b[] = {"GET", "bar"};
    cqrs_rcmd_t cmds[] = {{NULL, 1, a, NULL}, {"bar", 2, b, NULL}};
    redisReply *rs[2] = {(redisReply *)1, (redisReply *)1};
    cqrs_error_t err;
    assert_int_equal(cqrs_rconn_pipeline(rc, 2, cmds, rs, &err), CQRS_ERR_UNAVAILABLE);
    assert_null(rs[0]);
    assert_null(rs[1]);
    cqrs_rconn_free(rc);
}

static void seed_is_a_replica(void)
{
    set_map(2, (range_t[]){{0, 8191, 1}, {8192, 16383, 2}});
}

static void test_seed_that_serves_no_slot_is_left_alone(void **state)
{
    (void)state;
    with_fake(seed_is_a_replica);
    cqrs_rconn_t *rc = client(0, 1000);
    cqrs_error_t err;
    assert_int_equal(cqrs_rconn_nodes(rc, &err), 2);
    expect_get(rc, "bar", "node1:bar");
    expect_get(rc, "foo", "node2:foo");
    const char *a[] = {"GET", "foo"}, *b[] = {"GET", "bar"}, *c[] = {"PING"};
    cqrs_rcmd_t cmds[] = {{"foo", 2, a, NULL}, {"bar", 2, b, NULL}, {NULL, 1, c, NULL}};
    redisReply *rs[3];
    assert_int_equal(cqrs_rconn_pipeline(rc, 3, cmds, rs, &err), CQRS_ERR_OK);
    assert_string_equal(rs[0]->str, "node2:foo");
    assert_string_equal(rs[1]->str, "node1:bar");
    assert_string_equal(rs[2]->str, "PONG");
    for (int i = 0; i < 3; i++)
        freeReplyObject(rs[i]);
    pthread_mutex_lock(&F.mu);
    int to_seed = F.received[0];
    pthread_mutex_unlock(&F.mu);
    assert_int_equal(to_seed, 1); /* CLUSTER SLOTS, nothing else */
    cqrs_rconn_free(rc);
}

static void test_per_node_commands_and_close(void **state)
{
    (void)state;
    with_fake(split_map);
    cqrs_rconn_t *rc = client(0, 1000);
    cqrs_error_t err;
    assert_int_equal(cqrs_rconn_nodes(rc, &err), 2);
    char n0[64], n1[64], want[64];
    assert_true(cqrs_rconn_node_name(rc, 0, n0, sizeof n0));
    assert_true(cqrs_rconn_node_name(rc, 1, n1, sizeof n1));
    assert_false(cqrs_rconn_node_name(rc, 2, want, sizeof want));
    assert_true(strcmp(n0, n1) < 0); /* sorted by address */
    for (size_t i = 0; i < 2; i++) {
        const char *argv[] = {"PING"};
        redisReply *r = NULL;
        assert_int_equal(cqrs_rconn_command_node(rc, i, 1, argv, NULL, &r, &err), CQRS_ERR_OK);
        assert_string_equal(r->str, "PONG");
        freeReplyObject(r);
    }
    assert_int_equal(seen(0, "PING"), 1);
    assert_int_equal(seen(1, "PING"), 1);
    /* close forgets everything: the next call starts over from the seed */
    cqrs_rconn_close(rc);
    assert_false(cqrs_rconn_is_cluster(rc));
    expect_get(rc, "foo", "node1:foo");
    assert_int_equal(seen(0, "CLUSTER SLOTS"), 2);
    cqrs_rconn_free(rc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key_slots),
        cmocka_unit_test_setup_teardown(test_single_mode_passes_commands_through, fake_start,
                                        fake_stop),
        cmocka_unit_test_setup_teardown(test_single_mode_unreachable_fails_fast, fake_start,
                                        fake_stop),
        cmocka_unit_test_setup_teardown(test_cluster_mode_refuses_another_database, fake_start,
                                        fake_stop),
        cmocka_unit_test_setup_teardown(test_moved_is_followed_and_the_map_refreshed, fake_start,
                                        fake_stop),
        cmocka_unit_test_setup_teardown(test_ask_sends_asking_and_keeps_the_map, fake_start,
                                        fake_stop),
        cmocka_unit_test_setup_teardown(test_tryagain_is_retried_until_success, fake_start,
                                        fake_stop),
        cmocka_unit_test_setup_teardown(test_clusterdown_gives_up_at_the_deadline, fake_start,
                                        fake_stop),
        cmocka_unit_test_setup_teardown(test_dead_node_refreshes_the_map, fake_start, fake_stop),
        cmocka_unit_test_setup_teardown(test_pipeline_across_nodes_in_order, fake_start, fake_stop),
        cmocka_unit_test_setup_teardown(test_pipeline_redoes_redirected_commands, fake_start,
                                        fake_stop),
        cmocka_unit_test_setup_teardown(test_pipeline_failure_returns_no_replies, fake_start,
                                        fake_stop),
        cmocka_unit_test_setup_teardown(test_seed_that_serves_no_slot_is_left_alone, fake_start,
                                        fake_stop),
        cmocka_unit_test_setup_teardown(test_per_node_commands_and_close, fake_start, fake_stop),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
