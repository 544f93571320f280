"""Side-by-side benchmarks of conveyor and ``torch.distributed.pipelining``.

Run ``python -m bench [--quick] [--only NAME ...] [--out BENCHMARKS.md]`` from the repository
root. Every figure in the report is a ratio taken within one run: both pipelines run in the same
processes, alternated block by block, so machine drift hits both alike.
"""
