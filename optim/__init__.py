"""Pure tensor math: the Lion optimizer, codecs, packed votes and sync strategies. No I/O."""

from .codec import Codec, CodecError, CodecSpec, Encoded
from .codecs import (
    CODEC_NAMES,
    CODEC_PATTERNS,
    CountsCodec,
    FP16Codec,
    FP32Codec,
    Int8BlockCodec,
    PBitCodec,
    SignCodec,
    TernaryCodec,
    get_codec,
)
from .lion import Lion
from .partition import SHARD_ALIGN, shard_bounds
from .schedules import SyncSchedule, consensus_distance
from .strategies import STRATEGY_NAMES, OuterState, StrategyConfig, SyncStrategy, make_strategy
from .vote import majority_vote, majority_vote_reference, pbit_sum_sign, vote_counts, vote_counts_reference

__all__ = [
    "CODEC_NAMES",
    "CODEC_PATTERNS",
    "SHARD_ALIGN",
    "STRATEGY_NAMES",
    "Codec",
    "CodecError",
    "CodecSpec",
    "CountsCodec",
    "Encoded",
    "FP16Codec",
    "FP32Codec",
    "Int8BlockCodec",
    "Lion",
    "OuterState",
    "PBitCodec",
    "SignCodec",
    "StrategyConfig",
    "SyncSchedule",
    "SyncStrategy",
    "TernaryCodec",
    "consensus_distance",
    "get_codec",
    "majority_vote",
    "majority_vote_reference",
    "make_strategy",
    "pbit_sum_sign",
    "shard_bounds",
    "vote_counts",
    "vote_counts_reference",
]
