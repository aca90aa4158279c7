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

Backward: the forward keeps the state entering every block of both directions (``(2, T, E / BLOCK_T,
N)``, the size of v at N = 16 and 32-position blocks) and the pre-gate sum; the backward kernel recomputes
each block's states from its checkpoint in registers, runs the adjoint recurrence as a reverse
associative scan, and writes the gradient of the conv outputs plus per-program parameter partials.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .selective_scan import triton_backend as tb

triton, tl = tb.triton, tb.tl

if triton is not None:
    from .selective_scan.triton_backend import (
        _block_adjoint, _block_states, _block_times, _last_in_scan_order, _sigmoid, _softplus, _sum)

    @triton.jit
    def _direction_params(cb_ptr, dw_ptr, D_ptr, A_ptr, Bw_ptr, Cw_ptr, N, DIRECTION: tl.constexpr,
                          BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
        """One direction's small parameters (contiguous, leading axis = direction); the (1, N, 1) ones
        broadcast over (tokens, states, positions) tiles."""
        offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
        n_ok = offs_n < N
        pn = DIRECTION * N + offs_n
        conv_bias = tl.load(cb_ptr + DIRECTION).to(COMPUTE)
        delta_weight = tl.load(dw_ptr + DIRECTION).to(COMPUTE)
        D = tl.load(D_ptr + DIRECTION).to(COMPUTE)
        A3 = tl.load(A_ptr + pn, mask=n_ok, other=0.0).to(COMPUTE)[None, :, None]
        Bw3 = tl.load(Bw_ptr + pn, mask=n_ok, other=0.0).to(COMPUTE)[None, :, None]
        Cw3 = tl.load(Cw_ptr + pn, mask=n_ok, other=0.0).to(COMPUTE)[None, :, None]
        return offs_n, n_ok, pn, conv_bias, delta_weight, D, A3, Bw3, Cw3

    @triton.jit
    def _conv_pre(v_ptr, cw_ptr, rows, row_ok, t, E, sv_t, sv_e, conv_bias,
                  DIRECTION: tl.constexpr, K: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
                  COMPUTE: tl.constexpr):
        """(BLOCK_ROWS, BLOCK_T) conv outputs before the SiLU. Tap K-1 sits on the current position, the
        earlier taps on earlier positions of the direction's walk; zeros outside the axis."""
        pre = tl.full((BLOCK_ROWS, BLOCK_T), 0.0, COMPUTE) + conv_bias
        for k in tl.static_range(K):
            if DIRECTION == 0:
                pos = t + (k - (K - 1))
            else:
                pos = t + ((K - 1) - k)
            ok = row_ok[:, None] & ((pos >= 0) & (pos < E))[None, :]
            vk = tl.load(v_ptr + rows[:, None] * sv_t + pos[None, :] * sv_e, mask=ok, other=0.0)
            pre += tl.load(cw_ptr + DIRECTION * K + k).to(COMPUTE) * vk.to(COMPUTE)
        return pre

    @triton.jit
    def _channel_mixer_bwd_kernel(
        gy_ptr, v_ptr, cw_ptr, cb_ptr, dw_ptr, db_ptr, Bw_ptr, Bb_ptr, Cw_ptr, Cb_ptr, A_ptr, D_ptr, saved_ptr,
        dpre_ptr, pos_part_ptr, vec_part_ptr,
        T, E, N, n_blocks, n_tiles,
        sv_t, sv_e,
        DIRECTION: tl.constexpr, K: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, COMPUTE: tl.constexpr,
    ):
        """One direction's backward. Writes d(conv output before SiLU) for every (token, position), and
        per-program partial sums (deterministic: each program owns one slot): over positions, ddelta_bias,
        dB_bias and dC_bias in ``pos_part`` (slot, 1 + 2N, E); dA, dB_weight, dC_weight (N each), dD and
        ddelta_weight in ``vec_part`` (slot, 3N + 2). Programs loop over token tiles pid, pid + G, ..."""
        pid = tl.program_id(0)
        n_progs = tl.num_programs(0)
        offs_n, n_ok, pn, conv_bias, delta_weight, D, A3, Bw3, Cw3 = _direction_params(
            cb_ptr, dw_ptr, D_ptr, A_ptr, Bw_ptr, Cw_ptr, N, DIRECTION, BLOCK_N, COMPUTE)
        ones = tl.full((BLOCK_ROWS, BLOCK_N, BLOCK_T), 1.0, COMPUTE)
        dA_acc = tl.full((BLOCK_N,), 0.0, COMPUTE)
        dBw_acc = tl.full((BLOCK_N,), 0.0, COMPUTE)
        dCw_acc = tl.full((BLOCK_N,), 0.0, COMPUTE)
        dD_acc = tl.full((BLOCK_ROWS,), 0.0, COMPUTE)
        ddw_acc = tl.full((BLOCK_ROWS,), 0.0, COMPUTE)
        slot = pid.to(tl.int64) * (1 + 2 * N)
        for tile in range(pid, n_tiles, n_progs):
            rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)  # int64 through the arange
            row_ok = rows < T
            carry = tl.full((BLOCK_ROWS, BLOCK_N), 0.0, COMPUTE)
            for i in range(0, n_blocks):  # blocks in reverse scan order
                c, t = _block_times(n_blocks - 1 - i, n_blocks, DIRECTION == 1, BLOCK_T, tl.int64)
                t_ok = t < E
                mask2 = row_ok[:, None] & t_ok[None, :]
                h_in = tl.load(saved_ptr + ((DIRECTION * T + rows[:, None]) * n_blocks + c) * N + offs_n[None, :],
                               mask=row_ok[:, None] & n_ok[None, :], other=0.0)
                pre = _conv_pre(v_ptr, cw_ptr, rows, row_ok, t, E, sv_t, sv_e, conv_bias,
                                DIRECTION, K, BLOCK_ROWS, BLOCK_T, COMPUTE)
                sig_pre = _sigmoid(pre)
                x = pre * sig_pre
                db = tl.load(db_ptr + DIRECTION * E + t, mask=t_ok, other=0.0).to(COMPUTE)
                dp = delta_weight * x + db[None, :]
                dt = tl.where(mask2, _softplus(dp), 0.0)
                bc_off = pn[:, None] * E + t[None, :]
                bc_ok = n_ok[:, None] & t_ok[None, :]
                x3 = x[:, None, :]
                B3 = x3 * Bw3 + tl.load(Bb_ptr + bc_off, mask=bc_ok, other=0.0).to(COMPUTE)[None, :, :]
                C3 = x3 * Cw3 + tl.load(Cb_ptr + bc_off, mask=bc_ok, other=0.0).to(COMPUTE)[None, :, :]
                a = tl.exp(dt[:, None, :] * A3)
                bx = (dt * x)[:, None, :] * B3
                hs = _block_states(a, bx, h_in, DIRECTION == 1, BLOCK_T)  # recomputed from the checkpoint
                gy = tl.load(gy_ptr + rows[:, None] * E + t[None, :], mask=mask2, other=0.0).to(COMPUTE)
                gs, carry = _block_adjoint(a, gy[:, None, :] * C3, carry, ones, DIRECTION == 1, BLOCK_T)
                dC = gy[:, None, :] * hs
                dB = gs * (dt * x)[:, None, :]
                gB = _sum(gs * B3, axis=1)
                decayed = gs * (hs - bx)  # G_s * a_s * h_{s-1}
                ddt = gB * x + _sum(decayed * A3, axis=1)
                ddp = tl.where(mask2, ddt * tl.where(dp > 20.0, 1.0, _sigmoid(dp)), 0.0)
                dx = gB * dt + gy * D + _sum(dB * Bw3, axis=1) + _sum(dC * Cw3, axis=1) + ddp * delta_weight
                dpre = dx * sig_pre * (1.0 + pre * (1.0 - sig_pre))
                tl.store(dpre_ptr + rows[:, None] * E + t[None, :], dpre, mask=mask2)
                dA_acc += _sum(_sum(decayed * dt[:, None, :], axis=2), axis=0)
                dBw_acc += _sum(_sum(dB * x3, axis=2), axis=0)
                dCw_acc += _sum(_sum(dC * x3, axis=2), axis=0)
                dD_acc += _sum(gy * x, axis=1)
                ddw_acc += _sum(ddp * x, axis=1)
                # Per-position sums over this program's tokens: read-modify-write of its own slot.
                db_ptrs = pos_part_ptr + slot * E + t
                tl.store(db_ptrs, tl.load(db_ptrs, mask=t_ok, other=0.0) + _sum(ddp, axis=0), mask=t_ok)
                dBb_ptrs = pos_part_ptr + (slot + 1 + offs_n[:, None]) * E + t[None, :]
                tl.store(dBb_ptrs, tl.load(dBb_ptrs, mask=bc_ok, other=0.0) + _sum(dB, axis=0), mask=bc_ok)
                dCb_ptrs = pos_part_ptr + (slot + 1 + N + offs_n[:, None]) * E + t[None, :]
                tl.store(dCb_ptrs, tl.load(dCb_ptrs, mask=bc_ok, other=0.0) + _sum(dC, axis=0), mask=bc_ok)
                # The next tile re-reads these addresses, maybe from other threads of this program:
                # __syncthreads makes the stores visible to them (CUDA's rule for global memory).
                tl.debug_barrier()
        vec = vec_part_ptr + pid.to(tl.int64) * (3 * N + 2)
        tl.store(vec + offs_n, dA_acc, mask=n_ok)
        tl.store(vec + N + offs_n, dBw_acc, mask=n_ok)
        tl.store(vec + 2 * N + offs_n, dCw_acc, mask=n_ok)
        tl.store(vec + 3 * N, _sum(dD_acc, axis=0))
        tl.store(vec + 3 * N + 1, _sum(ddw_acc, axis=0))

    @triton.jit
    def _channel_mixer_fwd_kernel(
        v_ptr, z_ptr, cw_ptr, cb_ptr, dw_ptr, db_ptr, Bw_ptr, Bb_ptr, Cw_ptr, Cb_ptr, A_ptr, D_ptr,
        y_ptr, out_ptr, saved_ptr,
        T, E, N, n_blocks,
        sv_t, sv_e, sz_t, sz_e,
        DIRECTION: tl.constexpr, K: tl.constexpr, HAS_Z: tl.constexpr, KEEP: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, COMPUTE: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        row_ok = rows < T
        offs_n, n_ok, pn, conv_bias, delta_weight, D, A3, Bw3, Cw3 = _direction_params(
            cb_ptr, dw_ptr, D_ptr, A_ptr, Bw_ptr, Cw_ptr, N, DIRECTION, BLOCK_N, COMPUTE)
        h = tl.full((BLOCK_ROWS, BLOCK_N), 0.0, COMPUTE)
        for i in range(0, n_blocks):
            c, t = _block_times(i, n_blocks, DIRECTION == 1, BLOCK_T, tl.int64)
            t_ok = t < E
            mask2 = row_ok[:, None] & t_ok[None, :]
            if KEEP:  # the state entering the block: the backward recomputes the block from it
                tl.store(saved_ptr + ((DIRECTION * T + rows[:, None]) * n_blocks + c) * N + offs_n[None, :],
                         h, mask=row_ok[:, None] & n_ok[None, :])
            pre = _conv_pre(v_ptr, cw_ptr, rows, row_ok, t, E, sv_t, sv_e, conv_bias,
                            DIRECTION, K, BLOCK_ROWS, BLOCK_T, COMPUTE)
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
                if KEEP:  # the pre-gate sum, for the gate's gradient
                    tl.store(y_ptr + y_off, y, mask=mask2)
                if HAS_Z:
                    zz = tl.load(z_ptr + rows[:, None] * sz_t + t[None, :] * sz_e, mask=mask2,
                                 other=0.0).to(COMPUTE)
                    y = y * (zz * _sigmoid(zz))
                tl.store(out_ptr + y_off, y.to(out_ptr.dtype.element_ty), mask=mask2)
            h = _last_in_scan_order(hs, DIRECTION == 1, BLOCK_T)


def unavailable_reason(device) -> Optional[str]:
    """None when the fused Triton channel mixer can run on ``device`` in this process, else why not."""
    return tb.unavailable_reason(device)


class _Plan:
    """Tile sizes and launch geometry shared by the forward and the backward (they must agree on the
    time block, which sets the checkpoint layout)."""

    def __init__(self, v: Tensor, d_state: int, backward: bool):
        self.tokens, self.length = v.shape
        self.block_n = tb._next_power_of_2(d_state)
        self.block_t = tb._block_t(self.length)
        self.block_rows = tb._pick_block_rows(self.tokens, 1, self.block_n, self.block_t, v.device, backward)
        self.n_blocks = -(-self.length // self.block_t)
        self.n_tiles = -(-self.tokens // self.block_rows)
        # as the scan kernels: the backward keeps about twice as many tiles alive
        self.num_warps = tb._num_warps((2 if backward else 1) * self.block_rows * self.block_n * self.block_t)

    def constexprs(self, **flags):
        return dict(BLOCK_ROWS=self.block_rows, BLOCK_N=self.block_n, BLOCK_T=self.block_t,
                    num_warps=self.num_warps, **flags)


def _params(params, dtype: torch.dtype):
    return [p.detach().to(dtype).contiguous() for p in params]


def _conv_backward(v: Tensor, dpre: Tensor, conv_weight: Tensor):
    """(dv, dconv_weight) of pre[r, t, c] = bias[r] + sum_k w[r, k] * v[t, c + s_r(k)], zero outside the
    axis, with s_0(k) = k - (K-1) and s_1(k) = (K-1) - k. As K (<= 8) shifted multiply-adds rather than
    cuDNN's conv gradients: no TF32, deterministic sums."""
    length, width = v.shape[1], conv_weight.shape[1]
    pad = width - 1
    v_pad = torch.nn.functional.pad(v, (pad, pad))
    dpre_pad = torch.nn.functional.pad(dpre, (pad, pad))
    dv = torch.zeros_like(v)
    dweight = torch.empty_like(conv_weight)
    for direction in (0, 1):
        for k in range(width):
            shift = k - pad if direction == 0 else pad - k
            # pre[c] reads v[c + shift]; so v[p] feeds pre[p - shift]
            dweight[direction, k] = (dpre[direction] * v_pad[:, pad + shift:pad + shift + length]).sum()
            dv.addcmul_(dpre_pad[direction, :, pad - shift:pad - shift + length], conv_weight[direction, k])
    return dv, dweight


def saved_shape(tokens: int, length: int, d_state: int):
    """Shape of the forward's checkpoints: the state entering every block, (2, T, n_blocks, N)."""
    return (2, tokens, -(-length // tb._block_t(length)), d_state)


def channel_mixer_forward(v: Tensor, z: Optional[Tensor], conv_weight: Tensor, conv_bias: Tensor,
                          delta_weight: Tensor, delta_bias: Tensor, B_weight: Tensor, B_bias: Tensor,
                          C_weight: Tensor, C_bias: Tensor, A: Tensor, D: Tensor, keep_for_backward: bool = False):
    """Fused channel-mixer forward. Arguments as :func:`vim2_kernels.channel_mixer_scan` (already
    validated there): v, z (T, E) fp32/fp16/bf16/fp64 with any strides; the parameters in any float
    dtype. Computed in float32 (float64 for float64 v).

    Returns out (T, E) contiguous in v's dtype; with ``keep_for_backward`` also ``saved`` (2, T, n_blocks, N),
    the state entering every block of both directions, and ``y`` (T, E), the sum of both directions before
    the gate (both in the compute dtype), which :func:`channel_mixer_backward` takes.
    """
    tb._check_ready(v)
    acc_dtype, compute = tb._compute_dtype(v)
    tokens, length = v.shape
    d_state, width = A.shape[1], conv_weight.shape[1]
    out = torch.empty((tokens, length), dtype=v.dtype, device=v.device)
    y = torch.empty((tokens, length), dtype=acc_dtype, device=v.device)
    saved = torch.empty(saved_shape(tokens, length, d_state) if keep_for_backward else (0,), dtype=acc_dtype,
                        device=v.device)
    if out.numel():
        params = _params((conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias, C_weight, C_bias,
                          A, D), acc_dtype)
        plan = _Plan(v, d_state, backward=False)
        for direction in (0, 1):
            _channel_mixer_fwd_kernel[(plan.n_tiles,)](
                v, z if z is not None else v, *params, y, out, saved,
                tokens, length, d_state, plan.n_blocks,
                v.stride(0), v.stride(1), *((z.stride(0), z.stride(1)) if z is not None else (0, 0)),
                **plan.constexprs(DIRECTION=direction, K=width, HAS_Z=z is not None, KEEP=keep_for_backward,
                                  COMPUTE=compute),
            )
    if keep_for_backward:
        return out, saved, y
    return out


def channel_mixer_backward(dout: Tensor, v: Tensor, z: Optional[Tensor], conv_weight: Tensor, conv_bias: Tensor,
                           delta_weight: Tensor, delta_bias: Tensor, B_weight: Tensor, B_bias: Tensor,
                           C_weight: Tensor, C_bias: Tensor, A: Tensor, D: Tensor, saved: Tensor, y: Tensor):
    """Gradients of :func:`channel_mixer_forward` w.r.t. (v, z, conv_weight, conv_bias, delta_weight,
    delta_bias, B_weight, B_bias, C_weight, C_bias, A, D); ``saved`` and ``y`` from the forward with
    ``keep_for_backward``. dv/dz in v's dtype, the parameters' gradients in their own dtypes.

    The kernel recomputes each block from its checkpoint and runs the adjoint recurrence; it returns the
    gradient of the conv outputs before the SiLU, from which the conv's own gradients (dv, conv weight
    and bias) follow by K shifted multiply-adds (:func:`_conv_backward`). Parameter sums over tokens are
    per-program partials added by ``torch.sum``: deterministic.
    """
    tb._check_ready(v)
    acc_dtype, compute = tb._compute_dtype(v)
    tokens, length = v.shape
    d_state, width = A.shape[1], conv_weight.shape[1]
    params = (conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias, C_weight, C_bias, A, D)
    if v.numel() == 0:  # nothing flows: zero parameter gradients
        return [torch.zeros_like(v), None if z is None else torch.zeros_like(z)] + [torch.zeros_like(p) for p in params]
    g = dout.to(acc_dtype)
    dz = None
    if z is not None:
        zc = z.to(acc_dtype)
        sig = torch.sigmoid(zc)
        dz = (g * y * sig * (1.0 + zc * (1.0 - sig))).to(z.dtype)
        g = g * (zc * sig)
    g = g.contiguous()
    dpre = torch.empty((2, tokens, length), dtype=acc_dtype, device=v.device)  # the kernel writes all of it
    plan = _Plan(v, d_state, backward=True)
    # Programs loop over token tiles, each with its own slot of per-position partials ((1 + 2N) x E floats):
    # about 8 per SM for occupancy (their loop is latency-bound), all slots together at most 2**23 values.
    slot_size = (1 + 2 * d_state) * length
    if tb._INTERPRETED:
        programs = min(plan.n_tiles, 2)
    else:
        programs = min(plan.n_tiles, 8 * tb._num_sms(v.device), 2**22 // slot_size)
    programs = max(1, programs)
    pos_part = torch.zeros((2, programs, 1 + 2 * d_state, length), dtype=acc_dtype, device=v.device)
    vec_part = torch.zeros((2, programs, 3 * d_state + 2), dtype=acc_dtype, device=v.device)
    p = _params(params, acc_dtype)
    for direction in (0, 1):
        _channel_mixer_bwd_kernel[(programs,)](
            g, v, *p, saved, dpre[direction], pos_part[direction], vec_part[direction],
            tokens, length, d_state, plan.n_blocks, plan.n_tiles, v.stride(0), v.stride(1),
            **plan.constexprs(DIRECTION=direction, K=width, COMPUTE=compute),
        )
    pos, vec = pos_part.sum(1), vec_part.sum(1)  # (2, 1 + 2N, E), (2, 3N + 2)
    N = d_state
    ddelta_bias, dB_bias, dC_bias = pos[:, 0], pos[:, 1:1 + N], pos[:, 1 + N:]
    dA, dB_weight, dC_weight = vec[:, :N], vec[:, N:2 * N], vec[:, 2 * N:3 * N]
    dD, ddelta_weight = vec[:, 3 * N], vec[:, 3 * N + 1]
    dv, dconv_weight = _conv_backward(v.to(acc_dtype), dpre, p[0])  # p[0]: the conv weight, compute dtype
    dconv_bias = dpre.sum(dim=(1, 2))
    grads = (dconv_weight, dconv_bias, ddelta_weight, ddelta_bias, dB_weight, dB_bias, dC_weight, dC_bias, dA, dD)
    # copies: several of these are views of one partial-sum tensor (custom ops must not return aliases)
    return [dv.to(v.dtype), dz] + [gr.to(prm.dtype, copy=True) for gr, prm in zip(grads, params)]
