/* cqrsctl — the operator's command line. Exit codes: 0 success, 1 the operation failed,
 * 2 usage or configuration error, 3 a dependency is unavailable. */
#include <cqrs/bus.h>
#include <cqrs/config.h>
#include <cqrs/embed.h>
#include <cqrs/log.h>
#include <cqrs/store.h>
#include <stdio.h>
#include <string.h>

extern const cqrs_embedded_file_t cqrs_migrations[];

static struct {
    char *pg_dsn;
    char *kafka_brokers;
    char *topic_prefix;
    int64_t partitions;
    int64_t replication;
} S;

static const cqrs_config_entry_t entries[] = {
    {"CQRS_PG_DSN", CQRS_CONFIG_SECRET, NULL, 0, 0, "PostgreSQL connection string or URI",
     &S.pg_dsn, NULL},
    {"CQRS_KAFKA_BROKERS", CQRS_CONFIG_STRING, "127.0.0.1:9092", 0, 0, "Kafka bootstrap servers",
     &S.kafka_brokers, NULL},
    {"CQRS_TOPIC_PREFIX", CQRS_CONFIG_STRING, "cqrs", 0, 0,
     "topics are <prefix>.product.events and <prefix>.order.events", &S.topic_prefix, NULL},
    {"CQRS_KAFKA_PARTITIONS", CQRS_CONFIG_INT, "6", 1, 10000, "partitions of created topics",
     &S.partitions, NULL},
    {"CQRS_KAFKA_REPLICATION", CQRS_CONFIG_INT, "-1", -1, 100,
     "replication factor of created topics (-1 = broker default)", &S.replication, NULL},
};
#define N_ENTRIES (sizeof entries / sizeof entries[0])

static void usage(FILE *out)
{
    fprintf(out, "usage: cqrsctl <command> [options]\n\n"
                 "commands:\n"
                 "  migrate [--no-topics]   apply pending SQL migrations (recorded in\n"
                 "                          schema_migrations) and create the Kafka topics\n"
                 "  migrations              list the migrations this binary carries\n\n");
    cqrs_config_print_help(entries, N_ENTRIES, out);
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
    char product[256], order[256];
    snprintf(product, sizeof product, "%s.product.events", S.topic_prefix);
    snprintf(order, sizeof order, "%s.order.events", S.topic_prefix);
    const char *names[] = {product, order};
    rc = cqrs_bus_create_topics(S.kafka_brokers, names, 2, (int)S.partitions, (int)S.replication,
                                10000, &err);
    if (rc != CQRS_ERR_OK) {
        fprintf(stderr, "cqrsctl migrate: topics: %s\n", err.message);
        return rc == CQRS_ERR_UNAVAILABLE ? 3 : 1;
    }
    printf("topics: %s %s ready\n", product, order);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "migrations") == 0) {
        for (const cqrs_embedded_file_t *f = cqrs_migrations; f->name; f++)
            printf("%s\n", f->name);
        return 0;
    }
    cqrs_log_init("cqrsctl", CQRS_LOG_WARN);
    if (cqrs_config_load(entries, N_ENTRIES, NULL, NULL, stderr) != 0)
        return 2;
    int rc;
    if (strcmp(argv[1], "migrate") == 0) {
        rc = cmd_migrate(argc, argv);
    } else {
        fprintf(stderr, "cqrsctl: unknown command '%s'\n\n", argv[1]);
        usage(stderr);
        rc = 2;
    }
    cqrs_config_free(entries, N_ENTRIES);
    return rc;
}
