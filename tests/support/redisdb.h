/* redisdb.h — a private Redis database for a test: the stack's Redis (CQRS_REDIS_URL and the
 * other Redis settings of the environment — rediss://, the ACL user and its password file, the
 * CA and client certificate of the TLS profile — read with the daemons' own table) with
 * another database number, so a test may flush it without touching anything else.
 *
 * Two kinds of connection:
 *   - what the code under test gets (redisdb_config, and the daemons the tests start, which
 *     inherit the environment): the environment's credentials — on the TLS stack the
 *     least-privilege ACL user the daemons run as;
 *   - the test's own connection to prepare and inspect data (redisdb_connect, redisdb_cmd):
 *     it stands for the operator, so it logs in as CQRS_REDIS_ADMIN_USER with the password in
 *     CQRS_REDIS_ADMIN_PASSWORD_FILE when the stack has such a user (`stack.sh env` of the TLS
 *     profile), and with the environment's credentials otherwise. Either way over the same
 *     connection code as the daemons (redis.h), so over TLS when the URL says rediss://. */
#ifndef CQRS_TEST_REDISDB_H
#define CQRS_TEST_REDISDB_H

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cqrs/config.h>
#include <cqrs/docstore.h>
#include <cqrs/keyspace.h>
#include <cqrs/redis.h>

static cqrs_redis_config_t redisdb_env_config;
static int redisdb_env_bad;

static inline void redisdb_env_load(void)
{
    const cqrs_config_entry_t e[] = {CQRS_REDIS_SETTINGS(redisdb_env_config, "")};
    redisdb_env_bad = cqrs_config_load(e, CQRS_REDIS_SETTINGS_N, NULL, NULL, stderr);
}

/* The Redis settings of the environment, loaded once (kept for the life of the process). */
static inline const cqrs_redis_config_t *redisdb_env(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, redisdb_env_load);
    return &redisdb_env_config;
}

/* The environment's Redis settings with another URL (borrowed: url must outlive the result). */
static inline cqrs_redis_config_t redisdb_config(const char *url)
{
    cqrs_redis_config_t c = *redisdb_env();
    c.url = (char *)url;
    return c;
}

/* Appends s percent-encoded (all but RFC 3986's unreserved characters). */
static inline size_t redisdb_encode(const char *s, char *out, size_t at, size_t cap)
{
    static const char hex[] = "0123456789ABCDEF";
    for (; *s && at + 4 < cap; s++) {
        unsigned char c = (unsigned char)*s;
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
            c == '-' || c == '.' || c == '_' || c == '~') {
            out[at++] = (char)c;
        } else {
            out[at++] = '%';
            out[at++] = hex[c >> 4];
            out[at++] = hex[c & 15];
        }
    }
    out[at] = '\0';
    return at;
}

/* Formats a's server with user (NULL: a's) and db as a URL — the password only when the
 * parsed URL held one. 0 on success. */
static inline int redisdb_format(const cqrs_redis_addr_t *a, const char *user, int db, char *out,
                                 size_t cap)
{
    if (cap < 600)
        return -1;
    size_t at = (size_t)snprintf(out, cap, "%s://", a->tls ? "rediss" : "redis");
    bool pw = a->password[0] && !user; /* another user: not a's password */
    user = user ? user : a->user;
    if (user[0] || pw) {
        at = redisdb_encode(user, out, at, cap);
        if (pw) {
            out[at++] = ':';
            at = redisdb_encode(a->password, out, at, cap);
        }
        out[at++] = '@';
    }
    bool v6 = strchr(a->host, ':') != NULL;
    int n = snprintf(out + at, cap - at, v6 ? "[%s]:%d/%d" : "%s:%d/%d", a->host, a->port, db);
    return n > 0 && (size_t)n < cap - at ? 0 : -1;
}

/* Writes the stack's Redis URL (base) with database db into out; 0 on success. */
static inline int redisdb_url(const char *base, int db, char *out, size_t cap)
{
    cqrs_redis_addr_t a;
    cqrs_error_t err;
    if (cqrs_redis_url_parse(base, &a, &err) != CQRS_ERR_OK)
        return -1;
    return redisdb_format(&a, NULL, db, out, cap);
}

/* The first line of a file (malloc'ed), NULL when unreadable. */
static inline char *redisdb_read_line(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    char buf[512];
    char *line = NULL;
    if (fgets(buf, sizeof buf, f)) {
        buf[strcspn(buf, "\r\n")] = '\0';
        line = strdup(buf);
    }
    fclose(f);
    return line;
}

/* The test's own connection to the database of url (the operator's credentials, above; caller
 * frees with redisFree); NULL with the reason on stderr when it cannot be made. */
static inline redisContext *redisdb_connect(const char *url)
{
    cqrs_redis_config_t c = redisdb_config(url);
    char admin_url[1024];
    char *admin_password = NULL;
    const char *admin = getenv("CQRS_REDIS_ADMIN_USER");
    cqrs_error_t err;
    if (admin && *admin) {
        const char *file = getenv("CQRS_REDIS_ADMIN_PASSWORD_FILE");
        cqrs_redis_addr_t a;
        admin_password = file ? redisdb_read_line(file) : NULL;
        if (!admin_password || cqrs_redis_url_parse(url, &a, &err) != CQRS_ERR_OK ||
            redisdb_format(&a, admin, a.db, admin_url, sizeof admin_url) != 0) {
            fprintf(stderr, "redisdb: CQRS_REDIS_ADMIN_USER is set but its password file "
                            "(CQRS_REDIS_ADMIN_PASSWORD_FILE) or the URL is unusable\n");
            free(admin_password);
            return NULL;
        }
        c.url = admin_url;
        c.password = admin_password;
    }
    cqrs_redis_target_t t;
    redisContext *ctx = NULL;
    if (cqrs_redis_target_init(&t, &c, &err) == CQRS_ERR_OK)
        ctx = cqrs_redis_connect(&t, 5000, &err);
    cqrs_redis_target_close(&t);
    free(admin_password);
    if (!ctx)
        fprintf(stderr, "redisdb: %s\n", err.message);
    return ctx;
}

/* Runs one command (printf-style) on that database; returns the reply (caller frees). */
static inline redisReply *redisdb_cmd(const char *url, const char *fmt, const char *arg)
{
    redisContext *c = redisdb_connect(url);
    if (!c)
        return NULL;
    redisReply *r = arg ? redisCommand(c, fmt, arg) : redisCommand(c, fmt);
    redisFree(c);
    return r;
}

/* The shard of an aggregate of type in the read model at url (keyspace.h; default prefix
 * "cqrs"), in the generation its pointer names (keyspace.h): its topic
 * "<topic_prefix>.<type>.events" has the partition count the projector recorded in
 * cqrs:layout. 0, or -1 when none is recorded. */
static inline int redisdb_shard(const char *url, const char *topic_prefix, const char *type,
                                const char *id, char *shard, size_t cap)
{
    char topic[256];
    snprintf(topic, sizeof topic, "%s.%s.events", topic_prefix, type);
    redisReply *r = redisdb_cmd(url, "HGET cqrs:layout %s", topic);
    int n = r && r->type == REDIS_REPLY_STRING ? atoi(r->str) : 0;
    freeReplyObject(r);
    if (n <= 0)
        return -1;
    char base[CQRS_SHARD_MAX], ptr[CQRS_KEY_MAX];
    int32_t p = cqrs_keys_partition(id, n);
    cqrs_keys_shard("cqrs", topic, p, base, sizeof base);
    cqrs_keys_shard_parse(base, ptr, sizeof ptr, NULL);
    r = redisdb_cmd(url, "GET %s", ptr);
    long long gen = r && r->type == REDIS_REPLY_STRING ? atoll(r->str) : 1;
    freeReplyObject(r);
    cqrs_keys_shard_gen("cqrs", topic, p, gen > 0 ? gen : 1, shard, cap);
    return 0;
}

/* The key of an aggregate's document (cap ≥ CQRS_KEY_MAX); -1 as redisdb_shard. */
static inline int redisdb_doc_key(const char *url, const char *topic_prefix, const char *type,
                                  const char *id, char *out, size_t cap)
{
    char shard[CQRS_SHARD_MAX];
    if (redisdb_shard(url, topic_prefix, type, id, shard, sizeof shard) != 0)
        return -1;
    cqrs_keys_doc(shard, id, out, cap);
    return 0;
}

#endif
