"""Building blocks of ViM2: the Selective Token/Channel Mixers and the stage-wise weighted averaging."""
from .channel_mixer import SelectiveChannelMixer
from .token_mixer import SelectiveTokenMixer, init_a_log, init_dt_bias, resolve_dt_rank
from .weighted_average import WeightedInputAverage

__all__ = [
    'SelectiveChannelMixer',
    'SelectiveTokenMixer',
    'WeightedInputAverage',
    'init_a_log',
    'init_dt_bias',
    'resolve_dt_rank',
]
