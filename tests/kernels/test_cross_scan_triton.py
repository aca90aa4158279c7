"""cross_scan_2d's fused low-rank path on the triton backend under TRITON_INTERPRET=1 (CPU), tiny shapes:
Δ = dt_proj(dts) computed inside the Triton forward (and its segment summaries), routes summed in place
into one output, against the explicit cross-scan oracle (float64 loop). On a GPU,
tests/kernels/test_triton_gpu.py runs the same path compiled."""
import os
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (the backend is optional)")

import vim2_kernels  # noqa: E402
from vim2_kernels import cross_scan_2d  # noqa: E402
from vim2_kernels.selective_scan import triton_backend as tb  # noqa: E402
from test_cross_scan_lowrank import lowrank_inputs, oracle  # noqa: E402

if tb.unavailable_reason(torch.device("cpu")) is not None:
    pytest.skip(f"triton backend cannot run on CPU here: {tb.unavailable_reason(torch.device('cpu'))}",
                allow_module_level=True)

NAMES = ("u", "dts", "W", "A", "B", "C", "D", "delta_bias")


@pytest.fixture
def tiling(monkeypatch):
    def apply(chunk=4, block_rows=None, segments=None):
        monkeypatch.setattr(tb, "CHUNK_SIZE", chunk)
        monkeypatch.setattr(tb, "BLOCK_ROWS", block_rows)
        monkeypatch.setattr(tb, "SEGMENTS", segments)
    return apply


@pytest.fixture
def lowrank_calls(monkeypatch):
    """Records, per call of the Triton low-rank forward, whether it kept block checkpoints (``kept``) and
    the dtype of the map it was given (``dtypes``)."""
    calls = SimpleNamespace(kept=[], dtypes=[])
    real = tb.scan_forward_lowrank

    def spy(out, u, *args, **kwargs):
        calls.kept.append(kwargs.get("saved") is not None)
        calls.dtypes.append(u.dtype)
        return real(out, u, *args, **kwargs)

    monkeypatch.setattr(tb, "scan_forward_lowrank", spy)
    return calls


def run(x, routes, dtype=torch.float32, requires_grad=False):
    t = {k: x[k].to(dtype if k in ("u", "dts", "B", "C") else torch.float32).detach().requires_grad_(requires_grad)
         for k in NAMES}
    out = cross_scan_2d(t["u"], t["dts"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"], True, routes,
                        delta_proj_weight=t["W"], backend="triton")
    return out, t


@pytest.mark.parametrize("batch,height,width,dim,rank,block_rows,segments", [
    (1, 1, 1, 1, 1, None, None),   # one token, one channel
    (2, 3, 5, 4, 2, None, None),   # whole tile inside one batch element (dts shared by the tile)
    (2, 3, 5, 3, 3, 2, None),      # 2-row tiles straddling the batch elements (dts gathered per row)
    (1, 4, 6, 5, 6, 4, 3),         # segments: the summary kernel projects Δ too
    (2, 5, 3, 4, 1, 2, 2),         # segments with tiles straddling batch elements
])
@pytest.mark.parametrize("routes", [vim2_kernels.ROUTES, ("col_rev",)])
def test_fused_forward_matches_oracle(tiling, lowrank_calls, batch, height, width, dim, rank, block_rows,
                                      segments, routes):
    tiling(block_rows=block_rows, segments=segments)
    x = lowrank_inputs(batch, height, width, dim, d_state=3, rank=rank, n_routes=len(routes))
    with torch.no_grad():
        got, _ = run(x, routes)
    assert got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double(), oracle(x, routes), rtol=1e-4, atol=1e-4)
    assert lowrank_calls.kept == [False] * len(routes)  # one fused launch per route, nothing kept


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_forward_half_inputs(tiling, lowrank_calls, dtype):
    tiling()
    x = lowrank_inputs(2, 3, 4, 4, d_state=3, rank=2)
    for name in ("u", "dts", "B", "C"):  # the oracle sees exactly the kernel's rounded inputs
        x[name] = x[name].to(dtype).double()
    with torch.no_grad():
        got, _ = run(x, vim2_kernels.ROUTES, dtype=dtype)
    assert got.dtype == dtype
    assert lowrank_calls.dtypes == [dtype] * 4  # read as given: no float32 copies of the maps
    torch.testing.assert_close(got.double(), oracle(x, vim2_kernels.ROUTES), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("segments", [None, 2])
def test_fused_backward_matches_oracle_gradients(tiling, lowrank_calls, segments):
    tiling(block_rows=2, segments=segments)
    routes = vim2_kernels.ROUTES
    x = lowrank_inputs(2, 3, 4, 3, d_state=3, rank=2)
    grad_out = torch.randn(2, 3, 4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got, leaves = run(x, routes, requires_grad=True)
    got.backward(grad_out.float())
    assert lowrank_calls.kept == [True] * len(routes)  # checkpoints kept for the backward
    ref = {k: x[k].detach().clone().requires_grad_(True) for k in NAMES}
    oracle(ref, routes).backward(grad_out)
    torch.testing.assert_close(got.double(), oracle(x, routes), rtol=1e-4, atol=1e-4)
    for name in NAMES:
        torch.testing.assert_close(leaves[name].grad.double(), ref[name].grad, rtol=1e-3, atol=1e-4, msg=name)


def test_fused_op_passes_opcheck(tiling):
    tiling()
    x = {k: v.float() for k, v in lowrank_inputs(batch=1, height=2, width=3, dim=4, rank=2).items()}
    args = (x["u"], x["dts"], x["W"], x["A"], x["B"], x["C"], x["D"], x["delta_bias"], True,
            "row,col,row_rev,col_rev")
    for keep_states in (False, True):
        torch.library.opcheck(torch.ops.vim2_kernels.cross_scan_lowrank_fwd.default, (*args, keep_states, "triton"))
    out, saved = torch.ops.vim2_kernels.cross_scan_lowrank_fwd(*args, True, "triton")
    assert saved.shape == (4, *tb.saved_shape(1, 4, 6, 3))
    torch.library.opcheck(torch.ops.vim2_kernels.cross_scan_lowrank_bwd.default,
                          (torch.randn_like(out), *args[:8], saved, True, args[9], "triton"))


def test_bad_low_rank_arguments_are_named():
    u = torch.zeros(1, 4, 6)
    out = torch.zeros(1, 4, 6)
    A, B = torch.zeros(4, 3), torch.zeros(1, 1, 3, 6)
    with pytest.raises(ValueError, match=r"dt_weight must be \(dim, R\)"):
        tb.scan_forward_lowrank(out, u, torch.zeros(1, 1, 65, 6), torch.zeros(4, 65), A, B, B, None, None,
                                True, False, False)
    with pytest.raises(ValueError, match=r"dt_weight must be \(dim, R\)"):
        tb.scan_forward_lowrank(out, u, torch.zeros(1, 1, 2, 6), torch.zeros(5, 2), A, B, B, None, None,
                                True, False, False)
    with pytest.raises(ValueError, match=r"dts must be \(batch, 1, R, \*Ls\)"):
        tb.scan_forward_lowrank(out, u, torch.zeros(1, 1, 3, 6), torch.zeros(4, 2), A, B, B, None, None,
                                True, False, False)
    with pytest.raises(ValueError, match=r"out must be torch.float32"):
        tb.scan_forward_lowrank(out.half(), u, torch.zeros(1, 1, 2, 6), torch.zeros(4, 2), A, B, B, None, None,
                                True, False, False)


@pytest.mark.parametrize("height,width,dim", [(0, 4, 4), (3, 0, 4), (3, 4, 0)])
def test_empty_maps(tiling, height, width, dim):
    tiling()
    x = lowrank_inputs(2, height, width, dim, d_state=3, rank=2)
    got, leaves = run(x, vim2_kernels.ROUTES, requires_grad=True)
    assert got.shape == (2, height, width, dim)
    got.sum().backward()
    for name in ("W", "A", "D", "delta_bias"):  # parameters: zero gradients of their own shape
        assert leaves[name].grad.shape == leaves[name].shape and not leaves[name].grad.any(), name
