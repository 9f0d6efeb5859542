package main

// load.go — the products, their streams and one paced run.
//
// Pacing: command i is due at t0 + i/rate. One scheduler goroutine sleeps until each due
// time and hands the command to a goroutine of its own, so a slow reply never holds back the
// next send (no coordinated omission); the keep-alive pool (-conns) is the only bound. A send
// going out late is counted, and its delay split into the scheduler's own and the wait for a
// free connection. A command's latency runs from its due time, not from when it was sent, and
// is split once more at the socket: request written → first byte of the answer is the
// daemon's whole share, including any time the request waited before the daemon read it.
//
// Visibility: one Server-Sent Event stream per product; each `id: <version>` line is stamped
// on arrival. A command's lag is the arrival of the first version ≥ its own minus the time
// its 2xx was read (0 when the event came first).

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptrace"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type product struct {
	id       string
	mu       sync.Mutex
	versions []int64 // as they arrived on the stream: only grow
	arrivals []time.Time
}

func (p *product) record(v int64, at time.Time) {
	p.mu.Lock()
	if n := len(p.versions); n == 0 || v > p.versions[n-1] {
		p.versions = append(p.versions, v)
		p.arrivals = append(p.arrivals, at)
	}
	p.mu.Unlock()
}

func (p *product) latest() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.versions) == 0 {
		return 0
	}
	return p.versions[len(p.versions)-1]
}

// firstAtLeast: when a version ≥ v arrived.
func (p *product) firstAtLeast(v int64) (time.Time, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	i := sort.Search(len(p.versions), func(i int) bool { return p.versions[i] >= v })
	if i == len(p.versions) {
		return time.Time{}, false
	}
	return p.arrivals[i], true
}

type loader struct {
	cfg        *config
	cmd        *http.Client // commands: a keep-alive pool of cfg.conns connections
	stream     *http.Client // one connection per stream, no timeout
	plain      *http.Client // creation, metrics
	products   []*product
	reconnects atomic.Int64
}

func newLoader(cfg *config) *loader {
	dial := (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	cmd := &http.Transport{DialContext: dial, MaxConnsPerHost: cfg.conns,
		MaxIdleConnsPerHost: cfg.conns, MaxIdleConns: cfg.conns, IdleConnTimeout: 20 * time.Second,
		DisableCompression: true}
	stream := &http.Transport{DialContext: dial, DisableKeepAlives: true, DisableCompression: true}
	return &loader{cfg: cfg,
		cmd:    &http.Client{Transport: cmd, Timeout: 30 * time.Second},
		stream: &http.Client{Transport: stream},
		plain:  &http.Client{Timeout: 10 * time.Second}}
}

// createProducts makes cfg.products products through the command API, 8 at a time.
func (l *loader) createProducts() error {
	l.products = make([]*product, l.cfg.products)
	errs := make(chan error, l.cfg.products)
	sem := make(chan struct{}, 8)
	var wg sync.WaitGroup
	for i := range l.products {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer func() { <-sem; wg.Done() }()
			body := fmt.Sprintf(`{"sku":"%s-%d","name":"Visibility lamp %d",`+
				`"description":"A lamp for the visibility benchmark","category":"lamps",`+
				`"price_cents":%d,"currency":"EUR","initial_stock":10}`,
				l.cfg.skuPrefix, i, i, 1000+i)
			resp, err := l.plain.Post(l.cfg.command+"/v1/products", "application/json",
				strings.NewReader(body))
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			data, _ := io.ReadAll(resp.Body)
			var doc struct {
				ID string `json:"id"`
			}
			if resp.StatusCode != http.StatusCreated || json.Unmarshal(data, &doc) != nil ||
				doc.ID == "" {
				errs <- fmt.Errorf("create product %d: HTTP %d %s", i, resp.StatusCode, data)
				return
			}
			l.products[i] = &product{id: doc.ID}
		}(i)
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// watch keeps one stream of p open until ctx ends, reconnecting with Last-Event-ID.
func (l *loader) watch(ctx context.Context, p *product) {
	for ctx.Err() == nil {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet,
			l.cfg.query+"/v1/products/"+p.id+"/stream", nil)
		if v := p.latest(); v > 0 {
			req.Header.Set("Last-Event-ID", strconv.FormatInt(v, 10))
		}
		resp, err := l.stream.Do(req)
		if err == nil && resp.StatusCode == http.StatusOK {
			br := bufio.NewReaderSize(resp.Body, 64*1024)
			for {
				line, err := br.ReadSlice('\n')
				if len(line) > 4 && bytes.HasPrefix(line, []byte("id: ")) {
					at := time.Now()
					if v, perr := strconv.ParseInt(string(bytes.TrimSpace(line[4:])), 10, 64); perr == nil {
						p.record(v, at)
					}
				}
				if err != nil && err != bufio.ErrBufferFull {
					break
				}
			}
		}
		if resp != nil {
			resp.Body.Close()
		}
		if ctx.Err() == nil {
			l.reconnects.Add(1)
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// waitReadable waits until every product's stream delivered its document.
func (l *loader) waitReadable(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		missing := 0
		for _, p := range l.products {
			if p.latest() < 1 {
				missing++
			}
		}
		if missing == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d products not readable on the query API after %s",
				missing, len(l.products), timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type sample struct {
	due      time.Time // when it should go out: t0 + i/rate
	launched time.Time // when the scheduler handed it on (its own lateness)
	started  time.Time // when it had a connection (a wait here: the pool was full)
	wrote    time.Time // when the request was written
	answered time.Time // when the answer's first byte came
	acked    time.Time // when the whole answer was read
	status   int       // 0: no HTTP answer
	version  int64
	product  int
}

var adjustBody = []byte(`{"delta":1,"reason":"visload"}`)

func (l *loader) send(s *sample) {
	p := l.products[s.product]
	req, _ := http.NewRequest(http.MethodPost,
		l.cfg.command+"/v1/products/"+p.id+"/stock-adjustments", bytes.NewReader(adjustBody))
	req.Header.Set("Content-Type", "application/json")
	trace := &httptrace.ClientTrace{
		GotConn:              func(httptrace.GotConnInfo) { s.started = time.Now() },
		WroteRequest:         func(httptrace.WroteRequestInfo) { s.wrote = time.Now() },
		GotFirstResponseByte: func() { s.answered = time.Now() }}
	req = req.WithContext(httptrace.WithClientTrace(req.Context(), trace))
	resp, err := l.cmd.Do(req)
	if err != nil {
		s.acked = time.Now()
		if s.started.IsZero() {
			s.started = s.acked
		}
		return
	}
	data, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	s.acked = time.Now()
	s.status = resp.StatusCode
	if s.status/100 != 2 {
		return
	}
	// The new version: the ETag ("7"), else the document's "version".
	if v, err := strconv.ParseInt(strings.Trim(resp.Header.Get("ETag"), `"W/`), 10, 64); err == nil {
		s.version = v
		return
	}
	var doc struct {
		Version int64 `json:"version"`
	}
	if json.Unmarshal(data, &doc) == nil {
		s.version = doc.Version
	}
}

// result is one paced run.
type result struct {
	Rate           float64
	Seconds        float64
	Sent           int
	OK             int
	Non2xx         int
	TransportErr   int
	NeverVisible   int
	Achieved       float64
	Lag            dist
	Latency        dist
	LateOver       int  // sends that went out more than cfg.late after their due time
	Late           dist // due → had a connection
	SchedLate      dist // due → launched: the generator's own timing
	ConnWait       dist // launched → had a connection: the pool
	Server         dist // request written → first byte of the answer: the daemon, socket to socket
	CPUPercent     float64
	Sustained      bool
	Stages         []stage
	ScrapeWarnings []string
	Timeline       []string // per second of the schedule, with -timeline
}

func (l *loader) run(rate float64) *result {
	cfg := l.cfg
	res := &result{Rate: rate, Seconds: cfg.seconds.Seconds()}
	var before [2]*scrape
	for i, base := range []string{cfg.command, cfg.query} {
		var err error
		if before[i], err = scrapeMetrics(l.plain, base); err != nil {
			res.ScrapeWarnings = append(res.ScrapeWarnings, err.Error())
		}
	}

	total := int(rate * (cfg.warmup + cfg.seconds).Seconds())
	measuredFrom := int(rate * cfg.warmup.Seconds())
	samples := make([]sample, total)
	cpu0 := cpuTime()
	t0 := time.Now().Add(20 * time.Millisecond)
	var wg sync.WaitGroup
	for i := range samples {
		s := &samples[i]
		s.due = t0.Add(time.Duration(float64(i) * float64(time.Second) / rate))
		s.product = i % len(l.products)
		if d := time.Until(s.due); d > 0 {
			time.Sleep(d)
		}
		s.launched = time.Now()
		wg.Add(1)
		go func() { defer wg.Done(); l.send(s) }()
	}
	wg.Wait()
	lastAck := t0
	for i := range samples {
		if samples[i].acked.After(lastAck) {
			lastAck = samples[i].acked
		}
	}
	wall := lastAck.Sub(t0)
	res.CPUPercent = 100 * float64(cpuTime()-cpu0) / float64(wall)

	// The tail: wait until every acknowledged version arrived, or cfg.visible after the last.
	want := make([]int64, len(l.products))
	for i := range samples {
		if samples[i].version > want[samples[i].product] {
			want[samples[i].product] = samples[i].version
		}
	}
	for deadline := time.Now().Add(cfg.visible); time.Now().Before(deadline); {
		done := true
		for i, p := range l.products {
			if p.latest() < want[i] {
				done = false
				break
			}
		}
		if done {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}

	var after [2]*scrape
	for i, base := range []string{cfg.command, cfg.query} {
		var err error
		if after[i], err = scrapeMetrics(l.plain, base); err != nil {
			res.ScrapeWarnings = append(res.ScrapeWarnings, err.Error())
		}
	}
	res.Stages = append(diffHistograms("commandd", before[0], after[0]),
		diffHistograms("queryd", before[1], after[1])...)

	measured := samples[measuredFrom:]
	res.Sent = len(measured)
	var lags, lat, late, sched, conn, server []float64
	firstDue := measured[0].due
	var lastOK time.Time
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	for i := range measured {
		s := &measured[i]
		wait := s.started.Sub(s.due)
		if wait < 0 {
			wait = 0
		}
		late = append(late, ms(wait))
		sched = append(sched, ms(s.launched.Sub(s.due)))
		conn = append(conn, ms(max(0, s.started.Sub(s.launched))))
		if wait > cfg.late {
			res.LateOver++
		}
		switch {
		case s.status == 0:
			res.TransportErr++
			continue
		case s.status/100 != 2:
			res.Non2xx++
			lat = append(lat, ms(s.acked.Sub(s.due)))
			continue
		}
		res.OK++
		lat = append(lat, ms(s.acked.Sub(s.due)))
		if !s.wrote.IsZero() && !s.answered.IsZero() {
			server = append(server, ms(s.answered.Sub(s.wrote)))
		}
		if s.acked.After(lastOK) {
			lastOK = s.acked
		}
		at, ok := l.products[s.product].firstAtLeast(s.version)
		if !ok || at.Sub(s.acked) > cfg.visible {
			res.NeverVisible++
			lags = append(lags, math.Inf(1))
			continue
		}
		lag := at.Sub(s.acked)
		if lag < 0 {
			lag = 0
		}
		lags = append(lags, ms(lag))
	}
	// Achieved: 2xx answers per second from the first measured due time to the last answer,
	// or to the end of the schedule when the answers kept up.
	span := lastOK.Sub(firstDue)
	if end := cfg.seconds; span < end {
		span = end
	}
	if res.OK > 0 {
		res.Achieved = float64(res.OK) / span.Seconds()
	}
	if cfg.timeline {
		res.Timeline = timeline(measured, l.products, firstDue)
	}
	res.Lag = summarize(lags)
	res.Latency = summarize(lat)
	res.Late = summarize(late)
	res.SchedLate = summarize(sched)
	res.ConnWait = summarize(conn)
	res.Server = summarize(server)
	res.Sustained = res.Achieved >= cfg.sustainedShare*rate && res.Lag.P99 <= ms(cfg.maxLag) &&
		res.NeverVisible == 0 && float64(res.Non2xx+res.TransportErr) <= 0.001*float64(res.Sent)
	return res
}

// timeline: per second of due times, the commands due, their latency p99 and lag p99 — where
// in the run a stall happened.
func timeline(measured []sample, products []*product, from time.Time) []string {
	type sec struct{ lat, lag []float64 }
	var secs []sec
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	for i := range measured {
		s := &measured[i]
		k := int(s.due.Sub(from) / time.Second)
		for len(secs) <= k {
			secs = append(secs, sec{})
		}
		if s.status/100 != 2 {
			continue
		}
		secs[k].lat = append(secs[k].lat, ms(s.acked.Sub(s.due)))
		lag := math.Inf(1)
		if at, ok := products[s.product].firstAtLeast(s.version); ok {
			lag = ms(max(0, at.Sub(s.acked)))
		}
		secs[k].lag = append(secs[k].lag, lag)
	}
	out := make([]string, len(secs))
	for k, x := range secs {
		out[k] = fmt.Sprintf("s%-3d 2xx %-5d latency p99 %-9s lag p99 %s", k, len(x.lat),
			fmtMs(summarize(x.lat).P99), fmtMs(summarize(x.lag).P99))
	}
	return out
}
