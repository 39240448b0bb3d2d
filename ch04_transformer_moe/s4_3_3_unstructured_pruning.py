"""Section 4.3.3: unstructured pruning: zero the smallest weights, and what it does (not) buy.

Global magnitude pruning with ``torch.nn.utils.prune`` (``global_unstructured`` with ``L1Unstructured``:
the weights with the smallest ``|w|`` across all linear layers together, so some layers lose more
than others) at sparsities from 0 to 90% of the project's trained LM (or ``--hf-path DIR``). For each
sparsity the script shows:

1. the validation loss and bits per byte (and a plot of loss against sparsity);
2. the storage of the pruned matrices on disk: dense fp32 (zeros and all) against CSR (the nonzero
   values, their column indices and the row pointers), both written as safetensors files;
3. the honest speed story: a pruned matrix kept dense multiplies exactly as slowly as before (the
   zeros are still multiplied); a CSR sparse matrix-multiply skips them but pays for its indexing, so
   the script times ``torch.sparse.mm`` (CSR with int32 indices, built once) against the dense
   product on one matrix at each sparsity, on one thread by default (``--threads``), and reports
   where, if anywhere, the sparse product starts to pay off on this machine.

    python -m ch04_transformer_moe.s4_3_3_unstructured_pruning
    python -m ch04_transformer_moe.s4_3_3_unstructured_pruning --sparsities 0 0.5 0.8 0.95
    python -m ch04_transformer_moe.s4_3_3_unstructured_pruning --quick

A reader sees the loss rise slowly and then sharply, CSR storage beat dense only past about 50%
sparsity (an fp32 value plus an int32 index costs twice a dense entry), the masked dense product
timed equal to the dense one, the crossover sparsity of CSR and ``unstructured_pruning.png``.
"""

from __future__ import annotations

import copy
import os

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import prune as torch_prune

from common.lm_source import add_source_args, evaluate_lm, load_source
from common.plotting import pyplot, save_figure
from common.prune import (
    global_magnitude_masks,
    layer_magnitude_masks,
    linear_weights,
    sparsity_of,
)
from common.runner import (
    checks_done,
    fraction,
    int_between,
    parse_args,
    positive_int,
    quick_or_full,
    run_script,
    script_parser,
)
from common.timing import paired_ratio, race

SPEED_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def prune_globally(model: nn.Module, sparsity: float) -> nn.Module:
    """A copy of ``model`` whose linear layers (the output head aside) are pruned by global magnitude
    with ``torch.nn.utils.prune``, the masks made permanent."""
    pruned = copy.deepcopy(model)
    head = getattr(pruned, "lm_head", None)
    targets = [(m, "weight") for m in pruned.modules() if isinstance(m, nn.Linear) and m is not head]
    if not targets:
        raise ValueError("the model has no nn.Linear layers to prune")
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    for module, name in targets:
        torch_prune.remove(module, name)  # weight = weight_orig * mask, for good
    return pruned


def storage_bytes(weights: dict[str, torch.Tensor], folder: str) -> tuple[int, int]:
    """(dense bytes, CSR bytes) of ``weights`` written as two safetensors files in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    dense_path, csr_path = os.path.join(folder, "dense.safetensors"), os.path.join(folder, "csr.safetensors")
    save_file({k: w.detach().contiguous().cpu() for k, w in weights.items()}, dense_path)
    csr = {}
    for k, w in weights.items():
        s = w.detach().cpu().to_sparse_csr()
        csr[f"{k}.values"] = s.values().contiguous()
        csr[f"{k}.col_indices"] = s.col_indices().to(torch.int32)
        csr[f"{k}.crow_indices"] = s.crow_indices().to(torch.int32)
    save_file(csr, csr_path)
    return os.path.getsize(dense_path), os.path.getsize(csr_path)


def to_csr(w: torch.Tensor) -> torch.Tensor:
    """``w`` in CSR with int32 indices, as the sparse kernel (MKL's on CPU) takes them: with torch's
    default int64 indices every product would first copy both index arrays to int32."""
    s = w.to_sparse_csr()
    crow, col = s.crow_indices().to(torch.int32), s.col_indices().to(torch.int32)
    return torch.sparse_csr_tensor(crow, col, s.values(), s.shape)


def matmul_race(n: int, tokens: int, sparsity: float, repeats: int, seed: int, threads: int) -> dict:
    """Time dense W @ X, the magnitude-pruned W kept dense @ X, and CSR(W) @ X for one (n, n) matrix,
    on ``threads`` threads (the process's setting is restored afterwards). The CSR matrix is built
    once, outside the timed calls."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g)
    x = torch.randn(n, tokens, generator=g)
    mask = layer_magnitude_masks({"w": w}, sparsity)["w"]
    w_pruned = w * mask
    w_csr = to_csr(w_pruned)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            times = race(
                {
                    "dense": lambda: w @ x,
                    "masked dense": lambda: w_pruned @ x,
                    "csr": lambda: torch.sparse.mm(w_csr, x),
                },
                repeats,
            )
    finally:
        torch.set_num_threads(before)
    return {
        "sparsity": sparsity,
        "masked_over_dense": paired_ratio(times["masked dense"], times["dense"]),
        "csr_over_dense": paired_ratio(times["csr"], times["dense"]),
    }


def plot(path: str, rows: list[dict], speed: list[dict]) -> None:
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(9, 3.6))
    a.plot([100 * r["sparsity"] for r in rows], [r["loss"] for r in rows], "o-")
    a.set(xlabel="sparsity (%)", ylabel="validation loss (nats/token)", title="Global magnitude pruning")
    b.plot([100 * r["sparsity"] for r in speed], [r["csr_over_dense"] for r in speed], "o-", label="CSR")
    b.plot(
        [100 * r["sparsity"] for r in speed],
        [r["masked_over_dense"] for r in speed],
        "s-",
        label="masked dense",
    )
    b.axhline(1.0, color="gray", linestyle="--")
    b.set(xlabel="sparsity (%)", ylabel="time / dense time", yscale="log", title="Matmul time against dense")
    b.legend()
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_source_args(parser)
    parser.add_argument(
        "--sparsities",
        type=fraction,
        nargs="+",
        default=None,
        help="fractions of weights removed, each in [0, 1) (default 0, 0.1, ..., 0.9)",
    )
    parser.add_argument(
        "--matrix",
        type=int_between(1, 16384),
        default=None,
        help="size n of the timed (n, n) matrix (default 2048, quick: 512)",
    )
    parser.add_argument(
        "--tokens", type=int_between(1, 16384), default=128, help="columns of the timed right-hand side"
    )
    parser.add_argument(
        "--eval-batches",
        type=positive_int,
        default=None,
        help="validation batches of 8 (default 16, quick: 4)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=None, help="timing rounds (default 15, quick: 5)"
    )
    parser.add_argument(
        "--threads",
        type=int_between(1, 1024),
        default=1,
        help="threads of the timed products (default 1: a per-core comparison; on a busy machine the "
        "threaded sparse kernel spins waiting for a core and its time says nothing about its work)",
    )
    args = parse_args(parser, argv)
    quick_or_full(args, sparsities=([0.0, 0.5, 0.9], [i / 10 for i in range(10)]), matrix=(512, 2048))
    quick_or_full(args, eval_batches=(4, 16), repeats=(5, 15))
    sparsities, n, eval_batches, repeats = args.sparsities, args.matrix, args.eval_batches, args.repeats
    source = load_source(parser, args)
    checks_done(args)
    print(f"model: {source.describe()}")

    print("\n1-2. global magnitude pruning of every linear layer (the output head kept)")
    print(f"   {'sparsity':>8} {'val loss':>9} {'bpb':>7} {'dense MB':>9} {'CSR MB':>8}")
    rows = []
    for s in sparsities:
        pruned = prune_globally(source.model, s)
        weights = linear_weights(pruned)
        dense_b, csr_b = storage_bytes(weights, os.path.join(args.out, f"weights-{round(100 * s)}"))
        row = {
            "sparsity": s,
            "measured": sparsity_of(weights.values()),
            **evaluate_lm(pruned, source.data, 8, eval_batches),
            "dense_bytes": dense_b,
            "csr_bytes": csr_b,
        }
        rows.append(row)
        print(
            f"   {100 * s:>7.0f}% {row['loss']:>9.4f} {row['bpb']:>7.4f} {dense_b / 1e6:>9.3f} "
            f"{csr_b / 1e6:>8.3f}"
        )
    # torch.nn.utils.prune picked what common.prune's global masks pick
    masks = global_magnitude_masks(linear_weights(source.model), sparsities[-1])
    agree = all(torch.equal(masks[k], weights[k] != 0) for k in masks)
    csr_wins = [r["sparsity"] for r in rows if r["csr_bytes"] < r["dense_bytes"]]
    print(
        f"   CSR files are smaller than dense from {100 * csr_wins[0]:.0f}% sparsity"
        if csr_wins
        else "   CSR files are never smaller than dense at these sparsities"
    )

    print(
        f"\n3. ({n}, {n}) @ ({n}, {args.tokens}) fp32 on {args.threads} thread(s), {repeats} "
        f"alternating rounds: time relative to the dense product"
    )
    print(f"   {'sparsity':>8} {'masked dense':>13} {'CSR':>8}")
    speed = []
    for s in SPEED_SPARSITIES:
        r = matmul_race(n, args.tokens, s, repeats, args.seed, args.threads)
        speed.append(r)
        print(f"   {100 * s:>7.0f}% {r['masked_over_dense']:>12.2f}x {r['csr_over_dense']:>7.2f}x")
    # the crossover: the lowest sparsity from which CSR stays faster at every higher one
    crossover = None
    for r in reversed(speed):
        if r["csr_over_dense"] >= 1.0:
            break
        crossover = r["sparsity"]
    print(
        f"   CSR beats dense from {100 * crossover:.0f}% sparsity on this machine"
        if crossover is not None
        else f"   CSR never beats dense here, up to {100 * SPEED_SPARSITIES[-1]:.0f}% sparsity"
    )
    plot(os.path.join(args.out, "unstructured_pruning.png"), rows, speed)

    figures = {"model": source.name, "torch_prune_equals_common_prune": agree}
    for r in rows:
        k = round(100 * r["sparsity"])
        figures.update(
            {
                f"val_loss_{k}": r["loss"],
                f"val_bpb_{k}": r["bpb"],
                f"dense_bytes_{k}": r["dense_bytes"],
                f"csr_bytes_{k}": r["csr_bytes"],
            }
        )
    for r in speed:
        k = round(100 * r["sparsity"])
        figures.update(
            {f"masked_over_dense_{k}": r["masked_over_dense"], f"csr_over_dense_{k}": r["csr_over_dense"]}
        )
    figures["csr_crossover_sparsity"] = crossover if crossover is not None else "none up to 0.99"
    figures["matmul_shape"] = f"({n}, {n}) @ ({n}, {args.tokens})"
    figures["matmul_threads"] = args.threads
    if not agree:
        raise AssertionError("torch.nn.utils.prune and common.prune chose different weights")
    return figures


if __name__ == "__main__":
    run_script(main)
