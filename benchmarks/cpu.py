"""CPU benchmark of the tiled backend against torch SDPA and FlexAttention, in one run.

    python benchmarks/cpu.py [--quick] [--json benchmarks/results/cpu.json] [--png docs/memory.png]

The same as ``attnkit bench``; the measuring code lives in ``attnkit/bench.py``.
"""

from __future__ import annotations

import sys

from attnkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
