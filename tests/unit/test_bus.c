/* Unit tests of bus.c's client configuration: the CQRS_KAFKA_PROPERTY_<NAME> name mapping,
 * the properties file parser, the refused properties, values from files, the order of
 * settings, the start-up check, and secrets kept out of every message and log line.
 * No broker: clients are created without bootstrap servers, which connect nowhere. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cmocka.h>

#include <cqrs/bus.h>
#include <librdkafka/rdkafka_mock.h> /* after rdkafka.h (bus.h) */
#include <cqrs/log.h>

#define CANARY "s3cr3t-canary"

extern char **environ;

static char dir[] = "/tmp/test-bus-XXXXXX";

/* Writes text to <dir>/<name>; returns the path (static buffer of the caller's choice). */
static const char *write_file(const char *name, const char *text, char *path, size_t size)
{
    snprintf(path, size, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    return path;
}

/* Everything written to a memstream, NUL-terminated; caller frees. */
typedef struct sink {
    FILE *f;
    char *text;
    size_t len;
} sink_t;

static void sink_open(sink_t *s)
{
    s->text = NULL;
    s->len = 0;
    s->f = open_memstream(&s->text, &s->len);
    assert_non_null(s->f);
}

static char *sink_close(sink_t *s)
{
    fclose(s->f);
    return s->text;
}

static const char *prop(const cqrs_bus_props_t *p, const char *name)
{
    for (size_t i = 0; i < p->n; i++)
        if (strcmp(p->v[i].name, name) == 0)
            return p->v[i].value;
    return NULL;
}

static const char *prop_source(const cqrs_bus_props_t *p, const char *name)
{
    for (size_t i = 0; i < p->n; i++)
        if (strcmp(p->v[i].name, name) == 0)
            return p->v[i].source;
    return NULL;
}

static void clear_env(void)
{
    /* The process environment is read by cqrs_bus_conf_new: only what a test sets. */
    for (int again = 1; again;) {
        again = 0;
        for (char **e = environ; *e; e++) {
            if (strncmp(*e, "CQRS_KAFKA_", 11) == 0) {
                char name[256];
                size_t n = strcspn(*e, "=");
                snprintf(name, sizeof name, "%.*s", (int)n, *e);
                unsetenv(name);
                again = 1;
                break;
            }
        }
    }
}

static int setup(void **state)
{
    (void)state;
    clear_env();
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    clear_env();
    return 0;
}

static void test_names_map_as_in_confluent_images(void **state)
{
    (void)state;
    static const char *const cases[][2] = {
        {"SASL_MECHANISMS", "sasl.mechanisms"},
        {"SECURITY_PROTOCOL", "security.protocol"},
        {"SSL_KEY_PASSWORD", "ssl.key.password"},
        {"SSL_ENDPOINT_IDENTIFICATION_ALGORITHM", "ssl.endpoint.identification.algorithm"},
        {"SSL__KEY", "ssl_key"},
        {"LOG__LEVEL", "log_level"},
        {"A___B", "a-b"},
        {"linger_ms", "linger.ms"},
        {"FETCH_WAIT_MAX_MS", "fetch.wait.max.ms"},
        {"X1_Y2", "x1.y2"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char out[64];
        assert_true(cqrs_bus_property_name(cases[i][0], out, sizeof out));
        assert_string_equal(out, cases[i][1]);
    }
    static const char *const bad[] = {"",    "_LINGER", "LINGER_", "A__._B",
                                      "A B", "A-B",     "SASL=X",  "Ä"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char out[64];
        if (cqrs_bus_property_name(bad[i], out, sizeof out))
            fail_msg("'%s' mapped to '%s'", bad[i], out);
    }
    char small[8];
    assert_false(cqrs_bus_property_name("SASL_MECHANISMS", small, sizeof small));
}

static void test_refused_properties_and_their_aliases(void **state)
{
    (void)state;
    static const char *const refused[] = {
        "bootstrap.servers",
        "metadata.broker.list",
        "transactional.id",
        "enable.idempotence",
        "acks",
        "request.required.acks",
        "queuing.strategy",
        "partitioner",
        "message.timeout.ms",
        "delivery.timeout.ms",
        "isolation.level",
        "enable.auto.commit",
        "auto.commit.enable",
        "enable.auto.offset.store",
        "auto.offset.reset",
        "offset.store.method",
        "enable.partition.eof",
        "group.id",
        "group.instance.id",
        "partition.assignment.strategy",
        "group.protocol",
        "group.remote.assignor",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "debug",
        "statistics.interval.ms",
        /* the default topic configuration's names, with the prefix librdkafka strips */
        "topic.partitioner",
        "topic.auto.offset.reset",
        "topic.message.timeout.ms",
        "topic.queuing.strategy",
        "topic.offset.store.method",
    };
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        const char *why = cqrs_bus_property_refused(refused[i]);
        if (!why || strlen(why) < 10)
            fail_msg("%s is not refused with a reason", refused[i]);
        /* A name in the table that librdkafka does not know would guard nothing (a typo);
         * group.protocol and group.remote.assignor only exist from librdkafka 2.4 on. */
        if (strncmp(refused[i], "group.", 6) != 0 || strcmp(refused[i], "group.id") == 0 ||
            rd_kafka_version() >= 0x020400ff) {
            /* rd_kafka_conf_get does not resolve aliases; setting does (a bad value is
             * INVALID, an unknown name UNKNOWN). */
            rd_kafka_conf_t *c = rd_kafka_conf_new();
            char errstr[256];
            bool known = rd_kafka_conf_set(c, refused[i], "x", errstr, sizeof errstr) !=
                         RD_KAFKA_CONF_UNKNOWN;
            rd_kafka_conf_destroy(c);
            if (!known)
                fail_msg("refused %s is no librdkafka property", refused[i]);
        }
    }
    /* The tunables the product sets itself stay settable, and the security settings. */
    static const char *const accepted[] = {
        "linger.ms",
        "queue.buffering.max.ms",
        "fetch.wait.max.ms",
        "retry.backoff.ms",
        "socket.keepalive.enable",
        "client.id",
        "transaction.timeout.ms",
        "log_level",
        "security.protocol",
        "sasl.mechanisms",
        "sasl.username",
        "sasl.password",
        "ssl.ca.location",
        "ssl.endpoint.identification.algorithm",
        "max.in.flight",
        "auto.commit.interval.ms",
    };
    for (size_t i = 0; i < sizeof accepted / sizeof accepted[0]; i++)
        if (cqrs_bus_property_refused(accepted[i]))
            fail_msg("%s is refused", accepted[i]);
}

static void test_secret_property_names(void **state)
{
    (void)state;
    static const char *const secret[] = {
        "sasl.password",
        "ssl.key.password",
        "ssl.key.pem",
        "ssl_key",
        "ssl.keystore.password",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.config",
        "sasl.oauthbearer.extensions",
    };
    for (size_t i = 0; i < sizeof secret / sizeof secret[0]; i++)
        if (!cqrs_bus_property_secret(secret[i]))
            fail_msg("%s is not secret", secret[i]);
    static const char *const plain[] = {"sasl.username",         "security.protocol",
                                        "ssl.key.location",      "ssl.ca.location",
                                        "ssl.keystore.location", "linger.ms"};
    for (size_t i = 0; i < sizeof plain / sizeof plain[0]; i++)
        if (cqrs_bus_property_secret(plain[i]))
            fail_msg("%s is secret", plain[i]);
}

static void test_properties_file(void **state)
{
    (void)state;
    char path[256];
    write_file("ok.properties",
               "# the stack's Kafka\n"
               "\n"
               "security.protocol=SASL_SSL\n"
               "  sasl.mechanisms = SCRAM-SHA-512  \n"
               "linger.ms=1\r\n"
               "\t# indented comment\n"
               "sasl.oauthbearer.config=principal=cqrs scope=a\n"
               "linger.ms=20\n",
               path, sizeof path);
    cqrs_bus_props_t p = {0};
    sink_t errs;
    sink_open(&errs);
    assert_int_equal(cqrs_bus_props_read_file("VAR", path, &p, errs.f), 0);
    char *text = sink_close(&errs);
    assert_string_equal(text, "");
    free(text);
    assert_int_equal(p.n, 4);
    assert_string_equal(prop(&p, "security.protocol"), "SASL_SSL");
    assert_string_equal(prop(&p, "sasl.mechanisms"), "SCRAM-SHA-512");
    assert_string_equal(prop(&p, "linger.ms"), "20"); /* the later line wins */
    assert_string_equal(prop(&p, "sasl.oauthbearer.config"), "principal=cqrs scope=a");
    char want[300];
    snprintf(want, sizeof want, "VAR: %s:8", path);
    assert_string_equal(prop_source(&p, "linger.ms"), want);
    cqrs_bus_props_free(&p);
    assert_int_equal(p.n, 0);
}

static void test_properties_file_errors_name_the_line_never_the_value(void **state)
{
    (void)state;
    char path[256];
    write_file("bad.properties",
               "sasl.username=cqrs\n"
               "sasl.password " CANARY "\n" /* `=` forgotten */
               "=" CANARY "\n"
               "enable.idempotence=false\n"
               "linger.ms=3\n",
               path, sizeof path);
    cqrs_bus_props_t p = {0};
    sink_t errs;
    sink_open(&errs);
    assert_int_equal(cqrs_bus_props_read_file("CQRS_KAFKA_PROPERTIES_FILE", path, &p, errs.f), 3);
    char *text = sink_close(&errs);
    char line[400];
    snprintf(line, sizeof line, "CQRS_KAFKA_PROPERTIES_FILE: %s:2: not a name=value line", path);
    assert_non_null(strstr(text, line));
    snprintf(line, sizeof line, "%s:3: not a name=value line", path);
    assert_non_null(strstr(text, line));
    snprintf(line, sizeof line, "%s:4: the Kafka property enable.idempotence cannot be set", path);
    assert_non_null(strstr(text, line));
    assert_null(strstr(text, CANARY));
    free(text);
    /* The good lines are kept. */
    assert_string_equal(prop(&p, "sasl.username"), "cqrs");
    assert_string_equal(prop(&p, "linger.ms"), "3");
    assert_null(prop(&p, "enable.idempotence"));
    cqrs_bus_props_free(&p);

    sink_open(&errs);
    assert_int_equal(cqrs_bus_props_read_file("V", "/nonexistent/kafka.properties", &p, errs.f), 1);
    text = sink_close(&errs);
    assert_non_null(strstr(text, "V: cannot read /nonexistent/kafka.properties"));
    free(text);
    assert_int_equal(p.n, 0);
}

static void test_environment_wins_over_the_file_and_file_values_over_plain_ones(void **state)
{
    (void)state;
    char file[256], pw[256], pw_line[320], file_line[320];
    write_file("k.properties", "linger.ms=5\nclient.id=from-file\nsasl.password=from-file\n", file,
               sizeof file);
    write_file("pw", "from-secret-file\r\n", pw, sizeof pw);
    snprintf(file_line, sizeof file_line, "CQRS_KAFKA_PROPERTIES_FILE=%s", file);
    snprintf(pw_line, sizeof pw_line, "CQRS_KAFKA_PROPERTY_SASL_PASSWORD_FILE=%s", pw);
    /* _FILE before and after the plain variable: the file wins either way. */
    for (int order = 0; order < 2; order++) {
        char *env[] = {"PATH=/bin",
                       order ? pw_line : "CQRS_KAFKA_PROPERTY_SASL_PASSWORD=plain",
                       "CQRS_KAFKA_PROPERTY_LINGER_MS=7",
                       file_line,
                       order ? "CQRS_KAFKA_PROPERTY_SASL_PASSWORD=plain" : pw_line,
                       "CQRS_KAFKA_PROPERTY_SECURITY_PROTOCOL=SASL_SSL",
                       NULL};
        cqrs_bus_props_t p = {0};
        assert_int_equal(cqrs_bus_props_load(env, &p, NULL), 0);
        assert_string_equal(prop(&p, "linger.ms"), "7");
        assert_string_equal(prop_source(&p, "linger.ms"), "CQRS_KAFKA_PROPERTY_LINGER_MS");
        assert_string_equal(prop(&p, "client.id"), "from-file");
        assert_string_equal(prop(&p, "sasl.password"), "from-secret-file"); /* \r\n trimmed */
        assert_string_equal(prop_source(&p, "sasl.password"),
                            "CQRS_KAFKA_PROPERTY_SASL_PASSWORD_FILE");
        assert_string_equal(prop(&p, "security.protocol"), "SASL_SSL");
        assert_int_equal(p.n, 4);
        cqrs_bus_props_free(&p);
    }
}

static void test_values_from_files(void **state)
{
    (void)state;
    /* A PEM bigger than the 4 KiB the settings' _FILE reader used to stop at: read whole. */
    size_t big = 9000;
    char *pem = malloc(big + 64);
    assert_non_null(pem);
    strcpy(pem, "-----BEGIN PRIVATE KEY-----\n");
    size_t n = strlen(pem);
    for (; n < big; n++)
        pem[n] = (n % 65 == 64) ? '\n' : 'A';
    strcpy(pem + n, "\n-----END PRIVATE KEY-----\n\n");
    char path[256], line[320];
    write_file("key.pem", pem, path, sizeof path);
    snprintf(line, sizeof line, "CQRS_KAFKA_PROPERTY_SSL_KEY_PEM_FILE=%s", path);
    char *env[] = {line, NULL};
    cqrs_bus_props_t p = {0};
    assert_int_equal(cqrs_bus_props_load(env, &p, NULL), 0);
    pem[strlen(pem) - 2] = '\0'; /* trailing newlines trimmed, nothing else */
    assert_string_equal(prop(&p, "ssl.key.pem"), pem);
    cqrs_bus_props_free(&p);
    free(pem);

    /* An unreadable file is an error naming the variable and the path. */
    char *missing[] = {"CQRS_KAFKA_PROPERTY_SASL_PASSWORD_FILE=/nonexistent/pw", NULL};
    sink_t errs;
    sink_open(&errs);
    assert_int_equal(cqrs_bus_props_load(missing, &p, errs.f), 1);
    char *text = sink_close(&errs);
    assert_non_null(
        strstr(text, "CQRS_KAFKA_PROPERTY_SASL_PASSWORD_FILE: cannot read /nonexistent/pw"));
    free(text);
    assert_int_equal(p.n, 0);

    /* librdkafka ≥ 2.11 has properties whose names end in .file: the variable sets them
     * (a path), not a value read from a file. Whichever the linked librdkafka is. */
    char *assertion[] = {"CQRS_KAFKA_PROPERTY_SASL_OAUTHBEARER_ASSERTION_PRIVATE_KEY_FILE=/k.pem",
                         NULL};
    rd_kafka_conf_t *c = rd_kafka_conf_new();
    size_t sz = 0;
    bool has_file_property = rd_kafka_conf_get(c, "sasl.oauthbearer.assertion.private.key.file",
                                               NULL, &sz) != RD_KAFKA_CONF_UNKNOWN;
    rd_kafka_conf_destroy(c);
    int bad = cqrs_bus_props_load(assertion, &p, NULL);
    if (has_file_property) {
        assert_int_equal(bad, 0);
        assert_string_equal(prop(&p, "sasl.oauthbearer.assertion.private.key.file"), "/k.pem");
    } else {
        assert_int_equal(bad, 1); /* /k.pem read as the value of ...private.key: missing */
    }
    cqrs_bus_props_free(&p);
}

static void test_bad_variables_are_all_reported(void **state)
{
    (void)state;
    char *env[] = {"CQRS_KAFKA_PROPERTY_ENABLE_IDEMPOTENCE=false",
                   "CQRS_KAFKA_PROPERTY_BOOTSTRAP_SERVERS=elsewhere:9092",
                   "CQRS_KAFKA_PROPERTY_GROUP_ID=mine",
                   "CQRS_KAFKA_PROPERTY_SASL_PASSWORD=" CANARY,
                   "CQRS_KAFKA_PROPERTY_BAD-NAME=1",
                   "CQRS_KAFKA_PROPERTY_LINGER_MS=3",
                   NULL};
    cqrs_bus_props_t p = {0};
    sink_t errs;
    sink_open(&errs);
    assert_int_equal(cqrs_bus_props_load(env, &p, errs.f), 4);
    char *text = sink_close(&errs);
    assert_non_null(strstr(text, "CQRS_KAFKA_PROPERTY_ENABLE_IDEMPOTENCE: the Kafka property "
                                 "enable.idempotence cannot be set: the relay's transactions"));
    assert_non_null(strstr(text, "CQRS_KAFKA_PROPERTY_BOOTSTRAP_SERVERS: the Kafka property "
                                 "bootstrap.servers cannot be set: CQRS_KAFKA_BROKERS sets it"));
    assert_non_null(strstr(text, "CQRS_KAFKA_PROPERTY_GROUP_ID: the Kafka property group.id "
                                 "cannot be set: CQRS_CONSUMER_GROUP"));
    assert_non_null(strstr(text, "CQRS_KAFKA_PROPERTY_BAD-NAME: not a Kafka property name"));
    assert_null(strstr(text, CANARY));
    free(text);
    assert_string_equal(prop(&p, "linger.ms"), "3");
    cqrs_bus_props_free(&p);
}

static void test_librdkafka_rejections_never_show_a_secret(void **state)
{
    (void)state;
    cqrs_bus_props_t p = {0};
    char *env[] = {"CQRS_KAFKA_PROPERTY_NO_SUCH_THING=1", "CQRS_KAFKA_PROPERTY_LINGER_MS=soon",
                   "CQRS_KAFKA_PROPERTY_SSL__KEY=" CANARY, NULL};
    assert_int_equal(cqrs_bus_props_load(env, &p, NULL), 0);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    sink_t errs;
    sink_open(&errs);
    assert_int_equal(cqrs_bus_props_apply(&p, conf, errs.f), 3);
    char *text = sink_close(&errs);
    assert_non_null(strstr(text, "CQRS_KAFKA_PROPERTY_NO_SUCH_THING: the Kafka property "
                                 "no.such.thing: No such configuration property"));
    assert_non_null(strstr(text, "CQRS_KAFKA_PROPERTY_LINGER_MS: the Kafka property linger.ms: "));
    assert_non_null(strstr(text, "CQRS_KAFKA_PROPERTY_SSL__KEY: the Kafka property ssl_key"));
    assert_null(strstr(text, CANARY));
    free(text);
    rd_kafka_conf_destroy(conf);
    cqrs_bus_props_free(&p);
}

static void conf_value(rd_kafka_conf_t *conf, const char *name, char *out, size_t size)
{
    assert_int_equal(rd_kafka_conf_get(conf, name, out, &size), RD_KAFKA_CONF_OK);
}

static void test_operator_properties_override_the_clients_own_tunables(void **state)
{
    (void)state;
    setenv("CQRS_KAFKA_PROPERTY_LINGER_MS", "42", 1);
    setenv("CQRS_KAFKA_PROPERTY_CLIENT_ID", "ops-chosen", 1);
    setenv("CQRS_KAFKA_PROPERTY_SOCKET_KEEPALIVE_ENABLE", "false", 1);
    static const char *const own[][2] = {
        {"linger.ms", "5"}, {"isolation.level", "read_committed"}, {NULL, NULL}};
    cqrs_error_t err;
    rd_kafka_conf_t *conf = cqrs_bus_conf_new("127.0.0.1:1", "itself", own, &err);
    assert_non_null(conf);
    char v[64];
    conf_value(conf, "linger.ms", v, sizeof v);
    assert_string_equal(v, "42");
    conf_value(conf, "client.id", v, sizeof v);
    assert_string_equal(v, "ops-chosen");
    conf_value(conf, "socket.keepalive.enable", v, sizeof v);
    assert_string_equal(v, "false");
    conf_value(conf, "bootstrap.servers", v, sizeof v);
    assert_string_equal(v, "127.0.0.1:1");
    rd_kafka_conf_destroy(conf);

    /* Without the operator's, the client's own and the fixed ones. */
    clear_env();
    conf = cqrs_bus_conf_new("127.0.0.1:1", "itself", own, &err);
    assert_non_null(conf);
    conf_value(conf, "linger.ms", v, sizeof v);
    assert_string_equal(v, "5");
    conf_value(conf, "client.id", v, sizeof v);
    assert_string_equal(v, "itself");
    conf_value(conf, "socket.keepalive.enable", v, sizeof v);
    assert_string_equal(v, "true");
    rd_kafka_conf_destroy(conf);
}

static void test_a_refused_property_fails_every_client(void **state)
{
    (void)state;
    setenv("CQRS_KAFKA_PROPERTY_ISOLATION_LEVEL", "read_uncommitted", 1);
    setenv("CQRS_KAFKA_PROPERTY_SASL_PASSWORD", CANARY, 1);
    cqrs_error_t err;
    assert_null(cqrs_bus_conf_new("127.0.0.1:1", "x", NULL, &err));
    assert_int_equal(err.code, CQRS_ERR_CONFIG);
    assert_non_null(strstr(err.message, "CQRS_KAFKA_PROPERTY_ISOLATION_LEVEL: the Kafka property "
                                        "isolation.level cannot be set"));
    assert_null(strstr(err.message, CANARY));
    /* Nor does a topic admin call get past it. */
    const char *topics[] = {"t"};
    assert_int_equal(cqrs_bus_create_topics("127.0.0.1:1", topics, 1, 1, -1, 1000, &err),
                     CQRS_ERR_CONFIG);
    assert_non_null(strstr(err.message, "isolation.level"));
}

static void test_startup_check(void **state)
{
    (void)state;
    sink_t errs;
    /* Nothing set: fine. */
    assert_int_equal(cqrs_bus_check_properties(NULL), 0);

    /* What only rd_kafka_new finds is reported too, naming the variable. */
    setenv("CQRS_KAFKA_PROPERTY_SECURITY_PROTOCOL", "SASL_SSL", 1);
    setenv("CQRS_KAFKA_PROPERTY_SASL_MECHANISMS", "SCRAM-SHA-512", 1);
    setenv("CQRS_KAFKA_PROPERTY_SASL_USERNAME", "cqrs", 1);
    setenv("CQRS_KAFKA_PROPERTY_SASL_PASSWORD", CANARY, 1);
    assert_int_equal(cqrs_bus_check_properties(NULL), 0);
    setenv("CQRS_KAFKA_PROPERTY_SSL_CA_LOCATION", "/nonexistent/ca.crt", 1);
    sink_open(&errs);
    assert_int_equal(cqrs_bus_check_properties(errs.f), 1);
    char *text = sink_close(&errs);
    assert_non_null(strstr(text, "CQRS_KAFKA_PROPERTY_SSL_CA_LOCATION: cannot create the Kafka "
                                 "client: ssl.ca.location failed"));
    assert_null(strstr(text, CANARY));
    free(text);

    /* Every problem at once. */
    setenv("CQRS_KAFKA_PROPERTY_SSL_CA_LOCATION", "/etc/ssl/certs/ca-certificates.crt", 1);
    setenv("CQRS_KAFKA_PROPERTY_PARTITIONER", "random", 1);
    setenv("CQRS_KAFKA_PROPERTY_FETCH_WAIT_MAX_MS", "-5", 1);
    setenv("CQRS_KAFKA_DEBUG", "nonsense", 1);
    sink_open(&errs);
    assert_int_equal(cqrs_bus_check_properties(errs.f), 3);
    text = sink_close(&errs);
    assert_non_null(strstr(text, "CQRS_KAFKA_PROPERTY_PARTITIONER: the Kafka property "
                                 "partitioner cannot be set: murmur2_random"));
    assert_non_null(strstr(text, "CQRS_KAFKA_PROPERTY_FETCH_WAIT_MAX_MS: the Kafka property "
                                 "fetch.wait.max.ms"));
    assert_non_null(strstr(text, "CQRS_KAFKA_DEBUG: "));
    assert_null(strstr(text, CANARY));
    free(text);
}

/* cqrs_log writes to stdout: sent to a file of the test folder between log_capture_begin and
 * log_capture_end, which reads it back. */
typedef struct log_capture {
    int saved;
    FILE *f;
    char path[256];
} log_capture_t;

static void log_capture_begin(log_capture_t *c, const char *name)
{
    write_file(name, "", c->path, sizeof c->path);
    fflush(stdout);
    c->saved = dup(STDOUT_FILENO);
    c->f = fopen(c->path, "w");
    assert_non_null(c->f);
    dup2(fileno(c->f), STDOUT_FILENO);
    cqrs_log_init("test-bus", CQRS_LOG_DEBUG);
}

static size_t log_capture_end(log_capture_t *c, char *text, size_t cap)
{
    fflush(stdout);
    dup2(c->saved, STDOUT_FILENO);
    close(c->saved);
    fclose(c->f);
    FILE *f = fopen(c->path, "r");
    assert_non_null(f);
    size_t n = fread(text, 1, cap - 1, f);
    fclose(f);
    text[n] = '\0';
    return n;
}

/* A secret librdkafka echoes in its own log line is cut out of it: run a client whose
 * (unsecured JWT) OAUTHBEARER config has a bad key, with the log on a file. */
static void test_librdkafka_log_lines_lose_secret_values(void **state)
{
    (void)state;
    setenv("CQRS_KAFKA_PROPERTY_SECURITY_PROTOCOL", "SASL_PLAINTEXT", 1);
    setenv("CQRS_KAFKA_PROPERTY_SASL_MECHANISMS", "OAUTHBEARER", 1);
    setenv("CQRS_KAFKA_PROPERTY_ENABLE_SASL_OAUTHBEARER_UNSECURE_JWT", "true", 1);
    /* A canary of its own: no earlier test registered it whole. */
    setenv("CQRS_KAFKA_PROPERTY_SASL_OAUTHBEARER_CONFIG", "principal=cqrs bogus=oauth-canary-7", 1);
    log_capture_t cap;
    log_capture_begin(&cap, "log");
    cqrs_error_t err;
    rd_kafka_conf_t *conf = cqrs_bus_conf_new(NULL, "x", NULL, &err);
    rd_kafka_t *rk = conf ? cqrs_bus_client_new(RD_KAFKA_PRODUCER, conf, "producer", &err) : NULL;
    for (int i = 0; rk && i < 5; i++)
        rd_kafka_poll(rk, 100);
    if (rk)
        rd_kafka_destroy(rk);
    char text[16384];
    log_capture_end(&cap, text, sizeof text);
    assert_non_null(rk);
    /* The line is there (librdkafka echoed the config), without the value. */
    if (!strstr(text, "Unrecognized sasl.oauthbearer.config beginning at: bogus=[redacted]"))
        fail_msg("no redacted librdkafka line in:\n%s", text);
    assert_null(strstr(text, "oauth-canary-7"));
}

/* A registered secret far into a long log line (past the scrubber's buffer) is not passed on:
 * the line is cut there instead. */
static void test_secret_past_a_long_line_is_not_logged(void **state)
{
    (void)state;
    cqrs_log_add_secret("long-line-canary-42");
    static char msg[9000];
    memset(msg, 'a', 6000);
    strcpy(msg + 6000, " long-line-canary-42 end");
    log_capture_t cap;
    log_capture_begin(&cap, "long-log");
    cqrs_log(CQRS_LOG_WARN, msg, "field", "x", (char *)NULL);
    static char text[65536];
    size_t n = log_capture_end(&cap, text, sizeof text);
    assert_true(n > 4000); /* the line was written */
    assert_null(strstr(text, "long-line-canary-42"));
}

static int group_setup(void **state)
{
    (void)state;
    return mkdtemp(dir) ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* ------------------------------------------------------------------ health --- */

static bool healthy(const char *doc, char *why, size_t n)
{
    cqrs_bus_health_t h;
    bool ok = cqrs_bus_stats_health(doc, strlen(doc), &h);
    snprintf(why, n, "%s", h.why);
    return ok;
}

#define BROKER_UP "\"brokers\":{\"127.0.0.1:9092/1\":{\"source\":\"learned\",\"state\":\"UP\"}}"

static void test_stats_health_decisions(void **state)
{
    (void)state;
    char why[200];
    assert_true(healthy("{" BROKER_UP ",\"cgrp\":{\"state\":\"up\"},\"topics\":{\"t\":{"
                        "\"partitions\":{\"0\":{\"partition\":0,\"leader\":1,\"desired\":true},"
                        "\"1\":{\"partition\":1,\"leader\":-1,\"desired\":false},"
                        "\"-1\":{\"partition\":-1,\"leader\":-1,\"desired\":false}}}}}",
                        why, sizeof why));
    assert_string_equal(why, "");
    /* a producer: no cgrp */
    assert_true(healthy("{" BROKER_UP "}", why, sizeof why));
    assert_false(healthy("{" BROKER_UP ",\"cgrp\":{\"state\":\"query-coord\"}}", why, sizeof why));
    assert_non_null(strstr(why, "coordinator not reached (query-coord)"));
    /* every learned broker decommissioned: only the internal one left */
    assert_false(
        healthy("{\"brokers\":{\":0/internal\":{\"source\":\"internal\",\"state\":\"UP\"}},"
                "\"cgrp\":{\"state\":\"up\"}}",
                why, sizeof why));
    assert_string_equal(why, "no broker known");
    assert_false(healthy("{\"brokers\":{\"b/1\":{\"source\":\"learned\",\"state\":\"DOWN\"},"
                         "\"b/bootstrap\":{\"source\":\"configured\",\"state\":\"TRY_CONNECT\"}}}",
                         why, sizeof why));
    assert_string_equal(why, "no broker up");
    /* a partition read, or with messages queued, without a leader */
    assert_false(healthy("{" BROKER_UP ",\"topics\":{\"t\":{\"partitions\":{\"3\":{"
                         "\"partition\":3,\"leader\":-1,\"desired\":true}}}}}",
                         why, sizeof why));
    assert_string_equal(why, "no leader known for t [3]");
    assert_false(healthy("{" BROKER_UP ",\"topics\":{\"t\":{\"partitions\":{\"4\":{"
                         "\"partition\":4,\"leader\":-1,\"desired\":false,"
                         "\"fetch_state\":\"active\"}}}}}",
                         why, sizeof why));
    assert_string_equal(why, "no leader known for t [4]");
    assert_true(healthy("{" BROKER_UP ",\"topics\":{\"t\":{\"partitions\":{\"4\":{"
                        "\"partition\":4,\"leader\":-1,\"desired\":false,"
                        "\"fetch_state\":\"none\"}}}}}",
                        why, sizeof why));
    assert_false(healthy("{" BROKER_UP ",\"topics\":{\"t\":{\"partitions\":{\"2\":{"
                         "\"partition\":2,\"leader\":-1,\"desired\":false,\"msgq_cnt\":4}}}}}",
                         why, sizeof why));
    assert_string_equal(why, "no leader known for t [2]");
    /* nothing to act on */
    assert_true(healthy("not json", why, sizeof why));
    assert_true(healthy("[]", why, sizeof why));
    cqrs_bus_health_t h;
    assert_true(cqrs_bus_stats_health("{}", 2, &h));
    assert_int_equal(h.partition, -1);
    /* the partition is named for the owner to look up */
    assert_false(cqrs_bus_stats_health(
        "{" BROKER_UP ",\"topics\":{\"t\":{\"partitions\":{\"5\":{\"partition\":5,"
        "\"leader\":1,\"broker\":-1,\"fetch_state\":\"active\"}}}}}",
        strlen("{" BROKER_UP ",\"topics\":{\"t\":{\"partitions\":{\"5\":{\"partition\":5,"
               "\"leader\":1,\"broker\":-1,\"fetch_state\":\"active\"}}}}}"),
        &h));
    assert_string_equal(h.why, "leader not connected for t [5]");
    assert_string_equal(h.topic, "t");
    assert_int_equal(h.partition, 5);
}

typedef struct stats_seen {
    int docs;
    bool healthy;
    char why[sizeof(cqrs_bus_health_t){0}.why];
} stats_seen_t;

static int record_stats(rd_kafka_t *rk, char *json, size_t len, void *opaque)
{
    (void)rk;
    stats_seen_t *s = opaque;
    s->docs++;
    cqrs_bus_health_t h;
    s->healthy = cqrs_bus_stats_health(json, len, &h);
    snprintf(s->why, sizeof s->why, "%s", h.why);
    return 0;
}

static rd_kafka_t *stats_consumer(const char *brokers, stats_seen_t *seen)
{
    rd_kafka_conf_t *c = rd_kafka_conf_new();
    char errstr[256];
    const char *kv[][2] = {{"bootstrap.servers", brokers},
                           {"group.id", "test-bus-health"},
                           {"statistics.interval.ms", "100"},
                           {"reconnect.backoff.max.ms", "100"},
                           {"topic.metadata.refresh.interval.ms", "200"},
                           {"log_level", "0"}};
    for (size_t i = 0; i < sizeof kv / sizeof kv[0]; i++)
        assert_int_equal(rd_kafka_conf_set(c, kv[i][0], kv[i][1], errstr, sizeof errstr),
                         RD_KAFKA_CONF_OK);
    rd_kafka_conf_set_stats_cb(c, record_stats);
    rd_kafka_conf_set_opaque(c, seen);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, c, errstr, sizeof errstr);
    assert_non_null(rk);
    rd_kafka_poll_set_consumer(rk);
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, "health", RD_KAFKA_PARTITION_UA);
    assert_int_equal(rd_kafka_subscribe(rk, l), RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_topic_partition_list_destroy(l);
    return rk;
}

/* Polls until the statistics say `want` (at most 20 s); the last verdict. */
static bool poll_until(rd_kafka_t *rk, stats_seen_t *seen, bool want)
{
    for (int i = 0; i < 200; i++) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
        if (m)
            rd_kafka_message_destroy(m);
        if (seen->docs > 0 && seen->healthy == want)
            break;
    }
    return seen->healthy;
}

/* Real statistics documents (the field names are librdkafka's): a consumer of librdkafka's
 * mock cluster is healthy once in its group, and unhealthy once its broker is down; one
 * whose only broker never answers is unhealthy from the start. */
static void test_stats_health_of_real_clients(void **state)
{
    (void)state;
    char errstr[256];
    rd_kafka_conf_t *pc = rd_kafka_conf_new();
    rd_kafka_conf_set(pc, "log_level", "0", errstr, sizeof errstr);
    rd_kafka_t *host = rd_kafka_new(RD_KAFKA_PRODUCER, pc, errstr, sizeof errstr);
    assert_non_null(host);
    rd_kafka_mock_cluster_t *mc = rd_kafka_mock_cluster_new(host, 1);
    assert_non_null(mc);
    assert_int_equal(rd_kafka_mock_topic_create(mc, "health", 2, 1), RD_KAFKA_RESP_ERR_NO_ERROR);

    stats_seen_t seen = {0};
    rd_kafka_t *rk = stats_consumer(rd_kafka_mock_cluster_bootstraps(mc), &seen);
    if (!poll_until(rk, &seen, true))
        fail_msg("a consumer in its group is not healthy: %s", seen.why);
    /* a partition it reads loses its leader, then gets it back */
    assert_int_equal(rd_kafka_mock_partition_set_leader(mc, "health", 1, -1),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    seen.docs = 0;
    if (poll_until(rk, &seen, false))
        fail_msg("a consumer with a partition without a leader is healthy");
    assert_string_equal(seen.why, "no leader known for health [1]");
    assert_int_equal(rd_kafka_mock_partition_set_leader(mc, "health", 1, 1),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    seen.docs = 0;
    if (!poll_until(rk, &seen, true))
        fail_msg("the leader is back but the consumer is not healthy: %s", seen.why);
    assert_int_equal(rd_kafka_mock_broker_set_down(mc, 1), RD_KAFKA_RESP_ERR_NO_ERROR);
    seen.docs = 0;
    if (poll_until(rk, &seen, false))
        fail_msg("a consumer whose only broker is down is healthy");
    rd_kafka_destroy_flags(rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(host);

    /* a port nothing listens on: bound here, never listening (connections refused) */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &alen), 0);
    char addr[32];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", ntohs(a.sin_port));
    stats_seen_t never = {0};
    rk = stats_consumer(addr, &never);
    if (poll_until(rk, &never, false))
        fail_msg("a consumer that never reached a broker is healthy");
    assert_true(strlen(never.why) > 0);
    rd_kafka_destroy_flags(rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
    close(fd);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names_map_as_in_confluent_images),
        cmocka_unit_test(test_secret_past_a_long_line_is_not_logged),
        cmocka_unit_test(test_refused_properties_and_their_aliases),
        cmocka_unit_test(test_secret_property_names),
        cmocka_unit_test(test_properties_file),
        cmocka_unit_test(test_properties_file_errors_name_the_line_never_the_value),
        cmocka_unit_test(test_environment_wins_over_the_file_and_file_values_over_plain_ones),
        cmocka_unit_test(test_values_from_files),
        cmocka_unit_test(test_bad_variables_are_all_reported),
        cmocka_unit_test(test_librdkafka_rejections_never_show_a_secret),
        cmocka_unit_test(test_stats_health_decisions),
        cmocka_unit_test(test_stats_health_of_real_clients),
        cmocka_unit_test_setup_teardown(test_operator_properties_override_the_clients_own_tunables,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_a_refused_property_fails_every_client, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_startup_check, setup, teardown),
        cmocka_unit_test_setup_teardown(test_librdkafka_log_lines_lose_secret_values, setup,
                                        teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
