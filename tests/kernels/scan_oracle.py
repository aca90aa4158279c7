"""The float64 oracle shared by the backend tests: the reference loop and autograd on it."""
import torch

from vim2_kernels.selective_scan.reference import selective_scan_reference

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def run_reference(cfg, inputs, dout, dlast):
    """Reference out, last state and gradients of sum(out * dout) (+ sum(last * dlast))."""
    leaves = {k: (None if v is None else v.detach().clone().requires_grad_()) for k, v in inputs.items()}
    out, last = selective_scan_reference(
        leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"], z=leaves["z"],
        delta_bias=leaves["delta_bias"], delta_softplus=cfg["softplus"], initial_state=leaves["initial_state"],
        reverse=cfg["reverse"], return_last_state=True)
    loss = (out * dout.double()).sum()
    if dlast is not None:
        loss = loss + (last * dlast.double()).sum()
    present = [k for k in GRAD_NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in present])
    return out.detach(), last.detach(), dict(zip(present, grads))


SEQ_NAMES = ("u", "delta", "z", "B", "C")  # gradients in the input's dtype; the rest in the state dtype


def assert_close_within(name, actual, expected, tol):
    """Max abs error <= tol * max(1, max|expected|)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected).abs().max().item()
    assert err <= tol * scale, f"{name}: max abs error {err:.3e} > {tol:.0e} * {scale:.3g}"


def assert_matches_reference(cfg, inputs, x, out, last, grads, dout, dlast, tolerance):
    """A backend's forward/backward results against the float64 oracle: dtypes, shapes, values.

    ``x`` are the tensors the backend was given (their layouts), ``inputs`` the same values as the
    oracle takes them, ``tolerance`` {input dtype: relative tolerance} of the backend under test.
    """
    ref_out, ref_last, ref_grads = run_reference(cfg, inputs, dout, dlast)
    dtype = cfg["dtype"]
    tol = tolerance[dtype]
    param = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and out.shape == x["u"].shape
    # dense output: contiguous, or (cpu backend) laid out like u so that its stores stay contiguous
    assert out.is_contiguous() or out.stride() == x["u"].stride(), f"out strides {out.stride()}"
    assert last.dtype == param and last.shape == (cfg["batch"], cfg["dim"], cfg["N"])
    assert_close_within("out", out, ref_out, tol)
    assert_close_within("last_state", last, ref_last, tol)
    for name in GRAD_NAMES:
        if inputs[name] is None:
            assert grads[name] is None, f"d{name} must be None when {name} is None"
            continue
        grad = grads[name]
        want_dtype = x[name].dtype if name in SEQ_NAMES else param
        assert grad.dtype == want_dtype, f"d{name}: dtype {grad.dtype} != {want_dtype}"
        assert grad.shape == x[name].shape, f"d{name}: shape {tuple(grad.shape)} != {tuple(x[name].shape)}"
        assert torch.isfinite(grad).all(), f"d{name} has non-finite values"
        assert_close_within(f"d{name}", grad, ref_grads[name], tol)


def check_tiny_delta_long_sequence(backend) -> None:
    """Stress: delta ~1e-4 over L=8192, so decays exp(dt*A) ~ 1 compose over 8192 steps: a backend's
    contract functions (``scan_forward``/``scan_backward``) must not drift from the float64 loop nor
    produce NaN."""
    gen = torch.Generator().manual_seed(5)
    batch, dim, L, N = 1, 3, 8192, 4
    u = torch.randn(batch, dim, L, generator=gen)
    delta = 1e-4 * (1 + torch.rand(batch, dim, L, generator=gen))
    A = -torch.rand(dim, N, generator=gen) * 2 - 0.1
    B = torch.randn(batch, 1, N, L, generator=gen)
    C = torch.randn(batch, 1, N, L, generator=gen)
    out, last, saved = backend.scan_forward(u, delta, A, B, C, None, None, None, None, False, False)
    with torch.no_grad():
        ref_out, ref_last = selective_scan_reference(u.double(), delta.double(), A.double(), B.double(),
                                                     C.double(), return_last_state=True)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(last.double(), ref_last, rtol=1e-4, atol=2e-5)
    grads = backend.scan_backward(torch.ones_like(out), torch.ones_like(last), u, delta, A, B, C, None, None,
                                  None, None, saved, False, False)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def check_empty_batch(backend) -> None:
    """A batch of zero sequences: a backend's contract functions return correctly shaped empty results
    and a zero dA."""
    u = torch.zeros(0, 3, 5)
    B = torch.zeros(0, 1, 2, 5)
    A = -torch.ones(3, 2)
    out, last, saved = backend.scan_forward(u, u, A, B, B, None, None, None, None, True, False)
    assert out.shape == (0, 3, 5) and last.shape == (0, 3, 2)
    grads = backend.scan_backward(out, None, u, u, A, B, B, None, None, None, None, saved, True, False)
    assert grads[0].shape == u.shape and grads[3].shape == B.shape
    assert torch.equal(grads[2], torch.zeros(3, 2))
