/* redis.c — the one way to reach Redis (see redis.h): URL, settings, connect.
 *
 * DESIGN. A connection is trusted only after three checks, in this order, each of which
 * refuses before anything is sent: the certificate chain (OpenSSL, SSL_VERIFY_PEER), the
 * server's name in that certificate (OpenSSL's X509_check_host / IP matching, armed on our own
 * SSL object before the handshake — hiredis 1.2.0 sets SNI only), then the AUTH reply. A
 * password only ever travels inside the AUTH command: no message, log line or error of this
 * file quotes it or the URL that may hold it.
 *
 * One TLS context (SSL_CTX: the trusted CAs, the client certificate) serves every connection
 * made with the same files — built once, not per connection: loading the system's trust store
 * takes tens of milliseconds and holds its ~140 certificates, and a pool may hold hundreds of
 * connections. It is rebuilt when a file changed (its inode, size or mtime), so a rotated CA
 * bundle or client certificate is picked up at the next connection without a restart;
 * connections made earlier keep the context they were made with (OpenSSL counts references).
 * The shared context is never changed once built (everything per connection — SNI, the name
 * checked — goes on the SSL object), so sharing it across threads is safe; a mutex guards the
 * cache itself.
 */
#define _GNU_SOURCE
#include "cqrs/redis.h"

#include "cqrs/keyspace.h"

#include <arpa/inet.h>
#include <errno.h>
#include <hiredis/hiredis.h>
#include <hiredis/hiredis_ssl.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "cqrs/failpoint.h"

/* ---- URL ------------------------------------------------------------------------------- */

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decodes s[0..len) into out (cap bytes with the NUL); false when malformed, too
 * long, or when it would hold a NUL or a control character. */
static bool decode(const char *s, size_t len, char *out, size_t cap)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        int c = (unsigned char)s[i];
        if (c == '%') {
            if (i + 2 >= len)
                return false;
            int hi = hexval(s[i + 1]), lo = hexval(s[i + 2]);
            if (hi < 0 || lo < 0)
                return false;
            c = hi * 16 + lo;
            i += 2;
        }
        if (c < 0x20 || c == 0x7f || n + 1 >= cap)
            return false;
        out[n++] = (char)c;
    }
    out[n] = '\0';
    return true;
}

static bool host_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '-' || c == '_';
}

/* A whole decimal number in [lo, hi] from s[0..len). */
static bool number(const char *s, size_t len, long lo, long hi, int *out)
{
    if (len == 0 || len > 9)
        return false;
    long v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (s[i] - '0');
    }
    if (v < lo || v > hi)
        return false;
    *out = (int)v;
    return true;
}

cqrs_err_t cqrs_redis_url_parse(const char *url, cqrs_redis_addr_t *out, cqrs_error_t *err)
{
    memset(out, 0, sizeof *out);
    out->port = 6379;
    const char *p;
    if (url && strncasecmp(url, "redis://", 8) == 0) {
        p = url + 8;
    } else if (url && strncasecmp(url, "rediss://", 9) == 0) {
        out->tls = true;
        p = url + 9;
    } else {
        return cqrs_error_set(err, CQRS_ERR_CONFIG,
                              "the Redis URL must start with redis:// or rediss:// (TLS)");
    }
    /* The last '@' ends the user info: host, port and db never hold one, a password may. */
    const char *at = strrchr(p, '@');
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        const char *user_end = colon ? colon : at;
        if (!decode(p, (size_t)(user_end - p), out->user, sizeof out->user))
            return cqrs_error_set(err, CQRS_ERR_CONFIG,
                                  "the Redis URL's user name is malformed (percent-encode "
                                  "special characters) or longer than 255 bytes");
        if (colon &&
            !decode(colon + 1, (size_t)(at - colon - 1), out->password, sizeof out->password))
            return cqrs_error_set(err, CQRS_ERR_CONFIG,
                                  "the Redis URL's password is malformed (percent-encode "
                                  "special characters) or longer than 255 bytes");
        if (!out->user[0] && !out->password[0])
            return cqrs_error_set(err, CQRS_ERR_CONFIG,
                                  "the Redis URL has an '@' but neither user nor password");
        p = at + 1;
    }
    const char *h = p;
    size_t hlen;
    if (*p == '[') { /* [IPv6] */
        const char *close = strchr(p, ']');
        hlen = close ? (size_t)(close - p - 1) : 0;
        struct in6_addr a6;
        char v6[64];
        if (!close || hlen == 0 || hlen >= sizeof v6)
            return cqrs_error_set(err, CQRS_ERR_CONFIG, "the Redis URL has a bad IPv6 address");
        memcpy(v6, p + 1, hlen);
        v6[hlen] = '\0';
        if (inet_pton(AF_INET6, v6, &a6) != 1)
            return cqrs_error_set(err, CQRS_ERR_CONFIG, "the Redis URL has a bad IPv6 address");
        h = p + 1;
        p = close + 1;
    } else {
        while (host_char(*p))
            p++;
        hlen = (size_t)(p - h);
    }
    if (hlen == 0 || hlen >= sizeof out->host)
        return cqrs_error_set(err, CQRS_ERR_CONFIG, "the Redis URL has no host");
    memcpy(out->host, h, hlen);
    out->host[hlen] = '\0';
    if (*p == ':') {
        size_t plen = strcspn(p + 1, "/");
        if (!number(p + 1, plen, 1, 65535, &out->port))
            return cqrs_error_set(err, CQRS_ERR_CONFIG,
                                  "the Redis URL's port is not a number in 1..65535");
        p += 1 + plen;
    }
    if (*p == '/' && p[1]) {
        if (!number(p + 1, strlen(p + 1), 0, 1000, &out->db))
            return cqrs_error_set(err, CQRS_ERR_CONFIG,
                                  "the Redis URL's database is not a number in 0..1000");
    } else if (*p && strcmp(p, "/") != 0) {
        return cqrs_error_set(err, CQRS_ERR_CONFIG,
                              "the Redis URL has unexpected characters after the host (only "
                              "[:port][/db] may follow; no query string)");
    }
    return CQRS_ERR_OK;
}

/* ---- settings -------------------------------------------------------------------------- */

static bool set(const char *s)
{
    return s && *s;
}

static char *dup_or_null(const char *s)
{
    return set(s) ? strdup(s) : NULL;
}

cqrs_err_t cqrs_redis_target_init(cqrs_redis_target_t *t, const cqrs_redis_config_t *c,
                                  cqrs_error_t *err)
{
    memset(t, 0, sizeof *t);
    const char *prefix = set(c->prefix) ? c->prefix : "cqrs";
    if (!cqrs_keys_prefix_valid(prefix))
        return cqrs_error_set(err, CQRS_ERR_CONFIG,
                              "CQRS_REDIS_PREFIX must be 1 to 32 of A-Z a-z 0-9 . _ -");
    strcpy(t->prefix, prefix);
    cqrs_error_t perr;
    if (cqrs_redis_url_parse(c->url, &t->addr, &perr) != CQRS_ERR_OK)
        return cqrs_error_set(err, CQRS_ERR_CONFIG, "CQRS_REDIS_URL: %s", perr.message);
    if (set(c->password)) {
        if (t->addr.password[0])
            return cqrs_error_set(err, CQRS_ERR_CONFIG,
                                  "CQRS_REDIS_PASSWORD: the URL holds a password already (give "
                                  "it once)");
        if (strlen(c->password) >= sizeof t->addr.password)
            return cqrs_error_set(err, CQRS_ERR_CONFIG,
                                  "CQRS_REDIS_PASSWORD: longer than 255 bytes");
        strcpy(t->addr.password, c->password);
    }
    /* Not quoting the user: before ACL users, redis://secret@host meant a password. */
    if (t->addr.user[0] && !t->addr.password[0])
        return cqrs_error_set(
            err, CQRS_ERR_CONFIG,
            "CQRS_REDIS_URL names a user but no password is given (in the URL "
            "or CQRS_REDIS_PASSWORD; a password alone is redis://:password@host)");
    const char *tls_var = set(c->tls_ca_file)       ? "CQRS_REDIS_TLS_CA_FILE"
                          : set(c->tls_cert_file)   ? "CQRS_REDIS_TLS_CERT_FILE"
                          : set(c->tls_key_file)    ? "CQRS_REDIS_TLS_KEY_FILE"
                          : set(c->tls_server_name) ? "CQRS_REDIS_TLS_SERVER_NAME"
                                                    : NULL;
    if (tls_var && !t->addr.tls)
        return cqrs_error_set(err, CQRS_ERR_CONFIG,
                              "%s is set but CQRS_REDIS_URL is redis:// (plain text): use "
                              "rediss:// for TLS",
                              tls_var);
    if (set(c->tls_cert_file) != set(c->tls_key_file))
        return cqrs_error_set(err, CQRS_ERR_CONFIG,
                              "CQRS_REDIS_TLS_CERT_FILE and CQRS_REDIS_TLS_KEY_FILE go together");
    const char *name = set(c->tls_server_name) ? c->tls_server_name : t->addr.host;
    if (strlen(name) >= sizeof t->server_name)
        return cqrs_error_set(err, CQRS_ERR_CONFIG, "CQRS_REDIS_TLS_SERVER_NAME: too long");
    strcpy(t->server_name, name);
    t->tls_ca_file = dup_or_null(c->tls_ca_file);
    t->tls_cert_file = dup_or_null(c->tls_cert_file);
    t->tls_key_file = dup_or_null(c->tls_key_file);
    if ((set(c->tls_ca_file) && !t->tls_ca_file) || (set(c->tls_cert_file) && !t->tls_cert_file) ||
        (set(c->tls_key_file) && !t->tls_key_file)) {
        cqrs_redis_target_close(t);
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
    }
    return CQRS_ERR_OK;
}

void cqrs_redis_target_close(cqrs_redis_target_t *t)
{
    free(t->tls_ca_file);
    free(t->tls_cert_file);
    free(t->tls_key_file);
    t->tls_ca_file = t->tls_cert_file = t->tls_key_file = NULL;
    /* the password does not outlive its use in memory we free */
    explicit_bzero(t->addr.password, sizeof t->addr.password);
}

/* ---- TLS ------------------------------------------------------------------------------- */

/* OpenSSL's reason for the last failure on this thread (and the queue cleared). */
static const char *ssl_reason(void)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    ERR_clear_error();
    return r ? r : "unknown reason";
}

/* A file the setting var names can be read; otherwise err says why (OpenSSL would only say
 * "system lib"). */
static bool readable(const char *var, const char *path, cqrs_err_t code, cqrs_error_t *err)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        cqrs_error_set(err, code, "%s: cannot read %.100s: %s", var, path, strerror(errno));
        return false;
    }
    fclose(f);
    return true;
}

/* A client context: TLS 1.2+, the peer must present a certificate chaining to the trusted CAs,
 * with the client certificate when one is set. NULL with err (naming the setting) otherwise. */
static SSL_CTX *tls_context(const cqrs_redis_target_t *t, cqrs_err_t code, cqrs_error_t *err)
{
    if ((t->tls_ca_file && !readable("CQRS_REDIS_TLS_CA_FILE", t->tls_ca_file, code, err)) ||
        (t->tls_cert_file && !readable("CQRS_REDIS_TLS_CERT_FILE", t->tls_cert_file, code, err)) ||
        (t->tls_key_file && !readable("CQRS_REDIS_TLS_KEY_FILE", t->tls_key_file, code, err)))
        return NULL;
    ERR_clear_error();
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) {
        cqrs_error_set(err, CQRS_ERR_NOMEM, "TLS: cannot create a context: %s", ssl_reason());
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (t->tls_ca_file) {
        if (SSL_CTX_load_verify_locations(ctx, t->tls_ca_file, NULL) != 1) {
            cqrs_error_set(err, code, "CQRS_REDIS_TLS_CA_FILE: cannot load %.100s: %s",
                           t->tls_ca_file, ssl_reason());
            goto fail;
        }
    } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
        cqrs_error_set(err, code, "TLS: cannot load the system's trust store: %s", ssl_reason());
        goto fail;
    }
    if (t->tls_cert_file) {
        if (SSL_CTX_use_certificate_chain_file(ctx, t->tls_cert_file) != 1) {
            cqrs_error_set(err, code, "CQRS_REDIS_TLS_CERT_FILE: cannot load %.100s: %s",
                           t->tls_cert_file, ssl_reason());
            goto fail;
        }
        if (SSL_CTX_use_PrivateKey_file(ctx, t->tls_key_file, SSL_FILETYPE_PEM) != 1) {
            cqrs_error_set(err, code, "CQRS_REDIS_TLS_KEY_FILE: cannot load %.100s: %s",
                           t->tls_key_file, ssl_reason());
            goto fail;
        }
        if (SSL_CTX_check_private_key(ctx) != 1) {
            cqrs_error_set(err, code,
                           "CQRS_REDIS_TLS_KEY_FILE: the key does not match the certificate: %s",
                           ssl_reason());
            goto fail;
        }
    }
    return ctx;
fail:
    SSL_CTX_free(ctx);
    return NULL;
}

/* What a context was built from: the files' names and identities (inode, size, mtime). */
typedef struct ctx_key {
    char *path[3]; /* CA ("": the system's default file), certificate, key ("": none) */
    struct stat st[3];
} ctx_key_t;

static pthread_mutex_t ctx_lock = PTHREAD_MUTEX_INITIALIZER;
static ctx_key_t ctx_cached_key; /* guarded by ctx_lock, as ctx_cached */
static SSL_CTX *ctx_cached;

static void key_free(ctx_key_t *k)
{
    for (int i = 0; i < 3; i++) {
        free(k->path[i]);
        k->path[i] = NULL;
    }
}

static bool key_make(const cqrs_redis_target_t *t, ctx_key_t *k)
{
    const char *paths[3] = {t->tls_ca_file ? t->tls_ca_file : "", t->tls_cert_file,
                            t->tls_key_file};
    memset(k, 0, sizeof *k);
    for (int i = 0; i < 3; i++) {
        k->path[i] = strdup(paths[i] ? paths[i] : "");
        if (!k->path[i]) {
            key_free(k);
            return false;
        }
        /* the system's trust store: its default file (a changed bundle also counts) */
        const char *f = i == 0 && !t->tls_ca_file ? X509_get_default_cert_file() : paths[i];
        if (f && *f)
            stat(f, &k->st[i]); /* an unreadable file fails the build, not the key */
    }
    return true;
}

static bool key_equal(const ctx_key_t *a, const ctx_key_t *b)
{
    for (int i = 0; i < 3; i++)
        if (strcmp(a->path[i], b->path[i]) != 0 || a->st[i].st_ino != b->st[i].st_ino ||
            a->st[i].st_dev != b->st[i].st_dev || a->st[i].st_size != b->st[i].st_size ||
            a->st[i].st_mtim.tv_sec != b->st[i].st_mtim.tv_sec ||
            a->st[i].st_mtim.tv_nsec != b->st[i].st_mtim.tv_nsec)
            return false;
    return true;
}

/* The context for t's files, a new reference (the caller frees it with SSL_CTX_free): the
 * cached one while its files are unchanged, else a fresh one that replaces it in the cache. */
static SSL_CTX *shared_context(const cqrs_redis_target_t *t, cqrs_err_t code, cqrs_error_t *err)
{
    ctx_key_t k;
    if (!key_make(t, &k)) {
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    SSL_CTX *ctx = NULL;
    pthread_mutex_lock(&ctx_lock);
    if (ctx_cached && key_equal(&k, &ctx_cached_key)) {
        ctx = ctx_cached;
        SSL_CTX_up_ref(ctx);
        key_free(&k);
    } else if ((ctx = tls_context(t, code, err)) != NULL) {
        SSL_CTX_up_ref(ctx); /* one for the cache, one for the caller */
        SSL_CTX_free(ctx_cached);
        key_free(&ctx_cached_key);
        ctx_cached = ctx;
        ctx_cached_key = k;
    } else {
        key_free(&k);
    }
    pthread_mutex_unlock(&ctx_lock);
    return ctx;
}

static bool is_ip(const char *s)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, s, buf) == 1 || inet_pton(AF_INET6, s, buf) == 1;
}

/* Runs the TLS handshake on a connected context, checking chain and name. */
static cqrs_err_t tls_handshake(const cqrs_redis_target_t *t, redisContext *c, cqrs_error_t *err)
{
    cqrs_err_t rc = CQRS_ERR_OK;
    SSL *ssl = NULL;
    SSL_CTX *ctx = shared_context(t, CQRS_ERR_UNAVAILABLE, err);
    if (!ctx)
        return err ? err->code : CQRS_ERR_UNAVAILABLE;
    ssl = SSL_new(ctx);
    if (!ssl) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "TLS: %s", ssl_reason());
        goto out;
    }
    const char *name = t->server_name;
    bool ip = is_ip(name);
    /* SNI carries host names only (RFC 6066, 3). */
    if (!ip && SSL_set_tlsext_host_name(ssl, name) != 1) {
        rc = cqrs_error_set(err, CQRS_ERR_CONFIG, "TLS: bad server name: %s", ssl_reason());
        goto out;
    }
    if (!CQRS_UNSAFE("REDIS_NO_HOST_CHECK")) {
        int ok;
        if (ip) {
            ok = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name);
        } else {
            SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
            ok = SSL_set1_host(ssl, name);
        }
        if (ok != 1) {
            rc = cqrs_error_set(err, CQRS_ERR_CONFIG, "TLS: cannot check the name %.64s: %s", name,
                                ssl_reason());
            goto out;
        }
    }
    if (redisInitiateSSL(c, ssl) != REDIS_OK) {
        /* hiredis keeps no reference to ssl when the handshake fails: still ours to free. */
        long v = SSL_get_verify_result(ssl);
        if (v == X509_V_ERR_HOSTNAME_MISMATCH || v == X509_V_ERR_IP_ADDRESS_MISMATCH)
            rc = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE,
                                "TLS: the certificate of Redis %.64s:%d is not for '%.64s' (%s)",
                                t->addr.host, t->addr.port, name, X509_verify_cert_error_string(v));
        else if (v != X509_V_OK)
            rc = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE,
                                "TLS: the certificate of Redis %.64s:%d is not trusted: %s",
                                t->addr.host, t->addr.port, X509_verify_cert_error_string(v));
        else
            rc = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE,
                                "TLS: handshake with Redis %.64s:%d failed: %s", t->addr.host,
                                t->addr.port, c->errstr[0] ? c->errstr : "unknown reason");
        ERR_clear_error();
        goto out;
    }
    ssl = NULL; /* the context owns it now */
out:
    SSL_free(ssl);
    SSL_CTX_free(ctx); /* our reference; an SSL object keeps its own */
    return rc;
}

cqrs_err_t cqrs_redis_config_check(const cqrs_redis_config_t *c, cqrs_error_t *err)
{
    cqrs_redis_target_t t;
    cqrs_err_t rc = cqrs_redis_target_init(&t, c, err);
    if (rc == CQRS_ERR_OK && t.addr.tls) {
        SSL_CTX *ctx = shared_context(&t, CQRS_ERR_CONFIG, err);
        if (ctx)
            SSL_CTX_free(ctx);
        else
            rc = err ? err->code : CQRS_ERR_CONFIG;
    }
    cqrs_redis_target_close(&t);
    return rc;
}

/* ---- connect --------------------------------------------------------------------------- */

/* One command on a fresh connection; an error reply or a transport failure → err. */
static cqrs_err_t hello_command(const cqrs_redis_target_t *t, redisContext *c, int argc,
                                const char **argv, const char *what, cqrs_error_t *err)
{
    redisReply *r = redisCommandArgv(c, argc, argv, NULL);
    cqrs_err_t rc = CQRS_ERR_OK;
    if (!r)
        rc =
            cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "Redis %.64s:%d: %s failed: %s", t->addr.host,
                           t->addr.port, what, c->errstr[0] ? c->errstr : "no reply");
    else if (r->type == REDIS_REPLY_ERROR)
        rc = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "Redis %.64s:%d refused %s: %.120s",
                            t->addr.host, t->addr.port, what, r->str);
    freeReplyObject(r);
    return rc;
}

struct redisContext *cqrs_redis_connect(const cqrs_redis_target_t *t, int timeout_ms,
                                        cqrs_error_t *err)
{
    if (timeout_ms <= 0)
        timeout_ms = 2000;
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    redisOptions o = {0};
    REDIS_OPTIONS_SET_TCP(&o, t->addr.host, t->addr.port);
    o.connect_timeout = &tv;
    o.command_timeout = &tv; /* also bounds each read and write of the TLS handshake */
    redisContext *c = redisConnectWithOptions(&o);
    if (!c || c->err) {
        cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "cannot connect to Redis %.64s:%d: %s",
                       t->addr.host, t->addr.port, c ? c->errstr : "out of memory");
        goto fail;
    }
    redisEnableKeepAlive(c);
    if (t->addr.tls && tls_handshake(t, c, err) != CQRS_ERR_OK)
        goto fail;
    if (t->addr.password[0]) {
        char what[300];
        const char *argv[] = {"AUTH", t->addr.user, t->addr.password};
        if (t->addr.user[0]) {
            snprintf(what, sizeof what, "AUTH as user '%.64s'", t->addr.user);
            if (hello_command(t, c, 3, argv, what, err) != CQRS_ERR_OK)
                goto fail;
        } else {
            argv[1] = t->addr.password;
            if (hello_command(t, c, 2, argv, "AUTH (default user)", err) != CQRS_ERR_OK)
                goto fail;
        }
    }
    if (t->addr.db != 0) {
        char db[12], what[24];
        snprintf(db, sizeof db, "%d", t->addr.db);
        snprintf(what, sizeof what, "SELECT %d", t->addr.db);
        const char *argv[] = {"SELECT", db};
        if (hello_command(t, c, 2, argv, what, err) != CQRS_ERR_OK)
            goto fail;
    }
    return c;
fail:
    if (c)
        redisFree(c);
    return NULL;
}
