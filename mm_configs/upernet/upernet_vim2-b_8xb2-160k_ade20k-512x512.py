# UperNet (+ auxiliary FCN head) with a ViM2-B backbone, ADE20K, 512x512 crops, 160k iterations.
#
# The paper reports no ViM2-B segmentation numbers.
# Batch 16 = 8 GPUs x 2 images; schedule and optimizer as in the ViM2-T config.
_base_ = ['./upernet_vim2-t_8xb2-160k_ade20k-512x512.py']

checkpoint_file = 'checkpoints/vim2_base/model.safetensors'  # placeholder, see the ViM2-T config

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.5,  # paper silent; the ImageNet value for ViM2-B
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
