"""OpenMMLab integration: ViM2 as a backbone for mmdetection 3.x and mmsegmentation 1.x.

``import vim2.mm`` registers :class:`~vim2.mm.backbone.ViM2Backbone` as ``type='ViM2'`` in the
``MODELS`` registry of mmdet and of mmseg, each only when that library imports (either one alone
is enough). Configs load it with::

    custom_imports = dict(imports=['vim2.mm'], allow_failed_imports=False)

:data:`REGISTERED_IN` names the libraries it was registered in. Needs mmengine and mmcv (install
with ``bash tools/setup_env.sh --mm`` or ``pip install "vim2[mm]"``); ``import vim2`` alone never
imports any OpenMMLab package.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Tuple

INSTALL_HINT = (
    "install the OpenMMLab stack with `bash tools/setup_env.sh --mm` (from a vim2 checkout; it builds "
    "mmcv 2.1.0 with its compiled ops) or `pip install \"vim2[mm]\"` (needs an mmcv build matching your torch)"
)


def _require(package: str) -> None:
    try:
        importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"vim2.mm needs the OpenMMLab package '{package}', which could not be imported ({err}); "
            f"{INSTALL_HINT}.") from err


_require("mmengine")
_require("mmcv")

from .backbone import ViM2Backbone, read_checkpoint_state_dict  # noqa: E402

#: The name configs use: ``backbone=dict(type='ViM2', ...)``.
BACKBONE_NAME = "ViM2"
#: Libraries whose MODELS registry now has ``ViM2`` (subset of ``('mmdet', 'mmseg')``).
REGISTERED_IN: Tuple[str, ...] = ()


def _register_into(library: str) -> bool:
    """Registers the backbone in ``<library>.registry.MODELS``; False when the library is absent."""
    try:
        registry_module = importlib.import_module(f"{library}.registry")
    except ModuleNotFoundError as err:
        if err.name in (library, f"{library}.registry"):
            return False  # not installed: fine, the other library may be
        warnings.warn(f"vim2.mm: {library} is installed but failed to import ({err!r}); "
                      f"ViM2 is not registered for {library}", RuntimeWarning, stacklevel=3)
        return False
    except Exception as err:  # e.g. mmdet's assertion on an incompatible mmcv version
        warnings.warn(f"vim2.mm: {library} is installed but failed to import ({err!r}); "
                      f"ViM2 is not registered for {library}", RuntimeWarning, stacklevel=3)
        return False
    models = registry_module.MODELS
    if models.module_dict.get(BACKBONE_NAME) is not ViM2Backbone:
        models.register_module(name=BACKBONE_NAME, module=ViM2Backbone)
    return True


REGISTERED_IN = tuple(lib for lib in ("mmdet", "mmseg") if _register_into(lib))

__all__ = ["ViM2Backbone", "read_checkpoint_state_dict", "BACKBONE_NAME", "REGISTERED_IN", "INSTALL_HINT"]
