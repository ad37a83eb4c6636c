"""Byzantine-robust reductions: robust float means, sign agreement, and per-voter trust.

Three pure building blocks a shard owner uses against a peer that sends garbage (DESIGN.md section
2 defines the reductions they harden; docs/RELIABILITY.md, "Byzantine peers", the threat model):

* :func:`robust_mean` — the float syncs (momentum, parameter averaging): the plain weighted mean,
  a mean whose contributions are norm-clipped around the coordinate-wise median (``clipped``,
  "centered clipping"), or the coordinate-wise median. Non-finite contributions never get here:
  :class:`~lioncub.optim.reducers.MeanReducer` drops them first.
* :func:`sign_agreements` — the fraction of each voter's sign bits that match the group's majority,
  counted on packed bytes (popcount of XOR, masked by the majority's non-tie plane).
* :class:`AgreementTracker` — an exponential moving average of each voter's agreement and the
  vote weight (trust in [0, 1]) that follows from it; a voter whose trust stays near 0 for
  ``evict_after`` observations is evicted (weight 0 from then on).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from . import _bitpack as bp
from .codec import CodecError, Encoded
from .strategies import accumulate_mean

__all__ = [
    "ROBUST_REDUCTIONS",
    "AgreementTracker",
    "TrustConfig",
    "robust_mean",
    "sign_agreement",
    "sign_agreements",
    "trust_weights",
]

#: ``mean``: weighted mean; ``clipped``: mean of contributions norm-clipped around the coordinate
#: median; ``median``: coordinate-wise median (unweighted; mid-point of the middle two for even n).
ROBUST_REDUCTIONS: tuple[str, ...] = ("mean", "clipped", "median")


@functools.lru_cache(maxsize=16)
def _popcount_table(device: torch.device) -> torch.Tensor:
    """Set bits of every byte value, as a ``uint8`` table on ``device`` (one copy per device)."""
    return torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8, device=device)


def _popcount(data: torch.Tensor) -> torch.Tensor:
    """Set bits of the ``uint8`` rows of ``data`` (1-D: one row), summed per row as ``int64``."""
    table = _popcount_table(data.device)
    bits = table.index_select(0, data.reshape(-1).to(torch.int32)).view(data.shape)
    return bits.sum(dim=-1, dtype=torch.int64)


def _median(stacked: torch.Tensor) -> torch.Tensor:
    ordered = stacked.sort(dim=0).values
    n = stacked.shape[0]
    return (ordered[(n - 1) // 2] + ordered[n // 2]) * 0.5


def robust_mean(
    values: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    method: str = "clipped",
    *,
    clip_factor: float = 2.0,
) -> torch.Tensor:
    """Combine float vectors of one length with ``method`` (one of :data:`ROBUST_REDUCTIONS`).

    ``clipped``: with c the coordinate-wise median and d_i = v_i − c, every d_i is scaled down to
    norm at most τ = ``clip_factor`` × median_i ‖d_i‖, and the result is c + Σ w_i d_i / Σ w_i. One
    contribution then moves the result by at most τ·w_i/Σw, however large it is; with honest,
    similar contributions nothing is clipped and the result is close to the mean (equal to it for
    two contributions or when no norm exceeds τ and the median is the mean).
    ``values`` must be finite: the caller drops non-finite vectors first (as
    :class:`~lioncub.optim.reducers.MeanReducer` does when it decodes them); this does not check
    them again.
    """
    if method not in ROBUST_REDUCTIONS:
        raise ValueError(f"unknown reduction {method!r}; choose one of {', '.join(ROBUST_REDUCTIONS)}")
    if not values:
        raise ValueError("nothing to reduce: no values")
    if not (clip_factor > 0 and math.isfinite(clip_factor)):
        raise ValueError(f"clip_factor must be a positive number, got {clip_factor}")
    w = [1.0] * len(values) if weights is None else [float(x) for x in weights]
    if len(w) != len(values) or any(not (x >= 0 and math.isfinite(x)) for x in w) or sum(w) <= 0:
        raise ValueError(f"need one finite weight >= 0 per value with a positive sum, got {w}")
    numel = values[0].numel()
    if any(v.numel() != numel for v in values):
        raise ValueError(f"values disagree on length: {[v.numel() for v in values]}")
    if method == "mean":  # accumulated in order, exactly like strategies.weighted_mean
        rows = ((v.to(torch.float32).reshape(-1), wi) for v, wi in zip(values, w, strict=True))
        return accumulate_mean(rows, numel, values[0].device, sum(w))
    stacked = torch.stack([v.to(torch.float32).reshape(-1) for v in values])
    wt = torch.tensor(w, dtype=torch.float32, device=stacked.device)
    center = _median(stacked)
    if method == "median":
        return center
    dev = stacked - center
    norms = dev.norm(dim=1)
    tau = clip_factor * float(norms.median())
    scale = torch.where(norms > tau, tau / norms.clamp_min(1e-30), torch.ones_like(norms))
    return center + (dev * (scale * wt)[:, None]).sum(dim=0).div_(wt.sum())


def _check_agreement_pair(vote: Encoded, majority: Encoded) -> None:
    if vote.codec != "sign1" or majority.codec != "tern":
        raise CodecError(
            f"sign_agreement compares sign1 with tern, got {vote.codec!r} and {majority.codec!r}"
        )
    if vote.numel != majority.numel:
        raise CodecError(f"vote has {vote.numel} elements, the majority {majority.numel}")
    width = bp.nbytes_for(vote.numel)
    if vote.nbytes != width or majority.nbytes not in (1 + width, 1 + 2 * width):
        raise CodecError("payload sizes do not match their element count")


def sign_agreement(vote: Encoded, majority: Encoded) -> float:
    """Fraction of ``vote``'s sign bits (``sign1``) equal to ``majority``'s (``tern``), ties skipped.

    One voter's :func:`sign_agreements`.
    """
    return sign_agreements([vote], majority)[0]


def sign_agreements(votes: Sequence[Encoded], majority: Encoded) -> list[float]:
    """For each of ``votes`` (``sign1``), the fraction of its sign bits equal to ``majority``'s (``tern``).

    Counted on packed bytes: popcount((vote XOR sign) AND nonzero) / popcount(nonzero), elements
    where the majority tied skipped. Every voter scores 1.0 when every element of the majority is
    a tie (nothing to disagree with). The majority's planes and its count are taken once for all
    voters, and the counts come to the host in one transfer.
    """
    for vote in votes:
        _check_agreement_pair(vote, majority)
    if not votes:
        return []
    width = bp.nbytes_for(majority.numel)
    numel = majority.numel
    sign = majority.data[1 : 1 + width]
    if majority.nbytes == 1 + 2 * width:
        nonzero = majority.data[1 + width :]
    else:
        nonzero = torch.full((width,), 0xFF, dtype=torch.uint8, device=majority.data.device)
        if numel % 8:
            nonzero[-1] = (1 << numel % 8) - 1
    bits = torch.stack([vote.data for vote in votes])
    differ = _popcount(bits.bitwise_xor_(sign).bitwise_and_(nonzero))
    counted, *differs = torch.cat([_popcount(nonzero).reshape(1), differ]).tolist()
    if counted == 0:
        return [1.0] * len(votes)
    return [1.0 - d / counted for d in differs]


@dataclass(frozen=True)
class TrustConfig:
    """How a shard owner turns voters' agreement with the majority into vote weights.

    Attributes:
        enabled: off = every voter keeps weight 1 (scores are still kept).
        ema: weight of the past in the moving average of a voter's agreement.
        floor: the agreement of a voter with no information (random signs): 0.5.
        tolerance: a voter keeps full weight down to ``floor + tolerance × (median − floor)``,
            the median taken over the voters of the same reduction; below, its weight falls
            linearly to 0 at ``floor``.
        min_signal: when the median agreement is within this of ``floor`` the votes carry no
            signal to judge by, and everyone keeps weight 1.
        evict_below, evict_after: a voter whose weight stays below ``evict_below`` for
            ``evict_after`` consecutive observations is evicted: weight 0 from then on.
        levels: weights are multiples of 1/levels (vote weights are integers).
    """

    enabled: bool = True
    ema: float = 0.7
    floor: float = 0.5
    tolerance: float = 0.5
    min_signal: float = 0.02
    evict_below: float = 0.25
    evict_after: int = 5
    levels: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if not 0.0 < self.tolerance <= 1.0:
            raise ValueError(f"tolerance must be in (0, 1], got {self.tolerance}")
        if self.evict_after < 1 or self.levels < 1:
            raise ValueError("evict_after and levels must be >= 1")


class AgreementTracker:
    """Per-peer moving average of agreement with the majority, and the trust it earns.

    One tracker per peer (the shard owner's view); peers are keyed by their verified peer id.
    """

    def __init__(self, config: TrustConfig | None = None) -> None:
        self.config = config or TrustConfig()
        self.scores: dict[str, float] = {}
        self._low_streak: dict[str, int] = {}
        self._evicted: set[str] = set()

    def __repr__(self) -> str:
        return f"AgreementTracker({len(self.scores)} peers, {len(self._evicted)} evicted)"

    @property
    def evicted(self) -> frozenset[str]:
        return frozenset(self._evicted)

    def observe(self, peer_id: str, agreement: float) -> None:
        """Fold one reduction's agreement of ``peer_id`` into its moving average."""
        if not 0.0 <= agreement <= 1.0:
            raise ValueError(f"agreement must be in [0, 1], got {agreement}")
        old = self.scores.get(peer_id)
        a = self.config.ema
        self.scores[peer_id] = agreement if old is None else a * old + (1.0 - a) * agreement

    def weights(self, peer_ids: Iterable[str]) -> dict[str, float]:
        """Trust in [0, 1] of each of ``peer_ids`` (judged against their median), multiples of 1/levels.

        Unknown peers get 1; evicted peers 0. Also advances the eviction counters, so call it once
        per reduction.
        """
        cfg = self.config
        ids = list(peer_ids)
        known = [self.scores[p] for p in ids if p in self.scores and p not in self._evicted]
        median = statistics.median(known) if known else cfg.floor
        margin = median - cfg.floor
        out: dict[str, float] = {}
        for p in ids:
            if p in self._evicted:
                out[p] = 0.0
                continue
            score = self.scores.get(p)
            if not cfg.enabled or score is None or margin < cfg.min_signal:
                out[p] = 1.0
                continue
            trust = min(1.0, max(0.0, (score - cfg.floor) / (cfg.tolerance * margin)))
            trust = math.floor(trust * cfg.levels) / cfg.levels
            streak = self._low_streak.get(p, 0) + 1 if trust < cfg.evict_below else 0
            self._low_streak[p] = streak
            if streak >= cfg.evict_after:
                self._evicted.add(p)
                trust = 0.0
            out[p] = trust
        return out


def trust_weights(samples: Sequence[int], trust: Sequence[float], levels: int) -> list[int]:
    """Integer vote weights: each sample count times its trust (a multiple of 1/levels)."""
    return [int(s) * round(t * levels) for s, t in zip(samples, trust, strict=True)]
