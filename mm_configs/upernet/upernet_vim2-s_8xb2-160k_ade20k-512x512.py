# UperNet (+ auxiliary FCN head) with a ViM2-S backbone, ADE20K, 512x512 crops, 160k iterations.
#
# Paper (arXiv 2403.19888, UperNet, 512x512, AdamW lr 6e-5, batch 16): mIoU 50.2 single-scale,
# 51.4 multi-scale (75M params).
# Batch 16 = 8 GPUs x 2 images; schedule and optimizer as in the ViM2-T config.
_base_ = ['./upernet_vim2-t_8xb2-160k_ade20k-512x512.py']

checkpoint_file = 'checkpoints/vim2_small/model.safetensors'  # placeholder, see the ViM2-T config

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,  # paper silent; the ImageNet value for ViM2-S
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
