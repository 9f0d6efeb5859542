/* bus.c — Kafka helpers: every client's configuration, topic creation, finding the messages of
 * one key.
 *
 * DESIGN (configuration; bus.h lists the variables)
 *  - One place makes every Kafka client's configuration (cqrs_bus_conf_new): the relay's
 *    producer and its recovery reader, the projector's consumer, the admin client, the locate
 *    scan, cqrsctl and the tests. So a security setting given once reaches all of them.
 *  - Order: fixed settings, the client's own, then the operator's properties — an operator's
 *    tunable overrides the client's default, while the values the guarantees rest on cannot be
 *    given at all (REFUSED below): they are refused, never silently overridden.
 *  - The operator's properties are read again for each client (environment and files, like
 *    CQRS_KAFKA_DEBUG before them): a rotated password file is picked up by the next client.
 *    The daemons check them once at start-up (cqrs_bus_check_properties), so a bad one is an
 *    exit-2 configuration error, not a log line at every reconnect.
 *  - Secrets: a secret property's value never enters a message of ours. librdkafka redacts
 *    sensitive properties in its debug dumps ("sasl.password = [redacted]") but echoes some
 *    values elsewhere (a bad sasl.oauthbearer.config, in an error log line): so every secret
 *    value read is registered with the log (cqrs_log_add_secret), which cuts it out of every
 *    line, and rd_kafka_new's errstr has the conf's secret values cut out before it becomes
 *    an error message.
 */
#include "cqrs/bus.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>

#include "cqrs/config.h"
#include "cqrs/log.h"
#include "cqrs/util.h"

extern char **environ;

cqrs_err_t cqrs_bus_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value,
                             cqrs_error_t *err)
{
    char errstr[256];
    if (rd_kafka_conf_set(conf, name, value, errstr, sizeof errstr) != RD_KAFKA_CONF_OK)
        return cqrs_error_set_where(err, CQRS_ERR_CONFIG, name, "kafka %s: %s", name, errstr);
    return CQRS_ERR_OK;
}

static void log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    /* syslog levels: 0-3 errors, 4 warning, 5-6 info, 7 debug */
    cqrs_log(level <= 3   ? CQRS_LOG_ERROR
             : level == 4 ? CQRS_LOG_WARN
                          : CQRS_LOG_DEBUG,
             buf, "component", "librdkafka", "facility", fac, (char *)NULL);
}

static void quiet_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    (void)level;
    (void)fac;
    (void)buf;
}

/* --------------------------------------------------------------- health --- */

static bool unhealthy(cqrs_bus_health_t *h, const char *what, const char *name)
{
    /* cut short if need be: a topic name may take 249 characters */
    if (snprintf(h->why, sizeof h->why, "%s%s%s", what, name ? " " : "", name ? name : "") < 0)
        h->why[0] = '\0';
    return false;
}

bool cqrs_bus_stats_health(const char *json, size_t len, cqrs_bus_health_t *h)
{
    memset(h, 0, sizeof *h);
    h->partition = -1;
    json_t *doc = json_loadb(json, len, 0, NULL);
    if (!json_is_object(doc)) {
        json_decref(doc);
        return true;
    }
    bool ok = true;
    char buf[300];
    json_t *cgrp = json_object_get(doc, "cgrp");
    const char *state = json_string_value(json_object_get(cgrp, "state"));
    if (state && strcmp(state, "up") != 0) {
        snprintf(buf, sizeof buf, "(%s)", state);
        ok = unhealthy(h, "consumer group coordinator not reached", buf);
    }
    /* Brokers: one up is enough (the logical coordinator brokers count too). */
    json_t *brokers = json_object_get(doc, "brokers");
    const char *bname;
    json_t *b;
    bool any_up = false, any = false;
    json_object_foreach(brokers, bname, b)
    {
        const char *source = json_string_value(json_object_get(b, "source"));
        if (source && strcmp(source, "internal") == 0)
            continue;
        any = true;
        const char *st = json_string_value(json_object_get(b, "state"));
        any_up = any_up || (st && strcmp(st, "UP") == 0);
    }
    if (ok && json_is_object(brokers) && !any_up)
        ok = unhealthy(h, any ? "no broker up" : "no broker known", NULL);
    /* Partitions in use: fetched (an assigned partition's fetch state is other than none,
     * stopping or stopped; "desired" is the legacy consumer's mark) or with messages waiting
     * to be sent; -1 is the topic's unassigned queue. Each needs a leader and the client's
     * handle of it ("broker"): librdkafka keeps a leader id whose broker it decommissioned
     * ("new leader not found in cache") and then has -1 there. */
    const char *tname, *pname;
    json_t *t, *part;
    json_object_foreach(json_object_get(doc, "topics"), tname, t)
    {
        json_object_foreach(json_object_get(t, "partitions"), pname, part)
        {
            if (!ok)
                break;
            json_int_t id = json_integer_value(json_object_get(part, "partition"));
            if (id < 0 || strcmp(pname, "-1") == 0)
                continue;
            const char *fetch = json_string_value(json_object_get(part, "fetch_state"));
            bool fetched = fetch && strcmp(fetch, "none") != 0 && strcmp(fetch, "stopping") != 0 &&
                           strcmp(fetch, "stopped") != 0;
            bool used = fetched || json_is_true(json_object_get(part, "desired")) ||
                        json_integer_value(json_object_get(part, "msgq_cnt")) > 0 ||
                        json_integer_value(json_object_get(part, "xmit_msgq_cnt")) > 0;
            json_t *leader = json_object_get(part, "leader");
            json_t *handle = json_object_get(part, "broker");
            bool no_leader = json_is_integer(leader) && json_integer_value(leader) < 0;
            bool no_handle = json_is_integer(handle) && json_integer_value(handle) < 0;
            if (used && (no_leader || no_handle)) {
                snprintf(buf, sizeof buf, "%s [%s]", tname, pname);
                ok = unhealthy(h, no_leader ? "no leader known for" : "leader not connected for",
                               buf);
                snprintf(h->topic, sizeof h->topic, "%s", tname);
                h->partition = (int32_t)id;
            }
        }
    }
    json_decref(doc);
    return ok;
}

/* ------------------------------------------------------------ properties --- */

/* The properties an operator may not set, each with its librdkafka aliases, and why. */
static const struct refused {
    const char *names; /* "|"-separated */
    const char *why;
} REFUSED[] = {
    {"bootstrap.servers|metadata.broker.list", "CQRS_KAFKA_BROKERS sets it"},
    {"transactional.id",
     "CQRS_RELAY_TRANSACTIONAL_ID sets it: the relays of one deployment share it, so that a new "
     "leader fences the old one's transaction"},
    {"enable.idempotence",
     "the relay's transactions need the idempotent producer (no duplicate or reordered events "
     "on retries)"},
    {"acks|request.required.acks",
     "the relay's transactions need acks=all (an event only one replica has can be lost)"},
    {"queuing.strategy", "fifo keeps the events of an aggregate in order"},
    {"partitioner",
     "murmur2_random maps an aggregate id to its partition, as Java clients and cqrsctl explain "
     "do; another partitioner moves aggregates to other partitions, and their events out of "
     "order"},
    {"message.timeout.ms|delivery.timeout.ms",
     "CQRS_KAFKA_MESSAGE_TIMEOUT_MS sets it (the relay's own waits follow that setting)"},
    {"isolation.level",
     "the readers see committed transactions only (read_committed): an aborted batch is "
     "published again"},
    {"enable.auto.commit|auto.commit.enable",
     "the projector commits only the offsets it stored after writing Redis, and the one-off "
     "readers commit none"},
    {"enable.auto.offset.store",
     "the projector stores an offset only after writing Redis (else a crash skips an event)"},
    {"auto.offset.reset", "a new consumer group must read the whole history (earliest)"},
    {"offset.store.method", "offsets are committed to the consumer group in Kafka"},
    {"enable.partition.eof",
     "the projector and the readers rely on end-of-partition events (catching up, locating "
     "events, the relay's recovery)"},
    {"group.id",
     "CQRS_CONSUMER_GROUP sets the projectors' group; the other readers use groups of their "
     "own"},
    {"group.instance.id",
     "every consumer of a process and every replica would share it, and the second is fenced"},
    {"group.protocol|group.remote.assignor|partition.assignment.strategy",
     "CQRS_KAFKA_GROUP_PROTOCOL sets the projectors' group protocol and its assignor (range: "
     "every instance gets a share of each projection)"},
    {"session.timeout.ms|heartbeat.interval.ms",
     "CQRS_KAFKA_SESSION_TIMEOUT_MS sets them (classic protocol; with KIP-848 the broker's "
     "group.consumer.session.timeout.ms decides)"},
    {"debug", "CQRS_KAFKA_DEBUG sets it"},
    {"statistics.interval.ms",
     "the projector reads its consumer's statistics every 5 s to find a client that stopped "
     "reaching Kafka, and replaces it"},
};

static bool in_list(const char *list, const char *name)
{
    size_t len = strlen(name);
    for (const char *p = list; p && *p;) {
        const char *bar = strchr(p, '|');
        size_t n = bar ? (size_t)(bar - p) : strlen(p);
        if (n == len && strncmp(p, name, n) == 0)
            return true;
        p = bar ? bar + 1 : NULL;
    }
    return false;
}

const char *cqrs_bus_property_refused(const char *name)
{
    /* librdkafka hands a name it does not know globally to the default topic configuration,
     * stripping a leading "topic." (topic.partitioner is partitioner): the same rules apply. */
    if (strncmp(name, "topic.", 6) == 0)
        name += 6;
    for (size_t i = 0; i < sizeof REFUSED / sizeof REFUSED[0]; i++)
        if (in_list(REFUSED[i].names, name))
            return REFUSED[i].why;
    return NULL;
}

bool cqrs_bus_property_secret(const char *name)
{
    static const char *const words[] = {"password", "secret", "key", "token", "credential"};
    if (strcmp(name, "sasl.oauthbearer.config") == 0 ||
        strcmp(name, "sasl.oauthbearer.extensions") == 0)
        return true;
    size_t len = strlen(name);
    if (len >= 9 && strcmp(name + len - 9, ".location") == 0)
        return false;
    for (size_t i = 0; i < sizeof words / sizeof words[0]; i++)
        if (strstr(name, words[i]))
            return true;
    return false;
}

bool cqrs_bus_property_name(const char *name, char *out, size_t size)
{
    size_t o = 0;
    for (const char *p = name; *p;) {
        char c = *p;
        char mapped;
        size_t used = 1;
        if (c == '_') {
            size_t run = 1;
            while (run < 3 && p[run] == '_')
                run++;
            /* Confluent's order: `___` first, then `__`, then `_`. */
            mapped = run == 3 ? '-' : run == 2 ? '_' : '.';
            used = run;
        } else if (c >= 'A' && c <= 'Z') {
            mapped = (char)(c - 'A' + 'a');
        } else if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')) {
            mapped = c;
        } else {
            return false;
        }
        if (o + 1 >= size)
            return false;
        out[o++] = mapped;
        p += used;
    }
    if (o == 0 || o >= size)
        return false;
    out[o] = '\0';
    return out[0] != '.' && out[o - 1] != '.' && !strstr(out, "..");
}

void cqrs_bus_props_free(cqrs_bus_props_t *props)
{
    for (size_t i = 0; i < props->n; i++) {
        free(props->v[i].name);
        /* Not left behind in freed memory. */
        if (props->v[i].value)
            explicit_bzero(props->v[i].value, strlen(props->v[i].value));
        free(props->v[i].value);
        free(props->v[i].source);
    }
    free(props->v);
    props->v = NULL;
    props->n = 0;
}

/* Adds or replaces name (copied); takes value. False when out of memory (value freed). */
static bool props_put(cqrs_bus_props_t *props, const char *name, char *value, const char *source)
{
    cqrs_bus_prop_t *p = NULL;
    for (size_t i = 0; i < props->n && !p; i++)
        if (strcmp(props->v[i].name, name) == 0)
            p = &props->v[i];
    char *src = strdup(source);
    if (!p) {
        cqrs_bus_prop_t *v = realloc(props->v, (props->n + 1) * sizeof *v);
        char *nm = strdup(name);
        if (v)
            props->v = v;
        if (!v || !nm || !src) {
            free(nm);
            free(src);
            free(value);
            return false;
        }
        p = &props->v[props->n++];
        *p = (cqrs_bus_prop_t){nm, NULL, NULL};
    } else if (!src) {
        free(value);
        return false;
    }
    if (p->value)
        explicit_bzero(p->value, strlen(p->value));
    free(p->value);
    free(p->source);
    p->value = value;
    p->source = src;
    return true;
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r' || s[n - 1] == '\n'))
        s[--n] = '\0';
    return s;
}

/* A refused property is reported where it was set. */
static int refuse(const char *name, const char *source, FILE *errors)
{
    const char *why = cqrs_bus_property_refused(name);
    if (!why)
        return 0;
    if (errors)
        fprintf(errors, "%s: the Kafka property %s cannot be set: %s\n", source, name, why);
    return 1;
}

int cqrs_bus_props_read_file(const char *var, const char *path, cqrs_bus_props_t *props,
                             FILE *errors)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        if (errors)
            fprintf(errors, "%s: cannot read %s: %s\n", var, path, strerror(errno));
        return 1;
    }
    int bad = 0, line_no = 0;
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) >= 0) {
        line_no++;
        char *s = trim(line);
        if (*s == '\0' || *s == '#')
            continue;
        char source[512];
        snprintf(source, sizeof source, "%s: %s:%d", var, path, line_no);
        char *eq = strchr(s, '=');
        char *name = eq ? (*eq = '\0', trim(s)) : NULL;
        if (!name || !*name) {
            /* The line may be a secret with its `=` missing: never echoed. */
            if (errors)
                fprintf(errors, "%s: not a name=value line\n", source);
            bad++;
            continue;
        }
        if (refuse(name, source, errors)) {
            bad++;
            continue;
        }
        char *value = strdup(trim(eq + 1));
        if (!value || !props_put(props, name, value, source)) {
            if (errors)
                fprintf(errors, "%s: out of memory\n", source);
            bad++;
        }
    }
    if (line) {
        explicit_bzero(line, cap);
        free(line);
    }
    fclose(f);
    return bad;
}

/* Whether librdkafka knows a property (global or topic level). */
static bool known_property(const char *name)
{
    rd_kafka_conf_t *c = rd_kafka_conf_new();
    rd_kafka_topic_conf_t *t = rd_kafka_topic_conf_new();
    size_t size = 0;
    bool known = (c && rd_kafka_conf_get(c, name, NULL, &size) != RD_KAFKA_CONF_UNKNOWN) ||
                 (t && rd_kafka_topic_conf_get(t, name, NULL, &size) != RD_KAFKA_CONF_UNKNOWN);
    if (c)
        rd_kafka_conf_destroy(c);
    if (t)
        rd_kafka_topic_conf_destroy(t);
    return known;
}

/* One CQRS_KAFKA_PROPERTY_ variable. pass 0 takes values, pass 1 files. */
static int load_var(const char *entry, int pass, cqrs_bus_props_t *props, FILE *errors)
{
    const char *eq = strchr(entry, '=');
    size_t plen = strlen(CQRS_KAFKA_PROPERTY_PREFIX);
    if (!eq || strncmp(entry, CQRS_KAFKA_PROPERTY_PREFIX, plen) != 0)
        return 0;
    char var[256], name[256];
    size_t vlen = (size_t)(eq - entry);
    if (vlen >= sizeof var) {
        if (errors)
            fprintf(errors, "%.64s…: variable name too long\n", entry);
        return pass == 0;
    }
    memcpy(var, entry, vlen);
    var[vlen] = '\0';
    const char *value = eq + 1;
    const char *suffix = var + plen;
    bool from_file = false;
    size_t slen = strlen(suffix);
    if (slen > 5 && strcmp(suffix + slen - 5, "_FILE") == 0 && suffix[slen - 6] != '_') {
        char base[256];
        memcpy(base, suffix, slen - 5);
        base[slen - 5] = '\0';
        char full[256];
        from_file = cqrs_bus_property_name(base, name, sizeof name) &&
                    !(cqrs_bus_property_name(suffix, full, sizeof full) && known_property(full));
    }
    if (from_file != (pass == 1))
        return 0;
    if (!from_file && !cqrs_bus_property_name(suffix, name, sizeof name)) {
        if (errors)
            fprintf(errors,
                    "%s: not a Kafka property name (letters, digits and _: `_` stands for `.`, "
                    "`__` for `_`)\n",
                    var);
        return 1;
    }
    if (refuse(name, var, errors))
        return 1;
    char *v = NULL;
    if (from_file) {
        if (!*value) {
            if (errors)
                fprintf(errors, "%s: empty, a file name expected\n", var);
            return 1;
        }
        v = cqrs_read_secret_file(value);
        if (!v) {
            if (errors)
                fprintf(errors, "%s: cannot read %s: %s\n", var, value, strerror(errno));
            return 1;
        }
    } else {
        v = strdup(value);
    }
    if (!v || !props_put(props, name, v, var)) {
        if (errors)
            fprintf(errors, "%s: out of memory\n", var);
        return 1;
    }
    return 0;
}

int cqrs_bus_props_load(char *const *env, cqrs_bus_props_t *props, FILE *errors)
{
    if (!env)
        env = environ;
    int bad = 0;
    const char *file = NULL;
    size_t flen = strlen(CQRS_KAFKA_PROPERTIES_FILE);
    for (char *const *e = env; e && *e; e++)
        if (strncmp(*e, CQRS_KAFKA_PROPERTIES_FILE, flen) == 0 && (*e)[flen] == '=')
            file = *e + flen + 1;
    if (file && *file)
        bad += cqrs_bus_props_read_file(CQRS_KAFKA_PROPERTIES_FILE, file, props, errors);
    for (int pass = 0; pass < 2; pass++)
        for (char *const *e = env; e && *e; e++)
            bad += load_var(*e, pass, props, errors);
    return bad;
}

int cqrs_bus_props_apply(const cqrs_bus_props_t *props, rd_kafka_conf_t *conf, FILE *errors)
{
    int bad = 0;
    for (size_t i = 0; i < props->n; i++) {
        const cqrs_bus_prop_t *p = &props->v[i];
        char errstr[512];
        rd_kafka_conf_res_t res = rd_kafka_conf_set(conf, p->name, p->value, errstr, sizeof errstr);
        if (res == RD_KAFKA_CONF_OK)
            continue;
        bad++;
        if (!errors)
            continue;
        /* librdkafka's message for a bad value quotes the value. */
        if (res == RD_KAFKA_CONF_INVALID && cqrs_bus_property_secret(p->name))
            fprintf(
                errors,
                "%s: the Kafka property %s: librdkafka refuses the value (a secret: not shown)\n",
                p->source, p->name);
        else
            fprintf(errors, "%s: the Kafka property %s: %s\n", p->source, p->name, errstr);
    }
    return bad;
}

/* A secret for the log to cut out: the value, and for a list of `key=value` (the OAUTHBEARER
 * config and extensions, of which librdkafka echoes the rest of the line from a bad key on)
 * each value of 4 bytes or more too. */
static void register_secret(const char *name, const char *value)
{
    cqrs_log_add_secret(value);
    /* The OAUTHBEARER settings are lists of key=value pieces that librdkafka may echo one at a
     * time: each value is a secret too. Others (a PEM key, a password) stay whole: their words
     * ("PRIVATE", a principal's name) are not secrets and would be cut out of every line. */
    if (strcmp(name, "sasl.oauthbearer.config") != 0 &&
        strcmp(name, "sasl.oauthbearer.extensions") != 0)
        return;
    char *copy = strdup(value), *save = NULL;
    for (char *t = copy ? strtok_r(copy, " \t,", &save) : NULL; t;
         t = strtok_r(NULL, " \t,", &save)) {
        char *eq = strchr(t, '=');
        const char *piece = eq ? eq + 1 : t;
        if (strlen(piece) >= 8)
            cqrs_log_add_secret(piece);
    }
    if (copy)
        explicit_bzero(copy, strlen(value));
    free(copy);
}

/* Fixed settings, own, then the operator's properties (read into props, which the caller
 * frees); every problem to errors. */
static int conf_fill(rd_kafka_conf_t *conf, const char *brokers, const char *client_id,
                     const char *const own[][2], cqrs_bus_props_t *props, FILE *errors)
{
    int bad = 0;
    char errstr[512];
    const char *debug = getenv("CQRS_KAFKA_DEBUG");
    const char *fixed[] = {
        "bootstrap.servers",       brokers, "client.id", client_id ? client_id : "cqrs",
        "socket.keepalive.enable", "true",  "debug",     debug && *debug ? debug : NULL};
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i += 2) {
        if (fixed[i + 1] && rd_kafka_conf_set(conf, fixed[i], fixed[i + 1], errstr,
                                              sizeof errstr) != RD_KAFKA_CONF_OK) {
            bad++;
            if (errors)
                fprintf(errors, "%s: %s\n",
                        strcmp(fixed[i], "debug") == 0 ? "CQRS_KAFKA_DEBUG" : fixed[i], errstr);
        }
    }
    for (size_t i = 0; own && own[i][0]; i++) {
        if (rd_kafka_conf_set(conf, own[i][0], own[i][1], errstr, sizeof errstr) !=
            RD_KAFKA_CONF_OK) {
            bad++;
            if (errors)
                fprintf(errors, "%s: %s\n", own[i][0], errstr);
        }
    }
    bad += cqrs_bus_props_load(NULL, props, errors);
    for (size_t i = 0; i < props->n; i++)
        if (cqrs_bus_property_secret(props->v[i].name))
            register_secret(props->v[i].name, props->v[i].value);
    bad += cqrs_bus_props_apply(props, conf, errors);
    return bad;
}

rd_kafka_conf_t *cqrs_bus_conf_new(const char *brokers, const char *client_id,
                                   const char *const own[][2], cqrs_error_t *err)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char *report = NULL;
    size_t report_len = 0;
    FILE *errors = open_memstream(&report, &report_len);
    if (!conf || !errors) {
        if (errors)
            fclose(errors);
        free(report);
        if (conf)
            rd_kafka_conf_destroy(conf);
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    cqrs_bus_props_t props = {0};
    int bad = conf_fill(conf, brokers, client_id, own, &props, errors);
    cqrs_bus_props_free(&props);
    fclose(errors);
    if (bad) {
        /* The first problem; the start-up check has listed them all. */
        char *nl = report ? strchr(report, '\n') : NULL;
        if (nl)
            *nl = '\0';
        cqrs_error_set(err, CQRS_ERR_CONFIG, "%s", report ? report : "bad Kafka configuration");
        free(report);
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    free(report);
    rd_kafka_conf_set_log_cb(conf, log_cb);
    return conf;
}

/* Replaces every occurrence of secret in msg (in place, within size) by "[redacted]". */
static void redact(char *msg, size_t size, const char *secret)
{
    size_t slen = strlen(secret);
    if (slen == 0)
        return;
    char out[1024];
    size_t o = 0;
    bool changed = false;
    for (const char *p = msg; *p && o + 1 < sizeof out;) {
        if (strncmp(p, secret, slen) == 0) {
            o += (size_t)snprintf(out + o, sizeof out - o, "[redacted]");
            if (o >= sizeof out)
                o = sizeof out - 1;
            p += slen;
            changed = true;
        } else {
            out[o++] = *p++;
        }
    }
    out[o] = '\0';
    if (changed && size > 0) {
        size_t n = o < size - 1 ? o : size - 1;
        memcpy(msg, out, n);
        msg[n] = '\0';
    }
}

rd_kafka_t *cqrs_bus_client_new(rd_kafka_type_t type, rd_kafka_conf_t *conf, const char *what,
                                cqrs_error_t *err)
{
    char errstr[512];
    rd_kafka_t *rk = rd_kafka_new(type, conf, errstr, sizeof errstr);
    if (rk)
        return rk;
    size_t cnt = 0;
    const char **dump = rd_kafka_conf_dump(conf, &cnt);
    for (size_t i = 0; dump && i + 1 < cnt; i += 2)
        if (cqrs_bus_property_secret(dump[i]) && dump[i + 1])
            redact(errstr, sizeof errstr, dump[i + 1]);
    if (dump)
        rd_kafka_conf_dump_free(dump, cnt);
    rd_kafka_conf_destroy(conf);
    cqrs_error_set(err, CQRS_ERR_CONFIG, "cannot create the Kafka %s: %s", what, errstr);
    return NULL;
}

/* SCRAM with a librdkafka older than 2.6.1 is refused by Kafka 4 brokers as a wrong password
 * (its client-final message repeats the client nonce, confluentinc/librdkafka#4895): said at
 * start-up rather than left to look like bad credentials. A warning: older brokers take it. */
static void scram_warning(const cqrs_bus_props_t *props, FILE *errors)
{
    if (rd_kafka_version() >= 0x02060100 || !errors)
        return;
    for (size_t i = 0; i < props->n; i++)
        if ((strcmp(props->v[i].name, "sasl.mechanisms") == 0 ||
             strcmp(props->v[i].name, "sasl.mechanism") == 0) &&
            strncasecmp(props->v[i].value, "SCRAM-", 6) == 0)
            fprintf(errors,
                    "%s: warning: librdkafka %s cannot authenticate with SCRAM to Apache Kafka 4 "
                    "or later (the broker answers \"invalid credentials\"): fixed in "
                    "librdkafka 2.6.1 (confluentinc/librdkafka#4895)\n",
                    props->v[i].source, rd_kafka_version_str());
}

int cqrs_bus_check_properties(FILE *errors)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    if (!conf) {
        if (errors)
            fprintf(errors, "Kafka properties: out of memory\n");
        return 1;
    }
    /* No brokers: rd_kafka_new connects nowhere. */
    cqrs_bus_props_t props = {0};
    int bad = conf_fill(conf, NULL, "cqrs-check", NULL, &props, errors);
    if (bad) {
        rd_kafka_conf_destroy(conf);
        cqrs_bus_props_free(&props);
        return bad;
    }
    rd_kafka_conf_set_log_cb(conf, quiet_log_cb);
    cqrs_error_t err;
    rd_kafka_t *rk = cqrs_bus_client_new(RD_KAFKA_PRODUCER, conf, "client", &err);
    if (rk) {
        rd_kafka_destroy(rk);
        scram_warning(&props, errors);
    } else {
        /* librdkafka's reason names the property ("ssl.ca.location failed: …"): say where
         * that was set. */
        const char *source = NULL;
        for (size_t i = 0; i < props.n && !source; i++)
            if (strstr(err.message, props.v[i].name))
                source = props.v[i].source;
        if (errors)
            fprintf(errors, "%s: %s\n",
                    source ? source
                           : CQRS_KAFKA_PROPERTY_PREFIX "<NAME> or " CQRS_KAFKA_PROPERTIES_FILE,
                    err.message);
        bad = 1;
    }
    cqrs_bus_props_free(&props);
    return bad;
}

void cqrs_bus_print_help(FILE *out)
{
    static const cqrs_config_entry_t rows[] = {
        {"CQRS_KAFKA_DEBUG", CQRS_CONFIG_STRING, "", 0, 0,
         "librdkafka debug contexts of every Kafka client, e.g. broker,security (logged at "
         "CQRS_LOG_LEVEL=debug)",
         NULL, NULL},
        {CQRS_KAFKA_PROPERTIES_FILE, CQRS_CONFIG_STRING, "", 0, 0,
         "a file of librdkafka name=value lines (# comments) for every Kafka client", NULL, NULL},
        {CQRS_KAFKA_PROPERTY_PREFIX "<NAME>", CQRS_CONFIG_SECRET, "", 0, 0,
         "one librdkafka property for every Kafka client, winning over the file; NAME in "
         "upper case with _ for . and __ for _ (SASL_MECHANISMS = sasl.mechanisms)",
         NULL, NULL},
    };
    fprintf(out, "\nKafka client settings (every Kafka client; README, \"Kafka security\"):\n");
    cqrs_config_print_rows(rows, sizeof rows / sizeof rows[0], out);
    fprintf(out, "      refused (the product sets them):");
    for (size_t i = 0; i < sizeof REFUSED / sizeof REFUSED[0]; i++) {
        const char *bar = strchr(REFUSED[i].names, '|');
        fprintf(out, "%s %.*s", i ? "," : "",
                (int)(bar ? (size_t)(bar - REFUSED[i].names) : strlen(REFUSED[i].names)),
                REFUSED[i].names);
    }
    fprintf(out, "\n");
}

/* ------------------------------------------------------------ admin, scan --- */

cqrs_err_t cqrs_bus_create_topics(const char *brokers, const char *const *topics, size_t n,
                                  int partitions, int replication, int timeout_ms,
                                  cqrs_error_t *err)
{
    cqrs_err_t rc = CQRS_ERR_OK;
    rd_kafka_t *rk = NULL;
    rd_kafka_NewTopic_t **nt = calloc(n, sizeof *nt);
    rd_kafka_AdminOptions_t *opts = NULL;
    rd_kafka_queue_t *q = NULL;
    rd_kafka_event_t *ev = NULL;
    char errstr[256];

    if (!nt) {
        rc = cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        goto out;
    }
    rd_kafka_conf_t *conf = cqrs_bus_conf_new(brokers, "cqrs-admin", NULL, err);
    rk = conf ? cqrs_bus_client_new(RD_KAFKA_PRODUCER, conf, "admin client", err) : NULL;
    if (!rk) {
        rc = err ? err->code : CQRS_ERR_CONFIG;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        nt[i] = rd_kafka_NewTopic_new(topics[i], partitions, replication, errstr, sizeof errstr);
        if (!nt[i]) {
            rc = cqrs_error_set_where(err, CQRS_ERR_CONFIG, topics[i], "topic %s: %s", topics[i],
                                      errstr);
            goto out;
        }
    }
    opts = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_CREATETOPICS);
    rd_kafka_AdminOptions_set_request_timeout(opts, timeout_ms, errstr, sizeof errstr);
    rd_kafka_AdminOptions_set_operation_timeout(opts, timeout_ms, errstr, sizeof errstr);
    q = rd_kafka_queue_new(rk);
    rd_kafka_CreateTopics(rk, nt, n, opts, q);
    ev = rd_kafka_queue_poll(q, timeout_ms + 2000);
    if (!ev) {
        rc = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "kafka did not answer CreateTopics");
        goto out;
    }
    if (rd_kafka_event_error(ev)) {
        rc = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "CreateTopics: %s",
                            rd_kafka_event_error_string(ev));
        goto out;
    }
    const rd_kafka_CreateTopics_result_t *res = rd_kafka_event_CreateTopics_result(ev);
    size_t cnt = 0;
    const rd_kafka_topic_result_t **tr = rd_kafka_CreateTopics_result_topics(res, &cnt);
    for (size_t i = 0; i < cnt; i++) {
        rd_kafka_resp_err_t te = rd_kafka_topic_result_error(tr[i]);
        const char *name = rd_kafka_topic_result_name(tr[i]);
        if (te == RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS)
            continue;
        if (te != RD_KAFKA_RESP_ERR_NO_ERROR) {
            rc = cqrs_error_set_where(err, CQRS_ERR_UNAVAILABLE, name, "topic %s: %s", name,
                                      rd_kafka_topic_result_error_string(tr[i]));
            goto out;
        }
        CQRS_LOG_INFO("topic created", "topic", name);
    }
out:
    if (ev)
        rd_kafka_event_destroy(ev);
    if (q)
        rd_kafka_queue_destroy(q);
    if (opts)
        rd_kafka_AdminOptions_destroy(opts);
    if (nt) {
        for (size_t i = 0; i < n; i++)
            if (nt[i])
                rd_kafka_NewTopic_destroy(nt[i]);
        free(nt);
    }
    if (rk)
        rd_kafka_destroy(rk);
    return rc;
}

static int remaining_ms(int64_t deadline)
{
    int64_t left = deadline - cqrs_monotonic_ms();
    return left < 1 ? 1 : (int)left;
}

/* The ce_id header of a message, compared without copying. */
static bool message_has_id(const rd_kafka_message_t *m, const char *id)
{
    rd_kafka_headers_t *h = NULL;
    const void *val = NULL;
    size_t size = 0;
    return rd_kafka_message_headers(m, &h) == RD_KAFKA_RESP_ERR_NO_ERROR &&
           rd_kafka_header_get_last(h, "ce_id", &val, &size) == RD_KAFKA_RESP_ERR_NO_ERROR && val &&
           size == strlen(id) && memcmp(val, id, size) == 0;
}

cqrs_err_t cqrs_bus_locate(const char *brokers, const char *topic, const char *key,
                           const cqrs_bus_scan_t *scan, cqrs_bus_sought_t *sought, size_t n,
                           int32_t *partition, bool *complete, cqrs_error_t *err)
{
    int64_t deadline = cqrs_monotonic_ms() + (scan->budget_ms > 0 ? scan->budget_ms : 1);
    cqrs_err_t rc = CQRS_ERR_OK;
    rd_kafka_t *rk = NULL;
    rd_kafka_topic_t *rkt = NULL;
    const rd_kafka_metadata_t *md = NULL;
    rd_kafka_topic_partition_list_t *l = NULL;
    *partition = -1;
    *complete = false;
    for (size_t i = 0; i < n; i++)
        sought[i].offset = -1;

    /* No group: partitions are assigned by hand and nothing is committed; librdkafka's own
     * log lines would only repeat the error returned here. */
    static const char *const own[][2] = {
        {"group.id", "cqrs-locate-unused"},
        {"enable.auto.commit", "false"},
        {"isolation.level", "read_committed"},
        {"enable.partition.eof", "true"},
        {"log_level", "0"},
        {NULL, NULL},
    };
    rd_kafka_conf_t *conf = cqrs_bus_conf_new(brokers, "cqrs-locate", own, err);
    if (!conf)
        return CQRS_ERR_CONFIG;
    rk = cqrs_bus_client_new(RD_KAFKA_CONSUMER, conf, "consumer", err);
    if (!rk)
        return CQRS_ERR_CONFIG;
    rd_kafka_poll_set_consumer(rk);
    rkt = rd_kafka_topic_new(rk, topic, NULL);
    rd_kafka_resp_err_t ke = rd_kafka_metadata(rk, 0, rkt, &md, remaining_ms(deadline));
    if (ke != RD_KAFKA_RESP_ERR_NO_ERROR) {
        rc = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "Kafka metadata: %s", rd_kafka_err2str(ke));
        goto out;
    }
    if (md->topic_cnt != 1 || md->topics[0].err || md->topics[0].partition_cnt < 1) {
        rc = cqrs_error_set(err, CQRS_ERR_NOT_FOUND, "topic %s does not exist", topic);
        goto out;
    }
    *partition = rd_kafka_msg_partitioner_murmur2_random(rkt, key, strlen(key),
                                                         md->topics[0].partition_cnt, NULL, NULL);

    int64_t low = 0, high = 0;
    ke = rd_kafka_query_watermark_offsets(rk, topic, *partition, &low, &high,
                                          remaining_ms(deadline));
    if (ke != RD_KAFKA_RESP_ERR_NO_ERROR) {
        rc =
            cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "Kafka watermarks: %s", rd_kafka_err2str(ke));
        goto out;
    }
    /* Start at the first message stamped since then (CreateTime, set when the relay
     * produced it); without an answer, at the beginning of what Kafka still holds. */
    l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, topic, *partition)->offset = scan->since_ms;
    int64_t start = low;
    if (rd_kafka_offsets_for_times(rk, l, remaining_ms(deadline)) == RD_KAFKA_RESP_ERR_NO_ERROR &&
        l->elems[0].err == RD_KAFKA_RESP_ERR_NO_ERROR)
        start = l->elems[0].offset < 0 ? high : l->elems[0].offset;
    if (start < low)
        start = low;
    if (start >= high) {
        *complete = true;
        goto out;
    }
    l->elems[0].offset = start;
    ke = rd_kafka_assign(rk, l);
    if (ke != RD_KAFKA_RESP_ERR_NO_ERROR) {
        rc = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "Kafka assign: %s", rd_kafka_err2str(ke));
        goto out;
    }
    size_t found = 0, read = 0;
    while (found < n && read < scan->max_messages && cqrs_monotonic_ms() < deadline) {
        rd_kafka_message_t *m =
            rd_kafka_consumer_poll(rk, remaining_ms(deadline) < 100 ? remaining_ms(deadline) : 100);
        if (!m)
            continue;
        if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) {
            /* With read_committed, the end is the last stable offset. */
            *complete = true;
            rd_kafka_message_destroy(m);
            break;
        }
        if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
            read++;
            for (size_t i = 0; i < n; i++)
                if (sought[i].offset < 0 && message_has_id(m, sought[i].event_id)) {
                    sought[i].offset = m->offset;
                    found++;
                }
            if (m->offset + 1 >= high)
                *complete = true;
        }
        rd_kafka_message_destroy(m);
        if (*complete)
            break;
    }
    if (found == n)
        *complete = true;
out:
    if (l)
        rd_kafka_topic_partition_list_destroy(l);
    if (md)
        rd_kafka_metadata_destroy(md);
    if (rkt)
        rd_kafka_topic_destroy(rkt);
    if (rk) {
        rd_kafka_consumer_close(rk);
        rd_kafka_destroy(rk);
    }
    return rc;
}
