"""GPTQModel as an anchor: the same model quantised by its GPTQ or AWQ, and its codes beside ours.

GPTQModel (ModelCloud) is an optional install (``requirements-anchors.txt``); the chapter 7.4.1 scripts
run it where it imports.  It loads a Hugging Face folder (``LMSource.hf_folder``), quantises it on the
token windows it is given and saves a checkpoint, which :mod:`common.quant_checkpoints` reads back into
our weights, so that its perplexity is measured by our evaluation and its codes compared with ours.
GPTQModel prints progress tables and writes a ``logs/`` folder into the working directory: both go
to ``out`` (its log file beside the checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from common.env import import_status


def library_status(log_path: str, names: tuple[str, ...] = ("auto_gptq", "gptqmodel")) -> dict:
    """``{module: "imports" or why not}`` (:func:`common.env.import_status`); GPTQModel's banner and its
    libraries' notes while it imports go to ``log_path``.  On a CPU GPTQModel starts as many workers
    as ``GPTQMODEL_CPU_WORKERS`` says, and refuses more than the cores torch uses: set here, before its
    import, unless the caller set it."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, torch.get_num_threads())))
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return {name: import_status(name) for name in names}


def quantize_with_gptqmodel(
    hf_folder: str, config, windows: torch.Tensor, folder: str, log_path: str, dtype: torch.dtype
) -> float:
    """GPTQModel loads ``hf_folder`` in ``dtype``, quantises it with ``config`` (a ``QuantizeConfig`` or
    ``AWQConfig``) on ``windows`` (n, T) and saves the checkpoint to ``folder``; returns the seconds.
    Its output goes to ``log_path``."""
    from gptqmodel import GPTQModel

    start = time.perf_counter()
    hf_folder, folder, log_path = (os.path.abspath(p) for p in (hf_folder, folder, log_path))
    here = os.getcwd()
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        os.chdir(os.path.dirname(log_path))  # its own logs/ folder lands beside its log
        try:
            qmodel = GPTQModel.load(hf_folder, config, device="cpu", dtype=dtype)
            calibration = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in windows]
            qmodel.quantize(calibration, batch_size=16)
            qmodel.save(folder)
        finally:
            os.chdir(here)
    print(f"GPTQModel's own log (its progress tables): {log_path}")
    return time.perf_counter() - start


def code_agreement(ours: dict, theirs: dict) -> tuple[float, float]:
    """Share of equal codes over every block linear, and over the first block's (whose inputs the two
    runs share exactly; later blocks see the earlier blocks as each run quantised them)."""

    def share(names):
        same = sum(int((ours[n].codes == theirs[n].codes).sum()) for n in names)
        return same / sum(ours[n].codes.numel() for n in names)

    return share(list(ours)), share([n for n in ours if n.startswith("blocks.0.")])
