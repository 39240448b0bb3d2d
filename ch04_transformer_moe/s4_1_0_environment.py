"""Section 4.1.0: the verification environment.

Before any model, the book checks the machine it runs on: operating system, CPU and its vector
instructions, memory, Python, torch with its CUDA and cuDNN, the GPUs, and every library the later
sections use, each with its version and whether it really imports. Known version troubles (NumPy 2
with an old torch, auto-gptq with transformers 5, autoawq's torch pin, DeepSpeed without dm-tree ...)
come out as warnings. Finally one matrix product runs on the chosen device, in fp32 and in the
device's low-precision dtype, and is checked against float64.

    python -m ch04_transformer_moe.s4_1_0_environment [--device cuda]

A reader sees the environment report, the device chosen and why, and the matmul check.
"""

from __future__ import annotations

import time

from common.env import choose_dtype, environment_report, format_report
from common.runner import checks_done, int_between, parse_args, quick_or_full, run_script, script_parser


def matmul_check(device: str, size: int) -> dict:
    """One (size x size) matmul in fp32 and in the device's preferred dtype, errors against float64."""
    import torch

    a = torch.randn(size, size, dtype=torch.float64)
    b = torch.randn(size, size, dtype=torch.float64)
    exact = a @ b
    scale = exact.abs().max().item()
    out = {}
    dtype, _ = choose_dtype(device)
    for name, dt in {"fp32": torch.float32, "low": dtype}.items():
        x, y = a.to(device, dt), b.to(device, dt)
        (x @ y).sum().item()  # warm-up
        start = time.perf_counter()
        z = x @ y
        z.sum().item()  # forces the device to finish
        seconds = time.perf_counter() - start
        out[f"matmul_{name}_rel_err"] = (z.double().cpu() - exact).abs().max().item() / scale
        out[f"matmul_{name}_gflops"] = 2 * size**3 / seconds / 1e9
    out["low_dtype"] = str(dtype).removeprefix("torch.")
    return out


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--size",
        type=int_between(1, 16384),
        default=None,
        help="matrix size of the matmul check (quick: 256)",
    )
    args = parse_args(parser, argv)
    quick_or_full(args, size=(256, 2048))
    size = args.size
    checks_done(args)

    report = environment_report()
    print(format_report(report))
    print(f"\nDevice: {args.device} ({args.device_reason})")
    dtype, why = choose_dtype(args.device)
    print(f"Compute dtype: {dtype} ({why})")

    check = matmul_check(args.device, size)
    print(
        f"\n{size}x{size} matmul on {args.device}: fp32 rel. error {check['matmul_fp32_rel_err']:.1e} "
        f"({check['matmul_fp32_gflops']:.1f} GFLOP/s); {check['low_dtype']} rel. error "
        f"{check['matmul_low_rel_err']:.1e} ({check['matmul_low_gflops']:.1f} GFLOP/s)"
    )
    if check["matmul_fp32_rel_err"] > 1e-4:
        raise RuntimeError(
            f"fp32 matmul is off by {check['matmul_fp32_rel_err']:.1e}: the device is not healthy"
        )

    t = report["torch"]
    figures = {
        "device": args.device,
        "warnings": len(report["warnings"]),
        "torch": t["version"],
        "python": report["python"],
        "cuda": t["cuda"] or "none",
        "gpu": t["gpus"][0]["name"] if t["gpus"] else "none",
        "cpu_capability": t["cpu_capability"],
    }
    for name, p in report["packages"].items():
        if name == "torch":
            continue
        figures[p["name"]] = (
            (p["version"] if p["imports"] else f"{p['version']} (does not import)")
            if p["version"]
            else "not installed"
        )
    figures.update(check)
    figures["warning_text"] = " | ".join(report["warnings"])
    return figures


if __name__ == "__main__":
    run_script(main)
