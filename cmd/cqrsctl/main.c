/* cqrsctl — the operator's command line. Exit codes: 0 success, 1 the operation failed,
 * 2 usage or configuration error, 3 a dependency is unavailable. */
#include <cqrs/bus.h>
#include <cqrs/config.h>
#include <cqrs/embed.h>
#include <cqrs/log.h>
#include <cqrs/redis.h>
#include <cqrs/store.h>
#include <cqrs/version.h>
#include "ops.h"
#include "query.h"
#include "topics.h"
#include "verify.h"
#include <getopt.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern const cqrs_embedded_file_t cqrs_migrations[];

static struct {
    char *pg_dsn;
    cqrs_redis_config_t redis;
    char *kafka_brokers;
    char *topic_prefix;
    int64_t partitions;
    int64_t replication;
} S;

static const cqrs_config_entry_t entries[] = {
    {"CQRS_PG_DSN", CQRS_CONFIG_SECRET, NULL, 0, 0, "PostgreSQL connection string or URI",
     &S.pg_dsn, NULL},
    CQRS_REDIS_SETTINGS(S.redis, "Redis of the read model (verify, explain, dlq, rebuild)"),
    {"CQRS_KAFKA_BROKERS", CQRS_CONFIG_STRING, "127.0.0.1:9092", 0, 0, "Kafka bootstrap servers",
     &S.kafka_brokers, NULL},
    TOPIC_PREFIX_SETTING(&S.topic_prefix),
    {"CQRS_KAFKA_PARTITIONS", CQRS_CONFIG_INT, "6", 1, 10000, "partitions of created topics",
     &S.partitions, NULL},
    {"CQRS_KAFKA_REPLICATION", CQRS_CONFIG_INT, "-1", -1, 100,
     "replication factor of created topics (-1 = broker default)", &S.replication, NULL},
};
#define N_ENTRIES (sizeof entries / sizeof entries[0])

enum { OPT_HELP = 1, OPT_JSON = 2, OPT_NO_TOPICS = 4 };

static const struct option O_NONE[] = {{NULL, 0, NULL, 0}};
static const struct option O_MIGRATE[] = {{"no-topics", no_argument, NULL, OPT_NO_TOPICS},
                                          {"help", no_argument, NULL, OPT_HELP},
                                          {NULL, 0, NULL, 0}};
static const struct option O_JSON[] = {{"json", no_argument, NULL, OPT_JSON},
                                       {"help", no_argument, NULL, OPT_HELP},
                                       {NULL, 0, NULL, 0}};

/* A subcommand: its line of the usage, what it needs, its options (NULL: it parses its own,
 * with its own --help) and what runs it (argv[0] is the subcommand; opts the OPT_* seen). */
typedef struct command {
    const char *name;
    const char *synopsis;
    const char *help; /* '\n' between lines */
    bool configured;  /* reads the configuration (every command but migrations) */
    bool uses_redis;
    const struct option *options;
    int (*run)(const cqrsctl_env_t *env, unsigned opts, int argc, char **argv);
} command_t;

static int cmd_migrate(const cqrsctl_env_t *env, unsigned opts, int argc, char **argv);
static int cmd_migrations(const cqrsctl_env_t *env, unsigned opts, int argc, char **argv);
static int cmd_outbox(const cqrsctl_env_t *env, unsigned opts, int argc, char **argv);
static int cmd_verify(const cqrsctl_env_t *env, unsigned opts, int argc, char **argv);
static int cmd_explain(const cqrsctl_env_t *env, unsigned opts, int argc, char **argv);
static int cmd_dlq(const cqrsctl_env_t *env, unsigned opts, int argc, char **argv);
static int cmd_rebuild(const cqrsctl_env_t *env, unsigned opts, int argc, char **argv);

static const command_t COMMANDS[] = {
    {"migrate", "migrate [--no-topics]",
     "apply pending SQL migrations (recorded in\nschema_migrations) and create the Kafka topics",
     true, false, O_MIGRATE, cmd_migrate},
    {"migrations", "migrations", "list the migrations this binary carries", false, false, O_NONE,
     cmd_migrations},
    {"outbox", "outbox [--json]",
     "the outbox backlog, its oldest row's age, the\nactive relay and since when", true, false,
     O_JSON, cmd_outbox},
    {"verify", "verify [--json]",
     "compare the read model (Redis) with the write model\n(PostgreSQL): documents, fields, "
     "lists; exit 1 on drift",
     true, true, O_JSON, cmd_verify},
    {"explain", "explain <id> [--json]",
     "one aggregate across the system: its events, the outbox,\nKafka partition and offset, the "
     "document in Redis, dead\nletters, lag; exit 1 when the aggregate is unknown",
     true, true, NULL, cmd_explain},
    {"dlq", "dlq list|show <id>|retry <id>|drop <id> --yes [--json]",
     "the read model's dead letters (cqrsctl dlq --help)", true, true, NULL, cmd_dlq},
    {"rebuild", "rebuild [--projection products|orders|all] [--jobs N]",
     "rebuild the read model from the event log into a new\ngeneration and switch to it without "
     "downtime",
     true, true, NULL, cmd_rebuild},
};
#define N_COMMANDS (sizeof COMMANDS / sizeof COMMANDS[0])

static void usage(FILE *out)
{
    enum { COLUMN = 24 }; /* where the help starts, after two spaces */
    fprintf(out, "usage: cqrsctl <command> [options]\n"
                 "       cqrsctl --help | --version\n\n"
                 "commands:\n");
    for (size_t i = 0; i < N_COMMANDS; i++) {
        const command_t *c = &COMMANDS[i];
        if (strlen(c->synopsis) < COLUMN - 1)
            fprintf(out, "  %-*s", COLUMN, c->synopsis);
        else
            fprintf(out, "  %s\n  %*s", c->synopsis, COLUMN, "");
        for (const char *h = c->help; *h;) {
            size_t len = strcspn(h, "\n");
            fprintf(out, "%.*s\n", (int)len, h);
            h += len;
            if (*h == '\n' && *++h)
                fprintf(out, "  %*s", COLUMN, "");
        }
    }
    fprintf(out, "\n");
    cqrs_config_print_help(entries, N_ENTRIES, out);
    cqrs_bus_print_help(out);
}

static int cmd_migrate(const cqrsctl_env_t *env, unsigned opts, int argc, char **argv)
{
    (void)env;
    (void)argc;
    (void)argv;
    bool topics = !(opts & OPT_NO_TOPICS);
    cqrs_error_t err;
    int applied = 0;
    cqrs_err_t rc = cqrs_store_migrate(S.pg_dsn, cqrs_migrations, &applied, &err);
    if (rc != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl migrate: %s%s%s\n", err.message, err.where[0] ? " in " : "",
                err.where);
        return rc == CQRS_ERR_UNAVAILABLE ? 3 : 1;
    }
    printf("migrations: %d applied\n", applied);
    if (!topics)
        return 0;
    topics_t t;
    topics_init(&t, S.topic_prefix);
    rc = cqrs_bus_create_topics(S.kafka_brokers, t.names, TOPIC_TYPES, (int)S.partitions,
                                (int)S.replication, 10000, &err);
    if (rc != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl migrate: topics: %s\n", err.message);
        return rc == CQRS_ERR_UNAVAILABLE ? 3 : 1;
    }
    printf("topics: %s %s ready\n", t.name[TOPIC_PRODUCT], t.name[TOPIC_ORDER]);
    return 0;
}

typedef struct outbox_view {
    json_t *out;
} outbox_view_t;

static cqrs_err_t outbox_tx(cqrs_tx_t *tx, void *ud, cqrs_error_t *err)
{
    outbox_view_t *v = ud;
    cqrs_rows_t *a = NULL, *b = NULL, *c = NULL;
    cqrs_err_t rc = cqrs_tx_exec(tx,
                                 "SELECT count(*), coalesce(extract(epoch FROM now() -"
                                 " min(created_at)), 0) FROM outbox",
                                 0, NULL, &a, err);
    if (rc == CQRS_ERR_OK)
        rc = cqrs_tx_exec(tx,
                          "SELECT owner, epoch, to_char(since AT TIME ZONE 'UTC',"
                          " 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), expires_at > now()"
                          " FROM relay_leader WHERE id = 1",
                          0, NULL, &b, err);
    if (rc == CQRS_ERR_OK)
        rc =
            cqrs_tx_exec(tx, "SELECT cardinality(sequences) FROM relay_inflight", 0, NULL, &c, err);
    if (rc == CQRS_ERR_OK) {
        bool active = cqrs_rows_count(b) == 1 && strcmp(cqrs_rows_get(b, 0, 3), "t") == 0;
        v->out = json_pack("{s:I, s:f, s:{s:b, s:s?, s:I, s:s?}, s:I}", "backlog",
                           (json_int_t)atoll(cqrs_rows_get(a, 0, 0)), "oldest_age_seconds",
                           atof(cqrs_rows_get(a, 0, 1)), "relay", "active", active, "owner",
                           active ? cqrs_rows_get(b, 0, 0) : NULL, "epoch",
                           (json_int_t)(cqrs_rows_count(b) ? atoll(cqrs_rows_get(b, 0, 1)) : 0),
                           "since", active ? cqrs_rows_get(b, 0, 2) : NULL, "batch_in_flight",
                           (json_int_t)(cqrs_rows_count(c) ? atoll(cqrs_rows_get(c, 0, 0)) : 0));
    }
    cqrs_rows_free(a);
    cqrs_rows_free(b);
    cqrs_rows_free(c);
    return rc;
}

static int cmd_outbox(const cqrsctl_env_t *env, unsigned opts, int argc, char **argv)
{
    (void)env;
    (void)argc;
    (void)argv;
    bool as_json = opts & OPT_JSON;
    cqrs_store_config_t sc = {.dsn = S.pg_dsn,
                              .pool_size = 1,
                              .acquire_timeout_ms = 1000,
                              .statement_timeout_ms = 10000,
                              .lock_timeout_ms = 1000,
                              .connect_timeout_s = 5,
                              .max_tx_attempts = 1,
                              .application_name = "cqrsctl"};
    cqrs_store_t *store = cqrs_store_new(&sc);
    outbox_view_t v = {NULL};
    cqrs_error_t err;
    cqrs_err_t rc = store ? cqrs_store_run_tx(store, outbox_tx, &v, &err)
                          : cqrs_error_set(&err, CQRS_ERR_NOMEM, "out of memory");
    cqrs_store_destroy(store);
    if (rc != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl outbox: %s\n", err.message);
        return rc == CQRS_ERR_UNAVAILABLE ? 3 : 1;
    }
    if (as_json) {
        char *text = json_dumps(v.out, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        printf("%s\n", text);
        free(text);
    } else {
        json_t *relay = json_object_get(v.out, "relay");
        printf("backlog:          %lld events\n",
               (long long)json_integer_value(json_object_get(v.out, "backlog")));
        printf("oldest:           %.1f s\n",
               json_real_value(json_object_get(v.out, "oldest_age_seconds")));
        if (json_is_true(json_object_get(relay, "active")))
            printf("relay:            %s (epoch %lld) since %s\n",
                   json_string_value(json_object_get(relay, "owner")),
                   (long long)json_integer_value(json_object_get(relay, "epoch")),
                   json_string_value(json_object_get(relay, "since")));
        else
            printf("relay:            none active\n");
        printf("batch in flight:  %lld events\n",
               (long long)json_integer_value(json_object_get(v.out, "batch_in_flight")));
    }
    json_decref(v.out);
    return 0;
}

void cqrsctl_print_json(json_t *v)
{
    char *text = json_dumps(v, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    printf("%s\n", text ? text : "null");
    free(text);
}

static int cmd_migrations(const cqrsctl_env_t *env, unsigned opts, int argc, char **argv)
{
    (void)env;
    (void)opts;
    (void)argc;
    (void)argv;
    for (const cqrs_embedded_file_t *f = cqrs_migrations; f->name; f++)
        printf("%s\n", f->name);
    return 0;
}

static int cmd_verify(const cqrsctl_env_t *env, unsigned opts, int argc, char **argv)
{
    (void)argc;
    (void)argv;
    return cqrsctl_verify(env->pg_dsn, env->redis, opts & OPT_JSON);
}

static int cmd_explain(const cqrsctl_env_t *env, unsigned opts, int argc, char **argv)
{
    (void)opts;
    return cqrsctl_explain(env, argc, argv);
}

static int cmd_dlq(const cqrsctl_env_t *env, unsigned opts, int argc, char **argv)
{
    (void)opts;
    return cqrsctl_dlq(env, argc, argv);
}

static int cmd_rebuild(const cqrsctl_env_t *env, unsigned opts, int argc, char **argv)
{
    (void)opts;
    return cqrsctl_rebuild(env, argc, argv);
}

static const command_t *find_command(const char *name)
{
    for (size_t i = 0; i < N_COMMANDS; i++)
        if (strcmp(COMMANDS[i].name, name) == 0)
            return &COMMANDS[i];
    return NULL;
}

/* The options of a command without a parser of its own (argv[0] is the command), into *opts.
 * Exactly the options of its table: no abbreviation, no argument left over, so a typo is a
 * usage error (exit 2) — never an option ignored. Returns 0, or 2 after printing the usage. */
static int parse_options(const command_t *c, int argc, char **argv, unsigned *opts)
{
    *opts = 0;
    opterr = 0;
    optind = 1;
    const char *bad = NULL;
    for (;;) {
        int at = optind, idx = -1;
        int o = getopt_long(argc, argv, "+", c->options, &idx);
        if (o == -1) {
            if (optind < argc)
                bad = argv[optind];
            else if (optind > 1 && strcmp(argv[optind - 1], "--") == 0)
                bad = "--";
            break;
        }
        if (o == '?' || idx < 0 || strncmp(argv[at], "--", 2) != 0 ||
            strcmp(argv[at] + 2, c->options[idx].name) != 0) {
            bad = argv[at];
            break;
        }
        *opts |= (unsigned)o;
    }
    if (!bad)
        return 0;
    fprintf(stderr, "cqrsctl %s: unknown option '%s'\n\n", c->name, bad);
    usage(stderr);
    return 2;
}

/* Checks the configuration a command needs; 0 or the exit status. */
static int configure(const command_t *c)
{
    if (cqrs_config_load(entries, N_ENTRIES, NULL, NULL, stderr) != 0)
        return 2;
    query_keys_init(S.topic_prefix);
    if (cqrs_bus_check_properties(stderr) != 0)
        return 2;
    cqrs_error_t err;
    if (cqrs_pg_dsn_check(S.pg_dsn, &err) != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl: %s\n", err.message);
        return 2;
    }
    if (c->uses_redis && cqrs_redis_config_check(&S.redis, &err) != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl: %s\n", err.message);
        cqrs_config_free(entries, N_ENTRIES);
        return 2;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *name = argv[1];
    bool help = strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0;
    if (help || strcmp(name, "--version") == 0) {
        if (argc > 2) {
            fprintf(stderr, "cqrsctl: %s takes no arguments\n\n", name);
            usage(stderr);
            return 2;
        }
        if (help)
            usage(stdout);
        else
            cqrs_version_print(stdout, "cqrsctl");
        return 0;
    }
    const command_t *c = find_command(name);
    if (!c) {
        fprintf(stderr, "cqrsctl: unknown %s '%s'\n\n", name[0] == '-' ? "option" : "command",
                name);
        usage(stderr);
        return 2;
    }
    unsigned opts = 0;
    if (c->options) {
        int rc = parse_options(c, argc - 1, argv + 1, &opts);
        if (rc != 0)
            return rc;
        if (opts & OPT_HELP) {
            usage(stdout);
            return 0;
        }
    }
    if (!c->configured)
        return c->run(NULL, opts, argc - 1, argv + 1);
    cqrs_log_init("cqrsctl", CQRS_LOG_WARN);
    /* A command's own help needs no configuration. */
    if (!c->options && argc > 2 && (strcmp(argv[2], "--help") == 0 || strcmp(argv[2], "-h") == 0)) {
        cqrsctl_env_t none = {"", NULL, "", ""};
        return c->run(&none, opts, argc - 1, argv + 1);
    }
    int rc = configure(c);
    if (rc != 0)
        return rc;
    cqrsctl_env_t env = {S.pg_dsn, &S.redis, S.kafka_brokers, S.topic_prefix};
    rc = c->run(&env, opts, argc - 1, argv + 1);
    cqrs_config_free(entries, N_ENTRIES);
    return rc;
}
