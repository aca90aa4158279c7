"""Constants and helpers of the OpenMMLab integration tests (imported by tests/mm modules)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import List

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MM_CONFIGS = REPO_ROOT / "mm_configs"
MM_PACKAGES = ("mmengine", "mmcv", "mmdet", "mmseg", "pycocotools")

# A small ViM2 (same code as ViM2-T, fewer/narrower layers) that keeps CPU runs to seconds.
TINY_ARCH = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), d_state=4)
TINY_WIDTHS = list(TINY_ARCH["embed_dims"])
# Image side of the synthetic datasets: stage 1 of the backbone scans 16x16 tokens.
SYNTHETIC_IMAGE_SIZE = 64


def missing_mm_packages() -> List[str]:
    return [name for name in MM_PACKAGES if importlib.util.find_spec(name) is None]


def skip_without_mm() -> None:
    """Module-level skip naming what is missing (call at the top of a test module)."""
    missing = missing_mm_packages()
    if missing:
        pytest.skip(
            f"OpenMMLab stack not installed (missing: {', '.join(missing)}); "
            "install it with `bash tools/setup_env.sh --mm`",
            allow_module_level=True)


def load_synthetic_data_tool():
    """tools/make_synthetic_mm_data.py as a module (tools/ is not a package)."""
    path = REPO_ROOT / "tools" / "make_synthetic_mm_data.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_mm_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module
