"""Sync strategies: degenerate cases equal their single-node optimizers; byte accounting is exact."""

from __future__ import annotations

import math

import pytest
import torch

from lioncub.optim import Lion
from lioncub.optim.codecs import get_codec
from lioncub.optim.strategies import STRATEGY_NAMES, OuterState, StrategyConfig, SyncStrategy, make_strategy


def _round(strategy: SyncStrategy, states: list[OuterState], deltas: list[torch.Tensor]) -> torch.Tensor:
    """One all-member round with a single shard (the reduction is shard-local anyway)."""
    parts = [strategy.encode(strategy.prepare(s, d)) for s, d in zip(states, deltas, strict=True)]
    update = strategy.decode(strategy.reduce(parts, [1] * len(parts)))
    for s, d in zip(states, deltas, strict=True):
        strategy.apply(s, update, d)
    return update


def _grads(steps: int, numel: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("name", ["lioncub", "allreduce"])
def test_one_peer_without_local_steps_is_lion(name: str) -> None:
    cfg = StrategyConfig(name=name, local_steps=0, outer_lr=1e-2, weight_decay=0.1)
    strategy = make_strategy(cfg)
    theta0 = torch.randn(257, generator=torch.Generator().manual_seed(1))
    state = OuterState.create(theta0)
    ref = torch.nn.Parameter(theta0.clone())
    opt = Lion([ref], lr=cfg.outer_lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    for g in _grads(6, 257):
        _round(strategy, [state], [g])
        ref.grad = g.clone()
        opt.step()
    torch.testing.assert_close(state.anchor, ref.detach(), rtol=0, atol=1e-6)


def test_identical_peers_vote_like_one_peer() -> None:
    cfg = StrategyConfig(name="lioncub", local_steps=0, outer_lr=1e-2)
    strategy = make_strategy(cfg)
    theta0 = torch.randn(1000)
    solo = OuterState.create(theta0)
    group = [OuterState.create(theta0) for _ in range(5)]
    for g in _grads(5, 1000, seed=3):
        u1 = _round(strategy, [solo], [g])
        u5 = _round(strategy, group, [g.clone() for _ in group])
        assert torch.equal(u1, u5)
    for s in group:
        assert torch.equal(s.anchor, solo.anchor)
        assert torch.equal(s.momentum, solo.momentum)


def test_mavo_majority_and_tie() -> None:
    strategy = make_strategy(StrategyConfig(name="lioncub", local_steps=0))
    states = [OuterState.create(torch.zeros(3)) for _ in range(4)]
    # Coordinates: 3 of 4 positive; 1 of 4 positive; a 2-2 tie.
    deltas = [torch.tensor([1.0, -1.0, 1.0]), torch.tensor([1.0, -1.0, 1.0])]
    deltas += [torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, 1.0, -1.0])]
    update = _round(strategy, states, deltas)
    assert update.tolist() == [1.0, -1.0, 0.0]


def test_avg_reduction_is_mean_vote() -> None:
    strategy = make_strategy(StrategyConfig(name="lioncub", local_steps=0, reduction="avg"))
    states = [OuterState.create(torch.zeros(2)) for _ in range(4)]
    deltas = [torch.tensor([1.0, 1.0])] * 3 + [torch.tensor([1.0, -1.0])]
    update = _round(strategy, states, deltas)
    assert update.tolist() == pytest.approx([1.0, 0.5])


def test_lioncub_l1_sums_levels_then_signs() -> None:
    strategy = make_strategy(StrategyConfig(name="lioncub-l1", local_steps=0, levels=2))
    states = [OuterState.create(torch.zeros(4)) for _ in range(3)]
    deltas = [torch.tensor([4.0, -4.0, 0.1, 3.0]), torch.tensor([2.0, -2.0, -0.1, -1.0])]
    deltas.append(torch.tensor([-1.0, 1.0, 0.0, -1.0]))
    update = _round(strategy, states, deltas)
    assert set(update.tolist()) <= {-1.0, 0.0, 1.0}
    assert update[0] == 1.0 and update[1] == -1.0


def test_one_peer_diloco_is_outer_nesterov_on_its_delta() -> None:
    cfg = StrategyConfig(name="diloco", local_steps=4, outer_lr=0.7, outer_momentum=0.9)
    strategy = make_strategy(cfg)
    theta0 = torch.randn(100)
    state = OuterState.create(theta0)
    ref = torch.nn.Parameter(theta0.clone())
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    fp16 = get_codec("fp16")
    for d in _grads(4, 100, seed=5):
        d = d * 0.01
        _round(strategy, [state], [d])
        ref.grad = fp16.decode(fp16.encode(d))
        opt.step()
    torch.testing.assert_close(state.anchor, ref.detach(), rtol=0, atol=1e-6)


def test_local_steps_delta_moves_anchor_toward_params() -> None:
    """With H >= 1, Δ = anchor − params: a peer that moved down moves the anchor down."""
    cfg = StrategyConfig(name="lioncub", local_steps=4, outer_lr=0.5)
    strategy = make_strategy(cfg)
    state = OuterState.create(torch.zeros(8))
    params = torch.full((8,), -1.0)
    _round(strategy, [state], [state.anchor - params])
    assert torch.all(state.anchor < 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "nope"}, "unknown strategy"),
        ({"name": "allreduce", "local_steps": 4}, "local_steps=0"),
        ({"name": "diloco", "local_steps": 0}, "local_steps >= 1"),
        ({"outer_lr": 0.0}, "outer_lr"),
        ({"outer_lr": math.nan}, "outer_lr"),
        ({"beta1": 1.0}, "beta1"),
        ({"reduction": "median"}, "reduction"),
        ({"delta_codec": "fp8"}, "delta_codec"),
        ({"local_steps": -1}, "local_steps"),
    ],
)
def test_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StrategyConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_uplink_bytes_match_bits_per_param(name: str) -> None:
    local = 0 if name == "allreduce" else 2
    strategy = make_strategy(StrategyConfig(name=name, local_steps=local))
    numel = 4096
    enc = strategy.encode(strategy.prepare(OuterState.create(torch.zeros(numel)), torch.randn(numel)))
    bits = strategy.uplink.bits_per_param()
    assert enc.nbytes == strategy.uplink.encoded_nbytes(numel)
    # Fixed headers (scales) are the only difference from bits × P.
    assert numel * bits / 8 <= enc.nbytes <= numel * bits / 8 + 64
