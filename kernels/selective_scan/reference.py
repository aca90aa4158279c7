"""Plain-loop selective scan: the test oracle.

One Python step per time step, written for clarity, not speed. It runs in float64 when given float64
inputs (use that as the ground truth in tests) and in float32 otherwise, and it is differentiable with
ordinary autograd, so gradients of the fast backends are checked against ``torch.autograd.grad`` of
this function.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

NAME = "reference"


def softplus(x: torch.Tensor) -> torch.Tensor:
    """softplus with mamba's cut-off: the identity above 20, where log1p(exp(x)) == x in float32."""
    return torch.where(x <= 20.0, F.softplus(x), x)


def _flatten_sequence(t: Optional[torch.Tensor], lead_dims: int) -> Optional[torch.Tensor]:
    """(…, L1, L2) -> (…, L1*L2); a 1-level sequence is returned unchanged."""
    if t is None or t.dim() == lead_dims + 1:
        return t
    return t.reshape(*t.shape[:lead_dims], -1)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    initial_state: Optional[torch.Tensor] = None,
    reverse: bool = False,
    return_last_state: bool = False,
):
    """Selective scan by an explicit loop over time.

    Shapes: u, delta, z (batch, dim, L) or (batch, dim, L1, L2); A (dim, N); B, C (batch, N, L) or
    (batch, G, N, L) (or the two-level forms); D, delta_bias (dim,); initial_state (batch, dim, N).
    Computes in float64 for float64 inputs, else float32; returns ``out`` in u.dtype (and the last
    state in the compute dtype when ``return_last_state``).
    """
    out_dtype = u.dtype
    seq_shape = u.shape[2:]
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u = _flatten_sequence(u, 2).to(compute)
    delta = _flatten_sequence(delta, 2).to(compute)
    z = _flatten_sequence(z, 2)
    B = _flatten_sequence(B, B.dim() - len(seq_shape)).to(compute)
    C = _flatten_sequence(C, C.dim() - len(seq_shape)).to(compute)
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    batch, dim, seqlen = u.shape
    groups = B.shape[1]
    A = A.to(compute)

    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = softplus(delta)
    # (batch, G, N, L) -> (batch, dim, N, L): channel d reads group d // (dim // G)
    B = B.repeat_interleave(dim // groups, dim=1)
    C = C.repeat_interleave(dim // groups, dim=1)

    state = (
        initial_state.to(compute)
        if initial_state is not None
        else u.new_zeros(batch, dim, A.shape[1])
    )
    steps = range(seqlen - 1, -1, -1) if reverse else range(seqlen)
    ys = [None] * seqlen
    for t in steps:
        decay = torch.exp(delta[:, :, t, None] * A)  # (batch, dim, N)
        state = decay * state + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, :, :, t]
        ys[t] = (state * C[:, :, :, t]).sum(-1)
    out = torch.stack(ys, dim=-1)
    if D is not None:
        out = out + D.to(compute)[:, None] * u
    if z is not None:
        out = out * F.silu(z.to(compute))
    out = out.reshape(batch, dim, *seq_shape).to(out_dtype)
    return (out, state) if return_last_state else out


# The reference is differentiated by plain autograd, so the public layer calls it directly instead of
# through the custom ops (autograd does not record inside a custom op's implementation).


def unavailable_reason(device: torch.device) -> Optional[str]:
    return None  # runs wherever torch runs
