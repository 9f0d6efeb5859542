/* util.h — small pure helpers shared by both daemons: ids, time, text. */
#ifndef CQRS_UTIL_H
#define CQRS_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CQRS_UUID_LEN 36
#define CQRS_TIME_LEN 24 /* "2026-11-26T09:50:52.123Z" */

/* Writes a random (v4) lower-case UUID and a NUL into out[37]. */
void cqrs_uuid_v4(char out[CQRS_UUID_LEN + 1]);
/* A version-4 UUID from a fast per-thread generator: unique, not unpredictable (request ids). */
void cqrs_request_id(char out[CQRS_UUID_LEN + 1]);

/* True when s is a canonical 8-4-4-4-12 hex UUID (either case). */
bool cqrs_uuid_valid(const char *s);

/* Current UTC time as RFC 3339 with milliseconds into out[25]. */
void cqrs_time_now_rfc3339(char out[CQRS_TIME_LEN + 1]);

/* Milliseconds since the epoch of "YYYY-MM-DDTHH:MM:SS.mmmZ"; 0 when malformed. */
int64_t cqrs_time_parse_ms(const char *rfc3339);

/* Milliseconds of CLOCK_REALTIME. */
int64_t cqrs_realtime_ms(void);

/* Milliseconds of CLOCK_MONOTONIC. */
int64_t cqrs_monotonic_ms(void);
int64_t cqrs_monotonic_us(void);

/* Number of Unicode code points in valid UTF-8 text of len bytes. */
size_t cqrs_utf8_length(const char *s, size_t len);

/* True when s is valid UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF). */
bool cqrs_utf8_valid(const char *s);

/* Parses a whole decimal int64 (no sign-less overflow, no trailing junk). */
bool cqrs_parse_int64(const char *s, int64_t *out);

/* Checked int64 arithmetic for money and stock: *out = a + b (a - b, a × b) and true, or false
 * with *out untouched when the exact result does not fit int64 (never a wrapped value). */
static inline bool cqrs_checked_add_i64(int64_t a, int64_t b, int64_t *out)
{
    int64_t r;
    if (__builtin_add_overflow(a, b, &r))
        return false;
    *out = r;
    return true;
}

static inline bool cqrs_checked_sub_i64(int64_t a, int64_t b, int64_t *out)
{
    int64_t r;
    if (__builtin_sub_overflow(a, b, &r))
        return false;
    *out = r;
    return true;
}

static inline bool cqrs_checked_mul_i64(int64_t a, int64_t b, int64_t *out)
{
    int64_t r;
    if (__builtin_mul_overflow(a, b, &r))
        return false;
    *out = r;
    return true;
}

/* The content of a secret's file (the `<VAR>_FILE` convention: Docker and Kubernetes secrets),
 * trailing newlines (\n, \r) trimmed; at most CQRS_SECRET_FILE_MAX bytes. Caller frees; NULL
 * with errno set when it cannot be read (EFBIG: larger than the limit). */
#define CQRS_SECRET_FILE_MAX (1024 * 1024)
char *cqrs_read_secret_file(const char *path);

/* FNV-1a of a NUL-terminated string (hash tables of keys; not for anything adversarial). */
uint64_t cqrs_hash64(const char *s);

/* W3C traceparent "00-<32 hex>-<16 hex>-<2 hex>", not all-zero ids. */
bool cqrs_traceparent_valid(const char *s);

/* A fresh traceparent with random ids, sampled flag set, into out[56]. */
void cqrs_traceparent_new(char out[56]);

/* base64url without padding (RFC 4648 §5): encode len bytes into a malloc'ed string; decode
 * into a malloc'ed buffer (NUL-terminated, *out_len bytes), NULL on invalid input. */
char *cqrs_base64url_encode(const void *data, size_t len);
char *cqrs_base64url_decode(const char *text, size_t *out_len);

#endif
