"""Everything with time and I/O: tasks, simulator, DHT, gRPC, rounds, the runtime and the CLI.

Public names are loaded lazily, so importing a light submodule (``lioncub.peer.tasks``) does not
start importing hivemind and gRPC.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "GossipTrainer",
    "PeerNode",
    "PeerRuntime",
    "PeerSettings",
    "RunConfig",
    "RunSummary",
    "SetupError",
    "SimConfig",
    "get_task",
    "register_task",
    "simulate",
]

_WHERE = {
    "GossipTrainer": ".api",
    "PeerNode": ".node",
    "PeerSettings": ".node",
    "SetupError": ".node",
    "PeerRuntime": ".runtime",
    "RunSummary": ".runtime",
    "RunConfig": ".config",
    "SimConfig": ".simulate",
    "simulate": ".simulate",
    "get_task": ".tasks",
    "register_task": ".tasks",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
