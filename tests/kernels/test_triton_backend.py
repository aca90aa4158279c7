"""Triton selective-scan backend under TRITON_INTERPRET=1 (CPU), tiny shapes, against the float64 reference.

The interpreter must be chosen before triton (and the backend module) is imported, hence the environment
variable at the top of this module. Each case runs scan_forward/scan_backward of the backend directly and
compares out, last_state and every gradient with autograd through ``selective_scan_reference`` in float64.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (the backend is optional)")

from vim2_kernels.selective_scan import triton_backend as tb  # noqa: E402
from scan_oracle import (GRAD_NAMES, assert_close_within, assert_matches_reference,  # noqa: E402
                         check_empty_batch)

if tb.unavailable_reason(torch.device("cpu")) is not None:
    pytest.skip(f"triton backend cannot run on CPU here: {tb.unavailable_reason(torch.device('cpu'))}",
                allow_module_level=True)


DEFAULTS = dict(batch=2, dim=4, groups=1, N=4, Ls=(7,), D=False, z=False, bias=False, softplus=False,
                reverse=False, h0=False, dlast=False, layout="contiguous", dtype=torch.float32,
                bc_dtype=None, chunk=8, block_rows=None, bc="auto", segments=None, delta_scale=0.5, delta_shift=0.0,
                A_scale=1.0)


@pytest.fixture
def settings(monkeypatch):
    """Lets a case shrink the time block / force the tiling; restored after the test."""
    def apply(chunk, block_rows, bc, segments=None):
        monkeypatch.setattr(tb, "CHUNK_SIZE", chunk)
        monkeypatch.setattr(tb, "BLOCK_ROWS", block_rows)
        monkeypatch.setattr(tb, "BC_GRAD_REDUCTION", bc)
        monkeypatch.setattr(tb, "SEGMENTS", segments)
    return apply


def _seq_tensor(gen, batch, dim, Ls, layout):
    """(batch, dim, *Ls) float64 leaf laid out as requested (strides kept by .detach())."""
    if layout == "contiguous":
        x = torch.randn(batch, dim, *Ls, generator=gen, dtype=torch.float64)
    elif layout == "token_major":  # storage (batch, L, dim): stride(1) == 1
        x = torch.randn(batch, *Ls, dim, generator=gen, dtype=torch.float64).movedim(-1, 1)
    elif layout == "col_major_2d":  # NHWC map walked column-major: Ls = (W, H) over storage (batch, H, W, dim)
        W, H = Ls
        x = torch.randn(batch, H, W, dim, generator=gen, dtype=torch.float64).permute(0, 3, 2, 1)
    else:
        raise AssertionError(layout)
    return x


def _bc_tensor(gen, batch, groups, N, Ls, layout):
    if layout == "contiguous":
        x = torch.randn(batch, groups, N, *Ls, generator=gen, dtype=torch.float64)
    elif layout == "token_major":  # storage (batch, L, G, N)
        x = torch.randn(batch, *Ls, groups, N, generator=gen, dtype=torch.float64).permute(0, 2, 3, 1)
    else:  # storage (batch, H, W, G, N) -> (batch, G, N, W, H)
        W, H = Ls
        x = torch.randn(batch, H, W, groups, N, generator=gen, dtype=torch.float64).permute(0, 3, 4, 2, 1)
    return x


def make_case(seed=0, **overrides):
    cfg = dict(DEFAULTS, **overrides)
    gen = torch.Generator().manual_seed(seed)
    batch, dim, groups, N, Ls, layout = (cfg[k] for k in ("batch", "dim", "groups", "N", "Ls", "layout"))
    inputs = dict(
        u=_seq_tensor(gen, batch, dim, Ls, layout),
        delta=_seq_tensor(gen, batch, dim, Ls, layout) * cfg["delta_scale"] + cfg["delta_shift"],
        A=-(torch.rand(dim, N, generator=gen, dtype=torch.float64) + 0.2) * cfg["A_scale"],
        B=_bc_tensor(gen, batch, groups, N, Ls, layout),
        C=_bc_tensor(gen, batch, groups, N, Ls, layout),
        D=torch.randn(dim, generator=gen, dtype=torch.float64) if cfg["D"] else None,
        z=_seq_tensor(gen, batch, dim, Ls, layout) if cfg["z"] else None,
        delta_bias=0.3 * torch.randn(dim, generator=gen, dtype=torch.float64) if cfg["bias"] else None,
        initial_state=torch.randn(batch, dim, N, generator=gen, dtype=torch.float64) if cfg["h0"] else None,
    )
    # Round the data to the tested dtype first, so the float64 oracle sees exactly the backend's inputs.
    # (.to keeps the strides of dense permuted views.)
    dtype, bc_dtype = cfg["dtype"], cfg["bc_dtype"] or cfg["dtype"]
    for name in ("u", "delta", "z"):
        if inputs[name] is not None:
            inputs[name] = inputs[name].to(dtype).to(torch.float64)
    for name in ("B", "C"):
        inputs[name] = inputs[name].to(bc_dtype).to(torch.float64)
    dout = _seq_tensor(gen, batch, dim, Ls, layout).to(dtype)
    dlast = torch.randn(batch, dim, N, generator=gen) if cfg["dlast"] else None
    return cfg, inputs, dout, dlast


def backend_inputs(cfg, inputs):
    param = torch.float64 if cfg["dtype"] == torch.float64 else torch.float32
    cast = dict(u=cfg["dtype"], delta=cfg["dtype"], z=cfg["dtype"], B=cfg["bc_dtype"] or cfg["dtype"],
                C=cfg["bc_dtype"] or cfg["dtype"], A=param, D=param, delta_bias=param, initial_state=param)
    return {k: (None if v is None else v.to(cast[k])) for k, v in inputs.items()}


def run_backend(cfg, inputs, dout, dlast):
    x = backend_inputs(cfg, inputs)
    if cfg["layout"] == "token_major":
        assert x["u"].stride(1) == 1 and x["B"].stride(2) == 1, "test bug: layout lost"
    if cfg["layout"] == "col_major_2d":
        assert not x["u"].is_contiguous(), "test bug: layout lost"
    out, last, saved = tb.scan_forward(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                       x["delta_bias"], x["initial_state"], cfg["softplus"], cfg["reverse"])
    L = out[0, 0].numel()
    assert tuple(saved.shape) == tb.saved_shape(cfg["batch"], cfg["dim"], L, cfg["N"])
    grads = tb.scan_backward(dout, dlast, x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                             x["delta_bias"], x["initial_state"], saved, cfg["softplus"], cfg["reverse"])
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = grads
    named = dict(u=du, delta=ddelta, A=dA, B=dB, C=dC, D=dD, z=dz, delta_bias=dbias, initial_state=dh0)
    return x, out, last, named


TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def assert_close(name, actual, expected, dtype):
    assert_close_within(name, actual, expected, TOLERANCE[dtype])


def check_case(settings, seed=0, **overrides):
    cfg, inputs, dout, dlast = make_case(seed, **overrides)
    settings(cfg["chunk"], cfg["block_rows"], cfg["bc"], cfg["segments"])
    x, out, last, grads = run_backend(cfg, inputs, dout, dlast)
    assert_matches_reference(cfg, inputs, x, out, last, grads, dout, dlast, TOLERANCE)
    return cfg, out, grads


ALL = dict(D=True, z=True, bias=True, softplus=True, h0=True, dlast=True)

SWEEP = {
    "L1_N1_plain": dict(Ls=(1,), N=1),
    "L2_N4_D_z": dict(Ls=(2,), D=True, z=True),
    "L7_bias_softplus_reverse": dict(Ls=(7,), bias=True, softplus=True, reverse=True),
    "L7_N1_groups_h0_dlast": dict(Ls=(7,), N=1, groups=2, h0=True, dlast=True),
    "L65_all_chunk16": dict(Ls=(65,), chunk=16, **ALL),
    "L65_N1_all_reverse_chunk8": dict(Ls=(65,), N=1, reverse=True, **ALL),
    "L64_exact_blocks_reverse": dict(Ls=(64,), chunk=16, reverse=True, **ALL),
    "L65_groups_token_major_reverse": dict(Ls=(65,), groups=2, layout="token_major", reverse=True, **ALL),
    "L7_token_major": dict(Ls=(7,), layout="token_major", **ALL),
    "2d_col_major": dict(Ls=(5, 3), layout="col_major_2d", chunk=4, **ALL),
    "2d_col_major_reverse_groups": dict(Ls=(3, 5), groups=2, layout="col_major_2d", chunk=4, reverse=True, **ALL),
    "2d_col_major_narrow": dict(Ls=(9, 2), layout="col_major_2d", chunk=16, **ALL),  # a block spans 8 columns
    "channel_mixer_dim1": dict(batch=24, dim=1, Ls=(65,), chunk=16, **ALL),
    "channel_mixer_dim1_reverse": dict(batch=24, dim=1, Ls=(33,), N=1, chunk=8, reverse=True, D=True, bias=True,
                                       softplus=True),
    # dB/dC reductions: deterministic partials (4 tiles per group), atomics over shared tiles,
    # atomics over tiles gathering per row and straddling groups and batches.
    "bc_partials_4_slots": dict(dim=8, block_rows=2, bc="partials", **ALL),
    "bc_atomic_shared_tiles": dict(dim=8, block_rows=2, bc="atomic", reverse=True, **ALL),
    "bc_atomic_gather_tiles": dict(dim=6, groups=2, block_rows=4, Ls=(9,), **ALL),
    "tile_spans_batches": dict(batch=3, dim=2, block_rows=4, Ls=(9,), **ALL),
    # Segment-parallel mode (few rows, long L): 9 blocks in 3 segments; 2-D reverse with an uneven split.
    "segments_3": dict(Ls=(65,), segments=3, **ALL),
    # Δ used as given (no softplus) can be negative: the summaries must not assume dt >= 0
    "segments_3_negative_delta": dict(Ls=(65,), segments=3, D=True, z=True, h0=True, dlast=True),
    "segments_3_negative_delta_reverse": dict(Ls=(65,), segments=3, reverse=True, D=True, z=True, h0=True,
                                              dlast=True),
    "segments_2d_reverse_groups": dict(Ls=(7, 9), groups=2, layout="col_major_2d", segments=4, reverse=True, **ALL),
    "float64": dict(dtype=torch.float64, Ls=(65,), chunk=16, groups=2, **ALL),
    "float16": dict(dtype=torch.float16, Ls=(65,), chunk=16, **ALL),
    "bfloat16_bc_float32": dict(dtype=torch.bfloat16, bc_dtype=torch.float32, Ls=(33,), reverse=True, **ALL),
}


@pytest.mark.parametrize("case", list(SWEEP), ids=list(SWEEP))
def test_matches_reference(settings, case):
    check_case(settings, **SWEEP[case])


@pytest.mark.parametrize("case", ["L65_all_chunk16", "L65_groups_token_major_reverse", "2d_col_major",
                                  "segments_2d_reverse_groups", "bc_atomic_gather_tiles"])
def test_int64_offsets_match_reference(settings, monkeypatch, case):
    # Launches over tensors this small use int32 offsets; the int64 path (tensors spanning 2**30 elements
    # or more, run on a GPU by test_triton_gpu.py) computes the same here.
    monkeypatch.setattr(tb, "FORCE_INT64_INDEX", True)
    check_case(settings, **SWEEP[case])


def test_offset_type_follows_the_largest_span():
    import triton.language as tl

    small = torch.empty(4, 8)
    assert tb._index_type(small, None, torch.empty(0)) == tl.int32
    # a view that addresses 2**30 elements apart needs int64 offsets however few elements it has
    wide = torch.empty_strided((2, 3), (2**29, 1), device="meta")
    assert tb._span(wide) == 2**29 + 3 and tb._index_type(small, wide) == tl.int32
    wider = torch.empty_strided((3, 3), (2**29, 1), device="meta")
    assert tb._index_type(small, wider) == tl.int64


@pytest.mark.parametrize("reverse", [False, True])
def test_segment_summaries_stay_exact_after_large_steps(settings, reverse):
    # Blocks of 4 tiny steps (dt = 1e-3), 24 large ones (dt = 50, input 0) and 4 tiny ones, A down to -19:
    # the state a segment hands on comes from its last tiny steps alone, whose decay a summary built from
    # differences of running sums (about 1200 here) got wrong in the fourth digit.
    cfg, inputs, dout, dlast = make_case(0, Ls=(128,), chunk=32, segments=4, A_scale=16.0, reverse=reverse)
    in_block = torch.arange(128) % 32 if not reverse else torch.arange(127, -1, -1) % 32
    large = ((in_block >= 4) & (in_block < 28)).to(torch.float64)
    jitter = 1 + 0.1 * torch.rand(inputs["delta"].shape, generator=torch.Generator().manual_seed(1),
                                  dtype=torch.float64)
    inputs["delta"] = ((large * 50.0 + (1 - large) * 1e-3) * jitter).float().double()
    inputs["u"] = inputs["u"] * (1 - large)
    settings(cfg["chunk"], cfg["block_rows"], cfg["bc"], cfg["segments"])
    x, out, last, grads = run_backend(cfg, inputs, dout, dlast)
    assert_matches_reference(cfg, inputs, x, out, last, grads, dout, dlast, TOLERANCE)


def test_stress_inputs_stay_finite(settings):
    # softplus arguments above 20 (identity branch) and A down to -1e3: finite and still exact.
    check_case(settings, Ls=(65,), chunk=16, delta_shift=22.0, delta_scale=3.0, A_scale=1e3, **ALL)


def test_tiny_delta_long_decay(settings):
    # delta ~1e-4 without softplus: decays exp(dt*A) ~ 1 compose over many blocks without drift.
    check_case(settings, Ls=(257,), N=1, dim=2, chunk=32, delta_scale=1e-4, delta_shift=1e-4, D=True, h0=True)


def test_partials_reduction_is_deterministic(settings):
    cfg, inputs, dout, dlast = make_case(3, dim=8, block_rows=2, bc="partials", Ls=(9,), **ALL)
    settings(cfg["chunk"], cfg["block_rows"], cfg["bc"])
    first = run_backend(cfg, inputs, dout, dlast)[3]
    second = run_backend(cfg, inputs, dout, dlast)[3]
    for name in ("B", "C", "A", "D", "delta_bias"):
        assert torch.equal(first[name], second[name]), name


def test_saved_from_other_chunk_size_is_rejected(settings):
    cfg, inputs, dout, dlast = make_case(Ls=(20,))
    settings(4, None, "auto")
    x = backend_inputs(cfg, inputs)
    out, last, saved = tb.scan_forward(x["u"], x["delta"], x["A"], x["B"], x["C"], None, None, None, None,
                                       False, False)
    settings(8, None, "auto")
    with pytest.raises(ValueError, match="saved"):
        tb.scan_backward(dout, None, x["u"], x["delta"], x["A"], x["B"], x["C"], None, None, None, None,
                         saved, False, False)


def test_empty_batch():
    check_empty_batch(tb)


def test_unavailable_reasons_without_interpreter_or_triton():
    script = textwrap.dedent("""
        import importlib, os, sys
        os.environ.pop("TRITON_INTERPRET", None)
        import torch
        from vim2_kernels.selective_scan import triton_backend as tb
        print("cpu:", tb.unavailable_reason(torch.device("cpu")))
        print("meta:", tb.unavailable_reason(torch.device("meta")))
        del sys.modules["vim2_kernels.selective_scan.triton_backend"]
        for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
            del sys.modules[name]
        sys.modules["triton"] = None  # what an install without triton looks like to `import triton`
        tb = importlib.import_module("vim2_kernels.selective_scan.triton_backend")
        print("absent:", tb.unavailable_reason(torch.device("cuda")))
        print("shape:", tb.saved_shape(2, 3, 100, 4))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    assert "TRITON_INTERPRET=1" in lines["cpu"]
    assert "meta" in lines["meta"]
    assert "triton is not installed" in lines["absent"]
    assert lines["shape"] == str((2, 3, 4, 4))  # 100 steps in blocks of CHUNK_SIZE=32


@pytest.fixture
def h200_like(monkeypatch):
    """The tiling heuristics as compiled kernels on a 132-SM GPU see them (they are plain Python)."""
    monkeypatch.setattr(tb, "_INTERPRETED", False)
    monkeypatch.setattr(tb, "_num_sms", lambda device: 132)
    for knob in ("BLOCK_ROWS", "SEGMENTS"):
        monkeypatch.setattr(tb, knob, None)
    return 132


def _launch_plan(batch, dim, L, N=16, backward=False):
    device = torch.device("cpu")
    block_t = tb._block_t(L)
    n_blocks = -(-L // block_t)
    rows = tb._pick_block_rows(batch * dim, dim, tb._next_power_of_2(N), block_t, device, backward)
    n_tiles = -(-batch * dim // rows)
    warps = tb._num_warps((2 if backward else 1) * rows * tb._next_power_of_2(N) * block_t)
    segs, per_seg = tb._pick_segments(n_tiles, n_blocks, warps, device)
    return dict(tiles=n_tiles, warps=warps, segs=segs, per_seg=per_seg, n_blocks=n_blocks)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("L", [256 * 256, 128 * 128, 64 * 64, 56 * 56])
def test_long_routes_get_enough_warps_in_flight(h200_like, L, backward):
    # ViM2-T's stage-1 route at 1024x1024 (and smaller maps): 192 rows cannot fill 132 SMs, so the
    # segments must bring the launch up to the warp target, each segment still worth its summary pass.
    plan = _launch_plan(1, 192, L, backward=backward)
    assert plan["segs"] > 1
    # (equal-length segments may round the requested count down by one)
    warps_in_flight = plan["tiles"] * (plan["segs"] + 1) * plan["warps"]
    enough = warps_in_flight >= tb.TARGET_WARPS_PER_SM * h200_like
    capped = plan["per_seg"] < 2 * tb.MIN_BLOCKS_PER_SEGMENT  # segments already near the shortest allowed
    assert enough or capped, plan
    assert plan["per_seg"] >= tb.MIN_BLOCKS_PER_SEGMENT
    # every segment non-empty and together they cover the sequence
    assert (plan["segs"] - 1) * plan["per_seg"] < plan["n_blocks"] <= plan["segs"] * plan["per_seg"]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("batch,dim,L", [(2, 768, 197), (64, 192, 3136), (1, 16, 64), (1, 768, 64 * 64)])
def test_short_or_wide_scans_stay_sequential(h200_like, batch, dim, L, backward):
    # enough row tiles already (ViM2-T's stage-3 route at 1024 px: 768 one-row tiles, measured 1.37x faster
    # unsplit than in 6 segments on an H200), or too few blocks for a summary pass to pay off
    plan = _launch_plan(batch, dim, L, backward=backward)
    assert plan["segs"] == 1
    if plan["n_blocks"] >= 2 * tb.MIN_BLOCKS_PER_SEGMENT:  # long enough to split: the SMs hold enough warps
        assert plan["tiles"] * plan["warps"] >= tb.SPLIT_BELOW_WARPS_PER_SM * h200_like


def test_segment_split_is_bounded_for_one_tile_and_huge_L(h200_like):
    # one row tile and 2**20 steps: the warp target alone would ask for thousands of segments, whose
    # combine is one dependent step each
    plan = _launch_plan(1, 1, 2**20)
    assert 1 < plan["segs"] <= tb.MAX_AUTO_SEGMENTS
    assert tb._pick_segments(1, 0, 2, torch.device("cpu")) == (1, 1)  # empty sequence
    assert tb._pick_segments(0, 10, 2, torch.device("cpu")) == (1, 1)  # no rows (batch or dim 0)
