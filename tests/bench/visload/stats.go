package main

// stats.go — percentiles of a run's samples and how they are printed.

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"syscall"
	"time"
)

// dist is a distribution in milliseconds; +Inf stands for "never happened" (a command never
// visible), so a percentile that reaches one says so instead of hiding it.
type dist struct {
	N    int     `json:"n"`
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p99_9"`
	Max  float64 `json:"max"`
}

// summarize uses the nearest rank: the smallest value with at least p of the samples at or
// below it. It sorts ms in place.
func summarize(ms []float64) dist {
	sort.Float64s(ms)
	rank := func(p float64) float64 {
		if len(ms) == 0 {
			return math.NaN()
		}
		i := int(math.Ceil(p*float64(len(ms)))) - 1
		if i < 0 {
			i = 0
		}
		return ms[i]
	}
	return dist{N: len(ms), P50: rank(0.50), P90: rank(0.90), P99: rank(0.99),
		P999: rank(0.999), Max: rank(1)}
}

func fmtMs(ms float64) string {
	switch {
	case math.IsNaN(ms):
		return "-"
	case math.IsInf(ms, 1):
		return "never"
	case ms < 10:
		return strconv.FormatFloat(ms, 'f', 2, 64) + " ms"
	case ms < 100:
		return strconv.FormatFloat(ms, 'f', 1, 64) + " ms"
	default:
		return strconv.FormatFloat(ms, 'f', 0, 64) + " ms"
	}
}

func fmtDur(d time.Duration) string {
	return fmtMs(float64(d) / float64(time.Millisecond))
}

func (d dist) String() string {
	return fmt.Sprintf("p50 %s  p90 %s  p99 %s  p99.9 %s  max %s", fmtMs(d.P50), fmtMs(d.P90),
		fmtMs(d.P99), fmtMs(d.P999), fmtMs(d.Max))
}

// finiteOrNil: JSON has no Inf or NaN; such a value is written as null.
func finiteOrNil(f float64) any {
	if math.IsInf(f, 0) || math.IsNaN(f) {
		return nil
	}
	return math.Round(f*1000) / 1000
}

func (d dist) jsonMap() map[string]any {
	return map[string]any{"n": d.N, "p50": finiteOrNil(d.P50), "p90": finiteOrNil(d.P90),
		"p99": finiteOrNil(d.P99), "p99_9": finiteOrNil(d.P999), "max": finiteOrNil(d.Max)}
}

// cpuTime is this process's user + system time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// thousands prints 12345 as "12,345".
func thousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	if n < 0 {
		return "-" + thousands(-n)
	}
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}
