"""Load and fault tests of a running xrayq stack: `python -m loadtest.bench`, `python -m loadtest.chaos`,
the locustfile and the synchronous baseline; their shared helpers live in `loadtest.harness`."""
