"""Operations and observability: Prometheus metrics and probes, the throughput line, the
group's counters in Redis, and logging set-up.
"""
