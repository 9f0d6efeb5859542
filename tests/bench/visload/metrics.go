package main

// metrics.go — the daemons' own histograms, scraped before and after a run. Every `*_bucket`
// family is taken (nothing is listed here, so a histogram added to a daemon later shows up on
// its own); a series' quantile is read from the delta of its cumulative buckets and can only
// say "≤ the bucket's upper bound" (or "> the last finite bound").

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"
)

type histSeries struct {
	family string              // the metric name without _bucket
	labels string              // the series' labels without le, as printed
	counts map[float64]float64 // upper bound (+Inf included) → cumulative count
}

func (h *histSeries) key() string {
	if h.labels == "" {
		return h.family
	}
	return h.family + "{" + h.labels + "}"
}

type scrape struct {
	help   map[string]string      // family → HELP text
	series map[string]*histSeries // key() → series
}

// scrapeMetrics reads one /metrics page; an unreachable daemon gives an empty scrape and the
// error (the run goes on: a breakdown missing is better than no figures).
func scrapeMetrics(client *http.Client, base string) (*scrape, error) {
	resp, err := client.Get(base + "/metrics")
	if err != nil {
		return &scrape{help: map[string]string{}, series: map[string]*histSeries{}}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, resp.Body)
		return &scrape{help: map[string]string{}, series: map[string]*histSeries{}},
			fmt.Errorf("%s/metrics: HTTP %d", base, resp.StatusCode)
	}
	return parseMetrics(resp.Body)
}

func parseMetrics(r io.Reader) (*scrape, error) {
	s := &scrape{help: map[string]string{}, series: map[string]*histSeries{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "# HELP "); ok {
			name, text, _ := strings.Cut(rest, " ")
			s.help[name] = text
			continue
		}
		if line == "" || line[0] == '#' {
			continue
		}
		name, labels, value, ok := splitSample(line)
		if !ok || !strings.HasSuffix(name, "_bucket") {
			continue
		}
		le := math.NaN()
		var rest []string
		for _, l := range labels {
			if l[0] == "le" {
				if l[1] == "+Inf" {
					le = math.Inf(1)
				} else if f, err := strconv.ParseFloat(l[1], 64); err == nil {
					le = f
				}
				continue
			}
			rest = append(rest, l[0]+"="+strconv.Quote(l[1]))
		}
		if math.IsNaN(le) {
			continue
		}
		h := &histSeries{family: strings.TrimSuffix(name, "_bucket"), labels: strings.Join(rest, ",")}
		if old, ok := s.series[h.key()]; ok {
			h = old
		} else {
			h.counts = map[float64]float64{}
			s.series[h.key()] = h
		}
		h.counts[le] = value
	}
	return s, sc.Err()
}

// splitSample parses `name{k="v",…} value [timestamp]`; label values may hold braces, commas
// and escaped quotes (routes such as /v1/products/{id}/stream do).
func splitSample(line string) (name string, labels [][2]string, value float64, ok bool) {
	i := strings.IndexAny(line, "{ ")
	if i <= 0 {
		return "", nil, 0, false
	}
	name = line[:i]
	rest := line[i:]
	if rest[0] == '{' {
		rest = rest[1:]
		for {
			rest = strings.TrimLeft(rest, " ,")
			if rest == "" {
				return "", nil, 0, false
			}
			if rest[0] == '}' {
				rest = rest[1:]
				break
			}
			eq := strings.IndexByte(rest, '=')
			if eq <= 0 || eq+1 >= len(rest) || rest[eq+1] != '"' {
				return "", nil, 0, false
			}
			key := rest[:eq]
			var val strings.Builder
			j := eq + 2
			for ; j < len(rest) && rest[j] != '"'; j++ {
				if rest[j] == '\\' && j+1 < len(rest) {
					j++
					switch rest[j] {
					case 'n':
						val.WriteByte('\n')
					default:
						val.WriteByte(rest[j])
					}
					continue
				}
				val.WriteByte(rest[j])
			}
			if j >= len(rest) {
				return "", nil, 0, false
			}
			labels = append(labels, [2]string{key, val.String()})
			rest = rest[j+1:]
		}
	}
	fields := strings.Fields(rest)
	if len(fields) == 0 {
		return "", nil, 0, false
	}
	v, err := strconv.ParseFloat(fields[0], 64)
	if err != nil {
		return "", nil, 0, false
	}
	return name, labels, v, true
}

// stage is one histogram series' change over a run.
type stage struct {
	Daemon string  `json:"daemon"`
	Series string  `json:"series"`
	Help   string  `json:"-"`
	Count  float64 `json:"count"`
	P50    string  `json:"p50_le"` // seconds (or the family's unit): "0.025", ">10"
	P99    string  `json:"p99_le"`
	unit   string
}

// diffHistograms returns the series of after whose count grew since before, by name.
func diffHistograms(daemon string, before, after *scrape) []stage {
	var out []stage
	for key, a := range after.series {
		bounds := make([]float64, 0, len(a.counts))
		for b := range a.counts {
			bounds = append(bounds, b)
		}
		sort.Float64s(bounds)
		delta := make([]float64, len(bounds))
		var prev *histSeries
		if before != nil {
			prev = before.series[key]
		}
		for i, b := range bounds {
			delta[i] = a.counts[b]
			if prev != nil {
				delta[i] -= prev.counts[b]
			}
		}
		if len(bounds) == 0 || !math.IsInf(bounds[len(bounds)-1], 1) || delta[len(delta)-1] <= 0 {
			continue
		}
		if strings.Contains(a.labels, `route="/metrics"`) {
			continue // our own scrape, nothing of the pipeline
		}
		total := delta[len(delta)-1]
		st := stage{Daemon: daemon, Series: key, Help: after.help[a.family], Count: total}
		if strings.HasSuffix(a.family, "_seconds") {
			st.unit = "s"
		}
		st.P50 = bucketQuantile(bounds, delta, 0.50)
		st.P99 = bucketQuantile(bounds, delta, 0.99)
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Daemon != out[j].Daemon {
			return out[i].Daemon < out[j].Daemon
		}
		return out[i].Series < out[j].Series
	})
	return out
}

// bucketQuantile: the upper bound of the first bucket holding the q-th observation.
func bucketQuantile(bounds, cum []float64, q float64) string {
	target := q * cum[len(cum)-1]
	for i, c := range cum {
		if c >= target && c > 0 {
			if math.IsInf(bounds[i], 1) {
				last := "0"
				if i > 0 {
					last = strconv.FormatFloat(bounds[i-1], 'g', -1, 64)
				}
				return ">" + last
			}
			return strconv.FormatFloat(bounds[i], 'g', -1, 64)
		}
	}
	return "?"
}

// fmtBound prints a bound as "≤ 25 ms" (seconds families) or "≤ 25".
func fmtBound(b, unit string) string {
	rel := "≤ "
	if strings.HasPrefix(b, ">") {
		rel = "> "
		b = b[1:]
	}
	f, err := strconv.ParseFloat(b, 64)
	if err != nil {
		return b
	}
	if unit == "s" {
		return rel + fmtDur(time.Duration(f*float64(time.Second)))
	}
	return rel + strconv.FormatFloat(f, 'g', -1, 64)
}
