"""Turn your own training loop into a lioncub peer in a few lines.

Example::

    import torch
    from lioncub.peer import GossipTrainer
    from lioncub.optim import Lion, StrategyConfig

    model = MyModel()
    opt = Lion(model.parameters(), lr=1e-3)             # your inner optimizer (any torch optimizer)
    peer = GossipTrainer(model, opt, dht=["/ip4/1.2.3.4/tcp/31337/p2p/Qm..."], run_id="my-run",
                         strategy=StrategyConfig(local_steps=8, outer_lr=3e-3))
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        peer.step(samples=len(x))   # opt.step() + zero_grad(); every local_steps steps, one sync round
    peer.close()

The network side (DHT, gRPC server, matchmaking, exchange) runs on an asyncio loop in a background
thread; :meth:`GossipTrainer.step` blocks only for the sync rounds. With ``local_steps=0`` the
optimizer is not used: the gradient itself is voted on every step (Distributed Lion).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from lioncub.optim.strategies import OuterState, StrategyConfig, make_strategy

from .config import RunConfig, TaskConfig
from .local import copy_into_params
from .node import PeerNode, PeerSettings
from .rounds import RoundReport

__all__ = ["GossipTrainer"]

T = TypeVar("T")


class GossipTrainer:
    """Wraps a model and its optimizer; call :meth:`step` after each ``backward()``.

    Args:
        model: the model every peer of the run trains (same architecture and initialisation:
            seed it identically everywhere, or let joiners download the swarm's parameters).
        optimizer: the inner optimizer over ``model``'s parameters (ignored when local_steps == 0).
        dht: multiaddrs of any DHT node of the swarm; empty to start a new swarm.
        run_id: the run to join or create.
        strategy: the sync strategy; used only when this peer creates the run.
        config: a full run config instead of ``strategy`` (its ``run_id`` wins).
        settings: local peer settings (ports, client mode, ...); ``dht`` and ``run_id`` fill in theirs.
        sync_timeout: longest a sync round may block :meth:`step`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        dht: Sequence[str] = (),
        run_id: str = "custom",
        strategy: StrategyConfig | None = None,
        config: RunConfig | None = None,
        settings: PeerSettings | None = None,
        sync_timeout: float = 120.0,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        if config is None:
            config = RunConfig(
                run_id=run_id,
                task=TaskConfig(name=f"custom:{type(model).__name__}"),
                strategy=strategy or StrategyConfig(),
            )
        base = settings or PeerSettings()
        self._settings = PeerSettings(
            **{**base.__dict__, "initial_peers": tuple(dht), "run_id": config.run_id}
        )
        self._timeout = sync_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lioncub-peer", daemon=True)
        self._thread.start()
        self._steps = 0
        self._samples = 0
        self.rounds: list[RoundReport] = []
        try:
            self.node: PeerNode = self._call(PeerNode.create(self._settings, config), timeout=120.0)
            self.config = self.node.config
            local_steps = self.config.strategy.local_steps
            if local_steps > 0 and optimizer is None:
                raise ValueError("local_steps > 0 needs an inner optimizer")
            self.state = OuterState.create(parameters_to_vector(self.params))
            self._call(self._start(), timeout=120.0)
        except BaseException:
            self.close()
            raise

    async def _start(self) -> None:
        await self.node.start(self.state, make_strategy(self.config.strategy))
        got = await self.node.fetch_ahead(min_lead=1)
        if got is not None:
            self.node.restore(got[1].round, got[1].anchor, got[1].momentum)
            copy_into_params(self.state.anchor, self.params)
        self.node.record_fn = lambda: {
            "bytes_sent": sum(r.bytes_sent for r in self.rounds),
            "bytes_received": sum(r.bytes_received for r in self.rounds),
        }
        self.node.go_live()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def round(self) -> int:
        """Rounds of the run applied so far."""
        return int(self.state.round)

    def step(self, samples: int = 1) -> RoundReport | None:
        """One local step (optimizer step + zero_grad); returns the round's report when a sync ran."""
        if samples < 0:
            raise ValueError(f"samples must be >= 0, got {samples}")
        local_steps = self.config.strategy.local_steps
        self._samples += samples
        if local_steps == 0:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            delta = torch.cat([g.reshape(-1) for g in grads]).to(torch.float32)
            for p in self.params:
                p.grad = None
            return self._sync(delta)
        assert self.optimizer is not None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._steps += 1
        if self._steps % local_steps:
            return None
        delta = self.state.anchor - parameters_to_vector(self.params).detach().to(torch.float32)
        return self._sync(delta)

    def _sync(self, delta: torch.Tensor) -> RoundReport:
        report = self._call(self.node.engine.sync(delta, max(1, self._samples)), timeout=self._timeout)
        self._samples = 0
        copy_into_params(self.state.anchor, self.params)
        self.node.publish_state()
        self.rounds.append(report)
        return report

    def close(self) -> None:
        """Leave the swarm (deregister, stop serving, shut the DHT down) and stop the thread."""
        if not self._loop.is_running():
            return
        node = getattr(self, "node", None)
        if node is not None:
            # Closing is best effort: a failure here must not hide the caller's own exception.
            with contextlib.suppress(Exception):
                self._call(node.close(), timeout=30.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10.0)

    def __enter__(self) -> GossipTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
