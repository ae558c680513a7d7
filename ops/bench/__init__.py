"""Benchmarks kept out of the test suite (`fedmask bench ...`): the merge kernel, pipeline ingest and close
latency, many-device load, slow-board decoupling."""
