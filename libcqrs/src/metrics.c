/* metrics.c — see metrics.h. */
#include "cqrs/metrics.h"

#include <dirent.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

const double cqrs_histogram_bounds[CQRS_HISTOGRAM_BUCKETS] = {
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025,
    0.05,   0.1,   0.25,  0.5,   1,     2.5,    5,    7.5,   10};

void cqrs_histogram_observe(cqrs_histogram_t *h, double seconds)
{
    if (seconds < 0)
        seconds = 0;
    size_t i = 0;
    while (i < CQRS_HISTOGRAM_BUCKETS && seconds > cqrs_histogram_bounds[i])
        i++;
    if (i < CQRS_HISTOGRAM_BUCKETS)
        atomic_fetch_add(&h->bucket[i], 1);
    atomic_fetch_add(&h->count, 1);
    atomic_fetch_add(&h->sum_us, (uint64_t)(seconds * 1e6));
}

void cqrs_text_printf(cqrs_text_t *t, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = t->buf ? vsnprintf(t->buf + t->len, t->cap - t->len, fmt, ap) : -1;
        va_end(ap);
        if (n >= 0 && (size_t)n < t->cap - t->len) {
            t->len += (size_t)n;
            return;
        }
        size_t cap = t->cap ? t->cap * 2 : 4096;
        while (n >= 0 && cap < t->len + (size_t)n + 1)
            cap *= 2;
        char *nb = realloc(t->buf, cap);
        if (!nb)
            return;
        t->buf = nb;
        t->cap = cap;
    }
}

void cqrs_text_free(cqrs_text_t *t)
{
    free(t->buf);
    memset(t, 0, sizeof *t);
}

void cqrs_metric_counter(cqrs_text_t *t, const char *name, const char *help, uint64_t value)
{
    cqrs_text_printf(t, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", name, help, name, name,
                     (unsigned long long)value);
}

void cqrs_metric_gauge(cqrs_text_t *t, const char *name, const char *help, double value)
{
    cqrs_text_printf(t, "# HELP %s %s\n# TYPE %s gauge\n%s %.17g\n", name, help, name, name, value);
}

static void cqrs_metric_counter_f(cqrs_text_t *t, const char *name, const char *help, double value)
{
    cqrs_text_printf(t, "# HELP %s %s\n# TYPE %s counter\n%s %.17g\n", name, help, name, name,
                     value);
}

void cqrs_metric_histogram_samples(cqrs_text_t *t, const char *name, const char *labels,
                                   const cqrs_histogram_t *h)
{
    const char *sep = labels && *labels ? "," : "";
    const char *l = labels ? labels : "";
    uint64_t cum = 0;
    for (size_t i = 0; i < CQRS_HISTOGRAM_BUCKETS; i++) {
        cum += atomic_load(&h->bucket[i]);
        cqrs_text_printf(t, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, l, sep,
                         cqrs_histogram_bounds[i], (unsigned long long)cum);
    }
    uint64_t count = atomic_load(&h->count);
    const char *open = *l ? "{" : "", *close = *l ? "}" : "";
    cqrs_text_printf(t, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, l, sep,
                     (unsigned long long)count);
    cqrs_text_printf(t, "%s_sum%s%s%s %.6f\n%s_count%s%s%s %llu\n", name, open, l, close,
                     (double)atomic_load(&h->sum_us) / 1e6, name, open, l, close,
                     (unsigned long long)count);
}

void cqrs_metric_histogram(cqrs_text_t *t, const char *name, const char *help,
                           const cqrs_histogram_t *h)
{
    cqrs_text_printf(t, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    cqrs_metric_histogram_samples(t, name, NULL, h);
}

/* Seconds since the epoch at boot (btime of /proc/stat), -1 when unknown. */
static long long boot_time(void)
{
    FILE *f = fopen("/proc/stat", "r");
    if (!f)
        return -1;
    char line[256];
    long long btime = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "btime %lld", &btime) == 1)
            break;
    fclose(f);
    return btime;
}

void cqrs_metrics_process(cqrs_text_t *t)
{
    long tick = sysconf(_SC_CLK_TCK), page = sysconf(_SC_PAGESIZE);
    FILE *f = fopen("/proc/self/stat", "r");
    if (f) {
        char buf[1024];
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = '\0';
        /* The command name (field 2) is in parentheses and may hold spaces: fields from 3 on
         * follow its last ')'. utime, stime: 14, 15; starttime: 22; vsize, rss: 23, 24. */
        const char *p = strrchr(buf, ')');
        unsigned long long utime, stime, start, vsize;
        long long rss;
        if (p && tick > 0 &&
            sscanf(p + 2,
                   "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %*d %*d %*d %*d %*d "
                   "%*d %llu %llu %lld",
                   &utime, &stime, &start, &vsize, &rss) == 5) {
            cqrs_metric_counter_f(t, "process_cpu_seconds_total",
                                  "Total user and system CPU time spent in seconds.",
                                  (double)(utime + stime) / (double)tick);
            cqrs_metric_gauge(t, "process_virtual_memory_bytes", "Virtual memory size in bytes.",
                              (double)vsize);
            cqrs_metric_gauge(t, "process_resident_memory_bytes", "Resident memory size in bytes.",
                              (double)rss * (double)page);
            long long btime = boot_time();
            if (btime >= 0)
                cqrs_metric_gauge(t, "process_start_time_seconds",
                                  "Start time of the process since unix epoch in seconds.",
                                  (double)btime + (double)start / (double)tick);
        }
    }
    DIR *d = opendir("/proc/self/fd");
    if (d) {
        long fds = 0;
        struct dirent *e;
        while ((e = readdir(d)))
            if (e->d_name[0] != '.')
                fds++;
        closedir(d);
        /* less the descriptor of the listing itself */
        cqrs_metric_gauge(t, "process_open_fds", "Number of open file descriptors.",
                          (double)(fds > 0 ? fds - 1 : 0));
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0)
        cqrs_metric_gauge(t, "process_max_fds", "Maximum number of open file descriptors.",
                          rl.rlim_cur == RLIM_INFINITY ? -1.0 : (double)rl.rlim_cur);
}
