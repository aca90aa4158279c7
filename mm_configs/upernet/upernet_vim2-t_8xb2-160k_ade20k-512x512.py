# UperNet (+ auxiliary FCN head) with a ViM2-T backbone, ADE20K, 512x512 crops, 160k iterations.
#
# Paper (arXiv 2403.19888, UperNet, 512x512, AdamW lr 6e-5, batch 16): mIoU 48.6 single-scale,
# 49.9 multi-scale (51M params). Not reproduced here (no ViM2 ImageNet weights are published yet).
#
# Batch 16 = 8 GPUs x 2 images. Everything not set here comes from mmseg's own Swin-T UperNet
# config (which inherits mmseg::_base_/{models/upernet_swin, datasets/ade20k, default_runtime,
# schedules/schedule_160k}): data in data/ade/ADEChallengeData2016, random resize 0.5-2.0 + crop
# + flip + photometric distortion, 1500-iteration linear warm-up then poly decay, SyncBN heads.
# Multi-scale test (the paper's second number): tools/test.py ... --tta (ratios 0.5-1.75 + flip).
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py', '../_base_/vim2.py']

model = dict(
    backbone={{_base_.vim2_tiny_backbone}},
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))

# AdamW lr 6e-5 (paper). Weight decay 0.01 and betas as in the Swin/VMamba UperNet recipes (the
# paper gives none); no decay on norms, biases, 1-D and scan parameters.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg={{_base_.vim2_paramwise_cfg}})

train_dataloader = dict(batch_size=2)  # x 8 GPUs = 16
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
