"""Chunked pure-PyTorch selective-scan backend against the float64 plain-loop reference.

Every case calls the backend contract directly (``scan_forward`` / ``scan_backward``) and compares
``out``, ``last_state`` and all nine gradients with autograd through ``selective_scan_reference`` in
float64. Both working layouts ("shared": B/C contracted with batched matmuls, for many channels per
group; "rows": N-outer reductions, for dim/G == 1 such as the channel mixer) and small row blocks
(several blocks per call, partial groups) are exercised. Shapes are kept small: the reference loop
dominates the runtime.
"""
import itertools
import math

import pytest
import torch

from vim2_kernels.selective_scan import torch_backend as tb
from scan_oracle import (GRAD_NAMES, SEQ_NAMES, assert_close_within, assert_matches_reference,
                         check_empty_batch, check_tiny_delta_long_sequence)


DEFAULTS = dict(batch=2, dim=4, groups=1, N=4, Ls=(7,), D=False, z=False, bias=False, softplus=False,
                reverse=False, h0=False, dlast=False, layout="contiguous", dtype=torch.float32, bc_dtype=None,
                layout_mode=None, block=None, delta_scale=0.5, delta_shift=0.0, A_scale=1.0)
ALL = dict(D=True, z=True, bias=True, softplus=True, h0=True, dlast=True)

# max |error| <= tol * max(1, max |expected|); fp16/bf16 inputs are rounded before the float64 oracle
# sees them, so the tolerance only covers the backend's own float32 arithmetic and output rounding.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 5e-2}


@pytest.fixture
def backend_settings(monkeypatch):
    """Forces the working layout and the row-block size of the backend for one test."""
    def apply(layout_mode, block, seqlen):
        if layout_mode is not None:  # threshold on channels per group for the shared layout
            monkeypatch.setattr(tb, "SHARED_LAYOUT_MIN_CHANNELS", 10 ** 9 if layout_mode == "rows" else 1)
            # "stream": the shared layout walked step by step (used for large steps, e.g. ViM shapes),
            # in groups of 3 steps so that groups end inside and across chunks
            stream = layout_mode == "stream"
            monkeypatch.setattr(tb, "STREAM_MIN_STEP_ELEMS", 0 if stream else 10 ** 12)
            monkeypatch.setattr(tb, "_STREAM_GROUP_STEPS", 3 if stream else None)
            if stream and block is not None:  # the same rows per block as the chunked layouts
                monkeypatch.setattr(tb, "_STREAM_STEP_ELEMS", max(1, block // seqlen))
        if block is not None:
            monkeypatch.setenv("VIM2_TORCH_SCAN_BLOCK", str(block))
    return apply


def _seq(gen, batch, lead, Ls, layout):
    """(batch, *lead, *Ls) float64 tensor stored as requested."""
    if layout == "contiguous":
        return torch.randn(batch, *lead, *Ls, generator=gen, dtype=torch.float64)
    if layout == "token_major":  # storage (batch, L, *lead): the channel stride is 1
        x = torch.randn(batch, *Ls, *lead, generator=gen, dtype=torch.float64)
        return x.permute(0, *range(2, 2 + len(lead)), 1)
    if layout == "col_major_2d":  # NHWC storage (batch, H, W, *lead) walked column-major: Ls = (W, H)
        W, H = Ls
        x = torch.randn(batch, H, W, *lead, generator=gen, dtype=torch.float64)
        k = len(lead)
        return x.permute(0, *range(3, 3 + k), 2, 1)
    raise AssertionError(layout)


def make_case(seed=0, **overrides):
    cfg = dict(DEFAULTS, **overrides)
    gen = torch.Generator().manual_seed(seed)
    batch, dim, G, N, Ls, layout = (cfg[k] for k in ("batch", "dim", "groups", "N", "Ls", "layout"))
    x = dict(
        u=_seq(gen, batch, (dim,), Ls, layout),
        delta=_seq(gen, batch, (dim,), Ls, layout) * cfg["delta_scale"] + cfg["delta_shift"],
        A=-(torch.rand(dim, N, generator=gen, dtype=torch.float64) + 0.2) * cfg["A_scale"],
        B=_seq(gen, batch, (G, N), Ls, layout),
        C=_seq(gen, batch, (G, N), Ls, layout),
        D=torch.randn(dim, generator=gen, dtype=torch.float64) if cfg["D"] else None,
        z=_seq(gen, batch, (dim,), Ls, layout) if cfg["z"] else None,
        delta_bias=0.3 * torch.randn(dim, generator=gen, dtype=torch.float64) if cfg["bias"] else None,
        initial_state=torch.randn(batch, dim, N, generator=gen, dtype=torch.float64) if cfg["h0"] else None,
    )
    # round to the tested dtypes first so that the oracle sees exactly the backend's inputs
    # (.to keeps the strides of dense permuted views)
    dtype, bc_dtype = cfg["dtype"], cfg["bc_dtype"] or cfg["dtype"]
    for name in SEQ_NAMES:
        if x[name] is not None:
            x[name] = x[name].to(bc_dtype if name in "BC" else dtype).to(torch.float64)
    dout = _seq(gen, batch, (dim,), Ls, layout).to(dtype)
    dlast = torch.randn(batch, dim, N, generator=gen) if cfg["dlast"] else None
    return cfg, x, dout, dlast


def backend_inputs(cfg, inputs):
    param = torch.float64 if cfg["dtype"] == torch.float64 else torch.float32
    bc = cfg["bc_dtype"] or cfg["dtype"]
    cast = dict(u=cfg["dtype"], delta=cfg["dtype"], z=cfg["dtype"], B=bc, C=bc, A=param, D=param,
                delta_bias=param, initial_state=param)
    return {k: (None if v is None else v.to(cast[k])) for k, v in inputs.items()}


def run_backend(cfg, x, dout, dlast):
    out, last, saved = tb.scan_forward(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                       x["delta_bias"], x["initial_state"], cfg["softplus"], cfg["reverse"])
    L = x["u"][0, 0].numel()
    assert saved.dtype == torch.float32
    assert tuple(saved.shape) == tb.saved_shape(cfg["batch"], cfg["dim"], L, cfg["N"])
    grads = tb.scan_backward(dout, dlast, x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                             x["delta_bias"], x["initial_state"], saved, cfg["softplus"], cfg["reverse"])
    return out, last, dict(zip(GRAD_NAMES, grads))


def assert_close(name, actual, expected, dtype):
    assert_close_within(name, actual, expected, TOLERANCE[dtype])


def check_case(backend_settings, seed=0, **overrides):
    cfg, inputs, dout, dlast = make_case(seed, **overrides)
    backend_settings(cfg["layout_mode"], cfg["block"], math.prod(cfg["Ls"]))
    x = backend_inputs(cfg, inputs)
    originals = {k: v.clone() for k, v in x.items() if v is not None}
    if cfg["layout"] != "contiguous":
        assert not x["u"].is_contiguous(), "test bug: the strided layout was lost"
    out, last, grads = run_backend(cfg, x, dout, dlast)
    assert_matches_reference(cfg, inputs, x, out, last, grads, dout, dlast, TOLERANCE)
    for name, value in originals.items():  # the backend must not write into its inputs
        assert torch.equal(x[name], value), f"{name} was modified"
    return out, last, grads


# --- sweeps -----------------------------------------------------------------------------------------

LENGTHS = (1, 2, 7, 63, 64, 65, 197, 256, 1024)
STATES = (1, 4, 16)
# every (L, N) pair, each with a different mix of options, both layouts and a second block size,
# so that across the sweep every option meets short, chunk-aligned and ragged lengths
_OPTION_CYCLE = [
    dict(**ALL),
    dict(reverse=True, D=True, z=True),
    dict(groups=2, bias=True, softplus=True, h0=True),
    dict(reverse=True, dlast=True, h0=True, layout="token_major", **{"z": True}),
    dict(groups=4, dim=8, reverse=True, **ALL),
    dict(softplus=True, bias=True, dlast=True, layout="token_major"),
]


def _sweep_cases():
    cases = {}
    for i, (L, N) in enumerate(itertools.product(LENGTHS, STATES)):
        opts = dict(_OPTION_CYCLE[i % len(_OPTION_CYCLE)])
        opts.update(Ls=(L,), N=N, layout_mode=("shared", "rows")[i % 2])
        if L >= 256:  # keep the float64 reference loop cheap
            opts.update(batch=1, dim=opts.get("dim", 4) // 2 if opts.get("groups", 1) < 4 else 8)
        if i % 3 == 0:
            opts.update(block=3 * L * N)  # several row blocks per call
        cases[f"L{L}_N{N}"] = opts
    return cases


SWEEP = _sweep_cases()


@pytest.mark.parametrize("case", list(SWEEP), ids=list(SWEEP))
def test_lengths_and_states_match_reference(backend_settings, case):
    check_case(backend_settings, **SWEEP[case])


OPTION_NAMES = ("D", "z", "bias", "softplus", "reverse", "h0")


@pytest.mark.parametrize("layout_mode", ["shared", "rows", "stream"])
@pytest.mark.parametrize("mask", range(2 ** len(OPTION_NAMES)), ids=lambda m: f"opts{m:02d}")
def test_every_option_combination(backend_settings, mask, layout_mode):
    opts = {name: bool(mask >> i & 1) for i, name in enumerate(OPTION_NAMES)}
    check_case(backend_settings, seed=mask, Ls=(20,), N=3, dlast=bool(mask & 1), layout_mode=layout_mode, **opts)


@pytest.mark.parametrize("layout_mode", ["shared", "rows", "stream"])
@pytest.mark.parametrize("groups,dim,block", [(1, 8, None), (2, 8, 3 * 20 * 3), (4, 8, 2 * 20 * 3), (8, 8, None),
                                               (2, 12, 5 * 20 * 3)])
def test_groups_and_row_blocks(backend_settings, groups, dim, block, layout_mode):
    # blocks that cover several batch items, whole groups, or part of one group (dB/dC accumulate)
    check_case(backend_settings, groups=groups, dim=dim, batch=3, Ls=(20,), N=3, block=block,
               layout_mode=layout_mode, reverse=groups % 2 == 0, **ALL)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("layout,Ls", [("token_major", (33,)), ("col_major_2d", (5, 7)), ("contiguous", (6, 5))])
@pytest.mark.parametrize("layout_mode", ["shared", "rows", "stream"])
def test_strided_layouts(backend_settings, layout, Ls, reverse, layout_mode):
    # token-major and column-major views take the index-gather path, channel-major data the
    # transpose path (for two-level sequences too), in both working layouts
    check_case(backend_settings, layout=layout, Ls=Ls, groups=2, reverse=reverse, layout_mode=layout_mode, **ALL)


def test_two_level_sequence_equals_flattened():
    cfg, inputs, dout, dlast = make_case(4, Ls=(6, 5), layout="col_major_2d", **ALL)
    x = backend_inputs(cfg, inputs)
    flat = {k: (v.reshape(*v.shape[:-2], -1) if k in SEQ_NAMES and v is not None else v) for k, v in x.items()}
    args = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    out2, last2, _ = tb.scan_forward(*(x[k] for k in args), True, True)
    out1, last1, _ = tb.scan_forward(*(flat[k] for k in args), True, True)
    assert out2.shape == x["u"].shape
    torch.testing.assert_close(out2.reshape(out1.shape), out1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last2, last1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout_mode", [None, "stream"])
@pytest.mark.parametrize("dtype,bc_dtype", [(torch.float16, None), (torch.bfloat16, None),
                                            (torch.bfloat16, torch.float32), (torch.float64, None)])
def test_dtypes(backend_settings, dtype, bc_dtype, layout_mode):
    # half inputs: float32 state and accumulation, results rounded once; float64 computes in float64
    check_case(backend_settings, dtype=dtype, bc_dtype=bc_dtype, Ls=(65,), groups=2, reverse=True,
               layout_mode=layout_mode, **ALL)


@pytest.mark.parametrize("L", [1, 2, 14, 15, 64, 197])
def test_stream_lengths(backend_settings, L):
    # the streamed scan: single steps, a chunk boundary at the group edge or inside it, ragged last
    # chunks; float64 (chunk starts recomputed in float64) and float32 alternately
    dtype = torch.float64 if L % 2 else torch.float32
    check_case(backend_settings, Ls=(L,), N=4, dim=8, groups=2, dtype=dtype, reverse=L % 3 == 0,
               layout_mode="stream", block=3 * L * 4 if L > 14 else None, **ALL)


def test_stream_is_chosen_for_large_steps():
    # large steps (batch * dim * N >= STREAM_MIN_STEP_ELEMS: ViM shapes) walk the sequence step by
    # step; small steps and the rows layout keep the two-level scheme
    def problem(batch, dim, L, N, G=1):
        u = torch.zeros(batch, dim, L)
        B = torch.zeros(batch, G, N, L)
        return tb._Problem(u, u, -torch.ones(dim, N), B, B, None, None, False, False)
    assert problem(2, 768, 197, 16).streamed
    assert problem(1, 192, 3136, 16).streamed
    assert not problem(1, 16, 1024, 16).streamed
    assert not problem(2 * 56 * 56, 1, 192, 16).streamed  # dim / G == 1: rows layout


def test_half_precision_against_float32_with_mamba_tolerances():
    # mamba's selective-scan tests compare fp16/bf16 results with a float32 computation on the same
    # (rounded) inputs: fp16 rtol 3e-3 / atol 5e-3, bf16 rtol 3e-2 / atol 5e-2, input grads at twice that
    cfg, inputs, _, dlast = make_case(7, Ls=(197,), dim=8, N=16, delta_shift=-1.0, **ALL)
    args = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    for dtype, rtol, atol in ((torch.float16, 3e-3, 5e-3), (torch.bfloat16, 3e-2, 5e-2)):
        x = backend_inputs(dict(cfg, dtype=dtype), inputs)
        x32 = {k: (v.float() if v is not None and k in SEQ_NAMES else v) for k, v in x.items()}
        dout = torch.randn(x["u"].shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        out, last, saved = tb.scan_forward(*(x[k] for k in args), True, False)
        want, want_last, saved32 = tb.scan_forward(*(x32[k] for k in args), True, False)
        assert out.dtype == dtype and last.dtype == torch.float32
        torch.testing.assert_close(out.float(), want, rtol=rtol, atol=atol)
        torch.testing.assert_close(last, want_last, rtol=rtol, atol=atol)
        grads = tb.scan_backward(dout, dlast, *(x[k] for k in args), saved, True, False)
        want_grads = tb.scan_backward(dout.float(), dlast, *(x32[k] for k in args), saved32, True, False)
        for name, g, w in zip(GRAD_NAMES, grads, want_grads):
            assert g.dtype == (x[name].dtype if name in SEQ_NAMES else torch.float32), name
            scale = max(1.0, w.abs().max().item())
            torch.testing.assert_close(g.float(), w, rtol=2 * rtol, atol=2 * atol * scale, msg=name)


# --- stress and special shapes -------------------------------------------------------------------

@pytest.mark.parametrize("layout_mode", ["shared", "rows", "stream"])
def test_stress_large_softplus_arguments_and_very_negative_A(backend_settings, layout_mode):
    # softplus arguments above 20 (identity branch) and A down to -1e3 (decays underflow to 0)
    out, last, grads = check_case(backend_settings, Ls=(65,), delta_shift=22.0, delta_scale=3.0, A_scale=1e3,
                                  layout_mode=layout_mode, **ALL)
    for t in (out, last, *(g for g in grads.values() if g is not None)):
        assert torch.isfinite(t).all()


def test_stress_tiny_delta_over_long_sequence():
    check_tiny_delta_long_sequence(tb)


def test_long_sequence_float64_gradients(backend_settings):
    # many chunks (nc ~ 70): the chunk passes forward and backward
    check_case(backend_settings, dtype=torch.float64, Ls=(5000,), batch=1, dim=2, N=2, reverse=True, **ALL)


@pytest.mark.parametrize("reverse", [False, True])
def test_channel_mixer_shape(backend_settings, reverse):
    # many short independent sequences: batch = tokens, dim = 1 (rows layout, several blocks)
    check_case(backend_settings, batch=300, dim=1, N=16, Ls=(48,), block=48 * 16 * 70, reverse=reverse, **ALL)


def test_empty_batch_and_single_step():
    check_empty_batch(tb)


def test_chunking_and_saved_shape():
    for L in (1, 2, 7, 64, 197, 3136, 100000):
        T, nc = tb.chunking(L)
        assert T * (nc - 1) < L <= T * nc and T * nc - L < nc  # padding stays below nc steps
        assert tb.saved_shape(2, 3, L, 4) == (2, 3, nc, 4)
    assert tb.unavailable_reason(torch.device("cpu")) is None


def test_workspace_is_reused_and_released():
    cfg, inputs, dout, dlast = make_case(1, Ls=(30,), **ALL)
    x = backend_inputs(cfg, inputs)
    args = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    first = tb.scan_forward(*(x[k] for k in args), True, False)[0]
    second = tb.scan_forward(*(x[k] for k in args), True, False)[0]
    assert torch.equal(first, second)  # a reused (dirty) workspace gives identical results
    tb.release_workspace()
    assert torch.equal(tb.scan_forward(*(x[k] for k in args), True, False)[0], first)


def test_workspace_made_under_inference_mode_serves_training_afterwards():
    """A first call under torch.inference_mode() must not leave an inference-only workspace behind."""
    from vim2_kernels import selective_scan_fn

    tb.release_workspace()
    g = torch.Generator().manual_seed(7)
    u, delta = torch.randn(2, 16, 33, generator=g), torch.randn(2, 16, 33, generator=g)
    A, B, C = -torch.rand(16, 4, generator=g), torch.randn(2, 4, 33, generator=g), torch.randn(2, 4, 33, generator=g)
    with torch.inference_mode():
        expected = selective_scan_fn(u, delta, A, B, C, delta_softplus=True, backend="torch")
    leaf = u.clone().requires_grad_(True)
    out = selective_scan_fn(leaf, delta, A, B, C, delta_softplus=True, backend="torch")
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
