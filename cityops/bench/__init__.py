"""`cityops bench`: the benchmark harness that writes docs/benchmarks.md from measurements."""
