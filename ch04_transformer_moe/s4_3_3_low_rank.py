"""Section 4.3.3: low-rank factorisation and LoRA, two different uses of a rank-r product ``B·A``.

**Low-rank factorisation** compresses a trained matrix: the truncated SVD ``W ≈ U_r·diag(s_r)·V_r^T``
is the best rank-r approximation (Eckart-Young), stored as two thin matrices, ``r·(in + out)`` numbers
instead of ``in·out``. It saves parameters only when ``r < in·out / (in + out)``, and it changes what
the model computes. The script replaces every attention and feed-forward matrix of the project's
trained LM (or ``--hf-path DIR``, a local Llama-architecture folder) by its rank-r factorisation for a
sweep of ranks and shows parameters against validation loss and bits per byte, with a plot.

**LoRA** (Hu et al., 2021) does not compress; it fine-tunes. The trained ``W`` stays frozen and a
trainable ``ΔW = (α/r)·B·A`` is added beside it (``B`` starts at zero, so training starts from the
original model). Only A and B learn: a small fraction of the parameters. Afterwards ``W + ΔW`` can be
merged into one matrix, so inference costs nothing extra. The script puts adapters on the attention
and feed-forward matrices and fine-tunes them on a domain the model never saw: the docstrings of
standard-library modules outside its corpus (email, http, sockets, asyncio, decimal...), split by
documents into adaptation-train and adaptation-validation. It shows the trainable fraction, the
adaptation-validation loss before and after (and the original validation loss, which drifts as the
model specialises), that the merged model gives the unmerged one's logits, and that ``peft``'s LoRA on
the same model converted to transformers' Llama, with the same adapter weights, gives the same logits too.

The LoRA layer is :class:`LoRALinear` below.

    python -m ch04_transformer_moe.s4_3_3_low_rank
    python -m ch04_transformer_moe.s4_3_3_low_rank --ranks 96 64 32 --lora-rank 4 --lora-steps 200
    python -m ch04_transformer_moe.s4_3_3_low_rank --quick

A reader sees the SVD table (rank, parameters, loss, bpb) and ``low_rank_svd.png``, then the LoRA
trainable fraction, the adaptation-validation loss before and after fine-tuning, and two logits
differences below 1e-5.  The LoRA fine-tuning keeps no checkpoint: it is ``--lora-steps`` steps of a
rank-few adapter (seconds on a CPU), so a stopped run is rerun, not resumed.
"""

from __future__ import annotations

import copy
import math
import os

import torch
from torch import nn

from common.data import TokenData, module_docstrings, split_text
from common.env import require
from common.lm_source import add_source_args, evaluate_lm, load_decoder
from common.models.hf_llama import decoder_to_hf
from common.plotting import pyplot, save_figure
from common.prune import linear_weights
from common.runner import (
    add_dtype_flag,
    checks_done,
    parse_args,
    positive_float,
    positive_int,
    quick_or_full,
    run_script,
    script_parser,
    width_int,
)
from common.training import TrainConfig, train

# our fused matrices -> the transformers Llama projections they hold, stacked by rows
HF_PARTS = {
    "attn.qkv": ("q_proj", "k_proj", "v_proj"),
    "attn.proj": ("o_proj",),
    "ffn.gate_up": ("gate_proj", "up_proj"),
    "ffn.down": ("down_proj",),
}
# the LoRA adaptation domain: standard-library modules whose docstrings are not in the training corpus
ADAPT_MODULES = (
    "email/message",
    "http/client",
    "http/cookiejar",
    "smtplib",
    "imaplib",
    "ftplib",
    "poplib",
    "mailbox",
    "optparse",
    "socket",
    "ssl",
    "tkinter/__init__",
    "sqlite3/__init__",
    "asyncio/streams",
    "asyncio/events",
    "_pydecimal",
    "_pydatetime",
    "xml/dom/minidom",
)


# ----------------------------------------------------------------------------- low-rank factorisation


class LowRankLinear(nn.Module):
    """``x -> up(down(x))``: a (out, in) matrix as (out, r) @ (r, in), from the truncated SVD."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        out_f, in_f = linear.weight.shape
        if not 1 <= rank <= min(out_f, in_f):
            raise ValueError(f"rank {rank} is outside [1, {min(out_f, in_f)}] for a {out_f} x {in_f} matrix")
        u, s, vh = torch.linalg.svd(linear.weight.detach().float(), full_matrices=False)
        root = s[:rank].sqrt()  # split the singular values evenly between the two factors
        self.down = nn.Linear(in_f, rank, bias=False)
        self.up = nn.Linear(rank, out_f, bias=linear.bias is not None)
        with torch.no_grad():
            self.down.weight.copy_(root[:, None] * vh[:rank])  # (r, in)
            self.up.weight.copy_(u[:, :rank] * root)  # (out, r)
            if linear.bias is not None:
                self.up.bias.copy_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def replace_linears(model: nn.Module, names, make) -> nn.Module:
    """Swap each named ``nn.Linear`` submodule of ``model`` for ``make(name, linear)``, in place."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(name, getattr(parent, child)))
    return model


def factorized(model: nn.Module, rank: int) -> nn.Module:
    """A copy of ``model`` with every targeted matrix at rank ``min(rank, its full rank)``."""
    names = [n.removesuffix(".weight") for n in linear_weights(model)]

    def make(_, lin):
        return LowRankLinear(lin, min(rank, *lin.weight.shape))

    return replace_linears(copy.deepcopy(model), names, make)


# ----------------------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``y = W x + b + (alpha / r) · B A x``.

    A (r, in) starts random (Kaiming-uniform, as in the paper's code and ``peft``), B (out, r) at zero,
    so at the start the layer computes exactly what ``base`` does.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        out_f, in_f = base.weight.shape
        if not 1 <= rank <= min(out_f, in_f):
            raise ValueError(
                f"LoRA rank {rank} is outside [1, {min(out_f, in_f)}] for a {out_f} x {in_f} matrix"
            )
        self.base = base.requires_grad_(False)
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling  # (..., out)

    def merged(self) -> nn.Linear:
        """One plain ``nn.Linear`` holding ``W + (alpha / r) · B A``."""
        out = copy.deepcopy(self.base)
        with torch.no_grad():
            out.weight.add_(self.scaling * self.lora_B @ self.lora_A)
        return out.requires_grad_(True)


def add_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """A copy of ``model`` with every parameter frozen and LoRA adapters on its attention and
    feed-forward matrices."""
    lora = copy.deepcopy(model).requires_grad_(False)
    names = [n.removesuffix(".weight") for n in linear_weights(lora)]
    return replace_linears(lora, names, lambda _, lin: LoRALinear(lin, rank, alpha))


def merge_lora(model: nn.Module) -> nn.Module:
    """A copy of a LoRA model with every adapter merged into its matrix (a plain model again)."""
    merged = copy.deepcopy(model)
    names = [n for n, m in merged.named_modules() if isinstance(m, LoRALinear)]
    return replace_linears(merged, names, lambda _, m: m.merged())


def peft_twin(base: nn.Module, lora: nn.Module, rank: int, alpha: float):
    """``peft``'s LoRA on ``base`` converted to transformers' Llama, holding our adapters' weights.

    Our fused q/k/v (and gate/up) matrix has one A; peft adapts q, k and v separately, each with its own
    A and B. ``B·A`` stacked by rows is ``[B_q·A; B_k·A; B_v·A]``, so giving each peft adapter our A and
    its rows of our B reproduces our update exactly.
    """
    from peft import LoraConfig, get_peft_model

    c = base.config
    targets = sorted({p for parts in HF_PARTS.values() for p in parts})
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
    twin = get_peft_model(decoder_to_hf(base), config)
    h, kv, hd = c.n_head, c.n_kv_head, c.head_dim
    sizes = {"attn.qkv": (h * hd, kv * hd, kv * hd)}
    with torch.no_grad():
        for i, block in enumerate(lora.blocks):
            for ours, parts in HF_PARTS.items():
                layer = block.get_submodule(ours)
                rows = sizes.get(ours) or (layer.lora_B.shape[0] // len(parts),) * len(parts)
                for part, b_rows in zip(parts, layer.lora_B.split(rows)):
                    where = "self_attn" if ours.startswith("attn") else "mlp"
                    module = twin.base_model.model.model.layers[i].get_submodule(f"{where}.{part}")
                    module.lora_A["default"].weight.copy_(layer.lora_A)
                    module.lora_B["default"].weight.copy_(b_rows)
    return twin.eval()


# ----------------------------------------------------------------------------- the script


def adaptation_data(source) -> TokenData:
    """The docstrings of :data:`ADAPT_MODULES`, tokenized by the model's tokenizer, split by chunks of
    whole paragraphs (one in four to validation) into adaptation-train and adaptation-validation."""
    text = "\n\n".join(t for t in map(module_docstrings, ADAPT_MODULES) if t)
    train_chunks, val_chunks = split_text(text, val_fraction=0.25)
    eot = [] if source.eot_id is None else [source.eot_id]

    def encode(chunks: list[str]) -> torch.Tensor:
        return torch.tensor([i for chunk in chunks for i in [*source.encode(chunk), *eot]], dtype=torch.long)

    d = source.data
    return TokenData(encode(train_chunks), encode(val_chunks), d.context_length, d.token_bytes, d.vocab_size)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def plot(path: str, rows: list[dict], dense: dict) -> None:
    fig, ax = pyplot().subplots(figsize=(5.5, 3.8))
    ax.plot([r["params"] / 1e6 for r in rows], [r["loss"] for r in rows], "o-", label="truncated SVD")
    for r in rows:
        ax.annotate(
            f"r={r['rank']}",
            (r["params"] / 1e6, r["loss"]),
            fontsize=8,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.plot([dense["params"] / 1e6], [dense["loss"]], "k*", markersize=10, label="original")
    ax.set(
        xlabel="parameters (millions)",
        ylabel="validation loss (nats/token)",
        title="Low-rank factorisation of every matrix",
    )
    ax.legend()
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    add_source_args(parser)
    parser.add_argument(
        "--ranks",
        type=width_int,
        nargs="+",
        default=None,
        help="ranks of the SVD sweep (default: full, 3/4, 1/2, 1/4, 1/8 of d_model)",
    )
    parser.add_argument("--lora-rank", type=width_int, default=8, help="rank r of every LoRA adapter")
    parser.add_argument(
        "--lora-alpha", type=positive_float, default=16.0, help="LoRA scale alpha (update x alpha/r)"
    )
    parser.add_argument(
        "--lora-steps", type=positive_int, default=None, help="LoRA steps (default 100, quick: 30)"
    )
    parser.add_argument(
        "--lora-lr", type=positive_float, default=3e-3, help="AdamW learning rate of the adapters"
    )
    parser.add_argument(
        "--eval-batches",
        type=positive_int,
        default=None,
        help="validation batches of 8 (default 16, quick: 4)",
    )
    args = parse_args(parser, argv)
    require("peft")  # or SKIP with the reason and the install hint
    quick_or_full(args, eval_batches=(4, 16), lora_steps=(30, 100))
    eval_batches, lora_steps = args.eval_batches, args.lora_steps
    source, model = load_decoder(parser, args, "low-rank factorisation and LoRA")
    device = next(model.parameters()).device
    d = model.config.d_model
    smallest = min(min(w.shape) for w in linear_weights(model).values())
    ranks = args.ranks or sorted({d, 3 * d // 4, d // 2, d // 4, d // 8}, reverse=True)
    for r in [*ranks, args.lora_rank]:
        if not 1 <= r <= smallest:
            parser.error(
                f"rank {r} is larger than the matrices allow: must be in [1, {smallest}] "
                f"(the smallest side of a targeted matrix)"
            )
    checks_done(args)
    print(f"model: {source.describe()}")

    # (a) truncated SVD
    dense = {**evaluate_lm(model, source.data, 8, eval_batches), "params": n_params(model)}
    print(
        f"\n(a) truncated SVD of every attention and feed-forward matrix (original: {dense['params']:,} "
        f"parameters, val loss {dense['loss']:.4f}, bpb {dense['bpb']:.4f})"
    )
    print(f"   {'rank':>5} {'parameters':>11} {'of original':>11} {'val loss':>9} {'bpb':>7}")
    rows = []
    for r in ranks:
        small = factorized(model, r)
        row = {"rank": r, "params": n_params(small), **evaluate_lm(small, source.data, 8, eval_batches)}
        rows.append(row)
        print(
            f"   {r:>5} {row['params']:>11,} {row['params'] / dense['params']:>10.1%} {row['loss']:>9.4f} "
            f"{row['bpb']:>7.4f}"
        )
    plot(os.path.join(args.out, "low_rank_svd.png"), rows, dense)

    # (b) LoRA on a domain the model never saw
    slice_data = adaptation_data(source)
    lora = add_lora(model, args.lora_rank, args.lora_alpha).to(device)
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    total = n_params(lora)
    before = evaluate_lm(lora, slice_data, 8, eval_batches)
    print(
        f"\n(b) LoRA fine-tuning on the docstrings of {len(ADAPT_MODULES)} standard-library modules "
        f"outside the training corpus: {len(slice_data.train):,} adaptation-train tokens, "
        f"{len(slice_data.val):,} adaptation-validation tokens (other documents)"
    )
    print(
        f"   LoRA r={args.lora_rank}, alpha={args.lora_alpha:g} on {len(linear_weights(model))} matrices: "
        f"{trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})"
    )
    cfg = TrainConfig(
        steps=lora_steps,
        batch_size=8,
        lr=args.lora_lr,
        use_muon=False,
        warmup_steps=0,
        eval_every=0,
        eval_batches=eval_batches,
        seed=args.seed,
        dtype=args.dtype,
    )
    train(lora, slice_data, cfg, device=str(device))
    after = evaluate_lm(lora, slice_data, 8, eval_batches)
    drift = evaluate_lm(lora, source.data, 8, eval_batches)
    print(
        f"   adaptation-validation (documents not trained on): loss {before['loss']:.4f} -> "
        f"{after['loss']:.4f}, bpb {before['bpb']:.4f} -> {after['bpb']:.4f} after {lora_steps} steps"
        + (
            ": lower, the adapters learned the new domain"
            if after["loss"] < before["loss"]
            else ": NOT lower: the adapters have not (yet) learned what carries over to new documents"
        )
    )
    print(
        f"   original validation split: loss {dense['loss']:.4f} -> {drift['loss']:.4f} (the price of "
        f"specialising; the frozen base model is untouched and the adapters can be dropped)"
    )

    x = slice_data.val[: 2 * source.data.context_length].view(2, -1).to(device)
    merged = merge_lora(lora)
    twin = peft_twin(model, lora, args.lora_rank, args.lora_alpha).to(device)
    with torch.inference_mode():
        ours = lora(x)[0]
        merge_diff = (merged(x)[0] - ours).abs().max().item()
        peft_diff = (twin(input_ids=x).logits - ours).abs().max().item()
    print(
        f"   merged into the matrices: {n_params(merged):,} parameters, max |logits difference| = "
        f"{merge_diff:.2e}"
    )
    print(
        f"   peft's LoRA on the transformers Llama with our adapters: max |logits difference| = "
        f"{peft_diff:.2e}"
    )
    if merge_diff > 1e-5 or peft_diff > 1e-5:
        raise AssertionError(f"LoRA logits differ: merged {merge_diff:.2e}, peft {peft_diff:.2e}")

    figures = {
        "model": source.name,
        "params": dense["params"],
        "val_loss": dense["loss"],
        "val_bpb": dense["bpb"],
    }
    for row in rows:
        figures.update(
            {
                f"svd_r{row['rank']}_params": row["params"],
                f"svd_r{row['rank']}_val_loss": row["loss"],
                f"svd_r{row['rank']}_val_bpb": row["bpb"],
            }
        )
    figures.update(
        {
            "lora_rank": args.lora_rank,
            "lora_trainable": trainable,
            "lora_trainable_fraction": trainable / total,
            "lora_loss_before": before["loss"],
            "lora_loss_after": after["loss"],
            "lora_original_val_loss_after": drift["loss"],
            "lora_merged_max_abs_diff": merge_diff,
            "lora_vs_peft_max_abs_diff": peft_diff,
        }
    )
    return figures


if __name__ == "__main__":
    run_script(main)
