"""Fixtures of the OpenMMLab integration tests (tests/mm); helpers live in mm_helpers.py.

Every test module except test_import.py needs the OpenMMLab stack and skips as a whole, with the
missing packages named, when it is absent (``bash tools/setup_env.sh --mm`` installs it).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mm_helpers import SYNTHETIC_IMAGE_SIZE, load_synthetic_data_tool


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """Root with coco/ and ade/ADEChallengeData2016/ written by tools/make_synthetic_mm_data.py.

    Two training images (one fixed batch, so a few iterations must lower the loss) and two
    validation images per dataset.
    """
    root = tmp_path_factory.mktemp("synthetic_mm_data")
    tool = load_synthetic_data_tool()
    tool.main(["--out", str(root), "--num-train", "2", "--num-val", "2",
               "--size", str(SYNTHETIC_IMAGE_SIZE), "--seed", "0"])
    return root


@pytest.fixture(autouse=True)
def _single_thread_env(monkeypatch):
    # Shared 2-core CI machines: subprocesses started by the tests stay single-threaded too.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
