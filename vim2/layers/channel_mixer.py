"""Selective Channel Mixer of ViM2 (paper Eq. 12-18, Fig. 1): bidirectional S6 across channels.

Each spatial token is mixed on its own (resolution independent; no layer acts over the token axis).
For a token with channels x (C,), with E = the expanded channel width::

    u     = in_proj(x)                       # "CW-Linear" C -> E, shared over tokens; u: (E,)
    u_f   = SiLU(causal conv_f(u))           # 1-D depth-wise conv ALONG THE CHANNEL AXIS, position c
    u_r   = SiLU(anti-causal conv_r(u))      #   sees c-k+1..c (forward) or c..c+k-1 (reverse)
    for each direction d in (forward, reverse), at channel position c:
        Δ_c = softplus(w_Δ[d] u_c + b_Δ[d, c])          # w: shared over positions, b: per position
        B_c = u_c w_B[d] + b_B[d, :, c]                  # (N,)
        C_c = u_c w_C[d] + b_C[d, :, c]                  # (N,)
    y     = (S6_f(u_f) + S6_r(u_r, scanned c = E-1..0)) * SiLU(gate_proj(x))
    out   = out_proj(y)                      # E -> C

Everything between the two projections (both convs, Δ/B/C, both scans, the gate) is one call of
``vim2_kernels.channel_mixer_scan``: on CPU a fused kernel that never materialises the per-token B/C
(``(T, N, E)`` per direction) or the conv outputs; elsewhere the same computation through
``vim2_kernels.bidirectional_scan`` with batch = B*H*W tokens, dim = 1, L = E. The reverse direction is
exactly "flip the sequence, apply a causal conv and a forward S6 with the reverse parameters, flip
back" (tested), without materialising any flipped tensor.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

import vim2_kernels

from .inplace import can_overwrite, map_token_chunks
from .recompute import recomputed_in_backward
from .token_mixer import init_a_log, init_dt_bias

__all__ = ['SelectiveChannelMixer']

NUM_DIRECTIONS = 2


class SelectiveChannelMixer(nn.Module):
    """Bidirectional selective scan along each token's expanded channel axis.

    Args:
        dim: input/output channels C.
        hidden_dim: expanded channel width E (sequence length of the channel scan).
        d_state: SSM state size N.
        d_conv: kernel size of the 1-D conv along the channel axis (per direction).
        scan_backend: kernel backend (None = automatic choice of vim2_kernels).
        selective_recompute: in ``forward_normed`` while training, recompute the block's LayerNorm with
            the two input projections in the backward instead of storing the normalised input; False
            stores it.

    Input/output: (B, H, W, C) channels-last tensor.

    Parameters (leading axis 2 = forward, reverse direction):
        in_proj, gate_proj: Linear C -> E;  out_proj: Linear E -> C.
        conv_weight (2, d_conv): tap d_conv-1 multiplies the current position, tap 0 the one d_conv-1
            steps back in the direction's own scan order; conv_bias (2,).
        delta_weight (2,), delta_bias (2, E): Δ_c = softplus(delta_weight * u_c + delta_bias[:, c]).
        B_weight, C_weight (2, N); B_bias, C_bias (2, N, E): position-dependent offsets.
        A_log (2, N), D (2,): one scalar SSM channel per direction (A = -exp(A_log)).
    """

    def __init__(
            self,
            dim: int,
            hidden_dim: int,
            d_state: int = 16,
            d_conv: int = 4,
            scan_backend: Optional[str] = None,
            selective_recompute: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        f32 = {'device': device, 'dtype': torch.float32}
        if hidden_dim < 1:
            raise ValueError(f'hidden_dim (channel-mixer width E) must be >= 1, got {hidden_dim}')
        if d_state < 1:
            raise ValueError(f'd_state must be a positive int, got {d_state}')
        if d_conv < 1:
            raise ValueError(f'd_conv must be a positive int, got {d_conv}')
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.d_state = d_state
        self.d_conv = d_conv
        self.scan_backend = scan_backend
        self.selective_recompute = selective_recompute

        self.in_proj = nn.Linear(dim, hidden_dim, bias=False, **dd)
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False, **dd)
        self.conv_weight = nn.Parameter(torch.empty(NUM_DIRECTIONS, d_conv, **dd))
        self.conv_bias = nn.Parameter(torch.empty(NUM_DIRECTIONS, **dd))
        self.delta_weight = nn.Parameter(torch.empty(NUM_DIRECTIONS, **dd))
        self.delta_bias = nn.Parameter(torch.empty(NUM_DIRECTIONS, hidden_dim, **f32))
        self.B_weight = nn.Parameter(torch.empty(NUM_DIRECTIONS, d_state, **dd))
        self.B_bias = nn.Parameter(torch.empty(NUM_DIRECTIONS, d_state, hidden_dim, **dd))
        self.C_weight = nn.Parameter(torch.empty(NUM_DIRECTIONS, d_state, **dd))
        self.C_bias = nn.Parameter(torch.empty(NUM_DIRECTIONS, d_state, hidden_dim, **dd))
        self.A_log = nn.Parameter(torch.empty(NUM_DIRECTIONS, d_state, **f32))
        self.D = nn.Parameter(torch.empty(NUM_DIRECTIONS, **f32))
        self.out_proj = nn.Linear(hidden_dim, dim, bias=False, **dd)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """Init of the conv and scan parameters (the Linear layers are set by the model's init).

        conv: nn.Conv1d's default for one input channel; w_Δ, w_B, w_C: nn.Linear's default for one
        input feature, U(-1, 1) (as Mamba's x_proj); B/C offsets zero, so the mixer starts as a
        content-only selective scan; Δ offsets softplus^-1(dt), dt log-uniform in [1e-3, 0.1] per
        position; A_log = log(1..N); D = 1.
        """
        bound = self.d_conv ** -0.5
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.uniform_(self.conv_bias, -bound, bound)
        nn.init.uniform_(self.delta_weight, -1.0, 1.0)
        nn.init.uniform_(self.B_weight, -1.0, 1.0)
        nn.init.uniform_(self.C_weight, -1.0, 1.0)
        nn.init.zeros_(self.B_bias)
        nn.init.zeros_(self.C_bias)
        self.delta_bias.copy_(init_dt_bias(self.delta_bias.shape, device=self.delta_bias.device))
        self.A_log.copy_(init_a_log((NUM_DIRECTIONS,), self.d_state, device=self.A_log.device))
        self.D.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        tokens = x.reshape(-1, self.dim)
        # Every token is mixed on its own: without autograd, chunks of tokens at a time (inference peak)
        mix = map_token_chunks if can_overwrite(x, self.parameters()) else (lambda fn, t: fn(t))
        return mix(self._mix_tokens, tokens).view(*x.shape[:-1], -1)

    def forward_normed(self, norm: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``forward(norm(x))``. With ``selective_recompute`` and autograd recording, ``norm`` and the two
        input projections are one recomputed region: ``norm(x)``, which the projections' backward would
        otherwise keep, is not stored (a ``MixerBlock`` passes its LayerNorm)."""
        if not self.selective_recompute or can_overwrite(x, self.parameters()):
            return self.forward(norm(x))  # (forward decides for norm(x), whose graph may need recording)
        v, z = recomputed_in_backward(lambda x_: self._project_in(norm(x_).reshape(-1, self.dim)), x)
        return self._mix_projected(v, z).view(*x.shape[:-1], -1)

    def _mix_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, C) -> (tokens, C)."""
        return self._mix_projected(*self._project_in(x))

    def _project_in(self, x: torch.Tensor):
        """(tokens, C) -> the scan input v and the gate z, (tokens, E) each."""
        return self.in_proj(x), self.gate_proj(x)

    def _mix_projected(self, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Scan input v and gate z (tokens, E) -> (tokens, C)."""
        y = vim2_kernels.channel_mixer_scan(
            v, z.to(v.dtype), self.conv_weight, self.conv_bias, self.delta_weight, self.delta_bias,
            self.B_weight, self.B_bias, self.C_weight, self.C_bias,
            -torch.exp(self.A_log.float()), self.D.float(), backend=self.scan_backend,
        )
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, hidden_dim={self.hidden_dim}, d_state={self.d_state}, d_conv={self.d_conv}, '
                f'scan_backend={self.scan_backend}, selective_recompute={self.selective_recompute}')
