/* version.c — `--version`: the program and the versions of the libraries it runs with. */
#include "cqrs/version.h"

#include <hiredis/hiredis.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>
#include <microhttpd.h>
#include <openssl/crypto.h>
#include <string.h>

#ifndef CQRS_VERSION_STRING
#error "CQRS_VERSION_STRING must come from the build (project VERSION)"
#endif

void cqrs_version_print(FILE *out, const char *program)
{
    /* PQlibVersion: major * 10000 + minor since PostgreSQL 10. */
    int pq = PQlibVersion();
    /* OpenSSL_version(OPENSSL_VERSION) is "OpenSSL 3.0.19 27 Jan 2026": keep the number. */
    const char *ssl = OpenSSL_version(OPENSSL_VERSION);
    if (strncmp(ssl, "OpenSSL ", 8) == 0)
        ssl += 8;
    int ssl_len = (int)strcspn(ssl, " ");
    fprintf(out, "%s %s\n", program, CQRS_VERSION_STRING);
    fprintf(out, "librdkafka %s\n", rd_kafka_version_str());
    fprintf(out, "hiredis %d.%d.%d\n", HIREDIS_MAJOR, HIREDIS_MINOR, HIREDIS_PATCH);
    fprintf(out, "libmicrohttpd %s\n", MHD_get_version());
    fprintf(out, "libpq %d.%d\n", pq / 10000, pq % 10000);
    fprintf(out, "jansson %s\n", jansson_version_str());
    fprintf(out, "OpenSSL %.*s\n", ssl_len, ssl);
}
