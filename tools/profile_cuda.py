"""Where the time goes on a CUDA device: the selective scan alone and a whole ViM2, kernel by kernel.

    python tools/profile_cuda.py [--model vim2_tiny] [--size 1024] [--batch-size 1] [--rows 15]

For each workload (the scan at issue 2's shape, forward+backward; the model's inference; one training
step) it prints:

* wall ms per iteration (host clock around synchronised iterations) and GPU-busy ms per iteration (sum
  of the CUDA kernels' own times from torch.profiler). Wall >> GPU-busy means the host (Python, launch
  overhead, synchronisation) is the bottleneck, not the kernels;
* kernel launches per iteration;
* the kernels with the most GPU time.

Run by tools/gpu_check.sh after the benchmarks; needs a CUDA device (exits with a message otherwise).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("profile_cuda.py: unset TRITON_INTERPRET (it would profile the CPU interpreter)")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def _kernel_time_us(event) -> float:
    # FunctionEventAvg's field was renamed cuda -> device in torch 2.4; accept both.
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def _is_kernel(event) -> bool:
    device_type = getattr(event, "device_type", None)
    return device_type is not None and "CUDA" in str(device_type)


def report(name: str, step: Callable[[], None], iters: int, rows: int) -> None:
    for _ in range(3):  # compile Triton kernels, warm the caching allocator
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / iters

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if _is_kernel(e)]
    busy_ms = sum(_kernel_time_us(e) for e in kernels) / 1e3 / iters
    launches = sum(e.count for e in kernels) / iters
    print(f"\n== {name}: wall {wall_ms:.3f} ms/iter, GPU busy {busy_ms:.3f} ms/iter "
          f"({100 * busy_ms / wall_ms:.0f}% of wall), {launches:.0f} kernel launches/iter")
    kernels.sort(key=_kernel_time_us, reverse=True)
    for e in kernels[:rows]:
        t = _kernel_time_us(e) / 1e3 / iters
        print(f"  {t:8.3f} ms {100 * t / max(busy_ms, 1e-9):5.1f}%  x{e.count / iters:<5.0f} {e.key[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vim2_tiny")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rows", type=int, default=15, help="kernels listed per workload")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_cuda.py: needs a CUDA device")
    dev = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}")

    import vim2_kernels

    batch, dim, L, N = 2, 768, 197, 16
    g = torch.Generator(device=dev).manual_seed(0)
    u, delta, z = (torch.randn(batch, dim, L, device=dev, generator=g, requires_grad=True) for _ in range(3))
    B, C = (torch.randn(batch, 1, N, L, device=dev, generator=g, requires_grad=True) for _ in range(2))
    A = (-torch.rand(dim, N, device=dev, generator=g) - 0.2).requires_grad_()
    D, bias = (torch.randn(dim, device=dev, generator=g, requires_grad=True) for _ in range(2))

    def scan_step():
        out = vim2_kernels.selective_scan_fn(u, delta, A, B, C, D, z, bias, delta_softplus=True, backend="triton")
        out.sum().backward()

    report(f"selective scan fwd+bwd, B{batch} dim{dim} L{L} N{N}, float32", scan_step, 20, args.rows)

    import timm
    import vim2  # noqa: F401  registers the models

    model = timm.create_model(args.model).to(dev)
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=dev)

    def infer_step():
        with torch.inference_mode():
            model.eval()(x)

    def train_step():
        model.train()(x).sum().backward()
        model.zero_grad(set_to_none=True)

    shape = f"{args.model}, batch {args.batch_size}, {args.size}x{args.size}, float32"
    report(f"inference {shape}", infer_step, args.iters, args.rows)
    report(f"training step {shape}", train_step, args.iters, args.rows)
    print(f"\npeak memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
