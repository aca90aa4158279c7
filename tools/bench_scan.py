#!/usr/bin/env python
"""CPU benchmark of the selective scan: vim2's CPU backends against other CPU scans.

Methods (each computes the full S6 of ``vim2_kernels.selective_scan_fn`` with delta_bias, softplus,
D and the z gate, so they do the same work):

* ``cpu``        — ``vim2_kernels.selective_scan_fn(..., backend="cpu")`` (compiled C kernels, the CPU default)
* ``torch``      — ``vim2_kernels.selective_scan_fn(..., backend="torch")`` (pure-PyTorch chunked scan)
* ``torch_2level`` — the same with the streamed scan turned off (two-level scheme at every shape)
* ``reference``  — ``vim2_kernels.selective_scan_fn(..., backend="reference")`` (plain loop over time)
* ``pscan``      — mambapy's Blelloch parallel scan (``from mambapy.pscan import pscan``), used as
                   mambapy's own Mamba does: (B, L, D, N) decays and inputs, then ``hs @ C``
* ``mamba_ref``  — ``mamba_ssm``'s ``selective_scan_ref`` (only if ``mamba_ssm`` imports)

For every shape and method it reports the median wall time of forward alone (no autograd) and of
forward + backward, the peak memory the call allocates (torch allocations traced by the profiler),
and every time as a ratio to the ``--base`` method (default ``cpu``, else ``torch``; ratio > 1: the
base is that many times faster). All in one run, on ``--threads`` CPU threads (default 1).

    python tools/bench_scan.py                      # the three default shapes, every method
    python tools/bench_scan.py --shapes vim --json bench.json
    python tools/bench_scan.py --methods torch pscan  # quick: skips the plain-loop reference

The full default run takes about 10 minutes on one thread, most of it in the plain-loop reference's
forward + backward on the 3136-long sequence (about 2 minutes per call).
"""
from __future__ import annotations

import argparse
import contextlib
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
BASE = "cpu"  # the method every ratio is taken against (set by --base)


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

    if backend == "torch":
        from vim2_kernels.selective_scan.torch_backend import release_workspace

        run.release_cached_memory = release_workspace
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
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    except ImportError as exc:  # mamba_ssm's module imports its CUDA extension at import time
        raise ImportError(f"{exc} (selective_scan_ref lives in mamba_ssm.ops.selective_scan_interface, which "
                          "needs mamba_ssm's compiled CUDA extension to import)") from exc

    def run(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)

    return run


SLOW_METHODS = ("reference", "mamba_ref")  # plain loops over time: fewer timed runs

def _torch_two_level() -> Callable:
    """The torch backend with its streamed scan turned off (the two-level scheme for every shape)."""
    from vim2_kernels.selective_scan import torch_backend

    run = _vim2("torch")

    @contextlib.contextmanager
    def context():  # held over forward and backward
        saved = torch_backend.STREAM_MIN_STEP_ELEMS
        torch_backend.STREAM_MIN_STEP_ELEMS = 1 << 62
        try:
            yield
        finally:
            torch_backend.STREAM_MIN_STEP_ELEMS = saved

    run.context = context
    return run


METHOD_FACTORIES = {
    "cpu": lambda: _vim2("cpu"),
    "torch": lambda: _vim2("torch"),
    "torch_2level": _torch_two_level,
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
    with getattr(fn, "context", contextlib.nullcontext)():  # a method's settings, if it has any
        if not backward:
            with torch.no_grad():
                fn(**inputs)
            return
        leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
        out = fn(**leaves)
        out.backward(dout)


def _timed(fn, inputs, backward: bool, dout):
    w0, c0 = time.perf_counter(), time.process_time()
    _call(fn, inputs, backward, dout)
    return time.perf_counter() - w0, time.process_time() - c0


def time_methods(methods: Dict[str, Callable], inputs, backward: bool, dout, args) -> Dict[str, dict]:
    """Round-robin timing: every round runs each method once, so that all methods see the same
    machine load; ratios to the base method are taken within a round, then the median.

    The fast methods get one untimed warm-up run; the plain loops (no lazy state) are not warmed up
    and stop repeating once they have used ``args.budget`` seconds.
    """
    wanted = {name: (args.slow_repeats if name in SLOW_METHODS else args.repeats) for name in methods}
    runs = {name: [] for name in methods}
    spent = {name: 0.0 for name in methods}
    for name, fn in methods.items():
        if name not in SLOW_METHODS:
            _call(fn, inputs, backward, dout)
    for round_ in range(max(wanted.values())):
        for name, fn in methods.items():
            if round_ < wanted[name] and (round_ == 0 or spent[name] < args.budget):
                wall, cpu = _timed(fn, inputs, backward, dout)
                spent[name] += wall
                runs[name].append((round_, wall, cpu))
    base = {r: (w, c) for r, w, c in runs.get(BASE, [])}
    stats = {}
    for name, rows in runs.items():
        wall = [w for _, w, _ in rows]
        cpu = [c for _, _, c in rows]
        ratio_wall = [w / base[r][0] for r, w, _ in rows if r in base]
        ratio_cpu = [c / base[r][1] for r, _, c in rows if r in base]
        stats[name] = dict(
            wall_s=statistics.median(wall), cpu_s=statistics.median(cpu), runs=len(rows),
            ratio_vs_base=statistics.median(ratio_wall) if ratio_wall else math.nan,
            cpu_ratio_vs_base=statistics.median(ratio_cpu) if ratio_cpu else math.nan,
        )
    return stats


def peak_memory(fn, inputs, backward: bool, dout) -> Optional[int]:
    """Peak bytes of torch CPU allocations made during one call (torch profiler memory events).

    Buffers a method keeps between calls (the torch backend's block workspace) are released first,
    so that they are counted.
    """
    from torch.profiler import ProfilerActivity, profile

    reset = getattr(fn, "release_cached_memory", None)
    if reset is not None:
        reset()

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
    """Max |out - base method out| per method, on the benchmark inputs (sanity check)."""
    with torch.no_grad():
        ref = methods[BASE](**inputs) if BASE in methods else None
        errs = {}
        for name, fn in methods.items():
            if ref is not None and name != BASE:
                with getattr(fn, "context", contextlib.nullcontext)():
                    errs[name] = float((fn(**inputs) - ref).abs().max())
    return errs


def run_shape(shape_name: str, methods: Dict[str, Callable], args) -> dict:
    batch, dim, seqlen, d_state, desc = SHAPES[shape_name]
    inputs = make_inputs(batch, dim, seqlen, d_state)
    dout = torch.randn(batch, dim, seqlen, generator=torch.Generator().manual_seed(1))
    print(f"\n== {shape_name}: {desc}", flush=True)
    result = {"shape": dict(batch=batch, dim=dim, L=seqlen, N=d_state), "description": desc, "modes": {}}
    if args.check:
        for name, err in check_agreement(methods, inputs).items():
            print(f"   max |out - {BASE}| for {name}: {err:.2e}")
    for mode, backward in (("fwd", False), ("fwd_bwd", True)):
        stats = time_methods(methods, inputs, backward, dout, args)
        if args.memory:
            for name, fn in methods.items():
                # the profiler's bookkeeping for a plain loop over thousands of steps costs minutes and GiBs
                if stats[name]["wall_s"] <= args.memory_max_s:
                    stats[name]["peak_bytes"] = peak_memory(fn, inputs, backward, dout)
        result["modes"][mode] = stats
        for name, st in stats.items():
            print(f"   {mode:<8}{name:<13} {st['wall_s'] * 1e3:9.1f} ms wall  {st['cpu_s'] * 1e3:9.1f} ms cpu  "
                  f"x{st['ratio_vs_base']:.1f} ({st['runs']} runs)", flush=True)
    return result


def _mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2 ** 20:.1f}"


def print_table(results: List[dict]) -> None:
    print(f"\nratio = method time / {BASE} time, median over rounds that ran every method back to back"
          "\n(wall clock; cpu = process CPU time, less sensitive to other load on the machine)")
    header = (f"{'shape':<14}{'mode':<9}{'method':<13}{'ms':>9}{'ratio':>8}{'cpu ratio':>10}{'peak MiB':>10}")
    print(header)
    print("-" * len(header))
    for res in results:
        for mode, stats in res["modes"].items():
            for name, st in stats.items():
                print(f"{res['name']:<14}{mode:<9}{name:<13}{st['wall_s'] * 1e3:>9.1f}{st['ratio_vs_base']:>8.1f}"
                      f"{st['cpu_ratio_vs_base']:>10.1f}{_mib(st.get('peak_bytes')):>10}")
    print(GOALS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=list(METHOD_FACTORIES), choices=list(METHOD_FACTORIES))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of the fast methods (median)")
    parser.add_argument("--slow-repeats", type=int, default=3, help="timed runs of the loop references")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="seconds per (shape, mode) after which a loop reference stops repeating")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--memory-max-s", type=float, default=10.0,
                        help="profile peak memory only for calls faster than this (seconds)")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the output agreement check")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--base", default=None, help="method the ratios are taken against (default: cpu if it "
                        "loads, else torch)")
    args = parser.parse_args(argv)

    global BASE
    torch.set_num_threads(args.threads)
    methods = load_methods(args.methods)
    from vim2_kernels import backend_status
    if "cpu" in methods and backend_status(torch.device("cpu"))["cpu"] is not None:
        print(f"[skip] cpu: {backend_status(torch.device('cpu'))['cpu']}")
        del methods["cpu"]
    BASE = args.base or ("cpu" if "cpu" in methods else "torch")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads={torch.get_num_threads()}, methods: {', '.join(methods)}")
    results = []
    for shape_name in args.shapes:
        res = run_shape(shape_name, methods, args)
        res["name"] = shape_name
        results.append(res)
    print_table(results)
    if args.json:
        payload = dict(torch=torch.__version__, python=sys.version.split()[0], threads=args.threads, base=BASE,
                       machine=platform.machine(), results=results, goals=GOALS)
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
