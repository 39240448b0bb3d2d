"""Section 4.3.2: export the decoder LM to ONNX and run it in onnxruntime (and TensorRT where it exists).

The project's trained LM (or ``--hf-path DIR``, a local Llama-architecture Hugging Face folder) is
exported by :func:`common.onnx_export.export_decoder`: torch's exporter (``dynamo=True``) when it
works, else the TorchScript one (the output says which), with dynamic batch and sequence axes, then
checked by ``onnx.checker``. The script then shows:

1. the graph's inputs and outputs, with their dynamic axes;
2. onnxruntime's logits against PyTorch's at several batch sizes and lengths (max |difference|);
3. the latency of one forward pass in onnxruntime and in eager PyTorch at batch 1 (1, 16 and all
   context tokens) and 8, timed side by side in alternating rounds (each with its default threads),
   their ratio, and the bound on that ratio: the share of the time both spend in matrix products;
4. greedy generation through onnxruntime against PyTorch's ``generate``: the same tokens;
5. TensorRT (the ``tensorrt`` package or onnxruntime's TensorRT execution provider) when it is
   there; otherwise that part says SKIPPED and why, and the rest still passes.

    python -m ch04_transformer_moe.s4_3_2_onnx
    python -m ch04_transformer_moe.s4_3_2_onnx --hf-path ~/models/my-llama --new-tokens 30
    python -m ch04_transformer_moe.s4_3_2_onnx --quick

A reader sees which exporter ran, a logits difference of a few 1e-6, the two latencies and their ratio
at each batch size, the greedy continuations side by side and ``lm.onnx`` in the output folder.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from common.env import require_onnx_stack
from common.lm_source import add_source_args, load_decoder
from common.models.generation import decode_room_problem, generate
from common.onnx_export import ORT_GEMM_OPS, OrtLM, dynamic_axes_of, export_decoder, writable_opsets
from common.runner import (
    checks_done,
    int_between,
    parse_args,
    positive_int,
    quick_or_full,
    run_script,
    script_parser,
)
from common.timing import gemm_share, paired_ratio, race

PROMPTS = ["The return value of", "A class is"]


def tensorrt_status() -> tuple[bool, str]:
    """(usable, why): TensorRT as a Python package with a GPU, or as onnxruntime's execution provider."""
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        return True, "onnxruntime has the TensorrtExecutionProvider"
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        return False, f"tensorrt does not import ({e}); it needs an NVIDIA GPU (requirements-gpu.txt)"
    if not torch.cuda.is_available():
        return False, "tensorrt imports but there is no CUDA GPU to build an engine on"
    return False, "tensorrt imports, but onnxruntime was built without its TensorRT execution provider"


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_source_args(parser)
    parser.add_argument(
        "--new-tokens",
        type=positive_int,
        default=None,
        help="greedy tokens per prompt (default 24, quick: 8)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=None, help="timing rounds (default 30, quick: 5)"
    )
    parser.add_argument(
        "--opset",
        type=int_between(7, 1000),
        default=None,
        help="ONNX opset, up to the newest the installed onnx and onnxscript write (default: the exporter's)",
    )
    args = parse_args(parser, argv)
    require_onnx_stack()  # or SKIP with the reason and the install hint
    if args.opset is not None:
        lowest, newest, why = writable_opsets()
        if not lowest <= args.opset <= newest:
            parser.error(f"argument --opset: from {lowest} to {newest} ({why}), got {args.opset}")
    quick_or_full(args, new_tokens=(8, 24), repeats=(5, 30))
    new_tokens, repeats = args.new_tokens, args.repeats
    source, model = load_decoder(parser, args, "ONNX export")
    model = model.cpu().eval()  # both sides of the comparison run on the CPU
    ctx = model.config.context_length
    problem = decode_room_problem([source.encode(p) for p in PROMPTS], new_tokens, ctx)
    if problem:
        parser.error(f"--new-tokens {new_tokens}: {problem}")
    checks_done(args)
    print(f"model: {source.describe()}")

    path = os.path.join(args.out, "lm.onnx")
    info = export_decoder(model, path, opset=args.opset)
    print(
        f"\n1. exported with the {info['exporter']} exporter (opset {info['opset']}) to {path}, "
        f"{info['bytes'] / 1e6:.1f} MB; onnx.checker: passed"
    )
    if info["fallback_reason"]:
        print(f"   (the dynamo exporter failed: {info['fallback_reason']})")
    for name, dims in dynamic_axes_of(path).items():
        print(f"   {name:<10} {dims}")

    # idle onnxruntime threads would busy-wait through PyTorch's turn in the alternating timing
    session = OrtLM(path, providers=["CPUExecutionProvider"], spinning=False)
    print(f"\n2. onnxruntime {session.providers[0]} against PyTorch eager (fp32)")
    g = torch.Generator().manual_seed(args.seed)
    max_diff = 0.0
    for shape in [(1, 1), (1, ctx), (8, ctx // 2 + 3)]:
        x = torch.randint(0, model.config.vocab_size, shape, generator=g)
        with torch.inference_mode():
            want = model(x)[0].numpy()
        diff = float(np.abs(session(x) - want).max())
        max_diff = max(max_diff, diff)
        print(f"   input {shape}: max |logits difference| = {diff:.2e}")

    print(
        f"\n3. latency of one forward pass ({repeats} alternating rounds, torch threads "
        f"{torch.get_num_threads()}, onnxruntime threads: its default, not spinning)"
    )
    figures = {}
    shapes = [(1, n) for n in sorted({1, min(16, ctx), ctx})] + [(8, ctx)]
    for batch, seq in shapes:
        x = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
        x_np = x.numpy()

        def eager(x=x):
            with torch.inference_mode():
                model(x)

        times = race({"ort": lambda x_np=x_np: session(x_np), "eager": eager}, repeats)
        ratio = paired_ratio(times["ort"], times["eager"])
        ort_ms, eager_ms = (1e3 * float(np.median(times[k])) for k in ("ort", "eager"))
        print(
            f"   batch {batch}, {seq:4d} tokens: onnxruntime {ort_ms:7.2f} ms   eager {eager_ms:7.2f} ms   "
            f"ratio {ratio:.2f}x"
        )
        key = f"b{batch}" if seq == ctx else f"b{batch}_s{seq}"
        figures.update({f"ort_ms_{key}": ort_ms, f"eager_ms_{key}": eager_ms, f"ort_over_eager_{key}": ratio})

    # Where the ratio stops falling: what is left when all the framework overhead is gone are the GEMMs
    x = torch.randint(0, model.config.vocab_size, (1, ctx), generator=g)
    with torch.inference_mode():
        share = gemm_share(lambda: model(x))
    ort_gemm_ms = sum(ms for op, ms in session.kernel_ms(x).items() if op in ORT_GEMM_OPS)
    floor = ort_gemm_ms / figures["eager_ms_b1"]
    print(
        f"   the bound at batch 1, {ctx} tokens: eager spends {share:.0%} of its time in matrix products "
        f"(torch profiler); onnxruntime's MatMul kernels alone take {ort_gemm_ms:.2f} ms = {floor:.2f}x "
        f"eager's whole forward (its profiler), so no graph optimisation takes the ratio below {floor:.2f}x. "
        f"What onnxruntime saves is the framework overhead around the GEMMs, the larger share of short inputs"
    )
    figures.update({"eager_gemm_share_b1": share, "ort_gemm_ms_b1": ort_gemm_ms, "ort_gemm_floor_b1": floor})

    print(f"\n4. greedy decoding, {new_tokens} new tokens (onnxruntime reruns the whole sequence each step)")
    same = 0
    for text in PROMPTS:
        prompt = source.encode(text)
        ours = generate(model, [prompt], new_tokens, stop_tokens=source.eot_id)[0]
        theirs = session.greedy(prompt, new_tokens, stop_tokens=source.eot_id)
        same += ours == theirs
        print(f"   {text!r}\n     pytorch    : {source.decode(ours)!r}")
        print(f"     onnxruntime: {source.decode(theirs)!r}")
    print(f"   identical tokens: {same} of {len(PROMPTS)} prompts")
    if same != len(PROMPTS):
        raise AssertionError("onnxruntime's greedy tokens differ from PyTorch's")
    if max_diff > 1e-4:
        raise AssertionError(f"onnxruntime's logits differ from PyTorch's by {max_diff:.2e} > 1e-4")

    usable, why = tensorrt_status()
    if usable:
        trt = OrtLM(path, providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"])
        x = torch.randint(0, model.config.vocab_size, (1, ctx), generator=g)
        with torch.inference_mode():
            trt_diff = float(np.abs(trt(x) - model(x)[0].numpy()).max())
        print(f"\n5. TensorRT through onnxruntime: max |logits difference| = {trt_diff:.2e}")
        figures["tensorrt_max_abs_diff"] = trt_diff
    else:
        print(f"\n5. TensorRT: SKIPPED ({why})")
    return {
        "model": source.name,
        "exporter": info["exporter"],
        "opset": info["opset"],
        "onnx_bytes": info["bytes"],
        "max_abs_logit_diff": max_diff,
        **figures,
        "greedy_identical": same == len(PROMPTS),
        "tensorrt": "ran" if usable else f"SKIPPED: {why}",
        "ort_provider": session.providers[0],
        "torch_threads": torch.get_num_threads(),
        "ort_spinning": False,
    }


if __name__ == "__main__":
    run_script(main)
