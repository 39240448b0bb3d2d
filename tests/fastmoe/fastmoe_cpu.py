"""What fastmoe's ported tests need to start their worker processes on a CPU (not fastmoe's code).

fastmoe's ``_run_distributed`` starts one ``python <test file> <function> <json args>`` process per
rank with a fresh environment; here each also gets the ``fmoe`` alias and this repository on its
``PYTHONPATH``, one thread (the workers share 2 cores), and a time limit after which every worker
of the run is killed and the test fails with their output.  A worker leaves its process group before
the interpreter ends (fastmoe's workers just exit), then ends at once with the exit code its test
earned: torch's threads still running during the interpreter's own teardown (gloo's, the TCPStore's)
otherwise end the process now and then with ``terminate called without an active exception``
(SIGABRT, seen twice, each time on rank 0, the store's host) after its test passed.
"""

from __future__ import annotations

import atexit
import datetime
import os
import subprocess
import sys
from pathlib import Path

from common.launch import free_port

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
ALIAS = HERE / "fmoe_alias"
WORKER_TIMEOUT_S = 300

__all__ = ["ALIAS", "HERE", "communicate", "free_port", "worker_env"]


@atexit.register
def _leave_process_group() -> None:
    """In a worker: wait (at most 60 s) for the peers to finish, then tear the gloo group down."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    except RuntimeError:  # a peer failed or left: nothing to wait for
        pass
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # the interpreter sets sys.last_value when an uncaught exception (a failed assertion) ended the
    # script: exit 1 then, as it would have; else 0, skipping the teardown that may abort
    os._exit(1 if hasattr(sys, "last_value") else 0)


def worker_env() -> dict[str, str]:
    paths = [str(ALIAS), str(HERE), str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return {"PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}


def communicate(p: subprocess.Popen, peers: list[subprocess.Popen]) -> tuple[str, str]:
    """``p.communicate()`` with a time limit; on expiry every peer is killed and the output returned."""
    try:
        return p.communicate(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for q in peers:
            q.kill()
        out, err = p.communicate()
        return (out or "") + f"\n[killed after {WORKER_TIMEOUT_S} s: a worker hung]", err
