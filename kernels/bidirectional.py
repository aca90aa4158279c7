"""Bidirectional selective scan: a forward and a reverse scan with separate parameters, summed.

ViM2's channel mixer scans each token's channel axis both ways; there the batch is the number of
tokens (e.g. 128*56*56), dim is 1 and L is the channel width (192..1536), so backends tile over
flattened (batch * dim) rows rather than over channels.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .selective_scan.interface import run_scan

DIRECTIONS = 2


def _direction(t: Optional[Tensor], name: str, index: int) -> Optional[Tensor]:
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0 or t.shape[0] != DIRECTIONS:
        raise ValueError(
            f"{name} must have a leading direction axis of size 2 (forward, reverse), got shape {tuple(t.shape)}"
        )
    return t[index]


def bidirectional_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Forward scan of direction 0 plus reverse scan of direction 1, optionally gated.

    Args (leading axis 2 = (forward, reverse) parameters/inputs):
        u, delta: (2, batch, dim, L), float32/float16/bfloat16/float64.
        A: (2, dim, N) float32.
        B, C: (2, batch, N, L) or (2, batch, G, N, L).
        D, delta_bias: optional (2, dim) float32.
        z: optional (batch, dim, L) gate shared by both directions.
        backend: see ``selective_scan_fn``.

    Returns:
        (batch, dim, L) in u.dtype: ``(scan(dir 0) + scan(dir 1, reverse=True)) * silu(z)``.
    """
    total = None
    for index, reverse in ((0, False), (1, True)):
        out, _ = run_scan(
            _direction(u, "u", index), _direction(delta, "delta", index), _direction(A, "A", index),
            _direction(B, "B", index), _direction(C, "C", index), _direction(D, "D", index), None,
            _direction(delta_bias, "delta_bias", index), None, delta_softplus, reverse, backend,
        )
        total = out if total is None else total + out
    if z is not None:
        if not isinstance(z, Tensor) or tuple(z.shape) != tuple(total.shape):
            raise ValueError(f"z must have shape (batch, dim, L) = {tuple(total.shape)}, got {getattr(z, 'shape', z)}")
        total = total * F.silu(z)
    return total
