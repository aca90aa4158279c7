"""Triton selective-scan backend on a real CUDA device (pytest -m gpu; run by tools/gpu_check.sh).

Compiled kernels (not the interpreter) against the float64 reference over the swept shapes of issue 2:
L in {1, 2, 7, 63, 64, 65, 197, 256, 1024}, N in {1, 4, 16}, groups, z/D/delta_bias/softplus/reverse/
initial_state/last state, token-major and two-level column-major layouts, fp16/bf16, the channel-mixer
shape, the segment-parallel path picked by the real heuristics, deterministic dB/dC partials, int64
addressing beyond 2**31 elements; then ViM2's cross-scan call with a low-rank Δ, and a whole ViM2 model
on CUDA against the CPU. Skipped without CUDA, and when the backend was imported in interpreter
mode (TRITON_INTERPRET=1 in this process: run this file in a process without it).
"""
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

pytest.importorskip("triton", reason="triton is not installed")

from vim2_kernels.selective_scan import triton_backend as tb  # noqa: E402
from vim2_kernels.selective_scan.reference import selective_scan_reference  # noqa: E402

if tb._INTERPRETED:
    pytest.skip("triton backend was imported with TRITON_INTERPRET=1; run GPU tests in a process without it",
                allow_module_level=True)

DEVICE = torch.device("cuda")
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
# Relative to max(1, max |reference|); compiled exp/log are a few ulp off, fp16/bf16 as in mamba's tests.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2, torch.float64: 1e-9}


def _seq(gen, batch, dim, Ls, layout):
    if layout == "contiguous":
        return torch.randn(batch, dim, *Ls, generator=gen, dtype=torch.float64, device=DEVICE)
    if layout == "token_major":
        return torch.randn(batch, *Ls, dim, generator=gen, dtype=torch.float64, device=DEVICE).movedim(-1, 1)
    W, H = Ls  # column-major walk of an NHWC map
    return torch.randn(batch, H, W, dim, generator=gen, dtype=torch.float64, device=DEVICE).permute(0, 3, 2, 1)


def _bc(gen, batch, groups, N, Ls, layout):
    if layout == "contiguous":
        return torch.randn(batch, groups, N, *Ls, generator=gen, dtype=torch.float64, device=DEVICE)
    if layout == "token_major":
        return torch.randn(batch, *Ls, groups, N, generator=gen, dtype=torch.float64,
                           device=DEVICE).permute(0, 2, 3, 1)
    W, H = Ls
    return torch.randn(batch, H, W, groups, N, generator=gen, dtype=torch.float64,
                       device=DEVICE).permute(0, 3, 4, 2, 1)


def check(batch=2, dim=8, groups=1, N=4, Ls=(65,), D=True, z=True, bias=True, softplus=True, reverse=False,
          h0=True, dlast=True, layout="contiguous", dtype=torch.float32, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    inputs = dict(
        u=_seq(gen, batch, dim, Ls, layout),
        delta=0.5 * _seq(gen, batch, dim, Ls, layout),
        A=-(torch.rand(dim, N, generator=gen, dtype=torch.float64, device=DEVICE) + 0.2),
        B=_bc(gen, batch, groups, N, Ls, layout),
        C=_bc(gen, batch, groups, N, Ls, layout),
        D=torch.randn(dim, generator=gen, dtype=torch.float64, device=DEVICE) if D else None,
        z=_seq(gen, batch, dim, Ls, layout) if z else None,
        delta_bias=0.3 * torch.randn(dim, generator=gen, dtype=torch.float64, device=DEVICE) if bias else None,
        initial_state=torch.randn(batch, dim, N, generator=gen, dtype=torch.float64, device=DEVICE) if h0 else None,
    )
    if not softplus:  # Δ is used as given: keep it positive, as real step sizes are (else exp(+ΔA) overflows)
        inputs["delta"] = inputs["delta"].abs()
        if bias:
            inputs["delta_bias"] = inputs["delta_bias"].abs()
    for name in ("u", "delta", "z", "B", "C"):
        if inputs[name] is not None:
            inputs[name] = inputs[name].to(dtype).double()  # the oracle sees exactly the backend's inputs
    param = torch.float64 if dtype == torch.float64 else torch.float32
    cast = {k: (dtype if k in ("u", "delta", "z", "B", "C") else param) for k in inputs}
    x = {k: (None if v is None else v.to(cast[k])) for k, v in inputs.items()}
    dout = _seq(gen, batch, dim, Ls, layout).to(dtype)
    dl = torch.randn(batch, dim, N, generator=gen, device=DEVICE) if dlast else None

    out, last, saved = tb.scan_forward(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                       x["delta_bias"], x["initial_state"], softplus, reverse)
    grads = tb.scan_backward(dout, dl, x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                             x["delta_bias"], x["initial_state"], saved, softplus, reverse)
    got = dict(zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"), grads))

    leaves = {k: (None if v is None else v.detach().clone().requires_grad_()) for k, v in inputs.items()}
    ref_out, ref_last = selective_scan_reference(
        leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"], z=leaves["z"],
        delta_bias=leaves["delta_bias"], delta_softplus=softplus, initial_state=leaves["initial_state"],
        reverse=reverse, return_last_state=True)
    loss = (ref_out * dout.double()).sum() + ((ref_last * dl.double()).sum() if dl is not None else 0)
    present = [k for k in GRAD_NAMES if leaves[k] is not None]
    ref_grads = dict(zip(present, torch.autograd.grad(loss, [leaves[k] for k in present])))

    def close(name, actual, expected):
        assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        scale = max(1.0, expected.abs().max().item())
        err = (actual.double() - expected).abs().max().item() if actual.numel() else 0.0
        assert err <= TOLERANCE[dtype] * scale, f"{name}: max abs error {err:.3e}, scale {scale:.3g}"

    assert out.dtype == dtype
    close("out", out, ref_out)
    close("last_state", last, ref_last)
    for name in GRAD_NAMES:
        if inputs[name] is None:
            assert got[name] is None, name
        else:
            assert torch.isfinite(got[name]).all(), f"d{name} not finite"
            close(f"d{name}", got[name], ref_grads[name])


SWEEP_L = (1, 2, 7, 63, 64, 65, 197, 256, 1024)
SWEEP_N = (1, 4, 16)


@pytest.mark.parametrize("L", SWEEP_L)
@pytest.mark.parametrize("N", SWEEP_N)
def test_sweep(L, N):
    # Cycle the options over the grid so every flag meets short, block-sized and long sequences.
    k = SWEEP_L.index(L) + 3 * SWEEP_N.index(N)
    check(Ls=(L,), N=N, groups=(1, 2)[k % 2], reverse=bool(k % 3 == 1), z=k % 4 != 2, D=k % 5 != 3,
          bias=k % 2 == 0, softplus=k % 3 != 2, h0=k % 2 == 1, dlast=k % 4 == 1, seed=k)


CASES = {
    "token_major_197": dict(Ls=(197,), N=16, layout="token_major", dim=16),
    "token_major_reverse_groups": dict(Ls=(256,), N=16, groups=4, dim=16, layout="token_major", reverse=True),
    "col_major_2d_14x14": dict(Ls=(14, 14), N=16, layout="col_major_2d", dim=16),
    "col_major_2d_reverse": dict(Ls=(14, 14), N=16, layout="col_major_2d", dim=16, reverse=True),
    "usual_768": dict(batch=2, dim=768, Ls=(197,), N=16),
    "channel_mixer": dict(batch=2048, dim=1, Ls=(192,), N=16),
    "channel_mixer_reverse_n1": dict(batch=4096, dim=1, Ls=(193,), N=1, reverse=True),
    "few_rows_long_L_segments": dict(batch=1, dim=8, Ls=(3136,), N=16),
    "few_rows_long_L_segments_reverse": dict(batch=1, dim=4, Ls=(2000,), N=4, reverse=True, groups=2),
    "float16": dict(dtype=torch.float16, Ls=(197,), N=16, dim=32),
    "bfloat16_reverse": dict(dtype=torch.bfloat16, Ls=(256,), N=16, dim=32, reverse=True),
    "float64": dict(dtype=torch.float64, Ls=(197,), N=16, dim=16, groups=2),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_cases(case):
    check(**CASES[case])


def test_segment_heuristic_engages_for_few_rows():
    segs, _ = tb._pick_segments(n_tiles=8, n_blocks=98, num_warps=2, device=DEVICE)
    assert segs > 1


def test_deterministic_mode_gives_identical_bc_grads():
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    batch, dim, N, L = 2, 256, 16, 197
    u = torch.randn(batch, dim, L, generator=gen, device=DEVICE)
    delta = torch.randn(batch, dim, L, generator=gen, device=DEVICE)
    A = -torch.rand(dim, N, generator=gen, device=DEVICE) - 0.2
    B = torch.randn(batch, 1, N, L, generator=gen, device=DEVICE)
    C = torch.randn(batch, 1, N, L, generator=gen, device=DEVICE)
    dout = torch.randn(batch, dim, L, generator=gen, device=DEVICE)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            out, last, saved = tb.scan_forward(u, delta, A, B, C, None, None, None, None, True, False)
            results.append(tb.scan_backward(dout, None, u, delta, A, B, C, None, None, None, None, saved,
                                            True, False))
    finally:
        torch.use_deterministic_algorithms(previous)
    for index in (0, 1, 2, 3, 4):
        assert torch.equal(results[0][index], results[1][index]), index


# The two tests that take tens of GB share one xdist group: under `pytest -n N --dist loadgroup`
# (tools/gpu_check.sh) they run one after the other in one process, never side by side.
@pytest.mark.xdist_group("large_memory")
def test_int64_offsets_in_strided_inputs():
    # A batch stride beyond 2**31 elements: input addresses need 64-bit arithmetic.
    batch, dim, N, L = 2, 4, 4, 64
    stride_b = 2**31 + 64
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * (stride_b + dim * L) * 2:
        pytest.skip("needs ~13 GB of free GPU memory")
    gen = torch.Generator(device=DEVICE).manual_seed(2)

    def strided():
        storage = torch.zeros(stride_b + dim * L, dtype=torch.float16, device=DEVICE)
        view = storage.as_strided((batch, dim, L), (stride_b, L, 1))
        view.copy_(torch.randn(batch, dim, L, generator=gen, device=DEVICE))
        return view

    u, delta, dout = strided(), strided(), strided()
    A = -torch.rand(dim, N, generator=gen, device=DEVICE) - 0.2
    B = torch.randn(batch, 1, N, L, generator=gen, device=DEVICE, dtype=torch.float16)
    C = torch.randn(batch, 1, N, L, generator=gen, device=DEVICE, dtype=torch.float16)
    out, _, saved = tb.scan_forward(u, delta, A, B, C, None, None, None, None, True, False)
    du = tb.scan_backward(dout, None, u, delta, A, B, C, None, None, None, None, saved, True, False)[0]
    ref_u = u.contiguous().double().requires_grad_()
    ref = selective_scan_reference(ref_u, delta.contiguous().double(), A.double(), B.double(), C.double(),
                                   delta_softplus=True)
    (ref_du,) = torch.autograd.grad((ref * dout.contiguous().double()).sum(), ref_u)
    assert (out.double() - ref).abs().max().item() <= 5e-3 * max(1.0, ref.abs().max().item())
    assert (du.double() - ref_du).abs().max().item() <= 5e-3 * max(1.0, ref_du.abs().max().item())


@pytest.mark.xdist_group("large_memory")
def test_int64_offsets_in_outputs():
    # batch*dim*L > 2**31 output elements (dim=1 rows as in the channel mixer); inputs are stride-0
    # expansions of one row, so every row must reproduce that row's reference result.
    L, N = 256, 1
    rows = 2**31 // L + 1
    free, _ = torch.cuda.mem_get_info()
    if free < 48 * 2**30:
        pytest.skip("needs ~48 GB of free GPU memory")
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    u1 = torch.randn(1, 1, L, generator=gen, device=DEVICE, dtype=torch.float16)
    d1 = torch.randn(1, 1, L, generator=gen, device=DEVICE, dtype=torch.float16)
    g1 = torch.randn(1, 1, L, generator=gen, device=DEVICE, dtype=torch.float16)
    B1 = torch.randn(1, 1, N, L, generator=gen, device=DEVICE, dtype=torch.float16)
    C1 = torch.randn(1, 1, N, L, generator=gen, device=DEVICE, dtype=torch.float16)
    A = -torch.rand(1, N, generator=gen, device=DEVICE) - 0.2
    u, delta, dout = (t.expand(rows, 1, L) for t in (u1, d1, g1))
    B, C = (t.expand(rows, 1, N, L) for t in (B1, C1))
    out, last, saved = tb.scan_forward(u, delta, A, B, C, None, None, None, None, True, False)
    ref_u = u1.double().requires_grad_()
    ref_B = B1.double().requires_grad_()
    ref = selective_scan_reference(ref_u, d1.double(), A.double(), ref_B, C1.double(), delta_softplus=True)
    ref_du, ref_dB = torch.autograd.grad((ref * g1.double()).sum(), (ref_u, ref_B))
    for row in (0, rows // 2, rows - 1):
        assert (out[row].double() - ref[0]).abs().max().item() <= 5e-3 * max(1.0, ref.abs().max().item())
    del out, last
    grads = tb.scan_backward(dout, None, u, delta, A, B, C, None, None, None, None, saved, True, False)
    du, dB = grads[0], grads[3]
    for row in (0, rows - 1):
        assert (du[row].double() - ref_du[0]).abs().max().item() <= 5e-3 * max(1.0, ref_du.abs().max().item())
        assert (dB[row].double() - ref_dB[0]).abs().max().item() <= 5e-3 * max(1.0, ref_dB.abs().max().item())


# ------------------------------------------------------------------------- cross-scan and whole model

@pytest.mark.parametrize("batch,height,width,dim,rank", [(2, 9, 7, 70, 5), (1, 24, 40, 24, 6)])
def test_cross_scan_with_low_rank_delta_matches_oracle(batch, height, width, dim, rank):
    """ViM2's token-mixer call on CUDA (the fused low-rank path: Δ projected inside the Triton forward,
    routes summed in place; the second shape is long enough for segments) against the explicit float64
    cross-scan on the CPU: inference output, then output and every gradient."""
    import vim2_kernels
    from test_cross_scan_lowrank import lowrank_inputs, oracle

    x = lowrank_inputs(batch=batch, height=height, width=width, dim=dim, d_state=16, rank=rank)
    ref_in = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    expected = oracle(ref_in, vim2_kernels.ROUTES)
    scale = max(1.0, expected.abs().max().item())
    gpu_in = {k: v.float().to(DEVICE).requires_grad_(True) for k, v in x.items()}

    def call():
        return vim2_kernels.cross_scan_2d(
            gpu_in["u"], gpu_in["dts"], gpu_in["A"], gpu_in["B"], gpu_in["C"], gpu_in["D"], gpu_in["delta_bias"],
            delta_proj_weight=gpu_in["W"], backend="triton",
        )

    with torch.no_grad():
        inferred = call()
    assert (inferred.double().cpu() - expected.detach()).abs().max().item() <= TOLERANCE[torch.float32] * scale
    got = call()
    grad = torch.randn_like(expected)
    expected.backward(grad)
    got.backward(grad.float().to(DEVICE))
    assert (got.double().cpu() - expected).abs().max().item() <= TOLERANCE[torch.float32] * scale
    for name in x:
        want = ref_in[name].grad
        err = (gpu_in[name].grad.double().cpu() - want).abs().max().item()
        assert err <= TOLERANCE[torch.float32] * max(1.0, want.abs().max().item()), name


@pytest.mark.parametrize("tokens,length,d_state,width", [(1, 1, 1, 1), (37, 48, 16, 4), (300, 192, 16, 4),
                                                       (70, 1536, 16, 4), (20, 9, 2, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_channel_mixer_matches_oracle(tokens, length, d_state, width, dtype):
    """The fused Triton channel mixer (forward and backward) against the float64 unfused composition."""
    from vim2_kernels.channel_mixer import channel_mixer_scan, channel_mixer_scan_unfused
    from test_channel_mixer import PARAMS, make_inputs

    names = ("v", "z") + PARAMS
    x = make_inputs(tokens, length, d_state, width=width)
    for name in ("v", "z"):
        x[name] = x[name].to(dtype).double()
    ref = {k: t.clone().requires_grad_(True) for k, t in x.items()}
    want = channel_mixer_scan_unfused(*(ref[k] for k in names), backend="torch")  # float64, vectorised
    dout = torch.randn(want.shape, dtype=torch.float64).to(dtype)
    want_grads = torch.autograd.grad(want, [ref[k] for k in names], dout.double())
    gpu = {k: t.to(DEVICE, dtype if k in ("v", "z") else torch.float32).requires_grad_(True) for k, t in x.items()}
    with torch.no_grad():
        inferred = channel_mixer_scan(*(gpu[k] for k in names))
    got = channel_mixer_scan(*(gpu[k] for k in names))
    got_grads = torch.autograd.grad(got, [gpu[k] for k in names], dout.to(DEVICE))
    tol = {torch.float32: 1e-4, torch.bfloat16: 4e-2}[dtype]
    for name, value, expected in [("out", inferred, want), ("out (autograd)", got, want)] + list(
            zip(("d" + k for k in names), got_grads, want_grads)):
        scale = max(1.0, expected.abs().max().item())
        err = (value.double().cpu() - expected.detach()).abs().max().item()
        assert err <= tol * scale, f"{name}: max abs error {err:.2e}, scale {scale:.3g}"


def test_vim2_model_on_cuda_matches_cpu():
    """A whole ViM2 (test_vim2: token and channel mixers, weighted averaging) on CUDA against the same
    weights on the CPU: forward, parameter gradients, and a bf16-autocast forward without NaN."""
    import timm
    import vim2  # noqa: F401  registers the models

    torch.manual_seed(0)
    cpu_model = timm.create_model("test_vim2", num_classes=7)
    gpu_model = timm.create_model("test_vim2", num_classes=7)
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.to(DEVICE)
    x = torch.randn(2, 3, 64, 48)
    cpu_out = cpu_model(x)
    gpu_out = gpu_model(x.to(DEVICE))
    torch.testing.assert_close(gpu_out.cpu(), cpu_out, rtol=1e-3, atol=1e-3)
    cpu_out.square().sum().backward()
    gpu_out.square().sum().backward()
    gpu_params = dict(gpu_model.named_parameters())
    for name, p in cpu_model.named_parameters():
        scale = max(1.0, p.grad.abs().max().item())
        err = (gpu_params[name].grad.cpu() - p.grad).abs().max().item()
        assert err <= 2e-3 * scale, f"{name}: {err}"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        half = gpu_model.eval()(x.to(DEVICE))
    assert torch.isfinite(half).all()
