"""vim2_kernels: the selective-scan (Mamba S6) kernel package.

Public API (shapes documented on each function):

* :func:`selective_scan_fn` — drop-in for ``mamba_ssm.selective_scan_fn`` plus ``initial_state``,
  ``reverse`` and ``backend`` extensions.
* :func:`cross_scan_2d` — multi-route 2-D scan of a (batch, H, W, dim) map, summed over routes.
* :func:`bidirectional_scan` — forward + reverse scans with separate parameters, summed.
* :func:`channel_mixer_scan` — ViM2's channel mixer core (conv, affine Δ/B/C, bidirectional scan, gate)
  fused into one op (one C kernel on CPU).
* :func:`selective_scan_reference` — the plain-loop oracle (any dtype, float64 included).
* :func:`backend_status` / ``python -m vim2_kernels`` — which backends can run here, and why not.

Backends: ``triton`` (CUDA default), ``cpu`` (compiled C, CPU default), ``torch`` (pure PyTorch), ``reference``; choose per call with
``backend=`` or globally with the ``VIM2_SCAN_BACKEND`` environment variable.
This package depends on torch only (triton optional); it never imports vim2, timm or OpenMMLab.
"""
from .bidirectional import bidirectional_scan
from .channel_mixer import channel_mixer_scan
from .cross_scan import ROUTES, cross_scan_2d
from .selective_scan import (
    BACKEND_ENV_VAR,
    BACKEND_NAMES,
    BackendUnavailableError,
    backend_status,
    resolve_backend,
    selective_scan_fn,
    selective_scan_reference,
)

__version__ = "0.1.0"

__all__ = [
    "BACKEND_ENV_VAR",
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "ROUTES",
    "backend_status",
    "bidirectional_scan",
    "channel_mixer_scan",
    "cross_scan_2d",
    "resolve_backend",
    "selective_scan_fn",
    "selective_scan_reference",
]
