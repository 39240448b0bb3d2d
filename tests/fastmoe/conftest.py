"""fastmoe's own test suite (laekov/fastmoe ``tests/`` at ee3c561), ported to a CPU, run against
:mod:`common.fmoe` through the test-only ``fmoe`` alias.  Each file names its origin and marks its
changes ``CPU:``; fastmoe's ``moe.py`` brute-force references are unchanged.  Multi-process cases
start their own gloo workers (``fastmoe_cpu``).

Not ported, because they test what is not provided (CUDA kernels): test_comm (NCCL communicator),
test_faster_gate, test_faster_schedule, test_faster_shadow (FasterMoE), test_swipe (SwipeGate),
benchmark_mlp (a GPU benchmark).
"""

import sys

from fastmoe_cpu import ALIAS, HERE

for path in (str(HERE), str(ALIAS)):
    if path not in sys.path:
        sys.path.insert(0, path)
