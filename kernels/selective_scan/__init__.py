"""The selective scan (Mamba S6): public function, backends and dispatch."""
from .dispatch import BACKEND_ENV_VAR, BACKEND_NAMES, BackendUnavailableError, backend_status, resolve_backend
from .interface import selective_scan_fn
from .reference import selective_scan_reference

__all__ = [
    "BACKEND_ENV_VAR",
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "backend_status",
    "resolve_backend",
    "selective_scan_fn",
    "selective_scan_reference",
]
