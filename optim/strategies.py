"""Sync strategies: what a peer sends each round, how a group reduces it, and how the result is applied.

A round engine (the in-process simulator or the network runtime) drives a strategy like this::

    delta = anchor - params            # local_steps >= 1 (or the gradient when local_steps == 0)
    vec = strategy.prepare(state, delta)          # the vector to send
    parts = [strategy.encode(vec[lo:hi]) ...]     # one Encoded per shard of the shard plan
    # owner of a shard: result = strategy.reduce(parts_from_members, weights)
    # everyone:        update[lo:hi] = strategy.decode(result)
    strategy.apply(state, update, delta)          # anchor and outer momentum; params <- anchor

Notation follows DESIGN.md section 2: Δ_i is the pseudo-gradient, M_i the peer's outer momentum,
U the agreed update, and every member applies θ_anchor ← θ_anchor(1 − η_out·λ) − η_out·U.

=================  ==========================  ============================  ==========================
strategy           prepare (what is sent)      reduce                        apply
=================  ==========================  ============================  ==========================
``lioncub``        sign(β1·M + (1−β1)·Δ)       majority vote / vote mean     sign step, M update
``lioncub-l1``     p-bit L1-scaled c           sum of levels, then sign      sign step, M update
``diloco``         Δ in fp16 or int8           weighted mean                 outer Nesterov SGD
``allreduce``      g in fp32, every step       weighted mean                 Lion on the mean gradient
=================  ==========================  ============================  ==========================
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from .codec import Codec, Encoded
from .codecs import get_codec
from .vote import break_ties, majority_vote, pbit_sum_sign, vote_counts

__all__ = [
    "STRATEGY_NAMES",
    "AllReduceStrategy",
    "DilocoStrategy",
    "LionCubL1Strategy",
    "LionCubStrategy",
    "OuterState",
    "StrategyConfig",
    "SyncStrategy",
    "make_strategy",
    "weighted_mean",
]

StrategyName = Literal["lioncub", "lioncub-l1", "diloco", "allreduce"]
STRATEGY_NAMES: tuple[str, ...] = ("lioncub", "lioncub-l1", "diloco", "allreduce")


@dataclass(frozen=True)
class StrategyConfig:
    """Hyperparameters of a sync strategy (the outer loop).

    Attributes:
        name: one of :data:`STRATEGY_NAMES`.
        local_steps: inner optimizer steps per round (H). 0 means Δ is the gradient and no inner
            optimizer runs (Distributed Lion for ``lioncub``; required for ``allreduce``).
        outer_lr: η_out, the step the agreed update U is scaled by.
        weight_decay: λ, decoupled, applied to the anchor with the outer step.
        beta1, beta2: Lion's interpolation and momentum coefficients for the outer momentum.
        reduction: ``"mavo"`` (weighted majority vote, 1 bit down) or ``"avg"`` (mean of votes).
        ties: what a tied vote (``mavo`` and ``lioncub-l1``) gives: ``"zero"`` (no step there; the
            result then needs a second bit plane wherever some element tied) or ``"random"`` (a
            step of either sign with probability 1/2, which is 0 in expectation and keeps the
            result at 1 bit per parameter; see :func:`lioncub.optim.vote.break_ties`).
        levels: s, the number of positive levels of the ``lioncub-l1`` p-bit codec.
        delta_codec: ``"fp16"`` or ``"int8"`` for ``diloco``'s pseudo-gradient.
        outer_momentum: μ of ``diloco``'s outer Nesterov SGD.
    """

    name: str = "lioncub"
    local_steps: int = 16
    outer_lr: float = 8e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    reduction: str = "mavo"
    ties: str = "zero"
    levels: int = 2
    delta_codec: str = "fp16"
    outer_momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.name not in STRATEGY_NAMES:
            raise ValueError(f"unknown strategy {self.name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
        if self.local_steps < 0:
            raise ValueError(f"local_steps must be >= 0, got {self.local_steps}")
        if self.name == "allreduce" and self.local_steps != 0:
            raise ValueError("allreduce exchanges gradients every step: set local_steps=0")
        if self.name == "diloco" and self.local_steps < 1:
            raise ValueError("diloco needs local_steps >= 1 (use allreduce for per-step exchange)")
        if not (self.outer_lr > 0 and math.isfinite(self.outer_lr)):
            raise ValueError(f"outer_lr must be a positive number, got {self.outer_lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for label, beta in (
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("outer_momentum", self.outer_momentum),
        ):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{label} must be in [0, 1), got {beta}")
        if self.reduction not in ("mavo", "avg"):
            raise ValueError(f"reduction must be 'mavo' or 'avg', got {self.reduction!r}")
        if self.ties not in ("zero", "random"):
            raise ValueError(f"ties must be 'zero' or 'random', got {self.ties!r}")
        if not 1 <= self.levels <= 127:
            raise ValueError(f"levels must be in [1, 127], got {self.levels}")
        if self.delta_codec not in ("fp16", "int8"):
            raise ValueError(f"delta_codec must be 'fp16' or 'int8', got {self.delta_codec!r}")


@dataclass
class OuterState:
    """A peer's outer-loop state, flat float32 vectors on the training device.

    Attributes:
        anchor: θ_anchor, the parameters every member of a round agrees on after it.
        momentum: the strategy's outer buffer (Lion momentum M_i, or the Nesterov buffer).
        round: rounds applied so far.
    """

    anchor: torch.Tensor
    momentum: torch.Tensor
    round: int = 0
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def create(cls, params_flat: torch.Tensor) -> OuterState:
        anchor = params_flat.detach().to(torch.float32).clone()
        return cls(anchor=anchor, momentum=torch.zeros_like(anchor))


def weighted_mean(codec: Codec, parts: Sequence[Encoded], weights: Sequence[int] | None) -> torch.Tensor:
    """Decode float payloads and return their weighted mean in float32."""
    if not parts:
        raise ValueError("nothing to reduce: no parts")
    w = _check_weights(weights, len(parts))
    numel = parts[0].numel

    def terms() -> Iterator[tuple[torch.Tensor, float]]:
        for part, wi in zip(parts, w, strict=True):
            if part.numel != numel:
                raise ValueError(f"parts disagree on length: {part.numel} != {numel}")
            if wi:  # a part of weight 0 is never decoded
                yield codec.decode(part, torch.float32), float(wi)

    return accumulate_mean(terms(), numel, parts[0].data.device, float(sum(w)))


def accumulate_mean(
    terms: Iterable[tuple[torch.Tensor, float]], numel: int, device: torch.device, total: float
) -> torch.Tensor:
    """Σ w_i·v_i / ``total`` in float32, added in the order of ``terms`` (so results are reproducible).

    The one accumulation loop of every weighted float mean (:func:`weighted_mean`, the ``mean``
    reduction of :func:`lioncub.optim.robust.robust_mean`); terms of weight 0 are skipped.
    """
    acc = torch.zeros(numel, dtype=torch.float32, device=device)
    for values, wi in terms:
        if wi:
            acc.add_(values, alpha=wi)
    return acc.div_(total)


def _check_weights(weights: Sequence[int] | None, n: int) -> list[int]:
    if weights is None:
        return [1] * n
    w = [int(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"{n} parts but {len(w)} weights")
    if any(x < 0 for x in w) or sum(w) == 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {w}")
    return w


class SyncStrategy(ABC):
    """One sync strategy; stateless apart from its config (per-peer state lives in OuterState)."""

    def __init__(self, config: StrategyConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    @property
    @abstractmethod
    def uplink(self) -> Codec:
        """Codec of what each member sends."""

    @abstractmethod
    def downlink_bits(self, group_size: int) -> float:
        """Nominal bits per parameter of the reduced result sent back to members."""

    def prepare(self, state: OuterState, delta: torch.Tensor) -> torch.Tensor:
        """The full-length vector this peer contributes (before encoding)."""
        return delta

    def encode(self, vec: torch.Tensor) -> Encoded:
        return self.uplink.encode(vec)

    @abstractmethod
    def reduce(self, parts: Sequence[Encoded], weights: Sequence[int] | None = None) -> Encoded:
        """Owner side: combine the members' payloads of one shard into the result payload."""

    @abstractmethod
    def decode(self, result: Encoded) -> torch.Tensor:
        """Member side: the float32 update U for one shard from the owner's result payload."""

    @abstractmethod
    def apply(self, state: OuterState, update: torch.Tensor, delta: torch.Tensor) -> None:
        """Apply the agreed update U to the anchor and advance this peer's outer momentum."""

    def local_fallback(self, own_part: Encoded, weight: int = 1) -> Encoded:
        """The result for a shard whose owner never answered: this peer's own contribution."""
        return self.reduce([own_part], [max(1, int(weight))])


def _seed_of(parts: Sequence[Encoded]) -> int:
    """A seed that depends on the votes themselves (so it changes every round, and replays).

    Hashes, per part in order, its element count and its first 64 payload bytes; the byte slices
    are gathered into one tensor and copied to the host once.
    """
    heads = [part.data[:64] for part in parts]
    raw = torch.cat(heads).cpu().numpy().tobytes() if heads else b""
    h = hashlib.blake2b(digest_size=8)
    offset = 0
    for part, head in zip(parts, heads, strict=True):
        size = head.numel()
        h.update(part.numel.to_bytes(8, "little"))
        h.update(raw[offset : offset + size])
        offset += size
    return int.from_bytes(h.digest(), "little") >> 1


class _SignStepStrategy(SyncStrategy):
    """Shared apply step of the Lion-family strategies: a sign-like step plus momentum update."""

    def settle_ties(self, result: Encoded, parts: Sequence[Encoded]) -> Encoded:
        """A vote result under the tie rule: ``tern`` as is, or ties broken by a vote-seeded coin."""
        if self.config.ties == "random" and result.codec == "tern":
            return break_ties(result, _seed_of(parts))
        return result

    def _decode_sign(self, result: Encoded) -> torch.Tensor | None:
        """The update of a ``tern`` or ``sign1`` result, or None for another codec."""
        if result.codec == "tern":
            return get_codec("tern").decode(result, torch.float32)
        if result.codec == "sign1":
            return get_codec("sign1").decode(result, torch.float32)
        return None

    def prepare(self, state: OuterState, delta: torch.Tensor) -> torch.Tensor:
        b1 = self.config.beta1
        return state.momentum.mul(b1).add_(delta.to(state.momentum.dtype), alpha=1.0 - b1)

    def apply(self, state: OuterState, update: torch.Tensor, delta: torch.Tensor) -> None:
        cfg = self.config
        if cfg.weight_decay:
            state.anchor.mul_(1.0 - cfg.outer_lr * cfg.weight_decay)
        state.anchor.add_(update.to(state.anchor.dtype), alpha=-cfg.outer_lr)
        state.momentum.mul_(cfg.beta2).add_(delta.to(state.momentum.dtype), alpha=1.0 - cfg.beta2)
        state.round += 1


class LionCubStrategy(_SignStepStrategy):
    """1-bit sign votes; ``mavo`` takes the weighted majority, ``avg`` the mean vote."""

    def __init__(self, config: StrategyConfig) -> None:
        super().__init__(config)
        self._sign = get_codec("sign1")

    @property
    def uplink(self) -> Codec:
        return self._sign

    def downlink_bits(self, group_size: int) -> float:
        if self.config.reduction == "mavo":
            return 1.0
        return float(math.ceil(math.log2(group_size + 1)))

    def reduce(self, parts: Sequence[Encoded], weights: Sequence[int] | None = None) -> Encoded:
        if self.config.reduction == "mavo":
            return self.settle_ties(majority_vote(parts, weights), parts)
        return vote_counts(parts, weights)

    def decode(self, result: Encoded) -> torch.Tensor:
        update = self._decode_sign(result)
        if update is not None:
            return update
        if result.codec.startswith("counts"):
            return get_codec(result.codec).decode(result, torch.float32)
        raise ValueError(f"lioncub cannot decode a {result.codec!r} result")


class LionCubL1Strategy(_SignStepStrategy):
    """Lion Cub's p-bit L1-scaled contributions; the group sums the levels and takes the sign."""

    def __init__(self, config: StrategyConfig) -> None:
        super().__init__(config)
        self._pbit = get_codec(f"pbit{config.levels}")

    @property
    def uplink(self) -> Codec:
        return self._pbit

    def downlink_bits(self, group_size: int) -> float:
        return 1.0

    def reduce(self, parts: Sequence[Encoded], weights: Sequence[int] | None = None) -> Encoded:
        return self.settle_ties(pbit_sum_sign(parts, weights), parts)

    def decode(self, result: Encoded) -> torch.Tensor:
        update = self._decode_sign(result)
        if update is None:
            raise ValueError(f"lioncub-l1 cannot decode a {result.codec!r} result")
        return update


class _MeanStrategy(SyncStrategy):
    """Strategies whose group reduction is the weighted mean of float payloads in one codec."""

    def __init__(self, config: StrategyConfig, codec_name: str) -> None:
        super().__init__(config)
        self._codec = get_codec(codec_name)

    @property
    def uplink(self) -> Codec:
        return self._codec

    def downlink_bits(self, group_size: int) -> float:
        return self._codec.bits_per_param()

    def reduce(self, parts: Sequence[Encoded], weights: Sequence[int] | None = None) -> Encoded:
        return self._codec.encode(weighted_mean(self._codec, parts, weights))

    def decode(self, result: Encoded) -> torch.Tensor:
        return self._codec.decode(result, torch.float32)


class DilocoStrategy(_MeanStrategy):
    """DiLoCo: weighted mean of pseudo-gradients, then outer Nesterov SGD on the anchor."""

    def __init__(self, config: StrategyConfig) -> None:
        super().__init__(config, config.delta_codec)

    def apply(self, state: OuterState, update: torch.Tensor, delta: torch.Tensor) -> None:
        cfg = self.config
        mu = cfg.outer_momentum
        buf = state.momentum
        buf.mul_(mu).add_(update)
        if cfg.weight_decay:
            state.anchor.mul_(1.0 - cfg.outer_lr * cfg.weight_decay)
        state.anchor.add_(update, alpha=-cfg.outer_lr).add_(buf, alpha=-cfg.outer_lr * mu)
        state.round += 1


class AllReduceStrategy(_MeanStrategy):
    """Data-parallel Lion: fp32 gradients every step, averaged, then one Lion step on the anchor."""

    def __init__(self, config: StrategyConfig) -> None:
        super().__init__(config, "fp32")

    def apply(self, state: OuterState, update: torch.Tensor, delta: torch.Tensor) -> None:
        cfg = self.config
        c = state.momentum.mul(cfg.beta1).add_(update, alpha=1.0 - cfg.beta1)
        if cfg.weight_decay:
            state.anchor.mul_(1.0 - cfg.outer_lr * cfg.weight_decay)
        state.anchor.add_(torch.sign(c), alpha=-cfg.outer_lr)
        state.momentum.mul_(cfg.beta2).add_(update, alpha=1.0 - cfg.beta2)
        state.round += 1


def make_strategy(config: StrategyConfig) -> SyncStrategy:
    """Build the strategy named by ``config.name``."""
    if config.name == "lioncub":
        return LionCubStrategy(config)
    if config.name == "lioncub-l1":
        return LionCubL1Strategy(config)
    if config.name == "diloco":
        return DilocoStrategy(config)
    return AllReduceStrategy(config)
