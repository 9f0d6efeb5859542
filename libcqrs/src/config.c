/* config.c — loading a daemon's settings table from the environment.
 *
 * Every entry is checked and every bad value reported before the caller decides to exit, so
 * an operator sees all mistakes at once (PgBouncer and Redis do the same).
 */
#include "cqrs/config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cqrs/util.h"

static const char *env_lookup(const char *name, void *ud)
{
    (void)ud;
    return getenv(name);
}

static bool parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = {"1", "true", "yes", "on"};
    static const char *const no[] = {"0", "false", "no", "off"};
    for (int i = 0; i < 4; i++) {
        if (strcasecmp(s, yes[i]) == 0)
            return (*out = true), true;
        if (strcasecmp(s, no[i]) == 0)
            return (*out = false), true;
    }
    return false;
}

static bool enum_has(const char *choices, const char *value)
{
    size_t vlen = strlen(value);
    const char *p = choices;
    while (p && *p) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == vlen && strncmp(p, value, len) == 0)
            return true;
        p = bar ? bar + 1 : NULL;
    }
    return false;
}

int cqrs_config_load(const cqrs_config_entry_t *entries, size_t n, cqrs_config_lookup_fn lookup,
                     void *ud, FILE *errors)
{
    int bad = 0;
    if (!lookup)
        lookup = env_lookup;
    for (size_t i = 0; i < n; i++) {
        const cqrs_config_entry_t *e = &entries[i];
        const char *raw = lookup(e->name, ud);
        char *from_file = NULL;
        if (e->type == CQRS_CONFIG_SECRET) {
            char file_var[128];
            snprintf(file_var, sizeof file_var, "%s_FILE", e->name);
            const char *path = lookup(file_var, ud);
            if (path && *path) {
                from_file = cqrs_read_secret_file(path);
                if (!from_file) {
                    if (errors)
                        fprintf(errors, "%s: cannot read %s: %s\n", file_var, path,
                                strerror(errno));
                    bad++;
                    continue;
                }
                raw = from_file;
            }
        }
        if (!raw)
            raw = e->def;
        switch (e->type) {
        case CQRS_CONFIG_STRING:
        case CQRS_CONFIG_SECRET:
        case CQRS_CONFIG_ENUM: {
            char **dest = e->dest;
            if (!raw) {
                if (errors)
                    fprintf(errors, "%s: required, not set\n", e->name);
                bad++;
                break;
            }
            if (e->type == CQRS_CONFIG_ENUM && !enum_has(e->choices, raw)) {
                if (errors)
                    fprintf(errors, "%s: '%s' is not one of %s\n", e->name, raw, e->choices);
                bad++;
                break;
            }
            free(*dest);
            *dest = strdup(raw);
            break;
        }
        case CQRS_CONFIG_INT: {
            int64_t v;
            if (!raw || !cqrs_parse_int64(raw, &v)) {
                if (errors)
                    fprintf(errors, "%s: '%s' is not an integer\n", e->name, raw ? raw : "");
                bad++;
            } else if (v < e->min || v > e->max) {
                if (errors)
                    fprintf(errors, "%s: %lld is outside %lld..%lld\n", e->name, (long long)v,
                            (long long)e->min, (long long)e->max);
                bad++;
            } else {
                *(int64_t *)e->dest = v;
            }
            break;
        }
        case CQRS_CONFIG_BOOL:
            if (!raw || !parse_bool(raw, e->dest)) {
                if (errors)
                    fprintf(errors, "%s: '%s' is not a boolean (true/false)\n", e->name,
                            raw ? raw : "");
                bad++;
            }
            break;
        }
        free(from_file);
    }
    return bad;
}

void cqrs_config_free(const cqrs_config_entry_t *entries, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const cqrs_config_entry_t *e = &entries[i];
        if (e->type == CQRS_CONFIG_STRING || e->type == CQRS_CONFIG_SECRET ||
            e->type == CQRS_CONFIG_ENUM) {
            char **dest = e->dest;
            free(*dest);
            *dest = NULL;
        }
    }
}

void cqrs_config_print_help(const cqrs_config_entry_t *entries, size_t n, FILE *out)
{
    fprintf(out, "Settings (environment variables):\n");
    cqrs_config_print_rows(entries, n, out);
}

void cqrs_config_print_rows(const cqrs_config_entry_t *entries, size_t n, FILE *out)
{
    static const char *const type_names[] = {"string", "secret", "int", "bool", "enum"};
    for (size_t i = 0; i < n; i++) {
        const cqrs_config_entry_t *e = &entries[i];
        fprintf(out, "  %-32s %-6s default: %s", e->name, type_names[e->type],
                e->def ? (*e->def ? e->def : "\"\"") : "(required)");
        if (e->type == CQRS_CONFIG_INT)
            fprintf(out, "  range: %lld..%lld", (long long)e->min, (long long)e->max);
        if (e->type == CQRS_CONFIG_ENUM)
            fprintf(out, "  one of: %s", e->choices);
        if (e->type == CQRS_CONFIG_SECRET)
            fprintf(out, "  (or %s_FILE)", e->name);
        fprintf(out, "\n      %s\n", e->help);
    }
}
