"""Train and validate through mmengine's Runner (the path of mmdet's/mmseg's tools/train.py).

One detection config (Mask R-CNN 1x) and one segmentation config (UperNet) run a few training
iterations on one fixed batch of the synthetic datasets, then a validation pass: the losses must
be finite and go down, and the COCO bbox/segm metrics and mIoU must come out.

The configs are used as shipped except for what a 2-core CPU run needs: the tiny ViM2 arch, thin
necks/heads, 64x64 images without random augmentation, a constant learning rate of 1e-3 (the
paper's warm-up would keep it near zero for these few iterations), no workers.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mm_helpers import MM_CONFIGS, SYNTHETIC_IMAGE_SIZE, TINY_ARCH, TINY_WIDTHS, skip_without_mm

skip_without_mm()

from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from vim2.mm import ViM2Backbone  # noqa: E402

pytestmark = pytest.mark.mm

TRAIN_ITERS = 10
SIZE = (SYNTHETIC_IMAGE_SIZE, SYNTHETIC_IMAGE_SIZE)


def shared_cpu_settings(cfg: Config, work_dir: Path) -> None:
    cfg.work_dir = str(work_dir)
    cfg.model.backbone.update(arch=dict(TINY_ARCH), init_cfg=None, drop_path_rate=0.0)
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[name].update(num_workers=0, persistent_workers=False)
    # One fixed batch of the two training images, seen every iteration; InfiniteSampler avoids
    # the per-epoch restart pause of a finite sampler under an iteration-based loop.
    cfg.train_dataloader.update(batch_size=2, sampler=dict(type="InfiniteSampler", shuffle=False))
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=TRAIN_ITERS, val_interval=TRAIN_ITERS)
    cfg.param_scheduler = None
    cfg.optim_wrapper.optimizer.lr = 1e-3
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=TRAIN_ITERS)
    cfg.log_processor = dict(by_epoch=False)
    cfg.randomness = dict(seed=0)


def train_and_validate(cfg: Config):
    runner = Runner.from_cfg(cfg)
    runner.train()  # ends with the validation pass (val_interval == max_iters)
    losses = [float(v) for v in runner.message_hub.get_scalar("train/loss").data[0]]
    metrics = {k[len("val/"):]: runner.message_hub.get_scalar(k).current()
               for k in runner.message_hub.log_scalars if k.startswith("val/")}
    return runner, losses, metrics


def assert_trained(losses) -> None:
    print("train losses:", [round(v, 3) for v in losses])
    assert len(losses) == TRAIN_ITERS
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, f"loss did not decrease: first 3 mean {first:.3f}, last 3 mean {last:.3f}"


def test_mask_rcnn_trains_and_reports_coco_metrics(synthetic_data, tmp_path):
    cfg = Config.fromfile(str(MM_CONFIGS / "mask_rcnn" / "mask-rcnn_vim2-t_fpn_1x_coco.py"),
                          format_python_code=False)
    shared_cpu_settings(cfg, tmp_path / "work")
    model = cfg.model
    thin = 32
    model.neck.update(in_channels=TINY_WIDTHS, out_channels=thin)
    model.rpn_head.update(in_channels=thin, feat_channels=thin)
    model.roi_head.bbox_roi_extractor.out_channels = thin
    model.roi_head.bbox_head.update(in_channels=thin, fc_out_channels=64)
    model.roi_head.mask_roi_extractor.out_channels = thin
    model.roi_head.mask_head.update(in_channels=thin, conv_out_channels=thin)
    model.train_cfg.rcnn.sampler.num = 64
    model.test_cfg.rcnn.score_thr = 0.0  # an untrained detector's scores are low; still evaluate
    coco_root = str(synthetic_data / "coco") + "/"
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        dataset = cfg[name].dataset
        dataset.data_root = coco_root
        for transform in dataset.pipeline:
            if transform.type == "Resize":
                transform.scale = SIZE
            if transform.type == "RandomFlip":
                transform.prob = 0.0
    cfg.val_evaluator.ann_file = coco_root + "annotations/instances_val2017.json"
    cfg.test_evaluator = cfg.val_evaluator

    runner, losses, metrics = train_and_validate(cfg)
    assert_trained(losses)
    print("COCO metrics:", {k: v for k, v in metrics.items() if k.endswith("_mAP")})
    for key in ("coco/bbox_mAP", "coco/bbox_mAP_50", "coco/segm_mAP", "coco/segm_mAP_50"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, (key, metrics)

    # The saved training checkpoint (mm format, with mmengine's pickled message hub) re-loads into
    # a fresh backbone through init_cfg; without trust_pickle torch refuses it with a clear error.
    checkpoint = Path(cfg.work_dir) / f"iter_{TRAIN_ITERS}.pth"
    trained = runner.model.backbone.state_dict()
    backbone = ViM2Backbone(arch=dict(TINY_ARCH),
                            init_cfg=dict(type="Pretrained", checkpoint=str(checkpoint), trust_pickle=True))
    backbone.init_weights()
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, trained[name]), name
    refused = ViM2Backbone(arch=dict(TINY_ARCH), init_cfg=dict(type="Pretrained", checkpoint=str(checkpoint)))
    with pytest.raises(ValueError, match="trust_pickle=True"):
        refused.init_weights()


def test_upernet_trains_and_reports_miou(synthetic_data, tmp_path):
    cfg = Config.fromfile(str(MM_CONFIGS / "upernet" / "upernet_vim2-t_8xb2-160k_ade20k-512x512.py"),
                          format_python_code=False)
    shared_cpu_settings(cfg, tmp_path / "work")
    model = cfg.model
    model.data_preprocessor.size = SIZE
    model.decode_head.update(in_channels=TINY_WIDTHS, channels=32)
    model.auxiliary_head.update(in_channels=TINY_WIDTHS[2], channels=16)
    ade_root = str(synthetic_data / "ade" / "ADEChallengeData2016")
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[name].dataset.data_root = ade_root
    # Deterministic training pipeline (the config's random resize/crop/flip/photometric
    # distortion would make a few-iteration loss curve noisy).
    cfg.train_dataloader.dataset.pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="Resize", scale=SIZE, keep_ratio=True),
        dict(type="PackSegInputs"),
    ]
    for transform in cfg.val_dataloader.dataset.pipeline:
        if transform.type == "Resize":
            transform.scale = SIZE

    _, losses, metrics = train_and_validate(cfg)
    assert_trained(losses)
    print("segmentation metrics:", metrics)
    for key in ("mIoU", "aAcc", "mAcc"):
        assert key in metrics and 0.0 <= metrics[key] <= 100.0, (key, metrics)
