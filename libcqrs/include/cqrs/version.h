/* version.h — what `--version` prints: the program and the libraries it runs with. */
#ifndef CQRS_VERSION_H
#define CQRS_VERSION_H

#include <stdio.h>

/* Writes "PROGRAM VERSION" and then one "name version" line per library (librdkafka,
 * hiredis, libmicrohttpd, libpq, jansson, OpenSSL). Versions are the ones loaded at run
 * time, except hiredis, which has no run-time version call: its line is the version the
 * binary was built against (its soname pins the ABI). */
void cqrs_version_print(FILE *out, const char *program);

struct cqrs_text;
/* `cqrs_build_info{program,version,librdkafka,hiredis,libmicrohttpd,libpq,jansson,openssl} 1`
 * with its HELP and TYPE lines: the versions --version prints, for dashboards and alerts. */
void cqrs_version_metrics(struct cqrs_text *t, const char *program);

#endif
