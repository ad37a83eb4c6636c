"""Byzantine defences as pure math: robust float means, NaN rejection, sign agreement, trust.

Each defence is checked on and off: the off case must be harmed, or the defence is not needed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lioncub.optim.codecs import get_codec
from lioncub.optim.reducers import MeanReducer, TrustedVoteReducer
from lioncub.optim.robust import AgreementTracker, TrustConfig, robust_mean, sign_agreement
from lioncub.optim.strategies import StrategyConfig, make_strategy
from lioncub.optim.vote import majority_vote
from lioncub.peer.adversary import Adversary, Envelope, admit, nan_payload

SIGN, FP16 = get_codec("sign1"), get_codec("fp16")


def _honest(n: int, numel: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    center = torch.randn(numel, generator=gen)
    return [center + 0.1 * torch.randn(numel, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("method", ["mean", "clipped", "median"])
def test_one_huge_contribution_moves_only_the_plain_mean(method: str) -> None:
    honest = _honest(7, 1000)
    poison = Adversary("momentum-poison-huge").corrupt("momentum", honest[0])
    target = torch.stack(honest).mean(0)
    error = float((robust_mean([*honest, poison], method=method) - target).norm() / target.norm())
    if method == "mean":
        assert error > 100  # the defence off: one peer of eight owns the result
    else:
        assert error < 0.05, error


def test_clipped_equals_the_mean_for_two_or_for_similar_contributions() -> None:
    a, b = _honest(2, 257)
    assert torch.allclose(robust_mean([a, b], method="clipped"), (a + b) / 2, atol=1e-6)
    honest = _honest(8, 500, seed=3)
    close = robust_mean(honest, method="clipped") - torch.stack(honest).mean(0)
    assert float(close.norm()) < 0.02 * float(torch.stack(honest).mean(0).norm())


def test_weighted_mean_path_is_the_old_weighted_mean_bit_for_bit() -> None:
    from lioncub.optim.strategies import weighted_mean

    parts = [FP16.encode(v) for v in _honest(3, 100)]
    old = weighted_mean(FP16, parts, [1, 2, 3])
    new = FP16.decode(MeanReducer("fp16", "mean").reduce(parts, [1, 2, 3]))
    assert torch.equal(FP16.decode(FP16.encode(old)), new)


@pytest.mark.parametrize("reject", [True, False], ids=["defence-on", "defence-off"])
@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_non_finite_contribution_is_dropped_not_propagated(reject: bool, codec: str) -> None:
    reducer = MeanReducer(codec, "clipped", reject_non_finite=reject)
    honest = [reducer.encode(v) for v in _honest(4, 300)]
    nan = nan_payload(honest[0])
    if not reject:  # the whole shard's sync is lost: every member falls back to its own value
        with pytest.raises(ValueError):
            reducer.reduce([*honest, nan], [1] * 5)
        return
    out = reducer.decode(reducer.reduce([*honest, nan], [1] * 5))
    assert bool(torch.isfinite(out).all())
    assert reducer.rejected == 1
    assert torch.equal(out, reducer.decode(reducer.reduce(honest, [1] * 4)))


def test_a_sync_with_only_non_finite_contributions_fails_instead_of_sending_nan() -> None:
    reducer = MeanReducer("fp16", "median")
    nan = nan_payload(reducer.encode(torch.zeros(10)))
    with pytest.raises(ValueError, match="finite"):
        reducer.reduce([nan, nan])


@pytest.mark.parametrize("numel", [1, 7, 64, 1001])
def test_sign_agreement_counts_matching_bits_on_packed_words(numel: int) -> None:
    gen = torch.Generator().manual_seed(numel)
    votes = [SIGN.encode(torch.randn(numel, generator=gen)) for _ in range(4)]  # 4 voters: ties
    majority = majority_vote(votes)
    tern = get_codec("tern").decode(majority).numpy()
    for v in votes:
        bits = SIGN.decode(v).numpy()
        counted = tern != 0
        want = 1.0 if not counted.any() else float(np.mean(bits[counted] == tern[counted]))
        assert sign_agreement(v, majority) == pytest.approx(want)


def _noisy_votes(truth: torch.Tensor, honest: int, liars: int, p: float, gen: torch.Generator) -> list:  # type: ignore[type-arg]
    """``honest`` voters each right with probability p; ``liars`` collude on the opposite sign."""
    votes = []
    for _ in range(honest):
        right = torch.rand(truth.shape, generator=gen) < p
        votes.append(SIGN.encode(torch.where(right, truth, -truth)))
    votes += [SIGN.encode(-truth) for _ in range(liars)]
    return votes


@pytest.mark.parametrize("enabled", [True, False], ids=["defence-on", "defence-off"])
def test_trust_outvotes_a_colluding_minority(enabled: bool) -> None:
    """Five noisy honest voters (right 80% of the time) against three colluding sign-flippers."""
    gen = torch.Generator().manual_seed(0)
    strategy = make_strategy(StrategyConfig(name="lioncub"))
    tracker = AgreementTracker(TrustConfig(enabled=enabled))
    reducer = TrustedVoteReducer(strategy, tracker, owner_id="p0")
    senders = [f"p{i}" for i in range(8)]  # p0 owns; p5..p7 lie
    accuracy = []
    for _ in range(12):
        truth = torch.where(torch.rand(2000, generator=gen) < 0.5, -1.0, 1.0)
        result = strategy.decode(reducer.reduce_from(senders, _noisy_votes(truth, 5, 3, 0.8, gen), [64] * 8))
        accuracy.append(float((result == truth).float().mean()))
    late = sum(accuracy[-4:]) / 4
    if enabled:
        assert tracker.evicted == {"p5", "p6", "p7"}
        assert late > 0.8, accuracy
    else:
        assert not tracker.evicted
        assert late < 0.5, accuracy  # the liars win most elements or tie them


def test_trust_keeps_every_honest_voter_at_full_weight() -> None:
    gen = torch.Generator().manual_seed(1)
    tracker = AgreementTracker()
    reducer = TrustedVoteReducer(make_strategy(StrategyConfig()), tracker, owner_id="p0")
    senders = [f"p{i}" for i in range(8)]
    for _ in range(20):
        truth = torch.where(torch.rand(500, generator=gen) < 0.5, -1.0, 1.0)
        reducer.reduce_from(senders, _noisy_votes(truth, 8, 0, 0.65, gen), [1] * 8)
        assert set(reducer.last_trust.values()) == {1.0}
    assert not tracker.evicted


def test_trust_needs_sign_votes_and_distinct_senders() -> None:
    with pytest.raises(ValueError, match="sign1"):
        TrustedVoteReducer(make_strategy(StrategyConfig(name="diloco")), AgreementTracker())
    reducer = TrustedVoteReducer(make_strategy(StrategyConfig()), AgreementTracker())
    vote = SIGN.encode(torch.ones(8))
    with pytest.raises(ValueError, match="distinct"):
        reducer.reduce_from(["a", "a"], [vote, vote])


def test_adversary_modes_corrupt_what_they_say() -> None:
    vec = torch.randn(100)
    assert torch.equal(Adversary("sign-flip").corrupt("update", vec), -vec)
    assert torch.equal(Adversary("all-ones").corrupt("update", vec), torch.ones(100))
    assert torch.equal(Adversary("sign-flip").corrupt("momentum", vec), vec)  # votes only
    huge = Adversary("momentum-poison-huge").corrupt("params", vec)
    assert float(huge.abs().min()) == 6e4 and FP16.encode(huge).numel == 100
    stale = Adversary("stale-replay", stale_lag=2)
    sent = [stale.corrupt("update", torch.full((3,), float(r))) for r in range(5)]
    assert [float(v[0]) for v in sent] == [0, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="unknown adversary"):
        Adversary("polite")


def test_admit_counts_each_verified_identity_once() -> None:
    part = SIGN.encode(torch.ones(8))
    members = ["a", "b", "c"]
    envelopes = [
        Envelope("b", "c", 5, "g", part),  # c impersonates b
        Envelope("c", "c", 4, "g", part),  # c replays round 4
        Envelope("c", "c", 5, "other", part),  # c's vote for another group
        Envelope("x", "x", 5, "g", part),  # not a member
        Envelope("a", "a", 5, "g", part),
        Envelope("b", "b", 5, "g", part),
        Envelope("c", "c", 5, "g", part),
        Envelope("c", "c", 5, "g", part),  # a second push for the same slot
    ]
    assert [s for s, _ in admit(envelopes, members=members, round=5, group="g", verify=True)] == [
        "a",
        "b",
        "c",
    ]
    assert len(admit(envelopes, members=members, round=5, group="g", verify=False)) == len(envelopes)
