"""Shared setup for the ViM2 model tests."""
import pytest
import torch

import vim2.models  # noqa: F401  registers the vim2 models with timm


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
