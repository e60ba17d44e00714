"""SpanRT benchmarks: `python -m bench` (throughput, latency, accuracy against the peers) and tools."""
