"""The throughput benchmark, run by ``demo/bench.py``: one module per job, named for it."""
