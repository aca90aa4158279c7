#!/usr/bin/env python
"""CPU benchmark of the selective scan: vim2's torch backend against other pure-PyTorch scans.

Methods (each computes the full S6 of ``vim2_kernels.selective_scan_fn`` with delta_bias, softplus,
D and the z gate, so they do the same work):

* ``torch``      — ``vim2_kernels.selective_scan_fn(..., backend="torch")`` (chunked scan, this repo)
* ``reference``  — ``vim2_kernels.selective_scan_fn(..., backend="reference")`` (plain loop over time)
* ``pscan``      — mambapy's Blelloch parallel scan (``from mambapy.pscan import pscan``), used as
                   mambapy's own Mamba does: (B, L, D, N) decays and inputs, then ``hs @ C``
* ``mamba_ref``  — ``mamba_ssm``'s ``selective_scan_ref`` (only if ``mamba_ssm`` imports)

For every shape and method it reports the median wall time of forward alone (no autograd) and of
forward + backward, the peak memory the call allocates (torch allocations traced by the profiler),
and every time as a ratio to the torch backend (ratio > 1: the torch backend is that many times
faster). All in one run, on ``--threads`` CPU threads (default 1).

    python tools/bench_scan.py                      # the three default shapes, every method
    python tools/bench_scan.py --shapes vim --json bench.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

# name: (batch, dim, L, N, description)
SHAPES = {
    "vim": (2, 768, 197, 16, "ViM-S-like token mixer: B=2, dim=768, L=197, N=16"),
    "channel_mixer": (2 * 56 * 56, 1, 192, 16, "channel mixer: batch=2*56*56 tokens, dim=1, L=192, N=16"),
    "long": (1, 192, 3136, 16, "long sequence: B=1, dim=192, L=3136 (56x56 tokens), N=16"),
}
GOALS = "goals (vim shape): fwd+bwd >= 10x pscan and >= 40x reference; fwd >= 10x reference"


def make_inputs(batch: int, dim: int, seqlen: int, d_state: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Inputs as a Mamba block produces them: (batch, dim, L) u/delta/z, (batch, N, L) B/C."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(batch, dim, seqlen, generator=g),
        delta=torch.randn(batch, dim, seqlen, generator=g) * 0.5 - 1.0,
        A=-torch.exp(torch.randn(dim, d_state, generator=g) * 0.5),
        B=torch.randn(batch, d_state, seqlen, generator=g),
        C=torch.randn(batch, d_state, seqlen, generator=g),
        D=torch.randn(dim, generator=g),
        z=torch.randn(batch, dim, seqlen, generator=g),
        delta_bias=torch.randn(dim, generator=g) * 0.1,
    )


# ---------------------------------------------------------------------------------------------------
# methods: each is fn(**inputs) -> out (batch, dim, L)
# ---------------------------------------------------------------------------------------------------

def _vim2(backend: str) -> Callable:
    from vim2_kernels import selective_scan_fn

    def run(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, backend=backend)

    return run


def _pscan_method() -> Callable:
    from mambapy.pscan import pscan  # pip install mambapy

    def run(u, delta, A, B, C, D, z, delta_bias):
        # mambapy's layout: (batch, L, dim) activations, (batch, L, dim, N) decays/inputs
        x = u.transpose(1, 2)
        dt = F.softplus(delta.transpose(1, 2) + delta_bias)
        decay = torch.exp(dt.unsqueeze(-1) * A)
        inputs = (dt * x).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2)
        hs = pscan(decay, inputs)
        y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(-1) + D * x
        return (y * F.silu(z.transpose(1, 2))).transpose(1, 2)

    return run


def _mamba_ref_method() -> Callable:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    def run(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)

    return run


METHOD_FACTORIES = {
    "torch": lambda: _vim2("torch"),
    "reference": lambda: _vim2("reference"),
    "pscan": _pscan_method,
    "mamba_ref": _mamba_ref_method,
}


def load_methods(names: List[str]) -> Dict[str, Callable]:
    methods = {}
    for name in names:
        try:
            methods[name] = METHOD_FACTORIES[name]()
        except Exception as exc:  # ImportError, or a broken install of an optional package
            print(f"[skip] {name}: {type(exc).__name__}: {exc}".splitlines()[0])
    return methods


# ---------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------

def _call(fn: Callable, inputs: Dict[str, torch.Tensor], backward: bool, dout: torch.Tensor) -> None:
    if not backward:
        with torch.no_grad():
            fn(**inputs)
        return
    leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
    out = fn(**leaves)
    out.backward(dout)


def time_call(fn, inputs, backward: bool, dout, repeats: int, budget_s: float) -> float:
    """Median wall time (s) over up to ``repeats`` runs after one warm-up, within ``budget_s``."""
    _call(fn, inputs, backward, dout)  # warm-up (caches, lazy inits)
    times = []
    start = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        _call(fn, inputs, backward, dout)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 1:
            break
    return statistics.median(times)


def peak_memory(fn, inputs, backward: bool, dout) -> Optional[int]:
    """Peak bytes of torch CPU allocations made during one call (torch profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _call(fn, inputs, backward, dout)
    except Exception as exc:  # profiler unavailable in this build
        print(f"[warn] memory profiling failed: {exc}")
        return None
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def check_agreement(methods, inputs) -> Dict[str, float]:
    """Max |out - torch backend out| per method, on the benchmark inputs (sanity check)."""
    with torch.no_grad():
        ref = methods["torch"](**inputs) if "torch" in methods else None
        errs = {}
        for name, fn in methods.items():
            if ref is not None and name != "torch":
                errs[name] = float((fn(**inputs) - ref).abs().max())
    return errs


def run_shape(shape_name: str, methods: Dict[str, Callable], args) -> dict:
    batch, dim, seqlen, d_state, desc = SHAPES[shape_name]
    inputs = make_inputs(batch, dim, seqlen, d_state)
    dout = torch.randn(batch, dim, seqlen, generator=torch.Generator().manual_seed(1))
    print(f"\n== {shape_name}: {desc}")
    result = {"shape": dict(batch=batch, dim=dim, L=seqlen, N=d_state), "description": desc, "methods": {}}
    if args.check:
        for name, err in check_agreement(methods, inputs).items():
            print(f"   max |out - torch| for {name}: {err:.2e}")
    for name, fn in methods.items():
        entry = {}
        for mode, backward in (("fwd", False), ("fwd_bwd", True)):
            repeats = args.repeats if name not in ("reference", "mamba_ref") else args.slow_repeats
            entry[f"{mode}_s"] = time_call(fn, inputs, backward, dout, repeats, args.budget)
            if args.memory:
                entry[f"{mode}_peak_bytes"] = peak_memory(fn, inputs, backward, dout)
        result["methods"][name] = entry
        print(f"   {name:<10} fwd {entry['fwd_s'] * 1e3:9.1f} ms   fwd+bwd {entry['fwd_bwd_s'] * 1e3:9.1f} ms")
    base = result["methods"].get("torch")
    if base:
        for name, entry in result["methods"].items():
            for mode in ("fwd", "fwd_bwd"):
                entry[f"{mode}_ratio_vs_torch"] = entry[f"{mode}_s"] / base[f"{mode}_s"]
    return result


def _mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2 ** 20:.1f}"


def print_table(results: List[dict]) -> None:
    print("\nratio = time of the method / time of the torch backend (higher: torch backend faster)")
    header = (f"{'shape':<14}{'method':<11}{'fwd ms':>10}{'ratio':>8}{'fwd+bwd ms':>12}{'ratio':>8}"
              f"{'peak fwd MiB':>14}{'peak f+b MiB':>14}")
    print(header)
    print("-" * len(header))
    for res in results:
        for name, e in res["methods"].items():
            print(f"{res['name']:<14}{name:<11}{e['fwd_s'] * 1e3:>10.1f}{e.get('fwd_ratio_vs_torch', math.nan):>8.1f}"
                  f"{e['fwd_bwd_s'] * 1e3:>12.1f}{e.get('fwd_bwd_ratio_vs_torch', math.nan):>8.1f}"
                  f"{_mib(e.get('fwd_peak_bytes')):>14}{_mib(e.get('fwd_bwd_peak_bytes')):>14}")
    print(GOALS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=list(METHOD_FACTORIES), choices=list(METHOD_FACTORIES))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of the fast methods (median)")
    parser.add_argument("--slow-repeats", type=int, default=3, help="timed runs of the loop references")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds per (method, mode) before stopping early")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the output agreement check")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    methods = load_methods(args.methods)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads={torch.get_num_threads()}, methods: {', '.join(methods)}")
    results = []
    for shape_name in args.shapes:
        res = run_shape(shape_name, methods, args)
        res["name"] = shape_name
        results.append(res)
    print_table(results)
    if args.json:
        payload = dict(torch=torch.__version__, python=sys.version.split()[0], threads=args.threads,
                       machine=platform.machine(), results=results, goals=GOALS)
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
