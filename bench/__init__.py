"""The throughput benchmark for sfox-tokens (issue 5): ``python -m bench.run``.

It starts real parts (Redis, the sFOX stand-in as its own process, real
Celery workers), measures the package against a plain loop, the naive
one-request-per-user way and the rate-limit bound, and writes
``bench/RESULTS.md`` and ``bench/chart.png``. Nothing here is imported by
the package.
"""
