// visload — the visibility benchmark's load generator (issue 24): how long after a command's
// 2xx its version can be read, paced open loop over keep-alive connections, with the lag
// broken down per stage from the daemons' own histograms. Standard library only, so it builds
// offline; tests/bench/visibility.sh runs it on the local dev stack.
//
//	visload -command http://127.0.0.1:8081 -query http://127.0.0.1:8082 -rates 100,1000 -find-max
//
// Output: a block per run, one JSON object per run in -json (appended), and a markdown table
// of the runs (with the physical floor and the ratios when -floor-* are given).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
)

type config struct {
	command, query string
	products       int
	seconds        time.Duration
	warmup         time.Duration
	visible        time.Duration
	late           time.Duration
	settle         time.Duration
	conns          int
	skuPrefix      string
	rates          []float64
	findMax        bool
	ladder         []float64
	sustainedShare float64
	maxLag         time.Duration
	jsonPath       string
	label          string
	timeline       bool
	floorPG50      float64
	floorPG99      float64
	floorKafka50   float64
	floorKafka99   float64
}

func parseRates(s string) ([]float64, error) {
	var out []float64
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		r, err := strconv.ParseFloat(f, 64)
		if err != nil || r <= 0 {
			return nil, fmt.Errorf("bad rate %q", f)
		}
		out = append(out, r)
	}
	return out, nil
}

func main() {
	cfg := &config{}
	var rates, ladder string
	flag.StringVar(&cfg.command, "command", "http://127.0.0.1:8081", "cqrs-commandd base URL")
	flag.StringVar(&cfg.query, "query", "http://127.0.0.1:8082", "cqrs-queryd base URL")
	flag.IntVar(&cfg.products, "products", 50, "products (one stream each; commands round robin)")
	flag.DurationVar(&cfg.seconds, "seconds", 20*time.Second, "measured time per run")
	flag.DurationVar(&cfg.warmup, "warmup", time.Second, "paced but not measured, before each run")
	flag.DurationVar(&cfg.visible, "visible-timeout", 5*time.Second,
		"a command not visible this long after its 2xx counts as never visible")
	// 2 ms: Go's timers on Linux wake through epoll's millisecond timeout, so the scheduler's
	// own delay alone reaches about 1 ms on an idle machine.
	flag.DurationVar(&cfg.late, "late", 2*time.Millisecond,
		"a send going out longer than this after its due time counts as late")
	flag.DurationVar(&cfg.settle, "settle", 2*time.Second, "pause between runs")
	flag.IntVar(&cfg.conns, "conns", 768, "keep-alive connections at most (commands in flight)")
	flag.StringVar(&cfg.skuPrefix, "sku-prefix", "VL"+strconv.FormatInt(time.Now().Unix(), 36),
		"sku prefix of the products made")
	flag.StringVar(&rates, "rates", "100,1000", "paced rates (commands/s), each run once")
	flag.BoolVar(&cfg.findMax, "find-max", false,
		"then step up -ladder until a rate is not sustained; report the highest that was")
	flag.StringVar(&ladder, "ladder", "500,1000,1500,2000,3000,4000,6000,8000",
		"rates tried by -find-max, in order")
	flag.Float64Var(&cfg.sustainedShare, "sustained-share", 0.95,
		"sustained: achieved ≥ this share of the paced rate …")
	flag.DurationVar(&cfg.maxLag, "max-p99-lag", time.Second, "… and lag p99 ≤ this")
	flag.StringVar(&cfg.jsonPath, "json", "", "append one JSON object per run to this file")
	flag.BoolVar(&cfg.timeline, "timeline", false, "print each run's latency and lag per second")
	flag.StringVar(&cfg.label, "label", "", "free text copied into each JSON object (e.g. the log size)")
	flag.Float64Var(&cfg.floorPG50, "floor-pg-p50", math.NaN(), "PostgreSQL commit p50, ms (for the table)")
	flag.Float64Var(&cfg.floorPG99, "floor-pg-p99", math.NaN(), "PostgreSQL commit p99, ms")
	flag.Float64Var(&cfg.floorKafka50, "floor-kafka-p50", math.NaN(), "Kafka end-to-end p50, ms")
	flag.Float64Var(&cfg.floorKafka99, "floor-kafka-p99", math.NaN(), "Kafka end-to-end p99, ms")
	flag.Parse()
	var err error
	if cfg.rates, err = parseRates(rates); err == nil {
		cfg.ladder, err = parseRates(ladder)
	}
	if err == nil && (cfg.products < 1 || cfg.conns < 1 || cfg.seconds <= 0) {
		err = fmt.Errorf("-products, -conns and -seconds must be positive")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "visload:", err)
		os.Exit(2)
	}
	os.Exit(run(cfg))
}

type row struct {
	res   *result
	label string
}

func run(cfg *config) int {
	l := newLoader(cfg)
	fmt.Printf("== %d products (sku %s-N) through %s\n", cfg.products, cfg.skuPrefix, cfg.command)
	if err := l.createProducts(); err != nil {
		fmt.Fprintln(os.Stderr, "visload:", err)
		return 1
	}
	for _, p := range l.products {
		go l.watch(context.Background(), p)
	}
	if err := l.waitReadable(60 * time.Second); err != nil {
		fmt.Fprintln(os.Stderr, "visload:", err)
		return 1
	}
	fmt.Printf("   all readable on %s; %d streams open\n", cfg.query, len(l.products))

	done := map[float64]*result{}
	measure := func(rate float64) *result {
		if r, ok := done[rate]; ok {
			return r
		}
		time.Sleep(cfg.settle)
		r := l.run(rate)
		done[rate] = r
		printRun(r, cfg)
		writeJSON(cfg, r, false)
		return r
	}
	var rows []row
	for _, rate := range cfg.rates {
		rows = append(rows, row{measure(rate), ""})
	}
	if cfg.findMax {
		var best *result
		for _, rate := range cfg.ladder {
			r := measure(rate)
			if !r.Sustained {
				fmt.Printf("   %s/s not sustained: stop\n", thousands(int64(rate)))
				break
			}
			best = r
		}
		if best == nil {
			fmt.Println("== highest sustained rate: none of the ladder sustained")
		} else {
			fmt.Printf("== highest sustained rate: %s commands/s\n", thousands(int64(best.Rate)))
			writeJSON(cfg, best, true)
			marked := false
			for i := range rows {
				if rows[i].res == best {
					rows[i].label = " (highest sustained)"
					marked = true
				}
			}
			if !marked {
				rows = append(rows, row{best, " (highest sustained)"})
			}
		}
	}
	printTable(cfg, rows)
	if n := l.reconnects.Load(); n > 0 {
		fmt.Printf("(streams reconnected %d times)\n", n)
	}
	return 0
}

func printRun(r *result, cfg *config) {
	fmt.Printf("== paced %s commands/s for %s (+%s warm-up), %d products\n",
		thousands(int64(r.Rate)), cfg.seconds, cfg.warmup, cfg.products)
	fmt.Printf("   achieved %.0f/s  2xx %d of %d  non-2xx %d  no answer %d  never visible (%s) %d  sustained %v\n",
		r.Achieved, r.OK, r.Sent, r.Non2xx, r.TransportErr, cfg.visible, r.NeverVisible, r.Sustained)
	fmt.Printf("   lag (2xx → on the stream)       %s\n", r.Lag)
	fmt.Printf("   command latency (from due time)  %s\n", r.Latency)
	fmt.Printf("   of which written → first byte    %s\n", r.Server)
	fmt.Printf("   sends late > %s: %d; due → connection p99 %s, max %s (the scheduler's own"+
		" delay p99 %s, max %s; waiting for a pooled connection p99 %s, max %s)\n",
		cfg.late, r.LateOver, fmtMs(r.Late.P99), fmtMs(r.Late.Max), fmtMs(r.SchedLate.P99),
		fmtMs(r.SchedLate.Max), fmtMs(r.ConnWait.P99), fmtMs(r.ConnWait.Max))
	fmt.Printf("   visload's own CPU: %.1f %% of one core\n", r.CPUPercent)
	fmt.Println("   the daemons' histograms over this run (bucket bounds):")
	for _, s := range r.Stages {
		fmt.Printf("     %-8s %-78s n=%-7.0f p50 %-10s p99 %s\n", s.Daemon, s.Series, s.Count,
			fmtBound(s.P50, s.unit), fmtBound(s.P99, s.unit))
	}
	for _, t := range r.Timeline {
		fmt.Println("     " + t)
	}
	for _, w := range r.ScrapeWarnings {
		fmt.Printf("   (metrics: %s)\n", w)
	}
}

func writeJSON(cfg *config, r *result, highest bool) {
	if cfg.jsonPath == "" {
		return
	}
	stages := make([]map[string]any, 0, len(r.Stages))
	for _, s := range r.Stages {
		stages = append(stages, map[string]any{"daemon": s.Daemon, "series": s.Series,
			"help": s.Help, "count": s.Count, "p50_le": s.P50, "p99_le": s.P99})
	}
	obj := map[string]any{
		"time": time.Now().UTC().Format(time.RFC3339), "label": cfg.label,
		"paced": r.Rate, "seconds": r.Seconds, "products": cfg.products,
		"highest_sustained": highest, "sustained": r.Sustained,
		"achieved": math.Round(r.Achieved*10) / 10, "sent": r.Sent, "ok": r.OK,
		"non_2xx": r.Non2xx, "no_answer": r.TransportErr, "never_visible": r.NeverVisible,
		"lag_ms": r.Lag.jsonMap(), "command_ms": r.Latency.jsonMap(),
		"late_sends": r.LateOver, "late_ms": r.Late.jsonMap(),
		"scheduler_late_ms": r.SchedLate.jsonMap(), "connection_wait_ms": r.ConnWait.jsonMap(),
		"answer_ms": r.Server.jsonMap(), "cpu_percent": math.Round(r.CPUPercent*10) / 10, "stages": stages,
		"floor_ms": map[string]any{"pg_p50": finiteOrNil(cfg.floorPG50),
			"pg_p99": finiteOrNil(cfg.floorPG99), "kafka_p50": finiteOrNil(cfg.floorKafka50),
			"kafka_p99": finiteOrNil(cfg.floorKafka99)},
	}
	f, err := os.OpenFile(cfg.jsonPath, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, "visload:", err)
		return
	}
	defer f.Close()
	line, _ := json.Marshal(obj)
	_, _ = f.Write(append(line, '\n'))
}

func printTable(cfg *config, rows []row) {
	floor := cfg.floorPG99 + cfg.floorKafka99
	fmt.Println()
	fmt.Println("| paced rate | achieved | p50 | p99 | max | lag p99 / (PG commit p99 + Kafka e2e p99) | visload CPU |")
	fmt.Println("|---|---|---|---|---|---|---|")
	for _, rw := range rows {
		r := rw.res
		ratio := "-"
		if !math.IsNaN(floor) && floor > 0 && !math.IsInf(r.Lag.P99, 0) {
			ratio = fmt.Sprintf("%.1f", r.Lag.P99/floor)
		}
		fmt.Printf("| %s commands/s%s | %s/s | %s | %s | %s | %s | %.0f %% |\n",
			thousands(int64(r.Rate)), rw.label, thousands(int64(math.Round(r.Achieved))),
			fmtMs(r.Lag.P50), fmtMs(r.Lag.P99), fmtMs(r.Lag.Max), ratio, r.CPUPercent)
	}
	if !math.IsNaN(floor) {
		fmt.Printf("\nfloor: PostgreSQL commit of the AdjustStock transaction at 1 client p50 %s, p99 %s;"+
			" Kafka end-to-end (acks=all) p50 %s, p99 %s; sum of the p99s %s\n",
			fmtMs(cfg.floorPG50), fmtMs(cfg.floorPG99), fmtMs(cfg.floorKafka50),
			fmtMs(cfg.floorKafka99), fmtMs(floor))
	}

	// Per stage: one line per histogram series, one column per run.
	seen := map[string]stage{}
	var keys []string
	for _, rw := range rows {
		for _, s := range rw.res.Stages {
			k := s.Daemon + " " + s.Series
			if _, ok := seen[k]; !ok {
				seen[k] = s
				keys = append(keys, k)
			}
		}
	}
	sort.Strings(keys)
	fmt.Println("\nper stage, the daemons' histograms over each run (p50 / p99, bucket upper bounds):")
	fmt.Println()
	head := "| daemon | histogram |"
	sep := "|---|---|"
	for _, rw := range rows {
		head += fmt.Sprintf(" %s/s |", thousands(int64(rw.res.Rate)))
		sep += "---|"
	}
	fmt.Println(head)
	fmt.Println(sep)
	for _, k := range keys {
		s := seen[k]
		line := fmt.Sprintf("| %s | `%s` |", s.Daemon, s.Series)
		for _, rw := range rows {
			cell := "-"
			for _, t := range rw.res.Stages {
				if t.Daemon+" "+t.Series == k {
					cell = fmtBound(t.P50, t.unit) + " / " + fmtBound(t.P99, t.unit)
				}
			}
			line += " " + cell + " |"
		}
		fmt.Println(line)
	}
	helps := map[string]string{}
	for _, k := range keys {
		s := seen[k]
		fam, _, _ := strings.Cut(s.Series, "{")
		if s.Help != "" {
			helps[fam] = s.Help
		}
	}
	fams := make([]string, 0, len(helps))
	for f := range helps {
		fams = append(fams, f)
	}
	sort.Strings(fams)
	fmt.Println()
	for _, f := range fams {
		fmt.Printf("- `%s`: %s\n", f, helps[f])
	}
}
