#!/usr/bin/env python
"""A/B of the compiled CPU kernels: a git revision's C sources against the working tree's, timed
alternately in one process.

Why alternately: on a shared cloud machine the speed of the whole machine drifts by 10-20% within
minutes (measured on this project's machine), as much as a kernel change is worth; two separate runs
then disagree on the sign of a change. Here both libraries are loaded side by side and every round
times each once (order alternating), so both see the same machine; the report gives each side's
minimum and median and the median of the per-round ratios (> 1: the working tree is faster), and the
largest difference of their results relative to the result's scale (0 for a change that keeps
results bitwise).

    python tools/ab_cpu_kernels.py                           # HEAD vs working tree, every op
    python tools/ab_cpu_kernels.py --base HEAD~3 --ops scan_bwd --rounds 15
    python tools/ab_cpu_kernels.py --shape 1 192 16384 16    # batch, channels, steps, d_state

Ops: ``scan_fwd`` / ``scan_bwd`` (``selective_scan_fn`` without / with backward; token-major u, Δ and
dout as in ViM2's token mixer, D, Δ bias, softplus), ``channel_mixer`` (``channel_mixer_scan``
forward+backward; ``--shape``'s steps are the tokens, its channels the expanded width). Only the C
sources differ between the sides: the Python around them is the working tree's, so a revision whose
C interface differs cannot be compared (the tool says so when its library lacks a symbol).
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
OPS = ("scan_fwd", "scan_bwd", "channel_mixer")


def build_revision(rev: str, workdir: Path):
    """The cpu backend's library compiled from ``rev``'s C sources, with the flags the working tree's
    library was built with."""
    from vim2_kernels.selective_scan import cpu_backend as cb

    current, reason = cb._load()
    if current is None:
        raise SystemExit(f"ab_cpu_kernels: the working tree's CPU kernels are unavailable: {reason}")
    csrc = workdir / "csrc"
    csrc.mkdir()
    for path in (*cb._SOURCES, *cb._HEADERS):
        relative = path.relative_to(ROOT).as_posix()
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{relative}"], capture_output=True)
        if shown.returncode != 0:
            raise SystemExit(f"ab_cpu_kernels: {relative} at {rev}: {shown.stderr.decode().strip()}")
        (csrc / path.name).write_bytes(shown.stdout)
    target = workdir / "base.so"
    error = cb._compile(cb._find_compiler(), cb._BASE_FLAGS + current.flags, target, csrc)
    if error:
        raise SystemExit(f"ab_cpu_kernels: compiling {rev}'s sources failed: {error}")
    try:
        base = cb._Library(ctypes.CDLL(str(target)), target, f"{rev}", current.flags)
    except AttributeError as exc:
        raise SystemExit(f"ab_cpu_kernels: {rev}'s library has another C interface ({exc}); compare a newer revision")
    return base, current


def make_op(op: str, batch: int, dim: int, steps: int, d_state: int) -> Callable[[], Tuple[torch.Tensor, ...]]:
    """A closure running ``op`` once on fixed random inputs; returns the output (and gradients)."""
    from bench_scan import make_inputs  # the scan benchmark's inputs (tools/ is on sys.path when run as a script)
    from vim2_kernels import channel_mixer_scan, selective_scan_fn

    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if op == "channel_mixer":
        tokens, width = steps, dim
        params = [0.5 * r(2, 4), 0.1 * r(2), r(2), 0.5 * r(2, width) - 2.0, r(2, d_state), 0.3 * r(2, d_state, width),
                  r(2, d_state), 0.3 * r(2, d_state, width), -(torch.rand(2, d_state, generator=g) * 2 + 0.2), r(2)]
        v, z, dout = r(tokens, width), r(tokens, width), r(tokens, width)
        leaves = [t.requires_grad_(True) for t in (v, z, *params)]

        def run():
            out = channel_mixer_scan(*leaves, backend="cpu")
            return (out.detach(), *torch.autograd.grad(out, leaves, dout))
        return run
    # bench_scan's inputs, with u, Δ and dout stored token-major ((batch, L, dim) seen as (batch, dim, L))
    # as ViM2's token mixer passes them
    token_major = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    x = make_inputs(batch, dim, steps, d_state)
    u, delta, dout = token_major(x["u"]), token_major(x["delta"]), token_major(r(batch, dim, steps))
    A, B, C, D, bias = x["A"], x["B"], x["C"], x["D"], x["delta_bias"]
    leaves = (u, delta, A, B, C, D)
    if op == "scan_fwd":
        def run():
            with torch.no_grad():
                return (selective_scan_fn(u, delta, A, B, C, D, None, bias, True, backend="cpu"),)
        return run
    for t in leaves:
        t.requires_grad_(True)

    def run():
        out = selective_scan_fn(u, delta, A, B, C, D, None, bias, True, backend="cpu")
        return (out.detach(), *torch.autograd.grad(out, leaves, dout))
    return run


def compare(run: Callable, libraries: Dict[str, object], rounds: int) -> Dict[str, object]:
    """Times ``run`` with each library in turn for ``rounds`` rounds (after one untimed call each)."""
    from vim2_kernels.selective_scan import cpu_backend as cb

    loader = cb._load
    times: Dict[str, List[float]] = {name: [] for name in libraries}
    results = {}
    names = list(libraries)
    try:
        for round_index in range(rounds + 1):
            for name in names if round_index % 2 == 0 else names[::-1]:
                # every kernel call asks cb._load() for the library: point it at this side's
                cb._load = lambda library=libraries[name]: (library, None)
                start = time.perf_counter()
                results[name] = run()
                elapsed = time.perf_counter() - start
                if round_index:
                    times[name].append(elapsed)
    finally:
        cb._load = loader
    base, new = names
    ratios = sorted(b / n for b, n in zip(times[base], times[new]))
    difference = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                     for a, b in zip(results[new], results[base]))
    return dict(times=times, ratio=statistics.median(ratios), ratio_range=(ratios[0], ratios[-1]),
                difference=difference)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="git revision whose C sources are the baseline")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--shape", nargs=4, type=int, default=[1, 192, 16384, 16],
                        metavar=("BATCH", "CHANNELS", "STEPS", "D_STATE"),
                        help="default: one route of ViM2-T's stage 1 at 512 px")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.rounds < 1 or min(args.shape) < 1:
        raise SystemExit("--rounds and every --shape value must be >= 1")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="vim2-ab-") as workdir:
        base, current = build_revision(args.base, Path(workdir))
        libraries = {args.base: base, "working tree": current}
        print(f"ab_cpu_kernels: {args.base} vs working tree, shape {tuple(args.shape)}, {args.threads} thread(s), "
              f"{args.rounds} rounds; library flags: {current.description}")
        for op in args.ops:
            found = compare(make_op(op, *args.shape), libraries, args.rounds)
            cells = [f"{name} min {min(t) * 1e3:.2f} ms, median {statistics.median(t) * 1e3:.2f} ms"
                     for name, t in found["times"].items()]
            low, high = found["ratio_range"]
            print(f"{op:13s} {'; '.join(cells)}; working tree {found['ratio']:.3f}x as fast "
                  f"(per-round {low:.3f}-{high:.3f}); max relative difference {found['difference']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
