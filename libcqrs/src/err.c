/* err.c — cqrs_err_t strings and the detail out-parameter. */
#include "cqrs/err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

const char *cqrs_err_str(cqrs_err_t code)
{
    switch (code) {
#define CQRS__ERR_STR(name, val, str)                                                              \
    case CQRS_ERR_##name:                                                                          \
        return str;
        CQRS_ERRNO_MAP(CQRS__ERR_STR)
#undef CQRS__ERR_STR
    }
    return "unknown error";
}

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
