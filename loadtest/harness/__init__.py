"""What the load tests (and the end-to-end tests) need to drive real processes and real traffic:
`processes` (ports, starting, stopping, readiness), `postgres` (a cluster of our own that can be
crash-restarted), `images` (real chest X-rays from the data folder, ZIP bodies) and `clients`
(authenticated HTTP, concurrent request loops, latency percentiles)."""
