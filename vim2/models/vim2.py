"""ViM2: Vision MambaMixer (Behrouz, Santacatterina, Zabih, arXiv 2403.19888), a timm model family.

    stem     Conv2d 4x4 stride 4 -> LayerNorm                      (B, H/4, W/4, C1), channels-last
    stage i  [patch merging for i > 0: 2x2 concat -> LayerNorm -> Linear 4C -> 2C]
             units: token mixer, token mixer, channel mixer, ...    (pairing: channel_mixer_every)
             each unit:  y = x + DropPath(Mixer(LayerNorm(x))),  x = weighted average of the stage's
             earlier outputs (Eq. 19-20; starts as the plain residual chain)
    norm     LayerNorm                                             (B, H/32, W/32, C4)
    head     global average pool -> dropout -> Linear

Activations are NHWC (channels-last) throughout; ``forward_features`` returns NHWC (``output_fmt``).
Inputs whose height/width are not multiples of 32 are zero-padded on the bottom/right: to a multiple of
4 before the stem and to an even size before each patch merging, so every pixel is seen and a
stride-s feature map has ceil(H / s) rows. See docs/architecture.md for every design decision.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, Mlp, calculate_drop_path_rates, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, register_model
# feature_take_indices is timm's public helper for forward_intermediates; it lives in _features.
from timm.models._features import feature_take_indices

import vim2_kernels
from vim2.layers import SelectiveChannelMixer, SelectiveTokenMixer, WeightedInputAverage
from vim2.layers.inplace import can_overwrite
from vim2.weights import pretrained_errors_explained

__all__ = ['ViM2', 'ARCH_SETTINGS', 'checkpoint_filter_fn']

CHANNEL_MIXERS = ('ssm', 'mlp', None)


class Stem(nn.Module):
    """Patchify stem: Conv2d(k=s=patch_size) + LayerNorm. (B, in_chans, H, W) -> (B, H/p, W/p, C)."""

    def __init__(self, in_chans: int, out_chs: int, patch_size: int = 4, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.conv = nn.Conv2d(in_chans, out_chs, kernel_size=patch_size, stride=patch_size, **dd)
        self.norm = nn.LayerNorm(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'ViM2 expects an image tensor, got {type(x).__name__}')
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f'ViM2 expects images of shape (batch, in_chans={self.in_chans}, H, W), got {tuple(x.shape)}'
            )
        if not x.is_floating_point():
            raise TypeError(f'ViM2 expects a floating-point image tensor, got {x.dtype}')
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f'ViM2 got an empty input of shape {tuple(x.shape)}')
        pad_h = -x.shape[2] % self.patch_size
        pad_w = -x.shape[3] % self.patch_size
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.conv(x).permute(0, 2, 3, 1)
        return self.norm(x)


class PatchMerging(nn.Module):
    """2x2 patch merging: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_chs).

    The four neighbours are concatenated as [(0,0), (0,1), (1,0), (1,1)] (row offset, column offset)
    -> LayerNorm(4C) -> Linear(4C, out_chs, bias=False). Odd maps are zero-padded on the bottom/right.
    """

    def __init__(self, dim: int, out_chs: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm = nn.LayerNorm(4 * dim, **dd)
        self.reduction = nn.Linear(4 * dim, out_chs, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, chs = x.shape
        pad_h, pad_w = height % 2, width % 2
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
            height, width = height + pad_h, width + pad_w
        x = x.reshape(batch, height // 2, 2, width // 2, 2, chs).permute(0, 1, 3, 2, 4, 5)
        x = x.flatten(3)
        return self.reduction(self.norm(x))


class MixerBlock(nn.Module):
    """One mixer unit of a stage: ``y = x + DropPath(mixer(LayerNorm(x)))``.

    With weighted averaging, ``x`` is the learned combination (``input_average``) of all earlier outputs
    of the stage, passed as positional arguments (oldest first); without it, ``forward(x)``.
    ``kind`` is 'token' or 'channel'.
    """

    def __init__(
            self,
            dim: int,
            mixer: nn.Module,
            kind: str,
            drop_path: float = 0.,
            num_inputs: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.kind = kind
        self.input_average = WeightedInputAverage(num_inputs, **dd) if num_inputs is not None else None
        self.norm = nn.LayerNorm(dim, **dd)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.input_average is None and len(inputs) != 1:
            raise ValueError(f'this block has no weighted averaging and takes one input, got {len(inputs)}')
        x = self._averaged_input(inputs)
        if getattr(self.mixer, 'selective_recompute', False) and not can_overwrite(x, self.parameters()):
            # The mixer runs the norm inside its recomputed regions, so the normalised input is not kept for
            # the backward (the averaged input is: the regions' input; the average's addcmuls keep only the
            # stage's earlier outputs, kept anyway). Recomputing the average too would save one more map per
            # block but cost 1.05x a training step instead of 1.02x (docs/architecture.md).
            return x + self.drop_path(self.mixer.forward_normed(self.norm, x))
        # Without autograd a block with weighted averaging does not keep its averaged input while the mixer
        # runs (a whole map: 25 MB at ViM2-T's stage 1 at 1024x1024); the residual is rebuilt afterwards
        # from the stage's outputs.
        residual = None if self.input_average is not None and can_overwrite(x, self.parameters()) else x
        shape, dtype = x.shape, x.dtype
        x = self.norm(x)
        y = self.drop_path(self.mixer(x))
        del x
        # without autograd the residual add reuses the mixer's output buffer when that is exactly what
        # x + y would allocate (same shape and dtype; under autocast an fp32 x and a bf16 y promote)
        if can_overwrite(y, ()) and y.shape == shape and y.dtype == dtype:
            return y.add_(residual) if residual is not None else self.input_average.add_to_(y, inputs)
        if residual is None:
            residual = self.input_average(inputs)
        return residual + y

    def _averaged_input(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The block's input: the weighted average of the stage's earlier outputs, or its one input."""
        return self.input_average(inputs) if self.input_average is not None else inputs[0]


class ViM2Stage(nn.Module):
    """Downsample (Identity for the first stage) followed by the stage's mixer units (``blocks``)."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            depth: int,
            downsample: bool,
            channel_mixer: Optional[str] = 'ssm',
            channel_mixer_every: int = 2,
            channel_hidden_dim: int = 0,
            weighted_average: bool = True,
            drop_path: Sequence[float] = (),
            token_mixer_kwargs: Optional[Dict[str, Any]] = None,
            channel_mixer_kwargs: Optional[Dict[str, Any]] = None,
            mlp_ratio: float = 4.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grad_checkpointing = False
        self.weighted_average = weighted_average
        self.downsample = PatchMerging(dim, out_dim, **dd) if downsample else nn.Identity()
        token_mixer_kwargs = token_mixer_kwargs or {}
        channel_mixer_kwargs = channel_mixer_kwargs or {}

        blocks = []

        def add(mixer: nn.Module, kind: str, rate: float):
            num_inputs = len(blocks) + 1 if weighted_average else None
            blocks.append(MixerBlock(out_dim, mixer, kind, rate, num_inputs=num_inputs, **dd))

        for i in range(depth):
            add(SelectiveTokenMixer(out_dim, **token_mixer_kwargs, **dd), 'token', drop_path[i])
            if channel_mixer is not None and (i + 1) % channel_mixer_every == 0:
                if channel_mixer == 'ssm':
                    mixer = SelectiveChannelMixer(out_dim, channel_hidden_dim, **channel_mixer_kwargs, **dd)
                else:
                    mixer = Mlp(out_dim, int(mlp_ratio * out_dim), act_layer=nn.GELU, **dd)
                add(mixer, 'channel', drop_path[i])
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        use_checkpoint = self.grad_checkpointing and not torch.jit.is_scripting()
        if not self.weighted_average:
            return checkpoint_seq(self.blocks, x) if use_checkpoint else self.blocks(x)
        outputs = [x]
        for block in self.blocks:
            outputs.append(checkpoint(block, *outputs) if use_checkpoint else block(*outputs))
        return outputs[-1]


class ViM2(nn.Module):
    """Vision MambaMixer (ViM2) backbone / classifier.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs (0 = no classifier, pooled features).
        global_pool: timm pool type of the head ('avg' default, '' = none).
        embed_dims: channels of each stage.
        depths: token mixers per stage.
        channel_mixer: 'ssm' (Selective Channel Mixer), 'mlp' (ablation) or None (no channel mixing).
        channel_mixer_every: a channel mixer follows every n-th token mixer of a stage (2 = Table 8).
        channel_mixer_expand: per stage, channel-mixer width E = expand * C; None = 2 in every stage but
            the last and 1 in the last (Table 8: "CW-Linear" 2C, 2C, 2C, C).
        weighted_average: learnable weighted averaging of earlier outputs in each stage (Eq. 19-20).
        d_state: SSM state size of the token mixers.
        channel_d_state: SSM state size of the channel mixers (None = d_state).
        ssm_expand: token-mixer inner width = ssm_expand * C.
        dt_rank: Δ projection rank of the token mixers ('auto' = ceil(C / 16)).
        token_d_conv / channel_d_conv: kernel size of the token mixer's 2-D depth-wise conv and of the
            channel mixer's 1-D conv along the channel axis.
        scan_routes: routes of the 2-D cross-scan (default all four: row, col, row_rev, col_rev).
        mlp_ratio: hidden ratio of the 'mlp' channel mixer.
        patch_size: stem patch size (stride of the first stage).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linear over token mixers (a channel mixer shares the rate
            of the token mixer before it).
        scan_backend: vim2_kernels backend for every scan (None = automatic).
        selective_recompute: when training, the token mixers recompute their scan branch's projection,
            conv and SiLU and their gate branch in the backward instead of storing them, and every block's
            LayerNorm runs inside its mixer's recomputed regions (ViM2-T keeps half the activations for
            about 2% more time; docs/architecture.md). False: plain autograd. Independent of
            ``set_grad_checkpointing``, which recomputes whole blocks.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (96, 192, 384, 768),
            depths: Sequence[int] = (2, 2, 6, 2),
            channel_mixer: Optional[str] = 'ssm',
            channel_mixer_every: int = 2,
            channel_mixer_expand: Optional[Sequence[float]] = None,
            weighted_average: bool = True,
            d_state: int = 16,
            channel_d_state: Optional[int] = None,
            ssm_expand: float = 2.0,
            dt_rank: Union[int, str] = 'auto',
            token_d_conv: int = 3,
            channel_d_conv: int = 4,
            scan_routes: Sequence[str] = vim2_kernels.ROUTES,
            mlp_ratio: float = 4.0,
            patch_size: int = 4,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            scan_backend: Optional[str] = None,
            selective_recompute: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        embed_dims = tuple(embed_dims)
        depths = tuple(depths)
        if channel_mixer_expand is None:
            channel_mixer_expand = (2,) * (len(depths) - 1) + (1,)
        channel_mixer_expand = tuple(channel_mixer_expand)
        if not embed_dims or len(embed_dims) != len(depths):
            raise ValueError(f'embed_dims and depths must be non-empty and of equal length, '
                             f'got embed_dims={embed_dims}, depths={depths}')
        if any(d < 1 for d in depths) or any(c < 1 for c in embed_dims):
            raise ValueError(f'depths and embed_dims must be positive, got {depths}, {embed_dims}')
        if channel_mixer not in CHANNEL_MIXERS:
            raise ValueError(f"channel_mixer must be one of 'ssm', 'mlp' or None, got {channel_mixer!r}")
        if isinstance(channel_mixer_every, bool) or not isinstance(channel_mixer_every, int) \
                or channel_mixer_every < 1:
            raise ValueError(f'channel_mixer_every must be a positive int, got {channel_mixer_every!r}')
        if len(channel_mixer_expand) != len(depths):
            raise ValueError(f'channel_mixer_expand needs one value per stage ({len(depths)}), '
                             f'got {channel_mixer_expand}')
        if scan_backend is not None:
            if scan_backend not in ('auto',) + tuple(vim2_kernels.BACKEND_NAMES):
                raise ValueError(f"scan_backend must be None, 'auto' or one of {vim2_kernels.BACKEND_NAMES}, "
                                 f'got {scan_backend!r}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.output_fmt = 'NHWC'
        self.embed_dims = embed_dims
        self.depths = depths
        self.channel_mixer = channel_mixer
        self.weighted_average = weighted_average
        self.scan_backend = scan_backend

        token_mixer_kwargs = dict(
            d_state=d_state, ssm_expand=ssm_expand, dt_rank=dt_rank, d_conv=token_d_conv,
            routes=tuple(scan_routes), scan_backend=scan_backend, selective_recompute=selective_recompute,
        )
        channel_mixer_kwargs = dict(
            d_state=d_state if channel_d_state is None else channel_d_state,
            d_conv=channel_d_conv, scan_backend=scan_backend, selective_recompute=selective_recompute,
        )

        self.stem = Stem(in_chans, embed_dims[0], patch_size=patch_size, **dd)
        # linear over all token mixers of the network, returned split per stage
        dp_rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        self.stages = nn.Sequential()
        prev_dim = embed_dims[0]
        reduction = patch_size
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            if i > 0:
                reduction *= 2
            self.stages.append(ViM2Stage(
                prev_dim,
                dim,
                depth,
                downsample=i > 0,
                channel_mixer=channel_mixer,
                channel_mixer_every=channel_mixer_every,
                channel_hidden_dim=max(1, int(channel_mixer_expand[i] * dim)),
                weighted_average=weighted_average,
                drop_path=dp_rates[i],
                token_mixer_kwargs=token_mixer_kwargs,
                channel_mixer_kwargs=channel_mixer_kwargs,
                mlp_ratio=mlp_ratio,
                **dd,
            ))
            prev_dim = dim
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f'stages.{i}'))

        self.num_features = self.head_hidden_size = prev_dim
        self.norm = nn.LayerNorm(prev_dim, **dd)
        self.head = ClassifierHead(
            prev_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt='NHWC', **dd,
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        # Linear layers as Swin/VMamba; scan parameters keep the mixers' own init.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Full names of parameters excluded from weight decay (besides timm's 1-D / bias rule).

        SSM dynamics (A_log, D, Δ biases; VMamba/Mamba practice), the channel mixer's per-position B/C
        offsets (position-embedding-like) and the weighted-averaging scalars.
        """
        suffixes = ('.A_log', '.D', '.dt_proj_bias', '.delta_bias', '.B_bias', '.C_bias',
                    '.input_average.weight')
        return {name for name, _ in self.named_parameters() if name.endswith(suffixes)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, in_features=self.num_features)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward returning the outputs of the selected stages.

        Args:
            x: (B, in_chans, H, W) images.
            indices: last n stages if int, all if None, else the stage indices to return.
            norm: apply the final norm to the last stage's output if it is returned.
            stop_early: stop after the last stage needed.
            output_fmt: 'NCHW' or 'NHWC' for the intermediates.
            intermediates_only: return only the intermediates.
        Returns:
            intermediates, or (final features (B, H/32, W/32, C) NHWC, intermediates).
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_index = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]

        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                x_inter = self.norm(x) if norm and i == last_index else x
                if output_fmt == 'NCHW':
                    x_inter = x_inter.permute(0, 3, 1, 2).contiguous()
                intermediates.append(x_inter)
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and norm/head) not needed for ``indices``; returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            # the final norm and head were sized for the last stage's width
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, ceil(H/32), ceil(W/32), C_last), NHWC, after the final norm."""
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: ViM2) -> Dict[str, torch.Tensor]:
    """Map a saved state dict onto ``model``'s parameter names.

    Accepts a raw state dict or a training checkpoint wrapping one under 'model' / 'state_dict'
    (also 'state_dict_ema' / 'model_ema' when the plain entry is absent); strips DataParallel /
    DDP / compile prefixes ('module.', '_orig_mod.'); maps a bare linear head ('head.weight') to
    timm's 'head.fc.*'. Anything else must already match (a mismatch then fails loudly in
    load_state_dict).
    """
    for key in ('model', 'state_dict', 'state_dict_ema', 'model_ema'):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    out = {}
    for k, v in state_dict.items():
        for prefix in ('module.', '_orig_mod.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k in ('head.weight', 'head.bias'):
            k = 'head.fc.' + k.split('.')[-1]
        out[k] = v
    return out


# Architecture of each variant; the OpenMMLab adapter builds ViM2(**ARCH_SETTINGS[name]) too.
ARCH_SETTINGS: Dict[str, Dict[str, Any]] = {
    'tiny': dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2)),
    'small': dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2)),
    'base': dict(embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2)),
    # Paper's ablation: channel mixer -> MLP, no weighted averaging. ViM2-S layout with a 2x MLP after
    # every second token mixer; see docs/architecture.md for its parameter count vs the paper's 40M.
    'mlp': dict(
        embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), channel_mixer='mlp', mlp_ratio=2.0,
        weighted_average=False,
    ),
    # Tiny model for tests and the quick-start job; not an architecture from the paper.
    'test': dict(embed_dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), d_state=4),
}


def _create_vim2(variant: str, pretrained: bool = False, **kwargs) -> ViM2:
    num_stages = len(kwargs.get('depths', (1, 1, 1, 1)))
    out_indices = kwargs.pop('out_indices', tuple(range(num_stages)))
    # the kwargs tell it where the weights come from (pretrained_cfg, overlay, cache_dir)
    with pretrained_errors_explained(variant, pretrained, **kwargs):
        return build_model_with_cfg(
            ViM2,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, flatten_sequential=True),
            **kwargs,
        )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv', 'classifier': 'head.fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2403.19888',
        **kwargs,
    }


# No ViM2 weights have been published: the '.untrained' tags carry no url / hf_hub_id, so
# pretrained=True fails with an explanation. Replace a tag (and add hf_hub_id) when weights exist.
default_cfgs = generate_default_cfgs({
    'vim2_tiny.untrained': _cfg(),
    'vim2_small.untrained': _cfg(),
    'vim2_base.untrained': _cfg(),
    'vim2_mlp.untrained': _cfg(),
    'test_vim2.untrained': _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=0.95),
})


def _entry(variant: str, arch: str, pretrained: bool, kwargs: Dict[str, Any]) -> ViM2:
    return _create_vim2(variant, pretrained=pretrained, **dict(ARCH_SETTINGS[arch], **kwargs))


@register_model
def vim2_tiny(pretrained: bool = False, **kwargs) -> ViM2:
    """ViM2-T: widths 96-768, token mixers 2-2-6-2, channel mixers 1-1-3-1 (paper Table 8)."""
    return _entry('vim2_tiny', 'tiny', pretrained, kwargs)


@register_model
def vim2_small(pretrained: bool = False, **kwargs) -> ViM2:
    """ViM2-S: widths 96-768, token mixers 2-2-18-2, channel mixers 1-1-9-1 (paper Table 8)."""
    return _entry('vim2_small', 'small', pretrained, kwargs)


@register_model
def vim2_base(pretrained: bool = False, **kwargs) -> ViM2:
    """ViM2-B: widths 128-1024, token mixers 2-2-18-2, channel mixers 1-1-9-1 (paper Table 8)."""
    return _entry('vim2_base', 'base', pretrained, kwargs)


@register_model
def vim2_mlp(pretrained: bool = False, **kwargs) -> ViM2:
    """ViM2-MLP ablation: MLP channel mixers, no weighted averaging (paper: 40M params)."""
    return _entry('vim2_mlp', 'mlp', pretrained, kwargs)


@register_model
def test_vim2(pretrained: bool = False, **kwargs) -> ViM2:
    """Tiny ViM2 for tests: widths 16-128, depths 2-2-2-2, d_state 4."""
    return _entry('test_vim2', 'test', pretrained, kwargs)
