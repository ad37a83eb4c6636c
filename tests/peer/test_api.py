"""The Python API: two GossipTrainer peers in one process train a user's own model together."""

from __future__ import annotations

import threading

import torch
from torch import nn

from lioncub.optim import Lion, StrategyConfig
from lioncub.peer import GossipTrainer
from lioncub.peer.dht import visible_maddrs
from lioncub.peer.node import PeerSettings


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def _train(peer: GossipTrainer, model: nn.Module, seed: int, steps: int, losses: list[float]) -> None:
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.linspace(-1, 1, 8)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen)
        loss = nn.functional.mse_loss(model(x).squeeze(-1), torch.sin(x @ teacher))
        loss.backward()
        peer.step(samples=32)
        losses.append(float(loss.detach()))


def test_two_wrapped_models_train_together() -> None:
    settings = PeerSettings(min_peers=1)
    strategy = StrategyConfig(local_steps=4, outer_lr=2e-3)
    model_a, model_b = _model(), _model()
    peer_a = GossipTrainer(
        model_a, Lion(model_a.parameters(), lr=1e-3), run_id="api-test", strategy=strategy, settings=settings
    )
    try:
        maddr = visible_maddrs(peer_a.node.dht)[0]
        peer_b = GossipTrainer(
            model_b, Lion(model_b.parameters(), lr=1e-3), dht=[maddr], run_id="api-test", settings=settings
        )
        try:
            assert peer_b.config.strategy == strategy  # taken from the DHT
            losses: dict[str, list[float]] = {"a": [], "b": []}
            threads = [
                threading.Thread(target=_train, args=(peer_a, model_a, 1, 80, losses["a"])),
                threading.Thread(target=_train, args=(peer_b, model_b, 2, 80, losses["b"])),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=240)
            assert not any(t.is_alive() for t in threads)
            assert peer_a.round == peer_b.round == 20
            assert sum(r.group_size == 2 for r in peer_b.rounds) >= 15
            # Same agreed anchor on both sides after every round both joined.
            for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
                assert torch.equal(pa, pb)
            assert sum(losses["a"][-10:]) < sum(losses["a"][:10])
        finally:
            peer_b.close()
    finally:
        peer_a.close()
