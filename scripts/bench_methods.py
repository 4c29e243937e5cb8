"""Method cost benchmark: time, KV bytes and memory of every method against the full cache.

    python scripts/bench_methods.py                      # every method, embedded model, CPU
    python scripts/bench_methods.py --help

What it measures and the reference machine's numbers: docs/performance.md.
"""

import sys

from kvbench.bench import main

if __name__ == "__main__":
    sys.exit(main())
