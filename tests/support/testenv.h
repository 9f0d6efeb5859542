/* testenv.h — settings of the servers the integration and e2e tests use.
 *
 * testenv_require() returns the variable's value. When it is unset the test cannot run: under
 * CI=true that is a failure (a test must never pass by skipping); elsewhere the test is
 * skipped with a message saying how to start the stack.
 */
#ifndef CQRS_TEST_TESTENV_H
#define CQRS_TEST_TESTENV_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

static inline const char *testenv_require(const char *name)
{
    const char *v = getenv(name);
    if (v && *v)
        return v;
    const char *ci = getenv("CI");
    if (ci && strcmp(ci, "true") == 0)
        fail_msg("%s is not set: the test servers are missing (run tests/run.sh)", name);
    fprintf(stderr, "SKIP: %s is not set; start the stack: eval \"$(deploy/local/stack.sh env)\"\n",
            name);
    skip();
    return NULL;
}

/* The three servers the e2e tests need. */
static inline void testenv_require_stack(void)
{
    testenv_require("CQRS_PG_DSN");
    testenv_require("CQRS_KAFKA_BROKERS");
    testenv_require("CQRS_REDIS_URL");
}

/* The TLS profile of the stack (stack.sh up --tls) for the tests labelled tls: returns
 * CQRS_TLS_DIR (the test PKI). Elsewhere the same as a missing variable: a failure under
 * CI=true, a skip otherwise. */
static inline const char *testenv_require_tls(void)
{
    const char *tls = getenv("CQRS_STACK_TLS");
    if (!tls || strcmp(tls, "1") != 0) {
        const char *ci = getenv("CI");
        if (ci && strcmp(ci, "true") == 0)
            fail_msg("CQRS_STACK_TLS is not 1: this test needs the TLS profile of the stack "
                     "(deploy/local/stack.sh up --tls; tests/run.sh starts one)");
        fprintf(stderr, "SKIP: needs the TLS profile of the stack: deploy/local/stack.sh up "
                        "--tls, then eval \"$(deploy/local/stack.sh env)\"\n");
        skip();
        return NULL;
    }
    return testenv_require("CQRS_TLS_DIR");
}

#endif
