"""Public selective-scan entry point, input validation and the torch.library custom ops.

Every fast backend (``torch_backend``, ``triton_backend``) is a plain module with

* ``NAME``; ``unavailable_reason(device) -> str | None``; optional ``SUPPORTED_DTYPES``;
* ``saved_shape(batch, dim, seqlen, d_state)``: shape of the tensor its forward keeps for backward
  (float32, or ``saved_dtype(input_dtype)`` where the backend defines it);
* ``scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse)``
  -> ``(out, last_state, saved)``;
* ``scan_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, saved,
  delta_softplus, reverse)`` -> grads of the nine tensor inputs (None where the input was None).

Inside that contract the sequence tensors are ``(batch, dim, *Ls)`` and ``(batch, G, N, *Ls)`` with
``Ls = (L,)`` or ``(L1, L2)`` (a two-level sequence, the row-major flattening of the last two axes), in
any strides. The 2-D cross-scan uses the two-level form to hand column-major routes of an NHWC map to
the backends as views. The two ops below wrap a backend's forward and backward so that autograd and
``torch.compile`` see one opaque, shape-known operation each. The ``reference`` backend is plain
differentiable torch code and is called directly.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .dispatch import get_backend_module, resolve_backend
from .reference import selective_scan_reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------------

def _state_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    """True if autograd will record a graph through these inputs (the fused ops then keep what their
    backward needs; without it they keep nothing and may work in place)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@torch.library.custom_op("vim2_kernels::selective_scan_fwd", mutates_args=())
def _scan_fwd_op(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
    delta_softplus: bool, reverse: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    module = get_backend_module(backend)
    out, last_state, saved = module.scan_forward(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse
    )
    return out, last_state, saved


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, backend):
    batch, dim = u.shape[:2]
    seqlen = 1
    for size in u.shape[2:]:
        seqlen *= size
    d_state = A.shape[1]
    module = get_backend_module(backend)
    # `saved` is float32 unless the backend says otherwise (triton keeps float64 for float64 inputs).
    saved_dtype = getattr(module, "saved_dtype", lambda dtype: torch.float32)(u.dtype)
    return (
        _like_sequence(module, u),
        u.new_empty((batch, dim, d_state), dtype=_state_dtype(u)),
        u.new_empty(module.saved_shape(batch, dim, seqlen, d_state), dtype=saved_dtype),
    )


_GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@torch.library.custom_op("vim2_kernels::selective_scan_bwd", mutates_args=())
def _scan_bwd_op(
    dout: Tensor, dlast_state: Optional[Tensor],
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
    saved: Tensor, delta_softplus: bool, reverse: bool, backend: str,
) -> List[Tensor]:
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    grads = get_backend_module(backend).scan_backward(
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, saved, delta_softplus, reverse
    )
    result = []
    for grad, tensor in zip(grads, inputs):
        if tensor is None:
            result.append(u.new_empty((0,)))  # custom ops cannot return None: an empty placeholder
        elif _shares_storage(grad, inputs, dout):
            result.append(grad.clone())  # custom-op outputs must not alias inputs
        else:
            result.append(grad)
    return result


def _shares_storage(grad: Tensor, inputs: Sequence[Optional[Tensor]], dout: Tensor) -> bool:
    ptr = grad.untyped_storage().data_ptr()
    return any(t is not None and t.untyped_storage().data_ptr() == ptr for t in (*inputs, dout))


@_scan_bwd_op.register_fake
def _(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, saved, delta_softplus,
      reverse, backend):
    module = get_backend_module(backend)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return [u.new_empty((0,)) if t is None else _like_sequence(module, t) if name in ("u", "delta", "z")
            else t.new_empty(t.shape) for name, t in zip(_GRAD_NAMES, inputs)]


def _like_sequence(module, t: Tensor) -> Tensor:
    """Fake output for a sequence tensor: in t's layout where the backend keeps layouts (cpu), else
    contiguous; the fake strides must equal the real ones for compiled graphs to be correct."""
    return torch.empty_like(t) if getattr(module, "PRESERVES_LAYOUT", False) else t.new_empty(t.shape)


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, output[2])
    ctx.flags = (delta_softplus, reverse, backend)


def _backward(ctx, dout, dlast_state, _dsaved):
    u, delta, A, B, C, D, z, delta_bias, initial_state, saved = ctx.saved_tensors
    grads = torch.ops.vim2_kernels.selective_scan_bwd(
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, saved, *ctx.flags
    )
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    grads = [g if t is not None else None for g, t in zip(grads, inputs)]
    return (*grads, None, None, None)


_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------

def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_tensor(name: str, t, expected_shape, expected_desc: str, dtypes=_FLOAT_DTYPES) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise TypeError(f"{name} must be real; complex selective scans are not supported (got {t.dtype})")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {t.dtype}")
    if tuple(t.shape) != tuple(expected_shape):
        raise ValueError(f"{name} must have shape {expected_desc} = {tuple(expected_shape)}, got {_shape(t)}")


def validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, n_seq_dims: int = 1):
    """Checks shapes/dtypes/devices; returns B and C as (batch, G, N, *Ls) views."""
    if not isinstance(u, Tensor):
        raise TypeError(f"u must be a torch.Tensor, got {type(u).__name__}")
    if u.dim() != 2 + n_seq_dims:
        desc = "(batch, dim, L)" if n_seq_dims == 1 else "(batch, dim, L1, L2)"
        raise ValueError(f"u must have shape {desc}, got {_shape(u)}")
    if u.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"u must be float32, float16, bfloat16 or float64, got {u.dtype}")
    batch, dim = u.shape[:2]
    seq = tuple(u.shape[2:])
    seq_desc = "L" if n_seq_dims == 1 else "L1, L2"
    _check_tensor("delta", delta, u.shape, f"(batch, dim, {seq_desc}) like u")
    if delta.dtype != u.dtype:
        raise TypeError(f"delta must have u's dtype {u.dtype}, got {delta.dtype}")
    if not isinstance(A, Tensor) or A.dim() != 2:
        got = _shape(A) if isinstance(A, Tensor) else type(A).__name__
        raise ValueError(f"A must be a 2-D (dim, N) = ({dim}, N) tensor, got {got}")
    _check_tensor("A", A, (dim, A.shape[1]), "(dim, N)", (torch.float32, torch.float64))
    d_state = A.shape[1]
    if d_state < 1:
        raise ValueError(f"A must have at least one state column, got shape {_shape(A)}")

    def grouped(name, t):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 2 + n_seq_dims:
            _check_tensor(name, t, (batch, d_state, *seq), f"(batch, N, {seq_desc}) with N={d_state}")
            t = t.unsqueeze(1)
        if t.dim() != 3 + n_seq_dims:
            raise ValueError(
                f"{name} must have shape (batch, N, {seq_desc}) or (batch, G, N, {seq_desc}), got {_shape(t)}"
            )
        groups = t.shape[1]
        if groups < 1 or dim % groups != 0:
            raise ValueError(f"{name} has {groups} groups, which must divide dim={dim} (shape {_shape(t)})")
        _check_tensor(name, t, (batch, groups, d_state, *seq), f"(batch, G, N, {seq_desc}) with N={d_state}")
        if t.dtype not in (u.dtype, torch.float32):
            raise TypeError(f"{name} must have u's dtype {u.dtype} or float32, got {t.dtype}")
        return t

    B = grouped("B", B)
    C = grouped("C", C)
    param_dtypes = (torch.float32, torch.float64)
    if D is not None:
        _check_tensor("D", D, (dim,), "(dim,)", param_dtypes)
    if delta_bias is not None:
        _check_tensor("delta_bias", delta_bias, (dim,), "(dim,)", param_dtypes)
    if z is not None:
        _check_tensor("z", z, u.shape, f"(batch, dim, {seq_desc}) like u")
        if z.dtype != u.dtype:
            raise TypeError(f"z must have u's dtype {u.dtype}, got {z.dtype}")
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, (batch, dim, d_state), "(batch, dim, N)", param_dtypes)
    named = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)
    for name, t in named.items():
        if t is not None and t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}: all inputs must share one device")
    return B, C


def run_scan(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, backend,
             n_seq_dims: int = 1):
    """Validates, resolves the backend and runs the forward custom op. Returns (out, last_state)."""
    B, C = validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, n_seq_dims)
    name = resolve_backend(backend, u.device, u.dtype, A.shape[1])
    if name == "reference":
        return selective_scan_reference(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reverse, return_last_state=True
        )
    out, last_state, _ = torch.ops.vim2_kernels.selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), bool(reverse), name
    )
    return out, last_state


def selective_scan_fn(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: Optional[Tensor] = None,
    reverse: bool = False,
    backend: Optional[str] = None,
):
    """Selective scan (Mamba S6), a drop-in for ``mamba_ssm.selective_scan_fn``.

    For each batch b, channel d and step t (in scan order)::

        dt   = softplus(delta[b, d, t] + delta_bias[d])    # softplus only if delta_softplus
        h    = exp(dt * A[d]) * h + dt * B[b, g, :, t] * u[b, d, t]     # h: (N,), float32
        y[t] = C[b, g, :, t] . h + D[d] * u[b, d, t];   y[t] *= silu(z[b, d, t])  if z is given

    Args:
        u: (batch, dim, L), float32/float16/bfloat16/float64. Token-major data can be passed without a
            copy as ``x.transpose(1, 2)`` of a (batch, L, dim) tensor (same for delta, z, B, C).
        delta: (batch, dim, L), same dtype as u.
        A: (dim, N) float32 (float64 with float64 inputs), real and normally negative.
        B, C: (batch, N, L), or grouped (batch, G, N, L) where channel d uses group d // (dim // G);
            dtype of u or float32.
        D: optional (dim,) float32 skip weight.
        z: optional (batch, dim, L) gate, same dtype as u.
        delta_bias: optional (dim,) float32, added to delta before the softplus.
        delta_softplus: apply softplus to delta (+ bias).
        return_last_state: also return the final state.
        initial_state: optional (batch, dim, N) float32 starting state (differentiable). Extension.
        reverse: scan right-to-left (t = L-1 .. 0) without flipping any tensor; outputs stay at their
            positions and the last state is the one after t = 0. Extension.
        backend: None/'auto', 'cpu', 'torch', 'triton' or 'reference' (see ``vim2_kernels.dispatch``).

    Returns:
        out (batch, dim, L) in u.dtype, or ``(out, last_state)`` with last_state (batch, dim, N) float32.
    """
    out, last_state = run_scan(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, backend
    )
    return (out, last_state) if return_last_state else out
