"""A model's size on disk: written in its real format, then measured (chapter 7's compression scripts).

    fp = save_safetensors(model, "out/fp32")            # out/fp32/model.safetensors; its bytes
    q = path_bytes(save_quantized(packed, "out/int4", {...}))   # every file of the folder
    onnx = onnx_bytes("out/lm.onnx")                    # the graph and the weights files it names

Each file is written under a temporary name and renamed when complete. Sizes are bytes of the files as
written (headers and configs included), not parameter counts times a
width: what a reader copies to a device.
"""

from __future__ import annotations

import os


def path_bytes(*paths: str | os.PathLike) -> int:
    """Bytes of the given files and folders (every file below a folder); missing paths count 0."""
    total = 0
    for path in paths:
        if os.path.isfile(path):
            total += os.path.getsize(path)
        elif os.path.isdir(path):
            for root, _, files in os.walk(path):
                total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _write_then_rename(path: str, write) -> int:
    """``write(temporary name)``, then one rename to ``path``: a crash mid-write never leaves a file that
    looks finished. Returns the file's bytes."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(path)


def save_safetensors(model, folder: str | os.PathLike, metadata: dict[str, str] | None = None) -> int:
    """Write ``model``'s parameters and buffers to ``folder/model.safetensors`` (shared tensors once, as
    ``safetensors.torch.save_model`` does), with ``metadata`` (text) in its header; returns the bytes."""
    from safetensors.torch import save_model

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.safetensors")
    return _write_then_rename(path, lambda tmp: save_model(model, tmp, metadata=metadata))


def save_state_dict(state: dict, folder: str | os.PathLike) -> int:
    """``torch.save`` of a state dict to ``folder/model.pt`` (for tensors safetensors cannot hold, such as
    torch's quantised ones; it loads back with ``weights_only=True``); returns the bytes."""
    import torch

    os.makedirs(folder, exist_ok=True)
    return _write_then_rename(os.path.join(folder, "model.pt"), lambda tmp: torch.save(state, tmp))


def onnx_bytes(path: str | os.PathLike) -> int:
    """Bytes of an ONNX model: the graph file plus every external-data file its initializers name (torch's
    exporter writes large weights beside the graph, as ``<name>.data``)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    files = {
        entry.value
        for tensor in graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    folder = os.path.dirname(os.path.abspath(path))
    return path_bytes(path, *(os.path.join(folder, f) for f in sorted(files)))
