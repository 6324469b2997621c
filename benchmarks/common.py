"""Helpers shared by the benchmark scripts."""

from locconf.bench.run import cpu_name  # noqa: F401  (one definition, in the package)
