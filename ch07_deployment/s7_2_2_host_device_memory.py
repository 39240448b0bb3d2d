"""Section 7.2.2: host and device memory: pinned copies, overlapping streams, memory-mapped weights.

On a GPU, weights and batches cross from host (CPU) memory to device memory. From ordinary (pageable)
host memory the driver first copies into a pinned staging buffer; from pinned (page-locked) memory the
GPU's copy engine reads directly, faster, and with ``non_blocking=True`` the copy runs on a CUDA stream
while the GPU computes on another. On a CPU that part is skipped, with the reason, and the rest runs.

On any machine the script also shows how weights reach memory at all: a safetensors file loaded in
full (read into a buffer, then into tensors), loaded with ``load_file`` (tensors over the memory-mapped
file, its pages read as they are touched), and opened lazily with ``safe_open`` to take only the tensor
needed (only its pages become resident): time and resident memory of each, measured in a fresh
process; and this machine's memory bandwidth (a large copy).

    python -m ch07_deployment.s7_2_2_host_device_memory
    python -m ch07_deployment.s7_2_2_host_device_memory --quick
"""

from __future__ import annotations

import os
import time

import torch

from common.machine import memory_bandwidth, peak_memory
from common.runner import checks_done, int_between, parse_args, quick_or_full, run_script, script_parser

MB = 2**20


def _sync():
    torch.cuda.synchronize()


def gpu_part(mbytes: int) -> dict:
    """Pageable vs pinned host-to-device bandwidth; a non-blocking copy on a side stream beside a matmul."""
    n = mbytes * MB // 4
    pageable, pinned = torch.randn(n), torch.randn(n).pin_memory()
    figures = {}
    for label, src in (("pageable", pageable), ("pinned", pinned)):
        src.to("cuda")
        _sync()
        start = time.perf_counter()
        for _ in range(5):
            src.to("cuda", non_blocking=True)
        _sync()
        figures[f"h2d_{label}_gbs"] = 5 * src.nbytes / (time.perf_counter() - start) / 1e9
        print(f"  host-to-device from {label:8} memory: {figures[f'h2d_{label}_gbs']:6.1f} GB/s")
    a = torch.randn(4096, 4096, device="cuda")

    def compute():
        for _ in range(20):
            a @ a

    def timed(overlap: bool) -> float:
        _sync()
        start = time.perf_counter()
        if overlap:
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                pinned.to("cuda", non_blocking=True)
            compute()
        else:
            pinned.to("cuda")
            _sync()
            compute()
        _sync()
        return time.perf_counter() - start

    timed(True)
    serial, overlapped = timed(False), timed(True)
    print(f"  copy then compute: {serial * 1e3:.1f} ms; ", end="")
    print(f"copy on a side stream during compute: {overlapped * 1e3:.1f} ms")
    return figures | {"serial_ms": serial * 1e3, "overlapped_ms": overlapped * 1e3}


def _write_file(path: str, mbytes: int, tensors: int = 16) -> None:
    from safetensors.torch import save_file

    n = mbytes * MB // 4 // tensors
    save_file({f"layer{i}.weight": torch.randn(n) for i in range(tensors)}, path)


def _noop_setup(path: str) -> str:
    return path


def _load_full(path: str):
    from safetensors.torch import load

    with open(path, "rb") as f:
        tensors = load(f.read())  # the whole file in a bytes buffer, then copied into tensors
    return sum(t.sum().item() for t in tensors.values())


def _load_file(path: str):
    from safetensors.torch import load_file

    tensors = load_file(path)  # tensors over the memory-mapped file: pages are read as they are touched
    return sum(t.sum().item() for t in tensors.values())


def _load_one_lazily(path: str):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:  # memory-mapped; only what is asked for is read
        return f.get_tensor("layer0.weight").sum().item()


def cpu_part(path: str, mbytes: int) -> dict:
    _write_file(path, mbytes)
    size = os.path.getsize(path) / MB
    print(f"\nLoading a {size:.0f} MiB safetensors file of 16 tensors and reading what was loaded")
    print("(from the page cache: the file was just written; resident memory counts mapped file pages too)")
    figures = {"file_mib": size}
    for key, label, work in (
        ("full", "read in full, then load()", _load_full),
        ("load_file", "load_file (memory-mapped)", _load_file),
        ("one_tensor", "safe_open, one tensor", _load_one_lazily),
    ):
        r = peak_memory(_noop_setup, work, path)
        print(f"  {label:28} {r['seconds'] * 1e3:8.1f} ms  peak resident +{r['peak_bytes'] / MB:7.1f} MiB")
        figures |= {f"{key}_ms": r["seconds"] * 1e3, f"{key}_peak_mib": r["peak_bytes"] / MB}
    return figures


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--mbytes",
        type=int_between(1, 16384),
        default=None,
        help="MiB of the weights file and of the copies (default 256, quick 32)",
    )
    args = parse_args(parser, argv)
    quick_or_full(args, mbytes=(32, 256))
    checks_done(args)

    figures = {}
    if args.device == "cuda":
        print("GPU: pageable vs pinned host memory, and overlapping a copy with compute")
        figures |= gpu_part(args.mbytes)
    else:
        reason = f"skipped: no CUDA GPU on this {args.device} run (pinned copies and CUDA streams need one)"
        print(f"GPU part: {reason}")
        figures["gpu_part"] = reason
    bw = memory_bandwidth(args.mbytes)
    print(f"\nThis machine's memory bandwidth (a {args.mbytes} MiB copy, read + write): {bw / 1e9:.1f} GB/s")
    figures["memory_bandwidth_gbs"] = bw / 1e9
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "weights.safetensors")
    try:
        figures |= cpu_part(path, args.mbytes)
    finally:
        if os.path.exists(path):
            os.remove(path)
    return figures


if __name__ == "__main__":
    run_script(main)
