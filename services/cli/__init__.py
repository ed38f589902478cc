"""The launcher: the `xrayq` command line, the embedded-mode supervisor, the HTTP API client.

The only package that may import the services."""
