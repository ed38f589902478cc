"""What the load tests (and the end-to-end tests) need to drive real processes and real traffic:
`processes` (ports, starting, stopping, readiness, memory), `postgres` (a cluster of our own that can
be crash-restarted), `images` (real chest X-rays from the data folder, ZIP bodies), `clients`
(credentials, concurrent request loops, latency percentiles) and `served_model` (the stack's model
version loaded in-process, as the worker loads it)."""
