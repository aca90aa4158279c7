"""Chunked pure-PyTorch selective scan (Mamba S6): the default backend on CPU.

Recurrence, per row r = (batch item, channel), state h of size N, scan order t = 0 .. L-1::

    a_t = exp(dt_t * A)        decay, in (0, 1] since dt >= 0 (softplus) and A <= 0
    b_t = dt_t * u_t * B_t
    h_t = a_t * h_{t-1} + b_t,     y_t = C_t . h_t (+ D u_t, * silu(z_t))

Two-level scan. The sequence is cut into ``nc`` chunks of ``T ~ sqrt(L)`` steps (``chunking``) and
held in a step-major working layout ``(T, nc, <rows x N>)``, so that "step t of every chunk" is one
contiguous slice and every Python-level step is one fused op over all chunks and rows at once:

1. chunk-local pass (T steps): ``h = addcmul(b_t, a_t, h)`` from a zero start gives each chunk's
   local end state;
2. chunk pass (nc small steps): ``start_{c+1} = exp(A * sum_chunk dt) * start_c + end_c`` gives the
   true state before every chunk — these are the ``saved`` tensor;
3. final pass (T steps, in place): ``h_t = b_t + a_t * h_{t-1}`` from the true chunk starts, then
   y = C . h as one batched matmul.

A call therefore makes O(T + nc) = O(sqrt(L)) Python-level steps, never one per time step. The
backward recomputes a, b and h from the saved chunk starts (pass 3 only), runs the same two-level
scheme right to left for the state gradient ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` (+ dlast at the end;
chunk-local reverse pass, reverse chunk pass with exp(A * sum_{t>=1} dt), final reverse pass), forms
``q_t = g_t a_t h_{t-1}`` in place and reduces: dC = sum_j dy h, dB = sum_j x g, dx = B . g,
ddt = u dx + sum_n A q (then softplus' and the bias), du = dt dx + D dy, dA = sum dt q,
dinitial_state = a_0 g_0, dz = dout y silu'(z).

Streamed scan: when one step of all rows is already large (shared layout and
``batch * dim * N >= STREAM_MIN_STEP_ELEMS``, e.g. ViM's 2 x 768 x 16), the sequence is walked in
plain order, one fused op per step over all rows (``_stream_forward`` / ``_stream_backward``):
decays and inputs are formed per cache-resident group of steps, there is no chunk-local pass, the
backward walks the chunks right to left from the same saved chunk starts and carries the state
gradient from chunk to chunk. Measured (one thread) about 1.5x faster than the
two-level scheme at the ViM shape and at B=1, dim=192, L=3136; the two-level scheme stays for small
steps (few channels) and the rows layout (dim/G < 8, e.g. the channel mixer).

Two working layouts, chosen by channels per B/C group (``SHARED_LAYOUT_MIN_CHANNELS``):
* shared (dim/G >= 8, e.g. ViM token mixers): state step ``(nc, batch, G, N, channels)``; the
  contractions with B/C over N or over channels are batched matrix products;
* rows (dim/G < 8, e.g. the channel mixer, dim = 1): state step ``(nc, N, batch, G, channels)``;
  contractions over N are reductions over an outer axis (vectorised over rows), B/C (as large as
  the state there) are gathered per row block.

Memory: the (L, N)-sized buffers exist for one row block at a time, about
``max(2**20, T * 2**16)`` state elements (``VIM2_TORCH_SCAN_BLOCK`` overrides), 2 buffers forward
and 3 backward (plus 3/5 for B/C in the rows layout); they are kept per thread between calls
(``release_workspace()`` frees them). Saved for backward: the chunk-start states,
(batch, dim, nc, N) float32, i.e. 1/T of the full state. Per-position tensors ((L, batch, dim)-sized,
1/N of the state) are materialised in the working layout.

Numerics: the only exponentials are ``exp(dt * A)`` and ``exp(A * sum(dt))`` with dt >= 0 and
A <= 0: exponents are never positive, and products of decays are formed by multiplication (never
as exp of a cumulative sum of logs), so nothing overflows however long the sequence or large
``|A| dt`` (decays underflow to 0, the correct limit). State and reductions are float32 for
float32/float16/bfloat16 inputs and float64 for float64 inputs.

Strides, reverse and two-level sequences: inputs may have any strides. Each per-position tensor
(u, delta, z, dout, B, C) is gathered once into the working layout: channel-major data (sequence
axis innermost) through a blocked 2-D transpose and a row gather, other layouts (token-major,
column-major routes of a 2-D map given as ``Ls = (L1, L2)`` views) through one index gather.
``reverse=True`` and the zero padding of the last chunk are part of that index; the user's tensors
are never flipped, copied whole or modified. Outputs are written back the same way.
"""
from __future__ import annotations

import math
import os
import threading
from functools import lru_cache
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "torch"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Number of (L, N)-state elements processed per row block: bounds the transient memory (a few
# buffers of this many float32 elements) while keeping per-op Python overhead small.
_MIN_BLOCK_ELEMS = 1 << 20
_STEP_ELEMS = 1 << 16  # one step of a block (all its chunks): ~256 KiB float32, about L2-sized
_SOFTPLUS_THRESHOLD = 20.0  # softplus(x) == x above this, as in mamba


def _block_elems(steps: int) -> int:
    """State elements per row block: ``VIM2_TORCH_SCAN_BLOCK`` if set, else max(2**20, T * 2**16)
    (long sequences get larger blocks so that one step of a block stays large enough to amortise
    the per-op overhead)."""
    value = os.environ.get("VIM2_TORCH_SCAN_BLOCK", "")
    try:
        return max(1, int(value)) if value else max(_MIN_BLOCK_ELEMS, steps * _STEP_ELEMS)
    except ValueError:
        raise ValueError(f"VIM2_TORCH_SCAN_BLOCK must be a positive integer, got {value!r}") from None


def unavailable_reason(device: torch.device) -> Optional[str]:
    return None  # plain torch ops: runs wherever torch runs


def chunking(seqlen: int) -> Tuple[int, int]:
    """(T, nc): chunk length and number of chunks for a sequence of ``seqlen`` steps.

    ``T ~ sqrt(L)`` balances the T-step local passes against the nc-step chunk pass; the chunk length
    is then shrunk so that the padding of the last chunk is below ``nc`` steps.
    """
    seqlen = max(int(seqlen), 1)
    T = max(1, int(round(math.sqrt(seqlen))))
    nc = -(-seqlen // T)
    T = -(-seqlen // nc)
    return T, nc


def saved_shape(batch: int, dim: int, seqlen: int, d_state: int) -> Tuple[int, ...]:
    """Shape of ``saved`` (contiguous float32): the state before each chunk, (batch, dim, nc, N)."""
    _, nc = chunking(seqlen)
    return (batch, dim, nc, d_state)


# ---------------------------------------------------------------------------------------------------
# working layout: (T, nc, ...) step-major, gathered with one index per tensor
# ---------------------------------------------------------------------------------------------------

class _Layout:
    """Maps natural positions of a (1- or 2-level) sequence to the (T, nc) step-major scan order.

    Layout position k = t * nc + c holds scan position p = c * T + t, i.e. natural position p
    (or L - 1 - p when reverse); positions p >= L are zero padding at the end of the last chunk.
    """

    def __init__(self, seq_shape: Tuple[int, ...], reverse: bool, device: torch.device, streamed: bool = False):
        self.seq_shape = tuple(seq_shape)
        self.L = L = math.prod(self.seq_shape)
        # streamed: plain scan order (L, 1), the sequence walked step by step (see _stream_forward)
        self.T, self.nc = T, nc = (L, 1) if streamed else chunking(L)
        self.reverse = reverse
        self.device = device
        k = torch.arange(T * nc, device=device)
        p = (k % nc) * T + k // nc
        natural = (L - 1 - p) if reverse else p
        self.pad_from = L - (nc - 1) * T  # steps t >= pad_from of the last chunk are padding
        self.identity = nc == 1 and not reverse  # layout position == natural position: a plain transpose
        self.natural = natural.clamp(0, L - 1)  # padding reads a real position, zeroed afterwards
        if len(self.seq_shape) == 2:
            L2 = self.seq_shape[1]
            self.gather_index = (self.natural // L2, self.natural % L2)
        else:
            self.gather_index = (self.natural,)
        i = torch.arange(L, device=device)  # natural position i -> layout position
        p = (L - 1 - i) if reverse else i
        self.scatter_index = (p % T) * nc + p // T
        self._row_indices = {}

    def _rows(self, kind: str, inner: int) -> Tensor:
        """Row indices for gathers/scatters that carry ``inner`` rows per position."""
        key = (kind, inner)
        if key not in self._row_indices:
            r = torch.arange(inner, device=self.device)
            if kind == "gather":  # layout row (k, r) <- transposed source row r * L + natural[k]
                idx = self.natural[:, None] + self.L * r[None, :]
            else:  # natural row (r, i) <- layout row scatter_index[i] * inner + r
                idx = self.scatter_index[None, :] * inner + r[:, None]
            self._row_indices[key] = idx.reshape(-1)
        return self._row_indices[key]

    def _seq_innermost(self, x: Tensor) -> bool:
        """True when the sequence axes are the innermost, unit-stride axes (channel-major data)."""
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            return False
        return len(self.seq_shape) == 1 or x.shape[-2] == 1 or x.stride(-2) == x.shape[-1]

    def gather(self, x: Tensor, lead: int, dtype: torch.dtype, move: int = 0,
               out: Optional[Tensor] = None, tmp: Optional[Tensor] = None) -> Tensor:
        """x (*lead_dims, *seq), any strides -> (T, nc, *lead_dims[lead-move:], *lead_dims[:lead-move]),
        contiguous, in ``dtype``, zero padded. ``move`` trailing lead axes go right after the scan axes.
        ``out`` / ``tmp``: optional flat workspace buffers for the result and the transpose.

        Sequence-innermost data (channel-major) goes through a blocked 2-D transpose and a row gather
        (both cache friendly); other strides (token-major, column-major 2-D routes, whose per-position
        values are already close together) through one index gather.
        """
        shape = tuple(x.shape[:lead])
        outer, moved = shape[: lead - move], shape[lead - move:]
        R1, R2 = math.prod(outer), math.prod(moved)
        rows = self.T * self.nc * R2
        if self.identity and R2 == 1 and self._seq_innermost(x):
            # (R1, L) -> (L, R1): one blocked transpose (with the dtype conversion), no index
            res = out[: rows * R1].view(rows, R1) if out is not None else torch.empty(
                (rows, R1), dtype=dtype, device=x.device)
            out = res.copy_(x.reshape(R1, self.L).t())
        elif self._seq_innermost(x) and R1 > 1:
            x2 = x.reshape(R1, R2 * self.L)
            if x2.dtype != dtype:
                x2 = x2.to(dtype)
            x2 = x2.contiguous()
            if tmp is not None:
                tr = tmp[: R2 * self.L * R1].view(R2 * self.L, R1)
            else:
                tr = torch.empty((R2 * self.L, R1), dtype=dtype, device=x.device)
            tr.copy_(x2.t())  # blocked transpose
            if out is not None:
                out = torch.index_select(tr, 0, self._rows("gather", R2), out=out[: rows * R1].view(rows, R1))
            else:
                out = tr.index_select(0, self._rows("gather", R2))
        else:
            nseq = len(self.seq_shape)
            src = x.movedim(tuple(range(lead, lead + nseq)), tuple(range(nseq)))  # (*seq, *lead)
            if move:
                order = list(range(nseq))
                order += [nseq + i for i in range(lead - move, lead)] + [nseq + i for i in range(lead - move)]
                src = src.permute(order)
            res = src[self.gather_index]
            if out is not None:
                out = out[: res.numel()].view(res.shape)
                out.copy_(res)
            else:
                out = res.to(dtype)
        out = out.view(self.T, self.nc, *moved, *outer)
        if self.pad_from < self.T:
            out[self.pad_from:, self.nc - 1].zero_()
        return out

    def scatter(self, y: Tensor, out: Tensor, move: int = 0, tmp: Optional[Tensor] = None) -> Tensor:
        """Inverse of gather: y (T, nc, *moved, *outer) -> ``out`` (*outer, *moved, *seq), contiguous."""
        moved = y.shape[2:2 + move]
        R2 = math.prod(moved)
        R1 = math.prod(y.shape[2 + move:])
        rows = y.reshape(self.T * self.nc * R2, R1)
        if self.identity and R2 == 1:
            out.view(R1, self.L).copy_(rows.t())  # blocked transpose (with the dtype conversion)
            return out
        index = self._rows("scatter", R2)
        if tmp is not None and tmp.dtype == y.dtype:
            tmp = torch.index_select(rows, 0, index, out=tmp[: index.numel() * R1].view(index.numel(), R1))
        else:
            tmp = rows.index_select(0, index)
        if tmp.dtype != out.dtype:
            tmp = tmp.to(out.dtype)
        out.view(R1, R2 * self.L).copy_(tmp.t())  # blocked transpose
        return out


@lru_cache(maxsize=32)
def _layout(seq_shape: Tuple[int, ...], reverse: bool, device: torch.device, streamed: bool = False) -> _Layout:
    return _Layout(seq_shape, reverse, device, streamed)


def _row_blocks(batch: int, groups: int, per_group: int, row_elems: int, steps: int,
                min_rows: int = 1, budget: Optional[int] = None) -> Iterator[Tuple[slice, slice, slice]]:
    """Splits the (batch, G, dim/G) rows into blocks of about ``_block_elems(steps)`` state elements.

    A block covers whole batch items, or whole groups of one item, or part of one group, so that
    its B/C are a plain slice (channels of a block share the B/C rows of their groups).
    """
    rows = max(min_rows, (budget or _block_elems(steps)) // max(row_elems, 1))
    dim = groups * per_group

    def split(n, size):
        parts = -(-n // max(1, min(size, n)))
        step = -(-n // parts)
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    full_g, full_j = slice(0, groups), slice(0, per_group)
    if rows >= dim:
        for bs in split(batch, rows // dim):
            yield bs, full_g, full_j
    elif rows >= per_group:
        for b in range(batch):
            for gs in split(groups, rows // per_group):
                yield slice(b, b + 1), gs, full_j
    else:
        for b in range(batch):
            for g in range(groups):
                for js in split(per_group, rows):
                    yield slice(b, b + 1), slice(g, g + 1), js


# ---------------------------------------------------------------------------------------------------
# problem preparation and the two working layouts
# ---------------------------------------------------------------------------------------------------

# Channels per B/C group from which the "shared" layout (state (.., N, channels), contractions over N
# as batched matrix products with the group's B/C) beats the "rows" layout (state (N, rows), N-outer,
# contractions as reductions over an outer axis, right for dim/G == 1 such as the channel mixer).
SHARED_LAYOUT_MIN_CHANNELS = 8
# Streamed scan (shared layout only): when one step of all rows has at least this many state
# elements, walking the sequence step by step costs no more per-op overhead than the two-level scheme
# and keeps every buffer cache resident (see _stream_forward). Measured crossover (one thread, N=16):
# equal at 2048 (1 x 128 channels), streamed 1.3-1.5x faster from 3072 (B=1, dim=192, L=3136) up.
STREAM_MIN_STEP_ELEMS = 1 << 11
_STREAM_STEP_ELEMS = 1 << 15  # state elements of one step of a streamed row block
_STREAM_GROUP_ELEMS = 1 << 17  # state elements per group of steps (decays/inputs of the group); measured
_STREAM_GROUP_STEPS: Optional[int] = None  # fixed steps per group instead (tests: ragged groups)


class _Problem:
    """Inputs gathered into the chunked working layout (all per position, none per state element).

    Per-position tensors (dt, u, x = dt*u, dy): (T, nc, batch, G, dpg) in the compute dtype.
    B, C: (T, nc, batch, G, N) in the shared layout, (T, nc, N, batch, G) in the rows layout.
    One step of the state for a block of rows (bb batch items, gb groups, jb channels per group):
    (nc, bb, gb, N, jb) shared, (nc, N, bb, gb, jb) rows.
    """

    def __init__(self, u, delta, A, B, C, delta_bias, initial_state, delta_softplus, reverse,
                 keep_raw_delta=False, shared=None, streamed=None):
        self.batch, self.dim = u.shape[:2]
        self.seq_shape = tuple(u.shape[2:])
        self.cd = cd = torch.float64 if u.dtype == torch.float64 else torch.float32
        self.N = N = A.shape[1]
        if B.dim() == u.dim():  # (batch, N, *Ls) -> (batch, 1, N, *Ls)
            B = B.unsqueeze(1)
        if C.dim() == u.dim():
            C = C.unsqueeze(1)
        self.G = G = B.shape[1]
        self.dpg = dpg = self.dim // G
        self.shared = (dpg >= SHARED_LAYOUT_MIN_CHANNELS) if shared is None else bool(shared)
        if streamed is None:
            streamed = self.shared and self.batch * self.dim * self.N >= STREAM_MIN_STEP_ELEMS
        self.streamed = streamed = bool(streamed) and self.shared
        self.lay = lay = _layout(self.seq_shape, bool(reverse), u.device, streamed)
        self.T, self.nc = lay.T, lay.nc
        pos_shape = (self.T, self.nc, self.batch, G, dpg)
        raw = lay.gather(delta, 2, cd).view(pos_shape)
        if delta_bias is not None:
            raw += delta_bias.to(cd).view(G, dpg)
        self.raw_delta = raw if (keep_raw_delta and delta_softplus) else None
        # torch's softplus is the identity above threshold=20: mamba's rule exactly
        dt = F.softplus(raw, threshold=_SOFTPLUS_THRESHOLD) if delta_softplus else raw
        if lay.pad_from < lay.T:
            dt[lay.pad_from:, self.nc - 1].zero_()  # padding steps: decay 1, no input
        self.dt = dt
        self.u = lay.gather(u, 2, cd).view(pos_shape)
        self.x = dt * self.u
        if self.shared:
            self.B = lay.gather(B, 3, cd)  # (T, nc, batch, G, N)
            self.C = lay.gather(C, 3, cd)
            self.At = A.to(cd).view(G, dpg, N).transpose(1, 2).contiguous()  # (G, N, dpg)
        else:
            # B/C are as large as the state here (one row each): gathered per row block
            self.B, self.C = B, C
            self.At = A.to(cd).t().contiguous().view(N, 1, G, dpg)
        self.init = None
        if initial_state is not None:  # natural (batch, G, dpg, N)
            self.init = initial_state.to(cd).view(self.batch, G, dpg, N)

    # --- layout helpers -------------------------------------------------------------------------
    def blocks(self):
        if self.streamed:  # one step of a block: about _STREAM_STEP_ELEMS state elements
            return list(_row_blocks(self.batch, self.G, self.dpg, self.N, 1, budget=_STREAM_STEP_ELEMS))
        # the rows layout gathers B/C per block: its blocks never split a group
        return list(_row_blocks(self.batch, self.G, self.dpg, self.T * self.nc * self.N, self.T,
                                min_rows=1 if self.shared else self.dpg))

    def block(self, bs, gs, js, work=None) -> "_Block":
        return _Block(self, bs, gs, js, work)

    def max_block_numel(self) -> int:
        return max(self.T * self.nc * self.N * (b.stop - b.start) * (g.stop - g.start) * (j.stop - j.start)
                   for b, g, j in self.blocks())


class _Block:
    """Views of one row block (bb batch items x gb groups x jb channels) in the working layout.

    Full block tensors are (T, <step>) with <step> = (nc, bb, gb, N, jb) in the shared layout and
    (nc, N, bb, gb, jb) in the rows layout; per-position values are viewed with a size-1 N axis and
    B/C with a size-1 channel axis so that every product is a plain broadcast.
    """

    def __init__(self, p: _Problem, bs: slice, gs: slice, js: slice, work=None):
        self.p, self.bs, self.gs, self.js = p, bs, gs, js
        self.shared = sh = p.shared
        bb, gb, jb = bs.stop - bs.start, gs.stop - gs.start, js.stop - js.start
        self.bb, self.gb, self.jb = bb, gb, jb
        self.step = (p.nc, bb, gb, p.N, jb) if sh else (p.nc, p.N, bb, gb, jb)
        self.shape = (p.T,) + self.step
        self.numel = math.prod(self.shape)
        self.At = p.At[gs, :, js] if sh else p.At[:, :, gs, js]
        self.dt = self.pos(p.dt)
        self.x = self.pos(p.x)
        if sh:
            self.B = self.bc(p.B)
            self.C = self.bc(p.C)
        else:  # gather this block's B/C into (T, nc, N, bb, gb) workspace buffers
            b_buf, c_buf, tmp = work
            self.B = p.lay.gather(p.B[bs, gs], 3, p.cd, move=1, out=b_buf, tmp=tmp).unsqueeze(-1)
            self.C = p.lay.gather(p.C[bs, gs], 3, p.cd, move=1, out=c_buf, tmp=tmp).unsqueeze(-1)

    def pos(self, t: Tensor) -> Tensor:
        """Global per-position (T, nc, batch, G, dpg) -> this block, broadcastable against the state."""
        t = t[:, :, self.bs, self.gs, self.js]
        return t.unsqueeze(4) if self.shared else t.unsqueeze(2)

    def pos_out(self, t: Tensor) -> Tensor:
        """Global per-position output -> this block's (T, nc, bb, gb, jb) slice."""
        return t[:, :, self.bs, self.gs, self.js]

    def bc(self, M: Tensor) -> Tensor:
        """Global B/C (or dB/dC) -> this block's (T, nc, bb, gb, N, 1) / (T, nc, N, bb, gb, 1) view."""
        return (M[:, :, self.bs, self.gs] if self.shared else M[:, :, :, self.bs, self.gs]).unsqueeze(-1)

    def view(self, buf: Tensor) -> Tensor:
        return buf[: self.numel].view(self.shape)

    # states: natural (bb, gb, jb, N) <-> one chunk of a step
    def natural_to_state(self, s: Tensor) -> Tensor:
        return s.transpose(-1, -2) if self.shared else s.permute(3, 0, 1, 2)

    def state_to_natural(self, s: Tensor) -> Tensor:
        return s.transpose(-1, -2) if self.shared else s.permute(1, 2, 3, 0)

    def saved_view(self, saved: Tensor) -> Tensor:
        """This block's chunk-start states in ``saved`` (batch, dim, nc, N), as a step (nc, <state>)."""
        p = self.p
        v = saved.view(p.batch, p.G, p.dpg, p.nc, p.N)[self.bs, self.gs, self.js]  # (bb, gb, jb, nc, N)
        return v.permute(3, 0, 1, 4, 2) if self.shared else v.permute(3, 4, 0, 1, 2)

    # contractions over the whole block
    def sum_n(self, S: Tensor, V: Tensor, out: Tensor, tmp: Tensor) -> None:
        """out (T, nc, bb, gb, jb) = sum_n V * S, V = block B or C (shared by the group's channels)."""
        if self.shared:
            k = math.prod(self.shape[:4])
            res = torch.bmm(V.reshape(k, 1, self.p.N), S.view(k, self.p.N, self.jb))
            out.copy_(res.view(out.shape))
        else:
            torch.sum(torch.mul(S, V, out=tmp), 2, out=out)

    def sum_n_channel(self, S: Tensor, out: Tensor) -> None:
        """out (T, nc, bb, gb, jb) = sum_n A * S with this block's per-channel A (N strided adds)."""
        axis = 4 if self.shared else 2
        S_n = S.unbind(axis)
        A_n = self.At.unbind(-2 if self.shared else 0)
        torch.mul(S_n[0], A_n[0], out=out)
        for n in range(1, len(S_n)):
            out.addcmul_(S_n[n], A_n[n])

    def sum_j(self, S: Tensor, w: Tensor, out: Tensor, tmp: Tensor) -> None:
        """out (block view of dB/dC, like self.bc(...)) += sum over the block's channels of w * S."""
        if self.shared:
            k = math.prod(self.shape[:4])
            res = torch.bmm(S.view(k, self.p.N, self.jb), w.reshape(k, self.jb, 1))
            out.add_(res.view(out.shape))
        elif self.jb == 1:
            out.addcmul_(S, w)
        else:
            out.add_(torch.mul(S, w, out=tmp).sum(-1, keepdim=True))

    def sum_rows(self, S: Tensor) -> Tensor:
        """(T, <step>) summed over steps, chunks and batch -> the block's slice of dA."""
        if self.shared:
            return S.sum((0, 1, 2))  # (gb, N, jb)
        return S.sum((0, 1, 3)).unsqueeze(1)  # (N, 1, gb, jb)


_workspaces = threading.local()


def _ensure_buffers(count: int, numel: int, dtype: torch.dtype, device: torch.device):
    """``count`` flat buffers of ``numel`` elements from a per-thread workspace kept between calls.

    Reusing the block buffers avoids paying fresh page faults for several MiB on every call, which
    costs as much as the arithmetic on them. The workspace holds at most a few row blocks (see
    ``VIM2_TORCH_SCAN_BLOCK``) per (device, dtype); ``release_workspace()`` frees it.
    """
    cache = getattr(_workspaces, "buffers", None)
    if cache is None:
        cache = _workspaces.buffers = {}
    key = (device, dtype)
    flat = cache.get(key)
    if flat is None or flat.numel() < count * numel:
        # Never cache an inference tensor: a workspace first made under torch.inference_mode() must
        # stay writable by later calls outside it (normal tensors are fine inside inference mode).
        with torch.inference_mode(False):
            flat = cache[key] = torch.empty(count * numel, dtype=dtype, device=device)
    return [flat[i * numel:(i + 1) * numel] for i in range(count)]


def release_workspace() -> None:
    """Frees this thread's cached working buffers (they are re-created on the next call)."""
    _workspaces.buffers = {}


def _decay_input_chunk_ends(blk: _Block, a: Tensor, X: Tensor, need_ends: bool) -> Optional[Tensor]:
    """Fills a = exp(dt A) and X = dt u B step by step; returns each chunk's end state started from
    zero (the chunk-local pass) when ``need_ends``."""
    a_s, X_s = a.unbind(0), X.unbind(0)
    dt_s, x_s, B_s = blk.dt.unbind(0), blk.x.unbind(0), blk.B.unbind(0)
    At = blk.At
    h = None
    pp = (torch.empty(blk.step, dtype=a.dtype, device=a.device),
          torch.empty(blk.step, dtype=a.dtype, device=a.device)) if need_ends else None
    for t in range(len(a_s)):
        torch.mul(dt_s[t], At, out=a_s[t]).exp_()
        torch.mul(x_s[t], B_s[t], out=X_s[t])
        if need_ends:
            h = X_s[0] if t == 0 else torch.addcmul(X_s[t], a_s[t], h, out=pp[t % 2])
    return h


def _chunk_starts(blk: _Block, ends: Optional[Tensor], init: Optional[Tensor], like: Tensor) -> Tensor:
    """State before each chunk, a step (nc, <state>), from the chunk-local end states (chunk pass)."""
    p = blk.p
    starts = torch.empty_like(like)
    if init is None:
        starts[0].zero_()
    else:
        starts[0].copy_(blk.natural_to_state(init))
    if p.nc > 1:
        # whole-chunk decay exp(A * sum dt): the exponential of a non-positive number
        decay = torch.mul(blk.dt.sum(0), blk.At).exp_()
        for c in range(1, p.nc):
            torch.addcmul(ends[c - 1], decay[c - 1], starts[c - 1], out=starts[c])
    return starts


def _states(a: Tensor, X: Tensor, starts: Tensor) -> Tensor:
    """In place: X (holding dt u B) becomes the states h_t given the chunk start states."""
    a_s, X_s = a.unbind(0), X.unbind(0)
    X_s[0].addcmul_(a_s[0], starts)
    for t in range(1, len(X_s)):
        X_s[t].addcmul_(a_s[t], X_s[t - 1])
    return X


# ---------------------------------------------------------------------------------------------------
# streamed scan: the sequence walked step by step over many rows at once
# ---------------------------------------------------------------------------------------------------
# When one step of all rows is already large (e.g. ViM: batch * dim * N = 24576 state elements), the
# two-level scheme buys nothing: one op per step is as cheap as one op per step of every chunk, and
# the plain recurrence needs no chunk-local pass. Decays and inputs are formed for a group of steps
# that stays cache resident (``_STREAM_GROUP_ELEMS``) instead of for the whole block, so every pass
# reads and writes cache rather than memory. ``saved`` keeps the same chunk-start states
# (``chunking(L)``); the backward walks the chunks right to left, recomputing each chunk's states from
# its saved start and carrying the state gradient from one chunk to the one before.


def _stream_view(buf: Tensor, steps: int, blk: _Block) -> Tensor:
    return buf[: steps * math.prod(blk.step)].view((steps,) + blk.step)


def _stream_starts_view(blk: _Block, saved: Tensor, nchunks: int) -> Tensor:
    """This block's chunk starts in ``saved`` (batch, dim, nc, N) as (nc, bb, gb, N, jb)."""
    p = blk.p
    v = saved.view(p.batch, p.G, p.dpg, nchunks, p.N)[blk.bs, blk.gs, blk.js]  # (bb, gb, jb, nc, N)
    return v.permute(3, 0, 1, 4, 2)


def _sum_n_into(S: Tensor, V: Tensor, out: Tensor) -> None:
    """out (n, 1, bb, gb, jb) = sum_n V * S for S (n, 1, bb, gb, N, jb), V (n, 1, bb, gb, N, 1)."""
    n, _, bb, gb, N, jb = S.shape
    k = n * bb * gb
    if out.is_contiguous():
        torch.bmm(V.reshape(k, 1, N), S.view(k, N, jb), out=out.view(k, 1, jb))
    else:
        out.copy_(torch.bmm(V.reshape(k, 1, N), S.view(k, N, jb)).view(out.shape))


def _sum_j_into(S: Tensor, w: Tensor, out: Tensor) -> None:
    """out (n, 1, bb, gb, N, 1) += sum_j w * S for S (n, 1, bb, gb, N, jb), w (n, 1, bb, gb, 1, jb)."""
    n, _, bb, gb, N, jb = S.shape
    k = n * bb * gb
    # as (1, jb) @ (jb, N) rows: several times faster than the (N, jb) @ (jb, 1) matrix-vector form
    w, S_t = w.reshape(k, 1, jb), S.view(k, N, jb).transpose(1, 2)
    if out.is_contiguous():
        out.view(k, 1, N).baddbmm_(w, S_t)
    else:
        out.add_(torch.bmm(w, S_t).view(out.shape))


def _stream_scan(blk: _Block, a_buf: Tensor, x_buf: Tensor, h_buf: Tensor, group: int, init: Optional[Tensor],
                 starts: Tensor, Tc: int, y: Optional[Tensor] = None) -> Tensor:
    """Walks the block's sequence; writes the state before every chunk of ``Tc`` steps into ``starts``
    (nc, bb, gb, N, jb) and, when ``y`` is given, y_t = C_t . h_t into it. Returns the last state
    (1, bb, gb, N, jb), a view of ``h_buf``."""
    L = blk.p.lay.L
    h = None if init is None else blk.natural_to_state(init)
    carry = _stream_view(h_buf, 1, blk)[0]
    for t0 in range(0, L, group):
        n = min(group, L - t0)
        a, X = _stream_view(a_buf, n, blk), _stream_view(x_buf, n, blk)
        torch.mul(blk.dt[t0:t0 + n], blk.At, out=a).exp_()
        torch.mul(blk.x[t0:t0 + n], blk.B[t0:t0 + n], out=X)
        a_s, X_s = a.unbind(0), X.unbind(0)  # one call instead of a Python-level index per step
        for i in range(n):
            t = t0 + i
            if t % Tc == 0:
                if h is None:
                    starts[t // Tc].zero_()
                else:
                    starts[t // Tc].copy_(h.reshape(starts.shape[1:]))
            if h is not None:
                X_s[i].addcmul_(a_s[i], h)
            h = X_s[i]
        if y is not None:
            _sum_n_into(X, blk.C[t0:t0 + n], y[t0:t0 + n])
        h = carry.copy_(X[n - 1])  # the group buffers are overwritten by the next group
    return h


def _stream_forward(p: _Problem, y: Tensor, last: Tensor, saved: Tensor) -> None:
    """Streamed forward over all row blocks: y (L, 1, batch, G, dpg), last (batch, G, dpg, N), saved."""
    L, cd, dev = p.lay.L, p.cd, y.device
    Tc, nchunks = chunking(L)
    blocks = [p.block(*b) for b in p.blocks()]
    step = max(math.prod(b.step) for b in blocks)
    group = _STREAM_GROUP_STEPS or max(1, min(L, _STREAM_GROUP_ELEMS // step))
    a_buf, x_buf, h_buf = _ensure_buffers(3, group * step, cd, dev)
    for blk in blocks:
        init = None if p.init is None else p.init[blk.bs, blk.gs, blk.js]
        starts = _stream_starts_view(blk, saved, nchunks)
        h = _stream_scan(blk, a_buf, x_buf, h_buf, group, init, starts, Tc, y=blk.pos_out(y))
        last[blk.bs, blk.gs, blk.js].copy_(blk.state_to_natural(h[0]))


def _stream_backward(p: _Problem, saved: Tensor, dy: Tensor, y: Optional[Tensor], dx: Tensor, ddt: Tensor,
                     dB: Tensor, dC: Tensor, dA: Tensor, dinit: Optional[Tensor], dlast: Optional[Tensor]) -> None:
    """Streamed backward: chunks right to left, states recomputed from the saved chunk starts.

    Per-position results (y, dx, ddt) are written, dB/dC/dA accumulated, dinit written.
    """
    L, N, cd, dev = p.lay.L, p.N, p.cd, dy.device
    Tc, nchunks = chunking(L)
    blocks = [p.block(*b) for b in p.blocks()]
    step = max(math.prod(b.step) for b in blocks)
    a_buf, h_buf, g_buf, c_buf = _ensure_buffers(4, Tc * step, cd, dev)
    for blk in blocks:
        bs, gs, js = blk.bs, blk.gs, blk.js
        if cd == torch.float32:
            starts = _stream_starts_view(blk, saved, nchunks)
        else:  # float64: saved is float32, recompute the chunk starts exactly
            starts = torch.empty((nchunks,) + blk.step[1:], dtype=cd, device=dev)
            init = None if p.init is None else p.init[bs, gs, js]
            _stream_scan(blk, a_buf, h_buf, g_buf, Tc, init, starts, Tc)
        dy_b, y_b = blk.pos(dy), (None if y is None else blk.pos_out(y))
        dx_b, ddt_b, dB_b, dC_b = blk.pos_out(dx), blk.pos_out(ddt), blk.bc(dB), blk.bc(dC)
        carry = None
        if dlast is not None:
            carry = blk.natural_to_state(dlast[bs, gs, js])
        dA_b = dA[gs, :, js]
        for c in range(nchunks - 1, -1, -1):
            s0 = c * Tc
            n = min(Tc, L - s0)
            sl = slice(s0, s0 + n)
            a, H, Gs = (_stream_view(b, n, blk) for b in (a_buf, h_buf, g_buf))
            dt_c, x_c, B_c, C_c, dy_c = blk.dt[sl], blk.x[sl], blk.B[sl], blk.C[sl], dy_b[sl]
            torch.mul(dt_c, blk.At, out=a).exp_()
            torch.mul(x_c, B_c, out=H)
            h0 = starts[c]
            a_s, H_s, G_s = a.unbind(0), H.unbind(0), Gs.unbind(0)
            H_s[0].addcmul_(a_s[0], h0)
            for i in range(1, n):
                H_s[i].addcmul_(a_s[i], H_s[i - 1])
            if y_b is not None:
                _sum_n_into(H, C_c, y_b[sl])
            _sum_j_into(H, dy_c, dC_b[sl])
            # state gradient g_t = C_t dy_t + a_{t+1} g_{t+1}, the carry bringing in the later chunks
            torch.mul(C_c, dy_c, out=Gs)
            if carry is not None:
                G_s[n - 1].add_(carry)
            for i in range(n - 2, -1, -1):
                G_s[i].addcmul_(a_s[i + 1], G_s[i + 1])
            carry = torch.mul(a_s[0], G_s[0], out=_stream_view(c_buf, 1, blk)[0])  # a_{s0} g_{s0}
            # Q = g_t a_t h_{t-1}, the gradient reaching dt_t * A, in place in the decay buffer
            Q = a.mul_(Gs)
            if n > 1:
                Q[1:].mul_(H[:-1])
            a_s[0].mul_(h0)
            _sum_n_into(Gs, B_c, dx_b[sl])
            _sum_j_into(Gs, x_c, dB_b[sl])
            # sum_n A Q: N strided multiply-adds into the small output (one read of Q, measured
            # faster than a full-size product followed by a reduction)
            ddt_c = ddt_b[sl]
            Q_n, A_n = Q.unbind(4), blk.At.unbind(-2)
            torch.mul(Q_n[0], A_n[0], out=ddt_c)
            for i in range(1, len(Q_n)):
                ddt_c.addcmul_(Q_n[i], A_n[i])
            dA_b += Q.mul_(dt_c).sum((0, 1, 2))
        if dinit is not None:
            dinit[bs, gs, js].copy_(blk.state_to_natural(carry[0]))


# ---------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus: bool, reverse: bool):
    """Returns (out (batch, dim, *Ls) u.dtype contiguous, last_state (batch, dim, N), saved).

    ``last_state`` is float32 (float64 for float64 inputs); ``saved`` is the float32 state before each
    chunk, shape ``saved_shape(batch, dim, L, N)``.
    """
    return _forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse)


def _forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, shared=None):
    if u.numel() == 0:
        return _empty_forward(u, A, initial_state)
    p = _Problem(u, delta, A, B, C, delta_bias, initial_state, delta_softplus, reverse, shared=shared)
    T, nc, N, cd, dev = p.T, p.nc, p.N, p.cd, u.device
    y = torch.empty(T, nc, p.batch, p.G, p.dpg, dtype=cd, device=dev)
    last = torch.empty(p.batch, p.G, p.dpg, N, dtype=cd, device=dev)
    saved = torch.empty(saved_shape(p.batch, p.dim, p.lay.L, N), dtype=torch.float32, device=dev)
    if p.streamed:
        _stream_forward(p, y, last, saved)
        bufs = ()
    else:
        bufs = _ensure_buffers(2 if p.shared else 5, p.max_block_numel(), cd, dev)
        a_buf, x_buf = bufs[:2]
    for bs, gs, js in (() if p.streamed else p.blocks()):
        blk = p.block(bs, gs, js, work=bufs[2:5])
        a, X = blk.view(a_buf), blk.view(x_buf)
        ends = _decay_input_chunk_ends(blk, a, X, need_ends=nc > 1)
        init = None if p.init is None else p.init[bs, gs, js]
        starts = _chunk_starts(blk, ends, init, X[0])
        blk.saved_view(saved).copy_(starts)
        H = _states(a, X, starts)
        last[bs, gs, js].copy_(blk.state_to_natural(H[T - 1, nc - 1]))
        blk.sum_n(H, blk.C, blk.pos_out(y), tmp=a)
    y = y.view(T, nc, p.batch, p.dim)
    if D is not None:
        y.addcmul_(p.u.view_as(y), D.to(cd))
    if z is not None:
        y.mul_(F.silu(p.lay.gather(z, 2, cd), inplace=True))
    out = torch.empty(u.shape, dtype=u.dtype, device=dev)
    p.lay.scatter(y, out)
    return out, last.view(p.batch, p.dim, N), saved


def _empty_forward(u, A, initial_state):
    """No batch items or no steps: the output is empty and the state stays the initial state."""
    batch, dim, N = u.shape[0], u.shape[1], A.shape[1]
    cd = torch.float64 if u.dtype == torch.float64 else torch.float32
    last = torch.zeros(batch, dim, N, dtype=cd, device=u.device)
    if initial_state is not None:
        last.copy_(initial_state)
    seqlen = math.prod(u.shape[2:])
    saved = torch.zeros(saved_shape(batch, dim, seqlen, N), dtype=torch.float32, device=u.device)
    return torch.empty(u.shape, dtype=u.dtype, device=u.device), last, saved


# ---------------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def scan_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, saved,
                  delta_softplus: bool, reverse: bool):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state), shaped like the inputs.

    du/ddelta/dz in u.dtype, dB/dC in B/C's dtype, the rest float32 (float64 for float64 inputs);
    None where the input was None. States are recomputed from ``saved`` (float64 inputs recompute the
    chunk-start states in float64 instead, since ``saved`` is float32).
    """
    return _backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, saved,
                     delta_softplus, reverse)


def _backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, saved,
              delta_softplus, reverse, shared=None):
    if u.numel() == 0:
        return _empty_backward(dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state)
    p = _Problem(u, delta, A, B, C, delta_bias, initial_state, delta_softplus, reverse,
                 keep_raw_delta=True, shared=shared)
    T, nc, N, cd, dev = p.T, p.nc, p.N, p.cd, u.device
    batch, G, dpg = p.batch, p.G, p.dpg
    lay = p.lay
    pos_shape = (T, nc, batch, G, dpg)
    dout_c = lay.gather(dout, 2, cd).view(pos_shape)
    z_sig = z_silu = None
    if z is not None:
        z_silu = lay.gather(z, 2, cd).view(pos_shape)
        z_sig = torch.sigmoid(z_silu)
        z_silu.mul_(z_sig)  # silu(z) = z * sigmoid(z), in place
        dy = dout_c * z_silu
    else:
        dy = dout_c
    dlast = None if dlast_state is None else dlast_state.to(cd).view(batch, G, dpg, N)

    y = torch.empty(pos_shape, dtype=cd, device=dev) if z is not None else None
    dx = torch.empty(pos_shape, dtype=cd, device=dev)
    ddt = torch.empty(pos_shape, dtype=cd, device=dev)
    seq = p.seq_shape
    if p.shared:  # accumulated over blocks in the working layout (T, nc, batch, G, N), scattered at the end
        dB = torch.zeros(p.B.shape, dtype=cd, device=dev)
        dC = torch.zeros(p.C.shape, dtype=cd, device=dev)
    else:  # rows layout: blocks cover whole groups; each block scatters its own slice
        dB = torch.empty((batch, G, N) + seq, dtype=B.dtype, device=dev)
        dC = torch.empty((batch, G, N) + seq, dtype=C.dtype, device=dev)
    dA = torch.zeros(p.At.shape, dtype=cd, device=dev)
    dinit = torch.empty(batch, G, dpg, N, dtype=cd, device=dev) if initial_state is not None else None
    if p.streamed:
        _stream_backward(p, saved, dy, y, dx, ddt, dB, dC, dA, dinit, dlast)
    else:
        bufs = _ensure_buffers(3 if p.shared else 8, p.max_block_numel(), cd, dev)
        a_buf, h_buf, g_buf = bufs[:3]
    for bs, gs, js in (() if p.streamed else p.blocks()):
        blk = p.block(bs, gs, js, work=bufs[3:6])
        a, H, Gs = blk.view(a_buf), blk.view(h_buf), blk.view(g_buf)
        if p.shared:
            dB_b, dC_b = blk.bc(dB), blk.bc(dC)
        else:
            bc_shape = blk.B.shape
            dB_b = bufs[6][: math.prod(bc_shape)].view(bc_shape).zero_()
            dC_b = bufs[7][: math.prod(bc_shape)].view(bc_shape).zero_()
        init = None if p.init is None else p.init[bs, gs, js]
        ends = _decay_input_chunk_ends(blk, a, H, need_ends=(cd != torch.float32 and nc > 1))
        if cd == torch.float32:
            starts = blk.saved_view(saved)
        else:  # float64: saved is float32, recompute the chunk starts exactly
            starts = _chunk_starts(blk, ends, init, H[0])
        _states(a, H, starts)
        dy_b = blk.pos(dy)
        if y is not None:
            blk.sum_n(H, blk.C, blk.pos_out(y), tmp=Gs)
        blk.sum_j(H, dy_b, dC_b, tmp=Gs)
        # state gradient g_t = C_t dy_t + a_{t+1} g_{t+1} (+ dlast at the final step), right to left
        torch.mul(blk.C, dy_b, out=Gs)
        if dlast is not None:
            Gs[T - 1, nc - 1].add_(blk.natural_to_state(dlast[bs, gs, js]))
        if nc > 1:
            Gs[T - 1].add_(_chunk_inflow(blk, a, Gs))
        a_s, G_s = a.unbind(0), Gs.unbind(0)
        for t in range(T - 2, -1, -1):
            G_s[t].addcmul_(a_s[t + 1], G_s[t + 1])
        if dinit is not None:
            dinit[bs, gs, js].copy_(blk.state_to_natural(a[0, 0] * Gs[0, 0]))
        # Q = g_t a_t h_{t-1}, the gradient reaching dt_t * A, built in place in the decay buffer
        Q = a.mul_(Gs)
        Q[1:].mul_(H[:-1])
        Q[0].mul_(starts)
        blk.sum_n(Gs, blk.B, blk.pos_out(dx), tmp=H)
        blk.sum_j(Gs, blk.x, dB_b, tmp=H)
        blk.sum_n_channel(Q, blk.pos_out(ddt))
        dA_blk = blk.sum_rows(Q.mul_(blk.dt))
        if p.shared:
            dA[gs, :, js] += dA_blk
        else:
            dA[:, :, gs, js] += dA_blk
            p.lay.scatter(dB_b[..., 0], dB[bs, gs], move=1, tmp=bufs[5])
            p.lay.scatter(dC_b[..., 0], dC[bs, gs], move=1, tmp=bufs[5])
    return _finish_backward(p, dx, ddt, dy, dout_c, z_sig, z_silu, y, dB, dC, dA, dinit,
                            u, delta, B, C, D, z, delta_bias, delta_softplus)


def _empty_backward(dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state):
    cd = torch.float64 if u.dtype == torch.float64 else torch.float32

    def zeros(t, dtype=None):
        return None if t is None else torch.zeros(t.shape, dtype=dtype or t.dtype, device=t.device)

    dinit = None
    if initial_state is not None:  # last_state == initial_state
        dinit = torch.zeros(initial_state.shape, dtype=cd, device=u.device)
        if dlast_state is not None:
            dinit.copy_(dlast_state)
    return (zeros(u), zeros(delta), zeros(A, cd), zeros(B), zeros(C), zeros(D, cd), zeros(z),
            zeros(delta_bias, cd), dinit)


def _chunk_inflow(blk: _Block, a: Tensor, Gs: Tensor) -> Tensor:
    """What reaches each chunk's last step from the chunks after it: a step (nc, <state>).

    Gs holds C_t dy_t (+ dlast). Chunk-local reverse pass (g at each chunk's first step ignoring
    later chunks), then a reverse chunk pass with the decay from a chunk's last step back to its
    first step, exp(A * sum_{t>=1} dt) (non-positive exponent).
    """
    p = blk.p
    T, nc = p.T, p.nc
    a_s, G_s = a.unbind(0), Gs.unbind(0)
    pp = (torch.empty_like(G_s[0]), torch.empty_like(G_s[0]))
    gl = G_s[T - 1].clone() if T == 1 else G_s[T - 1]
    for t in range(T - 2, -1, -1):
        gl = torch.addcmul(G_s[t], a_s[t + 1], gl, out=pp[t % 2])
    tail = torch.mul(blk.dt[1:].sum(0), blk.At).exp_()
    inflow = torch.zeros_like(gl)
    for c in range(nc - 1, 0, -1):
        first = gl[c].addcmul_(tail[c], inflow[c])  # true g at chunk c's first step
        torch.mul(a_s[0][c], first, out=inflow[c - 1])
    return inflow


def _finish_backward(p, dx, ddt, dy, dout_c, z_sig, z_silu, y, dB, dC, dA, dinit,
                     u, delta, B, C, D, z, delta_bias, delta_softplus):
    """Per-position chain rule (D, z, softplus, bias) and the scatter back to natural layouts.

    Works in place on the per-position buffers, which are not needed afterwards.
    """
    T, nc, N, cd, dev, lay = p.T, p.nc, p.N, p.cd, u.device, p.lay
    batch, G = p.batch, p.G
    view4 = (T, nc, batch, p.dim)
    dx, dyv, uv = dx.view(view4), dy.view(view4), p.u.view(view4)
    ddt = ddt.view(view4).addcmul_(uv, dx)  # + u * dx (the input path dt * u * B)
    du = dx.mul_(p.dt.view(view4))  # dt * dx (+ D * dy below)
    dD = None
    if D is not None:
        D_c = D.to(cd)
        du.addcmul_(dyv, D_c)
        dD = torch.mul(dyv, uv, out=p.x.view(view4)).sum(dim=(0, 1, 2))
    if delta_softplus:  # d softplus / dx = sigmoid(x), and 1 above the threshold
        raw = p.raw_delta.view(view4)
        above = raw > _SOFTPLUS_THRESHOLD if cd != torch.float32 else None  # float32: sigmoid is 1 there
        raw.sigmoid_()
        if above is not None:
            raw.masked_fill_(above, 1.0)
        ddt.mul_(raw)
    if lay.pad_from < T:
        ddt[lay.pad_from:, nc - 1].zero_()  # padding steps carry no delta
    ddelta_bias = ddt.sum(dim=(0, 1, 2)) if delta_bias is not None else None
    dz = None
    if z is not None:
        y = y.view(view4)
        if D is not None:
            y.addcmul_(uv, D_c)
        # silu'(z) = s + silu(z) (1 - s), s = sigmoid(z)
        z_sig, z_silu = z_sig.view(view4), z_silu.view(view4)
        dsilu = z_silu.addcmul_(z_silu, z_sig, value=-1.0).add_(z_sig)
        dz = lay.scatter(dout_c.view(view4).mul_(y).mul_(dsilu), torch.empty(z.shape, dtype=z.dtype, device=dev))
    du_out = lay.scatter(du, torch.empty(u.shape, dtype=u.dtype, device=dev))
    ddelta_out = lay.scatter(ddt, torch.empty(delta.shape, dtype=delta.dtype, device=dev))
    seq = p.seq_shape
    if p.shared:  # (T, nc, batch, G, N) -> (batch, G, N, *seq)
        dB_out = lay.scatter(dB, torch.empty((batch, G, N) + seq, dtype=B.dtype, device=dev)).view(B.shape)
        dC_out = lay.scatter(dC, torch.empty((batch, G, N) + seq, dtype=C.dtype, device=dev)).view(C.shape)
    else:  # already scattered block by block
        dB_out, dC_out = dB.view(B.shape), dC.view(C.shape)
    if p.shared:  # (G, N, dpg)
        dA_out = dA.transpose(1, 2).reshape(p.dim, N)
    else:  # (N, 1, G, dpg)
        dA_out = dA.view(N, p.dim).t().contiguous()
    dinit_out = dinit.view(batch, p.dim, N) if dinit is not None else None
    return du_out, ddelta_out, dA_out, dB_out, dC_out, dD, dz, ddelta_bias, dinit_out
