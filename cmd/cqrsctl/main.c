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

static void usage(FILE *out)
{
    fprintf(out,
            "usage: cqrsctl <command> [options]\n"
            "       cqrsctl --help | --version\n\n"
            "commands:\n"
            "  migrate [--no-topics]   apply pending SQL migrations (recorded in\n"
            "                          schema_migrations) and create the Kafka topics\n"
            "  migrations              list the migrations this binary carries\n"
            "  outbox [--json]         the outbox backlog, its oldest row's age, the\n"
            "                          active relay and since when\n"
            "  verify [--json]         compare the read model (Redis) with the write model\n"
            "                          (PostgreSQL): documents, fields, lists; exit 1 on drift\n"
            "  explain <id> [--json]   one aggregate across the system: its events, the outbox,\n"
            "                          Kafka partition and offset, the document in Redis, dead\n"
            "                          letters, lag; exit 1 when the aggregate is unknown\n"
            "  dlq list|show <id>|retry <id>|drop <id> --yes [--json]\n"
            "                          the read model's dead letters (cqrsctl dlq --help)\n"
            "  rebuild [--projection products|orders|all] [--jobs N]\n"
            "                          rebuild the read model from the event log into a new\n"
            "                          generation and switch to it without downtime\n\n");
    cqrs_config_print_help(entries, N_ENTRIES, out);
    cqrs_bus_print_help(out);
}

static int cmd_migrate(int argc, char **argv)
{
    bool topics = true;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--no-topics") == 0) {
            topics = false;
        } else if (strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "cqrsctl migrate: unknown option %s\n", argv[i]);
            return 2;
        }
    }
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

static int cmd_outbox(int argc, char **argv)
{
    bool as_json = argc > 2 && strcmp(argv[2], "--json") == 0;
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

/* The commands and, for those that parse no options of their own, the options each takes
 * (rebuild, explain and dlq check theirs). Checked before any configuration is read, so a typo
 * is a usage error (exit 2) whatever the environment holds — never an option ignored. */
static const struct {
    const char *name;
    bool own_parser;
    const char *options[3];
} COMMANDS[] = {
    {"migrate", false, {"--no-topics", "--help", NULL}},
    {"migrations", false, {NULL}},
    {"outbox", false, {"--json", "--help", NULL}},
    {"verify", false, {"--json", "--help", NULL}},
    {"rebuild", true, {NULL}},
    {"explain", true, {NULL}},
    {"dlq", true, {NULL}},
};

/* 0 when argv is a known command with known options (or --help/--version alone), else the
 * usage error is printed and 2 returned. */
static int check_command_line(int argc, char **argv)
{
    const char *cmd = argv[1];
    bool top =
        strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "--version") == 0;
    if (top) {
        if (argc == 2)
            return 0;
        fprintf(stderr, "cqrsctl: %s takes no arguments\n\n", cmd);
        usage(stderr);
        return 2;
    }
    for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++) {
        if (strcmp(COMMANDS[i].name, cmd) != 0)
            continue;
        if (COMMANDS[i].own_parser)
            return 0;
        for (int a = 2; a < argc; a++) {
            bool known = false;
            for (const char *const *o = COMMANDS[i].options; *o; o++)
                known |= strcmp(*o, argv[a]) == 0;
            if (!known) {
                fprintf(stderr, "cqrsctl %s: unknown option '%s'\n\n", cmd, argv[a]);
                usage(stderr);
                return 2;
            }
        }
        return 0;
    }
    fprintf(stderr, "cqrsctl: unknown %s '%s'\n\n", cmd[0] == '-' ? "option" : "command", cmd);
    usage(stderr);
    return 2;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    int usage_rc = check_command_line(argc, argv);
    if (usage_rc != 0)
        return usage_rc;
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        cqrs_version_print(stdout, "cqrsctl");
        return 0;
    }
    if ((strcmp(argv[1], "outbox") == 0 || strcmp(argv[1], "verify") == 0 ||
         strcmp(argv[1], "migrate") == 0) &&
        argc > 2 && strcmp(argv[argc - 1], "--help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "migrations") == 0) {
        for (const cqrs_embedded_file_t *f = cqrs_migrations; f->name; f++)
            printf("%s\n", f->name);
        return 0;
    }
    cqrs_log_init("cqrsctl", CQRS_LOG_WARN);
    bool sub_help = argc > 2 && (strcmp(argv[2], "--help") == 0 || strcmp(argv[2], "-h") == 0);
    if (sub_help) { /* a subcommand's help needs no configuration */
        cqrsctl_env_t none = {"", NULL, "", ""};
        if (strcmp(argv[1], "rebuild") == 0)
            return cqrsctl_rebuild(&none, argc - 1, argv + 1);
        if (strcmp(argv[1], "explain") == 0)
            return cqrsctl_explain(&none, argc - 1, argv + 1);
        if (strcmp(argv[1], "dlq") == 0)
            return cqrsctl_dlq(&none, argc - 1, argv + 1);
    }
    if (cqrs_config_load(entries, N_ENTRIES, NULL, NULL, stderr) != 0)
        return 2;
    query_keys_init(S.topic_prefix);
    if (cqrs_bus_check_properties(stderr) != 0)
        return 2;
    cqrs_error_t dsn_err;
    if (cqrs_pg_dsn_check(S.pg_dsn, &dsn_err) != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl: %s\n", dsn_err.message);
        return 2;
    }
    bool uses_redis = strcmp(argv[1], "verify") == 0 || strcmp(argv[1], "rebuild") == 0 ||
                      strcmp(argv[1], "explain") == 0 || strcmp(argv[1], "dlq") == 0;
    cqrs_error_t rerr;
    if (uses_redis && cqrs_redis_config_check(&S.redis, &rerr) != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl: %s\n", rerr.message);
        cqrs_config_free(entries, N_ENTRIES);
        return 2;
    }
    int rc;
    if (strcmp(argv[1], "migrate") == 0) {
        rc = cmd_migrate(argc, argv);
    } else if (strcmp(argv[1], "outbox") == 0) {
        rc = cmd_outbox(argc, argv);
    } else if (strcmp(argv[1], "verify") == 0) {
        rc = cqrsctl_verify(S.pg_dsn, &S.redis, argc > 2 && strcmp(argv[2], "--json") == 0);
    } else if (strcmp(argv[1], "rebuild") == 0) {
        cqrsctl_env_t env = {S.pg_dsn, &S.redis, S.kafka_brokers, S.topic_prefix};
        rc = cqrsctl_rebuild(&env, argc - 1, argv + 1);
    } else if (strcmp(argv[1], "explain") == 0 || strcmp(argv[1], "dlq") == 0) {
        cqrsctl_env_t env = {S.pg_dsn, &S.redis, S.kafka_brokers, S.topic_prefix};
        rc = argv[1][0] == 'e' ? cqrsctl_explain(&env, argc - 1, argv + 1)
                               : cqrsctl_dlq(&env, argc - 1, argv + 1);
    } else {
        fprintf(stderr, "cqrsctl: unknown command '%s'\n\n", argv[1]);
        usage(stderr);
        rc = 2;
    }
    cqrs_config_free(entries, N_ENTRIES);
    return rc;
}
