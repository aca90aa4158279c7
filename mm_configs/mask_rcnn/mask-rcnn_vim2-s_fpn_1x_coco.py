# Mask R-CNN + FPN with a ViM2-S backbone, 1x schedule (12 epochs), COCO 2017 instances.
#
# Paper (arXiv 2403.19888, Mask R-CNN 1x, AdamW lr 1e-4): box AP 48.5, mask AP 43.1, 62M params.
# Batch 16 = 8 GPUs x 2 images; optimizer and schedule as in the ViM2-T config.
_base_ = ['./mask-rcnn_vim2-t_fpn_1x_coco.py']

# Placeholder: no published ViM2-S weights; see mm_configs/_base_/vim2.py for how to pass yours.
checkpoint_file = 'checkpoints/vim2_small/model.safetensors'

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,  # paper silent; the ImageNet value for ViM2-S
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[96, 192, 384, 768]))
