"""lioncub: decentralized gossip training with packed 1-bit Lion sign updates.

The distribution has three layers, importable as ``lioncub.optim`` (pure tensor math),
``lioncub.protocol`` (the wire) and ``lioncub.peer`` (time, I/O and the CLI). Imports only flow
downward: ``peer -> protocol -> optim``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
