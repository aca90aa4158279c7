"""Every config in mm_configs/: the paper's settings, and that it builds into a working model."""
from __future__ import annotations

import copy
import importlib.util
import re

import pytest
import torch

from mm_helpers import MM_CONFIGS, TINY_ARCH, TINY_WIDTHS, skip_without_mm

skip_without_mm()

import timm  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import vim2.mm  # noqa: E402,F401  (registers ViM2)
from vim2.weights import export_model  # noqa: E402

pytestmark = pytest.mark.mm

# runnable configs; mm_configs/_base_/ holds shared fragments inherited by them
CONFIG_FILES = sorted(p for p in MM_CONFIGS.glob("*/*.py") if p.parent.name != "_base_")
ADAPTER_CONFIGS = [p for p in CONFIG_FILES if "_vim2-" in p.name]
TIMM_BACKBONE_CONFIGS = [p for p in CONFIG_FILES if "_timm-vim2-" in p.name]
ARCH_OF_SUFFIX = {"t": "tiny", "s": "small", "b": "base"}
WIDTHS = {"tiny": [96, 192, 384, 768], "small": [96, 192, 384, 768], "base": [128, 256, 512, 1024]}
# (task, arch) -> numbers the paper reports, which the config's comment must state.
PAPER_NUMBERS = {
    ("mask_rcnn", "tiny"): ["47.1", "42.4"],
    ("mask_rcnn", "small"): ["48.5", "43.1"],
    ("upernet", "tiny"): ["48.6", "49.9"],
    ("upernet", "small"): ["50.2", "51.4"],
}
HAS_MMPRETRAIN = importlib.util.find_spec("mmpretrain") is not None


def config_id(path):
    return f"{path.parent.name}/{path.name}"


def arch_of(path) -> str:
    return ARCH_OF_SUFFIX[re.search(r"vim2-([tsb])_", path.name).group(1)]


def registry_for(cfg):
    init_default_scope(cfg.default_scope)
    if cfg.default_scope == "mmdet":
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    return MODELS


def test_every_config_is_covered():
    assert len(ADAPTER_CONFIGS) == 9  # Mask R-CNN 1x + 3x and UperNet 160k, for T/S/B
    assert set(CONFIG_FILES) == set(ADAPTER_CONFIGS) | set(TIMM_BACKBONE_CONFIGS)
    for path in ADAPTER_CONFIGS:
        assert path.name.startswith(("mask-rcnn_vim2-", "upernet_vim2-")), path.name


@pytest.mark.parametrize("path", ADAPTER_CONFIGS, ids=config_id)
def test_config_has_the_papers_settings(path):
    cfg = Config.fromfile(str(path))
    text = path.read_text()
    arch = arch_of(path)
    assert cfg.custom_imports == dict(imports=["vim2.mm"], allow_failed_imports=False)
    backbone = cfg.model.backbone
    assert backbone.type == "ViM2" and backbone.arch == arch
    assert backbone.out_indices == (0, 1, 2, 3)
    assert backbone.init_cfg.type == "Pretrained" and backbone.init_cfg.checkpoint.endswith(".safetensors")
    optimizer = cfg.optim_wrapper.optimizer
    assert optimizer.type == "AdamW"
    # batch 16 = 8 GPUs x 2 images, stated in the comment
    assert cfg.train_dataloader.batch_size == 2 and "8 GPUs x 2 images" in text
    for number in PAPER_NUMBERS.get((path.parent.name, arch), []):
        assert number in text, f"paper number {number} missing from {path.name}"

    if path.parent.name == "mask_rcnn":
        assert cfg.default_scope == "mmdet" and cfg.model.type == "MaskRCNN"
        assert cfg.model.neck.type == "FPN" and cfg.model.neck.in_channels == WIDTHS[arch]
        assert optimizer.lr == 1e-4 and optimizer.weight_decay == 0.05
        assert cfg.auto_scale_lr.base_batch_size == 16
        assert cfg.train_dataloader.dataset.type == "CocoDataset"
        assert set(cfg.val_evaluator.metric) == {"bbox", "segm"}
        multistep = [s for s in cfg.param_scheduler if s.type == "MultiStepLR"][0]
        resizes = [t.type for t in cfg.train_dataloader.dataset.pipeline if "Resize" in t.type]
        if "_1x_" in path.name:
            assert cfg.train_cfg.max_epochs == 12 and multistep.milestones == [8, 11]
            assert resizes == ["Resize"]
        else:
            assert "_ms-crop-3x_" in path.name
            assert cfg.train_cfg.max_epochs == 36 and multistep.milestones == [27, 33]
            assert "RandomChoice" in [t.type for t in cfg.train_dataloader.dataset.pipeline]  # multi-scale
    else:
        assert cfg.default_scope == "mmseg" and cfg.model.type == "EncoderDecoder"
        assert cfg.model.decode_head.type == "UPerHead" and cfg.model.auxiliary_head.type == "FCNHead"
        assert cfg.model.decode_head.in_channels == WIDTHS[arch]
        assert cfg.model.auxiliary_head.in_channels == WIDTHS[arch][2]
        assert cfg.model.decode_head.num_classes == cfg.model.auxiliary_head.num_classes == 150
        assert optimizer.lr == 6e-5
        assert cfg.train_cfg.type == "IterBasedTrainLoop" and cfg.train_cfg.max_iters == 160000
        assert cfg.model.data_preprocessor.size == (512, 512)
        crops = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == "RandomCrop"]
        assert crops and crops[0].crop_size == (512, 512)
        assert cfg.train_dataloader.dataset.type == "ADE20KDataset"


@pytest.mark.parametrize("path", ADAPTER_CONFIGS, ids=config_id)
def test_config_builds_and_extracts_features(path):
    """The full-size model builds from the config (MODELS.build) and its head fits the backbone."""
    cfg = Config.fromfile(str(path))
    torch.manual_seed(0)
    model = registry_for(cfg).build(cfg.model).eval()
    backbone = model.backbone
    assert type(backbone).__name__ == "ViM2Backbone" and type(backbone.vim2).__name__ == "ViM2"
    assert backbone.out_channels == WIDTHS[arch_of(path)]
    with torch.no_grad():
        features = model.extract_feat(torch.randn(1, 3, 64, 64))
    if path.parent.name == "mask_rcnn":
        assert model.neck.in_channels == backbone.out_channels
        assert [tuple(f.shape) for f in features] == [(1, 256, 16 // 2 ** i, 16 // 2 ** i) for i in range(5)]
    else:
        assert list(model.decode_head.in_channels) == backbone.out_channels
        assert [tuple(f.shape) for f in features] == [
            (1, c, 16 // 2 ** i, 16 // 2 ** i) for i, c in enumerate(backbone.out_channels)]
    assert all(torch.isfinite(f).all() for f in features)


@pytest.mark.parametrize("path", [p for p in ADAPTER_CONFIGS if "vim2-t_" in p.name], ids=config_id)
def test_weight_decay_groups_follow_the_models_no_weight_decay(path):
    """No decay exactly on ViM2.no_weight_decay() names and 1-D parameters (norms, biases)."""
    cfg = Config.fromfile(str(path))
    cfg.model.backbone.arch = dict(TINY_ARCH)
    if path.parent.name == "mask_rcnn":
        cfg.model.neck.in_channels = TINY_WIDTHS
    else:
        cfg.model.decode_head.in_channels = TINY_WIDTHS
        cfg.model.auxiliary_head.in_channels = TINY_WIDTHS[2]
    model = registry_for(cfg).build(cfg.model)
    optim_wrapper = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))
    decay_of = {id(p): group["weight_decay"] for group in optim_wrapper.optimizer.param_groups for p in group["params"]}
    no_decay = model.backbone.vim2.no_weight_decay()
    assert no_decay, "ViM2.no_weight_decay() is empty"
    base = cfg.optim_wrapper.optimizer.weight_decay
    for name, parameter in model.backbone.vim2.named_parameters():
        expected = 0.0 if (name in no_decay or parameter.ndim <= 1) else base
        assert decay_of[id(parameter)] == pytest.approx(expected), name


# ------------------------------------------------------------------- mmpretrain.TIMMBackbone use
def timm_backbone_kwargs(backbone_cfg) -> dict:
    """What mmpretrain.TIMMBackbone passes to timm.create_model for this backbone config."""
    kwargs = {k: v for k, v in backbone_cfg.items() if k not in ("type", "in_channels", "init_cfg", "_delete_")}
    kwargs["in_chans"] = backbone_cfg.get("in_channels", 3)
    kwargs.setdefault("checkpoint_path", "")
    return kwargs


@pytest.mark.parametrize("path", TIMM_BACKBONE_CONFIGS, ids=config_id)
def test_timm_backbone_config_gives_nchw_features_matching_the_heads(path):
    cfg = Config.fromfile(str(path), import_custom_modules=False)  # mmpretrain may be absent
    backbone_cfg = cfg.model.backbone
    assert backbone_cfg.type == "mmpretrain.TIMMBackbone" and backbone_cfg.features_only
    assert cfg.custom_imports.imports == ["mmpretrain.models", "vim2"]
    kwargs = timm_backbone_kwargs(backbone_cfg)
    kwargs.update(pretrained=False, pretrained_cfg_overlay=None)  # the config's file is a placeholder
    model = timm.create_model(**kwargs).eval()
    in_channels = (cfg.model.neck.in_channels if path.parent.name == "mask_rcnn"
                   else cfg.model.decode_head.in_channels)
    assert model.feature_info.channels() == list(in_channels)
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 64))
    # NCHW, as mmdet/mmseg necks and heads expect
    assert [tuple(f.shape) for f in features] == [
        (1, c, 64 // r, 64 // r) for c, r in zip(model.feature_info.channels(), model.feature_info.reduction())]


def test_timm_backbone_route_loads_exported_weights(tmp_path):
    """pretrained=True + pretrained_cfg_overlay=dict(file=...), as the TIMMBackbone configs use."""
    torch.manual_seed(0)
    classifier = timm.create_model("test_vim2")
    export_dir = export_model(classifier, tmp_path / "vim2_test")
    path = TIMM_BACKBONE_CONFIGS[0]
    kwargs = timm_backbone_kwargs(Config.fromfile(str(path), import_custom_modules=False).model.backbone)
    kwargs.update(model_name="test_vim2", drop_path_rate=0.0,
                  pretrained_cfg_overlay=dict(file=str(export_dir / "model.safetensors")))
    features = timm.create_model(**kwargs)
    reference = classifier.state_dict()
    loaded = {k.removeprefix("model."): v for k, v in features.state_dict().items()}
    assert loaded and all(torch.equal(v, reference[k]) for k, v in loaded.items())


@pytest.mark.skipif(not HAS_MMPRETRAIN, reason="mmpretrain not installed (optional; vim2 does not require it)")
@pytest.mark.parametrize("path", TIMM_BACKBONE_CONFIGS, ids=config_id)
def test_timm_backbone_config_builds_with_mmpretrain(path):
    cfg = Config.fromfile(str(path))
    cfg.model.backbone.update(pretrained=False, pretrained_cfg_overlay=None)
    model = registry_for(cfg).build(cfg.model).eval()
    with torch.no_grad():
        features = model.extract_feat(torch.randn(1, 3, 64, 64))
    assert all(torch.isfinite(f).all() for f in features)
