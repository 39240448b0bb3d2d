"""ONNX export of the decoder LM and inference with onnxruntime (chapter 4.3's export, chapter 7's edge
deployment).

    info = export_decoder(model, "lm.onnx")          # dynamic batch and sequence axes; info["exporter"]
    session = OrtLM("lm.onnx")                       # onnxruntime, CPU (or CUDA when it is there)
    logits = session(input_ids)                      # (batch, seq) ids -> numpy (batch, seq, vocab)
    tokens = session.greedy(prompt_ids, 20)          # greedy continuation, step by step through ORT
    session.kernel_ms(input_ids)                     # ms per run in each operator type (ORT's profiler)
    evaluate_lm(OrtDecoder(session), data, device="cpu")   # the session where a model is expected

The exported graph maps ``input_ids`` (int64, batch x seq) to ``logits`` (float, batch x seq x vocab):
the model's whole forward without a KV cache, so :meth:`OrtLM.greedy` runs the growing sequence again
at every step (the simple export; a cached decoder needs the cache as graph inputs and outputs).
:func:`export_decoder` tries torch's current exporter first (``torch.onnx.export(..., dynamo=True)``,
which traces with ``torch.export`` and writes through onnxscript) and falls back to the TorchScript
exporter, and says which one wrote the file and why the first failed.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

ORT_GEMM_OPS = ("MatMul", "FusedMatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul")  # int8 ones too


def writable_opsets() -> tuple[int, int, str]:
    """``(lowest, newest, why)``: the opsets :func:`export_decoder` can write with the installed libraries.

    Below 18 torch's exporter writes 18 and converts down, falling back to 18 where it cannot.  Above
    18 the graph goes through onnxscript's version converter, which stops at its
    ``SUPPORTED_MAX_ONNX_OPSET`` (25 in onnxscript 0.7) even where onnx itself knows newer opsets: asked
    for 26 to 28 with onnx 1.23, the export ends in onnx's ``ValidationError`` (measured)."""
    import onnx

    newest, why = onnx.defs.onnx_opset_version(), f"onnx {onnx.__version__}'s newest"
    try:
        from onnxscript.version_converter import _version_converter

        converter = int(_version_converter.SUPPORTED_MAX_ONNX_OPSET)
    except (ImportError, AttributeError):  # an onnxscript without it: onnx's bound alone
        converter = newest
    if converter < newest:
        import onnxscript

        newest, why = converter, f"onnxscript {onnxscript.__version__}'s version converter's newest"
    return 7, newest, why  # torch's exporters start at 7


class LogitsOnly(nn.Module):
    """The graph to export: ``input_ids -> logits`` (the model's loss and cache paths left out)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[0]  # (batch, seq, vocab)


def export_decoder(model: nn.Module, path: str, opset: int | None = None, dynamo: bool = True) -> dict:
    """Write ``model`` (a DecoderLM, on the CPU, in eval mode) as ONNX with dynamic batch and sequence
    axes, check it with ``onnx.checker`` and return ``{"exporter", "opset", "fallback_reason", "bytes"}``.

    ``dynamo=False`` goes straight to the TorchScript exporter.
    """
    import onnx

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    graph = LogitsOnly(model).eval()
    context = model.config.context_length
    example = torch.zeros(2, min(8, context), dtype=torch.long)
    fallback_reason = None
    exporter = "dynamo"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' notes on deprecations and traced conditions
        if dynamo:
            try:
                batch = torch.export.Dim("batch", min=1, max=4096)
                seq = torch.export.Dim("seq", min=1, max=context)
                program = torch.onnx.export(
                    graph,
                    (example,),
                    input_names=["input_ids"],
                    output_names=["logits"],
                    dynamic_shapes={"input_ids": {0: batch, 1: seq}},
                    opset_version=opset,
                    dynamo=True,
                    verbose=False,
                )
                program.save(path)
            except Exception as e:  # noqa: BLE001 - any exporter failure sends us to the fallback
                fallback_reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                dynamo = False
        if not dynamo:
            exporter = "torchscript"
            try:
                torch.onnx.export(
                    graph,
                    (example,),
                    path,
                    input_names=["input_ids"],
                    output_names=["logits"],
                    dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
                    opset_version=opset or 17,
                    dynamo=False,
                )
            except Exception as e:
                if fallback_reason is None:  # the TorchScript exporter was asked for
                    raise
                raise RuntimeError(  # the first failure is the one to fix (e.g. an onnxscript too old)
                    f"torch's dynamo exporter failed ({fallback_reason}), and so did its TorchScript "
                    f"fallback ({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})"
                ) from e
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    return {
        "exporter": exporter,
        "opset": int(next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))),
        "fallback_reason": fallback_reason,
        "bytes": sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p)),
    }


def dynamic_axes_of(path: str) -> dict:
    """``{input or output name: [dimension names or sizes]}`` of an ONNX file (a name = a dynamic axis)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.input, *graph.output]
    }


class OrtLM:
    """An onnxruntime session over an exported decoder LM.

    ``providers`` defaults to CUDA when onnxruntime has it, else the CPU. ``threads`` sets the intra-op
    thread count (None: onnxruntime's default, all cores). ``spinning=False`` stops its idle threads
    from busy-waiting for the next run (``session.intra_op.allow_spinning``), which otherwise takes the
    cores from whatever runs next in the process, such as PyTorch in an alternating timing. Graph
    optimisations are onnxruntime's default (``ORT_ENABLE_ALL``).
    """

    def __init__(
        self,
        path: str,
        providers: list[str] | None = None,
        threads: int | None = None,
        spinning: bool = True,
    ):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.path = path
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, input_ids) -> np.ndarray:
        """(batch, seq) token ids (numpy or torch) -> (batch, seq, vocab) float logits (numpy)."""
        if isinstance(input_ids, torch.Tensor):
            input_ids = input_ids.cpu().numpy()
        return self.session.run(None, {self.input_name: np.ascontiguousarray(input_ids, dtype=np.int64)})[0]

    def kernel_ms(self, input_ids, rounds: int = 10) -> dict[str, float]:
        """Milliseconds per run spent in each operator type (``{"MatMul": 1.9, "Mul": 0.3, ...}``),
        from onnxruntime's own profiler, in a second session over the same file and providers."""
        import json
        import tempfile
        from collections import Counter

        import onnxruntime as ort

        if isinstance(input_ids, torch.Tensor):
            input_ids = input_ids.cpu().numpy()
        feed = {self.input_name: np.ascontiguousarray(input_ids, dtype=np.int64)}
        with tempfile.TemporaryDirectory() as tmp:
            options = ort.SessionOptions()
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(tmp, "ort")
            session = ort.InferenceSession(self.path, options, providers=self.providers)
            for _ in range(rounds + 1):
                session.run(None, feed)
            with open(session.end_profiling()) as f:
                events = json.load(f)
        runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
        warmup_end = runs[0][1]  # the first run allocates its buffers: left out
        per_op: Counter = Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > warmup_end:
                per_op[e["args"]["op_name"]] += e["dur"] / 1e3  # microseconds -> ms
        return {op: ms / rounds for op, ms in per_op.most_common()}

    def greedy(self, prompt: list[int], max_new_tokens: int, stop_tokens=None) -> list[int]:
        """Greedy continuation of one prompt: each step runs the whole sequence so far through the graph
        and appends the argmax of the last position; cut before the first stop token."""
        stops = (
            set()
            if stop_tokens is None
            else ({stop_tokens} if isinstance(stop_tokens, int) else set(stop_tokens))
        )
        ids = list(prompt)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(self(np.array([ids]))[0, -1].argmax())
            if nxt in stops:
                break
            ids.append(nxt)
            out.append(nxt)
        return out


class OrtDecoder(nn.Module):
    """An :class:`OrtLM` behind the decoder's calling convention, ``model(idx) -> (logits, None)`` with
    torch tensors, so :func:`common.lm_source.evaluate_lm` (with ``device="cpu"``) and the timing code
    treat an onnxruntime session like the PyTorch model. It has no parameters: the weights live in the
    session."""

    def __init__(self, session: OrtLM):
        super().__init__()
        self.session = session

    def forward(self, idx: torch.Tensor):
        return torch.from_numpy(self.session(idx)), None  # (batch, seq, vocab)


def int8_saturates(cpu_flags: list[str] | None = None) -> bool:
    """Whether onnxruntime's int8 kernels may saturate on this CPU: x86 without VNNI (no AVX512-VNNI,
    no AVX-VNNI) multiplies u8·s8 pairs with ``vpmaddubsw``, whose 16-bit sums overflow; onnxruntime's
    documentation advises ``reduce_range=True`` (7-bit weights) there.  ``cpu_flags`` defaults to
    this machine's (:func:`common.env.cpu_model_and_flags`)."""
    import platform

    from common.env import cpu_model_and_flags

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    flags = cpu_model_and_flags()[1] if cpu_flags is None else cpu_flags
    return not {"avx512_vnni", "avx_vnni"} & set(flags)


def quantize_dynamic_int8(fp_path: str, q_path: str, saturates: bool | None = None) -> dict:
    """onnxruntime's ``quantize_dynamic`` (int8 weights, its defaults) of ``fp_path`` into ``q_path``,
    with ``reduce_range=True`` where its int8 kernels saturate (:func:`int8_saturates`; measured on an
    AVX2 CPU without VNNI: the tiny LM's largest logit error 0.33 with the defaults, 0.064 with it).
    Returns the settings used, for the figures."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reduce_range = int8_saturates() if saturates is None else saturates
    quantize_dynamic(fp_path, q_path, weight_type=QuantType.QInt8, reduce_range=reduce_range)
    why = "; reduce_range=True: x86 without VNNI, as onnxruntime advises" if reduce_range else ""
    return {"onnxruntime_quantize": f"quantize_dynamic(weight_type=QInt8, reduce_range={reduce_range}){why}"}
