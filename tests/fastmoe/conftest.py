"""fastmoe's own test suite (laekov/fastmoe ``tests/`` at ee3c561), ported to a CPU, run against
:mod:`common.fmoe` through the test-only ``fmoe`` alias.  Each file names its origin and marks its
changes ``CPU:``; fastmoe's ``moe.py`` brute-force references are unchanged.  Multi-process cases
start their own gloo workers (``fastmoe_cpu``).

The alias lives only while these files are imported: once pytest has collected every test, ``fmoe``
leaves ``sys.modules`` and the alias folder leaves ``sys.path`` (the ported modules keep the names
they imported), so the rest of the suite sees what a reader's machine has: no ``fmoe``.

Not ported, because they test what is not provided (CUDA kernels): test_comm (NCCL communicator),
test_faster_gate, test_faster_schedule, test_faster_shadow (FasterMoE), test_swipe (SwipeGate),
benchmark_mlp (a GPU benchmark).
"""

import sys

from fastmoe_cpu import ALIAS, HERE

for path in (str(HERE), str(ALIAS)):
    if path not in sys.path:
        sys.path.insert(0, path)


def pytest_collection_finish(session):
    for name in [n for n in sys.modules if n == "fmoe" or n.startswith("fmoe.")]:
        del sys.modules[name]
    while str(ALIAS) in sys.path:
        sys.path.remove(str(ALIAS))
