"""ViM2 model family; importing this registers the models with timm."""
from .vim2 import ARCH_SETTINGS, ViM2, checkpoint_filter_fn

__all__ = ['ARCH_SETTINGS', 'ViM2', 'checkpoint_filter_fn']
