# Mask R-CNN + FPN with a ViM2-T backbone, 1x schedule (12 epochs), COCO 2017 instances.
#
# Paper (arXiv 2403.19888, Mask R-CNN 1x, AdamW lr 1e-4): box AP 47.1, mask AP 42.4, 39M params.
# Not reproduced here (no ViM2 ImageNet weights are published yet).
#
# Batch 16 = 8 GPUs x 2 images (mmdet's default 8xb2). On fewer GPUs keep the total at 16
# (e.g. 2 GPUs: --cfg-options train_dataloader.batch_size=8) or pass --auto-scale-lr.
#
# Everything not set here comes from mmdet's own Swin-T config (which itself inherits
# mmdet::_base_/{models/mask-rcnn_r50_fpn, datasets/coco_instance, schedules/schedule_1x,
# default_runtime}): data in data/coco/, single-scale 1333x800 training with random flip,
# LinearLR warm-up for 1000 iterations, steps at epochs 8 and 11.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', '../_base_/vim2.py']

model = dict(
    backbone={{_base_.vim2_tiny_backbone}},
    neck=dict(in_channels=[96, 192, 384, 768]))

# AdamW lr 1e-4, weight decay 0.05 (paper). No weight decay on norms, biases, 1-D parameters and
# the selective-scan parameters (as in Mamba/VMamba).
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg={{_base_.vim2_paramwise_cfg}})

train_dataloader = dict(batch_size=2)  # x 8 GPUs = 16
auto_scale_lr = dict(enable=False, base_batch_size=16)
