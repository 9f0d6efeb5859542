/* metrics.h — Prometheus text exposition: a growable text buffer and a fixed-bucket histogram
 * (thread-safe: atomics), enough for the daemons' /metrics. */
#ifndef CQRS_METRICS_H
#define CQRS_METRICS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* Bucket upper bounds in seconds, 0.5 ms … 10 s: fine below 25 ms, where the consistency
 * window and its stages are measured. */
#define CQRS_HISTOGRAM_BUCKETS 18
extern const double cqrs_histogram_bounds[CQRS_HISTOGRAM_BUCKETS];

typedef struct cqrs_histogram {
    atomic_uint_fast64_t bucket[CQRS_HISTOGRAM_BUCKETS]; /* non-cumulative */
    atomic_uint_fast64_t count;
    atomic_uint_fast64_t sum_us;
} cqrs_histogram_t;

void cqrs_histogram_observe(cqrs_histogram_t *h, double seconds);

typedef struct cqrs_text {
    /* a growing NUL-terminated buffer */
    char *buf;
    size_t len, cap;
} cqrs_text_t;

void cqrs_text_printf(cqrs_text_t *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void cqrs_text_free(cqrs_text_t *t);

/* HELP and TYPE lines, then one sample. labels may be NULL or "k=\"v\"". */
void cqrs_metric_counter(cqrs_text_t *t, const char *name, const char *help, uint64_t value);
void cqrs_metric_gauge(cqrs_text_t *t, const char *name, const char *help, double value);
void cqrs_metric_histogram(cqrs_text_t *t, const char *name, const char *help,
                           const cqrs_histogram_t *h);
/* The samples only (no HELP/TYPE), with labels ("k=\"v\",…") on every line. */
void cqrs_metric_histogram_samples(cqrs_text_t *t, const char *name, const char *labels,
                                   const cqrs_histogram_t *h);

/* The standard process metrics of Prometheus's client libraries, read from /proc/self at each
 * call (Linux): process_cpu_seconds_total, process_open_fds, process_max_fds,
 * process_virtual_memory_bytes, process_resident_memory_bytes, process_start_time_seconds.
 * A file that cannot be read leaves its metrics out. */
void cqrs_metrics_process(cqrs_text_t *t);

#endif
