#!/usr/bin/env python
"""Peak memory of the tensors a model's forward allocates, counted exactly (CPU, no allocator noise).

    python tools/peak_activation_memory.py vim2_tiny deit_small_patch16_224 --size 1024

The profiler (``profile_memory=True``) records every allocation and free of PyTorch's CPU allocator;
the running sum of those over one forward is the live activation memory, and its maximum the peak.
Unlike the peak resident set that ``bench_models.py`` reports, it excludes the weights, the framework
and what glibc keeps of freed memory, and it is the same in every run. Memory that kernels allocate
with plain ``malloc`` (the cpu scan kernels' small per-thread scratch) is not seen. A model name may
carry ``bench_models.py``'s ``+eager_attn`` suffix.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple


def live_peak_mb(fn: Callable[[], object]) -> float:
    """Peak of the tensors that ``fn()`` allocates and frees on PyTorch's CPU allocator, in MB, counted from
    the profiler's allocation events (memory held before the call does not count)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The public event lists fold allocations into the ops that made them; the raw events keep each
    # allocation and free with its time, which a running sum needs.
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        raise RuntimeError(f"torch {torch.__version__}'s profiler does not expose kineto_results (the raw "
                           "allocation events this count needs); use a torch release that does (2.1-2.14 do)")
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def peak_activation_mb(name: str, size: int, batch: int = 1, train: bool = False) -> Tuple[float, float]:
    """(peak live MB during one forward, weights MB) of ``name`` at ``size`` x ``size``; ``train``: a
    forward with autograd recording (what a training step keeps for its backward), else inference mode."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_models import _build

    model, _ = _build(name, size)
    model.train(train)
    x = torch.randn(batch, 3, size, size)
    context = torch.enable_grad if train else torch.inference_mode
    with context():
        model(x)  # first call: one-off allocations (kernel caches) stay out of the count
        peak = live_peak_mb(lambda: model(x))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return peak, weights / 2**20


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--train", action="store_true", help="forward with autograd (saved activations)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    mode = "forward with autograd" if args.train else "inference"
    for name in args.models:
        peak, weights = peak_activation_mb(name, args.size, args.batch_size, args.train)
        print(f"{name:36s} {args.size}x{args.size} {mode}: peak activations {peak:8.1f} MB "
              f"(weights {weights:.1f} MB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
