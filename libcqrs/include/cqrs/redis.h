/* redis.h — how every Redis connection of the platform is made: one URL parser, one set of
 * settings, one connect.
 *
 * URL: redis://[[user]:password@]host[:port][/db] (plain TCP) or rediss://… (TLS). user and
 * password are percent-decoded; `user@` without a password takes it from CQRS_REDIS_PASSWORD.
 * host is a DNS name, an IPv4 address or a bracketed IPv6 address; port 6379 and db 0 by
 * default. A user and password → `AUTH user password` (an ACL user, Redis 6+); a password
 * alone → `AUTH password` (the default user).
 *
 * A connection (cqrs_redis_connect): TCP within the timeout; for rediss:// a TLS 1.2+ handshake
 * that checks the server's certificate chain against CQRS_REDIS_TLS_CA_FILE (else the system's
 * trust store) *and* its name against CQRS_REDIS_TLS_SERVER_NAME (else the URL's host; an IP
 * address is matched against the certificate's IP addresses) — hiredis up to 1.4.1 checks the
 * chain only, so the name check is ours, done by OpenSSL (SSL_set1_host, X509_VERIFY_PARAM_
 * set1_ip_asc) on an SSL object of our own handed to redisInitiateSSL; optionally a client
 * certificate; then AUTH, SELECT db, and the command timeout on the socket. Error messages
 * name the server (host:port), the user and the setting at fault, never the password.
 */
#ifndef CQRS_REDIS_H
#define CQRS_REDIS_H

#include <stdbool.h>
#include <stddef.h>

#include "cqrs/config.h"
#include "cqrs/err.h"

struct redisContext;

typedef struct cqrs_redis_addr {
    bool tls;       /* rediss:// */
    char host[256]; /* without the brackets of an IPv6 address */
    int port;
    int db;
    char user[256];     /* "" → the default user */
    char password[256]; /* "" → none in the URL */
} cqrs_redis_addr_t;

/* Parses a Redis URL (above) into *out; CONFIG with a message that quotes no part of the URL
 * (it may hold a password) otherwise. */
cqrs_err_t cqrs_redis_url_parse(const char *url, cqrs_redis_addr_t *out, cqrs_error_t *err);

/* The Redis settings of cqrs-queryd and cqrsctl. Strings are the config loader's heap copies
 * (cqrs_config_free frees them); NULL and "" both mean unset. Read-only for this library. */
typedef struct cqrs_redis_config {
    char *url;
    char *password;        /* when the URL holds none; never both */
    char *tls_ca_file;     /* PEM CA bundle; unset: the system's trust store */
    char *tls_cert_file;   /* client certificate (PEM, may hold the chain)… */
    char *tls_key_file;    /* …and its key: both or neither */
    char *tls_server_name; /* SNI and the name checked; unset: the URL's host */
    char *prefix;          /* of every key of the read model (keyspace.h); unset: "cqrs" */
} cqrs_redis_config_t;

/* The Redis settings' rows of a daemon's config table (config.h), writing into CFG (an lvalue
 * of type cqrs_redis_config_t with static storage); URL_HELP is the daemon's own help line of
 * CQRS_REDIS_URL. One definition of the names, types and defaults for every table. */
#define CQRS_REDIS_SETTINGS_N 7
// clang-format off
#define CQRS_REDIS_SETTINGS(CFG, URL_HELP)                                                         \
    {"CQRS_REDIS_URL", CQRS_CONFIG_SECRET, "redis://127.0.0.1:6379/0", 0, 0, URL_HELP,             \
     &(CFG).url, NULL},                                                                            \
    {"CQRS_REDIS_PASSWORD", CQRS_CONFIG_SECRET, "", 0, 0,                                          \
     "password of the URL's user when the URL holds none (give it once)", &(CFG).password, NULL}, \
    {"CQRS_REDIS_TLS_CA_FILE", CQRS_CONFIG_STRING, "", 0, 0,                                       \
     "rediss://: PEM file of the CAs the server's certificate must chain to; empty: the"           \
     " system's trust store", &(CFG).tls_ca_file, NULL},                                           \
    {"CQRS_REDIS_TLS_CERT_FILE", CQRS_CONFIG_STRING, "", 0, 0,                                     \
     "rediss://: client certificate (PEM) for a server that requires one, with"                    \
     " CQRS_REDIS_TLS_KEY_FILE", &(CFG).tls_cert_file, NULL},                                      \
    {"CQRS_REDIS_TLS_KEY_FILE", CQRS_CONFIG_STRING, "", 0, 0,                                      \
     "rediss://: private key (PEM) of the client certificate", &(CFG).tls_key_file, NULL},        \
    {"CQRS_REDIS_TLS_SERVER_NAME", CQRS_CONFIG_STRING, "", 0, 0,                                   \
     "rediss://: name sent as SNI and required in the server's certificate; empty: the URL's"      \
     " host", &(CFG).tls_server_name, NULL},                                                      \
    {"CQRS_REDIS_PREFIX", CQRS_CONFIG_STRING, "cqrs", 0, 0,                                        \
     "prefix of every key of the read model (1-32 of A-Z a-z 0-9 . _ -): deployments sharing a"    \
     " Redis or a cluster each take their own", &(CFG).prefix, NULL}
// clang-format on

/* Everything a start-up can check without a server: the URL, the combination of settings
 * (TLS settings need rediss://, a certificate needs its key, a user needs a password, the
 * password is given once) and, for rediss://, that the CA, certificate and key files load
 * and the key matches the certificate. The message names the setting at fault. */
cqrs_err_t cqrs_redis_config_check(const cqrs_redis_config_t *c, cqrs_error_t *err);

/* A parsed config, what a connection needs (the caller embeds it: _init / _close). Owns
 * copies of everything, so the config may go away. */
typedef struct cqrs_redis_target {
    cqrs_redis_addr_t addr;
    char server_name[256]; /* the name checked (and sent as SNI unless an IP address) */
    char *tls_ca_file, *tls_cert_file, *tls_key_file; /* NULL: unset */
    char prefix[33];                                  /* keyspace.h; "cqrs" when unset */
} cqrs_redis_target_t;

/* Parses and checks the combination of settings (not the files: cqrs_redis_config_check). */
cqrs_err_t cqrs_redis_target_init(cqrs_redis_target_t *t, const cqrs_redis_config_t *c,
                                  cqrs_error_t *err);
void cqrs_redis_target_close(cqrs_redis_target_t *t);

/* A blocking hiredis context to t's server and database, ready for commands: connected within
 * timeout_ms, TLS checked, authenticated, database selected, commands timing out after
 * timeout_ms. NULL with err (UNAVAILABLE) otherwise. The caller frees it with redisFree and
 * owns it on one thread. */
struct redisContext *cqrs_redis_connect(const cqrs_redis_target_t *t, int timeout_ms,
                                        cqrs_error_t *err);

#endif
