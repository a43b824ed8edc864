"""``make bench``: the CPU headline suite, and its section of benchmarks/RESULTS.md.

Same as ``python -m benchmarks.run --suite cpu-core --device cpu --update-results [...]``.
"""

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "cpu-core", "--device", "cpu", "--update-results", *sys.argv[1:]]))
