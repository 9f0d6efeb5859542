/* version.c — `--version`: the program and the versions of the libraries it runs with. */
#include "cqrs/version.h"

#include "cqrs/metrics.h"

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

/* OpenSSL_version(OPENSSL_VERSION) is "OpenSSL 3.0.19 27 Jan 2026": the number, and its length. */
static const char *openssl_number(int *len)
{
    const char *ssl = OpenSSL_version(OPENSSL_VERSION);
    if (strncmp(ssl, "OpenSSL ", 8) == 0)
        ssl += 8;
    *len = (int)strcspn(ssl, " ");
    return ssl;
}

void cqrs_version_metrics(struct cqrs_text *t, const char *program)
{
    int pq = PQlibVersion(), ssl_len;
    const char *ssl = openssl_number(&ssl_len);
    cqrs_text_printf(t,
                     "# HELP cqrs_build_info The program's version and the libraries it runs "
                     "with (as --version prints them); always 1.\n"
                     "# TYPE cqrs_build_info gauge\n"
                     "cqrs_build_info{program=\"%s\",version=\"%s\",librdkafka=\"%s\","
                     "hiredis=\"%d.%d.%d\",libmicrohttpd=\"%s\",libpq=\"%d.%d\","
                     "jansson=\"%s\",openssl=\"%.*s\"} 1\n",
                     program, CQRS_VERSION_STRING, rd_kafka_version_str(), HIREDIS_MAJOR,
                     HIREDIS_MINOR, HIREDIS_PATCH, MHD_get_version(), pq / 10000, pq % 10000,
                     jansson_version_str(), ssl_len, ssl);
}

void cqrs_version_print(FILE *out, const char *program)
{
    /* PQlibVersion: major * 10000 + minor since PostgreSQL 10. */
    int pq = PQlibVersion(), ssl_len;
    const char *ssl = openssl_number(&ssl_len);
    fprintf(out, "%s %s\n", program, CQRS_VERSION_STRING);
    fprintf(out, "librdkafka %s\n", rd_kafka_version_str());
    fprintf(out, "hiredis %d.%d.%d\n", HIREDIS_MAJOR, HIREDIS_MINOR, HIREDIS_PATCH);
    fprintf(out, "libmicrohttpd %s\n", MHD_get_version());
    fprintf(out, "libpq %d.%d\n", pq / 10000, pq % 10000);
    fprintf(out, "jansson %s\n", jansson_version_str());
    fprintf(out, "OpenSSL %.*s\n", ssl_len, ssl);
}
