# UperNet + auxiliary FCN head, ADE20K 512x512, 160k iterations, with ViM2-T through mmpretrain's
# generic `TIMMBackbone` instead of vim2's own `ViM2` adapter (needs `pip install mmpretrain`).
# Same architecture, optimizer, data and schedule as upernet_vim2-t_8xb2-160k_ade20k-512x512.py;
# timm's `features_only` wrapper returns the raw stage outputs (no per-output norm) and offers
# no frozen_stages / norm_eval / with_cp. See docs/mm.md ("TIMMBackbone or the ViM2 adapter").
_base_ = ['./upernet_vim2-t_8xb2-160k_ade20k-512x512.py']

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
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
