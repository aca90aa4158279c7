"""The public layer of vim2_kernels: validation, dispatch, custom ops, cross-scan and bidirectional entries.

Backend numerics are swept in test_torch_backend.py / test_triton_backend.py; here every entry point is
checked against explicit permutations + the float64 reference loop.
"""
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import vim2_kernels
from vim2_kernels import (
    BackendUnavailableError,
    bidirectional_scan,
    cross_scan_2d,
    selective_scan_fn,
    selective_scan_reference,
)
from vim2_kernels.selective_scan import dispatch


def make_inputs(batch=2, dim=4, seqlen=9, d_state=3, groups=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape_bc = (batch, d_state, seqlen) if groups is None else (batch, groups, d_state, seqlen)
    return dict(
        u=torch.randn(batch, dim, seqlen, generator=g, dtype=dtype),
        delta=torch.randn(batch, dim, seqlen, generator=g, dtype=dtype) * 0.5,
        A=-torch.rand(dim, d_state, generator=g, dtype=dtype) * 2 - 0.1,
        B=torch.randn(*shape_bc, generator=g, dtype=dtype),
        C=torch.randn(*shape_bc, generator=g, dtype=dtype),
        D=torch.randn(dim, generator=g, dtype=dtype),
        z=torch.randn(batch, dim, seqlen, generator=g, dtype=dtype),
        delta_bias=torch.randn(dim, generator=g, dtype=dtype) * 0.1,
    )


def leaves(tensors, dtype=None):
    return {k: v.to(dtype or v.dtype).clone().requires_grad_(True) for k, v in tensors.items()}


# the cpu backend computes in float32 (it has no float64 kernels): its results are compared in float32
WORKING_DTYPE = {"cpu": torch.float32}


def assert_close_to_oracle(got, expected, backend, msg=None):
    if got.dtype == expected.dtype:
        torch.testing.assert_close(got, expected, msg=msg)
    else:
        torch.testing.assert_close(got.to(expected.dtype), expected, rtol=1e-4, atol=1e-4, msg=msg)


# --------------------------------------------------------------------------------------------- semantics

def test_reverse_equals_scan_of_flipped_sequence():
    x = make_inputs()
    out, last = selective_scan_reference(**x, delta_softplus=True, reverse=True, return_last_state=True)
    flipped = {k: (v.flip(-1) if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    ref_out, ref_last = selective_scan_reference(**flipped, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, ref_out.flip(-1))
    torch.testing.assert_close(last, ref_last)


def test_initial_state_continues_a_split_sequence():
    x = make_inputs(seqlen=10)
    full, full_last = selective_scan_reference(**x, return_last_state=True)
    first = {k: (v[..., :4] if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    second = {k: (v[..., 4:] if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    out1, state = selective_scan_reference(**first, return_last_state=True)
    out2, last = selective_scan_reference(**second, initial_state=state, return_last_state=True)
    torch.testing.assert_close(torch.cat([out1, out2], -1), full)
    torch.testing.assert_close(last, full_last)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_mamba_positional_signature(backend):
    x = make_inputs()
    out, last = selective_scan_fn(
        x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, True, backend=backend
    )
    ref, ref_last = selective_scan_reference(**x, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(last, ref_last)
    assert last.shape == (2, 4, 3)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("groups", [None, 2])
def test_gradcheck_float64_default_backend(reverse, groups):
    x = make_inputs(batch=1, dim=2, seqlen=5, d_state=2, groups=groups)
    init = torch.randn(1, 2, 2, dtype=torch.float64)
    names = list(x) + ["initial_state"]
    values = [*x.values(), init]

    def fn(*args):
        kw = dict(zip(names, args))
        out, last = selective_scan_fn(**kw, delta_softplus=True, return_last_state=True, reverse=reverse)
        return out, last

    assert torch.autograd.gradcheck(fn, [v.clone().requires_grad_(True) for v in values])


def test_token_major_inputs_through_strides():
    x = make_inputs(dtype=torch.float32)
    token_major = {k: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() == 3 else v)
                   for k, v in x.items()}
    assert token_major["u"].stride(1) == 1
    torch.testing.assert_close(selective_scan_fn(**token_major), selective_scan_fn(**x))


# ------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (lambda x: x.update(u=x["u"][0]), ValueError, r"u must have shape \(batch, dim, L\)"),
        (lambda x: x.update(delta=x["delta"][:, :, :-1]), ValueError, "delta must have shape"),
        (lambda x: x.update(A=x["A"][None]), ValueError, "A must be a 2-D"),
        (lambda x: x.update(A=x["A"].to(torch.complex128)), TypeError, "complex"),
        (lambda x: x.update(B=x["B"][:, :-1]), ValueError, r"B must have shape \(batch, N, L\)"),
        (lambda x: x.update(C=x["C"][None]), ValueError, "C must have shape"),
        (lambda x: x.update(D=x["D"][:-1]), ValueError, r"D must have shape \(dim,\)"),
        (lambda x: x.update(delta_bias=x["delta_bias"][None]), ValueError, "delta_bias must have shape"),
        (lambda x: x.update(z=x["z"][:1]), ValueError, "z must have shape"),
        (lambda x: x.update(delta=x["delta"].float()), TypeError, "delta must have u's dtype"),
        (lambda x: x.update(u=x["u"].long()), TypeError, "u must be float32"),
        (lambda x: x.update(B=torch.randn(2, 3, 3, 9, dtype=torch.float64)), ValueError, "must divide dim"),
        (lambda x: x.update(u=x["u"].to("meta")), ValueError, "u is on meta"),
        (lambda x: x.update(initial_state=torch.zeros(2, 4, 5)), ValueError, r"initial_state must have shape"),
        (lambda x: x.update(A=x["A"].tolist()), ValueError, "A must be a 2-D"),
    ],
)
def test_bad_input_names_the_argument(change, error, pattern):
    x = make_inputs()
    change(x)
    with pytest.raises(error, match=pattern):
        selective_scan_fn(**x)


def test_cross_scan_and_bidirectional_validate_shapes():
    u = torch.randn(1, 3, 4, 2)
    with pytest.raises(ValueError, match=r"A must have shape \(K, dim, N\)"):
        cross_scan_2d(u, torch.randn(1, 3, 4, 4, 2), -torch.rand(2, 2, 3), torch.randn(1, 3, 4, 4, 3),
                      torch.randn(1, 3, 4, 4, 3))
    with pytest.raises(ValueError, match="routes must be"):
        cross_scan_2d(u, torch.randn(1, 3, 4, 1, 2), -torch.rand(1, 2, 3), torch.randn(1, 3, 4, 1, 3),
                      torch.randn(1, 3, 4, 1, 3), routes=("diagonal",))
    with pytest.raises(ValueError, match="leading direction axis of size 2"):
        bidirectional_scan(torch.randn(3, 1, 1, 5), torch.randn(3, 1, 1, 5), -torch.rand(3, 1, 2),
                           torch.randn(3, 1, 2, 5), torch.randn(3, 1, 2, 5))


# -------------------------------------------------------------------------------------------- dispatch

@pytest.fixture
def fresh_dispatch(monkeypatch):
    dispatch._resolve.cache_clear()
    dispatch._warned.clear()
    monkeypatch.delenv(dispatch.BACKEND_ENV_VAR, raising=False)
    yield monkeypatch
    dispatch._resolve.cache_clear()
    dispatch._warned.clear()


def test_auto_uses_compiled_cpu_backend_on_cpu(fresh_dispatch):
    expected = "cpu" if dispatch.backend_status(torch.device("cpu"))["cpu"] is None else "torch"
    assert dispatch.resolve_backend(None, torch.device("cpu"), torch.float32) == expected
    assert dispatch.resolve_backend(None, torch.device("cpu"), torch.float64) == "torch"


def test_env_variable_overrides_auto(fresh_dispatch):
    fresh_dispatch.setenv(dispatch.BACKEND_ENV_VAR, "reference")
    assert dispatch.resolve_backend(None, torch.device("cpu"), torch.float32) == "reference"
    # an explicit argument wins over the environment
    assert dispatch.resolve_backend("torch", torch.device("cpu"), torch.float32) == "torch"


def test_unknown_backend_is_rejected(fresh_dispatch):
    with pytest.raises(ValueError, match="unknown selective-scan backend 'cuda'"):
        selective_scan_fn(**make_inputs(), backend="cuda")
    fresh_dispatch.setenv(dispatch.BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError, match="VIM2_SCAN_BACKEND"):
        selective_scan_fn(**make_inputs())


def test_explicit_request_that_cannot_run_raises_with_reason(fresh_dispatch):
    real = dispatch._device_reason
    fresh_dispatch.setattr(
        dispatch, "_device_reason",
        lambda name, device: "no GPU in this test" if name == "triton" else real(name, device),
    )
    with pytest.raises(BackendUnavailableError, match="requested by the backend= argument.*no GPU in this test"):
        selective_scan_fn(**make_inputs(), backend="triton")


def test_backend_that_fails_to_import_is_reported_not_raised(fresh_dispatch):
    # e.g. a Triton too old for the kernel definitions raises TypeError at import: that backend is
    # unavailable with the reason, the others still serve
    import importlib

    real_import = importlib.import_module

    def failing_import(name, *args):
        if name.endswith(".triton_backend"):
            raise TypeError("jit() got an unexpected keyword argument 'do_not_specialize_on_alignment'")
        return real_import(name, *args)

    dispatch._import_backend.cache_clear()
    fresh_dispatch.setattr(dispatch.importlib, "import_module", failing_import)
    try:
        status = dispatch.backend_status(torch.device("cpu"))
        assert status["triton"] == ("cannot import the triton backend: TypeError: jit() got an unexpected keyword "
                                    "argument 'do_not_specialize_on_alignment'")
        assert status["torch"] is None
        with pytest.raises(BackendUnavailableError, match="TypeError: jit"):
            dispatch.get_backend_module("triton")
    finally:
        dispatch._import_backend.cache_clear()


def test_auto_fallback_warns_once_with_reason(fresh_dispatch):
    real = dispatch._device_reason
    fresh_dispatch.setattr(
        dispatch, "_device_reason",
        lambda name, device: "simulated breakage" if name == "torch" else real(name, device),
    )
    x = make_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = selective_scan_fn(**x)
        selective_scan_fn(**x)
    messages = [str(w.message) for w in caught if "vim2_kernels" in str(w.message)]
    assert len(messages) == 1 and "simulated breakage" in messages[0] and "reference" in messages[0]
    torch.testing.assert_close(out, selective_scan_reference(**x))


def test_cli_reports_backends():
    result = subprocess.run([sys.executable, "-m", "vim2_kernels"], capture_output=True, text=True, check=True)
    assert "torch" in result.stdout and "reference  usable" in result.stdout
    assert "device cpu" in result.stdout


def test_kernel_package_imports_nothing_from_vim2_timm_or_mm():
    code = (
        "import sys, vim2_kernels\n"
        "bad = [m for m in ('vim2', 'timm', 'mmengine', 'mmdet', 'mmseg', 'mmcv') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_works_without_triton():
    code = (
        "import sys, warnings; sys.modules['triton'] = None\n"
        "import torch, vim2_kernels\n"
        "status = vim2_kernels.backend_status(torch.device('cpu'))\n"
        "assert status['triton'] is not None and status['torch'] is None, status\n"
        "u = torch.randn(1, 2, 5); A = -torch.rand(2, 3); B = torch.randn(1, 3, 5)\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('error')\n"
        "    out = vim2_kernels.selective_scan_fn(u, u.clone(), A, B, B.clone())\n"
        "assert out.shape == (1, 2, 5)\n"
        "print(status['triton'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "triton" in result.stdout


# ------------------------------------------------------------------------------------ 2-D cross-scan

def explicit_cross_scan(u, delta, A, B, C, D, delta_bias, routes):
    """Cross-scan by materialised permutations and the reference loop (the obvious implementation)."""
    batch, height, width, dim = u.shape
    total = torch.zeros_like(u)
    for k, route in enumerate(routes):
        def to_seq(t):  # (batch, H, W, X) -> (batch, X, L) in route order
            t = t.permute(0, 2, 1, 3) if route.startswith("col") else t
            seq = t.reshape(batch, height * width, -1).transpose(1, 2)
            return seq.flip(-1) if route.endswith("rev") else seq

        y = selective_scan_reference(
            to_seq(u), to_seq(delta[:, :, :, k]), A[k], to_seq(B[:, :, :, k]), to_seq(C[:, :, :, k]),
            D[k], None, delta_bias[k], delta_softplus=True,
        )
        y = y.flip(-1) if route.endswith("rev") else y
        y = y.transpose(1, 2)
        if route.startswith("col"):
            y = y.reshape(batch, width, height, dim).permute(0, 2, 1, 3)
        else:
            y = y.reshape(batch, height, width, dim)
        total = total + y
    return total


def cross_scan_inputs(batch=2, height=3, width=5, dim=4, d_state=3, n_routes=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return dict(
        u=torch.randn(batch, height, width, dim, generator=g, dtype=dtype),
        delta=torch.randn(batch, height, width, n_routes, dim, generator=g, dtype=dtype) * 0.5,
        A=-torch.rand(n_routes, dim, d_state, generator=g, dtype=dtype) - 0.1,
        B=torch.randn(batch, height, width, n_routes, d_state, generator=g, dtype=dtype),
        C=torch.randn(batch, height, width, n_routes, d_state, generator=g, dtype=dtype),
        D=torch.randn(n_routes, dim, generator=g, dtype=dtype),
        delta_bias=torch.randn(n_routes, dim, generator=g, dtype=dtype) * 0.1,
    )


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
@pytest.mark.parametrize("routes", [vim2_kernels.ROUTES, ("row", "col_rev")])
def test_cross_scan_matches_explicit_permutations(backend, routes):
    x = cross_scan_inputs(n_routes=len(routes))
    ref_in, test_in = leaves(x), leaves(x, WORKING_DTYPE.get(backend))
    expected = explicit_cross_scan(**ref_in, routes=routes)
    got = cross_scan_2d(**test_in, routes=routes, backend=backend)
    assert got.shape == x["u"].shape
    assert_close_to_oracle(got, expected, backend)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    got.backward(grad.to(got.dtype))
    for name in x:
        assert_close_to_oracle(test_in[name].grad, ref_in[name].grad, backend, msg=f"grad of {name}")


# ------------------------------------------------------------------------------------- bidirectional

@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_bidirectional_matches_two_explicit_scans(backend):
    g = torch.Generator().manual_seed(2)
    batch, dim, seqlen, d_state = 6, 1, 12, 4  # the channel-mixer shape: many rows, dim 1
    x = dict(
        u=torch.randn(2, batch, dim, seqlen, generator=g, dtype=torch.float64),
        delta=torch.randn(2, batch, dim, seqlen, generator=g, dtype=torch.float64),
        A=-torch.rand(2, dim, d_state, generator=g, dtype=torch.float64),
        B=torch.randn(2, batch, d_state, seqlen, generator=g, dtype=torch.float64),
        C=torch.randn(2, batch, d_state, seqlen, generator=g, dtype=torch.float64),
        D=torch.randn(2, dim, generator=g, dtype=torch.float64),
        delta_bias=torch.randn(2, dim, generator=g, dtype=torch.float64),
    )
    z = torch.randn(batch, dim, seqlen, generator=g, dtype=torch.float64)
    ref_in, test_in = leaves(x), leaves(x, WORKING_DTYPE.get(backend))
    fwd = selective_scan_reference(*(ref_in[k][0] for k in ("u", "delta", "A", "B", "C", "D")),
                                   delta_bias=ref_in["delta_bias"][0], delta_softplus=True)
    flip = lambda t: t.flip(-1)  # noqa: E731 - the reverse direction written as a flip, independently
    bwd = flip(selective_scan_reference(flip(ref_in["u"][1]), flip(ref_in["delta"][1]), ref_in["A"][1],
                                        flip(ref_in["B"][1]), flip(ref_in["C"][1]), ref_in["D"][1],
                                        delta_bias=ref_in["delta_bias"][1], delta_softplus=True))
    expected = (fwd + bwd) * F.silu(z)
    got = bidirectional_scan(**test_in, z=z.to(test_in["u"].dtype), delta_softplus=True, backend=backend)
    assert_close_to_oracle(got, expected, backend)
    expected.sum().backward()
    got.sum().backward()
    for name in x:
        assert_close_to_oracle(test_in[name].grad, ref_in[name].grad, backend, msg=f"grad of {name}")


# ------------------------------------------------------------------------------------- torch.compile

class ScanModule(torch.nn.Module):
    """A module calling every public entry, as a model would."""

    def __init__(self, dim=4, d_state=3):
        super().__init__()
        self.A_log = torch.nn.Parameter(torch.rand(dim, d_state))
        self.A2 = torch.nn.Parameter(-torch.rand(4, dim, d_state))
        self.A1 = torch.nn.Parameter(-torch.rand(2, 1, d_state))

    def forward(self, u, delta, B, C, maps, map_delta, map_B, map_C, rows, row_B):
        y = selective_scan_fn(u, delta, -torch.exp(self.A_log), B, C, delta_softplus=True)
        y2 = cross_scan_2d(maps, map_delta, self.A2, map_B, map_C)
        y3 = bidirectional_scan(rows, rows, self.A1, row_B, row_B, delta_softplus=True)
        return y.sum() + y2.sum() + y3.sum()


def test_public_ops_compile_fullgraph_on_cpu():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    module = ScanModule()
    args = [
        torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g),
        torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g),
        torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 2, 3, 4, 4, generator=g),
        torch.randn(1, 2, 3, 4, 3, generator=g), torch.randn(1, 2, 3, 4, 3, generator=g),
        torch.randn(2, 5, 1, 8, generator=g), torch.randn(2, 5, 3, 8, generator=g),
    ]
    args = [a.requires_grad_(True) for a in args]
    eager = module(*args)
    eager_grads = torch.autograd.grad(eager, [*module.parameters(), *args])
    compiled = torch.compile(module, fullgraph=True)
    result = compiled(*args)
    grads = torch.autograd.grad(result, [*module.parameters(), *args])
    torch.testing.assert_close(result, eager)
    for got, expected in zip(grads, eager_grads):
        torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------ custom-op registration

def usable_fast_backends():
    """(backend, dtype) pairs that can run here: float32 everywhere, float64 where supported."""
    status = vim2_kernels.backend_status(torch.device("cpu"))
    pairs = []
    for name in ("cpu", "torch", "triton"):
        if status[name] is None:
            supported = getattr(dispatch.get_backend_module(name), "SUPPORTED_DTYPES", None)
            pairs += [(name, d) for d in (torch.float32, torch.float64) if supported is None or d in supported]
    return pairs


@pytest.mark.parametrize("backend,dtype", usable_fast_backends())
def test_custom_ops_pass_opcheck(backend, dtype):
    """torch.library.opcheck: fake kernels match real outputs (shapes, dtypes, strides), autograd is
    registered correctly and the ops survive make_fx/AOT tracing."""
    x = make_inputs(batch=1, dim=2, seqlen=5, d_state=2, groups=1, dtype=dtype)
    init = torch.randn(1, 2, 2, dtype=torch.float32 if dtype != torch.float64 else dtype)
    args = [x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], init]
    args = [a.requires_grad_(True) for a in args]
    fwd_args = (*args, True, True, backend)
    torch.library.opcheck(torch.ops.vim2_kernels.selective_scan_fwd.default, fwd_args)
    out, last, saved = torch.ops.vim2_kernels.selective_scan_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), torch.randn_like(last), *[a.detach() for a in args], saved.detach(),
                True, True, backend)
    torch.library.opcheck(torch.ops.vim2_kernels.selective_scan_bwd.default, bwd_args)
