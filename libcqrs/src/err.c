/* err.c — the detail out-parameter of cqrs_err_t. */
#include "cqrs/err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

__attribute__((format(printf, 4, 0))) static void
error_vset(cqrs_error_t *err, cqrs_err_t code, const char *where, const char *fmt, va_list ap)
{
    err->code = code;
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    snprintf(err->where, sizeof err->where, "%s", where ? where : "");
}

cqrs_err_t cqrs_error_set(cqrs_error_t *err, cqrs_err_t code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        error_vset(err, code, NULL, fmt, ap);
        va_end(ap);
    }
    return code;
}

cqrs_err_t cqrs_error_set_where(cqrs_error_t *err, cqrs_err_t code, const char *where,
                                const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        error_vset(err, code, where, fmt, ap);
        va_end(ap);
    }
    return code;
}

void cqrs_error_clear(cqrs_error_t *err)
{
    if (err)
        memset(err, 0, sizeof *err);
}
