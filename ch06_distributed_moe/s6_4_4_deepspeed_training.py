"""Section 6.4.4: training an MoE Transformer with ``deepspeed.initialize``: ZeRO, MoE parameter groups,
expert parallelism over two processes.

The model: pre-LN blocks of self-attention and DeepSpeed's ``MoE`` feed-forward (experts of
``d_model -> d_ff -> d_model`` with GELU, top-2, ``ep_size`` = the number of processes, so each
process holds ``experts / ep_size`` of every layer's experts), trained on the book's setup: random
inputs of shape (32, 8, 512) regressed onto random targets (MSE plus the gates' ``l_aux``) for 5
epochs.  The book's mean loss fell 1.784 -> 1.001; ours is printed beside it.

What DeepSpeed needs for MoE, shown in the code below:

* ``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``: the expert parameters
  go into their own optimizer groups (``moe: True``), because ZeRO reduces their gradients over the
  expert-data-parallel group, not over every process;
* ``deepspeed.initialize(model=..., optimizer=..., config=...)`` with ZeRO stage 1 or 2 (here a torch
  AdamW: DeepSpeed's fused Adam needs CUDA), which creates the expert-parallel groups
  (``ep_size_2``) and returns the engine: ``engine(x)``, ``engine.backward(loss)``, ``engine.step()``.

    python -m ch06_distributed_moe.s6_4_4_deepspeed_training
    python -m ch06_distributed_moe.s6_4_4_deepspeed_training --quick
    python -m ch06_distributed_moe.s6_4_4_deepspeed_training --resume       # after Ctrl-C or SIGTERM
    python -m ch06_distributed_moe.s6_4_4_deepspeed_training --zero-stage 1 --nproc 2
    deepspeed --num_gpus 2 ch06_distributed_moe/s6_4_4_deepspeed_training.py --device cuda

A reader sees the optimizer groups, each epoch's mean loss and the first -> last change beside the
book's.

No lost work: every process holds its own experts, so after every epoch each rank writes its own
checkpoint (``--out``/checkpoint/epoch{N}/rank{r}: weights as safetensors, the AdamW state of its ZeRO
partition, the RNG, the epoch losses and the run's settings) with
:func:`common.checkpoint.save_checkpoint`, atomically; a rank removes its shard of the previous epoch
only once every rank has saved the new one, so a machine that dies between two ranks' saves leaves the
last epoch complete on all of them.  Ctrl-C or SIGTERM reaches the parent, which ends the workers
(:func:`common.launch.run_workers`), records the last epoch every rank saved and prints the
``--resume`` command; an interruption loses at most the epoch under way.  ``--resume`` refuses, before
any worker starts, settings other than the checkpoint's (all but ``--epochs``) and an ``--epochs`` the
checkpoint has reached.  (DeepSpeed's own ``engine.save_checkpoint`` is not used: its
``load_checkpoint`` unpickles with ``weights_only=False``.)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from common import checkpoint as ckpt
from common.env import require, torch_dtype
from common.errors import UsageError
from common.fmoe.expert_parallel import check_ep_size
from common.launch import is_main, job_size, run_workers
from common.models.attention import MultiHeadAttention
from common.runner import (
    add_dtype_flag,
    checks_done,
    count_int,
    float_between,
    int_between,
    non_negative_float,
    parse_args,
    positive_float,
    positive_int,
    process_count,
    quick_or_full,
    run_script,
    script_parser,
    width_int,
)

BOOK_LOSS = (1.784, 1.001)


class DSMoEBlock(nn.Module):
    """Pre-LN block: self-attention, then DeepSpeed's MoE feed-forward; returns (x, l_aux)."""

    def __init__(self, d_model, n_head, experts, d_ff, ep_size, capacity_factor):
        from deepspeed.moe.layer import MoE

        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_head)
        expert = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.moe = MoE(
            d_model,
            expert,
            num_experts=experts,
            ep_size=ep_size,
            k=2,
            capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor,
        )

    def forward(self, x):  # (batch, seq, d_model)
        h = self.norm1(x)
        x = x + self.attn(h, h, h)
        out, l_aux, _ = self.moe(self.norm2(x))
        return x + out, l_aux


class DSMoETransformer(nn.Module):
    def __init__(self, layers, d_model, n_head, experts, d_ff, ep_size, capacity_factor):
        super().__init__()
        self.blocks = nn.ModuleList(
            DSMoEBlock(d_model, n_head, experts, d_ff, ep_size, capacity_factor) for _ in range(layers)
        )

    def forward(self, x):
        aux = x.new_zeros(())
        for block in self.blocks:
            x, l_aux = block(x)
            aux = aux + l_aux
        return x, aux


@contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM back until the block ends (they are delivered then).

    The ranks' shards must hold the same epoch: a rank ended between its own save and its peer's would
    leave a set that cannot resume.  Within the block, between two barriers, every rank saves.
    """
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _worker(ctx, a):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    deepspeed.init_distributed(dist_backend="nccl" if ctx.device.startswith("cuda") else "gloo")
    torch.manual_seed(a.seed)
    model = DSMoETransformer(
        a.layers, a.d_model, a.heads, a.experts, a.d_ff, ctx.world_size, a.capacity_factor
    )
    # ZeRO turns the engine's parameters into views of one flat buffer, which safetensors refuses to
    # save; the checkpoint is written from this copy with tensors of its own
    snapshot = DSMoETransformer(
        a.layers, a.d_model, a.heads, a.experts, a.d_ff, ctx.world_size, a.capacity_factor
    )
    dtype = torch_dtype(a.dtype)
    model.to(dtype)  # the module's buffers too (DeepSpeed's bf16 casts only the parameters)
    state = None
    if a.resume_epoch is not None:  # weights before the engine copies them
        state = ckpt.load_checkpoint(shard_dir(a.ckpt_dir, a.resume_epoch, ctx.rank), model)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "parameters"}
    )
    optimizer = torch.optim.AdamW(groups, lr=a.lr)
    config = {
        "train_batch_size": a.batch,
        "train_micro_batch_size_per_gpu": a.batch // ctx.world_size,
        "zero_optimization": {"stage": a.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, not DeepSpeed's CUDA-only fused Adam
        "bf16": {"enabled": a.dtype == "bf16"},  # bf16 weights and gradients, fp32 master copy and moments
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    base_optimizer = engine.optimizer.optimizer  # the AdamW that ZeRO steps on this rank's partition
    epochs = []
    if state is not None:
        base_optimizer.load_state_dict(state["optimizer"])
        ckpt.restore_rng_state(state["rng"])
        epochs = state["extra"]["epochs"]
    group_info = [
        (g.get("name", "?"), bool(g.get("moe", False)), sum(p.numel() for p in g["params"])) for g in groups
    ]
    g = torch.Generator().manual_seed(a.seed + 1)  # the same data set on every rank
    x = torch.randn(a.batches, a.batch, a.seq, a.d_model, generator=g)
    y = torch.randn(a.batches, a.batch, a.seq, a.d_model, generator=g)
    rows = slice(ctx.rank * a.batch // ctx.world_size, (ctx.rank + 1) * a.batch // ctx.world_size)
    start = time.perf_counter()
    for _ in range(len(epochs), a.epochs):
        losses = []
        for xb, yb in zip(x, y):
            out, aux = engine(xb[rows].to(engine.device, dtype))
            mse = F.mse_loss(out.float(), yb[rows].to(engine.device))
            engine.backward(mse + a.aux_coef * aux)
            engine.step()
            mean = mse.detach().clone()
            torch.distributed.all_reduce(mean)
            losses.append(mean.item() / ctx.world_size)
        epochs.append(sum(losses) / len(losses))
        with signals_held():  # all ranks save this epoch, or none does
            torch.distributed.barrier()
            snapshot.load_state_dict(engine.module.state_dict())
            shard = shard_dir(
                a.ckpt_dir, len(epochs), ctx.rank
            )  # this rank's experts and optimizer partition
            extra = {"epochs": epochs, "settings": run_settings(a, ctx.world_size)}
            ckpt.save_checkpoint(shard, snapshot, base_optimizer, len(epochs), extra=extra)
            torch.distributed.barrier()  # the new epoch is complete on every rank: the older shards may go
            for old in saved_epochs(a.ckpt_dir):
                if old != len(epochs):
                    remove_shard(a.ckpt_dir, old, ctx.rank)
    return {
        "epochs": epochs,
        "groups": group_info,
        "seconds": time.perf_counter() - start,
        "local_experts": engine.module.blocks[0].moe.num_local_experts,
        "resumed_from": None if state is None else state["step"],
    }


SETTINGS = (
    "zero_stage",
    "layers",
    "d_model",
    "heads",
    "experts",
    "d_ff",
    "capacity_factor",
    "batch",
    "seq",
    "batches",
    "lr",
    "aux_coef",
    "seed",
    "dtype",
)  # what a resumed run must share with its checkpoint (all but --epochs), with the world size


def run_settings(args, world: int) -> dict:
    return {"world_size": world, **{k: getattr(args, k) for k in SETTINGS}}


def shard_dir(ckpt_dir: str, epoch: int, rank: int) -> str:
    return os.path.join(ckpt_dir, f"epoch{epoch}", f"rank{rank}")


def saved_epochs(ckpt_dir: str) -> list[int]:
    """The epochs with a folder in ``ckpt_dir``, newest first (complete on every rank or not)."""
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    return sorted((int(m.group(1)) for n in names if (m := re.fullmatch(r"epoch(\d+)", n))), reverse=True)


def remove_shard(ckpt_dir: str, epoch: int, rank: int) -> None:
    """Remove ``rank``'s shard of ``epoch``, and the epoch's folder once no rank's shard is left."""
    shutil.rmtree(shard_dir(ckpt_dir, epoch, rank), ignore_errors=True)
    try:
        os.rmdir(os.path.join(ckpt_dir, f"epoch{epoch}"))
    except OSError:  # another rank's shard is still there (or that rank removed the folder first)
        pass


def saved_epoch(ckpt_dir: str, world: int) -> int | None:
    """The newest epoch that every rank's shard in ``ckpt_dir`` holds, or None where there is none."""
    for epoch in saved_epochs(ckpt_dir):
        if all(ckpt.has_checkpoint(shard_dir(ckpt_dir, epoch, r)) for r in range(world)):
            return epoch
    return None


def check_resume(args, world: int) -> int:
    """The epoch to resume from; a one-line UsageError where the checkpoint cannot continue this run."""
    epoch = saved_epoch(args.ckpt_dir, world)
    if epoch is None:
        raise UsageError(f"--resume: no checkpoint of all {world} ranks at one epoch in {args.ckpt_dir}")
    saved = (ckpt.read_state(shard_dir(args.ckpt_dir, epoch, 0)).get("extra") or {}).get("settings") or {}
    for key, value in run_settings(args, world).items():
        if saved.get(key) != value:
            flag = "--nproc" if key == "world_size" else "--" + key.replace("_", "-")
            raise UsageError(
                f"--resume: the checkpoint in {args.ckpt_dir} was trained with {flag} {saved.get(key)!r}, "
                f"this run asks for {value!r}; keep it, or use another --out"
            )
    if args.epochs <= epoch:
        raise UsageError(
            f"--resume: the checkpoint in {args.ckpt_dir} is at epoch {epoch}, so --epochs {args.epochs} "
            f"leaves nothing to train; ask for more than {epoch}"
        )
    return epoch


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    parser.add_argument("--nproc", type=process_count, default=2, help="worker processes (ep_size)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[1, 2], help="ZeRO stage")
    parser.add_argument("--layers", type=int_between(1, 1024), default=2, help="Transformer blocks")
    parser.add_argument(
        "--d-model",
        type=width_int,
        default=None,
        help="model width (the book's input is 32x8x512; default 512, quick 64)",
    )
    parser.add_argument(
        "--heads", type=int_between(1, 4096), default=None, help="attention heads (default 8, quick 4)"
    )
    parser.add_argument(
        "--experts", type=int_between(1, 4096), default=4, help="experts per MoE layer (in total)"
    )
    parser.add_argument(
        "--d-ff", type=width_int, default=None, help="hidden width of each expert (default 1024, quick 128)"
    )
    parser.add_argument(
        "--capacity-factor",
        type=float_between(0, 1024, low_open=True),
        default=1.25,
        help="DeepSpeed's capacity factor",
    )
    parser.add_argument("--batch", type=count_int, default=32, help="global batch (sequences)")
    parser.add_argument("--seq", type=int_between(1, 1 << 16), default=8, help="tokens per sequence")
    parser.add_argument(
        "--batches",
        type=int_between(1, 1 << 16),
        default=None,
        help="batches of random data (default 10; quick 4)",
    )
    parser.add_argument("--epochs", type=positive_int, default=None, help="epochs (default 5; quick 3)")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate")
    parser.add_argument(
        "--aux-coef", type=non_negative_float, default=0.01, help="weight of the gates' l_aux"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    args = parse_args(parser, argv)
    args.ckpt_dir = os.path.join(args.out, "checkpoint")
    quick_or_full(args, d_model=(64, 512), d_ff=(128, 1024), heads=(4, 8))
    if args.batches is None:
        args.batches = 4 if args.quick else 10
    if args.epochs is None:
        args.epochs = 3 if args.quick else 5
    world = job_size(args.nproc)
    try:
        check_ep_size(world, world)
        if args.experts % world or args.batch % world:
            raise ValueError(
                f"--experts {args.experts} and --batch {args.batch} must divide by {world} processes"
            )
        if args.d_model % args.heads:
            raise ValueError(f"--d-model {args.d_model} must divide by --heads {args.heads}")
    except ValueError as e:
        parser.error(str(e))
    args.resume_epoch = check_resume(args, world) if args.resume else None
    require("deepspeed")  # or skip with the reason
    checks_done(args)
    device = "cuda" if args.device == "cuda" else "cpu"
    try:
        results = run_workers(_worker, args.nproc, (args,), device=device, timeout=900)
    except KeyboardInterrupt as e:  # the workers are ended by now; their last complete epoch remains
        epoch = saved_epoch(args.ckpt_dir, world)
        if epoch is not None and is_main():
            e.checkpoint_dir, e.step = args.ckpt_dir, epoch
        raise
    if not is_main():
        return {}
    r = results[0]
    print(
        f"\nDeepSpeed engine: ZeRO stage {args.zero_stage}, ep_size {world}, {r['local_experts']} of "
        f"{args.experts} experts on each process, input ({args.batch}, {args.seq}, {args.d_model})"
    )
    print("optimizer groups (split_params_into_different_moe_groups_for_optimizer):")
    for name, moe, n in r["groups"]:
        print(f"   {name:<40} moe={moe!s:<5} {n:>10,d} parameters on this process")
    print("\nepoch  mean MSE")
    for i, loss in enumerate(r["epochs"]):
        print(f"{i + 1:5d}  {loss:.3f}")
    first, last = r["epochs"][0], r["epochs"][-1]
    book = 100 * (BOOK_LOSS[1] / BOOK_LOSS[0] - 1)
    print(
        f"\nmean loss, first epoch -> last: ours {first:.3f} -> {last:.3f} "
        f"({100 * (last / first - 1):+.0f}%), "
        f"book {BOOK_LOSS[0]} -> {BOOK_LOSS[1]} ({book:+.0f}%); {r['seconds']:.1f} s of training"
        + ("" if r["resumed_from"] is None else f" after resuming at epoch {r['resumed_from']}")
    )
    print(f"checkpoint (one folder per rank): {args.ckpt_dir}")
    return {
        "zero_stage": args.zero_stage,
        "ep_size": world,
        "first_epoch_loss": first,
        "last_epoch_loss": last,
        "loss_change_pct": 100 * (last / first - 1),
        "train_seconds": r["seconds"],
        "resumed_from": r["resumed_from"],
    }


if __name__ == "__main__":
    run_script(main)
