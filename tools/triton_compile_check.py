#!/usr/bin/env python
"""Compile every Triton kernel variant that vim2_kernels launches, for a GPU architecture, without a GPU.

    python tools/triton_compile_check.py [--arch 90] [--sms 132]

The test suite runs the Triton kernels on the CPU through Triton's interpreter, which executes them as
NumPy code: it accepts programs the real compiler rejects (a value typed differently in two branches, a
block shape that is not a power of two, ...). This script closes that gap on machines without a GPU. It
calls the backends' public functions (``triton_backend.scan_forward/scan_backward/scan_forward_lowrank``,
``channel_mixer_triton.channel_mixer_forward/backward``) on small CPU tensors, with each kernel launch
replaced by an ahead-of-time compilation for ``--arch`` (Triton's front end and LLVM, then the ``ptxas``
that ships with Triton), so every distinct (argument types, constexprs, num_warps) variant that those
calls produce is compiled once. The cases sweep what changes a variant: the options (z, D, Δ bias,
initial state, softplus, reverse), layouts (contiguous, token-major, two-level column-major), dtypes,
segment-parallel mode, B/C shared or gathered, dB/dC partials or atomics, the low-rank Δ (rank 1 to 64,
accumulate, checkpoints on/off) and the channel mixer's directions and gate. Nothing is executed: the
outputs stay uninitialised.

Prints one line per compiled variant and a summary; exit status 1 if any variant failed to compile.
Must run without ``TRITON_INTERPRET`` (the kernels are then real JIT functions).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Dict, List, Optional, Tuple

_TYPES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float64": "fp64",
          "torch.int64": "i64", "torch.int32": "i32"}


class AheadOfTimeCompiler:
    """Stands in for ``kernel[grid](*args, **kwargs)``: compiles the variant that launch would build."""

    def __init__(self, arch: int):
        import triton
        from triton.backends.compiler import GPUTarget

        self.triton = triton
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = triton.compiler.make_backend(self.target)
        self.seen: Dict[tuple, Optional[str]] = {}

    def signature(self, kernel, args, kwargs) -> Tuple[dict, dict, dict]:
        runtime = [p for p in kernel.params if not p.is_constexpr]
        if len(args) != len(runtime):
            raise TypeError(f"{kernel.__name__}: {len(args)} positional arguments for {len(runtime)} parameters")
        signature, constexprs = {}, {}
        for param, value in zip(runtime, args):
            if hasattr(value, "dtype") and hasattr(value, "data_ptr"):
                signature[param.name] = "*" + _TYPES[str(value.dtype)]
            elif isinstance(value, bool):
                signature[param.name] = "i1"
            elif isinstance(value, int):
                if value == 1 and not param.do_not_specialize:  # the launcher specialises integers equal to 1
                    signature[param.name], constexprs[param.name] = "constexpr", 1
                else:
                    signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            elif isinstance(value, float):
                signature[param.name] = "fp32"
            else:
                raise TypeError(f"{kernel.__name__}: argument {param.name} of type {type(value).__name__}")
        for param in kernel.params:
            if param.is_constexpr:
                signature[param.name], constexprs[param.name] = "constexpr", kwargs[param.name]
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        return {name: signature[name] for name in kernel.arg_names}, constexprs, options

    def compile(self, kernel, args, kwargs) -> None:
        signature, constexprs, options = self.signature(kernel, args, kwargs)
        key = (kernel.__name__, tuple(signature.items()), tuple(sorted(map(str, constexprs.items()))),
               tuple(sorted(options.items())))
        if key in self.seen:
            return
        flags = {k: v for k, v in constexprs.items() if k.isupper()}
        try:
            source = self.triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            compiled = self.triton.compile(source, target=self.target,
                                           options=self.backend.parse_options(options).__dict__)
            self.seen[key] = None
            print(f"ok    {kernel.__name__} {flags} {options} shared={compiled.metadata.shared}", flush=True)
        except Exception as exc:  # report every failing variant, not just the first
            self.seen[key] = f"{type(exc).__name__}: {exc}"
            print(f"FAIL  {kernel.__name__} {flags} {options}\n      {str(exc)[-2000:]}", flush=True)

    def launcher(self, kernel):
        compiler = self

        class Launch:
            __name__ = kernel.__name__

            def __getitem__(self, grid):
                return lambda *args, **kwargs: compiler.compile(kernel, args, kwargs)

        return Launch()


def intercept_launches(modules, compiler: AheadOfTimeCompiler) -> None:
    import triton

    for module in modules:
        for name in dir(module):
            obj = getattr(module, name)
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                setattr(module, name, compiler.launcher(obj))


def scan_cases(tb) -> List[Tuple[str, Callable[[], None]]]:
    """(label, call) pairs that drive the selective-scan kernels through their public functions."""
    import torch

    def seq(batch, dim, Ls, layout, dtype):
        if layout == "token_major":
            return torch.randn(batch, *Ls, dim, dtype=dtype).movedim(-1, 1)
        if layout == "col_major_2d":
            W, H = Ls
            return torch.randn(batch, H, W, dim, dtype=dtype).permute(0, 3, 2, 1)
        return torch.randn(batch, dim, *Ls, dtype=dtype)

    def scan(batch=2, dim=16, Ls=(64,), N=16, groups=1, layout="contiguous", dtype=torch.float32, z=True, D=True,
             bias=True, h0=True, softplus=True, reverse=False, dlast=True, segments=None, block_rows=None,
             bc="auto", warps=None, int64=False):
        def run():
            tb.SEGMENTS, tb.BLOCK_ROWS, tb.BC_GRAD_REDUCTION = segments, block_rows, bc
            tb.NUM_WARPS, tb.FORCE_INT64_INDEX = warps, int64
            u = seq(batch, dim, Ls, layout, dtype)
            delta = seq(batch, dim, Ls, layout, dtype)
            zz = seq(batch, dim, Ls, layout, dtype) if z else None
            B = torch.randn(batch, groups, N, *Ls, dtype=dtype)
            A = -torch.rand(dim, N)
            param = (lambda: torch.randn(dim))
            init = torch.randn(batch, dim, N) if h0 else None
            out, last, saved = tb.scan_forward(u, delta, A, B, B, param() if D else None, zz,
                                               param() if bias else None, init, softplus, reverse)
            tb.scan_backward(torch.randn(u.shape, dtype=dtype), torch.randn(batch, dim, N) if dlast else None,
                             u, delta, A, B, B, param() if D else None, zz, param() if bias else None, init, saved,
                             softplus, reverse)
        return run

    def lowrank(batch=2, H=8, W=8, dim=16, N=16, R=6, route_dims=(0, 3, 1, 2), reverse=False, dtype=torch.float32,
                accumulate=True, save=True, segments=None, block_rows=None, warps=None, int64=False):
        def run():
            tb.SEGMENTS, tb.BLOCK_ROWS = segments, block_rows
            tb.NUM_WARPS, tb.FORCE_INT64_INDEX = warps, int64
            out = torch.zeros(batch, H, W, dim, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            u = torch.randn(batch, H, W, dim, dtype=dtype)
            dts = torch.randn(batch, H, W, R, dtype=dtype).permute(*route_dims).unsqueeze(1)
            B = torch.randn(batch, H, W, N, dtype=dtype).permute(*route_dims).unsqueeze(1)
            seq_out, seq_u = out.permute(*route_dims), u.permute(*route_dims)
            saved = torch.empty(tb.saved_shape(batch, dim, H * W, N), dtype=out.dtype) if save else None
            tb.scan_forward_lowrank(seq_out, seq_u, dts, torch.randn(dim, R), -torch.rand(dim, N), B, B,
                                    torch.randn(dim), torch.randn(dim), True, reverse, accumulate, saved)
        return run

    row, col = (0, 3, 1, 2), (0, 3, 2, 1)
    cases = [
        ("scan: every option, one sequence", scan()),
        ("scan: no options", scan(z=False, D=False, bias=False, h0=False, softplus=False, dlast=False)),
        ("scan: reverse, segments", scan(reverse=True, segments=3, Ls=(200,))),
        ("scan: groups, atomics", scan(dim=32, groups=2, bc="atomic")),
        ("scan: partials", scan(dim=64, bc="partials", block_rows=4)),
        ("scan: channel-mixer shape (one row per group)", scan(batch=64, dim=1, N=16, Ls=(192,))),
        ("scan: token-major", scan(layout="token_major")),
        ("scan: two-level column-major", scan(layout="col_major_2d", Ls=(8, 6))),
        ("scan: float16", scan(dtype=torch.float16)),
        ("scan: bfloat16, reverse", scan(dtype=torch.bfloat16, reverse=True)),
        ("scan: float64", scan(dtype=torch.float64, N=4)),
        ("scan: tiles straddling groups", scan(dim=6, groups=2, block_rows=4)),
        ("scan: one warp, segments", scan(warps=1, segments=3, Ls=(200,))),
        ("scan: int64 offsets, two-level, segments", scan(int64=True, layout="col_major_2d", Ls=(20, 10),
                                                          segments=3)),
    ]
    for R in (1, 6, 24, 64):
        cases.append((f"low-rank: rank {R}, row route, segments", lowrank(R=R, segments=2)))
    cases += [
        ("low-rank: column route reversed, first route", lowrank(route_dims=col, reverse=True, accumulate=False)),
        ("low-rank: tiles straddling batch elements", lowrank(dim=6, block_rows=4, route_dims=col)),
        ("low-rank: inference (no checkpoints)", lowrank(save=False)),
        ("low-rank: one warp, int64 offsets, segments", lowrank(warps=1, int64=True, segments=3, route_dims=col)),
        ("low-rank: bfloat16 maps", lowrank(dtype=torch.bfloat16, route_dims=col)),
        ("low-rank: float16 maps, segments", lowrank(dtype=torch.float16, segments=3)),
        ("low-rank: ViM2-T stage 1 at 224 px", lowrank(batch=1, H=56, W=56, dim=192, R=6, route_dims=col)),
    ]
    return cases


def channel_mixer_cases(cmt) -> List[Tuple[str, Callable[[], None]]]:
    import torch

    def mixer(tokens=64, length=192, N=16, width=4, gate=True, dtype=torch.float32):
        def run():
            v = torch.randn(tokens, length, dtype=dtype)
            z = torch.randn(tokens, length, dtype=dtype) if gate else None
            params = (torch.randn(2, width), torch.randn(2), torch.randn(2), torch.randn(2, length),
                      torch.randn(2, N), torch.randn(2, N, length), torch.randn(2, N), torch.randn(2, N, length),
                      -torch.rand(2, N), torch.randn(2))
            cmt.channel_mixer_forward(v, z, *params)
            out, saved, y = cmt.channel_mixer_forward(v, z, *params, keep_for_backward=True)
            cmt.channel_mixer_backward(torch.randn_like(out), v, z, *params, saved, y)
        return run

    return [
        ("channel mixer: ViM2 stage 1", mixer()),
        ("channel mixer: no gate, conv width 3, N 4", mixer(gate=False, width=3, N=4, length=50)),
        ("channel mixer: bfloat16", mixer(dtype=torch.bfloat16)),
        ("channel mixer: float64", mixer(dtype=torch.float64, N=4)),
    ]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (80 = A100, 90 = H100)")
    parser.add_argument("--sms", type=int, default=132, help="SM count the tiling heuristics assume")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("triton_compile_check.py: unset TRITON_INTERPRET (the kernels must be real JIT functions)")
        return 2
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as exc:
        print(f"triton_compile_check.py: triton with its CUDA backend is needed: {type(exc).__name__}: {exc}")
        return 2
    from vim2_kernels import channel_mixer_triton as cmt
    from vim2_kernels.selective_scan import triton_backend as tb

    compiler = AheadOfTimeCompiler(args.arch)
    intercept_launches([tb, cmt], compiler)
    tb._check_ready = lambda tensor: None  # the tensors are on the CPU: nothing runs, only compiles
    tb._num_sms = lambda device: args.sms
    errors = []
    for label, run in scan_cases(tb) + channel_mixer_cases(cmt):
        print(f"-- {label}", flush=True)
        try:
            run()
        except Exception:  # a Python-side error on the way to a launch
            errors.append(label)
            traceback.print_exc()
    failed = [key[0] for key, error in compiler.seen.items() if error is not None]
    print(f"\n{len(compiler.seen)} kernel variants for sm_{args.arch}: {len(compiler.seen) - len(failed)} compiled, "
          f"{len(failed)} failed{': ' + ', '.join(sorted(set(failed))) if failed else ''}; "
          f"{len(errors)} cases raised before a launch{': ' + '; '.join(errors) if errors else ''}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
