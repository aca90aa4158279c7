"""Triton selective-scan backend (the default on CUDA).

Implements the backend contract of ``vim2_kernels.selective_scan`` (see docs/kernels.md):
``NAME``, ``unavailable_reason``, ``saved_shape``, ``scan_forward``, ``scan_backward``.

Algorithm
---------
Rows are the flattened ``(batch, dim)`` pairs. One Triton program owns a tile of ``BLOCK_ROWS`` rows
and walks the whole sequence in scan order, one *time block* of ``BLOCK_T`` steps at a time:

* the block's inputs are loaded once as 2-D tiles ``(BLOCK_ROWS, BLOCK_T)`` (``u``, ``delta``, ``z``,
  ``dout``) and ``(BLOCK_N, BLOCK_T)`` for ``B``/``C`` when every row of the tile belongs to the same
  ``(batch, group)`` (then B/C are loaded once per tile and broadcast over its rows), otherwise
  ``(BLOCK_ROWS, BLOCK_N, BLOCK_T)`` gathered per row (e.g. the channel mixer: dim = 1, one row per
  token);
* the recurrence ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t`` inside the block is a
  ``tl.associative_scan`` over the time axis of ``(BLOCK_ROWS, BLOCK_N, BLOCK_T)`` float32 register
  tiles; the state entering the block (``(BLOCK_ROWS, BLOCK_N)`` float32, kept in registers across
  blocks) is folded into the block's first step. Only products of ``exp(dt*A)`` factors are formed:
  nothing is ever divided by a decay factor.
* the state entering every time block is written to ``saved`` ``(batch, dim, n_blocks, N)``
  (float32), so the backward pass recomputes each block's states from its checkpoint in registers:
  no ``(batch, dim, L, N)`` tensor and no global scratch buffer exist in either pass.

When there are too few row tiles to fill the GPU (e.g. batch 1, dim 192, L 3136) the time blocks are
split into ``S`` segments run by separate programs: a summary pass computes, per segment, the state it
leaves when entered with zero and the sum of its step sizes (its decay is ``exp(A * sum dt)``, a
non-positive exponent for positive steps); a small sequential kernel combines those over segments into
every segment's entering state; then the main pass runs all segments in parallel. Backward does the same
for the adjoint, segments in reverse. ``SEGMENTS`` forces ``S`` (1 = purely sequential).

Backward walks the blocks in reverse scan order. With ``G_s`` the gradient w.r.t. the state after
step ``s`` (scan order), ``G_s = gy_s C_s + a_{s+1} G_{s+1}`` is computed inside a block by a second
associative scan run against the scan direction, with segments represented as
``(first decay, product of the remaining decays, partial sum)`` so that no shifted copy of the decays
is needed. The identity ``a_s h_{s-1} = h_s - dt_s B_s u_s`` gives the decay gradient without the
previous state.

Gradient reductions
-------------------
``dA``, ``dD``, ``ddelta_bias`` are per-row float32 partials summed over batch with ``torch.sum``
(deterministic). ``dB``/``dC`` (sum over the channels of a group) use, in this order of preference:
a direct store when each row is its own ``(batch, group)`` (``dim // G == 1``); per-tile partials
``(batch, G, dim_per_group // BLOCK_ROWS, N, L)`` reduced by ``torch.sum`` (deterministic; chosen when
``torch.are_deterministic_algorithms_enabled()`` or when there are at most ``MAX_PARTIAL_SLOTS``
partials per group); otherwise float32 ``tl.atomic_add`` into one ``(batch, G, N, L)`` buffer (the order
of the additions, hence the last bits, may vary between runs). ``BC_GRAD_REDUCTION`` forces a choice.

Layouts and dtypes
------------------
Sequence tensors keep their strides (token-major views, ``Ls = (L1, L2)`` two-level sequences whose
position ``t`` lives at ``(t // L2, t % L2)``): nothing is copied; ``reverse=True`` is pure index
arithmetic. All offsets are int64. fp16/bf16 inputs are converted to float32 on load; outputs are
stored in ``u.dtype``. float64 inputs are computed in float64 end to end (``saved`` is then float64
too: ``saved_dtype`` tells the public layer's fake kernel). ``A``, ``D``, ``delta_bias`` and ``initial_state`` are small and are made
contiguous (a copy only when they are not).

Triton is optional: without it this module still imports, and ``unavailable_reason`` says why it
cannot run. On CPU tensors the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1`` was
set before this module was imported (slow; meant for tests on tiny shapes).
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Optional, Sequence, Tuple

import torch

NAME = "triton"

# Largest number of time steps processed per block (= distance between saved checkpoints). A power of
# two; the block is shrunk to next_power_of_2(L) for short sequences. Module-level so tests can make it
# small; scan_forward and scan_backward must see the same value (saved_shape depends on it).
CHUNK_SIZE = 32
# Force the tile height (a power of two) instead of the heuristic; for tests and tuning.
BLOCK_ROWS: Optional[int] = None
# dB/dC reduction over the channels of a group: "auto" | "partials" | "atomic" (see module docstring).
BC_GRAD_REDUCTION = "auto"
# "auto" uses deterministic per-tile partials when there are at most this many tiles per group.
MAX_PARTIAL_SLOTS = 8
# Largest rank R of the low-rank Δ that scan_forward_lowrank takes (the (rows, R, T) product stays small).
MAX_DT_RANK = 64
# Force the number of sequence segments processed in parallel (None: heuristic; 1: purely sequential).
SEGMENTS: Optional[int] = None
# Force the warps per program of the scan kernels (None: heuristic, one warp per 256 tile elements); for
# tuning: one warp keeps a (1, 16, 32) tile's reductions inside the warp (19% fewer sm_90 instructions per
# state update in the forward) at half the warps in flight.
NUM_WARPS: Optional[int] = None
# Segment heuristic (see _pick_segments): a launch whose row tiles alone put at least SPLIT_BELOW_WARPS_PER_SM
# warps on every SM stays sequential (measured on an H200: ViM2-T's 768-row stage-3 route ran 1.37x faster
# unsplit, at 11.6 warps/SM forward, than in 6 segments); below it, segments bring the launch to
# TARGET_WARPS_PER_SM, more than an SM holds (64 on Hopper/Ampere, fewer by registers; the rest queue, which
# evens out the segments' tails: the stage-1 route of ViM2-T at 1024 px ran 1.09x faster in 32 segments
# than in the 22 of a 64-warp target, and no faster in 128), none shorter than MIN_BLOCKS_PER_SEGMENT time
# blocks (short sequences stay sequential).
SPLIT_BELOW_WARPS_PER_SM = 8
TARGET_WARPS_PER_SM = 96
MIN_BLOCKS_PER_SEGMENT = 4
# The combine over segments is one dependent step per segment: the heuristic stays at or below this many
# (ViM2-T's longest routes at 1024 px take 33); SEGMENTS may force up to MAX_SEGMENTS (the grid's y limit).
MAX_AUTO_SEGMENTS = 256
MAX_SEGMENTS = 65535
# Offset arithmetic of the scan kernels: int32 where every tensor of a launch spans fewer than
# INT32_INDEX_SPAN elements (the margin covers padded lanes), int64 beyond. On sm_90 int32 offsets take
# the forward loop of a low-rank column-major route from 1101 to 886 SASS instructions per block.
# FORCE_INT64_INDEX: always int64 (tests of that path on small tensors).
INT32_INDEX_SPAN = 2**30
FORCE_INT64_INDEX = False

try:  # Triton ships with Linux CUDA builds of torch only; the module must import without it.
    import triton
    import triton.language as tl
except Exception as _exc:  # ImportError, or a broken install raising something else
    triton = None
    tl = None
    _IMPORT_ERROR: Optional[str] = f"triton is not installed or failed to import ({type(_exc).__name__}: {_exc})"
else:
    _IMPORT_ERROR = None

_INTERPRETED = False

if triton is not None:

    # Integer arguments that stay runtime values (no specialisation on 1 or on divisibility by 16; the
    # latter switch exists from Triton 3.2, before which do_not_specialize covers both).
    _RUNTIME_FLAGS = dict(do_not_specialize=["accumulate", "save"])
    if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters:
        _RUNTIME_FLAGS["do_not_specialize_on_alignment"] = ["accumulate", "save"]

    # Triton's own @jit library functions (tl.sum, tl.zeros, tl.sigmoid) are built when triton is
    # imported; if that happened before TRITON_INTERPRET=1 was set they cannot run under the interpreter.
    # The kernels therefore use builtins and these local helpers only.
    @triton.jit
    def _add(x, y):
        return x + y

    @triton.jit
    def _sum(x, axis: tl.constexpr):
        return tl.reduce(x, axis, _add)

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _seq_offsets(t, L2, s1, s2, TWO_LEVEL: tl.constexpr):
        # t: positions (INDEX-typed) in the flattened sequence; two-level ones map t -> (t // L2, t % L2).
        if TWO_LEVEL:
            t1 = t // L2
            off = t1 * s1 + (t - t1 * L2) * s2
        else:
            off = t * s2
        return off

    @triton.jit
    def _load_seq(ptr, row_off, t, mask2, L2, s1, s2, TWO_LEVEL: tl.constexpr, COMPUTE: tl.constexpr):
        """(BLOCK_ROWS, BLOCK_T) tile of a (batch, dim, *Ls) tensor, converted to the compute dtype."""
        off = _seq_offsets(t, L2, s1, s2, TWO_LEVEL)
        return tl.load(ptr + row_off[:, None] + off[None, :], mask=mask2, other=0.0).to(COMPUTE)

    @triton.jit
    def _load_bc(ptr, base, t, row_ok, t_ok, offs_n, n_ok, L2, s_n, s1, s2,
                 TWO_LEVEL: tl.constexpr, SHARED_BC: tl.constexpr, COMPUTE: tl.constexpr):
        """B or C for one time block: (1, BLOCK_N, BLOCK_T) shared by the tile, or per row."""
        off = _seq_offsets(t, L2, s1, s2, TWO_LEVEL)
        if SHARED_BC:
            x2 = tl.load(ptr + base + offs_n[:, None] * s_n + off[None, :],
                         mask=n_ok[:, None] & t_ok[None, :], other=0.0).to(COMPUTE)
            x3 = x2[None, :, :]
        else:
            x3 = tl.load(ptr + base[:, None, None] + offs_n[None, :, None] * s_n + off[None, None, :],
                         mask=row_ok[:, None, None] & n_ok[None, :, None] & t_ok[None, None, :],
                         other=0.0).to(COMPUTE)
        return x3

    @triton.jit
    def _softplus(x):
        # mamba's softplus: x above 20, else log1p(exp(x)) with an accurate log1p (Goldberg's trick).
        e = tl.exp(tl.minimum(x, 20.0))
        w = 1.0 + e
        log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
        return tl.where(x > 20.0, x, log1p_e)

    @triton.jit
    def _delta_tile(w_ptr, pid, row_ok, bidx, didx, dim, R, sd_b, sd_d,
                    BLOCK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, SHARED_BC: tl.constexpr,
                    LOWRANK: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr):
        """Per-row base offsets of the Δ input and, for a low-rank one, the tile's rows of W as
        (BLOCK_ROWS, BLOCK_R, 1); the low-rank input (batch, 1, R, *Ls) is based per batch, like B."""
        offs_r = tl.arange(0, BLOCK_R).to(INDEX)
        if LOWRANK:
            if SHARED_BC:
                base = ((pid * BLOCK_ROWS) // dim) * sd_b
            else:
                base = bidx * sd_b
            W3 = tl.load(w_ptr + didx[:, None] * R + offs_r[None, :], mask=row_ok[:, None] & (offs_r < R)[None, :],
                         other=0.0).to(COMPUTE)[:, :, None]
        else:
            base = bidx * sd_b + didx * sd_d
            W3 = tl.full((BLOCK_ROWS, BLOCK_R, 1), 0.0, COMPUTE)  # unused
        return base, W3

    @triton.jit
    def _step_size(x, mask2, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        if HAS_BIAS:
            x = x + bias[:, None]
        if SOFTPLUS:
            dt = _softplus(x)
        else:
            dt = x
        return x, tl.where(mask2, dt, 0.0)

    @triton.jit
    def _block_dt(dl_ptr, row_dl, t, mask2, bias, L2, sd_1, sd_2,
                  TWO_LEVEL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                  COMPUTE: tl.constexpr):
        """(x, dt): delta (+ bias) and the step size; padding gets dt = 0, i.e. the identity step."""
        x = _load_seq(dl_ptr, row_dl, t, mask2, L2, sd_1, sd_2, TWO_LEVEL, COMPUTE)
        return _step_size(x, mask2, bias, HAS_BIAS, SOFTPLUS)

    @triton.jit
    def _block_delta(dl_ptr, row_dl, W3, t, mask2, row_ok, t_ok, bias, L2, R, sd_d, sd_1, sd_2,
                     BLOCK_R: tl.constexpr, TWO_LEVEL: tl.constexpr, SHARED_BC: tl.constexpr,
                     LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     COMPUTE: tl.constexpr, INDEX: tl.constexpr):
        """_block_dt, or with LOWRANK delta = W @ dts computed here: the block of the low-rank input
        (1 or BLOCK_ROWS, BLOCK_R, BLOCK_T) is loaded like B, sd_d being its stride over R."""
        if LOWRANK:
            offs_r = tl.arange(0, BLOCK_R).to(INDEX)
            dts3 = _load_bc(dl_ptr, row_dl, t, row_ok, t_ok, offs_r, offs_r < R, L2, sd_d, sd_1, sd_2,
                            TWO_LEVEL, SHARED_BC, COMPUTE)
            x, dt = _step_size(_sum(W3 * dts3, axis=1), mask2, bias, HAS_BIAS, SOFTPLUS)
        else:
            x, dt = _block_dt(dl_ptr, row_dl, t, mask2, bias, L2, sd_1, sd_2, TWO_LEVEL, HAS_BIAS, SOFTPLUS, COMPUTE)
        return x, dt

    @triton.jit
    def _combine_linear(a_acc, b_acc, a_cur, b_cur):
        # Affine maps h -> a*h + b composed in scan order (acc first, then cur).
        return a_acc * a_cur, a_cur * b_acc + b_cur

    @triton.jit
    def _combine_adjoint(first_acc, rest_acc, sum_acc, first_cur, rest_cur, sum_cur):
        # Segments of the adjoint recurrence G_s = b_s + a_{s+1} G_{s+1}; the scan runs against the scan
        # order, so `acc` is the segment that follows `cur` in scan order. A segment [s..e] is
        # (a_s, a_{s+1}*...*a_e, sum_k a_{s+1}*...*a_k * b_k).
        link = rest_cur * first_acc
        return first_cur, link * rest_acc, sum_cur + link * sum_acc

    @triton.jit
    def _block_states(a, bx, h_in, REVERSE: tl.constexpr, BLOCK_T: tl.constexpr):
        """States after every step of a block, (BLOCK_ROWS, BLOCK_N, BLOCK_T), from the entering state."""
        pos = tl.arange(0, BLOCK_T)
        if REVERSE:
            first = pos == BLOCK_T - 1
        else:
            first = pos == 0
        # Fold the entering state into the block's first step in scan order.
        bx_in = tl.where(first[None, None, :], a * h_in[:, :, None], 0.0) + bx
        _, hs = tl.associative_scan((a, bx_in), axis=2, combine_fn=_combine_linear, reverse=REVERSE)
        return hs

    @triton.jit
    def _block_adjoint(a, inject, carry, ones, REVERSE: tl.constexpr, BLOCK_T: tl.constexpr):
        """Adjoints G_s of the states after every step of a block, and the adjoint leaving the block
        (w.r.t. the state entering it); `carry` is the adjoint w.r.t. the state after the block."""
        pos = tl.arange(0, BLOCK_T)
        if REVERSE:
            last = pos == 0             # scan-order last step of the block
            first = pos == BLOCK_T - 1  # scan-order first step
        else:
            last = pos == BLOCK_T - 1
            first = pos == 0
        inject = inject + tl.where(last[None, None, :], carry[:, :, None], 0.0)
        _, _, gs = tl.associative_scan((a, ones, inject), axis=2, combine_fn=_combine_adjoint,
                                       reverse=not REVERSE)
        carry_out = _sum(tl.where(first[None, None, :], a * gs, 0.0), axis=2)
        return gs, carry_out

    @triton.jit
    def _across_block(A3, block_dt, carried, reach):
        """A summary's carried (BLOCK_ROWS, BLOCK_N) state or adjoint across one block: decayed by
        exp(A * S_T), S_T = block_dt the block's dt sum, plus the block's own (rows, N, T) contributions."""
        return _sum(tl.exp(A3 * block_dt[:, None, None]), axis=2) * carried + _sum(reach, axis=2)

    @triton.jit
    def _block_range(seg, blocks_per_seg, n_blocks):
        lo = seg * blocks_per_seg
        hi = tl.minimum(lo + blocks_per_seg, n_blocks)
        return lo, hi

    @triton.jit
    def _block_times(i, n_blocks, REVERSE: tl.constexpr, BLOCK_T: tl.constexpr, INDEX: tl.constexpr):
        """Natural block index and the positions (of type INDEX) of the i-th block in scan order."""
        if REVERSE:
            c = n_blocks - 1 - i
        else:
            c = i
        t = c.to(INDEX) * BLOCK_T + tl.arange(0, BLOCK_T).to(INDEX)
        return c, t

    @triton.jit
    def _last_in_scan_order(hs, REVERSE: tl.constexpr, BLOCK_T: tl.constexpr):
        # Padding steps are identities, so the last slot of the block holds the final state even in a
        # partial block.
        pos = tl.arange(0, BLOCK_T)
        if REVERSE:
            sel = pos == 0
        else:
            sel = pos == BLOCK_T - 1
        return _sum(tl.where(sel[None, None, :], hs, 0.0), axis=2)

    # accumulate/save are runtime flags (a uniform branch per block), not constexprs: each constexpr doubles
    # the variants compiled on first use (ViM2-T's training step and inference compiled 32 of this kernel).
    @triton.jit(**_RUNTIME_FLAGS)
    def _scan_fwd_kernel(
        u_ptr, dl_ptr, w_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, h0_ptr, hstart_ptr,
        out_ptr, last_ptr, saved_ptr,
        n_rows, dim, dim_per_group, L, L2, N, R, n_blocks, blocks_per_seg, n_segs, accumulate, save,
        su_b, su_d, su_1, su_2,
        sd_b, sd_d, sd_1, sd_2,
        sz_b, sz_d, sz_1, sz_2,
        sB_b, sB_g, sB_n, sB_1, sB_2,
        sC_b, sC_g, sC_n, sC_1, sC_2,
        so_b, so_d, so_1, so_2,
        BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
        SHARED_BC: tl.constexpr, TWO_LEVEL: tl.constexpr, REVERSE: tl.constexpr, SPLIT: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
        SOFTPLUS: tl.constexpr, LOWRANK: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr,
    ):
        # Program (tile of rows, segment of time blocks); without SPLIT there is one segment.
        # LOWRANK: dl_ptr is the (batch, 1, R, *Ls) low-rank input and w_ptr the (dim, R) projection.
        # accumulate != 0 adds to out instead of overwriting it; save != 0 writes the block checkpoints.
        pid = tl.program_id(0).to(INDEX)
        seg = tl.program_id(1)
        rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(INDEX)
        row_ok = rows < n_rows
        bidx = rows // dim
        didx = rows - bidx * dim
        gidx = didx // dim_per_group
        offs_n = tl.arange(0, BLOCK_N).to(INDEX)
        n_ok = offs_n < N
        rn_mask = row_ok[:, None] & n_ok[None, :]
        A3 = tl.load(A_ptr + didx[:, None] * N + offs_n[None, :], mask=rn_mask, other=0.0).to(COMPUTE)[:, :, None]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + didx, mask=row_ok, other=0.0).to(COMPUTE)
        else:
            bias = tl.full((BLOCK_ROWS,), 0.0, COMPUTE)
        if HAS_D:
            Dv = tl.load(D_ptr + didx, mask=row_ok, other=0.0).to(COMPUTE)
        if SPLIT:
            h = tl.load(hstart_ptr + (rows[:, None] * n_segs + seg) * N + offs_n[None, :],
                        mask=rn_mask, other=0.0).to(COMPUTE)
        elif HAS_H0:
            h = tl.load(h0_ptr + rows[:, None] * N + offs_n[None, :], mask=rn_mask, other=0.0).to(COMPUTE)
        else:
            h = tl.full((BLOCK_ROWS, BLOCK_N), 0.0, COMPUTE)
        row_u = bidx * su_b + didx * su_d
        row_z = bidx * sz_b + didx * sz_d
        row_o = bidx * so_b + didx * so_d
        if SHARED_BC:
            # The whole tile lies in one (batch, group): B/C are loaded once and broadcast over rows.
            row0 = pid * BLOCK_ROWS
            b0 = row0 // dim
            g0 = (row0 - b0 * dim) // dim_per_group
            B_base = b0 * sB_b + g0 * sB_g
            C_base = b0 * sC_b + g0 * sC_g
        else:
            B_base = bidx * sB_b + gidx * sB_g
            C_base = bidx * sC_b + gidx * sC_g
        row_dl, W3 = _delta_tile(w_ptr, pid, row_ok, bidx, didx, dim, R, sd_b, sd_d,
                                 BLOCK_ROWS, BLOCK_R, SHARED_BC, LOWRANK, COMPUTE, INDEX)
        lo, hi = _block_range(seg, blocks_per_seg, n_blocks)
        for i in range(lo, hi):
            c, t = _block_times(i, n_blocks, REVERSE, BLOCK_T, INDEX)
            t_ok = t < L
            mask2 = row_ok[:, None] & t_ok[None, :]
            if save:
                tl.store(saved_ptr + (rows[:, None] * n_blocks + c) * N + offs_n[None, :], h, mask=rn_mask)
            x, dt = _block_delta(dl_ptr, row_dl, W3, t, mask2, row_ok, t_ok, bias, L2, R, sd_d, sd_1, sd_2,
                                 BLOCK_R, TWO_LEVEL, SHARED_BC, LOWRANK, HAS_BIAS, SOFTPLUS, COMPUTE, INDEX)
            uu = _load_seq(u_ptr, row_u, t, mask2, L2, su_1, su_2, TWO_LEVEL, COMPUTE)
            B3 = _load_bc(B_ptr, B_base, t, row_ok, t_ok, offs_n, n_ok, L2, sB_n, sB_1, sB_2,
                          TWO_LEVEL, SHARED_BC, COMPUTE)
            a = tl.exp(dt[:, None, :] * A3)
            hs = _block_states(a, (dt * uu)[:, None, :] * B3, h, REVERSE, BLOCK_T)
            C3 = _load_bc(C_ptr, C_base, t, row_ok, t_ok, offs_n, n_ok, L2, sC_n, sC_1, sC_2,
                          TWO_LEVEL, SHARED_BC, COMPUTE)
            y = _sum(C3 * hs, axis=1)
            if HAS_D:
                y = y + Dv[:, None] * uu
            if HAS_Z:
                zz = _load_seq(z_ptr, row_z, t, mask2, L2, sz_1, sz_2, TWO_LEVEL, COMPUTE)
                y = y * (zz * _sigmoid(zz))
            o_ptrs = out_ptr + row_o[:, None] + _seq_offsets(t, L2, so_1, so_2, TWO_LEVEL)[None, :]
            if accumulate:
                y = y + tl.load(o_ptrs, mask=mask2, other=0.0).to(COMPUTE)
            tl.store(o_ptrs, y, mask=mask2)
            h = _last_in_scan_order(hs, REVERSE, BLOCK_T)
        tl.store(last_ptr + rows[:, None] * N + offs_n[None, :], h, mask=rn_mask & (seg == n_segs - 1))

    @triton.jit
    def _fwd_summary_kernel(
        u_ptr, dl_ptr, w_ptr, A_ptr, B_ptr, bias_ptr, hloc_ptr, sdt_ptr,
        n_rows, dim, dim_per_group, L, L2, N, R, n_blocks, blocks_per_seg, n_segs,
        su_b, su_d, su_1, su_2,
        sd_b, sd_d, sd_1, sd_2,
        sB_b, sB_g, sB_n, sB_1, sB_2,
        BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
        SHARED_BC: tl.constexpr, TWO_LEVEL: tl.constexpr, REVERSE: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LOWRANK: tl.constexpr, COMPUTE: tl.constexpr,
        INDEX: tl.constexpr,
    ):
        # For segment `seg` (all but the last): the state it leaves when entered with zero, and the sum
        # of its step sizes (its decay is exp(A * sum dt)). Only each block's final state is needed, so
        # no per-step states are scanned: step t's input reaches the block's end decayed by exp(A * R_t),
        # R_t the sum of the dt that follow t in scan order (a scan against the scan order: no cancellation
        # of a difference of running sums), and h_end = exp(A * S_T) h + sum_t exp(A * R_t) dt_t u_t B_t
        # with S_T the block's dt sum. One scan of dt per row replaces the (a, b) scan of every state
        # (sm_90 PTX per block: 587 -> 342 instructions). For dt >= 0 every exponent is <= 0.
        pid = tl.program_id(0).to(INDEX)
        seg = tl.program_id(1)
        rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(INDEX)
        row_ok = rows < n_rows
        bidx = rows // dim
        didx = rows - bidx * dim
        offs_n = tl.arange(0, BLOCK_N).to(INDEX)
        n_ok = offs_n < N
        rn_mask = row_ok[:, None] & n_ok[None, :]
        A3 = tl.load(A_ptr + didx[:, None] * N + offs_n[None, :], mask=rn_mask, other=0.0).to(COMPUTE)[:, :, None]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + didx, mask=row_ok, other=0.0).to(COMPUTE)
        else:
            bias = tl.full((BLOCK_ROWS,), 0.0, COMPUTE)
        row_u = bidx * su_b + didx * su_d
        if SHARED_BC:
            row0 = pid * BLOCK_ROWS
            b0 = row0 // dim
            B_base = b0 * sB_b + ((row0 - b0 * dim) // dim_per_group) * sB_g
        else:
            B_base = bidx * sB_b + (didx // dim_per_group) * sB_g
        row_dl, W3 = _delta_tile(w_ptr, pid, row_ok, bidx, didx, dim, R, sd_b, sd_d,
                                 BLOCK_ROWS, BLOCK_R, SHARED_BC, LOWRANK, COMPUTE, INDEX)
        h = tl.full((BLOCK_ROWS, BLOCK_N), 0.0, COMPUTE)
        sdt = tl.full((BLOCK_ROWS,), 0.0, COMPUTE)
        lo, hi = _block_range(seg, blocks_per_seg, n_blocks)
        for i in range(lo, hi):
            c, t = _block_times(i, n_blocks, REVERSE, BLOCK_T, INDEX)
            t_ok = t < L
            mask2 = row_ok[:, None] & t_ok[None, :]
            x, dt = _block_delta(dl_ptr, row_dl, W3, t, mask2, row_ok, t_ok, bias, L2, R, sd_d, sd_1, sd_2,
                                 BLOCK_R, TWO_LEVEL, SHARED_BC, LOWRANK, HAS_BIAS, SOFTPLUS, COMPUTE, INDEX)
            uu = _load_seq(u_ptr, row_u, t, mask2, L2, su_1, su_2, TWO_LEVEL, COMPUTE)
            B3 = _load_bc(B_ptr, B_base, t, row_ok, t_ok, offs_n, n_ok, L2, sB_n, sB_1, sB_2,
                          TWO_LEVEL, SHARED_BC, COMPUTE)
            to_end = tl.associative_scan(dt, axis=1, combine_fn=_add, reverse=not REVERSE) - dt  # R_t
            block_dt = _sum(dt, axis=1)  # S_T
            reach = tl.exp(A3 * to_end[:, None, :]) * ((dt * uu)[:, None, :] * B3)
            h = _across_block(A3, block_dt, h, reach)
            sdt += block_dt
        tl.store(hloc_ptr + (rows[:, None] * n_segs + seg) * N + offs_n[None, :], h, mask=rn_mask)
        tl.store(sdt_ptr + rows * n_segs + seg, sdt, mask=row_ok)

    @triton.jit
    def _combine_segments_kernel(
        start_ptr, loc_ptr, sdt_ptr, A_ptr, out_ptr, n_rows, dim, N, n_segs,
        BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_START: tl.constexpr, BACKWARD: tl.constexpr, COMPUTE: tl.constexpr,
    ):
        # Sequential over segments, per row: forward, out[j] = state entering segment j; backward
        # (segments in reverse), out[j] = adjoint of the state leaving segment j.
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        row_ok = rows < n_rows
        didx = rows % dim
        offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
        rn_mask = row_ok[:, None] & (offs_n < N)[None, :]
        A2 = tl.load(A_ptr + didx[:, None] * N + offs_n[None, :], mask=rn_mask, other=0.0).to(COMPUTE)
        if HAS_START:
            h = tl.load(start_ptr + rows[:, None] * N + offs_n[None, :], mask=rn_mask, other=0.0).to(COMPUTE)
        else:
            h = tl.full((BLOCK_ROWS, BLOCK_N), 0.0, COMPUTE)
        for k in range(n_segs):
            if BACKWARD:
                j = n_segs - 1 - k
            else:
                j = k
            tl.store(out_ptr + (rows[:, None] * n_segs + j) * N + offs_n[None, :], h, mask=rn_mask)
            # The summary of the segment processed last is never written: its buffers stay zero and the
            # update below is then harmless (its result is not stored).
            s = tl.load(sdt_ptr + rows * n_segs + j, mask=row_ok, other=0.0).to(COMPUTE)
            loc = tl.load(loc_ptr + (rows[:, None] * n_segs + j) * N + offs_n[None, :],
                          mask=rn_mask, other=0.0).to(COMPUTE)
            h = tl.exp(A2 * s[:, None]) * h + loc

    @triton.jit
    def _bwd_summary_kernel(
        dout_ptr, dl_ptr, z_ptr, A_ptr, C_ptr, bias_ptr, gloc_ptr, sdt_ptr,
        n_rows, dim, dim_per_group, L, L2, N, n_blocks, blocks_per_seg, n_segs, seg_offset,
        sg_b, sg_d, sg_1, sg_2,
        sd_b, sd_d, sd_1, sd_2,
        sz_b, sz_d, sz_1, sz_2,
        sC_b, sC_g, sC_n, sC_1, sC_2,
        BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
        SHARED_BC: tl.constexpr, TWO_LEVEL: tl.constexpr, REVERSE: tl.constexpr,
        HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, COMPUTE: tl.constexpr,
        INDEX: tl.constexpr,
    ):
        # For segment `seg` (all but the first): the adjoint of the state entering it when the adjoint
        # of the state leaving it is zero, and the sum of its step sizes. Needs no forward state. As in
        # _fwd_summary_kernel no per-step adjoints are scanned: with S_t the block's running sum of dt in
        # scan order (step t included), the adjoint entering the block is
        # exp(A * S_T) carry + sum_t exp(A * S_t) C_t dy_t (exponents <= 0).
        pid = tl.program_id(0).to(INDEX)
        seg = tl.program_id(1) + seg_offset
        rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(INDEX)
        row_ok = rows < n_rows
        bidx = rows // dim
        didx = rows - bidx * dim
        offs_n = tl.arange(0, BLOCK_N).to(INDEX)
        n_ok = offs_n < N
        rn_mask = row_ok[:, None] & n_ok[None, :]
        A3 = tl.load(A_ptr + didx[:, None] * N + offs_n[None, :], mask=rn_mask, other=0.0).to(COMPUTE)[:, :, None]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + didx, mask=row_ok, other=0.0).to(COMPUTE)
        else:
            bias = tl.full((BLOCK_ROWS,), 0.0, COMPUTE)
        row_g = bidx * sg_b + didx * sg_d
        row_dl = bidx * sd_b + didx * sd_d
        row_z = bidx * sz_b + didx * sz_d
        if SHARED_BC:
            row0 = pid * BLOCK_ROWS
            b0 = row0 // dim
            C_base = b0 * sC_b + ((row0 - b0 * dim) // dim_per_group) * sC_g
        else:
            C_base = bidx * sC_b + (didx // dim_per_group) * sC_g
        carry = tl.full((BLOCK_ROWS, BLOCK_N), 0.0, COMPUTE)
        sdt = tl.full((BLOCK_ROWS,), 0.0, COMPUTE)
        lo, hi = _block_range(seg, blocks_per_seg, n_blocks)
        for k in range(lo, hi):
            c, t = _block_times(hi - 1 - (k - lo), n_blocks, REVERSE, BLOCK_T, INDEX)
            t_ok = t < L
            mask2 = row_ok[:, None] & t_ok[None, :]
            x, dt = _block_dt(dl_ptr, row_dl, t, mask2, bias, L2, sd_1, sd_2,
                              TWO_LEVEL, HAS_BIAS, SOFTPLUS, COMPUTE)
            gy = _load_seq(dout_ptr, row_g, t, mask2, L2, sg_1, sg_2, TWO_LEVEL, COMPUTE)
            if HAS_Z:
                zz = _load_seq(z_ptr, row_z, t, mask2, L2, sz_1, sz_2, TWO_LEVEL, COMPUTE)
                gy = gy * zz * _sigmoid(zz)
            C3 = _load_bc(C_ptr, C_base, t, row_ok, t_ok, offs_n, n_ok, L2, sC_n, sC_1, sC_2,
                          TWO_LEVEL, SHARED_BC, COMPUTE)
            running = tl.associative_scan(dt, axis=1, combine_fn=_add, reverse=REVERSE)  # S_t
            block_dt = _sum(dt, axis=1)  # S_T
            reach = tl.exp(A3 * running[:, None, :]) * (gy[:, None, :] * C3)
            carry = _across_block(A3, block_dt, carry, reach)
            sdt += block_dt
        tl.store(gloc_ptr + (rows[:, None] * n_segs + seg) * N + offs_n[None, :], carry, mask=rn_mask)
        tl.store(sdt_ptr + rows * n_segs + seg, sdt, mask=row_ok)

    @triton.jit
    def _scan_bwd_kernel(
        dout_ptr, dlast_ptr, cend_ptr, u_ptr, dl_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, saved_ptr,
        du_ptr, ddl_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
        n_rows, dim, dim_per_group, G, L, L2, N, n_blocks, blocks_per_seg, n_segs,
        sg_b, sg_d, sg_1, sg_2,
        su_b, su_d, su_1, su_2,
        sd_b, sd_d, sd_1, sd_2,
        sz_b, sz_d, sz_1, sz_2,
        sB_b, sB_g, sB_n, sB_1, sB_2,
        sC_b, sC_g, sC_n, sC_1, sC_2,
        BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
        SHARED_BC: tl.constexpr, BC_PARTIALS: tl.constexpr, BC_ATOMIC: tl.constexpr,
        TWO_LEVEL: tl.constexpr, REVERSE: tl.constexpr, SPLIT: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DLAST: tl.constexpr,
        SOFTPLUS: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr,
    ):
        pid = tl.program_id(0).to(INDEX)
        seg = tl.program_id(1)
        rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(INDEX)
        row_ok = rows < n_rows
        bidx = rows // dim
        didx = rows - bidx * dim
        gidx = didx // dim_per_group
        offs_n = tl.arange(0, BLOCK_N).to(INDEX)
        n_ok = offs_n < N
        rn_mask = row_ok[:, None] & n_ok[None, :]
        A3 = tl.load(A_ptr + didx[:, None] * N + offs_n[None, :], mask=rn_mask, other=0.0).to(COMPUTE)[:, :, None]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + didx, mask=row_ok, other=0.0).to(COMPUTE)
        else:
            bias = tl.full((BLOCK_ROWS,), 0.0, COMPUTE)
        if HAS_D:
            Dv = tl.load(D_ptr + didx, mask=row_ok, other=0.0).to(COMPUTE)
        if SPLIT:
            carry = tl.load(cend_ptr + (rows[:, None] * n_segs + seg) * N + offs_n[None, :],
                            mask=rn_mask, other=0.0).to(COMPUTE)
        elif HAS_DLAST:
            carry = tl.load(dlast_ptr + rows[:, None] * N + offs_n[None, :], mask=rn_mask, other=0.0).to(COMPUTE)
        else:
            carry = tl.full((BLOCK_ROWS, BLOCK_N), 0.0, COMPUTE)
        row_g = bidx * sg_b + didx * sg_d
        row_u = bidx * su_b + didx * su_d
        row_dl = bidx * sd_b + didx * sd_d
        row_z = bidx * sz_b + didx * sz_d
        if SHARED_BC:
            row0 = pid * BLOCK_ROWS
            b0 = row0 // dim
            g0 = (row0 - b0 * dim) // dim_per_group
            B_base = b0 * sB_b + g0 * sB_g
            C_base = b0 * sC_b + g0 * sC_g
            if BC_PARTIALS:
                slot = pid  # tiles never straddle a (batch, group): tile index = partial slot
            else:
                slot = b0 * G + g0
        else:
            B_base = bidx * sB_b + gidx * sB_g
            C_base = bidx * sC_b + gidx * sC_g
            slot = bidx * G + gidx
        dA_acc = tl.full((BLOCK_ROWS, BLOCK_N), 0.0, COMPUTE)
        dD_acc = tl.full((BLOCK_ROWS,), 0.0, COMPUTE)
        dbias_acc = tl.full((BLOCK_ROWS,), 0.0, COMPUTE)
        ones = tl.full((BLOCK_ROWS, BLOCK_N, BLOCK_T), 1.0, COMPUTE)
        lo, hi = _block_range(seg, blocks_per_seg, n_blocks)
        for k in range(lo, hi):
            # Blocks of the segment in reverse scan order.
            c, t = _block_times(hi - 1 - (k - lo), n_blocks, REVERSE, BLOCK_T, INDEX)
            t_ok = t < L
            mask2 = row_ok[:, None] & t_ok[None, :]
            h_in = tl.load(saved_ptr + (rows[:, None] * n_blocks + c) * N + offs_n[None, :],
                           mask=rn_mask, other=0.0).to(COMPUTE)
            x, dt = _block_dt(dl_ptr, row_dl, t, mask2, bias, L2, sd_1, sd_2,
                              TWO_LEVEL, HAS_BIAS, SOFTPLUS, COMPUTE)
            uu = _load_seq(u_ptr, row_u, t, mask2, L2, su_1, su_2, TWO_LEVEL, COMPUTE)
            B3 = _load_bc(B_ptr, B_base, t, row_ok, t_ok, offs_n, n_ok, L2, sB_n, sB_1, sB_2,
                          TWO_LEVEL, SHARED_BC, COMPUTE)
            C3 = _load_bc(C_ptr, C_base, t, row_ok, t_ok, offs_n, n_ok, L2, sC_n, sC_1, sC_2,
                          TWO_LEVEL, SHARED_BC, COMPUTE)
            a = tl.exp(dt[:, None, :] * A3)
            bx = (dt * uu)[:, None, :] * B3
            hs = _block_states(a, bx, h_in, REVERSE, BLOCK_T)  # recomputed from the block's checkpoint
            gy = _load_seq(dout_ptr, row_g, t, mask2, L2, sg_1, sg_2, TWO_LEVEL, COMPUTE)
            out_off = rows[:, None] * L + t[None, :]
            if HAS_Z:
                y = _sum(C3 * hs, axis=1)
                if HAS_D:
                    y = y + Dv[:, None] * uu
                zz = _load_seq(z_ptr, row_z, t, mask2, L2, sz_1, sz_2, TWO_LEVEL, COMPUTE)
                sig_z = _sigmoid(zz)
                tl.store(dz_ptr + out_off, gy * y * sig_z * (1.0 + zz * (1.0 - sig_z)), mask=mask2)
                gy = gy * zz * sig_z
            gs, carry = _block_adjoint(a, gy[:, None, :] * C3, carry, ones, REVERSE, BLOCK_T)
            dC = gy[:, None, :] * hs
            dB = gs * (dt * uu)[:, None, :]
            gB = _sum(gs * B3, axis=1)
            decayed = gs * (hs - bx)  # G_s * a_s * h_{s-1} (no previous state needed): d/d log(a_s)
            du = gB * dt
            if HAS_D:
                du = du + gy * Dv[:, None]
                dD_acc += _sum(gy * uu, axis=1)
            ddt = gB * uu + _sum(decayed * A3, axis=1)
            dA_acc += _sum(decayed * dt[:, None, :], axis=2)
            if SOFTPLUS:
                ddt = ddt * tl.where(x > 20.0, 1.0, _sigmoid(x))
            ddt = tl.where(mask2, ddt, 0.0)
            dbias_acc += _sum(ddt, axis=1)
            tl.store(du_ptr + out_off, du, mask=mask2)
            tl.store(ddl_ptr + out_off, ddt, mask=mask2)
            if SHARED_BC:
                dB2 = _sum(dB, axis=0)
                dC2 = _sum(dC, axis=0)
                bc_off = (slot * N + offs_n[:, None]) * L + t[None, :]
                bc_mask = n_ok[:, None] & t_ok[None, :]
                if BC_ATOMIC:
                    tl.atomic_add(dB_ptr + bc_off, dB2, mask=bc_mask)
                    tl.atomic_add(dC_ptr + bc_off, dC2, mask=bc_mask)
                else:
                    tl.store(dB_ptr + bc_off, dB2, mask=bc_mask)
                    tl.store(dC_ptr + bc_off, dC2, mask=bc_mask)
            else:
                bc_off = (slot[:, None, None] * N + offs_n[None, :, None]) * L + t[None, None, :]
                bc_mask = row_ok[:, None, None] & n_ok[None, :, None] & t_ok[None, None, :]
                if BC_ATOMIC:
                    tl.atomic_add(dB_ptr + bc_off, dB, mask=bc_mask)
                    tl.atomic_add(dC_ptr + bc_off, dC, mask=bc_mask)
                else:
                    tl.store(dB_ptr + bc_off, dB, mask=bc_mask)
                    tl.store(dC_ptr + bc_off, dC, mask=bc_mask)
        tl.store(dh0_ptr + rows[:, None] * N + offs_n[None, :], carry, mask=rn_mask & (seg == 0))
        part = rows * n_segs + seg  # per (row, segment) partials, summed on the host
        tl.store(dA_ptr + part[:, None] * N + offs_n[None, :], dA_acc, mask=rn_mask)
        tl.store(dD_ptr + part, dD_acc, mask=row_ok)
        tl.store(dbias_ptr + part, dbias_acc, mask=row_ok)

    # The interpreter is chosen when the kernels are decorated (import time of this module).
    _INTERPRETED = type(_scan_fwd_kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------

def unavailable_reason(device) -> Optional[str]:
    """None when the Triton kernels can run on ``device`` in this process, else a one-line reason."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    device = torch.device(device)
    if device.type == "cuda":
        if _INTERPRETED:
            return None  # the interpreter copies CUDA tensors to the host and back
        if not torch.cuda.is_available():
            return "CUDA is not available in this process (torch.cuda.is_available() is False)"
        return None
    if device.type == "cpu":
        if _INTERPRETED:
            return None
        if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
            return ("TRITON_INTERPRET=1 was set after vim2_kernels.selective_scan.triton_backend was "
                    "imported; set it before importing to run the Triton kernels on CPU")
        return "CUDA tensors required; set TRITON_INTERPRET=1 before importing vim2_kernels to run on CPU (slow)"
    return f"the triton backend runs on CUDA (or CPU with TRITON_INTERPRET=1), not on {device.type!r} tensors"


def _next_power_of_2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def _block_t(seqlen: int) -> int:
    chunk = int(CHUNK_SIZE)
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"triton_backend.CHUNK_SIZE must be a power of two, got {CHUNK_SIZE!r}")
    return max(1, min(chunk, _next_power_of_2(max(int(seqlen), 1))))


def saved_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """dtype of ``saved``: the state dtype (float64 for float64 inputs, else float32)."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def saved_shape(batch: int, dim: int, seqlen: int, d_state: int) -> Tuple[int, ...]:
    """Shape of ``saved``: the state entering every time block, (batch, dim, n_blocks, d_state)."""
    block_t = _block_t(seqlen)
    return (batch, dim, -(-int(seqlen) // block_t), d_state)


def _seq_strides(x: torch.Tensor, lead: int, Ls: Sequence[int]) -> Tuple[int, int, bool]:
    """(outer stride, inner stride, needs two levels) of the sequence axes starting at ``lead``."""
    if len(Ls) == 1:
        return 0, x.stride(lead), False
    L1, L2 = Ls
    s1, s2 = x.stride(lead), x.stride(lead + 1)
    if L2 == 1:
        s2 = s1
    if L1 == 1:
        s1 = L2 * s2
    return s1, s2, s1 != L2 * s2


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _pick_block_rows(n_rows: int, dim_per_group: int, block_n: int, block_t: int,
                     device: torch.device, backward: bool) -> int:
    if BLOCK_ROWS is not None:
        block_rows = int(BLOCK_ROWS)
        if block_rows < 1 or block_rows & (block_rows - 1):
            raise ValueError(f"triton_backend.BLOCK_ROWS must be a power of two, got {BLOCK_ROWS!r}")
        return block_rows
    per_row = block_n * block_t
    if _INTERPRETED:
        # Interpreted programs run one after another with numpy ops over the whole tile: few, big tiles.
        block_rows = max(1, 8192 // per_row)
    else:
        # Register budget for the (rows, N, T) tiles; backward keeps about twice as many alive.
        block_rows = max(1, (1024 if backward else 2048) // per_row)
        # Keep every SM busy with a few programs when rows are scarce.
        while block_rows > 1 and -(-n_rows // block_rows) < 4 * _num_sms(device):
            block_rows //= 2
    block_rows = min(block_rows, _next_power_of_2(n_rows))
    # Prefer tiles inside one (batch, group) so B/C are shared: shrink to a divisor of dim_per_group
    # (pointless when every row is its own group, as in the channel mixer).
    if dim_per_group > 1 and dim_per_group % block_rows:
        divisor = dim_per_group & -dim_per_group  # largest power of two dividing dim_per_group
        if divisor * 4 >= block_rows:
            block_rows = divisor
    return block_rows


def _pick_segments(n_tiles: int, n_blocks: int, num_warps: int, device: torch.device) -> Tuple[int, int]:
    """(segments, blocks per segment): split L across programs when row tiles alone cannot fill the GPU.

    The time blocks of one program are a dependent chain whose loads wait on memory, so a launch of few
    programs is latency-bound. Segments trade that for a summary pass over the whole sequence (about as
    costly as the main pass), so they pay only where the row tiles leave the SMs nearly idle: fewer than
    ``SPLIT_BELOW_WARPS_PER_SM`` warps each. Then the split aims at ``TARGET_WARPS_PER_SM`` warps on every
    SM; beyond two segments more cost only a longer sequential combine over (rows, segments, N) state.
    """
    if n_blocks == 0 or n_tiles == 0:  # empty sequence or no rows: one (empty) segment
        return 1, 1
    if SEGMENTS is not None:
        wanted = max(1, int(SEGMENTS))
    elif _INTERPRETED:
        wanted = 1
    else:
        num_warps, sms = max(1, num_warps), _num_sms(device)
        if n_tiles * num_warps >= SPLIT_BELOW_WARPS_PER_SM * sms:
            wanted = 1
        else:
            target = -(-TARGET_WARPS_PER_SM * sms // num_warps)  # programs
            wanted = min(-(-target // n_tiles), n_blocks // MIN_BLOCKS_PER_SEGMENT, MAX_AUTO_SEGMENTS)
    wanted = max(1, min(wanted, n_blocks, MAX_SEGMENTS))
    blocks_per_seg = -(-n_blocks // wanted)
    return -(-n_blocks // blocks_per_seg), blocks_per_seg


def _num_warps(elements: int) -> int:
    return max(1, min(8, elements // 256))


def _compute_dtype(u: torch.Tensor):
    if u.dtype == torch.float64:
        return torch.float64, tl.float64
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"triton backend: u must be float32/float16/bfloat16/float64, got {u.dtype}")
    return torch.float32, tl.float32


def _small(x: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if x is None else x.to(dtype).contiguous()


class _Geometry:
    """Shapes, strides and tiling of one launch (forward and backward tile independently)."""

    def __init__(self, u, B, A, backward: bool):
        self.batch, self.dim = u.shape[0], u.shape[1]
        self.Ls = tuple(u.shape[2:])
        if len(self.Ls) not in (1, 2):
            raise ValueError("triton backend: u must be (batch, dim, L) or (batch, dim, L1, L2), "
                             f"got {tuple(u.shape)}")
        self.L = math.prod(self.Ls)
        self.L2 = self.Ls[-1]
        self.G, self.N = B.shape[1], B.shape[2]
        if tuple(A.shape) != (self.dim, self.N):
            raise ValueError(f"triton backend: A must be (dim, N) = {(self.dim, self.N)}, got {tuple(A.shape)}")
        self.dim_per_group = self.dim // self.G
        self.n_rows = self.batch * self.dim
        self.block_t = _block_t(self.L)
        self.n_blocks = -(-self.L // self.block_t)
        self.block_n = _next_power_of_2(self.N)
        self.block_rows = _pick_block_rows(self.n_rows, self.dim_per_group, self.block_n, self.block_t,
                                           u.device, backward)
        self.shared_bc = self.dim_per_group % self.block_rows == 0
        self.n_tiles = -(-self.n_rows // self.block_rows)
        self.num_warps = (int(NUM_WARPS) if NUM_WARPS is not None else
                          _num_warps((2 if backward else 1) * self.block_rows * self.block_n * self.block_t))
        self.n_segs, self.blocks_per_seg = _pick_segments(self.n_tiles, self.n_blocks, self.num_warps, u.device)
        self.two_level = False

    @property
    def grid(self):
        return (self.n_tiles, self.n_segs)

    def _seq(self, x: torch.Tensor, lead: int) -> Tuple[int, int]:
        s1, s2, two = _seq_strides(x, lead, self.Ls)
        self.two_level |= two
        return s1, s2

    def bc_strides(self, x: torch.Tensor) -> list:
        return [x.stride(0), x.stride(1), x.stride(2), *self._seq(x, 3)]

    def seq_strides(self, x: Optional[torch.Tensor]) -> list:
        if x is None:
            return [0, 0, 0, 0]
        return [x.stride(0), x.stride(1), *self._seq(x, 2)]

    def constexprs(self, **flags):
        return dict(BLOCK_ROWS=self.block_rows, BLOCK_N=self.block_n, BLOCK_T=self.block_t,
                    SHARED_BC=self.shared_bc, TWO_LEVEL=self.two_level, num_warps=self.num_warps, **flags)


def _span(t: Optional[torch.Tensor]) -> int:
    """Elements between a tensor's first and last addressed element, inclusive (0 when empty)."""
    if t is None or t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _index_type(*tensors: Optional[torch.Tensor]):
    """The kernels' offset type for a launch over ``tensors`` (see INT32_INDEX_SPAN)."""
    if FORCE_INT64_INDEX or max(map(_span, tensors), default=0) >= INT32_INDEX_SPAN:
        return tl.int64
    return tl.int32


def _check_ready(u: torch.Tensor) -> None:
    reason = unavailable_reason(u.device)
    if reason is not None:
        raise RuntimeError(f"triton selective-scan backend unavailable: {reason}")


def _combine_segments(geo: _Geometry, start, loc, sdt, A_c, backward: bool, compute):
    out = torch.empty_like(loc)
    block_rows = max(1, min(128, _next_power_of_2(geo.n_rows)))
    _combine_segments_kernel[(-(-geo.n_rows // block_rows),)](
        start if start is not None else A_c, loc, sdt, A_c, out, geo.n_rows, geo.dim, geo.N, geo.n_segs,
        BLOCK_ROWS=block_rows, BLOCK_N=geo.block_n, HAS_START=start is not None, BACKWARD=backward,
        COMPUTE=compute, num_warps=_num_warps(block_rows * geo.block_n))
    return out


def scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus: bool, reverse: bool):
    """Selective scan forward.

    u, delta, z: (batch, dim, *Ls) fp32/fp16/bf16/fp64, any strides; A: (dim, N);
    B, C: (batch, G, N, *Ls), any strides; D, delta_bias: (dim,) or None; initial_state: (batch, dim, N)
    or None. Returns out (batch, dim, *Ls) contiguous in u.dtype, last_state (batch, dim, N) float32
    (float64 for float64 inputs), saved (batch, dim, n_blocks, N) in the same dtype as last_state.
    """
    _check_ready(u)
    acc_dtype, _ = _compute_dtype(u)
    geo = _Geometry(u, B, A, backward=False)
    out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    last_state = torch.empty((geo.batch, geo.dim, geo.N), dtype=acc_dtype, device=u.device)
    saved = torch.empty((geo.batch, geo.dim, geo.n_blocks, geo.N), dtype=acc_dtype, device=u.device)
    _forward(geo, out, last_state, saved, u, delta, None, A, B, C, D, z, delta_bias, initial_state,
             delta_softplus, reverse, accumulate=False)
    return out, last_state, saved


def scan_forward_lowrank(out, u, dts, dt_weight, A, B, C, D, delta_bias, delta_softplus: bool, reverse: bool,
                         accumulate: bool, saved=None) -> None:
    """Forward with the Δ projection computed in the kernel, writing (or adding) into ``out``.

    Same contract as ``cpu_backend.scan_forward_lowrank``: u and out (batch, dim, *Ls), out float32
    (float64 for float64 u; any strides, e.g. a route's view of a channels-last map); dts
    (batch, 1, R, *Ls) and B, C (batch, G, N, *Ls), any strides; dt_weight (dim, R):
    Δ[b, d, t] = dts[b, 0, :, t] . dt_weight[d]. ``saved``: None (no backward will follow) or a contiguous
    ``saved_shape(...)`` tensor of ``saved_dtype(u.dtype)`` that receives the block checkpoints
    ``scan_backward`` needs (with Δ materialised for that route).
    """
    _check_ready(u)
    acc_dtype, _ = _compute_dtype(u)
    geo = _Geometry(u, B, A, backward=False)
    rank = dt_weight.shape[1] if dt_weight.dim() == 2 else 0
    if tuple(dt_weight.shape) != (geo.dim, rank) or not 1 <= rank <= MAX_DT_RANK:
        raise ValueError(f"triton backend: dt_weight must be (dim, R) = ({geo.dim}, R) with 1 <= R <= "
                         f"{MAX_DT_RANK}, got {tuple(dt_weight.shape)}")
    if dts.dim() != 3 + len(geo.Ls) or tuple(dts.shape) != (geo.batch, 1, rank, *geo.Ls):
        raise ValueError(f"triton backend: dts must be (batch, 1, R, *Ls) = {(geo.batch, 1, rank, *geo.Ls)}, "
                         f"got {tuple(dts.shape)}")
    if tuple(out.shape) != tuple(u.shape) or out.dtype != acc_dtype:
        raise ValueError(f"triton backend: out must be {acc_dtype} of shape {tuple(u.shape)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    expected = (geo.batch, geo.dim, geo.n_blocks, geo.N)
    if saved is not None and (tuple(saved.shape) != expected or saved.dtype != acc_dtype
                              or not saved.is_contiguous()):
        raise ValueError(f"triton backend: saved must be a contiguous {acc_dtype} tensor of shape {expected}, "
                         f"got {saved.dtype} {tuple(saved.shape)}")
    last_state = torch.empty((geo.batch, geo.dim, geo.N), dtype=acc_dtype, device=u.device)
    _forward(geo, out, last_state, saved, u, dts, dt_weight.to(acc_dtype).contiguous(), A, B, C, D, None,
             delta_bias, None, delta_softplus, reverse, accumulate)


def _forward(geo: _Geometry, out, last_state, saved, u, delta, dt_weight, A, B, C, D, z, delta_bias,
             initial_state, delta_softplus: bool, reverse: bool, accumulate: bool) -> None:
    """Launches of one forward: ``delta`` is the full Δ, or with ``dt_weight`` its low-rank input."""
    acc_dtype, compute = _compute_dtype(u)
    batch, dim, N = geo.batch, geo.dim, geo.N
    if geo.n_rows == 0 or geo.L == 0 or N == 0:
        if not accumulate:
            out.zero_()
        if saved is not None:
            saved.zero_()
        if initial_state is not None:
            last_state.copy_(initial_state)
        else:
            last_state.zero_()
        return
    A_c = _small(A, acc_dtype)
    D_c = _small(D, acc_dtype)
    bias_c = _small(delta_bias, acc_dtype)
    h0 = _small(initial_state, acc_dtype)
    lowrank = dt_weight is not None
    rank = dt_weight.shape[1] if lowrank else 1
    u_st, z_st, out_st = geo.seq_strides(u), geo.seq_strides(z), geo.seq_strides(out)
    # low-rank input (batch, 1, R, *Ls): its batch and rank strides take the places of Δ's batch and dim
    dl_st = [delta.stride(0), delta.stride(2), *geo._seq(delta, 3)] if lowrank else geo.seq_strides(delta)
    B_st, C_st = geo.bc_strides(B), geo.bc_strides(C)
    sizes = (geo.n_rows, dim, geo.dim_per_group, geo.L, geo.L2, N, rank, geo.n_blocks, geo.blocks_per_seg,
             geo.n_segs)
    w = dt_weight if lowrank else A_c
    common = dict(REVERSE=bool(reverse), HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
                  LOWRANK=lowrank, BLOCK_R=_next_power_of_2(rank), COMPUTE=compute)
    # (rows, segments, N) segment summaries, allocated first so that their span (and hstart's, the same
    # shape) counts in the offset type
    hloc = torch.zeros((batch, dim, geo.n_segs, N), dtype=acc_dtype, device=u.device) if geo.n_segs > 1 else None
    common["INDEX"] = _index_type(u, delta, z, B, C, out, saved, last_state, hloc)
    hstart = None
    if geo.n_segs > 1:
        # Segment-parallel: zero-entry summaries of all but the last segment, a sequential combine over
        # segments, then every segment runs from its true entering state.
        sdt = torch.zeros((batch, dim, geo.n_segs), dtype=acc_dtype, device=u.device)
        _fwd_summary_kernel[(geo.n_tiles, geo.n_segs - 1)](
            u, delta, w, A_c, B, bias_c if bias_c is not None else A_c, hloc, sdt, *sizes,
            *u_st, *dl_st, *B_st, **geo.constexprs(**common))
        hstart = _combine_segments(geo, h0, hloc, sdt, A_c, backward=False, compute=compute)
    _scan_fwd_kernel[geo.grid](
        u, delta, w, z if z is not None else u, A_c, B, C,
        D_c if D_c is not None else A_c, bias_c if bias_c is not None else A_c,
        h0 if h0 is not None else A_c, hstart if hstart is not None else A_c,
        out, last_state, saved if saved is not None else last_state, *sizes, int(accumulate), int(saved is not None),
        *u_st, *dl_st, *z_st, *B_st, *C_st, *out_st,
        **geo.constexprs(SPLIT=geo.n_segs > 1, HAS_D=D is not None, HAS_Z=z is not None,
                         HAS_H0=initial_state is not None, **common))


def _bc_reduction(geo: _Geometry) -> Tuple[bool, bool, int]:
    """(partials, atomic, partial slots per (batch, group)) for the dB/dC reduction over channels."""
    if geo.dim_per_group == 1:
        return False, False, 1  # one row per (batch, group): plain stores
    mode = BC_GRAD_REDUCTION
    if mode not in ("auto", "partials", "atomic"):
        raise ValueError(f"triton_backend.BC_GRAD_REDUCTION must be 'auto', 'partials' or 'atomic', got {mode!r}")
    if not geo.shared_bc:
        return False, True, 1  # tiles straddle groups: only atomics can combine them
    slots = geo.dim_per_group // geo.block_rows
    if mode == "partials" or (mode == "auto" and (
            slots <= MAX_PARTIAL_SLOTS or torch.are_deterministic_algorithms_enabled())):
        return True, False, slots
    return False, True, 1


def scan_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, saved,
                  delta_softplus: bool, reverse: bool):
    """Gradients of scan_forward.

    dout: (batch, dim, *Ls) any strides; dlast_state: (batch, dim, N) or None; saved: scan_forward's.
    Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state) shaped like the inputs;
    du/ddelta/dz in u.dtype, dB/dC in B/C's dtype, the rest float32 (float64 for float64 inputs);
    None for inputs that were None.
    """
    _check_ready(u)
    acc_dtype, compute = _compute_dtype(u)
    geo = _Geometry(u, B, A, backward=True)
    batch, dim, N, G, L = geo.batch, geo.dim, geo.N, geo.G, geo.L
    expected = saved_shape(batch, dim, L, N)
    if tuple(saved.shape) != expected:
        raise ValueError(f"triton backend: saved must have shape {expected} (from scan_forward with the same "
                         f"CHUNK_SIZE), got {tuple(saved.shape)}")
    device = u.device
    du = torch.empty(u.shape, dtype=u.dtype, device=device)
    ddelta = torch.empty(u.shape, dtype=u.dtype, device=device)
    dz = torch.empty(u.shape, dtype=u.dtype, device=device) if z is not None else None
    S = geo.n_segs
    dA_part = torch.zeros((batch, dim, S, N), dtype=acc_dtype, device=device)
    dD_part = torch.zeros((batch, dim, S), dtype=acc_dtype, device=device)
    dbias_part = torch.zeros((batch, dim, S), dtype=acc_dtype, device=device)
    dh0 = torch.zeros((batch, dim, N), dtype=acc_dtype, device=device)
    partials, atomic, slots = _bc_reduction(geo)
    bc_shape = (batch, G, slots, N, L)
    dB_buf = torch.zeros(bc_shape, dtype=acc_dtype, device=device)
    dC_buf = torch.zeros(bc_shape, dtype=acc_dtype, device=device)
    if geo.n_rows and L and N:
        A_c = _small(A, acc_dtype)
        D_c = _small(D, acc_dtype)
        bias_c = _small(delta_bias, acc_dtype)
        dlast = _small(dlast_state, acc_dtype)
        saved_c = saved.to(acc_dtype).contiguous()
        index = _index_type(dout, u, delta, z, B, C, saved_c, du, ddelta, dz, dB_buf, dC_buf, dA_part)
        g_st, u_st, dl_st, z_st = (geo.seq_strides(dout), geo.seq_strides(u), geo.seq_strides(delta),
                                   geo.seq_strides(z))
        B_st, C_st = geo.bc_strides(B), geo.bc_strides(C)
        cend = None
        if S > 1:
            # Adjoints leaving every segment: zero-exit summaries of all but the first segment, then a
            # sequential combine over segments in reverse scan order.
            gloc = torch.zeros((batch, dim, S, N), dtype=acc_dtype, device=device)
            sdt = torch.zeros((batch, dim, S), dtype=acc_dtype, device=device)
            _bwd_summary_kernel[(geo.n_tiles, S - 1)](
                dout, delta, z if z is not None else u, A_c, C, bias_c if bias_c is not None else A_c, gloc, sdt,
                geo.n_rows, dim, geo.dim_per_group, L, geo.L2, N, geo.n_blocks, geo.blocks_per_seg, S, 1,
                *g_st, *dl_st, *z_st, *C_st,
                **geo.constexprs(REVERSE=bool(reverse), HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                                 SOFTPLUS=bool(delta_softplus), COMPUTE=compute, INDEX=index))
            cend = _combine_segments(geo, dlast, gloc, sdt, A_c, backward=True, compute=compute)
        _scan_bwd_kernel[geo.grid](
            dout, dlast if dlast is not None else A_c, cend if cend is not None else A_c,
            u, delta, z if z is not None else u, A_c, B, C,
            D_c if D_c is not None else A_c, bias_c if bias_c is not None else A_c, saved_c,
            du, ddelta, dz if dz is not None else du, dB_buf, dC_buf, dA_part, dD_part, dbias_part, dh0,
            geo.n_rows, dim, geo.dim_per_group, G, L, geo.L2, N, geo.n_blocks, geo.blocks_per_seg, S,
            *g_st, *u_st, *dl_st, *z_st, *B_st, *C_st,
            **geo.constexprs(BC_PARTIALS=partials, BC_ATOMIC=atomic, REVERSE=bool(reverse), SPLIT=S > 1,
                             HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                             HAS_DLAST=dlast_state is not None, SOFTPLUS=bool(delta_softplus),
                             COMPUTE=compute, INDEX=index))
    else:
        du.zero_()
        ddelta.zero_()
        if dz is not None:
            dz.zero_()
        if dlast_state is not None:
            dh0.copy_(dlast_state)
    bc_full = (batch, G, N) + geo.Ls
    # (slots is 0 when dim is 0: the sum is then the zero gradient)
    dB = (dB_buf.squeeze(2) if slots == 1 else dB_buf.sum(2)).reshape(bc_full).to(B.dtype)
    dC = (dC_buf.squeeze(2) if slots == 1 else dC_buf.sum(2)).reshape(bc_full).to(C.dtype)
    dA = dA_part.sum((0, 2))
    dD = dD_part.sum((0, 2)) if D is not None else None
    ddelta_bias = dbias_part.sum((0, 2)) if delta_bias is not None else None
    dinitial_state = dh0 if initial_state is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state
