# Settings shared by every ViM2 config here (each inherits this file next to its mmdet/mmseg base).

custom_imports = dict(imports=['vim2.mm'], allow_failed_imports=False)

# The ViM2-T backbone, replacing the base config's Swin (`backbone={{_base_.vim2_tiny_backbone}}`).
# ImageNet-1k ViM2-T weights (no published ones): a timm-format file written by `vim2-export`
# (tools/export_weights.py), a .pth classifier checkpoint, or an mm checkpoint; path or URL.
# Override with --cfg-options model.backbone.init_cfg.checkpoint=/path/to/model.safetensors,
# or train from scratch with --cfg-options model.backbone.init_cfg=None.
vim2_tiny_backbone = dict(
    _delete_=True,
    type='ViM2',
    arch='tiny',
    out_indices=(0, 1, 2, 3),
    drop_path_rate=0.2,  # paper silent; the ImageNet value for ViM2-T
    frozen_stages=-1,
    norm_eval=False,
    with_cp=False,
    init_cfg=dict(type='Pretrained', checkpoint='checkpoints/vim2_tiny/model.safetensors'))

# Parameter-wise optimizer settings (`paramwise_cfg={{_base_.vim2_paramwise_cfg}}`): no weight decay on norms, biases and 1-D
# parameters, nor on the names of ViM2.no_weight_decay() (SSM dynamics, per-position B/C offsets and
# the multi-dimensional weighted-averaging scalars), as in Mamba/VMamba. tests/mm checks that the
# resulting no-decay groups are exactly ViM2.no_weight_decay() plus the 1-D parameters.
vim2_paramwise_cfg = dict(
    norm_decay_mult=0.,
    bias_decay_mult=0.,
    flat_decay_mult=0.,
    custom_keys={
        '.A_log': dict(decay_mult=0.),
        '.D': dict(decay_mult=0.),
        '.dt_proj_bias': dict(decay_mult=0.),
        '.delta_bias': dict(decay_mult=0.),
        '.B_bias': dict(decay_mult=0.),
        '.C_bias': dict(decay_mult=0.),
        '.input_average.weight': dict(decay_mult=0.),
    })
