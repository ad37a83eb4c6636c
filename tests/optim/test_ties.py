"""Tied votes settled by a coin: 1 bit down, 0 in expectation, reproducible from the votes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lioncub.optim.codecs import get_codec
from lioncub.optim.strategies import StrategyConfig, make_strategy
from lioncub.optim.vote import break_ties, majority_vote

SIGN, TERN = get_codec("sign1"), get_codec("tern")


def _votes(n: int, numel: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g) for _ in range(n)]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 8), numel=st.integers(0, 300), seed=st.integers(0, 2**31), coin=st.integers(0, 2**62))
def test_break_ties_keeps_every_decided_element_and_flips_only_ties(
    n: int, numel: int, seed: int, coin: int
) -> None:
    parts = [SIGN.encode(v) for v in _votes(n, numel, seed)]
    tern = majority_vote(parts)
    settled = break_ties(tern, coin)
    assert settled.codec == "sign1" and settled.nbytes == SIGN.encoded_nbytes(numel)
    before, after = TERN.decode(tern), SIGN.decode(settled)  # decode also checks the padding bits
    decided = before != 0
    assert torch.equal(after[decided], before[decided])
    assert bool((after[~decided].abs() == 1).all())
    assert torch.equal(SIGN.decode(break_ties(tern, coin)), after), "not reproducible from the seed"


def test_ties_become_either_sign_half_the_time() -> None:
    numel = 40_000
    ones, minus = torch.ones(numel), -torch.ones(numel)
    tern = majority_vote([SIGN.encode(ones), SIGN.encode(minus)])  # every element ties
    assert bool((TERN.decode(tern) == 0).all())
    flips = SIGN.decode(break_ties(tern, 7))
    mean = float(flips.mean())
    assert abs(mean) < 5 / numel**0.5, f"mean of the coin flips {mean} (5 sigma = {5 / numel**0.5:.4f})"
    assert not torch.equal(flips, SIGN.decode(break_ties(tern, 8))), "the seed does not change the coins"


@pytest.mark.parametrize("name", ["lioncub", "lioncub-l1"])
def test_random_ties_cost_one_bit_down_and_zero_ties_cost_two(name: str) -> None:
    votes = _votes(4, 10_001, 3)
    results = {}
    for ties in ("zero", "random"):
        strategy = make_strategy(StrategyConfig(name=name, ties=ties))
        parts = [strategy.encode(v) for v in votes]
        results[ties] = strategy.reduce(parts, [16] * 4)
        update = strategy.decode(results[ties])
        assert update.shape == (10_001,)
        if ties == "random":
            assert results[ties].nbytes == SIGN.encoded_nbytes(10_001)
            assert bool((update.abs() == 1).all())
        else:
            assert bool((update == 0).any()), "four equal voters never tied"
    assert results["zero"].nbytes > 1.9 * results["random"].nbytes
    # Where the group decided, both rules give the same step.
    zero = make_strategy(StrategyConfig(name=name)).decode(results["zero"])
    rand = make_strategy(StrategyConfig(name=name)).decode(results["random"])
    assert torch.equal(rand[zero != 0], zero[zero != 0])


def test_ties_is_validated() -> None:
    with pytest.raises(ValueError, match="ties must be"):
        StrategyConfig(ties="heads")
