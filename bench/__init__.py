"""The benchmarks and their harness (`make bench`, `python -m bench`): kept beside the code, out
of the installed `cityops` package; they write docs/benchmarks.md from measurements."""
