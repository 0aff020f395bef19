"""Comparing methods as the paper's tables do: the benchmark, the demo, and dry runs."""
