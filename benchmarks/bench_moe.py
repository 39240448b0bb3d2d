"""Benchmark: our MoE layer against transformers' Mixtral and DeepSeek-V3 blocks, DeepSpeed's MoE,
and the floor, side by side in one run.

    python -m benchmarks.bench_moe            # three configurations (several minutes)
    python -m benchmarks.bench_moe --quick    # tiny sizes, a smoke run (seconds)

The floor is the same active FLOPs with no routing at all: one dense SwiGLU matmul chain (gate, up,
down at the expert width) over ``tokens·k`` rows.  Every column is timed in the same process,
round-robin (one run of each variant per round, so load from other processes hits all of them
alike); a column's multiple of the floor is the median over the ``--repeats`` rounds (after warm-up)
of its time over the floor's time in the same round.

Each library runs as its users get it.  ``HF Mixtral`` and ``HF DeepseekV3`` are the MoE blocks of a
``MixtralForCausalLM(config)`` / ``DeepseekV3ForCausalLM(config)`` built normally, whose experts run
transformers' default implementation (``grouped_mm`` in transformers 5: one grouped matrix multiply
over the experts); the JSON records it.  The ``... eager`` columns are the same weights on
transformers' per-expert loop (what a block constructed on its own with
``_experts_implementation="eager"`` runs), shown for comparison only.  DeepSpeed's ``MoE`` runs with
its defaults except the top-k and capacity factors of the configuration.

For decoding, ``read active weights`` only reads the chosen experts' weights once: the bytes any
decode step has to stream, which no implementation can beat (the floor reads one expert's weights,
which stay in cache).

``ours column-major`` (decoding only) is our layer through :class:`common.models.decode_layout.DecodeLayout`:
column-major copies of the expert weights held apart from the layer (opt-in; twice the expert memory).

Goals: fine-grained training within 1.3x the floor and no slower than HF's default Mixtral block;
coarse training within 1.15x the floor; decoding within 2.5x the read-the-active-weights bound
(measured on ``ours column-major``; plain ``ours`` stands beside it).
Columns: ``ours`` is :class:`common.moe.TopKMoE` (Mixtral routing); ``ours DS`` is our
:class:`common.moe.DeepSeekMoE` with the same shared experts as the transformers DeepseekV3MoE column.
The benchmark keeps freed memory for reuse (:func:`common.env.keep_freed_memory`) unless
``--system-malloc``; the JSON records which.
The JSON goes to ``benchmarks/results/bench_moe.json`` (``--json`` to change).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.models.decode_layout import DecodeLayout
from common.moe import DeepSeekMoE, TopKMoE
from common.moe.experts import SwiGLU
from common.runner import write_json
from common.timing import add_malloc_flag, apply_malloc_flag, machine_record, paired_ratio, race

FORMAT = 4  # the JSON's layout; benchmarks.speed_section reads only this one


@dataclass
class Config:
    name: str
    tokens: int
    d_model: int
    experts: int
    d_expert: int
    k: int
    train: bool
    n_shared: int  # shared experts of the DeepSeek columns
    ds_capacity: tuple  # DeepSpeed capacity factors to time
    goals: dict  # measure -> the largest multiple allowed (see ``GOAL_MEASURES``)


# what each goal divides ours by: the floor, HF's default Mixtral block, or the read-the-weights bound
GOAL_MEASURES = {"x_floor": "floor", "x_hf": "HF Mixtral", "x_bound": "read active weights"}
# decoding only: our layer through common.models.decode_layout (column-major expert weights held apart,
# opt-in); the decode goal is measured on it, plain ``ours`` stands beside
COLUMN_MAJOR = "ours column-major"
FINE, DECODE, COARSE = {"x_floor": 1.3, "x_hf": 1.0}, {"x_bound": 2.5}, {"x_floor": 1.15}

FULL = [
    Config(
        "train fwd+bwd, 4096 tok, d 512, 64 experts x 256, top-6",
        4096,
        512,
        64,
        256,
        6,
        True,
        1,
        (1.25,),
        FINE,
    ),
    Config(
        "decode fwd, 8 tok, d 512, 64 experts x 256, top-6", 8, 512, 64, 256, 6, False, 1, (1.25,), DECODE
    ),
    Config(
        "train fwd+bwd, 4096 tok, d 512, 16 experts x 1024, top-2",
        4096,
        512,
        16,
        1024,
        2,
        True,
        0,
        (1.0, 2.0),
        COARSE,
    ),
]
QUICK = [
    Config(
        "train fwd+bwd, 256 tok, d 64, 16 experts x 32, top-4", 256, 64, 16, 32, 4, True, 1, (1.25,), FINE
    ),
    Config("decode fwd, 4 tok, d 64, 16 experts x 32, top-4", 4, 64, 16, 32, 4, False, 1, (1.25,), DECODE),
    Config(
        "train fwd+bwd, 256 tok, d 64, 4 experts x 128, top-2", 256, 64, 4, 128, 2, True, 0, (1.0,), COARSE
    ),
]


class Floor(nn.Module):
    """One dense feed-forward at the expert width, on tokens·k rows: a SwiGLU (fused gate/up, then
    down), or with ``kind="gelu"`` fastmoe's expert ``Linear -> GELU -> Linear`` with biases."""

    def __init__(self, d_model: int, d_ff: int, kind: str = "swiglu"):
        super().__init__()
        self.kind = kind
        gelu = kind == "gelu"
        self.gate_up = nn.Linear(d_model, d_ff if gelu else 2 * d_ff, bias=gelu)
        self.down = nn.Linear(d_ff, d_model, bias=gelu)

    def forward(self, x):
        if self.kind == "gelu":
            return self.down(F.gelu(self.gate_up(x)))
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def _init_dist():
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() == 0:  # transformers' DeepseekV3 shared MLP of width 0 (no shared experts)
                continue
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return module


def hf_block(model_cls, config):
    """The MoE block of layer 0 of ``model_cls(config)``, built the way its users build a model, and the
    experts implementation transformers chose for it."""
    model = model_cls(config)
    return model.model.layers[0].mlp, model.config._experts_implementation


def eager_copy(block):
    """The same block with the same weights on transformers' per-expert loop."""
    twin = copy.deepcopy(block)
    twin.experts.config._experts_implementation = "eager"
    return twin


def build_variants(c: Config) -> tuple[dict, dict]:
    """(name -> (module, input), name -> settings in words); every module maps its input like an MoE
    layer would."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    x = torch.randn(1, c.tokens, c.d_model)
    rows = torch.randn(c.tokens * c.k, c.d_model)
    variants = {"floor": (_randomize(Floor(c.d_model, c.d_expert)), rows)}
    settings = {}

    mcfg = MixtralConfig(
        hidden_size=c.d_model,
        intermediate_size=c.d_expert,
        num_local_experts=c.experts,
        num_experts_per_tok=c.k,
        num_attention_heads=8,
        num_key_value_heads=8,
        router_jitter_noise=0.0,
        num_hidden_layers=1,  # only its MoE block is timed
        vocab_size=32,  # room for the default special token ids
    )
    hf_mixtral, impl = hf_block(MixtralForCausalLM, mcfg)
    _randomize(hf_mixtral)
    variants["ours"] = (TopKMoE.from_hf(hf_mixtral, balance_coef=0.0), x)
    variants["HF Mixtral"] = (hf_mixtral, x)
    settings["HF Mixtral"] = f"MixtralForCausalLM(config) block, experts implementation {impl!r} (default)"
    variants["HF Mixtral eager"] = (eager_copy(hf_mixtral), x)
    settings["HF Mixtral eager"] = "the same block, experts implementation 'eager' (comparison only)"

    dcfg = DeepseekV3Config(
        hidden_size=c.d_model,
        moe_intermediate_size=c.d_expert,
        n_routed_experts=c.experts,
        num_experts_per_tok=c.k,
        n_group=1,
        topk_group=1,
        n_shared_experts=c.n_shared,
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
        first_k_dense_replace=0,
        num_attention_heads=8,
        num_key_value_heads=8,
        kv_lora_rank=64,
        q_lora_rank=None,
        num_hidden_layers=1,  # only its MoE block is timed
        vocab_size=32,  # room for the default special token ids
    )
    hf_ds, impl = hf_block(DeepseekV3ForCausalLM, dcfg)
    _randomize(hf_ds)
    if c.n_shared:
        variants["ours DS"] = (DeepSeekMoE.from_hf(hf_ds), x)
    variants["HF DeepseekV3"] = (hf_ds, x)
    settings["HF DeepseekV3"] = (
        f"DeepseekV3ForCausalLM(config) block, experts implementation {impl!r} (default)"
    )
    variants["HF DeepseekV3 eager"] = (eager_copy(hf_ds), x)
    settings["HF DeepseekV3 eager"] = "the same block, experts implementation 'eager' (comparison only)"

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from deepspeed.moe.layer import MoE
        _init_dist()
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # its comm layer (0.17 needs it; 0.19 makes it)
        for cf in c.ds_capacity:
            ds = MoE(
                c.d_model,
                SwiGLU(c.d_model, c.d_expert),  # DeepSpeed deep-copies it per expert
                num_experts=c.experts,
                ep_size=1,
                k=c.k,
                capacity_factor=cf,
                eval_capacity_factor=cf,
            )
            variants[f"DeepSpeed cf{cf:g}"] = (_randomize(ds), x)
            settings[f"DeepSpeed cf{cf:g}"] = (
                f"deepspeed.moe.layer.MoE defaults, k={c.k}, capacity factor {cf:g}"
            )
    except Exception as e:  # noqa: BLE001 - DeepSpeed is optional: say why the column is missing
        print(f"DeepSpeed MoE not timed: {type(e).__name__}: {e}", file=sys.stderr)
    if not c.train:
        variants[COLUMN_MAJOR] = (DecodeLayout(variants["ours"][0]), x)
        variants["read active weights"] = (ReadActiveWeights(variants["ours"][0]), x)
    return variants, settings


def max_abs_diff(variants: dict) -> dict:
    """Ours against each transformers block on the same input and weights (eval mode, no jitter)."""
    pairs = [("ours", "HF Mixtral"), ("ours", "HF Mixtral eager")]
    if COLUMN_MAJOR in variants:
        pairs.append((COLUMN_MAJOR, "HF Mixtral"))
    if "ours DS" in variants:
        pairs += [("ours DS", "HF DeepseekV3"), ("ours DS", "HF DeepseekV3 eager")]
    diffs = {}
    with torch.no_grad():
        for a, b in pairs:
            (ma, x), (mb, _) = variants[a], variants[b]
            ya, yb = _output(ma.eval()(x)), _output(mb.eval()(x))
            diffs[f"{a} vs {b}"] = float((ya - yb).abs().max())
    return diffs


def _output(out):
    """The layer's output tensor: ours return (out, aux_loss), DeepSpeed (out, l_aux, counts)."""
    return out[0] if isinstance(out, tuple) else out


class ReadActiveWeights(nn.Module):
    """Not an MoE: reads (sums) the weights of the experts our router picks for ``x``, once each.
    A decode step must stream these bytes from memory, so this bounds any implementation."""

    def __init__(self, layer: TopKMoE):
        super().__init__()
        self.layer = layer

    def active(self, x) -> list[int]:
        """The experts the router picks for any token of ``x``."""
        return self.layer.router(x.reshape(-1, x.shape[-1])).expert_idx.unique().tolist()

    def forward(self, x):
        gate_up, down = self.layer.experts.gate_up, self.layer.experts.down
        return sum(gate_up[e].sum() + down[e].sum() for e in self.active(x))


def _call(module, x, train: bool, grad_out: dict):
    if not train:
        with torch.no_grad():
            module(x)
        return
    module.zero_grad(set_to_none=True)
    out = _output(module(x))
    g = grad_out.get(out.shape)
    if g is None:
        g = grad_out[out.shape] = torch.randn(out.shape)
    out.backward(g)


def time_config(c: Config, repeats: int, warmup: int) -> dict:
    variants, settings = build_variants(c)
    diffs = max_abs_diff(variants)
    for module, _ in variants.values():
        module.train(c.train)
    grad_out: dict = {}
    times = race(
        {
            name: lambda m=module, x=x: _call(m, x, c.train, grad_out)
            for name, (module, x) in variants.items()
        },
        repeats,
        warmup=warmup,
    )
    med = {name: statistics.median(ts) for name, ts in times.items()}
    x_floor = {name: paired_ratio(ts, times["floor"]) for name, ts in times.items()}
    ours = {goal: COLUMN_MAJOR if goal == "x_bound" else "ours" for goal in c.goals}
    measured = {goal: paired_ratio(times[ours[goal]], times[GOAL_MEASURES[goal]]) for goal in c.goals}
    result = {
        "config": asdict(c),
        "settings": settings,
        "max_abs_diff": diffs,
        "seconds": times,  # every timed run, round by round
        "median_s": med,
        "x_floor": x_floor,
        "measured": measured,
        "goals_met": {goal: measured[goal] <= c.goals[goal] for goal in c.goals},
    }
    if "read active weights" in variants:  # what a decode step has to stream
        reader, x = variants["read active weights"]
        experts = reader.layer.experts
        with torch.no_grad():
            active = reader.active(x)
        per_expert = (experts.gate_up[0].numel() + experts.down[0].numel()) * experts.gate_up.element_size()
        result["active_experts"] = len(active)
        result["active_weight_mb"] = len(active) * per_expert / 1e6
        result["column_major_copy_mb"] = variants[COLUMN_MAJOR][0].extra_bytes / 1e6
        result["plain_ours_x_bound"] = paired_ratio(times["ours"], times["read active weights"])
        result["one_thread"] = one_thread_decode(variants, repeats, warmup)
    return result


def one_thread_decode(variants: dict, repeats: int, warmup: int) -> dict:
    """Ours (column-major) and the read bound again on one thread: where the bound's reads gain from
    more threads and a decode step's small per-expert products do not, this shows it."""
    names = (COLUMN_MAJOR, "read active weights")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = race(
            {n: lambda m=variants[n][0], x=variants[n][1]: _call(m, x, False, {}) for n in names},
            repeats,
            warmup=warmup,
        )
    finally:
        torch.set_num_threads(threads)
    return {
        "median_s": {n: statistics.median(ts) for n, ts in times.items()},
        "x_bound": paired_ratio(times[COLUMN_MAJOR], times["read active weights"]),
    }


def _goals(r: dict) -> str:
    """A configuration's goals and what ours measured, e.g. ``1.24x/1.3 floor, 0.86x/1.0 HF``."""
    words = {"x_floor": "floor", "x_hf": "HF", "x_bound": "bound"}
    return ", ".join(
        f"{r['measured'][g]:.2f}x/{limit:g} {words[g]}" for g, limit in r["config"]["goals"].items()
    )


def table(results: list[dict]) -> str:
    """The results as a markdown table: each column's multiple of the floor, then ours against each goal
    (measured / allowed) and whether all are met, and the implementation each library column ran."""
    names = []
    for r in results:
        names += [n for n in r["x_floor"] if n not in names and n != "floor"]
    w = max(len(n) for n in names)
    goals = [_goals(r) for r in results]
    gw = max(len("ours vs goals"), *(len(g) for g in goals))
    head = (
        f"| {'config':<58} | floor ms | "
        + " | ".join(f"{n:>{w}}" for n in names)
        + f" | {'ours vs goals':<{gw}} | met |"
    )
    lines = [head, "|" + "|".join("-" * (len(part)) for part in head.split("|")[1:-1]) + "|"]
    for r, g in zip(results, goals):
        cells = [f"{r['x_floor'][n]:{w - 1}.2f}x" if n in r["x_floor"] else f"{'-':>{w}}" for n in names]
        met = "yes" if all(r["goals_met"].values()) else "NO"
        lines.append(
            f"| {r['config']['name']:<58} | {1e3 * r['median_s']['floor']:8.1f} | "
            + " | ".join(cells)
            + f" | {g:<{gw}} | {met:>3} |"
        )
    settings = {}
    for r in results:
        settings.update(r["settings"])
    lines += [""] + [f"{name}: {how}" for name, how in settings.items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test of the benchmark")
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed runs per variant (the median is reported)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per variant first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--only",
        type=int,
        nargs="*",
        default=None,
        help="time only these configurations (0-based indices into the table)",
    )
    add_malloc_flag(parser)
    parser.add_argument(
        "--json", default="benchmarks/results/bench_moe.json", help="where to write the results"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from common.env import environment_report

    malloc = apply_malloc_flag(args)
    env = environment_report()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {env['cpu']} ({env['cores']} cores), "
        f"malloc: {malloc}"
    )
    results = []
    configs = QUICK if args.quick else FULL
    for i, c in enumerate(configs):
        if args.only is not None and i not in args.only:
            continue
        print(f"timing: {c.name} ...", flush=True)
        results.append(time_config(c, args.repeats, args.warmup))
        print("  " + ", ".join(f"{n} {x:.2f}x" for n, x in results[-1]["x_floor"].items()), flush=True)
        print(
            "  max |ours - HF|: " + ", ".join(f"{n} {d:.1e}" for n, d in results[-1]["max_abs_diff"].items())
        )
    print(f"\n{table(results)}")
    payload = {
        "format": FORMAT,
        "quick": args.quick,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "malloc": malloc,
        "environment": machine_record(env, ("transformers", "deepspeed")),
        "results": results,
    }
    write_json(args.json, payload)
    print(f"\nwrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
