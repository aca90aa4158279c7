"""2-D cross-scan: the four-route selective scan of an image map used by ViM2's token mixer.

A route is an order in which the H*W tokens of a map are walked. Each route has its own parameters
(Δ, B, C, A, D); the outputs of all routes, mapped back to their (h, w) positions, are summed.
Every route is handed to the backend as a strided *view* of the channels-last map
(``(batch, dim, L1, L2)``, see ``selective_scan.interface``): row-major routes are ``(H, W)`` views and
column-major routes ``(W, H)`` views, so no permuted copies are made here. The triton backend walks those
views directly; the torch backend copies a column-major view once per route into its own layout.

With ``delta_proj_weight``, Δ is given in low rank (Mamba's ``dt_proj`` applied to the ``dt`` part of
``x_proj``), as in ``mamba_ssm``'s fused ``mamba_inner_fn``. Where the ``cpu`` or ``triton`` backend
serves the call, one custom op runs the routes with the projection fused into the kernel and the
routes summed in place: neither the (batch, H, W, K, dim) Δ nor a per-route output is ever stored; its
backward recomputes one route's Δ at a time. Elsewhere (torch/reference backends, float64) Δ is
materialised one route at a time and the per-route path runs (same numbers up to float32 rounding;
tested against each other).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .selective_scan import cpu_backend
from .selective_scan.dispatch import get_backend_module, resolve_backend
from .selective_scan.interface import needs_grad, run_scan

ROUTES = ("row", "col", "row_rev", "col_rev")
# route -> (permutation of a (batch, H, W, C) map into (batch, C, L1, L2), scan backwards?)
_ROUTE_LAYOUT = {
    "row": ((0, 3, 1, 2), False),
    "col": ((0, 3, 2, 1), False),
    "row_rev": ((0, 3, 1, 2), True),
    "col_rev": ((0, 3, 2, 1), True),
}


# Backends with a ``scan_forward_lowrank`` and the largest rank it takes (their ``MAX_DT_RANK``; spelled
# out here so that torch.compile can trace the choice without importing a backend module).
FUSED_LOWRANK_MAX_RANK = {"cpu": 64, "triton": 64}


def _inverse(perm: Sequence[int]) -> tuple:
    return tuple(perm.index(axis) for axis in range(len(perm)))


def _check_routes(routes: Sequence[str]) -> tuple:
    routes = tuple(routes)
    unknown = [r for r in routes if r not in _ROUTE_LAYOUT]
    if unknown or not routes:
        raise ValueError(f"routes must be a non-empty sequence of {ROUTES}, got {routes}")
    return routes


def _route_views(route: str, *tensors: Tensor, k: int):
    """Route k's sequence-contract views: (batch, H, W, X) maps -> (batch, X, L1, L2); per-route
    (batch, H, W, K, X) tensors -> (batch, 1, X, L1, L2) (one group)."""
    perm, _ = _ROUTE_LAYOUT[route]
    return [t.permute(perm) if t.dim() == 4 else t[:, :, :, k].permute(perm).unsqueeze(1) for t in tensors]


@torch.library.custom_op("vim2_kernels::cross_scan_lowrank_fwd", mutates_args=())
def _cross_scan_lowrank_op(
    u: Tensor, dts: Tensor, dt_weight: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, routes: str, keep_states: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Fused path of ``cross_scan_2d`` with a low-rank Δ (``backend``: 'cpu' or 'triton'): (out, saved
    chunk states per route, or an empty tensor when ``keep_states`` is False, i.e. no backward follows)."""
    module = get_backend_module(backend)
    route_names = routes.split(",")
    batch, height, width, dim = u.shape
    # (batch, H, W, dim) float32, contiguous (lanes store contiguously); routes after the first add into it
    out = torch.empty(u.shape, dtype=torch.float32, device=u.device)
    saved = torch.empty(
        (len(route_names), *module.saved_shape(batch, dim, height * width, A.shape[-1])) if keep_states
        else (0,), dtype=torch.float32, device=u.device,
    )
    # the C kernels read float32; the Triton kernels convert fp16/bf16 as they load (no copies)
    u_, dts_, B_, C_ = (cpu_backend._f32(t) if backend == "cpu" else t for t in (u, dts, B, C))
    for k, route in enumerate(route_names):
        out_k, u_k, dts_k, B_k, C_k = _route_views(route, out, u_, dts_, B_, C_, k=k)
        module.scan_forward_lowrank(
            out_k, u_k, dts_k, dt_weight[k], A[k], B_k, C_k,
            None if D is None else D[k], None if delta_bias is None else delta_bias[k],
            delta_softplus, _ROUTE_LAYOUT[route][1], accumulate=k > 0, saved=saved[k] if keep_states else None,
        )
    return (out if u.dtype == torch.float32 else out.to(u.dtype)), saved


@_cross_scan_lowrank_op.register_fake
def _(u, dts, dt_weight, A, B, C, D, delta_bias, delta_softplus, routes, keep_states, backend):
    saved_shape = get_backend_module(backend).saved_shape
    batch, height, width, dim = u.shape
    n_routes = len(routes.split(","))
    saved = (n_routes, *saved_shape(batch, dim, height * width, A.shape[-1])) if keep_states else (0,)
    return torch.empty(u.shape, dtype=u.dtype, device=u.device), u.new_empty(saved, dtype=torch.float32)


@torch.library.custom_op("vim2_kernels::cross_scan_lowrank_bwd", mutates_args=())
def _cross_scan_lowrank_bwd_op(
    dout: Tensor, u: Tensor, dts: Tensor, dt_weight: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], delta_bias: Optional[Tensor], saved: Tensor, delta_softplus: bool, routes: str,
    backend: str,
) -> List[Tensor]:
    """Gradients [du, ddts, d dt_weight, dA, dB, dC, dD, d delta_bias] (empty placeholders for absent D/bias).

    Per route: Δ is recomputed from the low-rank input (one route's Δ at a time, transient), the
    backend's scan backward runs from the saved chunk states, and dΔ is projected back to rank R.
    """
    module = get_backend_module(backend)
    # float32 for every backend here: dΔ comes back in u's dtype and is projected by float32 matmuls
    dout32, u32, dts32, B32, C32 = (cpu_backend._f32(t) for t in (dout, u, dts, B, C))
    batch, height, width, dim = u.shape
    tokens, rank = batch * height * width, dt_weight.shape[2]
    # A backend that writes into given buffers (BACKWARD_INTO: the cpu one) adds every route's du into one
    # map and overwrites each route's Δ with its dΔ: two full-size maps for the whole backward instead of
    # four alive and three fresh ones per route (on a CPU every fresh multi-MB tensor is page-faulted in:
    # 23 ms for 48 MB against 6 ms to refill a used one, measured).
    into = getattr(module, "BACKWARD_INTO", False)
    du = torch.empty(u.shape, dtype=torch.float32, device=u.device) if into else \
        torch.zeros(u.shape, dtype=torch.float32, device=u.device)
    delta_k = torch.empty(u.shape, dtype=torch.float32, device=u.device) if into else None
    ddts, dW, dA, dB, dC, dD, dbias = [], [], [], [], [], [], []
    for k, route in enumerate(routes.split(",")):
        perm, reverse = _ROUTE_LAYOUT[route]
        inverse = _inverse(perm)
        weight = dt_weight[k].float()  # (dim, R)
        # Δ = dts @ W^T as a 2-D mm (a 4-D torch.matmul with the transposed weight ran 3x slower at rank 6)
        dts_2d = dts32[:, :, :, k].reshape(tokens, rank)
        if into:
            torch.mm(dts_2d, weight.t(), out=delta_k.view(tokens, dim))
        else:
            delta_k = torch.mm(dts_2d, weight.t()).view(batch, height, width, dim)
        dout_k, u_k, delta_seq, B_k, C_k, dts_k = _route_views(route, dout32, u32, delta_k, B32, C32, dts32, k=k)
        extra = dict(du_out=du.permute(perm), accumulate_du=k > 0, ddelta_out=delta_seq) if into else {}
        du_k, ddelta_k, dA_k, dB_k, dC_k, dD_k, _, dbias_k, _ = module.scan_backward(
            dout_k, None, u_k, delta_seq, A[k], B_k, C_k, None if D is None else D[k], None,
            None if delta_bias is None else delta_bias[k], None, saved[k], delta_softplus, reverse, **extra,
        )
        del delta_seq
        if not into:
            del delta_k  # only one route's full-size maps are alive at a time
            du += du_k.permute(inverse)
        del du_k
        # Project dΔ back to rank R in whichever layout it is dense in, so that the matmuls copy no
        # full-size map: the map's (batch, H, W, dim) for the cpu backend (its outputs keep the input's
        # strides), the route's (batch, dim, L1, L2) for the triton backend (contiguous outputs).
        ddelta_map = ddelta_k.permute(inverse)
        if ddelta_map.is_contiguous():
            ddelta_2d = ddelta_map.view(tokens, dim)
            ddts.append(torch.mm(ddelta_2d, weight).view(batch, height, width, rank))
            dW.append(torch.mm(dts_2d.t(), ddelta_2d).t())  # as (R, dim), then transposed: 2x faster
            del ddelta_2d
        else:
            ddelta_seq, dts_seq = ddelta_k.flatten(2), dts_k.squeeze(1).flatten(2)  # (b, dim, L), (b, R, L)
            ddts.append(torch.matmul(weight.t(), ddelta_seq).unflatten(2, ddelta_k.shape[2:]).permute(inverse))
            dW.append(torch.matmul(ddelta_seq, dts_seq.transpose(1, 2)).sum(0))
            del ddelta_seq
        del ddelta_k, ddelta_map, dts_2d
        dA.append(dA_k)
        dB.append(dB_k.squeeze(1).permute(inverse))
        dC.append(dC_k.squeeze(1).permute(inverse))
        dD.append(dD_k)
        dbias.append(dbias_k)
    return [  # (custom-op outputs must be distinct tensors: one empty placeholder per absent input)
        du.to(u.dtype), torch.stack(ddts, 3).to(dts.dtype), torch.stack(dW).to(dt_weight.dtype),
        torch.stack(dA).to(A.dtype), torch.stack(dB, 3).to(B.dtype), torch.stack(dC, 3).to(C.dtype),
        u.new_empty((0,)) if D is None else torch.stack(dD).to(D.dtype),
        u.new_empty((0,)) if delta_bias is None else torch.stack(dbias).to(delta_bias.dtype),
    ]


@_cross_scan_lowrank_bwd_op.register_fake
def _(dout, u, dts, dt_weight, A, B, C, D, delta_bias, saved, delta_softplus, routes, backend):
    return [u.new_empty((0,)) if t is None else torch.empty(t.shape, dtype=t.dtype, device=t.device)
            for t in (u, dts, dt_weight, A, B, C, D, delta_bias)]


def _lowrank_setup_context(ctx, inputs, output):
    u, dts, dt_weight, A, B, C, D, delta_bias, delta_softplus, routes, keep_states, backend = inputs
    ctx.save_for_backward(u, dts, dt_weight, A, B, C, D, delta_bias, output[1])
    ctx.flags = (delta_softplus, routes, backend)


def _lowrank_backward(ctx, dout, _dsaved):
    u, dts, dt_weight, A, B, C, D, delta_bias, saved = ctx.saved_tensors
    if saved.numel() == 0 and u.numel() != 0:
        raise RuntimeError("cross_scan_2d ran without keeping states for backward (keep_states=False)")
    grads = torch.ops.vim2_kernels.cross_scan_lowrank_bwd(
        dout.contiguous(), u, dts, dt_weight, A, B, C, D, delta_bias, saved, *ctx.flags
    )
    du, ddts, dW, dA, dB, dC, dD, dbias = grads
    return (du, ddts, dW, dA, dB, dC, None if D is None else dD, None if delta_bias is None else dbias,
            None, None, None, None)


_cross_scan_lowrank_op.register_autograd(_lowrank_backward, setup_context=_lowrank_setup_context)


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
    delta_proj_weight: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Multi-route 2-D selective scan of a channels-last map, summed over routes.

    Args:
        u: (batch, H, W, dim) SSM input shared by all routes; float32/float16/bfloat16/float64.
        delta: (batch, H, W, K, dim) per-route Δ before bias/softplus, at natural (h, w) positions; with
            ``delta_proj_weight``, the low-rank Δ input (batch, H, W, K, R) instead (may be a view, e.g.
            the first R columns of the x_proj output), dtype of u.
        A: (K, dim, N) float32.
        B, C: (batch, H, W, K, N), dtype of u or float32.
        D, delta_bias: optional (K, dim) float32.
        routes: K route names: 'row' (h outer, w inner), 'col' (w outer, h inner) and their reverses
            'row_rev', 'col_rev'.
        delta_proj_weight: optional (K, dim, R): route k's Δ is ``delta[..., k, :] @ delta_proj_weight[k].T``.
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
    if delta_proj_weight is not None:
        if not isinstance(delta_proj_weight, Tensor) or delta_proj_weight.dim() != 3 \
                or delta_proj_weight.shape[:2] != (n_routes, dim):
            got = tuple(delta_proj_weight.shape) if isinstance(delta_proj_weight, Tensor) \
                else type(delta_proj_weight).__name__
            raise ValueError(f"delta_proj_weight must have shape (K, dim, R) = ({n_routes}, {dim}, R), got {got}")
        rank = delta_proj_weight.shape[2]
        if rank < 1:
            raise ValueError(f"delta_proj_weight must have rank R >= 1 (shape (K, dim, R)), got {rank}")
        delta_shape = ((batch, height, width, n_routes, rank), "(batch, H, W, K, R) (low-rank Δ input)")
    else:
        delta_shape = ((batch, height, width, n_routes, dim), "(batch, H, W, K, dim)")
    expected = {
        "delta": (delta, *delta_shape),
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
    if delta_proj_weight is not None:
        for name, t in (("delta", delta), ("delta_proj_weight", delta_proj_weight)):
            if t.device != u.device:
                raise ValueError(f"{name} is on {t.device} but u is on {u.device}: all inputs must share one device")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        name = resolve_backend(backend, u.device, u.dtype, d_state)
        if u.dtype != torch.float64 and rank <= FUSED_LOWRANK_MAX_RANK.get(name, 0):
            keep_states = needs_grad(u, delta, delta_proj_weight, A, B, C, D, delta_bias)
            return torch.ops.vim2_kernels.cross_scan_lowrank_fwd(
                u, delta, delta_proj_weight, A, B, C, D, delta_bias, bool(delta_softplus), ",".join(routes),
                keep_states, name,
            )[0]
    # Without autograd, routes accumulate in place and (low-rank Δ) only one route's Δ exists at a time.
    in_place = not needs_grad(u, delta, delta_proj_weight, A, B, C, D, delta_bias)
    total = None
    for k, route in enumerate(routes):
        perm, reverse = _ROUTE_LAYOUT[route]
        route_delta = delta[:, :, :, k]
        if delta_proj_weight is not None:  # (batch, H, W, R) @ (dim, R)^T
            route_delta = F.linear(route_delta, delta_proj_weight[k].to(delta.dtype)).to(u.dtype)
        # (batch, dim, L1, L2) views of u and route k's Δ; (batch, 1, N, L1, L2) of its B and C
        seq_u, seq_delta, seq_B, seq_C = _route_views(route, u, route_delta, B, C, k=k)
        out, _ = run_scan(
            seq_u, seq_delta, A[k], seq_B, seq_C,
            None if D is None else D[k], None,
            None if delta_bias is None else delta_bias[k], None,
            delta_softplus, reverse, backend, n_seq_dims=2,
        )
        out = out.permute(_inverse(perm))  # (batch, dim, L1, L2) -> (batch, H, W, dim)
        if total is None:
            total = out  # a fresh buffer of the scan's: with in_place, later routes accumulate into it
        else:
            total = total.add_(out) if in_place else total + out
    return total
