"""vim2: Vision MambaMixer (ViM2) backbones.

Importing ``vim2`` registers the ViM2 family with timm (``vim2_tiny``, ``vim2_small``, ``vim2_base``,
``vim2_mlp``, ``test_vim2``). The OpenMMLab adapters live in ``vim2.mm`` and are imported only on
request (configs use ``custom_imports=dict(imports=['vim2.mm'])``), so ``import vim2`` needs no mm package.
"""
from . import models
from .models import ARCH_SETTINGS, ViM2, checkpoint_filter_fn

__version__ = "0.1.0"

__all__ = ["ARCH_SETTINGS", "ViM2", "checkpoint_filter_fn", "models"]
