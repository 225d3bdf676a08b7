package sidecar

import (
	"context"
	"fmt"
	"time"

	"github.com/blobseal/blobseal/skr"
)

// runSKR serves the SKR-compatible API until ctx ends. Its setup (evidence
// device, CA file, identity) is retried with backoff under on_failure:
// retry, like a filesystem's; under exit the first failure is returned.
func (s *Sidecar) runSKR(ctx context.Context) error {
	c := s.cfg.SKR
	log := s.log.With("component", "skr")
	for attempt := 1; ; attempt++ {
		srv, err := s.newSKRServer()
		if err == nil {
			s.mu.Lock()
			s.skrSrv = srv
			s.mu.Unlock()
			err = srv.Serve(ctx, c.Address, func(addr string) {
				s.mu.Lock()
				s.skrAddr = addr
				s.mu.Unlock()
			})
			if err == nil || ctx.Err() != nil {
				return nil
			}
		}
		log.Error("SKR API not serving", "attempt", attempt, "err", err)
		if s.cfg.OnFailure != "retry" {
			return fmt.Errorf("SKR API: %w", err)
		}
		if !sleep(ctx, backoff(attempt, time.Duration(s.cfg.RetryMaxDelay))) {
			return nil
		}
	}
}

func (s *Sidecar) newSKRServer() (*skr.Server, error) {
	env, err := s.keyEnvironment()
	if err != nil {
		return nil, err
	}
	cred, err := s.vaultCredential()
	if err != nil {
		return nil, err
	}
	return skr.New(skr.Options{
		Evidence: env.provider, Credential: cred, HTTPClient: env.client, TrustedRoots: env.roots,
		AllowedKeys: s.cfg.SKR.AllowedKeys, Logger: s.log.With("component", "skr"),
	})
}

func (s *Sidecar) skrMetrics() *skr.Metrics {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.skrSrv == nil {
		return nil
	}
	return s.skrSrv.Metrics()
}

// SKRAddr is the address the SKR API listens on, once it does.
func (s *Sidecar) SKRAddr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.skrAddr
}
