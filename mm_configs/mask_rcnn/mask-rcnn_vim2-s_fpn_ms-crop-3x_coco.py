# Mask R-CNN + FPN with a ViM2-S backbone, 3x schedule (36 epochs) with multi-scale training,
# COCO 2017 instances.
#
# Paper (arXiv 2403.19888): no 3x numbers; the 1x result is box AP 48.5 / mask AP 43.1.
# Batch 16 = 8 GPUs x 2 images; schedule and optimizer as in the ViM2-T 3x config.
_base_ = ['./mask-rcnn_vim2-t_fpn_ms-crop-3x_coco.py']

checkpoint_file = 'checkpoints/vim2_small/model.safetensors'  # placeholder, see mm_configs/_base_/vim2.py

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,  # paper silent; the ImageNet value for ViM2-S
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[96, 192, 384, 768]))
