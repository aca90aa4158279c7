#!/usr/bin/env python
"""Parameter and FLOP counts of the registered ViM2 models (the table in docs/architecture.md).

FLOPs are counted for one image with ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add is
2 FLOPs; matmuls, linear layers and convolutions are counted, element-wise ops are not, as in
fvcore/timm tables). The selective scans run inside ``vim2_kernels`` custom ops that a dispatch-mode
counter cannot see into, so while counting, ``vim2_kernels.cross_scan_2d`` and
``vim2_kernels.channel_mixer_scan`` are replaced by stubs that return zeros of the right shape and add
an analytic count (see ``scan_flops``). Everything runs on the 'meta' device: no weights are
allocated and nothing is computed, so the whole table takes seconds.

Usage:
    python tools/count_params_flops.py                      # markdown table at 224x224
    python tools/count_params_flops.py --size 512 --models vim2_tiny
    python tools/count_params_flops.py --update-doc docs/architecture.md   # rewrite the table there
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import vim2_kernels
import vim2.models  # noqa: F401  registers the models

TABLE_START = '<!-- params-flops-table:start -->'
TABLE_END = '<!-- params-flops-table:end -->'
PAPER_PARAMS_M = {'vim2_tiny': '20', 'vim2_small': '43', 'vim2_base': '74', 'vim2_mlp': '40', 'test_vim2': '-'}

# FLOPs of one S6 step per state element: exp(Δ·A) (mul + exp), (Δ·u)·B (mul), h = dA·h + dBu
# (mul + add), y += C·h (mul + add)  -> 7.  Per (batch, dim, step): Δ + bias, softplus, Δ·u, D·u + y -> 5.
FLOPS_PER_STATE = 7
FLOPS_PER_STEP = 5


def scan_flops(batch: int, dim: int, length: int, d_state: int) -> int:
    """Analytic FLOPs of one selective scan of (batch, dim, length) with state size d_state."""
    return batch * dim * length * (FLOPS_PER_STATE * d_state + FLOPS_PER_STEP)


class ScanCounter:
    """Stubs for the vim2_kernels scans that count FLOPs instead of computing."""

    def __init__(self):
        self.flops = 0

    def cross_scan_2d(self, u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True,
                      routes=vim2_kernels.ROUTES, *, delta_proj_weight=None, backend=None):
        batch, height, width, dim = u.shape
        num_routes, _, d_state = A.shape
        self.flops += num_routes * scan_flops(batch, dim, height * width, d_state)
        if delta_proj_weight is not None:
            # the Δ projection (dt_proj) runs inside the scan's kernel; the same einsum on the meta
            # device lets the FLOP counter count it as the dense matmul it is
            torch.einsum('bhwkr,kdr->bhwkd', delta, delta_proj_weight)
        self.flops += (num_routes - 1) * batch * height * width * dim  # summing the routes
        return torch.zeros_like(u)

    def channel_mixer_scan(self, v, z, conv_weight, conv_bias, delta_weight, delta_bias, B_weight, B_bias,
                           C_weight, C_bias, A, D, *, backend=None):
        tokens, length = v.shape
        d_state, width = A.shape[-1], conv_weight.shape[-1]
        self.flops += 2 * scan_flops(tokens, 1, length, d_state)
        self.flops += tokens * length * 4  # sum of directions, SiLU(z) (~2), gating
        # Inside the fused op, per direction: the channel conv (K multiply-adds per position) and the
        # Δ/B/C "projections" of each scalar u_c (u·w + b: they play the role of x_proj).
        self.flops += 2 * tokens * length * 2 * width
        self.flops += 2 * tokens * length * 2 * (2 * d_state + 1)
        return torch.zeros_like(v)


@contextlib.contextmanager
def counting_scans() -> Iterator[ScanCounter]:
    counter = ScanCounter()
    saved = vim2_kernels.cross_scan_2d, vim2_kernels.channel_mixer_scan
    vim2_kernels.cross_scan_2d = counter.cross_scan_2d
    vim2_kernels.channel_mixer_scan = counter.channel_mixer_scan
    try:
        yield counter
    finally:
        vim2_kernels.cross_scan_2d, vim2_kernels.channel_mixer_scan = saved


def count_model(name: str, size: int = 224, **kwargs) -> Dict[str, float]:
    """{'params': count, 'dense_flops': counted by FlopCounterMode, 'scan_flops': analytic, 'flops': sum}."""
    model = timm.create_model(name, device='meta', **kwargs).eval()
    params = sum(p.numel() for p in model.parameters())
    x = torch.empty(1, model.in_chans, size, size, device='meta')
    with counting_scans() as scans, FlopCounterMode(display=False) as dense, torch.no_grad():
        model(x)
    dense_flops = dense.get_total_flops()
    return dict(params=params, dense_flops=dense_flops, scan_flops=scans.flops, flops=dense_flops + scans.flops)


def markdown_table(names: List[str], size: int) -> str:
    lines = [
        f'| model | params (M) | paper params (M) | GFLOPs @{size} (dense, counted) | GFLOPs (scans, analytic) '
        f'| GFLOPs total | GMACs (= total / 2) |',
        '|---|---:|---:|---:|---:|---:|---:|',
    ]
    for name in names:
        c = count_model(name, size)
        lines.append(
            f"| {name} | {c['params'] / 1e6:.2f} | {PAPER_PARAMS_M.get(name, '-')} | {c['dense_flops'] / 1e9:.2f} "
            f"| {c['scan_flops'] / 1e9:.2f} | {c['flops'] / 1e9:.2f} | {c['flops'] / 2e9:.2f} |"
        )
    return '\n'.join(lines)


def update_doc(path: Path, table: str) -> None:
    text = path.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f'{path} has no {TABLE_START} ... {TABLE_END} block to replace')
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    path.write_text(f'{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}')


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', type=int, default=224, help='square input size (default 224)')
    parser.add_argument('--models', nargs='*', default=None,
                        help='model names (default: every registered vim2 model)')
    parser.add_argument('--update-doc', type=Path, default=None,
                        help='rewrite the table between the params-flops-table markers of this markdown file')
    args = parser.parse_args(argv)
    names = args.models or ['vim2_tiny', 'vim2_small', 'vim2_base', 'vim2_mlp', 'test_vim2']
    table = markdown_table(names, args.size)
    print(table)
    if args.update_doc is not None:
        update_doc(args.update_doc, table)
        print(f'updated {args.update_doc}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
