"""GPU benchmark of the Triton selective scan against the torch backend and the memory-traffic floor.

    python tools/bench_scan_gpu.py [--dtypes float32,bfloat16] [--tune-budget 60]

For each shape, mamba's usual call (z, D, delta_bias, delta_softplus=True, B/C shared by all channels),
times forward, backward and forward+backward of each backend with CUDA events (median), and prints:

* GB/s: the bytes that MUST move divided by the time. The floor counts every input read once and every
  output written once: forward reads u, delta, z, B, C (+ A, D, delta_bias) and writes out; backward reads
  u, delta, z, B, C, dout and writes du, ddelta, dz, dB, dC. Checkpoints, recomputation and partial sums
  are the implementation's own overhead and are not in the floor.
* % of floor: floor time / measured time, floor time = floor bytes / peak bandwidth, where the peak is
  measured in this run by a large device-to-device torch copy (read + write bytes). 100% = at the floor;
  the goal in issue 2 is >= 50% (within 2x).

``--tune-budget S`` then spends up to S seconds timing other CHUNK_SIZE / BLOCK_ROWS / SEGMENTS settings
of the Triton backend and prints the best per shape (for tuning the heuristics; kernels compile on first
use, a few seconds per configuration).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("bench_scan_gpu.py: unset TRITON_INTERPRET (it would time the CPU interpreter)")

import torch  # noqa: E402

DEVICE = "cuda"

SHAPES = {
    # name: (batch, dim, L, N)
    "vim_usual B2 d768 L197": (2, 768, 197, 16),
    "channel_mixer B6272 d1 L192": (2 * 56 * 56, 1, 192, 16),
    "long_seq B1 d192 L3136": (1, 192, 3136, 16),
}


def make_inputs(batch, dim, L, N, dtype, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    dev = dict(device=DEVICE, dtype=dtype)
    return dict(
        u=torch.randn(batch, dim, L, generator=gen, **dev),
        delta=torch.randn(batch, dim, L, generator=gen, **dev) * 0.5 - 1.0,
        A=-(torch.rand(dim, N, generator=gen, device=DEVICE) + 0.5),
        B=torch.randn(batch, 1, N, L, generator=gen, **dev),
        C=torch.randn(batch, 1, N, L, generator=gen, **dev),
        D=torch.randn(dim, generator=gen, device=DEVICE),
        z=torch.randn(batch, dim, L, generator=gen, **dev),
        delta_bias=torch.randn(dim, generator=gen, device=DEVICE) * 0.1,
        initial_state=None,
    )


def floor_bytes(x) -> dict:
    def size(*tensors):
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    inputs = size(x["u"], x["delta"], x["z"], x["B"], x["C"], x["A"], x["D"], x["delta_bias"])
    forward = inputs + size(x["u"])  # + out
    backward = inputs + size(x["u"]) + size(x["u"], x["delta"], x["z"], x["B"], x["C"])  # + dout, grads
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}


def cuda_time_ms(fn, min_seconds=0.25, max_reps=200, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    deadline = time.perf_counter() + min_seconds
    while len(times) < max_reps and (len(times) < 5 or time.perf_counter() < deadline):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_bandwidth_gbs() -> float:
    src = torch.empty(2**28, dtype=torch.float32, device=DEVICE)  # 1 GiB
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), min_seconds=0.5, max_reps=30)
    del src, dst
    return 2 * 2**30 / (ms * 1e-3) / 1e9


def passes(backend, x, softplus=True):
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], x["initial_state"],
            softplus, False)
    out, last, saved = backend.scan_forward(*args)
    dout = torch.randn_like(out)

    def fwd():
        return backend.scan_forward(*args)

    def bwd():
        return backend.scan_backward(dout, None, x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                     x["delta_bias"], x["initial_state"], saved, softplus, False)

    def both():
        o, lst, s = backend.scan_forward(*args)
        return backend.scan_backward(dout, None, x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                     x["delta_bias"], x["initial_state"], s, softplus, False)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def load_backends():
    from vim2_kernels.selective_scan import triton_backend

    backends = {"triton": triton_backend}
    reason = triton_backend.unavailable_reason(torch.device(DEVICE))
    if reason:
        sys.exit(f"triton backend unavailable: {reason}")
    try:
        from vim2_kernels.selective_scan import torch_backend

        reason = torch_backend.unavailable_reason(torch.device(DEVICE))
        if reason:
            print(f"torch backend skipped: {reason}")
        else:
            backends["torch"] = torch_backend
    except Exception as exc:  # the comparison is optional; the Triton numbers still matter
        print(f"torch backend skipped: {type(exc).__name__}: {exc}")
    return backends


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16", help="main table and channel mixer section")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names from SHAPES")
    parser.add_argument("--no-channel-mixer", action="store_true", help="skip the fused channel mixer section")
    parser.add_argument("--no-cross-scan", action="store_true", help="skip the fused low-rank cross-scan section")
    parser.add_argument("--tune-budget", type=float, default=0.0, help="seconds for the Triton setting sweep")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_scan_gpu.py: no CUDA device")
        return 1
    import triton

    props = torch.cuda.get_device_properties(0)
    peak = peak_bandwidth_gbs()
    print(f"device {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}")
    print(f"peak bandwidth (1 GiB device copy, read+write): {peak:.0f} GB/s\n")
    backends = load_backends()
    shapes = [s for s in args.shapes.split(",") if s]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]

    header = f"{'shape':30s} {'dtype':9s} {'backend':7s} {'pass':8s} {'ms':>9s} {'GB/s':>7s} {'% floor':>8s} {'vs torch':>8s}"
    print(header)
    print("-" * len(header))
    worst = {}
    for shape_name in shapes:
        batch, dim, L, N = SHAPES[shape_name]
        for dtype in dtypes:
            x = make_inputs(batch, dim, L, N, dtype)
            floor = floor_bytes(x)
            timings = {}
            for backend_name, backend in backends.items():
                try:
                    for pass_name, fn in passes(backend, x).items():
                        timings[backend_name, pass_name] = cuda_time_ms(fn)
                except Exception as exc:
                    print(f"{shape_name:30s} {str(dtype)[6:]:9s} {backend_name:7s} failed: {type(exc).__name__}: {exc}")
            for (backend_name, pass_name), ms in timings.items():
                gbs = floor[pass_name] / (ms * 1e-3) / 1e9
                pct = 100.0 * gbs / peak
                ref = timings.get(("torch", pass_name))
                vs = f"{ref / ms:7.1f}x" if ref and backend_name != "torch" else ""
                print(f"{shape_name:30s} {str(dtype)[6:]:9s} {backend_name:7s} {pass_name:8s} {ms:9.3f} "
                      f"{gbs:7.0f} {pct:7.1f}% {vs:>8s}")
                if backend_name == "triton":
                    worst[shape_name, str(dtype)[6:], pass_name] = pct
            del x
            torch.cuda.empty_cache()
    if worst:
        print("\nTriton % of the memory-traffic floor (goal >= 50%, i.e. within 2x):")
        for (shape_name, dtype_name, pass_name), pct in worst.items():
            verdict = "ok" if pct >= 50.0 else "below goal"
            print(f"  {shape_name:30s} {dtype_name:9s} {pass_name:8s} {pct:6.1f}%  {verdict}")

    if not args.no_channel_mixer:
        channel_mixer_section(peak, dtypes)
    if not args.no_cross_scan:
        cross_scan_section()
    if args.tune_budget > 0:
        tune(backends["triton"], shapes, args.tune_budget, peak)
    return 0


# ViM2-T channel mixers, inference: (tokens, expanded width E); N = 16.
CHANNEL_MIXER_SHAPES = {
    "stage 1 at 1024px T65536 E192": (65536, 192),
    "stage 3 at 1024px T4096 E768": (4096, 768),
    "stage 1 at 224px x32 T100352 E192": (32 * 3136, 192),
}


def extra_peak_mb(fn) -> float:
    """MB that ``fn()`` allocates on the GPU at its peak beyond what is allocated before it."""
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def channel_mixer_section(peak, dtypes):
    """The fused Triton channel mixer against the unfused composition through the Triton scan (what ran
    before it), in each of ``dtypes`` (``--dtypes``): forward without autograd (time, extra peak memory), then
    forward+backward against the unfused composition recomputed in token chunks."""
    from vim2_kernels import channel_mixer as cm
    from vim2_kernels.channel_mixer import channel_mixer_scan, channel_mixer_scan_unfused

    print("\nChannel mixer forward (no autograd): fused Triton kernel vs unfused composition; "
          "floor = read v, z + write out")
    for name, (tokens, length) in CHANNEL_MIXER_SHAPES.items():
        for dtype in dtypes:
            g = torch.Generator(device=DEVICE).manual_seed(0)
            r = lambda *shape: torch.randn(*shape, generator=g, device=DEVICE)  # noqa: E731
            v, z = r(tokens, length).to(dtype), r(tokens, length).to(dtype)
            params = (0.5 * r(2, 4), 0.1 * r(2), r(2), 0.5 * r(2, length) - 2.0, r(2, 16), 0.3 * r(2, 16, length),
                      r(2, 16), 0.3 * r(2, 16, length), -(torch.rand(2, 16, generator=g, device=DEVICE) + 0.2),
                      r(2))
            floor = 3 * v.numel() * v.element_size()
            with torch.no_grad():
                run_fused = lambda: channel_mixer_scan(v, z, *params, backend="triton")  # noqa: E731
                run_unfused = lambda: channel_mixer_scan_unfused(v, z, *params, backend="triton")  # noqa: E731
                fused, fused_mb = cuda_time_ms(run_fused), extra_peak_mb(run_fused)
                try:
                    unfused, unfused_mb = cuda_time_ms(run_unfused), extra_peak_mb(run_unfused)
                except torch.cuda.OutOfMemoryError:
                    unfused, unfused_mb = float("nan"), float("nan")
            pct = 100.0 * floor / (fused * 1e-3) / 1e9 / peak
            print(f"  {name:34s} {str(dtype)[6:]:9s} fwd     fused {fused:8.3f} ms ({pct:5.1f}% floor, "
                  f"+{fused_mb:.0f} MB)  unfused {unfused:8.3f} ms (+{unfused_mb:.0f} MB)  {unfused / fused:6.1f}x")
            # Training: the fused op's forward+backward against the unfused composition recomputed in
            # token chunks (what the torch backend runs), both through autograd.
            leaves = [t.detach().requires_grad_(True) for t in (v, z, *params)]
            dout = torch.randn_like(v)

            def train_step(run):
                torch.autograd.grad(run(leaves[0], leaves[1], leaves[2:]), leaves, dout)

            fused_t = cuda_time_ms(lambda: train_step(
                lambda a, b, p: channel_mixer_scan(a, b, *p, backend="triton")), max_reps=20)
            unfused_t = cuda_time_ms(lambda: train_step(
                lambda a, b, p: cm._recomputed_in_token_chunks(a, b, p, "triton")), max_reps=20)
            print(f"  {name:34s} {str(dtype)[6:]:9s} fwd+bwd fused {fused_t:8.3f} ms  "
                  f"recomputed unfused {unfused_t:8.3f} ms  {unfused_t / fused_t:6.1f}x")
            del v, z, params, leaves, dout
            torch.cuda.empty_cache()


# ViM2-T's token-mixer cross-scans at 1024x1024, batch 1: (H, W, d_inner, dt_rank); 4 routes, N = 16.
CROSS_SCAN_SHAPES = {
    "stage 1 at 1024px 256x256 d192 R6": (256, 256, 192, 6),
    "stage 3 at 1024px 64x64 d768 R24": (64, 64, 768, 24),
}


def cross_scan_section():
    """ViM2's four-route scan with a low-rank Δ: the fused path (Δ projected inside the Triton forward,
    routes summed in place) against the per-route path it replaced on CUDA (Δ materialised per route,
    one Triton scan per route), inference and forward+backward: time and extra peak memory; and the fused
    path's time with int64 offsets forced (the kernels' offsets before int32 ones, see docs/kernels.md)."""
    import vim2_kernels
    from vim2_kernels import cross_scan

    print("\nCross-scan with low-rank Δ, float32: fused Triton path vs per-route materialised Δ")
    for name, (height, width, dim, rank) in CROSS_SCAN_SHAPES.items():
        g = torch.Generator(device=DEVICE).manual_seed(0)
        r = lambda *shape: torch.randn(*shape, generator=g, device=DEVICE)  # noqa: E731
        args = [r(1, height, width, dim), r(1, height, width, 4, rank), -(torch.rand(4, dim, 16, generator=g,
                device=DEVICE) + 0.5), r(1, height, width, 4, 16), r(1, height, width, 4, 16), r(4, dim),
                0.1 * r(4, dim) - 1.0, r(4, dim, rank) * rank ** -0.5]

        def call(u, dts, A, B, C, D, bias, W):
            return vim2_kernels.cross_scan_2d(u, dts, A, B, C, D, bias, delta_proj_weight=W, backend="triton")

        leaves = [a.detach().requires_grad_(True) for a in args]
        dout = torch.randn_like(args[0])

        def train():
            torch.autograd.grad(call(*leaves), leaves, dout)

        from vim2_kernels.selective_scan import triton_backend as tb

        results = {}
        saved_limit, saved_int64 = cross_scan.FUSED_LOWRANK_MAX_RANK["triton"], tb.FORCE_INT64_INDEX
        # (path, rank limit, int64 offsets forced): the fused path with int64 offsets is what ran before
        # the kernels switched to int32 offsets for tensors of this size
        for path, limit, int64 in (("fused", saved_limit, False), ("per-route", 0, False),
                                   ("fused int64", saved_limit, True)):
            cross_scan.FUSED_LOWRANK_MAX_RANK["triton"], tb.FORCE_INT64_INDEX = limit, int64
            try:
                with torch.no_grad():
                    infer = (cuda_time_ms(lambda: call(*args), max_reps=50), extra_peak_mb(lambda: call(*args)))
                results[path] = (*infer, cuda_time_ms(train, max_reps=10), extra_peak_mb(train))
            except torch.cuda.OutOfMemoryError:
                results[path] = (float("nan"),) * 4
            finally:
                cross_scan.FUSED_LOWRANK_MAX_RANK["triton"], tb.FORCE_INT64_INDEX = saved_limit, saved_int64
        (fi, fim, ft, ftm), (ui, uim, ut, utm) = results["fused"], results["per-route"]
        li, _, lt, _ = results["fused int64"]
        print(f"  {name:36s} infer   fused {fi:8.3f} ms (+{fim:.0f} MB)  per-route {ui:8.3f} ms (+{uim:.0f} MB)  "
              f"{ui / fi:5.2f}x; int64 offsets {li:8.3f} ms ({li / fi:5.2f}x)")
        print(f"  {name:36s} fwd+bwd fused {ft:8.3f} ms (+{ftm:.0f} MB)  per-route {ut:8.3f} ms (+{utm:.0f} MB)  "
              f"{ut / ft:5.2f}x; int64 offsets {lt:8.3f} ms ({lt / ft:5.2f}x)")
        del args, leaves, dout
        torch.cuda.empty_cache()


# ViM2-T's token-mixer routes at 1024x1024 (batch 1): the long scans that the segment-parallel path
# serves (stage 1: 256x256 tokens, 192 channels; stage 3: 64x64, 768). Tuned, not in the main table
# (the torch backend would take minutes there).
TUNE_SHAPES = {
    "vim2_t stage1 route B1 d192 L65536": (1, 192, 65536, 16),
    "vim2_t stage3 route B1 d768 L4096": (1, 768, 4096, 16),
}


def tune(tb, shapes, budget, peak):
    """Times fwd+bwd float32 under other settings of the module-level knobs, an equal share of the time
    budget per shape: ViM2-T's long routes first, then the main table's shapes. The heuristics' own
    choice is timed first, then one knob varied at a time (the most telling first), then pairs."""
    varied = ([(32, None, None, w) for w in (1, 4)] + [(32, None, s, None) for s in (1, 8, 32, 128, 512)]
              + [(32, r, None, None) for r in (1, 2, 4, 8)] + [(c, None, None, None) for c in (16, 64)]
              + [(c, r, s, None) for c in (32, 16, 64) for r in (1, 2, 4, 8) for s in (1, 8, 32, 128)])
    settings = [(32, None, None, None)] + varied
    shapes = list(TUNE_SHAPES) + list(shapes)
    saved_knobs = (tb.CHUNK_SIZE, tb.BLOCK_ROWS, tb.SEGMENTS, tb.NUM_WARPS)
    print(f"\nTriton setting sweep, float32 fwd+bwd, budget {budget:.0f} s "
          "(CHUNK_SIZE, BLOCK_ROWS, SEGMENTS, NUM_WARPS; None = heuristic):")
    try:
        for shape_name in shapes:
            deadline = time.perf_counter() + budget / len(shapes)
            batch, dim, L, N = {**SHAPES, **TUNE_SHAPES}[shape_name]
            x = make_inputs(batch, dim, L, N, torch.float32)
            floor = floor_bytes(x)["fwd+bwd"]
            results = []
            for chunk, rows, segs, warps in settings:
                if results and time.perf_counter() > deadline:
                    break
                tb.CHUNK_SIZE, tb.BLOCK_ROWS, tb.SEGMENTS, tb.NUM_WARPS = chunk, rows, segs, warps
                try:
                    ms = cuda_time_ms(passes(tb, x)["fwd+bwd"], min_seconds=0.1, max_reps=50)
                except Exception as exc:  # e.g. too many registers for a big tile
                    print(f"  {shape_name}: chunk={chunk} rows={rows} segs={segs} warps={warps} failed: "
                          f"{type(exc).__name__}")
                    continue
                results.append((ms, chunk, rows, segs, warps))
            heuristic = results[0][0] if results and results[0][1:] == (32, None, None, None) else float("nan")
            print(f"  {shape_name:34s} heuristics {heuristic:8.3f} ms; {len(results)} settings timed; best:")
            for ms, chunk, rows, segs, warps in sorted(results, key=lambda r: r[0])[:3]:
                pct = 100.0 * floor / (ms * 1e-3) / 1e9 / peak
                print(f"  {'':34s} chunk={chunk:<3d} rows={str(rows):4s} segs={str(segs):4s} warps={str(warps):4s} "
                      f"{ms:8.3f} ms {pct:6.1f}% floor {heuristic / ms:5.2f}x")
            for ms, chunk, rows, segs, warps in results[1:3]:  # the warp settings, whatever their rank
                print(f"  {'':34s} (warps={warps}: {ms:8.3f} ms, {heuristic / ms:5.2f}x)")
            del x
            torch.cuda.empty_cache()
    finally:
        tb.CHUNK_SIZE, tb.BLOCK_ROWS, tb.SEGMENTS, tb.NUM_WARPS = saved_knobs


if __name__ == "__main__":
    sys.exit(main())
