import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _release_output_folder_locks():
    """A script's main() called in a test holds its --out's lock (common.folder_lock) as a run would;
    the test's end gives it back, so later tests and their subprocesses may use the folder."""
    yield
    from common.folder_lock import release_all

    release_all()
