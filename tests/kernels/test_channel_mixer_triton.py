"""The fused Triton channel mixer under TRITON_INTERPRET=1 (CPU), tiny shapes, against the float64
unfused composition (the same oracle as the CPU kernel's tests). On a GPU, tests/kernels/test_triton_gpu.py
runs it compiled."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (the backend is optional)")

from vim2_kernels import channel_mixer_triton as cmt  # noqa: E402
from vim2_kernels.channel_mixer import channel_mixer_scan_unfused  # noqa: E402
from vim2_kernels.selective_scan import triton_backend as tb  # noqa: E402
from test_channel_mixer import PARAMS, make_inputs  # noqa: E402

if cmt.unavailable_reason(torch.device("cpu")) is not None:
    pytest.skip(f"triton cannot run on CPU here: {cmt.unavailable_reason(torch.device('cpu'))}",
                allow_module_level=True)

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def check(tokens, length, d_state, width=4, gate=True, dtype=torch.float32, layout="contiguous", seed=0,
          **kw):
    x = make_inputs(tokens, length, d_state, width=width, gate=gate, seed=seed, **kw)
    for name in ("v", "z"):  # the oracle sees exactly the kernel's rounded inputs
        if x[name] is not None:
            x[name] = x[name].to(dtype).double()
    want = channel_mixer_scan_unfused(x["v"], x["z"], *(x[k] for k in PARAMS), backend="reference")
    param = torch.float64 if dtype == torch.float64 else torch.float32
    given = {k: None if t is None else t.to(param) for k, t in x.items()}
    for name in ("v", "z"):
        if x[name] is not None:
            t = x[name].to(dtype)
            given[name] = t.t().contiguous().t() if layout == "channel_major" else t
    got = cmt.channel_mixer_forward(given["v"], given["z"], *(given[k] for k in PARAMS))
    assert got.dtype == dtype and got.shape == (tokens, length) and got.is_contiguous()
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want).abs().max().item()
    assert err <= TOLERANCE[dtype] * scale, f"max abs error {err:.2e}, scale {scale:.3g}"


@pytest.mark.parametrize("tokens,length,d_state,width,gate", [
    (1, 1, 1, 1, True),      # one token, one position
    (5, 7, 3, 4, False),     # a partial block; no gate
    (3, 8, 4, 4, True),      # exactly one block
    (6, 19, 16, 4, True),    # blocks of 8: two full, one partial; ViM2's d_state
    (4, 12, 5, 6, True),     # conv wider than a block's padding; N not a power of two
    (2, 3, 2, 7, False),     # conv wider than the axis
])
def test_forward_matches_unfused_oracle(settings, tokens, length, d_state, width, gate):
    settings(chunk=8)
    check(tokens, length, d_state, width, gate)


def test_forward_with_several_row_tiles_and_strided_input(settings):
    settings(chunk=4, block_rows=2)
    check(5, 10, 3, layout="channel_major")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_forward_dtypes(settings, dtype):
    settings(chunk=8)
    check(4, 11, 4, dtype=dtype)


def test_large_steps_and_strongly_negative_A_stay_finite(settings):
    settings(chunk=8)
    check(3, 16, 4, delta_shift=20.0)


ALL_INPUTS = ("v", "z") + PARAMS


def check_backward(tokens, length, d_state, width=4, gate=True, dtype=torch.float32, seed=0, **kw):
    """channel_mixer_forward(keep_for_backward) + channel_mixer_backward against autograd through the
    float64 unfused composition: every one of the 12 gradients."""
    x = make_inputs(tokens, length, d_state, width=width, gate=gate, seed=seed, **kw)
    for name in ("v", "z"):
        if x[name] is not None:
            x[name] = x[name].to(dtype).double()
    dout = torch.randn(tokens, length, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    dout = dout.to(dtype).double()
    leaves = {k: None if t is None else t.clone().requires_grad_(True) for k, t in x.items()}
    want = channel_mixer_scan_unfused(leaves["v"], leaves["z"], *(leaves[k] for k in PARAMS), backend="reference")
    present = [k for k in ALL_INPUTS if leaves[k] is not None]
    want_grads = dict(zip(present, torch.autograd.grad(want, [leaves[k] for k in present], dout)))
    param = torch.float64 if dtype == torch.float64 else torch.float32
    given = {k: None if t is None else t.to(dtype if k in ("v", "z") else param) for k, t in x.items()}
    args = [given[k] for k in ALL_INPUTS]
    out, saved, y = cmt.channel_mixer_forward(*args, keep_for_backward=True)
    assert saved.shape == cmt.saved_shape(tokens, length, d_state)
    grads = dict(zip(ALL_INPUTS, cmt.channel_mixer_backward(dout.to(dtype), *args, saved, y)))
    tol = TOLERANCE[dtype]
    for name in ALL_INPUTS:
        if x[name] is None:
            assert grads[name] is None, name
            continue
        got, expected = grads[name], want_grads[name]
        assert got.shape == expected.shape and got.dtype == given[name].dtype, name
        scale = max(1.0, expected.abs().max().item())
        err = (got.double() - expected).abs().max().item()
        assert err <= tol * scale, f"d{name}: max abs error {err:.2e}, scale {scale:.3g}"


@pytest.mark.parametrize("tokens,length,d_state,width,gate", [
    (1, 1, 1, 1, True),
    (5, 7, 3, 4, False),
    (6, 19, 16, 4, True),     # blocks of 8: two full, one partial
    (4, 12, 5, 6, True),
    (2, 3, 2, 7, False),      # conv wider than the axis
])
def test_backward_matches_autograd_of_the_oracle(settings, tokens, length, d_state, width, gate):
    settings(chunk=8)
    check_backward(tokens, length, d_state, width, gate)


def test_backward_with_several_tiles_per_program(settings):
    settings(chunk=4, block_rows=2)  # 7 tokens: 4 tiles over 2 programs, the last tile partial
    check_backward(7, 10, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_backward_dtypes(settings, dtype):
    settings(chunk=8)
    check_backward(4, 11, 4, dtype=dtype)


@pytest.mark.parametrize("tokens,length", [(0, 6), (3, 0)])
def test_empty_inputs(tokens, length):
    x = {k: None if t is None else t.float().requires_grad_(True)
         for k, t in make_inputs(tokens, length, 3).items()}
    from vim2_kernels.channel_mixer import channel_mixer_scan

    out = channel_mixer_scan(x["v"], x["z"], *(x[k] for k in PARAMS), backend="triton")
    assert out.shape == (tokens, length)
    out.sum().backward()
    for name in ALL_INPUTS:
        assert x[name].grad is not None and not x[name].grad.any(), name


@pytest.fixture
def settings(monkeypatch):
    def apply(chunk, block_rows=None):
        monkeypatch.setattr(tb, "CHUNK_SIZE", chunk)
        monkeypatch.setattr(tb, "BLOCK_ROWS", block_rows)
    return apply


@pytest.mark.parametrize("gate", [True, False])
def test_channel_mixer_scan_runs_the_fused_ops_with_and_without_autograd(settings, monkeypatch, gate):
    """backend='triton': the fused custom op in inference (keeping nothing) and in training (its
    registered backward), with the oracle's output and gradients."""
    from vim2_kernels import channel_mixer as cm

    settings(chunk=8)
    x = {k: None if t is None else t.float() for k, t in make_inputs(4, 10, 3, gate=gate).items()}
    args = [x[k] for k in ALL_INPUTS]
    monkeypatch.setattr(cm, "channel_mixer_scan_unfused", None)  # must not be used
    with torch.no_grad():
        got = cm.channel_mixer_scan(*args, backend="triton")
    want = channel_mixer_scan_unfused(*args, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in args]
    got = cm.channel_mixer_scan(*leaves, backend="triton")
    dout = torch.randn_like(got)
    present = [t for t in leaves if t is not None]
    got_grads = torch.autograd.grad(got, present, dout)
    ref = [None if t is None else t.clone().requires_grad_(True) for t in args]
    want = channel_mixer_scan_unfused(*ref, backend="reference")
    want_grads = torch.autograd.grad(want, [t for t in ref if t is not None], dout)
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_fused_ops_pass_opcheck_and_compile(settings):
    settings(chunk=8)
    x = {k: t.float().requires_grad_(True) for k, t in make_inputs(3, 9, 2).items()}
    args = [x[k] for k in ALL_INPUTS]
    torch.library.opcheck(torch.ops.vim2_kernels.channel_mixer_fwd_triton.default, (*args, True))
    out, saved, y = torch.ops.vim2_kernels.channel_mixer_fwd_triton(*(a.detach() for a in args), True)
    torch.library.opcheck(torch.ops.vim2_kernels.channel_mixer_bwd_triton.default,
                          (torch.randn_like(out), *(a.detach() for a in args), saved, y))

    from vim2_kernels.channel_mixer import channel_mixer_scan

    def step(v, z, *params):
        return torch.nn.functional.gelu(channel_mixer_scan(v * 2, z, *params, backend="triton")).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(*args), step(*args)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, args)):
        torch.testing.assert_close(g, w)
