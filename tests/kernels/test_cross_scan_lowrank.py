"""cross_scan_2d with a low-rank Δ (``delta_proj_weight``): the fused cpu inference op and the
differentiable path, against the explicit cross-scan oracle (materialised permutations, float64 loop).

The fused op runs the routes through the C forward with the Δ projection inside and the routes summed
in place; its tile groups (TILE_GROUP = 8 tiles of 32 channels), partial tiles spanning two batch
elements and ranks up to the limit are covered by the swept shapes.
"""
import sys
from pathlib import Path

import pytest
import torch

import vim2_kernels
from vim2_kernels import cross_scan_2d
from vim2_kernels.selective_scan import cpu_backend

from test_api import explicit_cross_scan

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from peak_activation_memory import live_peak_mb  # noqa: E402  (the allocator-event count, shared with the tool)

needs_cpu_kernel = pytest.mark.skipif(
    cpu_backend.unavailable_reason(torch.device("cpu")) is not None,
    reason=f"cpu kernels unavailable: {cpu_backend.unavailable_reason(torch.device('cpu'))}",
)


def lowrank_inputs(batch=2, height=3, width=5, dim=4, d_state=3, rank=2, n_routes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    return dict(
        u=torch.randn(batch, height, width, dim, **f64),
        dts=torch.randn(batch, height, width, n_routes, rank, **f64),
        W=torch.randn(n_routes, dim, rank, **f64) * rank ** -0.5,
        A=-torch.rand(n_routes, dim, d_state, **f64) - 0.1,
        B=torch.randn(batch, height, width, n_routes, d_state, **f64),
        C=torch.randn(batch, height, width, n_routes, d_state, **f64),
        D=torch.randn(n_routes, dim, **f64),
        delta_bias=torch.randn(n_routes, dim, **f64) * 0.1 - 1.0,
    )


def oracle(x, routes):
    delta = torch.einsum("bhwkr,kdr->bhwkd", x["dts"], x["W"])
    return explicit_cross_scan(x["u"], delta, x["A"], x["B"], x["C"], x["D"], x["delta_bias"], routes)


def run_lowrank(x, routes, dtype=torch.float32, **kwargs):
    t = {k: v.to(dtype if k in ("u", "dts", "B", "C") else torch.float32) for k, v in x.items()}
    return cross_scan_2d(t["u"], t["dts"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"], True, routes,
                         delta_proj_weight=t["W"], **kwargs)


@needs_cpu_kernel
@pytest.mark.parametrize("batch,height,width,dim,rank", [
    (1, 1, 1, 1, 1),      # one token, one channel
    (2, 3, 5, 4, 2),      # a partial tile spanning both batch elements (gathered lanes)
    (1, 7, 6, 64, 4),     # two full tiles
    (2, 4, 9, 72, 6),     # 2 x 72 rows: partial tiles inside a batch element
    (1, 5, 4, 300, 64),   # 10 tiles: two tile groups; the largest fused rank
    (3, 2, 17, 40, 3),    # groups split differently for several threads
])
@pytest.mark.parametrize("routes", [vim2_kernels.ROUTES, ("col_rev",), ("row", "col")])
def test_fused_inference_matches_oracle(batch, height, width, dim, rank, routes):
    x = lowrank_inputs(batch, height, width, dim, d_state=5, rank=rank, n_routes=len(routes))
    with torch.no_grad():
        got = run_lowrank(x, routes, backend="cpu")
    torch.testing.assert_close(got.double(), oracle(x, routes), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("routes", [vim2_kernels.ROUTES, ("col_rev",)])
@pytest.mark.parametrize("low_rank", [True, False])
def test_unfused_inference_accumulates_routes_in_place(backend, routes, low_rank):
    """Off the fused op (CUDA, float64) without autograd: one route's Δ at a time, routes summed into the
    first route's output buffer; the same values as the oracle, and the inputs are left untouched."""
    x = lowrank_inputs(batch=2, height=4, width=3, dim=6, d_state=3, rank=2, n_routes=len(routes))
    before = {k: v.clone() for k, v in x.items()}
    with torch.no_grad():
        if low_rank:
            got = cross_scan_2d(x["u"], x["dts"], x["A"], x["B"], x["C"], x["D"], x["delta_bias"], True, routes,
                                delta_proj_weight=x["W"], backend=backend)
        else:
            delta = torch.einsum("bhwkr,kdr->bhwkd", x["dts"], x["W"])
            got = cross_scan_2d(x["u"], delta, x["A"], x["B"], x["C"], x["D"], x["delta_bias"], True, routes,
                                backend=backend)
    torch.testing.assert_close(got, oracle(x, routes), rtol=1e-10, atol=1e-10)
    for k, v in x.items():
        assert torch.equal(v, before[k]), f"{k} was modified"


def test_unfused_inference_compiles_fullgraph():
    """The in-place route accumulation stays traceable (functionalised) by torch.compile."""
    x = {k: v.float() for k, v in lowrank_inputs(batch=2, height=4, width=3, dim=6, d_state=3, rank=2).items()}
    args = [x[k] for k in ("u", "dts", "A", "B", "C", "D", "delta_bias", "W")]

    def step(u, dts, A, B, C, D, bias, W):
        return cross_scan_2d(u * 1.0, dts, A, B, C, D, bias, True, delta_proj_weight=W, backend="torch") * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), step(*args))


@needs_cpu_kernel
def test_fused_path_keeps_states_only_for_a_backward(monkeypatch):
    """One fused kernel call per route, summed in place; chunk states are written only when autograd
    records a graph; the fused result equals the materialised-Δ path of the same backend."""
    calls = []
    real = cpu_backend.scan_forward_lowrank
    monkeypatch.setattr(cpu_backend, "scan_forward_lowrank",
                        lambda *a, **k: calls.append(k["saved"] is not None) or real(*a, **k))
    x = lowrank_inputs()
    with torch.no_grad():
        fused = run_lowrank(x, vim2_kernels.ROUTES, backend="cpu")
    assert calls == [False] * 4
    calls.clear()
    t = {k: v.float() for k, v in x.items()}
    u = t["u"].clone().requires_grad_(True)
    with_graph = cross_scan_2d(u, t["dts"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"],
                               delta_proj_weight=t["W"], backend="cpu")
    assert calls == [True] * 4 and with_graph.requires_grad
    delta = torch.einsum("bhwkr,kdr->bhwkd", t["dts"], t["W"])
    materialised = cross_scan_2d(t["u"], delta, t["A"], t["B"], t["C"], t["D"], t["delta_bias"], backend="cpu")
    torch.testing.assert_close(with_graph.detach(), fused, rtol=0, atol=0)
    torch.testing.assert_close(fused, materialised, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
@pytest.mark.parametrize("routes", [vim2_kernels.ROUTES, ("col", "row_rev")])
@pytest.mark.parametrize("dim", [5, 70])
def test_gradients_flow_through_the_projection(backend, routes, dim):
    """Every input (the low-rank Δ and its weight included) gets the oracle's gradient: through the
    fused op's backward on cpu (Δ recomputed per route), through a materialised Δ elsewhere."""
    if backend == "cpu" and cpu_backend.unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("cpu kernels unavailable")
    x = lowrank_inputs(batch=2, height=3, width=4, dim=dim, d_state=3, rank=2, n_routes=len(routes))
    dtype = torch.float32 if backend == "cpu" else torch.float64
    ref_in = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    test_in = {k: v.to(dtype if k in ("u", "dts", "B", "C") else (torch.float32 if backend == "cpu" else v.dtype))
               .clone().requires_grad_(True) for k, v in x.items()}
    expected = oracle(ref_in, routes)
    got = cross_scan_2d(test_in["u"], test_in["dts"], test_in["A"], test_in["B"], test_in["C"], test_in["D"],
                        test_in["delta_bias"], True, routes, delta_proj_weight=test_in["W"], backend=backend)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    got.backward(grad.to(got.dtype))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    for name in x:
        torch.testing.assert_close(test_in[name].grad.double(), ref_in[name].grad, msg=f"grad of {name}", **tol)


@needs_cpu_kernel
@pytest.mark.parametrize("batch,height,width,dim", [(2, 3, 4, 5), (1, 6, 5, 70)])
def test_fused_backward_with_and_without_output_buffers_agree(monkeypatch, batch, height, width, dim):
    """The fused backward's two ways of collecting gradients: into one du and one Δ/dΔ buffer (backends
    with BACKWARD_INTO, the cpu one) and from fresh per-route outputs (the triton backend's way, reached
    on a CPU with BACKWARD_INTO switched off): the same gradients."""
    x = lowrank_inputs(batch=batch, height=height, width=width, dim=dim, d_state=3, rank=3)
    grad = torch.randn(batch, height, width, dim)

    def grads():
        t = {k: v.float().requires_grad_(True) for k, v in x.items()}
        run_lowrank(t, vim2_kernels.ROUTES, backend="cpu").backward(grad)
        return {k: v.grad for k, v in t.items()}

    into = grads()
    monkeypatch.setattr(cpu_backend, "BACKWARD_INTO", False)
    fresh = grads()
    for name in x:
        torch.testing.assert_close(into[name], fresh[name], rtol=1e-6, atol=1e-7, msg=name)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_half_precision_inputs(dtype):
    x = lowrank_inputs(batch=1, height=4, width=4, dim=40, d_state=4, rank=3)
    rounded = {k: (v.to(dtype).double() if k in ("u", "dts", "B", "C") else v) for k, v in x.items()}
    with torch.no_grad():
        got = run_lowrank(x, vim2_kernels.ROUTES, dtype=dtype, backend="cpu")
    assert got.dtype == dtype
    expected = oracle(rounded, vim2_kernels.ROUTES)
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=5e-2)


@needs_cpu_kernel
def test_rank_above_the_kernel_limit_falls_back_to_a_materialised_delta():
    x = lowrank_inputs(batch=1, height=2, width=3, dim=4, d_state=2, rank=cpu_backend.MAX_DT_RANK + 1)
    with torch.no_grad():
        got = run_lowrank(x, vim2_kernels.ROUTES, backend="cpu")
    torch.testing.assert_close(got.double(), oracle(x, vim2_kernels.ROUTES), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,bad,match", [
    ("W", torch.zeros(4, 4, 0), r"delta_proj_weight must have rank R >= 1"),
    ("W", torch.zeros(4, 5, 2), r"delta_proj_weight must have shape \(K, dim, R\) = \(4, 4, R\)"),
    ("W", torch.zeros(4, 4), r"delta_proj_weight must have shape"),
    ("dts", torch.zeros(2, 3, 5, 4, 3), r"delta must have shape \(batch, H, W, K, R\) \(low-rank"),
    ("dts", torch.zeros(2, 3, 5, 4, 2, dtype=torch.int64), r"delta must be a floating-point tensor"),
])
def test_bad_low_rank_inputs_name_the_argument(name, bad, match):
    x = {k: v.float() for k, v in lowrank_inputs().items()}
    x[name] = bad
    with pytest.raises((ValueError, TypeError), match=match):
        cross_scan_2d(x["u"], x["dts"], x["A"], x["B"], x["C"], x["D"], x["delta_bias"],
                      delta_proj_weight=x["W"])


@needs_cpu_kernel
@pytest.mark.parametrize("with_skip_and_bias", [True, False])
def test_fused_op_passes_opcheck_and_compiles(with_skip_and_bias):
    x = {k: v.float() for k, v in lowrank_inputs(batch=1, height=3, width=4, dim=36, rank=3).items()}
    if not with_skip_and_bias:  # absent D and Δ bias: the backward returns two distinct placeholders
        x["D"] = x["delta_bias"] = None
    routes = "row,col,row_rev,col_rev"
    args = (x["u"], x["dts"], x["W"], x["A"], x["B"], x["C"], x["D"], x["delta_bias"], True, routes)
    for keep_states in (False, True):
        torch.library.opcheck(torch.ops.vim2_kernels.cross_scan_lowrank_fwd.default, (*args, keep_states, "cpu"))
    grad_args = [a.requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(torch.ops.vim2_kernels.cross_scan_lowrank_fwd.default, (*grad_args, True, "cpu"))
    out, saved = torch.ops.vim2_kernels.cross_scan_lowrank_fwd(*args, True, "cpu")
    bwd_args = (torch.randn_like(out), *(None if a is None else a.detach() for a in args[:8]), saved.detach(),
                True, routes, "cpu")
    torch.library.opcheck(torch.ops.vim2_kernels.cross_scan_lowrank_bwd.default, bwd_args)

    def step(u, dts, W, A, B, C, D, bias):
        return cross_scan_2d(u * 2, dts, A, B, C, D, bias, delta_proj_weight=W, backend="cpu").relu()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    def fresh(requires_grad):
        return [None if a is None else a.detach().requires_grad_(requires_grad) for a in args[:8]]

    plain = fresh(False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*plain), step(*plain))
    leaves, expected = fresh(True), fresh(True)
    compiled(*leaves).sum().backward()
    step(*expected).sum().backward()
    for got, want in zip(leaves, expected):
        if got is not None:
            torch.testing.assert_close(got.grad, want.grad)


@needs_cpu_kernel
@pytest.mark.parametrize("threads", [2, 3])
def test_tile_grouping_does_not_change_results(threads):
    """Threads change how tiles are grouped (up to 8 per group, fewer to keep every thread busy); each
    tile's arithmetic is the same, so the outputs are bitwise equal."""
    x = lowrank_inputs(batch=2, height=5, width=3, dim=200, d_state=4, rank=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            single = run_lowrank(x, vim2_kernels.ROUTES, backend="cpu")
        torch.set_num_threads(threads)
        with torch.no_grad():
            several = run_lowrank(x, vim2_kernels.ROUTES, backend="cpu")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(single, several)


@needs_cpu_kernel
def test_backward_with_several_threads_is_reproducible_and_matches_one_thread():
    """d dts is summed over channel tiles in per-thread partials (a static tile schedule): the same
    thread count gives bitwise-equal gradients, another one the same up to summation order."""
    x = lowrank_inputs(batch=2, height=6, width=5, dim=100, d_state=4, rank=5)
    grad_out = torch.randn(2, 6, 5, 100, generator=torch.Generator().manual_seed(3))

    def grads():
        t = {k: v.float().clone().requires_grad_(True) for k, v in x.items()}
        out = cross_scan_2d(t["u"], t["dts"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"],
                            delta_proj_weight=t["W"], backend="cpu")
        out.backward(grad_out)
        return {k: v.grad for k, v in t.items()}

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = grads()
        torch.set_num_threads(3)
        first, second = grads(), grads()
    finally:
        torch.set_num_threads(before)
    for name in single:
        assert torch.equal(first[name], second[name]), name
        torch.testing.assert_close(first[name], single[name], rtol=1e-5, atol=1e-5, msg=name)


def test_fused_rank_limits_match_the_backends():
    from vim2_kernels.cross_scan import FUSED_LOWRANK_MAX_RANK
    from vim2_kernels.selective_scan.dispatch import get_backend_module

    for name, limit in FUSED_LOWRANK_MAX_RANK.items():
        assert get_backend_module(name).MAX_DT_RANK == limit, name


@needs_cpu_kernel
@pytest.mark.parametrize("height,width,dim", [(0, 4, 4), (3, 0, 4), (3, 4, 0)])
def test_fused_path_with_empty_maps(height, width, dim):
    x = lowrank_inputs(2, height, width, dim, d_state=3, rank=2)
    t = {k: v.float().requires_grad_(True) for k, v in x.items()}
    out = cross_scan_2d(t["u"], t["dts"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"],
                        delta_proj_weight=t["W"], backend="cpu")
    assert out.shape == (2, height, width, dim)
    out.sum().backward()
    for name, leaf in t.items():  # every gradient exists with its input's shape, and is zero
        assert leaf.grad.shape == leaf.shape and not leaf.grad.any(), name


@needs_cpu_kernel
def test_fused_training_step_holds_less_than_the_per_route_path(monkeypatch):
    # The fused backward recomputes one route's Δ at a time into one buffer that the cpu kernel overwrites
    # with dΔ, adds every route's du into one map and projects dΔ in the route's own layout, so a
    # forward+backward peaks lower than the per-route path, which saves all four Δ maps (measured here:
    # 10.3 maps per-route; fused 10.4 before the last three changes, 8.4 before the shared buffers, now 7.2).
    from vim2_kernels import cross_scan

    x = {k: v.float() for k, v in lowrank_inputs(1, 64, 64, 96, d_state=16, rank=6).items()}
    leaves = {k: v.requires_grad_(True) for k, v in x.items()}
    dout = torch.randn(1, 64, 64, 96)

    def step():
        out = cross_scan_2d(*(leaves[k] for k in ("u", "dts", "A", "B", "C", "D", "delta_bias")),
                            delta_proj_weight=leaves["W"], backend="cpu")
        torch.autograd.grad(out, list(leaves.values()), dout)

    step()  # first call: one-off allocations stay out of the count
    fused = live_peak_mb(step)
    monkeypatch.setitem(cross_scan.FUSED_LOWRANK_MAX_RANK, "cpu", 0)  # rank 6 > 0: the per-route path
    per_route = live_peak_mb(step)
    map_mb = x["u"].numel() * 4 / 2**20
    assert fused < per_route - 2.5 * map_mb, (fused / map_mb, per_route / map_mb)
