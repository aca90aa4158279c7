"""Backend selection for the selective scan.

Four backends implement the same contract (see ``interface.py``):

* ``triton``    — Triton kernels, the default on CUDA (also runs on CPU under ``TRITON_INTERPRET=1``).
* ``cpu``       — C kernels compiled on first use by the machine's C compiler, the default on CPU for
  float32/float16/bfloat16 (see ``cpu_backend.py``).
* ``torch``     — chunked pure-PyTorch scan: the CPU fallback (no compiler), float64, and the fallback
  everywhere.
* ``reference`` — a plain loop, any dtype including float64: the test oracle.

The choice is, in order of precedence: the ``backend=`` argument of a call, the ``VIM2_SCAN_BACKEND``
environment variable, then ``auto`` (by device and availability). A backend that was asked for by name
and cannot serve the input raises an error that says why; when ``auto`` has to fall back from the
backend it expected, it warns once with the reason instead of silently going slow.
"""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache
from types import ModuleType
from typing import Dict, Optional

import torch

BACKEND_ENV_VAR = "VIM2_SCAN_BACKEND"
BACKEND_NAMES = ("cpu", "torch", "triton", "reference")
_CHOICES = ("auto",) + BACKEND_NAMES
_MODULES = {"cpu": "cpu_backend", "torch": "torch_backend", "triton": "triton_backend", "reference": "reference"}


class BackendUnavailableError(RuntimeError):
    """A scan backend that was requested by name cannot serve this input."""


@lru_cache(maxsize=None)
def _import_backend(name: str):
    """Returns (module, None) or (None, reason). Cached: imports are attempted once."""
    try:
        return importlib.import_module(f"{__package__}.{_MODULES[name]}"), None
    except ImportError as exc:  # e.g. the triton backend on a machine without triton
        return None, f"cannot import the {name} backend: {exc}"
    except Exception as exc:  # e.g. a Triton too old or broken for the kernel definitions: other backends stay usable
        return None, f"cannot import the {name} backend: {type(exc).__name__}: {exc}"


def get_backend_module(name: str) -> ModuleType:
    module, reason = _import_backend(name)
    if module is None:
        raise BackendUnavailableError(reason)
    return module


def _device_reason(name: str, device: torch.device) -> Optional[str]:
    module, reason = _import_backend(name)
    if module is None:
        return reason
    return module.unavailable_reason(device)


def backend_status(device: Optional[torch.device] = None) -> Dict[str, Optional[str]]:
    """{backend name: None if usable on ``device`` else the reason it is not}."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {name: _device_reason(name, torch.device(device)) for name in BACKEND_NAMES}


def requested_backend(backend: Optional[str]) -> tuple:
    """(name, source) of the backend asked for: the argument, else the env variable, else 'auto'."""
    if backend is not None:
        source = "the backend= argument"
    else:
        backend = os.environ.get(BACKEND_ENV_VAR, "") or "auto"
        source = f"the {BACKEND_ENV_VAR} environment variable"
    name = backend.lower()
    if name not in _CHOICES:
        raise ValueError(f"unknown selective-scan backend {backend!r} (from {source}); expected one of {_CHOICES}")
    return name, source


_warned = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


@lru_cache(maxsize=64)
def _resolve(name: str, source: str, device_type: str, dtype: torch.dtype) -> str:
    device = torch.device(device_type)
    if name != "auto":
        reason = _device_reason(name, device) or _dtype_reason(name, dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"selective-scan backend {name!r} was requested by {source} but cannot run on "
                f"{device_type} {dtype} inputs: {reason}. Use backend='auto' to pick one that can."
            )
        return name
    if device_type == "cuda":
        expected = "triton"
    elif device_type == "cpu" and dtype != torch.float64:
        expected = "cpu"
    else:  # float64 (oracles, gradcheck) and other devices: the pure-PyTorch scan by design
        expected = "torch"
    reason = _device_reason(expected, device) or _dtype_reason(expected, dtype)
    if reason is None:
        return expected
    fallback = "torch" if expected != "torch" else "reference"
    _warn_once(
        f"vim2_kernels: the {expected} selective-scan backend cannot serve {device_type} {dtype} inputs "
        f"({reason}); falling back to the slower {fallback} backend."
    )
    return fallback


def _dtype_reason(name: str, dtype: torch.dtype) -> Optional[str]:
    supported = getattr(get_backend_module(name), "SUPPORTED_DTYPES", None)
    if supported is not None and dtype not in supported:
        return f"it supports {', '.join(str(d).replace('torch.', '') for d in supported)} inputs only"
    return None


@torch.compiler.assume_constant_result
def resolve_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype,
                    d_state: Optional[int] = None) -> str:
    """The backend that will run an input on ``device`` with ``dtype`` (see the module docstring).

    With ``d_state``, a backend that cannot take that state size (its ``MAX_D_STATE``) is replaced by
    torch when chosen automatically (one warning), or raises when it was requested by name.
    """
    name, source = requested_backend(backend)
    chosen = _resolve(name, source, torch.device(device).type, dtype)
    limit = getattr(get_backend_module(chosen), "MAX_D_STATE", None)
    if d_state is None or limit is None or d_state <= limit:
        return chosen
    reason = f"the {chosen} backend supports d_state (N) <= {limit}, got N={d_state}"
    if name != "auto":
        raise BackendUnavailableError(f"selective-scan backend {chosen!r} was requested by {source} but {reason}")
    _warn_once(f"vim2_kernels: {reason}; falling back to the torch backend.")
    return "torch"
