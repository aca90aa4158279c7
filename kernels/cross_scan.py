"""2-D cross-scan: the four-route selective scan of an image map used by ViM2's token mixer.

A route is an order in which the H*W tokens of a map are walked. Each route has its own parameters
(Δ, B, C, A, D); the outputs of all routes, mapped back to their (h, w) positions, are summed.
Every route is handed to the backend as a strided *view* of the channels-last map
(``(batch, dim, L1, L2)``, see ``selective_scan.interface``): row-major routes are ``(H, W)`` views and
column-major routes ``(W, H)`` views, so no permuted copies are made here. The triton backend walks those
views directly; the torch backend copies a column-major view once per route into its own layout.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .selective_scan.interface import run_scan

ROUTES = ("row", "col", "row_rev", "col_rev")
# route -> (permutation of a (batch, H, W, C) map into (batch, C, L1, L2), scan backwards?)
_ROUTE_LAYOUT = {
    "row": ((0, 3, 1, 2), False),
    "col": ((0, 3, 2, 1), False),
    "row_rev": ((0, 3, 1, 2), True),
    "col_rev": ((0, 3, 2, 1), True),
}


def _inverse(perm: Sequence[int]) -> tuple:
    return tuple(perm.index(axis) for axis in range(len(perm)))


def _check_routes(routes: Sequence[str]) -> tuple:
    routes = tuple(routes)
    unknown = [r for r in routes if r not in _ROUTE_LAYOUT]
    if unknown or not routes:
        raise ValueError(f"routes must be a non-empty sequence of {ROUTES}, got {routes}")
    return routes


def cross_scan_2d(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = True,
    routes: Sequence[str] = ROUTES,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Multi-route 2-D selective scan of a channels-last map, summed over routes.

    Args:
        u: (batch, H, W, dim) SSM input shared by all routes; float32/float16/bfloat16/float64.
        delta: (batch, H, W, K, dim) per-route Δ before bias/softplus, at natural (h, w) positions.
        A: (K, dim, N) float32.
        B, C: (batch, H, W, K, N), dtype of u or float32.
        D, delta_bias: optional (K, dim) float32.
        routes: K route names: 'row' (h outer, w inner), 'col' (w outer, h inner) and their reverses
            'row_rev', 'col_rev'.
        backend: see ``selective_scan_fn``.

    Returns:
        (batch, H, W, dim) in u.dtype: sum over routes of the route's S6 output (incl. D * u).
    """
    routes = _check_routes(routes)
    if not isinstance(u, Tensor) or u.dim() != 4:
        raise ValueError(f"u must be a (batch, H, W, dim) tensor, got {getattr(u, 'shape', type(u).__name__)}")
    batch, height, width, dim = u.shape
    n_routes = len(routes)
    if not isinstance(A, Tensor) or A.dim() != 3 or A.shape[:2] != (n_routes, dim):
        raise ValueError(
            f"A must have shape (K, dim, N) = ({n_routes}, {dim}, N) for {n_routes} routes, "
            f"got {tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__}"
        )
    d_state = A.shape[2]
    expected = {
        "delta": (delta, (batch, height, width, n_routes, dim), "(batch, H, W, K, dim)"),
        "B": (B, (batch, height, width, n_routes, d_state), "(batch, H, W, K, N)"),
        "C": (C, (batch, height, width, n_routes, d_state), "(batch, H, W, K, N)"),
        "D": (D, (n_routes, dim), "(K, dim)"),
        "delta_bias": (delta_bias, (n_routes, dim), "(K, dim)"),
    }
    for name, (t, shape, desc) in expected.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {desc} = {shape}, got {tuple(t.shape)}")

    total = None
    for k, route in enumerate(routes):
        perm, reverse = _ROUTE_LAYOUT[route]
        seq_u = u.permute(perm)
        seq_delta = delta[:, :, :, k].permute(perm)
        seq_B = B[:, :, :, k].permute(perm).unsqueeze(1)  # (batch, 1, N, L1, L2)
        seq_C = C[:, :, :, k].permute(perm).unsqueeze(1)
        out, _ = run_scan(
            seq_u, seq_delta, A[k], seq_B, seq_C,
            None if D is None else D[k], None,
            None if delta_bias is None else delta_bias[k], None,
            delta_softplus, reverse, backend, n_seq_dims=2,
        )
        out = out.permute(_inverse(perm))  # (batch, dim, L1, L2) -> (batch, H, W, dim)
        total = out if total is None else total + out
    return total
