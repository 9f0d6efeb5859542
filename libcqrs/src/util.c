/* util.c — ids, time and text helpers (pure apart from the clock and the random source). */
#include "cqrs/util.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/random.h>
#include <time.h>

static const char HEX[] = "0123456789abcdef";

static void hex_bytes(char *out, const unsigned char *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = HEX[b[i] >> 4];
        out[2 * i + 1] = HEX[b[i] & 15];
    }
}

static void format_uuid(unsigned char u[16], char out[CQRS_UUID_LEN + 1])
{
    u[6] = (unsigned char)((u[6] & 0x0f) | 0x40); /* version 4 */
    u[8] = (unsigned char)((u[8] & 0x3f) | 0x80); /* RFC 4122 variant */
    char *p = out;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            *p++ = '-';
        hex_bytes(p, &u[i], 1);
        p += 2;
    }
    *p = '\0';
}

/* Identifiers others may see and guess at (aggregate ids): the kernel's CSPRNG. */
void cqrs_uuid_v4(char out[CQRS_UUID_LEN + 1])
{
    unsigned char u[16];
    size_t got = 0;
    while (got < sizeof u) {
        ssize_t n = getrandom(u + got, sizeof u - got, 0);
        if (n > 0)
            got += (size_t)n;
        else if (errno != EINTR)
            abort(); /* no entropy source at all: nothing sane to do */
    }
    format_uuid(u, out);
}

/* Request ids and trace ids only need to be unique: xoshiro256** per thread, seeded from the
 * kernel (libuuid's generator reseeds srandom on every call — a fifth of a read's CPU). A fork
 * makes every thread reseed, so a child never repeats its parent's sequence. */
static atomic_uint fork_generation;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static _Thread_local uint64_t rng_s[4];
static _Thread_local unsigned rng_generation;
static _Thread_local int rng_seeded;

static void after_fork_child(void)
{
    atomic_fetch_add(&fork_generation, 1);
}

static void register_atfork(void)
{
    pthread_atfork(NULL, NULL, after_fork_child);
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t fast_random(void)
{
    unsigned gen = atomic_load(&fork_generation);
    if (!rng_seeded || rng_generation != gen) {
        pthread_once(&atfork_once, register_atfork);
        if (getrandom(rng_s, sizeof rng_s, 0) != (ssize_t)sizeof rng_s) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            rng_s[0] ^= (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ULL;
            rng_s[1] ^= (uint64_t)(uintptr_t)&rng_s ^ (uint64_t)ts.tv_sec;
            rng_s[2] ^= 0xbf58476d1ce4e5b9ULL;
            rng_s[3] ^= 0x94d049bb133111ebULL;
        }
        rng_seeded = 1;
        rng_generation = gen;
    }
    uint64_t result = rotl(rng_s[1] * 5, 7) * 9, t = rng_s[1] << 17;
    rng_s[2] ^= rng_s[0];
    rng_s[3] ^= rng_s[1];
    rng_s[1] ^= rng_s[2];
    rng_s[0] ^= rng_s[3];
    rng_s[2] ^= t;
    rng_s[3] = rotl(rng_s[3], 45);
    return result;
}

static void fast_random_bytes(unsigned char *out, size_t n)
{
    while (n > 0) {
        uint64_t r = fast_random();
        size_t k = n < 8 ? n : 8;
        memcpy(out, &r, k);
        out += k;
        n -= k;
    }
}

void cqrs_request_id(char out[CQRS_UUID_LEN + 1])
{
    unsigned char u[16];
    fast_random_bytes(u, sizeof u);
    format_uuid(u, out);
}

bool cqrs_uuid_valid(const char *s)
{
    if (!s || strlen(s) != CQRS_UUID_LEN)
        return false;
    for (int i = 0; i < CQRS_UUID_LEN; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return false;
        } else if (!isxdigit((unsigned char)s[i])) {
            return false;
        }
    }
    return true;
}

void cqrs_time_now_rfc3339(char out[CQRS_TIME_LEN + 1])
{
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    char buf[64];
    snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000L);
    memcpy(out, buf, CQRS_TIME_LEN);
    out[CQRS_TIME_LEN] = '\0';
}

int64_t cqrs_time_parse_ms(const char *s)
{
    struct tm tm;
    memset(&tm, 0, sizeof tm);
    int ms = 0;
    if (!s || sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d.%3dZ", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
                     &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &ms) != 7)
        return 0;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    return (int64_t)timegm(&tm) * 1000 + ms;
}

int64_t cqrs_realtime_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t cqrs_monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t cqrs_monotonic_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

size_t cqrs_utf8_length(const char *s, size_t len)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i++)
        if (((unsigned char)s[i] & 0xC0) != 0x80)
            n++;
    return n;
}

bool cqrs_utf8_valid(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        unsigned c = *p;
        int n = c < 0x80             ? 0
                : (c & 0xE0) == 0xC0 ? 1
                : (c & 0xF0) == 0xE0 ? 2
                : (c & 0xF8) == 0xF0 ? 3
                                     : -1;
        if (n < 0 || (n == 1 && c < 0xC2))
            return false;
        uint32_t cp = n == 0 ? c : n == 1 ? c & 0x1F : n == 2 ? c & 0x0F : c & 0x07;
        p++;
        for (int i = 0; i < n; i++, p++) {
            if ((*p & 0xC0) != 0x80)
                return false;
            cp = cp << 6 | (*p & 0x3F);
        }
        if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
    }
    return true;
}

bool cqrs_parse_int64(const char *s, int64_t *out)
{
    if (!s || !*s || isspace((unsigned char)*s))
        return false;
    errno = 0;
    char *end = NULL;
    long long v = strtoll(s, &end, 10);
    if (errno != 0 || *end != '\0')
        return false;
    *out = v;
    return true;
}

static bool hex_run(const char *s, size_t n, bool *all_zero)
{
    *all_zero = true;
    for (size_t i = 0; i < n; i++) {
        if (!isxdigit((unsigned char)s[i]) || isupper((unsigned char)s[i]))
            return false;
        if (s[i] != '0')
            *all_zero = false;
    }
    return true;
}

bool cqrs_traceparent_valid(const char *s)
{
    bool zero;
    if (!s || strlen(s) != 55 || s[2] != '-' || s[35] != '-' || s[52] != '-')
        return false;
    if (!hex_run(s, 2, &zero) || strncmp(s, "ff", 2) == 0)
        return false;
    if (!hex_run(s + 3, 32, &zero) || zero)
        return false;
    if (!hex_run(s + 36, 16, &zero) || zero)
        return false;
    return hex_run(s + 53, 2, &zero);
}

void cqrs_traceparent_new(char out[56])
{
    unsigned char id[24];
    static const unsigned char zero[16];
    do /* all-zero ids are invalid (a 2^-64 chance) */
        fast_random_bytes(id, sizeof id);
    while (!memcmp(id, zero, 16) || !memcmp(id + 16, zero, 8));
    memcpy(out, "00-", 3);
    hex_bytes(out + 3, id, 16);
    out[35] = '-';
    hex_bytes(out + 36, id + 16, 8);
    memcpy(out + 52, "-01", 4);
}
static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

char *cqrs_base64url_encode(const void *data, size_t len)
{
    const unsigned char *in = data;
    char *out = malloc(len / 3 * 4 + 5);
    if (!out)
        return NULL;
    size_t o = 0, i = 0;
    for (; i + 2 < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = B64[v >> 18 & 63];
        out[o++] = B64[v >> 12 & 63];
        out[o++] = B64[v >> 6 & 63];
        out[o++] = B64[v & 63];
    }
    if (i < len) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < len ? (uint32_t)in[i + 1] << 8 : 0);
        out[o++] = B64[v >> 18 & 63];
        out[o++] = B64[v >> 12 & 63];
        if (i + 1 < len)
            out[o++] = B64[v >> 6 & 63];
    }
    out[o] = '\0';
    return out;
}

char *cqrs_base64url_decode(const char *text, size_t *out_len)
{
    size_t len = strlen(text);
    if (len % 4 == 1)
        return NULL;
    unsigned char *out = malloc(len / 4 * 3 + 4);
    if (!out)
        return NULL;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len; i++) {
        const char *p = strchr(B64, text[i]);
        if (!p || !text[i]) {
            free(out);
            return NULL;
        }
        acc = acc << 6 | (uint32_t)(p - B64);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits & 0xff);
        }
    }
    out[o] = '\0';
    *out_len = o;
    return (char *)out;
}

uint64_t cqrs_hash64(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return h;
}

char *cqrs_read_secret_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    /* A PEM key or certificate chain can be several KiB: read whole, never truncated. */
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    int fail = buf ? 0 : ENOMEM;
    while (!fail) {
        errno = 0;
        n += fread(buf + n, 1, cap - 1 - n, f);
        if (ferror(f)) {
            fail = errno ? errno : EIO;
        } else if (feof(f)) {
            break;
        } else if (cap > CQRS_SECRET_FILE_MAX) {
            fail = EFBIG;
        } else {
            char *bigger = realloc(buf, cap * 2);
            if (bigger) {
                buf = bigger;
                cap *= 2;
            } else {
                fail = ENOMEM;
            }
        }
    }
    fclose(f);
    if (fail) {
        free(buf);
        errno = fail;
        return NULL;
    }
    buf[n] = '\0';
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
        buf[--n] = '\0';
    return buf;
}
