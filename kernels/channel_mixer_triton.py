"""ViM2's fused channel mixer in Triton: the CUDA counterpart of ``csrc/channel_mixer_cpu.c``.

Same computation as :func:`vim2_kernels.channel_mixer_scan` (its docstring has the formulas): for every
token, the per-direction conv + SiLU, the affine Δ/B/C and the bidirectional S6 along the token's
expanded channel axis, then the sum of both directions and the SiLU gate. Only ``v``, ``z`` and the
small parameters are read; the conv outputs, Δ, and the per-token ``(N, E)`` B and C, which the unfused
composition materialises (1.6 GB each for B and C at ViM2-T's stage 1 at 1024x1024), exist only as
register tiles.

Layout of the work: one program owns ``BLOCK_ROWS`` tokens and walks their channel axis in blocks of
``BLOCK_T`` positions, in scan order (``REVERSE`` for direction 1), as the selective-scan kernels do
(``selective_scan/triton_backend.py``, whose block helpers this module reuses): the block's inputs are
formed in registers, the recurrence inside the block is a ``tl.associative_scan``, and the state is
carried in registers between blocks. Direction 0 writes a float32 buffer; direction 1 adds to it, gates
and stores the output in v's dtype.

Forward only, for inference: with autograd, ``channel_mixer_scan`` runs the unfused composition in
checkpointed token chunks instead.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .selective_scan import triton_backend as tb

triton, tl = tb.triton, tb.tl

if triton is not None:
    from .selective_scan.triton_backend import (
        _block_states, _block_times, _last_in_scan_order, _sigmoid, _softplus, _sum)

    @triton.jit
    def _channel_mixer_fwd_kernel(
        v_ptr, z_ptr, cw_ptr, cb_ptr, dw_ptr, db_ptr, Bw_ptr, Bb_ptr, Cw_ptr, Cb_ptr, A_ptr, D_ptr,
        y_ptr, out_ptr,
        T, E, N, n_blocks,
        sv_t, sv_e, sz_t, sz_e,
        DIRECTION: tl.constexpr, K: tl.constexpr, HAS_Z: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, COMPUTE: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        row_ok = rows < T
        offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
        n_ok = offs_n < N
        # This direction's small parameters (contiguous, leading axis = direction).
        conv_bias = tl.load(cb_ptr + DIRECTION).to(COMPUTE)
        delta_weight = tl.load(dw_ptr + DIRECTION).to(COMPUTE)
        D = tl.load(D_ptr + DIRECTION).to(COMPUTE)
        pn = DIRECTION * N + offs_n
        A3 = tl.load(A_ptr + pn, mask=n_ok, other=0.0).to(COMPUTE)[None, :, None]
        Bw3 = tl.load(Bw_ptr + pn, mask=n_ok, other=0.0).to(COMPUTE)[None, :, None]
        Cw3 = tl.load(Cw_ptr + pn, mask=n_ok, other=0.0).to(COMPUTE)[None, :, None]
        h = tl.full((BLOCK_ROWS, BLOCK_N), 0.0, COMPUTE)
        for i in range(0, n_blocks):
            _, t = _block_times(i, n_blocks, DIRECTION == 1, BLOCK_T)
            t_ok = t < E
            mask2 = row_ok[:, None] & t_ok[None, :]
            # Conv taps: tap K-1 on the current position, earlier taps on earlier positions of the
            # direction's walk (zeros outside the axis).
            pre = tl.full((BLOCK_ROWS, BLOCK_T), 0.0, COMPUTE) + conv_bias
            for k in tl.static_range(K):
                if DIRECTION == 0:
                    pos = t + (k - (K - 1))
                else:
                    pos = t + ((K - 1) - k)
                ok = row_ok[:, None] & ((pos >= 0) & (pos < E))[None, :]
                vk = tl.load(v_ptr + rows[:, None] * sv_t + pos[None, :] * sv_e, mask=ok, other=0.0)
                pre += tl.load(cw_ptr + DIRECTION * K + k).to(COMPUTE) * vk.to(COMPUTE)
            x = pre * _sigmoid(pre)
            db = tl.load(db_ptr + DIRECTION * E + t, mask=t_ok, other=0.0).to(COMPUTE)
            dt = tl.where(mask2, _softplus(delta_weight * x + db[None, :]), 0.0)  # padding: identity
            bc_off = pn[:, None] * E + t[None, :]
            bc_ok = n_ok[:, None] & t_ok[None, :]
            Bb = tl.load(Bb_ptr + bc_off, mask=bc_ok, other=0.0).to(COMPUTE)
            x3 = x[:, None, :]
            a = tl.exp(dt[:, None, :] * A3)
            hs = _block_states(a, (dt * x)[:, None, :] * (x3 * Bw3 + Bb[None, :, :]), h,
                                  DIRECTION == 1, BLOCK_T)
            Cb = tl.load(Cb_ptr + bc_off, mask=bc_ok, other=0.0).to(COMPUTE)
            y = _sum((x3 * Cw3 + Cb[None, :, :]) * hs, axis=1) + D * x
            y_off = rows[:, None] * E + t[None, :]
            if DIRECTION == 0:
                tl.store(y_ptr + y_off, y, mask=mask2)
            else:
                y += tl.load(y_ptr + y_off, mask=mask2, other=0.0)
                if HAS_Z:
                    zz = tl.load(z_ptr + rows[:, None] * sz_t + t[None, :] * sz_e, mask=mask2,
                                 other=0.0).to(COMPUTE)
                    y = y * (zz * _sigmoid(zz))
                tl.store(out_ptr + y_off, y.to(out_ptr.dtype.element_ty), mask=mask2)
            h = _last_in_scan_order(hs, DIRECTION == 1, BLOCK_T)


def unavailable_reason(device) -> Optional[str]:
    """None when the fused Triton channel mixer can run on ``device`` in this process, else why not."""
    return tb.unavailable_reason(device)


def channel_mixer_forward(v: Tensor, z: Optional[Tensor], conv_weight: Tensor, conv_bias: Tensor,
                          delta_weight: Tensor, delta_bias: Tensor, B_weight: Tensor, B_bias: Tensor,
                          C_weight: Tensor, C_bias: Tensor, A: Tensor, D: Tensor) -> Tensor:
    """Fused channel-mixer forward (no autograd). Arguments as :func:`vim2_kernels.channel_mixer_scan`
    (already validated there): v, z (T, E) fp32/fp16/bf16/fp64 with any strides; the parameters in any
    float dtype. Returns (T, E) contiguous in v's dtype; computed in float32 (float64 for float64 v)."""
    tb._check_ready(v)
    acc_dtype, compute = tb._compute_dtype(v)
    tokens, length = v.shape
    d_state, width = A.shape[1], conv_weight.shape[1]
    out = torch.empty((tokens, length), dtype=v.dtype, device=v.device)
    if out.numel() == 0:
        return out
    params = [p.detach().to(acc_dtype).contiguous() for p in (
        conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias, C_weight, C_bias, A, D)]
    y = torch.empty((tokens, length), dtype=acc_dtype, device=v.device)
    block_n = tb._next_power_of_2(d_state)
    block_t = tb._block_t(length)
    block_rows = tb._pick_block_rows(tokens, 1, block_n, block_t, v.device, backward=False)
    n_blocks = -(-length // block_t)
    grid = (-(-tokens // block_rows),)
    for direction in (0, 1):
        _channel_mixer_fwd_kernel[grid](
            v, z if z is not None else v, *params, y, out,
            tokens, length, d_state, n_blocks,
            v.stride(0), v.stride(1), *((z.stride(0), z.stride(1)) if z is not None else (0, 0)),
            DIRECTION=direction, K=width, HAS_Z=z is not None,
            BLOCK_ROWS=block_rows, BLOCK_N=block_n, BLOCK_T=block_t, COMPUTE=compute,
            num_warps=tb._num_warps(block_rows * block_n * block_t),
        )
    return out
