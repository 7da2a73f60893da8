"""blockprobe's collector: ingest from probes, archive the evidence, expose Prometheus metrics."""
