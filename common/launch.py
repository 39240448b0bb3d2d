"""Several processes, one job: the launcher's workers under torchrun or deepspeed, our own otherwise.

A section that needs N processes (data parallel, ZeRO, expert or tensor parallelism) writes its
per-process work as a module-level function of a :class:`~common.training.DistContext` and hands it
to :func:`run_workers`::

    from common.launch import run_workers

    def worker(ctx, steps):             # ctx.rank, ctx.world_size, ctx.device; the group is joined
        ...
        return {"loss": 1.23}           # anything picklable

    results = run_workers(worker, nproc=2, args=(200,), device="cpu")   # one result per rank

- Run plainly (``python -m chXX.script``), this process starts ``nproc`` fresh worker processes on
  this machine, joins them into one process group (gloo on CPU, nccl on CUDA) over a free local port,
  and waits. A worker that raises or dies ends the others at once (SIGTERM, then SIGKILL after a
  grace period) and :class:`WorkerError` names the failing rank with its traceback; a job that
  outlives ``timeout`` seconds is ended the same way and raises :class:`WorkerTimeout`. So a
  collective that would wait forever for a dead peer never hangs the script.
- Started by ``torchrun --nproc_per_node N -m chXX.script`` or ``deepspeed --num_gpus N
  chXX/script.py`` (``RANK`` and ``WORLD_SIZE`` are in the environment), this process *is* one
  worker: ``worker`` runs here, as the rank the launcher gave it, in the launcher's group (several
  nodes included), and every rank gets the list of all ranks' results. ``nproc`` is then ignored:
  the launcher chose the world size.

Either way the caller gets ``[result of rank 0, result of rank 1, ...]``; :func:`is_main` tells
the one process that should print and write files.

Nothing outlives the job.  A spawned worker watches its parent and ends at once when the parent is
gone (killed with SIGKILL included), so no orphan finishes the work on its own.  DeepSpeed's CPU
all-reduce maps one shared-memory file per rank (``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
<port>_<rank>``, 69 MB each in deepspeed 0.19.8) and never removes them: the parent removes those of its
job's port when the workers have ended, a worker whose parent vanished removes its own, and under a
launcher every rank removes its own once all ranks are past the work (a mapped file may be unlinked:
the mapping stays until the process ends).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import socket
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL when ending workers
SHM_DIR = Path("/dev/shm")
ORPHAN_EXIT_CODE = 143  # a worker whose parent is gone ends as SIGTERM would end it


def deepspeed_shm_files(addr: str, port: int | str, rank: int | None = None) -> list[Path]:
    """The shared-memory files DeepSpeed's CPU all-reduce made for the job at ``addr:port`` (one per
    rank; only ``rank``'s when given), named as ``deepspeed/ops/csrc/cpu/comm/shm.cpp`` names them."""
    if not hasattr(os, "getuid") or not SHM_DIR.is_dir():  # Windows: DeepSpeed has no shm kernel there
        return []
    which = "*" if rank is None else str(rank)
    return sorted(SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{which}"))


def remove_deepspeed_shm(addr: str, port: int | str, rank: int | None = None) -> int:
    """Remove the files :func:`deepspeed_shm_files` finds; returns how many there were."""
    found = deepspeed_shm_files(addr, port, rank)
    for path in found:
        path.unlink(missing_ok=True)
    return len(found)


def _end_with_parent(sentinel, port: int, rank: int) -> None:
    """In a worker's thread: wait until the parent process is gone, remove this rank's DeepSpeed
    buffer and end the worker at once (its peers do the same)."""
    multiprocessing.connection.wait([sentinel])
    remove_deepspeed_shm("127.0.0.1", port, rank)
    os._exit(ORPHAN_EXIT_CODE)


def _deepspeed_env() -> None:
    """Under torchrun, give DeepSpeed the ``LOCAL_SIZE`` its own launcher would set. On a CPU DeepSpeed
    all-reduces through a shared-memory kernel that it sets up only when ``LOCAL_SIZE`` is the number of
    local processes; without it deepspeed 0.19.8 still calls the kernel and the process dies of SIGSEGV
    (DeepSpeed issue #7625)."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_SIZE", os.environ["LOCAL_WORLD_SIZE"])


def show_each_warning_once() -> None:
    """From now on this process prints each distinct warning (category and text) once.

    Python's own "once per place" is undone whenever code changes the warning filters, which DeepSpeed
    and torch do around their calls: DeepSpeed's ZeRO then printed torch's deprecation of
    ``all_gather_into_tensor`` at every step of every rank. Workers install this; nothing is hidden,
    repeats are.
    """
    shown: set[tuple[type, str]] = set()
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if (category, str(message)) not in shown:
            shown.add((category, str(message)))
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show


class WorkerError(RuntimeError):
    """A worker raised or died; ``rank`` is the first one that did."""

    def __init__(self, rank: int, detail: str):
        self.rank = rank
        super().__init__(f"worker rank {rank} failed:\n{detail.rstrip()}")


class WorkerTimeout(WorkerError):
    """The workers did not finish within the time limit (a hung collective, a deadlock)."""


def launched() -> bool:
    """True when a launcher (torchrun, deepspeed) started this process as one rank of a job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def job_size(nproc: int) -> int:
    """How many ranks the job has: the launcher's ``WORLD_SIZE`` when launched, else ``nproc`` (the
    workers :func:`run_workers` will start), so a script can check its flags before any worker starts."""
    return int(os.environ["WORLD_SIZE"]) if launched() else nproc


def is_main() -> bool:
    """True in the process that should print and write: rank 0 under a launcher, else this one."""
    return int(os.environ.get("RANK", "0")) == 0


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (for a rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, nproc: int, port: int, device: str, threads: int, fn, args, results) -> None:
    """Entry point of one spawned worker: its rank's environment, then ``fn``; the outcome to ``results``.

    The outcome is sent before the worker leaves the group, so that a worker that raised is heard
    before its peers fail on the connection it closes.
    """
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        LOCAL_SIZE=str(nproc),  # DeepSpeed's name for it, which its launcher sets (see _deepspeed_env)
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    parent = multiprocessing.parent_process()
    if parent is not None:  # spawned: the sentinel is readable once the parent has ended, however
        threading.Thread(target=_end_with_parent, args=(parent.sentinel, port, rank), daemon=True).start()
    import torch
    import torch.distributed as dist

    from common.training import setup_distributed

    show_each_warning_once()
    try:
        if threads:
            torch.set_num_threads(threads)  # the workers share this machine's cores
        ctx = setup_distributed(device)
        # pickled here, by value: torch's queue would pass tensors as shared memory, which vanishes
        # when this worker exits before the parent has read them
        results.put((rank, True, pickle.dumps(fn(ctx, *args))))
    except BaseException:  # noqa: BLE001 - the parent reports whatever ended this worker
        results.put((rank, False, traceback.format_exc()))
        time.sleep(0.5)  # let the parent hear this rank before its peers fail on the closed link
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _end(processes) -> None:
    """SIGTERM every live worker, then SIGKILL those still alive after the grace period."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _poll(processes, results, outcome: dict, timeout: float, settle: bool = False) -> dict:
    """Move finished results into ``outcome``; return ``{rank: (said_why, detail)}`` of failed workers.

    ``settle`` keeps listening for the whole ``timeout`` (after a first failure) instead of returning
    at the first quiet moment.
    """
    failures: dict[int, tuple[bool, str]] = {}
    end = time.monotonic() + timeout
    while True:
        try:
            rank, ok, value = results.get(timeout=max(0.01, end - time.monotonic()))
        except queue.Empty:
            break
        if ok:
            outcome[rank] = pickle.loads(value)
        else:
            failures[rank] = (True, value)
        if not settle and not failures:
            return failures
    for rank, p in enumerate(processes):
        # a worker that exited without a word (killed, os._exit, a crash in native code)
        if rank not in outcome and rank not in failures and p.exitcode not in (None, 0):
            how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
            failures[rank] = (False, f"the process ended with {how} and no result")
    return failures


def run_workers(
    fn: Callable,
    nproc: int = 2,
    args: Sequence = (),
    *,
    device: str = "cpu",
    timeout: float = 600.0,
) -> list:
    """Run ``fn(ctx, *args)`` on every rank of a process group; return the results in rank order.

    See the module docstring for the two modes. ``fn`` must be a module-level function and ``args``
    and its results picklable (workers are fresh processes). On a CPU each spawned worker gets
    ``cores // nproc`` threads (at least one), so that the workers share the cores instead of
    oversubscribing them.
    """
    if launched():
        import torch.distributed as dist

        from common.training import setup_distributed

        show_each_warning_once()
        _deepspeed_env()
        ctx = setup_distributed(device)
        result = fn(ctx, *args)
        gathered: list = [None] * ctx.world_size
        dist.all_gather_object(gathered, result)  # every rank is past its DeepSpeed set-up now
        remove_deepspeed_shm(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), ctx.rank)
        return gathered
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < nproc:
            raise ValueError(
                f"{nproc} workers on cuda need {nproc} GPUs, torch sees {torch.cuda.device_count()}"
            )
    import torch.multiprocessing as mp

    threads = 0 if device.startswith("cuda") else max(1, (os.cpu_count() or 1) // nproc)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    processes = [
        ctx.Process(
            target=_worker_main,
            args=(rank, nproc, port, device, threads, fn, tuple(args), results),
            name=f"worker-{rank}",
        )
        for rank in range(nproc)
    ]
    outcome: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        for p in processes:
            p.start()
        while len(outcome) < nproc:
            failures = _poll(processes, results, outcome, timeout=0.2)
            if failures:
                # a dead peer makes the others' collectives fail too: wait a moment for every rank's
                # word, then blame a rank that died silently, else the first that raised
                failures.update(_poll(processes, results, outcome, timeout=1.0, settle=True))
                silent = [r for r, (said, _) in failures.items() if not said]
                rank = silent[0] if silent else next(iter(failures))
                others = "".join(
                    f"\n(rank {r} failed too: {d.strip().splitlines()[-1]})"
                    for r, (_, d) in failures.items()
                    if r != rank
                )
                raise WorkerError(rank, failures[rank][1] + others)
            if time.monotonic() > deadline:
                waiting = [r for r in range(nproc) if r not in outcome]
                detail = f"no result after {timeout:g} s from rank(s) {waiting}; all ended"
                raise WorkerTimeout(waiting[0], detail)
        for p in processes:
            p.join(GRACE_SECONDS)
    finally:
        _end(processes)
        results.close()
        remove_deepspeed_shm("127.0.0.1", port)
    return [outcome[r] for r in range(nproc)]
