"""Side-by-side speed measurements: ``python -m benchmarks.NAME`` prints a table and writes JSON."""
