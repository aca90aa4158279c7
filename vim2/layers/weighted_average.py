"""Weighted averaging of earlier outputs inside a ViM2 stage (paper Eq. 19-20).

The paper feeds every token/channel mixer of a stage a learned linear combination of ALL earlier
mixer outputs of that stage (the stage input counts as output 0)::

    x_tok(l) = sum_{i<l}  alpha[l,i] y_tok(i) + sum_{i<l}  beta[l,i]  y_ch(i)
    x_ch(l)  = sum_{i<=l} theta[l,i] y_tok(i) + sum_{i<l}  gamma[l,i] y_ch(i)

We order a stage's mixers as one sequence of units (token, token, channel, ... ; the pairing is a
model argument) with outputs o_0 = stage input, o_1, o_2, ...; unit m reads

    x_m = sum_{j<m} w[m, j] o_j                     (one learnable scalar per pair, no normalisation)

which is Eq. 19-20 for any pairing. The paper's separate alpha[l,0]/beta[l,0] (and theta/gamma) both
multiply the stage input y_tok(0) = y_ch(0), so they are one scalar here. The initial state is the
plain sequential residual stack: w[m, m-1] = 1, all others 0.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .inplace import can_overwrite

__all__ = ['WeightedInputAverage']


class WeightedInputAverage(nn.Module):
    """Learned combination of the ``num_inputs`` earlier outputs of a stage (Eq. 19-20).

    Parameter ``weight`` (num_inputs,): weight[j] multiplies earlier output j (0 = stage input);
    initialised to (0, ..., 0, 1), i.e. the input is just the previous output.
    """

    def __init__(self, num_inputs: int, device=None, dtype=None):
        super().__init__()
        if num_inputs < 1:
            raise ValueError(f'num_inputs must be >= 1, got {num_inputs}')
        self.num_inputs = num_inputs
        self.weight = nn.Parameter(torch.empty(num_inputs, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Plain sequential chain: all weight on the immediately preceding output."""
        self.weight.zero_()
        self.weight[-1] = 1.0

    def forward(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """outputs: ``num_inputs`` tensors of one shape (oldest first) -> their weighted sum."""
        self._check_count(outputs)
        weight = self.weight
        x = outputs[0] * weight[0]
        inplace = can_overwrite(x, ())
        for j in range(1, self.num_inputs):
            # one fused multiply-add per input; in place when no autograd graph is recorded
            x = x.addcmul_(outputs[j], weight[j]) if inplace else torch.addcmul(x, outputs[j], weight[j])
        return x

    def add_to_(self, y: torch.Tensor, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """``y += forward(outputs)`` in place, without the weighted sum as a tensor of its own (inference:
        lets a block drop its averaged input while its mixer runs and rebuild the residual here)."""
        self._check_count(outputs)
        for output, weight in zip(outputs, self.weight):
            y.addcmul_(output, weight)
        return y

    def _check_count(self, outputs: Sequence[torch.Tensor]) -> None:
        if len(outputs) != self.num_inputs:
            raise ValueError(f'expected {self.num_inputs} earlier outputs, got {len(outputs)}')

    def extra_repr(self) -> str:
        return f'num_inputs={self.num_inputs}'
