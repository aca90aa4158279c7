"""ViM2 as an OpenMMLab backbone (mmdet 3.x / mmseg 1.x).

:class:`ViM2Backbone` wraps an unmodified :class:`vim2.models.vim2.ViM2` (the very model the timm
names ``vim2_tiny``/``vim2_small``/``vim2_base`` build) and adds only what OpenMMLab detectors and
segmentors expect from a backbone: a tuple of NCHW stage outputs with one norm per output,
``frozen_stages``, ``norm_eval``, ``with_cp`` and ``init_cfg=dict(type='Pretrained', ...)`` that
reads timm-format (``.safetensors``/``.pth``, including ``vim2-export`` directories) and mm-format
(``backbone.``-prefixed) checkpoints from a path or URL.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import os
import os.path as osp
import pickle
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.runner import CheckpointLoader

from vim2.models import vim2 as vim2_models
from vim2.weights import describe_state_dict_mismatch

__all__ = ["ViM2Backbone", "read_checkpoint_state_dict"]

# Normalisation layers that `norm_eval` puts in eval mode. Only the ones with running statistics
# (batch norms) behave differently in eval mode; the others are listed so that "every norm of the
# backbone is in eval mode" holds literally.
NORM_LAYER_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)

# Files looked for, in order, when a checkpoint path is a directory (a `vim2-export` directory).
CHECKPOINT_FILES_IN_DIR = ("model.safetensors", "pytorch_model.bin", "model.pth")
HOW_TO_GET_WEIGHTS = (
    "No ViM2 weights are published: train a classifier (vim2-train / tools/train.py) and export it "
    "(vim2-export / tools/export_weights.py), then pass the file with "
    "--cfg-options model.backbone.init_cfg.checkpoint=/path/to/model.safetensors, or train the "
    "backbone from scratch with --cfg-options model.backbone.init_cfg=None."
)


def _is_url(path: str) -> bool:
    return urlparse(path).scheme in ("http", "https")


def _cached_download(url: str) -> str:
    """Downloads ``url`` once into torch.hub's checkpoint cache and returns the local path."""
    cache_dir = osp.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(cache_dir, exist_ok=True)
    # Hub-style URLs share file names (model.safetensors): key the cache by the whole URL.
    url_key = hashlib.sha256(url.encode()).hexdigest()[:16]
    local = osp.join(cache_dir, f"{url_key}-{osp.basename(urlparse(url).path)}")
    if not osp.isfile(local):
        torch.hub.download_url_to_file(url, local, progress=False)
    return local


def _unwrap_state_dict(checkpoint: Any, source: str) -> Dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint file (mmengine/timm training checkpoints nest it)."""
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model", "module"):
            if key in checkpoint and isinstance(checkpoint[key], Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise ValueError(f"checkpoint {source!r} holds no state dict (got {type(checkpoint).__name__})")
    state_dict = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise ValueError(f"checkpoint {source!r} holds no tensors")
    # Checkpoints saved from DistributedDataParallel-wrapped models.
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _load_pickled(checkpoint: str, map_location: str, trust_pickle: bool) -> Any:
    """torch-pickled checkpoint via mmengine's CheckpointLoader (or torch with ``trust_pickle``)."""
    if trust_pickle and (_is_url(checkpoint) or not urlparse(checkpoint).scheme):
        if _is_url(checkpoint):
            return torch.hub.load_state_dict_from_url(checkpoint, map_location=map_location, weights_only=False)
        return torch.load(checkpoint, map_location=map_location, weights_only=False)
    try:
        return CheckpointLoader.load_checkpoint(checkpoint, map_location=map_location)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err):
            raise
        raise ValueError(
            f"checkpoint {checkpoint!r} holds pickled Python objects besides tensors (an mmengine training "
            "checkpoint keeps its message hub and optimizer state), which torch >= 2.6 refuses to load "
            "with weights_only=True. If you trust the file, add trust_pickle=True to the backbone's "
            "init_cfg (or set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1).") from err


def read_checkpoint_state_dict(checkpoint: str, map_location: str = "cpu",
                               trust_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Reads the state dict of a checkpoint given as a local path, a directory or a URL.

    ``.safetensors`` files are read with :func:`safetensors.torch.load_file` (URLs are downloaded
    once into torch.hub's cache); anything else goes through mmengine's
    :class:`~mmengine.runner.CheckpointLoader` (local files, ``http(s)://``, ``open-mmlab://``,
    ``torchvision://``, ...), which loads with torch's default ``weights_only=True``;
    ``trust_pickle=True`` allows arbitrary pickled objects (full mmengine training checkpoints) for
    local files and http(s) URLs. A directory must contain one of ``model.safetensors``,
    ``pytorch_model.bin`` or ``model.pth`` (``vim2-export`` writes ``model.safetensors`` and records
    its sha256, which is verified first).

    Returns:
        ``{name: tensor}`` on ``map_location``, unwrapped from ``state_dict``/``model`` keys and
        with a DistributedDataParallel ``module.`` prefix removed.
    """
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"init_cfg checkpoint must be a path or URL string, got {type(checkpoint).__name__}")
    checkpoint = os.fspath(checkpoint)
    if checkpoint.startswith("file://"):
        checkpoint = urlparse(checkpoint).path
    if not urlparse(checkpoint).scheme or osp.exists(checkpoint):  # osp.exists: Windows drive letters
        checkpoint = osp.expanduser(checkpoint)
        if osp.isdir(checkpoint):
            found = [osp.join(checkpoint, n) for n in CHECKPOINT_FILES_IN_DIR if osp.isfile(osp.join(checkpoint, n))]
            if not found:
                raise FileNotFoundError(
                    f"checkpoint directory {checkpoint!r} contains none of {CHECKPOINT_FILES_IN_DIR}")
            checkpoint = found[0]
            if osp.isfile(osp.join(osp.dirname(checkpoint), "config.json")):
                from vim2.weights import verify_export_dir

                try:  # a `vim2-export` directory records each file's sha256: check before loading
                    verify_export_dir(osp.dirname(checkpoint))
                except ValueError:
                    pass  # a config.json without vim2's checksum record: nothing to verify
        elif not osp.isfile(checkpoint):
            raise FileNotFoundError(f"ViM2 checkpoint {checkpoint!r} does not exist. {HOW_TO_GET_WEIGHTS}")
    if checkpoint.endswith(".safetensors"):
        from safetensors.torch import load_file

        local = _cached_download(checkpoint) if _is_url(checkpoint) else checkpoint
        loaded: Any = load_file(local, device=str(map_location))
    else:
        loaded = _load_pickled(checkpoint, str(map_location), trust_pickle)
    return _unwrap_state_dict(loaded, checkpoint)


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


class ViM2Backbone(BaseModule):
    """ViM2 backbone for OpenMMLab detectors/segmentors (registered as ``type='ViM2'``).

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` (the paper's Table 8, i.e.
            ``vim2.models.vim2.ARCH_SETTINGS``) or a dict of :class:`~vim2.models.vim2.ViM2`
            constructor arguments (e.g. smaller widths/depths/``d_state`` for tests); unspecified
            arguments take ViM2's defaults.
        out_indices: stage indices (0..num_stages-1, negative counts from the end) whose outputs
            are returned; each gets its own norm (``norm_cfg``). Stages after the last one are
            not built.
        frozen_stages: -1 freezes nothing; 0 freezes the stem; k >= 1 freezes the stem and stages
            0..k-1 (with their output norms): eval mode and ``requires_grad=False``, kept across
            ``train()`` calls.
        norm_eval: put every normalisation layer of the backbone in eval mode during training
            (matters for batch norms' running statistics; LayerNorm has none).
        with_cp: gradient checkpointing of the stages (``ViM2.set_grad_checkpointing``): less
            memory, same outputs and gradients.
        drop_path_rate: stochastic depth rate; ``None`` keeps the arch's value.
        norm_cfg: config of the per-output norm (mmcv ``build_norm_layer``); ``LN`` acts on the
            channel axis of the NCHW map.
        init_cfg: OpenMMLab init config. ``dict(type='Pretrained', checkpoint=PATH_OR_URL)`` loads
            a timm-format ViM2 checkpoint (a classifier's state dict, ``.safetensors`` or ``.pth``,
            or a ``vim2-export`` directory) or an mm-format one (keys under ``backbone.``, e.g. a
            detector trained with this backbone); optional ``prefix`` selects the sub-dict to use,
            ``trust_pickle=True`` reads full mmengine training checkpoints (pickled objects).
            The checkpoint must match the architecture (an error names the mismatching keys).

    Input: images ``(B, 3, H, W)``. Output: tuple of ``(B, C_i, H / s_i, W / s_i)`` float maps for
    ``i`` in ``out_indices`` (``s_i`` = 4, 8, 16, 32; channels in :attr:`out_channels`).
    """

    def __init__(
        self,
        arch: Union[str, Mapping[str, Any]] = "tiny",
        out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        drop_path_rate: Optional[float] = None,
        norm_cfg: Optional[Mapping[str, Any]] = None,
        init_cfg: Optional[Union[Mapping[str, Any], Sequence[Mapping[str, Any]]]] = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        model_kwargs = self._resolve_arch(arch)
        if drop_path_rate is not None:
            if not isinstance(drop_path_rate, (int, float)) or not 0.0 <= drop_path_rate < 1.0:
                raise ValueError(f"drop_path_rate must be a float in [0, 1), got {drop_path_rate!r}")
            model_kwargs["drop_path_rate"] = float(drop_path_rate)
        self.vim2 = vim2_models.ViM2(**model_kwargs)
        num_stages = len(self.vim2.stages)
        self.num_stages = num_stages
        self.out_indices = self._resolve_out_indices(out_indices, num_stages)
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= num_stages:
            raise ValueError(f"frozen_stages must be an int in [-1, {num_stages}], got {frozen_stages!r}")
        self.frozen_stages = frozen_stages
        self.norm_eval = bool(norm_eval)
        self.with_cp = bool(with_cp)

        self.out_channels = [int(self.vim2.feature_info[i]["num_chs"]) for i in self.out_indices]
        self.out_strides = [int(self.vim2.feature_info[i]["reduction"]) for i in self.out_indices]
        self._prune_unused(max(self.out_indices))

        # Default: the LayerNorm ViM2 itself uses (eps 1e-5), so the classifier's final norm can
        # initialise the last output's norm.
        norm_cfg = dict(norm_cfg) if norm_cfg is not None else dict(type="LN")
        self.norm_cfg = norm_cfg
        # out_norms[k] normalises the output of stage out_indices[k].
        self.out_norms = nn.ModuleList(build_norm_layer(norm_cfg, c)[1] for c in self.out_channels)

        if self.with_cp:
            self.vim2.set_grad_checkpointing(True)
        self._freeze_stages()

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _resolve_arch(arch: Union[str, Mapping[str, Any]]) -> Dict[str, Any]:
        settings = vim2_models.ARCH_SETTINGS
        if isinstance(arch, str):
            key = arch.lower()
            if key not in settings:
                raise ValueError(f"arch must be one of {sorted(settings)} or a dict of ViM2 arguments, got {arch!r}")
            return copy.deepcopy(dict(settings[key]))
        if isinstance(arch, Mapping):
            kwargs = copy.deepcopy(dict(arch))
            parameters = inspect.signature(vim2_models.ViM2.__init__).parameters
            takes_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
            accepted = [n for n in parameters if n != "self"]
            unknown = sorted(k for k in kwargs if k not in parameters)
            if unknown and not takes_var_kwargs:
                raise ValueError(f"arch dict has unknown ViM2 arguments {unknown}; accepted: {accepted}")
            return kwargs
        raise TypeError(f"arch must be a str or a dict, got {type(arch).__name__}")

    @staticmethod
    def _resolve_out_indices(out_indices: Union[int, Sequence[int]], num_stages: int) -> Tuple[int, ...]:
        if isinstance(out_indices, int):
            out_indices = (out_indices,)
        if not isinstance(out_indices, Sequence) or not out_indices:
            raise ValueError(f"out_indices must be a non-empty sequence of stage indices, got {out_indices!r}")
        resolved = []
        for index in out_indices:
            if not isinstance(index, int) or not -num_stages <= index < num_stages:
                raise ValueError(f"out_indices entries must be ints in [-{num_stages}, {num_stages - 1}], got {index!r}")
            resolved.append(index % num_stages)
        if len(set(resolved)) != len(resolved) or resolved != sorted(resolved):
            raise ValueError(f"out_indices must be increasing without repeats, got {tuple(out_indices)!r}")
        return tuple(resolved)

    def _prune_unused(self, last_stage: int) -> None:
        """Drops the classifier head, the final norm and the stages after ``last_stage``.

        They would get no gradient (DistributedDataParallel then needs find_unused_parameters).
        """
        self.vim2.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)
        if len(self.vim2.stages) != last_stage + 1:
            raise RuntimeError(f"ViM2.prune_intermediate_layers kept {len(self.vim2.stages)} stages, "
                               f"expected {last_stage + 1}")

    # ------------------------------------------------------------------ train/eval behaviour
    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules: List[nn.Module] = [self.vim2.stem]
        for stage_index in range(min(self.frozen_stages, len(self.vim2.stages))):
            modules.append(self.vim2.stages[stage_index])
            if stage_index in self.out_indices:
                modules.append(self.out_norms[self.out_indices.index(stage_index)])
        return modules

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for parameter in module.parameters():
                parameter.requires_grad = False

    def train(self, mode: bool = True) -> "ViM2Backbone":
        """Sets train/eval mode, keeping frozen stages (and, with ``norm_eval``, norms) in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, NORM_LAYER_TYPES):
                    module.eval()
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``x``: ``(B, 3, H, W)`` images -> tuple of normalised NCHW stage outputs."""
        # ViM2 works channels-last; LayerNorm normalises the last axis, so take NHWC maps when
        # every output norm is a LayerNorm and transpose once, after the norm.
        channels_last = all(isinstance(norm, nn.LayerNorm) for norm in self.out_norms)
        features = self.vim2.forward_intermediates(
            x, indices=list(self.out_indices), norm=False, stop_early=True,
            output_fmt="NHWC" if channels_last else "NCHW", intermediates_only=True)
        if channels_last:
            return tuple(norm(f).permute(0, 3, 1, 2).contiguous() for norm, f in zip(self.out_norms, features))
        return tuple(norm(f) for norm, f in zip(self.out_norms, features))

    # ------------------------------------------------------------------ weights
    def init_weights(self) -> None:
        """Applies ``init_cfg``; a ``Pretrained`` entry loads ViM2 weights via :meth:`load_checkpoint`."""
        init_cfgs = self.init_cfg
        if isinstance(init_cfgs, Mapping):
            init_cfgs = [init_cfgs]
        pretrained = [c for c in (init_cfgs or []) if c.get("type") == "Pretrained"]
        if len(pretrained) > 1:
            raise ValueError(f"init_cfg has more than one Pretrained entry: {pretrained}")
        others = [c for c in (init_cfgs or []) if c.get("type") != "Pretrained"]
        # mmengine's PretrainedInit would load with strict=False and silently skip timm-format
        # keys, so the base class only sees the other entries and the checkpoint is loaded here.
        self.init_cfg = others or None
        try:
            super().init_weights()
        finally:
            self.init_cfg = copy.deepcopy(init_cfgs if init_cfgs is None or len(init_cfgs) != 1
                                          else init_cfgs[0])
        if pretrained:
            cfg = pretrained[0]
            if cfg.get("checkpoint") is None:
                raise ValueError(f"init_cfg {dict(cfg)} has no checkpoint. {HOW_TO_GET_WEIGHTS}")
            unknown = sorted(set(cfg) - {"type", "checkpoint", "prefix", "map_location", "trust_pickle"})
            if unknown:
                raise ValueError(f"init_cfg Pretrained entry has unknown keys {unknown}; accepted: "
                                 "checkpoint, prefix, map_location, trust_pickle")
            self.load_checkpoint(cfg["checkpoint"], prefix=cfg.get("prefix"),
                                 map_location=cfg.get("map_location", "cpu"),
                                 trust_pickle=bool(cfg.get("trust_pickle", False)))

    def load_checkpoint(self, checkpoint: str, prefix: Optional[str] = None, map_location: str = "cpu",
                        trust_pickle: bool = False) -> str:
        """Loads ViM2 weights from a checkpoint path/URL/directory; returns the detected format.

        Accepted layouts (detected from the keys):

        - ``'timm'``: a ViM2 classifier's state dict (``stem.*``, ``stages.*``, ``norm.*``,
          ``head.*``), e.g. ``vim2-export``'s ``model.safetensors`` or a timm training checkpoint.
          The head and pruned stages are ignored; the final ``norm`` initialises the last stage's
          output norm when that stage is an output (it is the norm that stage was trained with).
        - ``'mm'``: keys under ``backbone.`` (an mmdet/mmseg checkpoint of a model using this
          backbone, or of ``mmpretrain.TIMMBackbone`` wrapping a ViM2), or this module's own
          state dict (``vim2.*``, ``out_norms.*``).

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the checkpoint is not a ViM2 checkpoint of this architecture; the message
                lists the missing, unexpected and shape-mismatched keys.
        """
        state_dict = read_checkpoint_state_dict(checkpoint, map_location=map_location, trust_pickle=trust_pickle)
        if prefix:
            selected = _strip_prefix(state_dict, prefix)
            if not selected:
                raise ValueError(f"checkpoint {checkpoint!r} has no keys starting with prefix={prefix!r}")
            state_dict = selected
        elif any(k.startswith("backbone.") for k in state_dict):
            state_dict = _strip_prefix(state_dict, "backbone.")
        if any(k.startswith("timm_model.") for k in state_dict):  # mmpretrain.TIMMBackbone
            state_dict = _strip_prefix(state_dict, "timm_model.")
            if all(k.startswith("model.") for k in state_dict):  # timm's features_only 'getter' wrapper
                state_dict = _strip_prefix(state_dict, "model.")
            # timm's default features_only wrapper flattens 'stages.0' into 'stages_0'
            state_dict = {re.sub(r"^stages_(\d+)\.", r"stages.\1.", k): v for k, v in state_dict.items()}

        if any(k.startswith(("vim2.", "out_norms.")) for k in state_dict):
            layout = "mm"
            body = _strip_prefix(state_dict, "vim2.")
            out_norms = _strip_prefix(state_dict, "out_norms.")
            extra = [k for k in state_dict if not k.startswith(("vim2.", "out_norms."))]
        else:
            layout = "timm"
            body, final_norm = self._split_timm_state_dict(state_dict)
            out_norms = {}
            extra = []
        self._load_body(body, checkpoint, layout, extra)
        if layout == "mm":
            self._load_out_norms(out_norms, checkpoint)
        else:
            self._load_final_norm(final_norm)
        print_log(f"ViM2 backbone: loaded {len(body)} tensors from {checkpoint} ({layout} format)",
                  logger="current")
        return layout

    def _split_timm_state_dict(
            self, state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """timm classifier keys -> (this backbone's ``vim2`` keys, the final norm's tensors)."""
        state_dict = vim2_models.checkpoint_filter_fn(state_dict, self.vim2)
        body: Dict[str, torch.Tensor] = {}
        final_norm: Dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            if key.startswith("head."):
                continue
            if key.startswith("norm."):
                final_norm[key[len("norm."):]] = value
                continue
            body[key] = value
        return body, final_norm

    def _load_final_norm(self, final_norm: Dict[str, torch.Tensor]) -> bool:
        """The classifier's final norm follows the last stage: reuse it for that stage's output."""
        last_stage = self.num_stages - 1
        if not final_norm or last_stage not in self.out_indices:
            return False
        norm = self.out_norms[self.out_indices.index(last_stage)]
        own = norm.state_dict()
        if set(own) != set(final_norm) or any(own[k].shape != final_norm[k].shape for k in own):
            return False  # e.g. a non-LayerNorm norm_cfg
        norm.load_state_dict(final_norm)
        return True

    def _load_body(self, body: Dict[str, torch.Tensor], source: str, layout: str, extra: List[str]) -> None:
        expected = self.vim2.state_dict()
        kept_stages = len(self.vim2.stages)
        # Stages this backbone does not build (after the last output) may be in the checkpoint.
        pruned = {k for k in body if k.startswith("stages.") and k.split(".")[1].isdigit()
                  and int(k.split(".")[1]) >= kept_stages}
        candidate = {k: v for k, v in body.items() if k not in pruned}
        problems = describe_state_dict_mismatch(expected, candidate)
        if extra:
            problems += ("\n" if problems else "") + f"  keys outside the backbone: {sorted(extra)[:10]}"
        if problems:
            raise ValueError(
                f"checkpoint {source!r} ({layout} format) does not match this ViM2 backbone "
                f"(wrong arch or not a ViM2 checkpoint):\n{problems}")
        self.vim2.load_state_dict(candidate, strict=True)

    def _load_out_norms(self, out_norms: Dict[str, torch.Tensor], source: str) -> None:
        if not out_norms:
            return
        own = self.out_norms.state_dict()
        problems = describe_state_dict_mismatch(own, out_norms)
        if problems:
            raise ValueError(f"checkpoint {source!r}: output norms do not match out_indices={self.out_indices}:\n"
                             f"{problems}")
        self.out_norms.load_state_dict(out_norms)
