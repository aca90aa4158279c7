# Mask R-CNN + FPN with a ViM2-B backbone, 1x schedule (12 epochs), COCO 2017 instances.
#
# The paper reports no ViM2-B detection numbers.
# Batch 16 = 8 GPUs x 2 images; optimizer and schedule as in the ViM2-T config.
_base_ = ['./mask-rcnn_vim2-t_fpn_1x_coco.py']

# Placeholder: no published ViM2-B weights; see mm_configs/_base_/vim2.py for how to pass yours.
checkpoint_file = 'checkpoints/vim2_base/model.safetensors'

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.5,  # paper silent; the ImageNet value for ViM2-B
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
