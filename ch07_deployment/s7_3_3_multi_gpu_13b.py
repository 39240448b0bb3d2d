"""Section 7.3.3: LLaMA-13B on two GPUs by tensor parallelism: the plan, and the same split run for real.

Part 1 plans from the config alone (:mod:`common.estimate`). Megatron-style tensor parallelism splits each
layer over the GPUs: attention by heads (q, k and v rows of each GPU's heads, the matching columns of
the output projection) and the feed-forward by hidden units (gate/up rows, down columns); the output head
by its input features, as DeepSpeed's AutoTP does; the token embedding and the norms stay whole on every
GPU. Each GPU caches the keys and values of its own heads. The table gives, at fp16, int8 and int4
(group 128), the weights one GPU holds, and for each card of the datasheet table whether they fit and
how many tokens of KV cache the memory left holds. Two all-reduces per layer (after the attention output
and after the feed-forward's down projection) plus one for the head's logits move every token's
activations between the GPUs: their bytes per token are printed too.

Part 2 runs tensor parallelism for real over ``--nproc`` processes (gloo on a CPU, nccl on GPUs) on the
project's LM (or ``--hf-path DIR``): the Megatron split written out below (:class:`TensorParallelLM`:
each rank keeps its slices, :class:`RowParallelLinear` all-reduces the partial sums), greedy generation,
and a library doing the same split as the anchor: DeepSpeed's ``init_inference(tensor_parallel=...)``
(AutoTP) on the model converted to transformers' Llama, else PyTorch's ``parallelize_module``
(``torch.distributed.tensor.parallel``). Both must give the single process's greedy tokens, and logits
within float rounding. Decoding is timed beside one process, in the same run, interleaved. On this
CPU tensor parallelism does not pay: every decode step waits on ``2·layers + 1`` all-reduces through
gloo's sockets, each slower than the small matrix products the split saves (both are measured).

    python -m ch07_deployment.s7_3_3_multi_gpu_13b
    python -m ch07_deployment.s7_3_3_multi_gpu_13b --quick
    python -m ch07_deployment.s7_3_3_multi_gpu_13b --anchor all      # DeepSpeed and PyTorch both
    torchrun --nproc_per_node 2 -m ch07_deployment.s7_3_3_multi_gpu_13b --device cuda

A reader sees the per-GPU plan of LLaMA-2-13B (at fp16 13.2 GB per GPU: two 24 GB cards hold it, two
8 GB RTX 4060s do not), which path ran (and why the earlier ones did not), equal tokens, and the
per-token latencies of one process and of the tensor-parallel group.
"""

from __future__ import annotations

import copy
import os
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common import estimate
from common.env import torch_dtype
from common.launch import is_main, job_size, run_workers
from common.lm_source import add_source_args, load_decoder
from common.models.attention import CausalSelfAttention, KVCache
from common.models.decoder import DecoderLM
from common.models.feedforward import MLP, SwiGLU
from common.models.generation import decode_room_problem, generate
from common.runner import (
    add_dtype_flag,
    checks_done,
    parse_args,
    positive_int,
    process_count,
    quick_or_full,
    run_script,
    script_parser,
)
from common.timing import timed

ANCHORS = ("deepspeed", "torch")  # tried in this order by --anchor auto
PLAN_GPUS = ("rtx-4060", "rtx-3090", "rtx-4090", "l4", "a100-40gb", "a100-80gb", "h100-sxm")
BOOK_GPU = "rtx-4060"
ROOFLINE_GPU = "a100-80gb"  # holds 13B at fp16 alone and split: the two read times compare

# ----------------------------------------------------------------------------- part 1: the plan


def allreduce_bytes_per_token(config, bytes_per_value: int = 2) -> dict:
    """What the all-reduces of one token's forward pass carry: ``2·layers`` messages of ``d_model`` values
    (after the attention output projection and after the feed-forward's down projection) and one of
    ``vocab`` values (the head's logits). A ring all-reduce over ``p`` GPUs sends ``2·(p-1)/p`` times a
    message from each GPU."""
    s = estimate.model_shape(config)
    layers = 2 * s.n_layer * s.d_model * bytes_per_value
    head = s.vocab_size * bytes_per_value
    return {"count": 2 * s.n_layer + 1, "layers": layers, "head": head, "total": layers + head}


def print_plan(preset: str, tp: int) -> dict:
    config = estimate.preset_config(preset)
    s = estimate.model_shape(config)
    params = estimate.count_params(config)
    rows = estimate.deployment_plan(config, tp, gpus=PLAN_GPUS)
    one = {r["precision"]: r["weights_gb"] for r in estimate.deployment_plan(config, 1, gpus=PLAN_GPUS[:1])}
    kv_gpu = estimate.kv_cache_bytes(config, 1, 1) // tp
    comm = allreduce_bytes_per_token(config)
    rep = estimate.tensor_parallel_weight_bytes(config, tp)["replicated"]
    print(
        f"{preset}: {params['total'] / 1e9:.2f} B parameters, {s.n_layer} layers, {s.n_head} heads "
        f"({s.n_kv_head} key/value heads), d_model {s.d_model}, d_ff {s.d_ff}; split over {tp} GPUs"
    )
    print(
        f"  each GPU: {s.n_head // tp} heads, {s.d_ff // tp} feed-forward units, 1/{tp} of the output head; "
        f"whole on every GPU: embedding and norms ({rep / 1e9:.2f} GB at fp16)"
    )
    print(
        f"  KV cache (fp16, batch 1): {kv_gpu / 1e6:.3f} MB per token per GPU "
        f"({s.n_kv_head // tp} key/value heads each)"
    )
    print(
        f"  all-reduces per token: {comm['count']} ({2 * s.n_layer} of d_model = {s.d_model} values, 1 of "
        f"{s.vocab_size} logits): {comm['total'] / 1e6:.3f} MB at fp16 per token, each GPU sending "
        f"{2 * (tp - 1) / tp:.2f}x that in a ring\n"
    )
    labels = [label for _, _, label in estimate.DEPLOY_PRECISIONS]
    per_gpu = {r["precision"]: r["weights_gb"] for r in rows}
    print(
        "weights per GPU: "
        + ", ".join(f"{x} {per_gpu[x]:.2f} GB (one GPU alone: {one[x]:.2f})" for x in labels)
    )
    print("GB are 10^9 bytes; each card's memory as it reports it (an '80 GB' A100 has 80 GiB = 85.9 GB)")
    print(f"{'':23}" + "".join(f"  {x + ': left GB':>18} {'KV tokens':>10}" for x in labels))
    for name in PLAN_GPUS:
        cells = ""
        for label in labels:
            r = next(r for r in rows if r["gpu"] == name and r["precision"] == label)
            fit = f"{r['left_gb']:18.1f} {r['context_tokens']:>10,}" if r["fits"] else "does not fit"
            cells += f"  {fit:>29}"
        print(f"{tp} x {name:10} {estimate.GPUS[name].memory_gb:5.1f} GB" + cells)
    bw = estimate.GPUS[ROOFLINE_GPU].bandwidth_gbs * 1e9
    read_one, read_tp = one["fp16"] * 1e9 / bw, per_gpu["fp16"] * 1e9 / bw
    print(
        f"a decode step at batch 1 reads every weight once (memory-bound roofline, fp16, {ROOFLINE_GPU}): "
        f"one GPU {read_one * 1e3:.1f} ms, each of {tp} GPUs {read_tp * 1e3:.1f} ms, plus {comm['count']} "
        "all-reduces"
    )
    book = {r["precision"]: r for r in rows if r["gpu"] == BOOK_GPU}
    fits = [label for label in labels if book[label]["fits"]]
    print(
        f"\non {tp}x RTX 4060 (8 GB, the book's card) {preset} fits at: {', '.join(fits) or 'no precision'}; "
        f"fp16 needs {book['fp16']['weights_gb']:.1f} GB per GPU\n(memory left: before the CUDA context, "
        "the activations and the framework's workspace, which take some of it)"
    )
    return {
        "preset": preset,
        "plan_tp": tp,
        "fp16_gb_per_gpu": book["fp16"]["weights_gb"],
        "int8_gb_per_gpu": book["int8 g128"]["weights_gb"],
        "int4_gb_per_gpu": book["int4 g128"]["weights_gb"],
        "fp16_gb_one_gpu": one["fp16"],
        "fp16_read_ms_one_gpu": read_one * 1e3,
        "fp16_read_ms_per_gpu": read_tp * 1e3,
        "kv_bytes_per_token_per_gpu": kv_gpu,
        "allreduce_bytes_per_token": comm["total"],
        "allreduces_per_token": comm["count"],
        "fp16_fits_book_gpus": book["fp16"]["fits"],
        "int8_fits_book_gpus": book["int8 g128"]["fits"],
        "int8_kv_tokens_book_gpus": book["int8 g128"]["context_tokens"],
    }


# ----------------------------------------------------------------------------- part 2: the split, written out


def column_shard(linear: nn.Linear, blocks: tuple[int, ...], rank: int, world: int) -> nn.Linear:
    """This rank's slice of the output rows of ``linear``, taken from each block of rows alike (a fused
    projection stacks blocks: [q | k | v] rows, [gate | up] rows). No communication: each rank computes
    its own outputs from the whole input."""
    parts = [w.chunk(world)[rank] for w in linear.weight.detach().split(blocks)]  # each (rows / world, in)
    local = nn.Linear(linear.in_features, sum(len(w) for w in parts), bias=linear.bias is not None)
    local.weight = nn.Parameter(torch.cat(parts).clone())
    if linear.bias is not None:
        local.bias = nn.Parameter(
            torch.cat([b.chunk(world)[rank] for b in linear.bias.detach().split(blocks)])
        )
    return local


class RowParallelLinear(nn.Module):
    """This rank's columns of a linear layer (a slice of its input features): ``x_r @ W_r^T`` is a partial
    sum, and the all-reduce adds the ranks' partial sums into the full product, on every rank.
    ``slice_input``: the input arrives whole (the output head after the final norm) and each rank takes
    its features; otherwise it arrives already split (a column-parallel layer's output)."""

    def __init__(self, linear: nn.Linear, rank: int, world: int, slice_input: bool = False):
        super().__init__()
        width = linear.in_features // world
        self.span = slice(rank * width, (rank + 1) * width) if slice_input else None
        self.world = world
        self.weight = nn.Parameter(linear.weight.detach()[:, rank * width : (rank + 1) * width].clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.span is not None:
            x = x[..., self.span]  # (..., in_features / world)
        y = F.linear(x, self.weight)  # (..., out_features): this rank's partial sum
        if self.world > 1:
            dist.all_reduce(y)  # the sum over ranks, on every rank
        return y if self.bias is None else y + self.bias  # the bias once, after the sum


def shard_attention(attn: CausalSelfAttention, rank: int, world: int) -> CausalSelfAttention:
    """The same attention over this rank's heads: ``n_head / world`` query heads and ``n_kv_head / world``
    key/value heads (a GQA group stays on one rank), so its forward, RoPE and KV cache run unchanged."""
    h, kv, hd = attn.n_head // world, attn.n_kv_head // world, attn.head_dim
    local = CausalSelfAttention(
        h * hd, h, kv, attn.layer_idx, bias=attn.qkv.bias is not None, dropout=attn.dropout
    )  # head_dim = (h·hd) / h = hd
    local.qkv = column_shard(
        attn.qkv, (attn.n_head * hd, attn.n_kv_head * hd, attn.n_kv_head * hd), rank, world
    )
    local.proj = RowParallelLinear(attn.proj, rank, world)
    local.q_norm, local.k_norm = attn.q_norm, attn.k_norm  # per-head norms: the same on every rank
    return local


def shard_feedforward(ffn: nn.Module, rank: int, world: int) -> nn.Module:
    """The feed-forward over this rank's hidden units: gate/up (or fc) rows, down (or proj) columns."""
    if isinstance(ffn, SwiGLU):
        local = SwiGLU(ffn.down.out_features, ffn.d_ff // world, bias=ffn.down.bias is not None)
        local.gate_up = column_shard(ffn.gate_up, (ffn.d_ff, ffn.d_ff), rank, world)
        local.down = RowParallelLinear(ffn.down, rank, world)
        return local
    if isinstance(ffn, MLP):
        local = MLP(ffn.fc.in_features, ffn.fc.out_features // world, ffn.activation, ffn.fc.bias is not None)
        local.fc = column_shard(ffn.fc, (ffn.fc.out_features,), rank, world)
        local.proj = RowParallelLinear(ffn.proj, rank, world)
        return local
    raise ValueError(f"tensor parallelism here splits dense feed-forwards, not {type(ffn).__name__}")


class TensorParallelLM(nn.Module):
    """A DecoderLM split over the ``world`` ranks of the process group, Megatron-style.

    Every block's attention and feed-forward hold 1/world of their matrices and end on an all-reduce;
    the output head holds 1/world of its input features and all-reduces the logits; embedding and norms
    are whole on each rank. Every rank runs the same forward on the same tokens and gets the same
    logits, so :func:`common.models.generation.generate` drives it as it drives one model. Here each
    rank builds the whole model first and keeps its slices; at 13B a rank would read only its slices
    from the checkpoint.
    """

    def __init__(self, model: DecoderLM, rank: int, world: int):
        super().__init__()
        estimate.check_tensor_parallel(model.config, world)
        self.config, self.world = model.config, world
        self.lm = copy.deepcopy(model)  # the caller's model stays whole
        for block in self.lm.blocks:
            block.attn = shard_attention(block.attn, rank, world)
            block.ffn = shard_feedforward(block.ffn, rank, world)
        self.lm.lm_head = RowParallelLinear(model.lm_head, rank, world, slice_input=True)

    def forward(self, idx, targets=None, **kwargs):
        return self.lm(idx, targets, **kwargs)

    def new_kv_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """A cache of this rank's key/value heads only: 1/world of the whole model's."""
        c, p = self.config, self.lm.tok_emb.weight
        return KVCache(
            c.n_layer,
            batch,
            c.n_kv_head // self.world,
            max_len or c.context_length,
            c.head_dim,
            p.device,
            p.dtype,
        )


# ----------------------------------------------------------------------------- the anchors: libraries


def deepspeed_tp(hf, ctx) -> nn.Module:
    """DeepSpeed's AutoTP: ``init_inference`` with ``tensor_parallel`` splits the Llama's linears in place.

    On a CPU DeepSpeed all-reduces through its shared-memory kernel, which it sets up only when
    ``LOCAL_SIZE`` (set by DeepSpeed's own launcher) equals the number of local processes; unset, 0.19.8
    still calls the kernel and the process dies of a segmentation fault (DeepSpeed issue #7625).
    :mod:`common.launch` sets it for its own workers and under torchrun, as DeepSpeed's launcher would."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if ctx.device.startswith("cuda") else "gloo")
    engine = deepspeed.init_inference(hf, tensor_parallel={"tp_size": ctx.world_size}, dtype=hf.dtype)
    return engine.module


def torch_tp(hf, ctx) -> nn.Module:
    """PyTorch's tensor parallelism: ``parallelize_module`` over a 1-D device mesh, q/k/v and gate/up
    column-wise, o and down row-wise (embedding, norms and head whole on every rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh(torch.device(ctx.device).type, (ctx.world_size,))
    plan = {}
    for i in range(hf.config.num_hidden_layers):
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    return parallelize_module(hf, mesh, plan)


LIBRARY_TP = {"deepspeed": deepspeed_tp, "torch": torch_tp}
LIBRARY_NAMES = {"deepspeed": "DeepSpeed init_inference (AutoTP)", "torch": "torch parallelize_module"}


@torch.no_grad()
def library_anchor(model: DecoderLM, ctx, anchor: str, prompt: list[int], n_new: int) -> dict:
    """Library tensor parallelism on the transformers copy of ``model``: "auto" runs the first of DeepSpeed,
    then PyTorch, that works; "all" runs both; a name runs that one. For each that ran: its greedy tokens and
    prompt logits beside the same Llama's in one process; for each that failed: why."""
    from common.models.hf_llama import decoder_to_hf

    ids = torch.tensor([prompt], device=ctx.device)  # (1, prompt)
    whole = decoder_to_hf(model)
    ran, skipped = {}, {}
    for name in ANCHORS if anchor in ("auto", "all") else (anchor,):
        try:
            split = LIBRARY_TP[name](decoder_to_hf(model), ctx)
            logits = split(input_ids=ids).logits  # (1, prompt, vocab)
            tokens = split.generate(ids, max_new_tokens=n_new, do_sample=False)[0, len(prompt) :].tolist()
        except Exception as e:  # noqa: BLE001 - the reason is reported, the next library tried
            skipped[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            continue
        ran[name] = {
            "tokens": tokens,
            "logits_diff": (logits - whole(input_ids=ids).logits).abs().max().item(),
        }
        if anchor == "auto":
            break
    single = whole.generate(ids, max_new_tokens=n_new, do_sample=False)[0, len(prompt) :].tolist()
    return {"ran": ran, "skipped": skipped, "single_tokens": single}


# ----------------------------------------------------------------------------- the workers


def time_allreduce(numel: int, device: str, dtype: torch.dtype, rounds: int = 50) -> float:
    """Median seconds of one all-reduce of ``numel`` values over the group (0 for one process)."""
    if not dist.is_initialized():
        return 0.0
    x = torch.zeros(numel, device=device, dtype=dtype)
    return statistics.median(timed(lambda: dist.all_reduce(x), device) for _ in range(rounds))


def tp_worker(ctx, config, state: dict, prompt: list[int], n_new: int, repeats: int, anchor: str) -> dict:
    """One rank: the split model's greedy tokens and prompt logits, the decode time of the split model and
    (on rank 0, interleaved) of the whole model in one process, the all-reduce latency, the anchor."""
    model = DecoderLM(config).to(next(iter(state.values())).dtype)  # fp32, or the --dtype bf16 of main
    model.load_state_dict(state)
    model = model.to(ctx.device).eval()
    tp = TensorParallelLM(model, ctx.rank, ctx.world_size).eval()
    ids = torch.tensor([prompt], device=ctx.device)  # (1, prompt)
    with torch.no_grad():
        logits = tp(ids)[0]  # (1, prompt, vocab)
    result = {
        "tokens": generate(tp, [prompt], n_new)[0],
        "logits": logits.cpu(),
        "threads": torch.get_num_threads(),
    }

    def per_token(m) -> float:
        return timed(lambda: generate(m, [prompt], n_new), ctx.device) / n_new

    single, split = [], []
    for _ in range(repeats):  # interleaved: one process (rank 0 alone, the others wait), then the group
        if ctx.world_size > 1:
            dist.barrier()
        if ctx.rank == 0:
            single.append(per_token(model))
        if ctx.world_size > 1:
            dist.barrier()
        split.append(per_token(tp))
    result |= {"single_s": statistics.median(single) if single else None, "tp_s": statistics.median(split)}
    dtype = model.lm_head.weight.dtype
    result["allreduce_d_s"] = time_allreduce(config.d_model, ctx.device, dtype)
    result["allreduce_vocab_s"] = time_allreduce(config.vocab_size, ctx.device, dtype)
    if anchor != "none":
        result["anchor"] = library_anchor(model, ctx, anchor, prompt, n_new)
    return result


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    add_source_args(parser)
    parser.add_argument(
        "--nproc", type=process_count, default=2, help="tensor-parallel processes (and GPUs of the plan)"
    )
    parser.add_argument(
        "--preset",
        default="llama-2-13b",
        choices=sorted(estimate.PRESETS),
        help="the model to plan for (common.estimate)",
    )
    parser.add_argument(
        "--new-tokens",
        type=positive_int,
        default=None,
        help="greedy tokens to generate (default 32, quick: 8)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="timed generations of each (median; default 5, quick: 2)",
    )
    parser.add_argument(
        "--anchor",
        choices=("auto", *ANCHORS, "all", "none"),
        default="auto",
        help="library tensor parallelism that must agree: auto runs the first of deepspeed, torch that works",
    )
    parser.add_argument(
        "--timeout", type=positive_int, default=600, help="seconds before the workers are ended"
    )
    args = parse_args(parser, argv)
    quick_or_full(args, new_tokens=(8, 32), repeats=(2, 5))
    world = job_size(args.nproc)
    try:
        estimate.deployment_plan(estimate.preset_config(args.preset), world, gpus=PLAN_GPUS[:1])
    except ValueError as e:
        parser.error(f"--preset {args.preset}: {e}")
    device = args.device
    if device == "cuda" and torch.cuda.device_count() < world:
        device = "cpu"
        reason = (
            f"{world} processes need {world} GPUs, torch sees {torch.cuda.device_count()}: gloo on the CPU"
        )
    else:
        reason = "nccl, one GPU per process" if device == "cuda" else "gloo"

    main_process = is_main()
    source, model = load_decoder(parser, args, "tensor parallelism")
    try:
        estimate.check_tensor_parallel(model.config, world)
    except ValueError as e:
        parser.error(f"{source.name}: {e}")
    prompt = source.data.val[:8].tolist()
    problem = decode_room_problem([prompt], args.new_tokens, model.config.context_length)
    if problem:
        parser.error(f"--new-tokens {args.new_tokens}: {problem}")
    checks_done(args)
    if main_process:
        figures = print_plan(args.preset, world)
    model = model.to(torch_dtype(args.dtype)).eval()
    single_tokens = generate(model.to(device), [prompt], args.new_tokens)[0]
    with torch.no_grad():
        single_logits = model(torch.tensor([prompt], device=device))[0].cpu()
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    results = run_workers(
        tp_worker,
        args.nproc,
        (model.config, state, prompt, args.new_tokens, args.repeats, args.anchor),
        device=device,
        timeout=args.timeout,
    )
    if not main_process:
        return {}

    r0 = results[0]
    same_tokens = all(r["tokens"] == single_tokens for r in results)
    logits_diff = max((r["logits"] - single_logits).abs().max().item() for r in results)
    print(
        f"\n{source.describe()} split over {world} processes ({device}, {reason}); "
        f"{model.config.n_head // world} of {model.config.n_head} heads per rank"
    )
    print(f"prompt: {source.decode(prompt)!r}\ncontinues: {source.decode(single_tokens)!r}")
    print(
        f"Megatron split written out (TensorParallelLM): greedy tokens "
        f"{'equal' if same_tokens else 'DIFFER from'} one process's on every rank; prompt logits differ "
        f"by at most {logits_diff:.1e}"
    )
    figures |= {
        "nproc": world,
        "device": device,
        "new_tokens": args.new_tokens,
        "tp_tokens_equal_single": same_tokens,
        "tp_logits_max_diff": logits_diff,
    }
    anchor = r0.get("anchor")
    if anchor is not None:
        for name, why in anchor["skipped"].items():
            print(f"  {name} tensor parallelism did not run: {why}")
        if not anchor["ran"]:
            print("  no library tensor parallelism ran here; the written-out split stands alone")
        agree = True
        for lib in anchor["ran"]:
            lib_same = all(r["anchor"]["ran"][lib]["tokens"] == r["anchor"]["single_tokens"] for r in results)
            lib_ours = anchor["single_tokens"] == single_tokens
            agree &= lib_same and lib_ours
            print(
                f"anchor: {LIBRARY_NAMES[lib]} on the transformers Llama copy: greedy tokens "
                f"{'equal' if lib_same else 'DIFFER from'} the Llama's in one process"
                f"{', which equal ours' if lib_ours else ' (ours DIFFER)'}; logits differ by at most "
                f"{max(r['anchor']['ran'][lib]['logits_diff'] for r in results):.1e}"
            )
            if lib == "deepspeed" and device == "cpu":
                print(
                    "  (DeepSpeed all-reduces through its shared-memory kernel on a CPU; started without its "
                    "launcher, common.launch sets\n  LOCAL_SIZE as that launcher would, or 0.19.8 calls the "
                    "kernel uninitialised and the process dies of SIGSEGV)"
                )
        if anchor["ran"]:
            figures["anchor_tokens_equal_single"] = agree
        figures |= {
            "anchor_library": ",".join(anchor["ran"]) or "none",
            "anchor_skipped": "; ".join(f"{k}: {v}" for k, v in anchor["skipped"].items()) or "none",
        }

    single_ms, tp_ms = r0["single_s"] * 1e3, r0["tp_s"] * 1e3
    comm_ms = (2 * model.config.n_layer * r0["allreduce_d_s"] + r0["allreduce_vocab_s"]) * 1e3
    print(
        f"\ndecode, {args.new_tokens} greedy tokens (with the prompt pass), "
        f"median of {args.repeats} interleaved:"
        f"\n  one process    {single_ms:7.2f} ms/token\n  {world} processes    {tp_ms:7.2f} ms/token "
        f"({single_ms / tp_ms:.2f}x the speed of one)"
    )
    print(
        f"  all-reduce latency: {r0['allreduce_d_s'] * 1e6:.0f} us for {model.config.d_model} values, "
        f"{r0['allreduce_vocab_s'] * 1e6:.0f} us for {model.config.vocab_size}; "
        f"{2 * model.config.n_layer + 1} per token = {comm_ms:.2f} ms/token of waiting"
    )
    if tp_ms > single_ms + comm_ms:
        print(
            f"  the all-reduces timed back to back account for {comm_ms:.2f} of the {tp_ms - single_ms:.2f} "
            "ms a step adds to one process's;\n  the rest is the ranks waiting on each other inside "
            "the step: each all-reduce ends when the\n  slower rank arrives, and a rank that slept while "
            "waiting must be scheduled again"
        )
    if device == "cpu":
        print(
            f"  each process, the one-process run included, used {r0['threads']} thread(s) of this machine's "
            f"{os.cpu_count()} cores.\n"
            "  Splitting a layer halves matrix products that take microseconds here and adds an\n"
            "  all-reduce through gloo's sockets after each: on a CPU the waiting outweighs the halved\n"
            "  work. Between GPUs, NVLink or PCIe carry those bytes, and at 13B a decode step takes the\n"
            "  time of reading the weights: each GPU reads its half, so the split shortens the step as\n"
            "  well as making the model fit."
        )
    figures |= {
        "single_ms_per_token": single_ms,
        "tp_ms_per_token": tp_ms,
        "tp_speedup": single_ms / tp_ms,
        "allreduce_us_d_model": r0["allreduce_d_s"] * 1e6,
        "allreduce_us_vocab": r0["allreduce_vocab_s"] * 1e6,
        "allreduce_ms_per_token": comm_ms,
    }
    return figures


if __name__ == "__main__":
    run_script(main)
