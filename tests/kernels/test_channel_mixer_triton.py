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


def test_empty_inputs():
    x = {k: None if t is None else t.float() for k, t in make_inputs(0, 6, 3).items()}
    out = cmt.channel_mixer_forward(x["v"], x["z"], *(x[k] for k in PARAMS))
    assert out.shape == (0, 6)


@pytest.fixture
def settings(monkeypatch):
    def apply(chunk, block_rows=None):
        monkeypatch.setattr(tb, "CHUNK_SIZE", chunk)
        monkeypatch.setattr(tb, "BLOCK_ROWS", block_rows)
    return apply


def test_channel_mixer_scan_uses_the_fused_forward_only_without_autograd(settings, monkeypatch):
    """backend='triton': the custom op (fused kernel) for inference; with autograd the recomputed unfused
    composition (the Triton forward has no backward), and both give the oracle's values."""
    from vim2_kernels import channel_mixer as cm

    settings(chunk=8)
    x = {k: None if t is None else t.float() for k, t in make_inputs(4, 10, 3).items()}
    args = (x["v"], x["z"], *(x[k] for k in PARAMS))
    want = channel_mixer_scan_unfused(*args, backend="reference")
    calls = []
    real = cmt.channel_mixer_forward
    monkeypatch.setattr(cmt, "channel_mixer_forward", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        got = cm.channel_mixer_scan(*args, backend="triton")
    assert calls == [1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    leaves = [t.clone().requires_grad_(True) for t in args]
    got = cm.channel_mixer_scan(*leaves, backend="triton")
    assert calls == [1] and got.requires_grad
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)


def test_fused_forward_op_passes_opcheck(settings):
    settings(chunk=8)
    x = {k: None if t is None else t.float() for k, t in make_inputs(3, 9, 2).items()}
    args = (x["v"], x["z"], *(x[k] for k in PARAMS))
    torch.library.opcheck(torch.ops.vim2_kernels.channel_mixer_fwd_triton.default, args,
                          test_utils=("test_schema", "test_faketensor"))
