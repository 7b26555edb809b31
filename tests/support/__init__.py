"""Test harness for the integration tests: real registries, a token issuer, relays, the proxy."""
