"""Issue 6's benchmark, run by ``demo/bench.py``: one module per job, named for it."""
