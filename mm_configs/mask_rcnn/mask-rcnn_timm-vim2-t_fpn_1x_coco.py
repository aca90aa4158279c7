# Mask R-CNN + FPN 1x, COCO, with ViM2-T through mmpretrain's generic `TIMMBackbone` instead of
# vim2's own `ViM2` adapter (needs `pip install mmpretrain`, which vim2 does not install).
# Same architecture, optimizer, data and schedule as mask-rcnn_vim2-t_fpn_1x_coco.py; the
# difference: timm's `features_only` wrapper returns the raw stage outputs (no per-output norm),
# and there is no frozen_stages / norm_eval / with_cp / mm-format checkpoint loading.
# See docs/mm.md ("TIMMBackbone or the ViM2 adapter").
_base_ = ['./mask-rcnn_vim2-t_fpn_1x_coco.py']

# `vim2` registers the timm models (vim2_tiny, ...); `mmpretrain.models` registers TIMMBackbone.
custom_imports = dict(imports=['mmpretrain.models', 'vim2'], allow_failed_imports=False)

# Placeholder (no published ViM2 weights): a timm-format file written by `vim2-export`; timm
# loads it through `pretrained_cfg_overlay`. For random initialisation set pretrained=False.
checkpoint_file = 'checkpoints/vim2_tiny/model.safetensors'

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.TIMMBackbone',
        model_name='vim2_tiny',
        features_only=True,
        # 'getter' = timm's wrapper around ViM2.forward_intermediates, which returns NCHW maps
        # (timm's default hook-based wrapper would return ViM2's channels-last NHWC stage outputs).
        feature_cls='getter',
        out_indices=(0, 1, 2, 3),
        pretrained=True,
        pretrained_cfg_overlay=dict(file=checkpoint_file),
        drop_path_rate=0.2),
    neck=dict(in_channels=[96, 192, 384, 768]))
