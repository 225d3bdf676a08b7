package sidecar

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/blobseal/blobseal/skr"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// startHealth serves /healthz (the process is alive), /readyz (every
// filesystem mounted and published; 503 with per-mount detail otherwise)
// and /metrics (Prometheus).
func (s *Sidecar) startHealth(ctx context.Context) (stop func(), err error) {
	if s.cfg.Health.Address == "off" {
		return func() {}, nil
	}
	if !skr.IsLoopback(s.cfg.Health.Address) {
		s.log.Warn("health and metrics listen beyond loopback: other hosts can read filesystem state", "address", s.cfg.Health.Address)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", s.readyz)
	mux.HandleFunc("GET /readyz/{name}", s.readyz)
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.metrics.registry, promhttp.HandlerOpts{}))
	ln, err := net.Listen("tcp", s.cfg.Health.Address)
	if err != nil {
		return nil, fmt.Errorf("health endpoint %s: %w (set health.address to a free address, or off)", s.cfg.Health.Address, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("health endpoint stopped", "err", err)
		}
	}()
	s.log.Info("health endpoint listening", "address", ln.Addr().String())
	s.healthAddr = ln.Addr().String()
	return func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}, nil
}

func (s *Sidecar) readyz(w http.ResponseWriter, r *http.Request) {
	states := s.snapshot()
	name := r.PathValue("name")
	ready := true
	var shown []fsState
	for _, st := range states {
		if name != "" && st.Name != name {
			continue
		}
		shown = append(shown, st)
		ready = ready && st.Ready
	}
	if name != "" && len(shown) == 0 {
		http.Error(w, "no filesystem named "+name, http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	if !ready {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	json.NewEncoder(w).Encode(map[string]any{"ready": ready, "filesystems": shown})
}

// HealthAddr returns the address the health endpoint listens on.
func (s *Sidecar) HealthAddr() string { return s.healthAddr }
