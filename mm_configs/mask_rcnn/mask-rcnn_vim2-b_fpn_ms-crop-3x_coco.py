# Mask R-CNN + FPN with a ViM2-B backbone, 3x schedule (36 epochs) with multi-scale training,
# COCO 2017 instances.
#
# The paper reports no ViM2-B detection numbers.
# Batch 16 = 8 GPUs x 2 images; schedule and optimizer as in the ViM2-T 3x config.
_base_ = ['./mask-rcnn_vim2-t_fpn_ms-crop-3x_coco.py']

checkpoint_file = 'checkpoints/vim2_base/model.safetensors'  # placeholder, see mm_configs/_base_/vim2.py

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.5,  # paper silent; the ImageNet value for ViM2-B
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
