"""Section 4.3.2: training the decoder LM with DeepSpeed ZeRO, against plain PyTorch DDP.

ZeRO (Rajbhandari et al., 2020) removes the copies that data parallelism keeps on every rank. With
Adam in mixed precision each parameter costs 2 bytes (16-bit weight) + 2 (16-bit gradient) + K = 12
(fp32 master weight, momentum and variance); over N ranks:

- stage 0 (plain data parallel): (2 + 2 + K)·Ψ bytes per rank;
- stage 1 partitions the optimizer state: 2Ψ + 2Ψ + KΨ/N;
- stage 2 also the gradients:             2Ψ + (2 + K)Ψ/N;
- stage 3 also the parameters:            (2 + 2 + K)Ψ/N.

The script trains a small decoder LM on the embedded corpus over two processes (``--nproc``; gloo on
a CPU, nccl on GPUs) with ``deepspeed.initialize`` at ZeRO stages 0, 1, 2 and 3, and with
``torch.nn.parallel.DistributedDataParallel``, from the same initial weights on the same global
batches, with torch's AdamW. It shows:

1. the loss curves: every ZeRO stage follows DDP's (max |difference| per stage, and a plot);
2. each rank's optimizer-state bytes (Adam's two moments, plus the fp32 master partition DeepSpeed
   keeps) measured from the optimizer against the formula: in fp32 (the loss comparison) and in bf16
   mixed precision (the paper's case, K = 12: bf16 weights, fp32 master and moments);
3. fp16 ZeRO-1 where DeepSpeed accepts it (a GPU, or a CPU whose oneDNN has fp16 kernels:
   ``torch.ops.mkldnn._is_mkldnn_fp16_supported()``, e.g. Sapphire Rapids): bytes per rank, final
   loss and the steps its dynamic loss scaler skipped; where DeepSpeed refuses fp16 (most CPUs), its
   message. What cannot run on a CPU and why: DeepSpeed's own Adam kernels (FusedAdam needs CUDA;
   DeepSpeedCPUAdam builds a C++ extension at first use), so the optimizer is torch's AdamW handed
   to ``deepspeed.initialize``.

    python -m ch04_transformer_moe.s4_3_2_deepspeed
    python -m ch04_transformer_moe.s4_3_2_deepspeed --nproc 2 --steps 60
    torchrun --nproc_per_node 2 -m ch04_transformer_moe.s4_3_2_deepspeed
    deepspeed --num_gpus 2 ch04_transformer_moe/s4_3_2_deepspeed.py
    python -m ch04_transformer_moe.s4_3_2_deepspeed --quick

A reader sees a table of stage / max loss difference from DDP / bytes per rank / formula, the
bf16 table, the fp16 run or DeepSpeed's refusal, and ``zero_loss_curves.png``.  The runs keep no
checkpoint: each is a few dozen steps (seconds; the whole script under a minute on 2 CPU cores), so a
stopped run is rerun, not resumed (chapter 6.4.4's DeepSpeed training is the one that resumes).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from common.launch import is_main, run_workers
from common.plotting import pyplot, save_figure
from common.runner import (
    checks_done,
    count_int,
    int_between,
    parse_args,
    positive_float,
    positive_int,
    process_count,
    quick_or_full,
    run_script,
    script_parser,
)

STAGES = (0, 1, 2, 3)
LR = 3e-3
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _data(context: int):
    """The embedded corpus in the "test" LM's vocabulary, in windows of ``context`` tokens (a UsageError
    where the text is too short for them)."""
    from common.data import TokenData, get_tokenizer, load_corpus
    from common.pretrained import SPECS

    text = load_corpus()
    return TokenData.from_text(
        text, get_tokenizer(SPECS["test"]["vocab_size"], text=text), context_length=context
    )


def _build(seed: int, context: int):
    """The model and its training data: the "test" LM's architecture, fresh."""
    from common.models.decoder import DecoderConfig, DecoderLM
    from common.pretrained import SPECS

    spec = SPECS["test"]
    data = _data(context)
    torch.manual_seed(seed)
    model = DecoderLM(
        DecoderConfig(vocab_size=spec["vocab_size"], **{**spec["model"], "context_length": context})
    )
    return model, data


def optimizer_bytes(optimizer) -> tuple[int, int]:
    """(Adam moment bytes, fp32 master-partition bytes) that this rank's optimizer holds."""
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the client optimizer
    moments = sum(
        t.numel() * t.element_size()
        for state in inner.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    masters = getattr(optimizer, "single_partition_of_fp32_groups", None)  # stages 1 and 2
    if masters is None:
        masters = getattr(optimizer, "fp32_partitioned_groups_flat", [])  # stage 3
    return moments, sum(t.numel() * t.element_size() for t in masters)


def _train(ctx, mode: str, stage: int, dtype: str, steps: int, micro: int, seed: int, context: int) -> dict:
    """One run on this rank: ``mode`` "ddp" or "zero"; returns the global loss per step and the bytes."""
    import torch.distributed as dist

    model, data = _build(seed, context)
    model.to(ctx.device)
    if dtype in HALF:
        model.to(HALF[dtype])  # the module's buffers too (DeepSpeed's bf16 and fp16 cast only the parameters)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        engine = DDP(
            model, device_ids=[torch.device(ctx.device).index] if ctx.device.startswith("cuda") else None
        )
    else:
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,  # torch's AdamW, handed in
            "bf16": {"enabled": dtype == "bf16"},
            "fp16": {"enabled": dtype == "fp16"},
        }
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    sampler = torch.Generator().manual_seed(seed + 1)
    rows = slice(ctx.rank * micro, (ctx.rank + 1) * micro)
    losses = []
    for _ in range(steps):
        x, y = data.get_batch("train", micro * ctx.world_size, generator=sampler, rows=rows)
        x, y = x.to(ctx.device), y.to(ctx.device)
        logits = engine(x)[0]  # (batch, seq, vocab)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        if mode == "ddp":
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            engine.backward(loss)
            engine.step()
        global_loss = loss.detach().float().clone()
        dist.all_reduce(global_loss, op=dist.ReduceOp.AVG)
        losses.append(global_loss.item())
    moments, master = optimizer_bytes(optimizer)
    out = {"losses": losses, "moments": moments, "master": master, "params": params}
    if dtype == "fp16":  # DeepSpeed's dynamic loss scaler skips the steps whose gradients overflowed
        out.update(skipped=engine.skipped_steps, loss_scale=float(optimizer.loss_scale))
    return out


def worker(ctx, runs: list[tuple[str, int, str]], steps: int, micro: int, seed: int, context: int) -> dict:
    """Every run in turn on this rank; a run that DeepSpeed refuses at set-up records its message."""
    out = {}
    for mode, stage, dtype in runs:
        key = f"{mode}-{stage}-{dtype}"
        try:
            out[key] = _train(ctx, mode, stage, dtype, steps, micro, seed, context)
        except ValueError as e:  # raised by deepspeed.initialize's checks, on every rank alike
            out[key] = {"refused": str(e).strip().splitlines()[-1]}
    return out


def formula(stage: int, params: int, nproc: int, mixed: bool) -> int:
    """Optimizer bytes per rank (Adam): K = 12 (fp32 master + two moments) in mixed precision; in fp32
    the weights are their own master copy (K = 8) without partitioning, and ZeRO keeps an fp32
    partition beside them (K = 12 again)."""
    if stage == 0:
        return (12 if mixed else 8) * params
    return 12 * params // nproc


def plot(path: str, curves: dict) -> None:
    fig, ax = pyplot().subplots(figsize=(5.5, 3.8))
    for (name, losses), style in zip(curves.items(), ["k-", "o", "s", "^", "x"]):
        ax.plot(range(1, len(losses) + 1), losses, style, label=name, markersize=4, fillstyle="none")
    ax.set(xlabel="step", ylabel="training loss", title="ZeRO stages against DDP (fp32)")
    ax.legend()
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--nproc", type=process_count, default=2, help="processes when run plainly (a launcher decides)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="training steps per run (default 40, quick: 6)"
    )
    parser.add_argument("--micro-batch", type=count_int, default=8, help="sequences per rank and step")
    parser.add_argument(
        "--context",
        type=int_between(2, 1 << 20),
        default=None,
        help="tokens per sequence (default 64, quick: 32)",
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=900.0, help="seconds before the workers are ended"
    )
    parser.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # deepspeed's launcher
    args = parse_args(parser, argv)
    quick_or_full(args, steps=(6, 40), context=(32, 64))
    steps, context = args.steps, args.context
    from common.env import require

    require("deepspeed")
    _data(context)  # a UsageError where the corpus cannot fill this context
    checks_done(args)
    runs = [("ddp", 0, "fp32")] + [("zero", s, "fp32") for s in STAGES]
    runs += [("zero", 1, "bf16"), ("zero", 2, "bf16"), ("zero", 1, "fp16")]
    results = run_workers(
        worker,
        args.nproc,
        args=(runs, steps, args.micro_batch, args.seed, context),
        device=args.device,
        timeout=args.timeout,
    )
    if not is_main():
        return {}
    nproc = len(results)
    ddp = results[0]["ddp-0-fp32"]["losses"]
    params = results[0]["ddp-0-fp32"]["params"]
    print(
        f"\n{nproc} processes on {args.device}, {params:,} parameters (Ψ), global batch "
        f"{nproc} x {args.micro_batch} x {context} tokens, {steps} steps of torch AdamW (lr {LR})"
    )

    print(
        "\n1-2. fp32: loss against DDP, optimizer bytes on each rank (Adam moments + fp32 master partition)"
    )
    print(f"   {'stage':>5} {'max |loss - DDP|':>17} {'rank bytes':>22} {'formula':>10}")
    figures = {"nproc": nproc, "params": params, "steps": steps, "ddp_final_loss": ddp[-1]}
    curves = {"DDP": ddp}
    worst = 0.0
    for stage in STAGES:
        per_rank = [r[f"zero-{stage}-fp32"] for r in results]
        diff = max(abs(a - b) for a, b in zip(per_rank[0]["losses"], ddp))
        worst = max(worst, diff)
        curves[f"ZeRO-{stage}"] = per_rank[0]["losses"]
        totals = [r["moments"] + r["master"] for r in per_rank]
        expect = formula(stage, params, nproc, mixed=False)
        print(f"   {stage:>5} {diff:>17.2e} {' / '.join(f'{t:,}' for t in totals):>22} {expect:>10,}")
        figures.update(
            {
                f"zero{stage}_max_loss_diff": diff,
                f"zero{stage}_rank0_opt_bytes": totals[0],
                f"zero{stage}_formula_bytes": expect,
            }
        )
    print("\n   bf16 mixed precision (bf16 weights and gradients; fp32 master and moments: K = 12)")
    for stage in (1, 2):
        per_rank = [r[f"zero-{stage}-bf16"] for r in results]
        totals = [r["moments"] + r["master"] for r in per_rank]
        expect = formula(stage, params, nproc, mixed=True)
        print(
            f"   stage {stage}: {' / '.join(f'{t:,}' for t in totals)} bytes per rank; 12Ψ/N = {expect:,}; "
            f"final loss {per_rank[0]['losses'][-1]:.4f} (fp32 DDP {ddp[-1]:.4f})"
        )
        figures.update(
            {f"bf16_zero{stage}_rank0_opt_bytes": totals[0], f"bf16_zero{stage}_formula_bytes": expect}
        )
    fp16 = results[0]["zero-1-fp16"]
    if "refused" in fp16:  # DeepSpeed's accelerator says no fp16 here (most CPUs)
        figures["fp16"] = f"refused: {fp16['refused']}"
        print(f"\n3. fp16 ZeRO-1 on {args.device}: {figures['fp16']}")
    else:  # a GPU, or a CPU whose oneDNN has fp16 kernels (avx512_fp16, AMX-FP16)
        totals = [r["zero-1-fp16"]["moments"] + r["zero-1-fp16"]["master"] for r in results]
        figures.update(
            {
                "fp16": "ran",
                "fp16_zero1_rank0_opt_bytes": totals[0],
                "fp16_final_loss": fp16["losses"][-1],
                "fp16_skipped_steps": fp16["skipped"],
                "fp16_loss_scale": fp16["loss_scale"],
            }
        )
        print(
            f"\n3. fp16 ZeRO-1 on {args.device}: DeepSpeed accepts fp16 here; "
            f"{' / '.join(f'{t:,}' for t in totals)} bytes per rank "
            f"(12Ψ/N = {formula(1, params, nproc, mixed=True):,}); "
            f"final loss {fp16['losses'][-1]:.4f}; the dynamic loss scaler skipped {fp16['skipped']} of "
            f"{steps} steps (overflow) and ended at scale {fp16['loss_scale']:g}"
        )
    print(
        "   DeepSpeed's own Adam kernels were not used: FusedAdam needs CUDA, DeepSpeedCPUAdam compiles a "
        "C++ extension at first use; torch's AdamW ran inside ZeRO instead"
    )
    figures["max_loss_diff_vs_ddp"] = worst
    plot(os.path.join(args.out, "zero_loss_curves.png"), curves)
    if worst > 1e-4:
        raise AssertionError(f"a ZeRO stage's loss differs from DDP's by {worst:.2e} > 1e-4")
    return figures


if __name__ == "__main__":
    run_script(main)
