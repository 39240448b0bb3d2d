"""Section 7.3.1: memory requirements: weights, KV cache, training state, each estimated and measured.

The estimators live in ``common/estimate.py`` (read them beside this script). The script prints:

1. the memory table of published models (Llama-2 7B/13B/70B, Mixtral 8x7B, DeepSeek-V3): weights at
   fp32/bf16/int8/int4 (int4 with 128-wide groups, scales and zeros counted), the KV cache at 4k and
   32k tokens, and training with AdamW in mixed precision, whole and per rank under ZeRO-3 on 8 GPUs;
2. for the project's decoder LM: the estimated peak memory of an inference pass (prompt + KV-cache
   generation) and of a training step (AdamW), beside the peak resident memory measured in a fresh
   process on this machine (goal: within 15%);
3. the fused chunked cross-entropy head (``common/models/fused_cross_entropy.py``) against the plain
   ``F.cross_entropy(h @ W.T)`` at a large vocabulary: the peak memory of loss + backward, measured.

    python -m ch07_deployment.s7_3_1_memory_requirements
    python -m ch07_deployment.s7_3_1_memory_requirements --quick
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common import estimate
from common.machine import peak_memory
from common.models.decoder import DecoderConfig, DecoderLM
from common.models.fused_cross_entropy import LOGITS_PER_CHUNK, linear_cross_entropy
from common.runner import (
    checks_done,
    count_int,
    int_between,
    parse_args,
    quick_or_full,
    run_script,
    script_parser,
)

PUBLISHED = ("llama-2-7b", "llama-2-13b", "llama-2-70b", "mixtral-8x7b", "deepseek-v3")
GB = 1e9
MB = 2**20


def published_table() -> list[dict]:
    rows = []
    for name in PUBLISHED:
        tm = estimate.training_memory(name, batch=1, seq_len=4096, mixed_precision=True, checkpointing=True)
        z3 = estimate.training_memory(
            name, 1, 4096, mixed_precision=True, checkpointing=True, zero_stage=3, world_size=8
        )
        rows.append(
            {
                "model": name,
                "params_b": estimate.count_params(name)["total"] / 1e9,
                "fp32": estimate.weight_bytes(name, 32) / GB,
                "bf16": estimate.weight_bytes(name, 16) / GB,
                "int8": estimate.weight_bytes(name, 8) / GB,
                "int4_g128": estimate.weight_bytes(name, 4, group_size=128) / GB,
                "kv_4k": estimate.kv_cache_bytes(name, 1, 4096) / GB,
                "kv_32k": estimate.kv_cache_bytes(name, 1, 32768) / GB,
                "train_adamw": tm["total"] / GB,
                "train_zero3_8": z3["total"] / GB,
            }
        )
    print("\nPublished models (GB = 10^9 bytes; KV cache bf16, batch 1; training: AdamW, bf16 mixed")
    print("precision, 16 bytes/parameter + checkpointed activations of one 4096-token sequence)")
    cols = list(rows[0])
    print("  ".join(f"{c:>13}" for c in cols))
    for r in rows:
        print("  ".join(f"{v:>13}" if isinstance(v, str) else f"{v:>13.1f}" for v in r.values()))
    return rows


# -- measured in a fresh process each (module-level: they are pickled to the child) ---------------------


def _build(config_dict: dict, batch: int, seq: int):
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(**config_dict))
    idx = torch.randint(0, model.config.vocab_size, (batch, seq))
    return model, idx


def _warmup():
    """A small training step and generation, so the libraries' own buffers and threads exist before the
    measurement starts."""
    tiny = DecoderConfig(vocab_size=256, context_length=64, n_layer=1, d_model=64, n_head=2, n_kv_head=2)
    state = _build(tiny.to_dict(), 2, 32)
    _train_step(state)
    _inference(state)


def _warmup_ce():
    _ce_plain(_ce_setup(64, 32, 512))
    _ce_fused(_ce_setup(64, 32, 512))


def _inference(state):
    model, idx = state
    model.eval()
    b, t = idx.shape
    cache = model.new_kv_cache(b, max_len=t)
    with torch.inference_mode():
        prompt = t // 2
        logits, _ = model(idx[:, :prompt], kv_cache=cache, last_only=True)
        for i in range(prompt, t):  # decode the rest one token at a time, cache growing to t
            logits, _ = model(idx[:, i : i + 1], kv_cache=cache)
    return logits.float().abs().sum().item()


def _train_step(state):
    model, idx = state
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):  # the first step creates AdamW's moments; the second is the steady state
        opt.zero_grad(set_to_none=True)
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
    return loss.item()


def _ce_setup(n_tokens: int, d: int, vocab: int):
    torch.manual_seed(0)
    h = torch.randn(n_tokens, d, requires_grad=True)
    w = (0.02 * torch.randn(vocab, d)).requires_grad_()
    y = torch.randint(0, vocab, (n_tokens,))
    return h, w, y


def _ce_plain(state):
    h, w, y = state
    loss = F.cross_entropy(h @ w.T, y)
    loss.backward()
    return loss.item()


def _ce_fused(state):
    h, w, y = state
    loss = linear_cross_entropy(h, w, y)
    loss.backward()
    return loss.item()


def measured_vs_estimated(
    config: DecoderConfig, batch: int, seq: int, train_batch: int, train_seq: int
) -> dict:
    cfg = config.to_dict()
    inf_est = estimate.inference_memory(config, batch, seq, bytes_per_value=4, prompt_len=seq // 2)
    inf = peak_memory(_build, _inference, cfg, batch, seq, warmup=_warmup)
    tr_est = estimate.training_memory(config, train_batch, train_seq, optimizer="adamw")
    tr = peak_memory(_build, _train_step, cfg, train_batch, train_seq, warmup=_warmup)
    n = estimate.count_params(config)["total"]
    print(f"\nThe project's decoder LM ({n:,} parameters, fp32), peak resident memory in a fresh process")
    print(f"{'':34}{'estimated MiB':>14}{'measured MiB':>14}{'measured/est':>14}")
    rows = [
        (f"inference: batch {batch}, {seq // 2}+{seq - seq // 2} tok", inf_est["total"], inf["peak_bytes"]),
        (f"training step: batch {train_batch}x{train_seq}", tr_est["total"], tr["peak_bytes"]),
    ]
    for label, est, meas in rows:
        print(f"{label:34}{est / MB:14.1f}{meas / MB:14.1f}{meas / est:14.3f}")
    print(
        "  inference estimate: weights {:.1f} + KV cache {:.1f} + transient {:.1f} MiB".format(
            *(inf_est[k] / MB for k in ("weights", "kv_cache", "transient"))
        )
    )
    print(
        "  training estimate: weights {:.1f} + gradients {:.1f} + AdamW {:.1f} + activations {:.1f}"
        " + loss head {:.1f} MiB".format(
            *(tr_est[k] / MB for k in ("weights", "gradients", "optimizer", "activations", "loss_head"))
        )
    )
    return {
        "inference_estimated_mib": inf_est["total"] / MB,
        "inference_measured_mib": inf["peak_bytes"] / MB,
        "inference_ratio": inf["peak_bytes"] / inf_est["total"],
        "train_estimated_mib": tr_est["total"] / MB,
        "train_measured_mib": tr["peak_bytes"] / MB,
        "train_ratio": tr["peak_bytes"] / tr_est["total"],
        "train_step_seconds": tr["seconds"] / 2,
    }


def fused_head(n_tokens: int, d: int, vocab: int) -> dict:
    plain = peak_memory(_ce_setup, _ce_plain, n_tokens, d, vocab, warmup=_warmup_ce)
    fused = peak_memory(_ce_setup, _ce_fused, n_tokens, d, vocab, warmup=_warmup_ce)
    logits_mib = n_tokens * vocab * 4 / MB
    print(f"\nLoss + backward at vocabulary {vocab:,}, {n_tokens} tokens, d_model {d}")
    print(f"(fp32 logits: {logits_mib:.0f} MiB; fused chunks: at most {LOGITS_PER_CHUNK:,} logits)")
    growth = {k: (r["peak_bytes"] - r["setup_bytes"]) / MB for k, r in (("plain", plain), ("fused", fused))}
    print(f"  plain F.cross_entropy(h @ W.T): peak {growth['plain']:8.1f} MiB above the inputs")
    print(f"  fused chunked head:             peak {growth['fused']:8.1f} MiB above the inputs")
    print(
        f"  the fused head needs {growth['plain'] / growth['fused']:.1f}x less; losses equal: "
        f"{abs(plain['result'] - fused['result']) < 1e-4}"
    )
    return {
        "ce_plain_peak_mib": growth["plain"],
        "ce_fused_peak_mib": growth["fused"],
        "ce_saving_x": growth["plain"] / growth["fused"],
        "ce_loss_diff": abs(plain["result"] - fused["result"]),
    }


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--preset",
        default=None,
        choices=["small", "base"],
        help="the project's LM size (default small; quick: a 2-layer model of width 256)",
    )
    sequence = int_between(1, 1 << 16)
    parser.add_argument("--batch", type=count_int, default=None, help="inference batch (default 8, quick 4)")
    parser.add_argument(
        "--seq",
        type=sequence,
        default=None,
        help="inference tokens per sequence, prompt + new (default 512, quick 256)",
    )
    parser.add_argument("--train-batch", type=count_int, default=4, help="training batch")
    parser.add_argument(
        "--train-seq", type=sequence, default=None, help="training sequence length (default 256, quick 128)"
    )
    parser.add_argument(
        "--vocab",
        type=int_between(1, 1 << 20),
        default=None,
        help="vocabulary of the loss-head comparison (default 65536, quick 16384)",
    )
    args = parse_args(parser, argv)
    quick_or_full(args, batch=(4, 8), seq=(256, 512), train_seq=(128, 256), vocab=(16384, 65536))
    context = max(args.seq, args.train_seq)
    if args.preset is None and args.quick:
        config = DecoderConfig(
            vocab_size=4096, context_length=context, n_layer=2, d_model=256, n_head=4, n_kv_head=4
        )
    else:
        config = DecoderConfig.preset(args.preset or "small", vocab_size=8192, context_length=context)
    n_tokens = 1024  # fp32 logits of 256 MiB at the default vocabulary: far above one fused chunk
    checks_done(args)

    figures = {f"{r['model']}_{k}": v for r in published_table() for k, v in r.items() if k != "model"}
    figures |= measured_vs_estimated(config, args.batch, args.seq, args.train_batch, args.train_seq)
    figures |= fused_head(n_tokens, 256, args.vocab)
    return figures


if __name__ == "__main__":
    run_script(main)
