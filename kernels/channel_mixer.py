"""ViM2's selective channel mixer scan: conv + SiLU + affine Δ/B/C + bidirectional S6 + gate, in one op.

ViM2 scans each token's expanded channel axis (E = 192..1536 positions) in both directions. Written with
the generic scan, every token needs its own ``(N, E)`` B and C per direction: at 1024x1024 input
(65 536 stage-1 tokens, E = 192, N = 16) that is 1.6 GB each for B and C, plus the (2, T, E) conv
outputs. Here only the (T, E) input ``v`` and gate ``z`` are read:

* CPU (``cpu`` backend): a fused C kernel (``selective_scan/csrc/channel_mixer_cpu.c``) forms everything
  else on the fly and keeps nothing for backward (it recomputes);
* CUDA (``triton`` backend): fused Triton kernels (``channel_mixer_triton.py``), forward and backward;
  for backward the forward keeps one state per 32-position block (the size of v at N = 16);
* elsewhere (float64 on CPU, no C compiler, ``torch``/``reference`` backends): the unfused composition
  below through :func:`bidirectional_scan`, which is also the tests' oracle. With autograd it runs on
  chunks of tokens under non-reentrant activation checkpointing, so that training keeps only v, z and
  the output instead of every token's B and C, 2N times the size of v.
"""
from __future__ import annotations

import ctypes
import functools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import channel_mixer_triton
from .bidirectional import bidirectional_scan
from .selective_scan import cpu_backend
from .selective_scan.dispatch import resolve_backend
from .selective_scan.interface import needs_grad
from .selective_scan.triton_backend import saved_dtype as triton_state_dtype

MAX_CONV_WIDTH = 8  # CM_MAX_CONV in the C source
# (tokens x E) elements per recomputed chunk of the unfused composition under autograd: its transient
# per-token B and C are then 2 x N x 2**20 floats each (128 MB at N=16), whatever the batch and image size.
RECOMPUTE_CHUNK_ELEMENTS = 2**20


def channel_mixer_scan(
    v: Tensor,
    z: Optional[Tensor],
    conv_weight: Tensor,
    conv_bias: Tensor,
    delta_weight: Tensor,
    delta_bias: Tensor,
    B_weight: Tensor,
    B_bias: Tensor,
    C_weight: Tensor,
    C_bias: Tensor,
    A: Tensor,
    D: Tensor,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Bidirectional selective scan along the channel axis of every token (ViM2 channel mixer core).

    For token t, direction r (0: positions 0..E-1, 1: E-1..0) and step s of that order at position c::

        x_s  = silu(conv_bias[r] + sum_k conv_weight[r, k] * v[t, position of step s-K+1+k])  # 0 outside
        dt_s = softplus(delta_weight[r] * x_s + delta_bias[r, c])
        B_s  = x_s * B_weight[r] + B_bias[r, :, c];   C_s = x_s * C_weight[r] + C_bias[r, :, c]   # (N,)
        h    = exp(dt_s * A[r]) * h + dt_s * B_s * x_s;   y_r[t, c] = C_s . h + D[r] * x_s
        out[t, c] = (y_0[t, c] + y_1[t, c]) * silu(z[t, c])          # no gate when z is None

    Args:
        v: (T, E) channel-mixer input (after the in-projection), float32/float16/bfloat16/float64.
        z: optional (T, E) gate pre-activation, v's dtype.
        conv_weight: (2, K) per-direction conv taps, tap K-1 on the current position; conv_bias: (2,).
        delta_weight: (2,); delta_bias: (2, E).
        B_weight, C_weight: (2, N); B_bias, C_bias: (2, N, E).
        A: (2, N) (negative; -exp(A_log)); D: (2,).
        backend: as for ``selective_scan_fn``; 'cpu' (the default on CPU) runs the fused C kernel;
            'triton' (the default on CUDA) the fused Triton kernels (forward and backward);
            'torch'/'reference' the unfused composition (recomputed in token chunks under autograd).

    Returns:
        (T, E) in v's dtype.
    """
    _validate(v, z, conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias, C_weight, C_bias, A, D)
    params = (conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias, C_weight, C_bias, A, D)
    name = resolve_backend(backend, v.device, v.dtype, A.shape[1])
    if name == "cpu" and conv_weight.shape[1] <= MAX_CONV_WIDTH:
        return torch.ops.vim2_kernels.channel_mixer_fwd(v, z, *params)
    with_grad = needs_grad(v, z, *params)
    if name == "triton" and conv_weight.shape[1] <= MAX_CONV_WIDTH:
        return torch.ops.vim2_kernels.channel_mixer_fwd_triton(v, z, *params, with_grad)[0]
    if with_grad:
        return _recomputed_in_token_chunks(v, z, params, name)
    return channel_mixer_scan_unfused(v, z, *params, backend=name)


def _recomputed_in_token_chunks(v: Tensor, z: Optional[Tensor], params, backend: str) -> Tensor:
    """The unfused composition with autograd, chunk by chunk of tokens, each chunk recomputed in backward
    (it is row-wise in tokens, so chunks are independent; parameter gradients add up over chunks)."""
    run = functools.partial(channel_mixer_scan_unfused, backend=backend)
    if v.shape[0] == 0:
        return run(v, z, *params)
    chunk = max(1, RECOMPUTE_CHUNK_ELEMENTS // max(1, v.shape[1]))
    # split, not slicing: one backward node for all chunks (a slice's backward would add a full-size
    # zero tensor per chunk)
    v_chunks = v.split(chunk)
    z_chunks = [None] * len(v_chunks) if z is None else z.split(chunk)
    parts = [
        checkpoint(run, v_part, z_part, *params, use_reentrant=False, preserve_rng_state=False)  # no randomness
        for v_part, z_part in zip(v_chunks, z_chunks)
    ]
    return torch.cat(parts)


def channel_mixer_scan_unfused(v, z, conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias,
                               C_weight, C_bias, A, D, *, backend: Optional[str] = None) -> Tensor:
    """The same computation with materialised conv outputs and B/C, through ``bidirectional_scan``."""
    length, width = v.shape[1], conv_weight.shape[1]
    dtype = v.dtype
    # One conv1d with K-1 zeros on both sides serves both directions: output j of the forward taps
    # covers positions j-K+1..j; output c+K-1 of the flipped reverse taps covers c..c+K-1.
    weight = torch.stack([conv_weight[0], conv_weight[1].flip(-1)]).unsqueeze(1).to(dtype)
    out = F.conv1d(v.unsqueeze(1), weight, conv_bias.to(dtype), padding=width - 1)  # (T, 2, E + K - 1)
    u = F.silu(torch.stack([out[:, 0, :length], out[:, 1, width - 1:]]))  # (2, T, E)
    delta = u * delta_weight.to(dtype).view(2, 1, 1) + delta_bias.to(dtype).unsqueeze(1)
    u_col = u.unsqueeze(2)  # (2, T, 1, E)
    Bs = u_col * B_weight.to(dtype).view(2, 1, -1, 1) + B_bias.to(dtype).unsqueeze(1)  # (2, T, N, E)
    Cs = u_col * C_weight.to(dtype).view(2, 1, -1, 1) + C_bias.to(dtype).unsqueeze(1)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    y = bidirectional_scan(
        u_col, delta.unsqueeze(2), A.to(state_dtype).unsqueeze(1), Bs, Cs, D=D.to(state_dtype).unsqueeze(1),
        z=None if z is None else z.unsqueeze(1), delta_softplus=True, backend=backend,
    )
    return y.squeeze(1)


def _validate(v, z, conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias, C_weight, C_bias, A, D):
    if not isinstance(v, Tensor) or v.dim() != 2:
        raise ValueError(f"v must be a (T, E) tensor, got {getattr(v, 'shape', type(v).__name__)}")
    if not v.is_floating_point():
        raise TypeError(f"v must be a floating-point tensor, got {v.dtype}")
    tokens, length = v.shape
    if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[0] != 2:
        raise ValueError(f"A must have shape (2, N), got {getattr(A, 'shape', type(A).__name__)}")
    d_state = A.shape[1]
    width = conv_weight.shape[-1] if isinstance(conv_weight, Tensor) and conv_weight.dim() == 2 else None
    expected = dict(
        z=(tokens, length), conv_weight=(2, width), conv_bias=(2,), delta_weight=(2,), delta_bias=(2, length),
        B_weight=(2, d_state), B_bias=(2, d_state, length), C_weight=(2, d_state), C_bias=(2, d_state, length),
        D=(2,),
    )
    given = dict(z=z, conv_weight=conv_weight, conv_bias=conv_bias, delta_weight=delta_weight,
                 delta_bias=delta_bias, B_weight=B_weight, B_bias=B_bias, C_weight=C_weight, C_bias=C_bias, D=D)
    for name, t in given.items():
        if t is None and name == "z":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if width is None and name == "conv_weight":
            raise ValueError(f"conv_weight must have shape (2, K), got {tuple(t.shape)}")
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} (T={tokens}, E={length}, N={d_state}), "
                             f"got {tuple(t.shape)}")
        if t.device != v.device:
            raise ValueError(f"{name} is on {t.device} but v is on {v.device}: all inputs must share one device")
    if z is not None and z.dtype != v.dtype:
        raise TypeError(f"z must have v's dtype {v.dtype}, got {z.dtype}")


# ---------------------------------------------------------------------------------------------------
# the fused CPU kernel as custom ops
# ---------------------------------------------------------------------------------------------------

def _param32(t: Tensor) -> Tensor:
    """A small parameter as the kernels read it: contiguous float32."""
    return t.detach().float().contiguous()


def _shape(v: Tensor, d_state: int, width: int, threads: int):
    values = (v.shape[0], v.shape[1], d_state, width, threads)
    return (ctypes.c_int64 * len(values))(*values)


def _strided(t: Optional[Tensor]):
    if t is None:
        return [None, ctypes.c_int64(0), ctypes.c_int64(0)]
    return [cpu_backend._ptr(t), ctypes.c_int64(t.stride(0)), ctypes.c_int64(t.stride(1))]


@torch.library.custom_op("vim2_kernels::channel_mixer_fwd", mutates_args=())
def _channel_mixer_fwd(
    v: Tensor, z: Optional[Tensor], conv_weight: Tensor, conv_bias: Tensor, delta_weight: Tensor,
    delta_bias: Tensor, B_weight: Tensor, B_bias: Tensor, C_weight: Tensor, C_bias: Tensor, A: Tensor, D: Tensor,
) -> Tensor:
    lib = cpu_backend._library()
    v32, z32 = cpu_backend._f32(v), cpu_backend._f32(z)
    params = [_param32(p) for p in (conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias,
                                    C_weight, C_bias, A, D)]
    out = torch.empty(v.shape, dtype=torch.float32)
    if v.numel():
        status = lib.vim2_channel_mixer_fwd(
            _shape(v, A.shape[1], conv_weight.shape[1], cpu_backend._threads()), *_strided(v32), *_strided(z32),
            *map(cpu_backend._ptr, params), cpu_backend._ptr(out))
        cpu_backend._check(status, "channel mixer forward", A.shape[1])
    return out if v.dtype == torch.float32 else out.to(v.dtype)


@_channel_mixer_fwd.register_fake
def _(v, z, conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias, C_weight, C_bias, A, D):
    return v.new_empty(v.shape)


@torch.library.custom_op("vim2_kernels::channel_mixer_bwd", mutates_args=())
def _channel_mixer_bwd(
    dout: Tensor, v: Tensor, z: Optional[Tensor], conv_weight: Tensor, conv_bias: Tensor, delta_weight: Tensor,
    delta_bias: Tensor, B_weight: Tensor, B_bias: Tensor, C_weight: Tensor, C_bias: Tensor, A: Tensor, D: Tensor,
) -> List[Tensor]:
    lib = cpu_backend._library()
    params = (conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias, C_weight, C_bias, A, D)
    v32, z32, dout32 = cpu_backend._f32(v), cpu_backend._f32(z), cpu_backend._f32(dout)
    threads = cpu_backend._threads()
    params32 = [_param32(p) for p in params]  # kept alive for the duration of the call
    # the kernel writes every element of dv and dz
    dv = torch.empty(v.shape, dtype=torch.float32)
    dz = None if z is None else torch.empty(v.shape, dtype=torch.float32)
    partials = [torch.zeros((threads, *p.shape), dtype=torch.float32) for p in params]
    if v.numel():
        status = lib.vim2_channel_mixer_bwd(
            _shape(v, A.shape[1], conv_weight.shape[1], threads), *_strided(v32), *_strided(z32),
            *_strided(dout32), *map(cpu_backend._ptr, params32), cpu_backend._ptr(dv),
            cpu_backend._ptr(dz), *map(cpu_backend._ptr, partials))
        cpu_backend._check(status, "channel mixer backward", A.shape[1])
    grads = [dv.to(v.dtype), v.new_empty((0,)) if z is None else dz.to(z.dtype)]
    grads += [part.sum(0).to(p.dtype) for part, p in zip(partials, params)]
    return grads


@_channel_mixer_bwd.register_fake
def _(dout, v, z, conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias, C_weight, C_bias, A, D):
    params = (conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias, C_weight, C_bias, A, D)
    return [v.new_empty(v.shape), v.new_empty((0,)) if z is None else z.new_empty(z.shape)] + [
        p.new_empty(p.shape) for p in params]


@torch.library.custom_op("vim2_kernels::channel_mixer_fwd_triton", mutates_args=())
def _channel_mixer_fwd_triton(
    v: Tensor, z: Optional[Tensor], conv_weight: Tensor, conv_bias: Tensor, delta_weight: Tensor,
    delta_bias: Tensor, B_weight: Tensor, B_bias: Tensor, C_weight: Tensor, C_bias: Tensor, A: Tensor, D: Tensor,
    keep_for_backward: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The fused Triton forward: (out, saved, y) (``saved``/``y`` empty unless ``keep_for_backward``)."""
    args = (v, z, conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias, C_weight, C_bias, A, D)
    if keep_for_backward:
        return channel_mixer_triton.channel_mixer_forward(*args, keep_for_backward=True)
    empty = v.new_empty((0,), dtype=triton_state_dtype(v.dtype))
    return channel_mixer_triton.channel_mixer_forward(*args), empty, empty.clone()


@_channel_mixer_fwd_triton.register_fake
def _(v, z, conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias, C_weight, C_bias, A, D,
      keep_for_backward):
    state = triton_state_dtype(v.dtype)
    if keep_for_backward:
        saved = v.new_empty(channel_mixer_triton.saved_shape(v.shape[0], v.shape[1], A.shape[1]), dtype=state)
        y = v.new_empty(v.shape, dtype=state)
    else:
        saved, y = v.new_empty((0,), dtype=state), v.new_empty((0,), dtype=state)
    return v.new_empty(v.shape), saved, y


@torch.library.custom_op("vim2_kernels::channel_mixer_bwd_triton", mutates_args=())
def _channel_mixer_bwd_triton(
    dout: Tensor, v: Tensor, z: Optional[Tensor], conv_weight: Tensor, conv_bias: Tensor, delta_weight: Tensor,
    delta_bias: Tensor, B_weight: Tensor, B_bias: Tensor, C_weight: Tensor, C_bias: Tensor, A: Tensor, D: Tensor,
    saved: Tensor, y: Tensor,
) -> List[Tensor]:
    grads = channel_mixer_triton.channel_mixer_backward(
        dout, v, z, conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias, C_weight, C_bias, A, D,
        saved, y)
    if grads[1] is None:
        grads[1] = v.new_empty((0,))  # custom ops return tensors; the autograd formula maps it to None
    return grads


@_channel_mixer_bwd_triton.register_fake
def _(dout, v, z, conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias, C_weight, C_bias, A, D,
      saved, y):
    params = (conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias, C_weight, C_bias, A, D)
    return [v.new_empty(v.shape), v.new_empty((0,)) if z is None else z.new_empty(z.shape)] + [
        p.new_empty(p.shape) for p in params]


def _triton_setup_context(ctx, inputs, output):
    *args, keep_for_backward = inputs
    _, saved, y = output
    ctx.keep = keep_for_backward
    ctx.has_gate = args[1] is not None
    ctx.save_for_backward(*args, saved, y)


def _triton_backward(ctx, dout, _dsaved, _dy):
    if not ctx.keep:
        raise RuntimeError("channel_mixer_fwd_triton ran with keep_for_backward=False: no backward possible "
                           "(call vim2_kernels.channel_mixer_scan, which keeps what the backward needs)")
    grads = torch.ops.vim2_kernels.channel_mixer_bwd_triton(dout, *ctx.saved_tensors)
    if not ctx.has_gate:
        grads[1] = None
    return (*grads, None)


_channel_mixer_fwd_triton.register_autograd(_triton_backward, setup_context=_triton_setup_context)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.has_gate = inputs[1] is not None


def _backward(ctx, dout):
    inputs = ctx.saved_tensors
    grads = torch.ops.vim2_kernels.channel_mixer_bwd(dout, *inputs)
    if not ctx.has_gate:
        grads[1] = None
    return tuple(grads)


_channel_mixer_fwd.register_autograd(_backward, setup_context=_setup_context)
