"""Section 6.4.3: a Transformer whose feed-forwards are fastmoe's ``FMoETransformerMLP``.

Each block is pre-LN: ``x + attention(norm1(x))``, then ``x + FMoETransformerMLP(norm2(x))`` (the
fastmoe layer has no residual or norm inside; the block adds them).  The script:

1. **parameter accounting** split into MoE layers, attention and norms.  The book reports about 273M
   total, 268M in MoE layers, 5.24M in attention and 0.2M in norms but not its configuration: a
   grid search over layers, width, experts and expert width finds the configuration closest to
   those four figures, the model is built at it (on the meta device: no memory) and counted, and
   ours is printed beside the book's;
2. **the book's random-data regression**: fixed random inputs and targets, MSE, a few epochs (the
   book's loss fell 2.04 -> 1.11, -45%); ours printed beside it.  Trained at a small size that a
   CPU finishes in a minute, not at the 273M accounting size;
3. **expert-parallel training** (``--nproc 2``, the default): two worker processes, each holding
   half of every layer's experts, tokens exchanged by all-to-all; gradients of the replicated
   parameters (attention, norms, gates) summed by :class:`~common.fmoe.DistributedGroupedDataParallel`.
   Its loss at every step equals the one-process run's with the same weights and batches;
4. **a language model** on the embedded corpus with the same blocks: validation loss before and after.
   It is checkpointed (``--out``/checkpoint, :mod:`common.checkpoint`) every ``--ckpt-every`` steps
   and on Ctrl-C or SIGTERM, and ``--resume`` continues it (parts 1-3 run again: they are short and
   deterministic).  The one-process runs use ``--threads`` intra-op threads (1 by default).

    python -m ch06_distributed_moe.s6_4_3_fastmoe_transformer
    python -m ch06_distributed_moe.s6_4_3_fastmoe_transformer --quick
    python -m ch06_distributed_moe.s6_4_3_fastmoe_transformer --resume     # after Ctrl-C or SIGTERM
    python -m ch06_distributed_moe.s6_4_3_fastmoe_transformer --nproc 4 --experts 8
    torchrun --nproc_per_node 2 -m ch06_distributed_moe.s6_4_3_fastmoe_transformer

A reader sees which fastmoe ran, the accounting table beside the book's, the regression's first
and last epoch losses beside the book's, the largest difference between the expert-parallel and
the one-process losses, and the language model's validation loss.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from common.fmoe.backend import fmoe_backend
from common.fmoe.expert_parallel import local_experts
from common.launch import is_main, job_size, run_workers
from common.models.attention import MultiHeadAttention
from common.progress import progress
from common.runner import (
    add_dtype_flag,
    checks_done,
    count_int,
    int_between,
    non_negative_float,
    non_negative_int,
    parse_args,
    positive_float,
    positive_int,
    process_count,
    quick_or_full,
    run_script,
    script_parser,
    width_int,
)
from common.training import autocast_for

BOOK = {"total": 273e6, "moe": 268e6, "attention": 5.24e6, "norms": 0.2e6}
BOOK_LOSS = (2.04, 1.11)
GRID = {  # the search space for the book's configuration
    "layers": range(1, 25),
    "d_model": (256, 384, 512, 768, 1024),
    "experts": (2, 4, 8, 16, 32, 64, 128),
    "d_hidden": (256, 512, 768, 1024, 1536, 2048, 3072, 4096),
    "attn_bias": (False, True),
}


class MoEBlock(nn.Module):
    """Pre-LN block: self-attention, then fastmoe's MoE feed-forward."""

    def __init__(self, fm, d_model, n_head, num_expert, d_hidden, top_k, world_size, attn_bias, causal):
        super().__init__()
        self.causal = causal
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_head, bias=attn_bias)
        self.moe = fm.FMoETransformerMLP(num_expert, d_model, d_hidden, top_k=top_k, world_size=world_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, seq, d_model)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, causal=self.causal)
        return x + self.moe(self.norm2(x))


class MoETransformer(nn.Module):
    """A stack of :class:`MoEBlock`; with ``vocab`` a causal LM (embeddings, final norm, tied head)."""

    def __init__(
        self,
        fm,
        n_layer,
        d_model,
        n_head,
        num_expert,
        d_hidden,
        top_k=2,
        world_size=1,
        attn_bias=True,
        vocab=None,
        context=0,
    ):
        super().__init__()
        causal = vocab is not None
        self.layers = nn.ModuleList(
            MoEBlock(fm, d_model, n_head, num_expert, d_hidden, top_k, world_size, attn_bias, causal)
            for _ in range(n_layer)
        )
        if causal:
            self.embed = nn.Embedding(vocab, d_model)
            nn.init.normal_(self.embed.weight, std=d_model**-0.5)  # tied head: logits start near 0
            self.pos = nn.Parameter(torch.zeros(context, d_model))
            self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, seq, d_model) features, or (batch, seq) token ids for the LM -> same shape / logits."""
        lm = x.dtype == torch.long
        if lm:
            x = self.embed(x) + self.pos[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.norm(x) @ self.embed.weight.T if lm else x


def account(model: nn.Module) -> dict:
    """Parameters by kind: MoE layers (experts and gates), attention, norms, the rest (embeddings)."""
    out = dict.fromkeys(("moe", "attention", "norms", "other"), 0)
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    for name, p in model.named_parameters():
        kind = "moe" if ".moe." in name else "attention" if ".attn." in name else None
        kind = kind or ("norms" if id(p) in norm_params else "other")
        out[kind] += p.numel()
    out["total"] = sum(out.values())
    return out


def formula(layers, d_model, experts, d_hidden, attn_bias) -> dict:
    """The same accounting in closed form (checked against :func:`account` on the built model)."""
    expert = 2 * d_model * d_hidden + d_hidden + d_model  # htoh4, h4toh, both with biases
    moe = layers * (experts * expert + experts * d_model + experts)  # + gate weight and bias
    attention = layers * (4 * d_model * d_model + (4 * d_model if attn_bias else 0))
    norms = layers * 2 * 2 * d_model
    return {"moe": moe, "attention": attention, "norms": norms, "total": moe + attention + norms}


def search_book_config() -> tuple[dict, dict, float]:
    """The grid point closest to the book's total, MoE and attention figures (sum of relative errors);
    the norms are left out of the fit: no block with two LayerNorms comes near the book's 0.2M."""
    best = None
    for L, d, E, h, bias in itertools.product(*GRID.values()):
        counts = formula(L, d, E, h, bias)
        err = sum(abs(counts[k] - BOOK[k]) / BOOK[k] for k in ("total", "moe", "attention"))
        if best is None or err < best[2]:
            best = (dict(layers=L, d_model=d, experts=E, d_hidden=h, attn_bias=bias), counts, err)
    return best


def accounting(fm) -> dict:
    config, counts, err = search_book_config()
    with torch.device("meta"):
        model = MoETransformer(
            fm,
            config["layers"],
            config["d_model"],
            8,
            config["experts"],
            config["d_hidden"],
            attn_bias=config["attn_bias"],
        )
    built = account(model)
    assert all(built[k] == counts[k] for k in BOOK), (built, counts)  # the closed form is the model
    print(f"\n1. parameter accounting: the grid's closest configuration to the book's figures\n   {config}")
    print(f"   {'':<10} {'ours':>10} {'book':>10} {'ours/book':>10}")
    for k in ("total", "moe", "attention", "norms"):
        print(f"   {k:<10} {built[k] / 1e6:9.2f}M {BOOK[k] / 1e6:9.2f}M {built[k] / BOOK[k]:9.2f}x")
    ratio = BOOK["attention"] / BOOK["norms"]
    print(
        f"   No configuration reproduces the book's figures (closest: relative errors summing to "
        f"{err:.2f} on total, MoE and attention).\n   The book's norms cannot come from this model: "
        f"attention/norms = {ratio:.0f} would need d_model ~{ratio:.0f} with two LayerNorms a block.\n"
        f"   Its 5.24M of attention is exactly 4 blocks of 5·512² (Transformer-XL's attention, with its "
        f"relative-position projection, as "
        f"in fastmoe's examples),\n   and 4 blocks of 32 fastmoe experts 512 -> 2048 -> 512 hold "
        f"{formula(4, 512, 32, 2048, False)['moe'] / 1e6:.1f}M: most likely the book's model, which this "
        f"script's four-projection attention does not build.\n"
    )
    return {f"book_config_{k}": v for k, v in config.items()} | {f"params_{k}": v for k, v in built.items()}


def gate_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the gates' auxiliary losses (NaiveGate has none)."""
    losses = [
        m.gate.get_loss() for m in model.modules() if hasattr(m, "gate") and hasattr(m.gate, "get_loss")
    ]
    return sum((loss for loss in losses if loss is not None), torch.zeros(()))


def regression_data(a, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(a.batches, a.batch, a.seq, a.d_model, generator=g)
    y = torch.randn(a.batches, a.batch, a.seq, a.d_model, generator=g)
    return x, y


def train_regression(fm, a, rank=0, world_size=1, group_sync=None) -> list[float]:
    """Adam on MSE over fixed random (x, y); returns every step's loss over the *global* batch.

    With ``world_size > 1`` this rank holds experts ``rank·E/W ...`` and the rows
    ``rank·batch/W ...`` of every batch; its loss is its squared errors over the global element count,
    so the ranks' losses and gradients sum to the one-process ones.
    """
    torch.manual_seed(a.seed)
    full = MoETransformer(fm, a.layers, a.d_model, a.heads, a.experts, a.d_hidden, a.top_k)
    model = full
    if world_size > 1:
        ne = local_experts(a.experts, world_size)
        model = MoETransformer(fm, a.layers, a.d_model, a.heads, ne, a.d_hidden, a.top_k, world_size)
        state = {}
        for name, value in full.state_dict().items():
            if ".moe.experts." in name:
                head, rest = name.split(".moe.experts.")
                e, tail = rest.split(".", 1)
                if rank * ne <= int(e) < (rank + 1) * ne:
                    state[f"{head}.moe.experts.{int(e) - rank * ne}.{tail}"] = value
            else:
                state[name] = value
        model.load_state_dict(state, strict=True)
        group_sync = fm.DistributedGroupedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    x, y = regression_data(a, a.seed + 1)
    rows = slice(rank * a.batch // world_size, (rank + 1) * a.batch // world_size)
    losses = []
    for _ in range(a.epochs):
        for xb, yb in zip(x, y):
            out = model(xb[rows])
            loss = F.mse_loss(out, yb[rows], reduction="sum") / yb.numel()  # this rank's share
            opt.zero_grad(set_to_none=True)
            (loss + a.aux_coef * gate_loss(model) / world_size).backward()
            if group_sync is not None:
                group_sync.allreduce_params(no_scale=True)  # sum the replicated parameters' gradients
                loss = loss.detach()
                torch.distributed.all_reduce(loss)  # the global batch's loss, for the record
            losses.append(loss.item())
            opt.step()
    return losses


def _ep_worker(ctx, a) -> list[float]:
    fm, _ = fmoe_backend()
    return train_regression(fm, a, ctx.rank, ctx.world_size)


def epoch_means(losses, steps_per_epoch) -> list[float]:
    return [
        sum(losses[i : i + steps_per_epoch]) / steps_per_epoch for i in range(0, len(losses), steps_per_epoch)
    ]


LM_SETTINGS = (
    "layers",
    "d_model",
    "heads",
    "experts",
    "d_hidden",
    "top_k",
    "batch",
    "context",
    "lm_lr",
    "seed",
    "dtype",
)


def lm_settings(a) -> dict:
    """What a resumed language model must share with its checkpoint (all but --lm-steps)."""
    return {k: getattr(a, k) for k in LM_SETTINGS}


def check_lm_resume(a) -> None:
    """A one-line UsageError where the checkpoint in ``a.ckpt_dir`` cannot continue this run: none, other
    settings, or an ``--lm-steps`` it has reached; checked before any part of the script runs."""
    from common import checkpoint as ckpt
    from common.errors import UsageError

    if not ckpt.has_checkpoint(a.ckpt_dir):
        raise UsageError(f"--resume: no checkpoint in {a.ckpt_dir}")
    state = ckpt.read_state(a.ckpt_dir)
    saved = (state.get("extra") or {}).get("settings") or {}
    for key, value in lm_settings(a).items():
        if saved.get(key) != value:
            raise UsageError(
                f"--resume: the language model in {a.ckpt_dir} was trained with --{key.replace('_', '-')} "
                f"{saved.get(key)!r}, this run asks for {value!r}; keep it, or use another --out"
            )
    if a.lm_steps <= state["step"]:
        raise UsageError(
            f"--resume: the checkpoint in {a.ckpt_dir} is at step {state['step']}, so --lm-steps "
            f"{a.lm_steps} leaves nothing to train; ask for more than {state['step']}"
        )


def lm_data(a):
    """The corpus as the language model reads it (a UsageError where ``a.context`` is too long for it)."""
    from common.data import TokenData, get_tokenizer, load_corpus

    return TokenData.from_text(load_corpus(), get_tokenizer(2048), a.context)


def train_lm(fm, a, data) -> dict:
    """AdamW on ``data`` (:func:`lm_data`) for ``a.lm_steps`` steps under autocast to ``a.dtype``,
    checkpointed to ``a.ckpt_dir`` every ``a.ckpt_every`` steps and on Ctrl-C/SIGTERM (the interruption
    then carries the folder and step to the runner); ``a.resume`` continues from that checkpoint."""
    from common import checkpoint as ckpt
    from common.errors import UsageError

    torch.manual_seed(a.seed)
    model = MoETransformer(
        fm,
        a.layers,
        a.d_model,
        a.heads,
        a.experts,
        a.d_hidden,
        a.top_k,
        vocab=data.vocab_size,
        context=a.context,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=a.lm_lr)
    g = torch.Generator().manual_seed(a.seed)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = [
                F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                for x, y in data.val_batches(a.batch, max_batches=4)
            ]
        model.train()
        return sum(losses) / len(losses)

    step, resumed_from = 0, None
    if a.resume:
        try:
            state = ckpt.load_checkpoint(a.ckpt_dir, model, opt)
        except (ckpt.CheckpointError, RuntimeError, ValueError) as e:
            raise UsageError(f"resume: {e}".splitlines()[0]) from e
        ckpt.restore_rng_state(state["rng"], {"sampler": g})
        step = resumed_from = state["step"]
        before = state["extra"]["val_loss_before"]
    else:
        before = val_loss()
    rng_at_step = ckpt.capture_rng_state({"sampler": g})

    def save() -> None:
        extra = {"val_loss_before": before, "settings": lm_settings(a)}
        ckpt.save_checkpoint(a.ckpt_dir, model, opt, step, rng_at_step, extra)

    bar = progress(total=a.lm_steps, initial=step, desc="LM")
    try:
        while step < a.lm_steps:
            x, y = data.get_batch("train", a.batch, generator=g)
            with autocast_for("cpu", a.dtype):  # the regression parts stay fp32: they compare exactly
                logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, rng_at_step = step + 1, ckpt.capture_rng_state({"sampler": g})
            bar.update(1)
            if a.ckpt_every and step % a.ckpt_every == 0:
                save()
    except KeyboardInterrupt as e:
        bar.close()
        save()  # the weights, optimizer and data order after `step` completed steps
        e.checkpoint_dir, e.step = a.ckpt_dir, step
        raise
    bar.close()
    save()
    after = val_loss()
    print(
        f"\n4. language model on the embedded corpus ({a.lm_steps} steps, context {a.context}"
        f"{f', resumed at step {resumed_from}' if resumed_from is not None else ''}): "
        f"val loss {before:.3f} -> {after:.3f} "
        f"(uniform over {data.vocab_size} tokens: {math.log(data.vocab_size):.3f}); checkpoint: {a.ckpt_dir}"
    )
    return {"lm_val_loss_before": before, "lm_val_loss_after": after, "lm_resumed_from": resumed_from}


@contextmanager
def intra_op_threads(n: int):
    """Run the block with ``n`` intra-op threads, then restore the caller's setting.

    Speed, not teaching: at these small sizes a second thread gains little, and on a busy machine
    two OpenMP threads that wait for each other at every matmul stall for minutes (481 s against
    35 s for the same regression measured on a loaded 2-core machine).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    parser.add_argument(
        "--nproc", type=process_count, default=2, help="worker processes for expert-parallel training"
    )
    parser.add_argument(
        "--layers", type=int_between(1, 1024), default=2, help="Transformer blocks of the trained models"
    )
    parser.add_argument(
        "--d-model",
        type=width_int,
        default=None,
        help="model width of the trained models (default 256, quick 64)",
    )
    parser.add_argument("--heads", type=int_between(1, 4096), default=4, help="attention heads")
    parser.add_argument(
        "--experts", type=int_between(1, 4096), default=8, help="experts per MoE layer (in total)"
    )
    parser.add_argument(
        "--d-hidden",
        type=width_int,
        default=None,
        help="hidden width of each expert (default 512, quick 128)",
    )
    parser.add_argument("--top-k", type=int_between(1, 4096), default=2, help="experts per token")
    parser.add_argument("--batch", type=count_int, default=32, help="sequences per batch")
    parser.add_argument(
        "--seq", type=int_between(1, 1 << 16), default=8, help="tokens per sequence (regression)"
    )
    parser.add_argument(
        "--batches",
        type=int_between(1, 1 << 16),
        default=None,
        help="batches in the fixed random data set (default 8, quick 4)",
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=None, help="regression epochs (default 10, quick 4)"
    )
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (regression)")
    parser.add_argument(
        "--aux-coef", type=non_negative_float, default=0.0, help="weight of the gates' losses"
    )
    parser.add_argument("--context", type=count_int, default=64, help="language model context")
    parser.add_argument(
        "--lm-steps", type=positive_int, default=None, help="language model steps (default 100; quick 20)"
    )
    parser.add_argument(
        "--lm-lr", type=positive_float, default=3e-3, help="AdamW learning rate (language model)"
    )
    parser.add_argument(
        "--ckpt-every", type=non_negative_int, default=25, help="checkpoint the language model every N steps"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the language model from the checkpoint in --out"
    )
    parser.add_argument(
        "--threads", type=int_between(1, 1024), default=1, help="intra-op threads of the one-process runs"
    )
    args = parse_args(parser, argv)
    args.ckpt_dir = os.path.join(args.out, "checkpoint")
    quick_or_full(args, d_model=(64, 256), d_hidden=(128, 512), batches=(4, 8), epochs=(4, 10))
    quick_or_full(args, lm_steps=(20, 100))
    world = job_size(args.nproc)
    if args.experts % world or args.batch % world:
        parser.error(f"--experts {args.experts} and --batch {args.batch} must divide by {world} workers")
    if args.d_model % args.heads:
        parser.error(f"--d-model {args.d_model} must divide by --heads {args.heads}")
    if args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} must be at most --experts {args.experts}")
    lm_text = lm_data(args)  # a --context the corpus cannot fill: a UsageError now, not after the regression
    if args.resume:
        check_lm_resume(args)
    checks_done(args)

    fm, backend = fmoe_backend()
    main_process = is_main()
    if main_process:
        print(f"fastmoe backend: {backend}")
    figures = {"backend": backend.split(" (")[0]}
    if main_process:
        figures |= accounting(fm)

    # 2 + 3: the regression, one process and expert-parallel
    steps = args.batches
    start = time.perf_counter()
    with intra_op_threads(args.threads):
        one = train_regression(fm, args) if main_process else None
    t_one = time.perf_counter() - start
    start = time.perf_counter()
    ep = run_workers(_ep_worker, args.nproc, (args,), device="cpu", timeout=600)[0] if world > 1 else one
    t_ep = time.perf_counter() - start
    if not main_process:
        return {}
    first, last = epoch_means(one, steps)[0], epoch_means(one, steps)[-1]
    print(
        f"\n2. random-data regression ({args.epochs} epochs of {steps} batches "
        f"{args.batch}x{args.seq}x{args.d_model}, "
        f"{args.layers} blocks, {args.experts} experts x {args.d_hidden}, top-{args.top_k}):\n"
        f"   mean loss, first epoch -> last: ours {first:.3f} -> {last:.3f} "
        f"({100 * (last / first - 1):+.0f}%), "
        f"book {BOOK_LOSS[0]:.2f} -> {BOOK_LOSS[1]:.2f} ({100 * (BOOK_LOSS[1] / BOOK_LOSS[0] - 1):+.0f}%)"
    )
    diff = max(abs(p - q) for p, q in zip(one, ep))
    print(
        f"\n3. expert parallel over {world} processes (gloo all-to-all): largest loss difference to one "
        f"process over {len(one)} steps: {diff:.2e} ({t_ep:.1f} s with start-up vs {t_one:.1f} s)"
    )
    figures |= {
        "regression_first_epoch_loss": first,
        "regression_last_epoch_loss": last,
        "regression_change_pct": 100 * (last / first - 1),
        "ep_workers": world,
        "ep_max_loss_diff": diff,
    }
    with intra_op_threads(args.threads):
        figures |= train_lm(fm, args, lm_text)
    return figures


if __name__ == "__main__":
    run_script(main)
