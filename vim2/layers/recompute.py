"""Selective recomputation: a region whose intermediates autograd does not keep; the backward reruns it.

The mixers use it for cheap per-token work whose outputs are full (B, H, W, width) maps (projections,
convs, activations, gates, the block's LayerNorm): recomputing them costs a few
per cent of a training step and saves most of what the step would keep (docs/architecture.md).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ['recomputed_in_backward']


def recomputed_in_backward(fn, *args: torch.Tensor):
    """``fn(*args)``, its intermediates not kept by autograd: the backward runs ``fn`` again (non-reentrant
    checkpoint, which keeps only ``args``; ``fn`` must draw no random numbers, so no RNG state is saved).
    ``fn`` may return a tensor or a tuple of tensors."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
