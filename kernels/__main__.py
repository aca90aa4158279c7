"""``python -m vim2_kernels``: versions, devices and which selective-scan backends can run here."""
from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__
from .selective_scan.dispatch import BACKEND_ENV_VAR, backend_status, requested_backend, resolve_backend


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def report() -> str:
    lines = [
        f"vim2_kernels {__version__}",
        f"python       {platform.python_version()} ({platform.system()} {platform.machine()})",
        f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton       {_triton_version()}  (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')})",
        f"{BACKEND_ENV_VAR}={os.environ.get(BACKEND_ENV_VAR, '') or 'unset (auto)'}",
    ]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        lines.append(f"\ndevice {device} ({name})")
        for backend, reason in backend_status(device).items():
            lines.append(f"  {backend:<10} {'usable' if reason is None else 'unusable: ' + reason}")
            if backend == "cpu" and reason is None:
                from .selective_scan import cpu_backend
                lines.append(f"             compiled: {cpu_backend.library_info()}")
        try:
            chosen = resolve_backend(None, device, torch.float32)
            lines.append(f"  -> float32 inputs here use the '{chosen}' backend "
                         f"(requested: {requested_backend(None)[0]})")
        except Exception as exc:  # an explicit request that cannot run here: say so, do not crash
            lines.append(f"  -> error: {exc}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
