"""channel_mixer_scan: the fused CPU kernel against the unfused composition in float64 (the oracle runs
the reference scan), forward and every gradient, over lengths, state sizes, conv widths, gate on/off
and token counts around the 32-token tiles; dtypes; validation; custom-op registration and compile."""
import pytest
import torch

import vim2_kernels
from vim2_kernels.channel_mixer import channel_mixer_scan, channel_mixer_scan_unfused
from vim2_kernels.selective_scan import cpu_backend

PARAMS = ("conv_weight", "conv_bias", "delta_weight", "delta_bias", "B_weight", "B_bias", "C_weight", "C_bias",
          "A", "D")
needs_cpu_kernel = pytest.mark.skipif(
    cpu_backend.unavailable_reason(torch.device("cpu")) is not None,
    reason=f"cpu backend not built here: {cpu_backend.unavailable_reason(torch.device('cpu'))}",
)


def make_inputs(tokens, length, d_state, width=4, gate=True, seed=0, delta_shift=-2.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(
        v=r(tokens, length), z=r(tokens, length) if gate else None,
        conv_weight=0.5 * r(2, width), conv_bias=0.1 * r(2), delta_weight=r(2),
        delta_bias=0.5 * r(2, length) + delta_shift, B_weight=r(2, d_state), B_bias=0.3 * r(2, d_state, length),
        C_weight=r(2, d_state), C_bias=0.3 * r(2, d_state, length),
        A=-(torch.rand(2, d_state, generator=g, dtype=torch.float64) * 2 + 0.2), D=r(2),
    )


def run(fn, inputs, dtype, dout, **kw):
    leaves = {k: None if t is None else t.to(dtype).clone().requires_grad_(True) for k, t in inputs.items()}
    out = fn(leaves["v"], leaves["z"], *(leaves[k] for k in PARAMS), **kw)
    present = [k for k, t in leaves.items() if t is not None]
    grads = torch.autograd.grad(out, [leaves[k] for k in present], dout.to(out.dtype))
    return out, dict(zip(present, grads))


def assert_matches_oracle(inputs, dtype=torch.float32, tol=2e-5):
    dout = torch.randn(inputs["v"].shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    want, want_grads = run(channel_mixer_scan_unfused, inputs, torch.float64, dout, backend="reference")
    got, grads = run(channel_mixer_scan, inputs, dtype, dout, backend="cpu")
    assert got.dtype == dtype and got.shape == inputs["v"].shape
    for name, value, expected in [("out", got, want)] + [(k, grads[k], want_grads[k]) for k in want_grads]:
        assert value.shape == expected.shape, name
        scale = max(1.0, expected.abs().max().item())
        err = (value.double() - expected).abs().max().item()
        assert err <= tol * scale, f"{name}: max abs error {err:.2e} > {tol:.0e} * {scale:.3g}"


@needs_cpu_kernel
@pytest.mark.parametrize("tokens,length,d_state,width,gate", [
    (1, 1, 1, 1, True),
    (15, 7, 3, 4, False),     # one partial tile
    (32, 24, 4, 4, True),     # one full tile
    (33, 8, 2, 4, True),      # a full tile and one token
    (37, 48, 16, 4, True),    # partial last tile, ViM2's d_state
    (5, 192, 16, 4, True),    # the stage-1 channel width
    (20, 9, 2, 6, False),     # conv wider than usual
])
def test_fused_kernel_matches_unfused_float64_oracle(tokens, length, d_state, width, gate):
    assert_matches_oracle(make_inputs(tokens, length, d_state, width, gate))


@needs_cpu_kernel
def test_stress_large_step_sizes_and_strongly_negative_A():
    x = make_inputs(21, 30, 4, delta_shift=25.0)  # softplus above 20: identity branch
    x["A"] = x["A"] * 500
    assert_matches_oracle(x)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 5e-3)])
def test_half_precision_inputs(dtype, tol):
    x = make_inputs(19, 24, 4)
    for name in ("v", "z"):  # the oracle sees the rounded inputs
        x[name] = x[name].to(dtype).double()
    params = {k: x[k].float() for k in PARAMS}
    got = channel_mixer_scan(x["v"].to(dtype), x["z"].to(dtype), *params.values(), backend="cpu")
    want = channel_mixer_scan_unfused(x["v"], x["z"], *(x[k] for k in PARAMS), backend="reference")
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@needs_cpu_kernel
def test_strided_input_is_read_without_copy_semantics_change():
    x = make_inputs(18, 20, 4)
    wide = torch.randn(18, 2 * 20, dtype=torch.float64)
    wide[:, ::2] = x["v"]
    x_strided = dict(x, v=wide[:, ::2])  # a non-contiguous (T, E) view
    assert not x_strided["v"].is_contiguous()
    assert_matches_oracle(x_strided)


@needs_cpu_kernel
@pytest.mark.parametrize("threads", [1, 3])
def test_thread_count_does_not_change_results(threads):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert_matches_oracle(make_inputs(70, 16, 4, seed=threads))
    finally:
        torch.set_num_threads(before)


def test_auto_on_float64_runs_the_unfused_path():
    x = make_inputs(6, 10, 3)
    got = channel_mixer_scan(x["v"], x["z"], *(x[k] for k in PARAMS))
    want = channel_mixer_scan_unfused(x["v"], x["z"], *(x[k] for k in PARAMS), backend="reference")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("gate,chunk_tokens", [(True, 7), (False, 7), (True, 1000)])  # 5 chunks or 1
def test_unfused_path_with_autograd_recomputes_token_chunks(monkeypatch, gate, chunk_tokens):
    """Off the fused kernel (CUDA, float64, no compiler) training runs the composition in checkpointed
    token chunks: same output and gradients as the whole-map composition, and autograd keeps only the
    inputs and chunk outputs, not every token's (2, N, E) B and C."""
    from vim2_kernels import channel_mixer as cm

    monkeypatch.setattr(cm, "RECOMPUTE_CHUNK_ELEMENTS", chunk_tokens * 24)
    x = make_inputs(30, 24, 8, gate=gate)  # chunks of 7 tokens: the last one partial
    dout = torch.randn(30, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want, want_grads = run(channel_mixer_scan_unfused, x, torch.float64, dout, backend="torch")
    got, grads = run(channel_mixer_scan, x, torch.float64, dout, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-10, atol=1e-10, msg=name)

    def saved_bytes(fn):  # distinct storages kept for backward (chunks of v and shared parameters count once)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        leaves = {k: None if t is None else t.clone().requires_grad_(True) for k, t in x.items()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(leaves["v"], leaves["z"], *(leaves[k] for k in PARAMS), backend="torch")
        return sum(storages.values())

    per_token_bc = 2 * 2 * 30 * 8 * 24 * 8  # B and C, 2 directions, float64
    assert saved_bytes(channel_mixer_scan_unfused) > per_token_bc
    assert saved_bytes(channel_mixer_scan) < per_token_bc / 4


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_unfused_path_with_autograd_and_no_tokens(backend):
    x = {k: None if t is None else t.clone().requires_grad_(True) for k, t in make_inputs(0, 6, 3).items()}
    out = channel_mixer_scan(x["v"], x["z"], *(x[k] for k in PARAMS), backend=backend)
    assert out.shape == (0, 6)
    out.sum().backward()
    assert x["v"].grad.shape == (0, 6) and torch.equal(x["B_bias"].grad, torch.zeros(2, 3, 6, dtype=torch.float64))


def test_recomputed_path_compiles_fullgraph_with_gradients(monkeypatch):
    from vim2_kernels import channel_mixer as cm

    monkeypatch.setattr(cm, "RECOMPUTE_CHUNK_ELEMENTS", 7 * 12)
    x = {k: t.float().requires_grad_(True) for k, t in make_inputs(20, 12, 4).items()}
    args = (x["v"], x["z"], *(x[k] for k in PARAMS))

    def step(v, z, *params):
        return torch.nn.functional.gelu(channel_mixer_scan(v * 2, z, *params, backend="torch")).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(*args)
    want = step(*args)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, args)):
        torch.testing.assert_close(g, w)


def test_unfused_path_without_autograd_is_not_checkpointed(monkeypatch):
    from vim2_kernels import channel_mixer as cm

    monkeypatch.setattr(cm, "RECOMPUTE_CHUNK_ELEMENTS", 7 * 24)
    calls = []
    monkeypatch.setattr(cm, "checkpoint", lambda *a, **k: calls.append(1))
    x = make_inputs(30, 24, 8)
    with torch.no_grad():
        channel_mixer_scan(x["v"], x["z"], *(x[k] for k in PARAMS), backend="torch")
    assert not calls


@pytest.mark.parametrize("name,bad,match", [
    ("v", torch.zeros(4, 5, 6), r"v must be a \(T, E\) tensor"),
    ("z", torch.zeros(4, 6), r"z must have shape \(4, 5\)"),
    ("B_bias", torch.zeros(2, 3, 4), r"B_bias must have shape \(2, 3, 5\)"),
    ("A", torch.zeros(3, 3), r"A must have shape \(2, N\)"),
    ("conv_weight", torch.zeros(4), r"conv_weight must have shape \(2, K\)"),
])
def test_bad_shapes_name_the_argument(name, bad, match):
    x = {k: (None if t is None else t.float()) for k, t in make_inputs(4, 5, 3).items()}
    x[name] = bad
    with pytest.raises(ValueError, match=match):
        channel_mixer_scan(x["v"], x["z"], *(x[k] for k in PARAMS))


@needs_cpu_kernel
def test_custom_ops_pass_opcheck():
    x = {k: t.float().requires_grad_(True) for k, t in make_inputs(5, 6, 2).items()}
    args = (x["v"], x["z"], *(x[k] for k in PARAMS))
    torch.library.opcheck(torch.ops.vim2_kernels.channel_mixer_fwd.default, args)
    out = torch.ops.vim2_kernels.channel_mixer_fwd(*args)
    bwd_args = (torch.randn_like(out), *(a.detach() for a in args))
    torch.library.opcheck(torch.ops.vim2_kernels.channel_mixer_bwd.default, bwd_args)


@needs_cpu_kernel
def test_compiles_fullgraph():
    x = {k: t.float() for k, t in make_inputs(9, 12, 4).items()}

    def step(v, z, *params):
        return torch.nn.functional.gelu(vim2_kernels.channel_mixer_scan(v * 2, z, *params))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = (x["v"], x["z"], *(x[k] for k in PARAMS))
    torch.testing.assert_close(compiled(*args), step(*args))


@needs_cpu_kernel
def test_gradients_are_bitwise_reproducible_with_several_threads():
    x = {k: t.float() for k, t in make_inputs(200, 16, 4).items()}
    dout = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        runs = [run(channel_mixer_scan, x, torch.float32, dout, backend="cpu") for _ in range(2)]
    finally:
        torch.set_num_threads(before)
    for name, grad in runs[0][1].items():
        assert torch.equal(grad, runs[1][1][name]), name


@needs_cpu_kernel
@pytest.mark.parametrize("name", ["v", "z", "conv_weight", "delta_bias", "B_weight", "C_bias", "A", "D"])
def test_nan_inputs_reach_the_output(name):
    x = {k: t.float() for k, t in make_inputs(40, 12, 4).items()}
    x[name].view(-1)[1] = float("nan")
    got = channel_mixer_scan(x["v"], x["z"], *(x[k] for k in PARAMS), backend="cpu")
    want = channel_mixer_scan_unfused(x["v"], x["z"], *(x[k] for k in PARAMS), backend="torch")
    assert want.isnan().any()
    assert torch.equal(got.isnan(), want.isnan())
