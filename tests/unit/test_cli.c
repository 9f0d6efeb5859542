/* test_cli.c — the command line of the three binaries: --version names the program and the
 * libraries it runs with (the same ones this test loads), unknown options are usage errors
 * (exit 2, nothing started), --help documents --version. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <hiredis/hiredis.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>
#include <microhttpd.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

/* run "BINARY ARGS" with a time limit (a daemon that starts instead of refusing would block);
 * stdout into out, returns the exit status. */
static int run(const char *binary, const char *args, char *out, size_t cap)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "timeout 20 %s %s 2>/dev/null", binary, args);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = '\0';
    char rest[4096]; /* read to the end: a writer cut off would die of SIGPIPE */
    while (fread(rest, 1, sizeof rest, p) > 0)
        ;
    int st = pclose(p);
    assert_true(WIFEXITED(st));
    return WEXITSTATUS(st);
}

static void expect_line(const char *out, const char *line)
{
    char want[300];
    snprintf(want, sizeof want, "\n%.256s\n", line);
    char with_nl[8200];
    snprintf(with_nl, sizeof with_nl, "\n%.8190s", out);
    if (!strstr(with_nl, want))
        fail_msg("no line '%s' in:\n%s", line, out);
}

/* The line "NAME X.Y.Z" of out names at least the pinned minimum (CMake refuses older ones to
 * build; this catches a binary that loads an older one at run time, e.g. a lost rpath). */
static void expect_at_least(const char *out, const char *name, int major, int minor, int patch)
{
    char key[64];
    snprintf(key, sizeof key, "\n%s ", name);
    char with_nl[8192];
    snprintf(with_nl, sizeof with_nl, "\n%s", out);
    const char *p = strstr(with_nl, key);
    int a = 0, b = 0, c = 0;
    if (!p || sscanf(p + strlen(key), "%d.%d.%d", &a, &b, &c) < 2)
        fail_msg("no version of %s in:\n%s", name, out);
    if (a < major || (a == major && (b < minor || (b == minor && c < patch))))
        fail_msg("%s %d.%d.%d is older than the pinned minimum %d.%d.%d", name, a, b, c, major,
                 minor, patch);
}

static void check_version(const char *binary, const char *program)
{
    char out[8192], line[256];
    assert_int_equal(run(binary, "--version", out, sizeof out), 0);
    snprintf(line, sizeof line, "%s ", program);
    assert_memory_equal(out, line, strlen(line)); /* the program first */
    snprintf(line, sizeof line, "librdkafka %s", rd_kafka_version_str());
    expect_line(out, line);
    snprintf(line, sizeof line, "hiredis %d.%d.%d", HIREDIS_MAJOR, HIREDIS_MINOR, HIREDIS_PATCH);
    expect_line(out, line);
    snprintf(line, sizeof line, "libmicrohttpd %s", MHD_get_version());
    expect_line(out, line);
    snprintf(line, sizeof line, "libpq %d.%d", PQlibVersion() / 10000, PQlibVersion() % 10000);
    expect_line(out, line);
    snprintf(line, sizeof line, "jansson %s", jansson_version_str());
    expect_line(out, line);
    const char *ssl = OpenSSL_version(OPENSSL_VERSION) + strlen("OpenSSL ");
    snprintf(line, sizeof line, "OpenSSL %.*s", (int)strcspn(ssl, " "), ssl);
    expect_line(out, line);
    /* deploy/local/libs.versions' minimums */
    expect_at_least(out, "librdkafka", 2, 14, 0);
    expect_at_least(out, "hiredis", 1, 2, 0);
    expect_at_least(out, "libmicrohttpd", 1, 0, 10);
    /* one "name version" per line, nothing else */
    int lines = 0;
    for (const char *p = out; *p; p++)
        lines += *p == '\n';
    assert_int_equal(lines, 7);
}

static void test_version_commandd(void **state)
{
    (void)state;
    check_version(CQRS_COMMANDD, "cqrs-commandd");
}

static void test_version_queryd(void **state)
{
    (void)state;
    check_version(CQRS_QUERYD, "cqrs-queryd");
}

static void test_version_cqrsctl(void **state)
{
    (void)state;
    check_version(CQRS_CTL, "cqrsctl");
}

/* An unknown option is a usage error: exit 2 at once, no daemon listening on its port. */
static void test_unknown_option_is_refused(void **state)
{
    (void)state;
    char out[4096];
    const char *daemons[] = {CQRS_COMMANDD, CQRS_QUERYD};
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(run(daemons[i], "--verison", out, sizeof out), 2);
        assert_int_equal(run(daemons[i], "--port 9000", out, sizeof out), 2);
        assert_int_equal(run(daemons[i], "--version extra", out, sizeof out), 2);
        assert_int_equal(run(daemons[i], "--help", out, sizeof out), 0);
        assert_non_null(strstr(out, "--version"));
    }
    assert_int_equal(run(CQRS_CTL, "--verison", out, sizeof out), 2);
    assert_int_equal(run(CQRS_CTL, "--help", out, sizeof out), 0);
    assert_non_null(strstr(out, "--version"));
}

/* stderr of "BINARY ARGS" into out; returns the exit status. */
static int run_stderr(const char *binary, const char *args, char *out, size_t cap)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "timeout 20 %s %s 2>&1 >/dev/null", binary, args);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = '\0';
    char rest[4096];
    while (fread(rest, 1, sizeof rest, p) > 0)
        ;
    int st = pclose(p);
    assert_true(WIFEXITED(st));
    return WEXITSTATUS(st);
}

/* cqrsctl: an unknown command, an unknown option of a command or an argument after
 * --help/--version is a usage error (exit 2, the usage on stderr) before any configuration is
 * read or any server is tried — here a complete configuration whose PostgreSQL does not
 * exist, so an option ignored would show as exit 1 or 3. */
static void test_cqrsctl_unknown_options(void **state)
{
    (void)state;
    setenv("CQRS_PG_DSN", "postgresql://127.0.0.1:1/none?connect_timeout=1", 1);
    setenv("CQRS_KAFKA_BROKERS", "127.0.0.1:1", 1);
    setenv("CQRS_REDIS_URL", "redis://127.0.0.1:1/0", 1);
    char err[8192];
    const char *bad[] = {"--verison",      "-x",           "--version extra",  "--help extra",
                         "outbox --bogus", "verify --jsn", "migrate --topics", "migrations -v",
                         "status"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = run_stderr(CQRS_CTL, bad[i], err, sizeof err);
        if (rc != 2 || !strstr(err, "usage: cqrsctl"))
            fail_msg("cqrsctl %s: exit %d, stderr:\n%s", bad[i], rc, err);
    }
    char out[8192];
    assert_int_equal(run(CQRS_CTL, "verify --help", out, sizeof out), 0);
    assert_non_null(strstr(out, "usage: cqrsctl"));
    unsetenv("CQRS_PG_DSN");
    unsetenv("CQRS_KAFKA_BROKERS");
    unsetenv("CQRS_REDIS_URL");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_version_commandd),
        cmocka_unit_test(test_version_queryd),
        cmocka_unit_test(test_version_cqrsctl),
        cmocka_unit_test(test_unknown_option_is_refused),
        cmocka_unit_test(test_cqrsctl_unknown_options),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
