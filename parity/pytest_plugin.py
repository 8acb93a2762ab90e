"""pytest plugin: fixtures and assertions for running parity comparisons inside a test suite."""
