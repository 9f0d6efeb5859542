/* config.h — one table of settings per daemon, read from the environment only.
 *
 * Each entry: {env name, type, default, min, max, help, destination}. Loading checks every
 * entry and reports every bad value (not just the first), so an operator fixes them in one go.
 * A CQRS_X_FILE variable names a file whose content (trailing newline stripped) is the value of
 * CQRS_X for entries of type SECRET; secrets are never printed.
 */
#ifndef CQRS_CONFIG_H
#define CQRS_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum cqrs_config_type {
    CQRS_CONFIG_STRING, /* dest: char ** (heap copy, freed by cqrs_config_free) */
    CQRS_CONFIG_SECRET, /* like STRING, also from <NAME>_FILE; never printed */
    CQRS_CONFIG_INT,    /* dest: int64_t *, checked against [min, max] */
    CQRS_CONFIG_BOOL,   /* dest: bool *, accepts true/false/1/0/yes/no/on/off */
    CQRS_CONFIG_ENUM,   /* dest: char **, value must be one of `choices` ("a|b|c") */
} cqrs_config_type_t;

typedef struct cqrs_config_entry {
    const char *name;
    cqrs_config_type_t type;
    const char *def; /* NULL: required (no default) for STRING; empty allowed */
    int64_t min;
    int64_t max;
    const char *help;
    void *dest;
    const char *choices; /* ENUM only */
} cqrs_config_entry_t;

/* Looks a name up; returns NULL when unset. getenv-like; `ud` is passed through. */
typedef const char *(*cqrs_config_lookup_fn)(const char *name, void *ud);

/* Fills every destination. Writes one line per bad value to `errors` (may be NULL) and
 * returns the number of bad values (0 = success). lookup NULL means getenv. */
int cqrs_config_load(const cqrs_config_entry_t *entries, size_t n, cqrs_config_lookup_fn lookup,
                     void *ud, FILE *errors);

/* Frees the strings cqrs_config_load allocated for STRING/SECRET/ENUM entries. */
void cqrs_config_free(const cqrs_config_entry_t *entries, size_t n);

/* Prints the table (name, type, default, range, help) for --help. */
void cqrs_config_print_help(const cqrs_config_entry_t *entries, size_t n, FILE *out);

/* The rows of cqrs_config_print_help without its heading (tables printed after the first). */
void cqrs_config_print_rows(const cqrs_config_entry_t *entries, size_t n, FILE *out);

#endif
