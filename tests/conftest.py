import os
import signal
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")
# A suite started in the background by a non-interactive shell (`pytest ... &`) inherits SIGINT ignored,
# and so would every script it starts: Python then installs no KeyboardInterrupt handler and the Ctrl-C
# tests wait out their timeouts (seen: three of them, and their scripts left running). Give it back; the
# scripts themselves keep respecting an ignored SIGINT, as Unix programs should.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _release_output_folder_locks():
    """A script's main() called in a test holds its --out's lock (common.folder_lock) as a run would;
    the test's end gives it back, so later tests and their subprocesses may use the folder."""
    yield
    from common.folder_lock import release_all

    release_all()
