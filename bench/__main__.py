"""`python -m bench`: run the benchmarks (what `make bench` calls)."""

import sys

from bench.cli import main

sys.exit(main(sys.argv[1:]))
