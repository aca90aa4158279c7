# Parameter-wise optimizer settings shared by every ViM2 config here (used as
# `paramwise_cfg={{_base_.vim2_paramwise_cfg}}`): no weight decay on norms, biases and 1-D
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
