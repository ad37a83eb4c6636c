"""Outgoing gRPC channels, one per endpoint, reused across calls and rounds (insecure or TLS)."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import grpc.aio

from lioncub.protocol import TlsMaterial, channel_credentials, channel_options, grpc_message_options
from lioncub.protocol import lioncub_pb2_grpc as pb_grpc

__all__ = ["ChannelPool"]

log = logging.getLogger(__name__)


class ChannelPool:
    """Channels to other peers' servers, keyed by ``"host:port"``.

    With ``tls`` every channel trusts exactly the swarm certificate (and presents it when
    ``mutual``). Channels are created lazily inside the running event loop; :meth:`close` closes
    them all (call it before the loop ends).
    """

    def __init__(self, tls: TlsMaterial | None = None, *, mutual: bool = False) -> None:
        if mutual and tls is None:
            raise ValueError("mutual TLS needs the swarm TLS material")
        self._tls = tls
        self._mutual = mutual
        self._channels: dict[str, tuple[grpc.aio.Channel, Any]] = {}

    def __len__(self) -> int:
        return len(self._channels)

    def _open(self, endpoint: str) -> grpc.aio.Channel:
        options: list[tuple[str, Any]] = [*grpc_message_options()]
        if self._tls is None:
            return grpc.aio.insecure_channel(endpoint, options=options)
        options.extend(channel_options())
        creds = channel_credentials(self._tls, mutual=self._mutual)
        return grpc.aio.secure_channel(endpoint, creds, options=options)

    def stub(self, endpoint: str) -> Any:
        """The ``LioncubPeerStub`` for ``endpoint`` (its channel is opened on first use)."""
        entry = self._channels.get(endpoint)
        if entry is None:
            channel = self._open(endpoint)
            entry = (channel, pb_grpc.LioncubPeerStub(channel))
            self._channels[endpoint] = entry
            log.debug("opened channel to %s", endpoint)
        return entry[1]

    async def discard(self, endpoint: str) -> None:
        """Close the channel to ``endpoint`` (e.g. a peer that left); a later call reopens it."""
        entry = self._channels.pop(endpoint, None)
        if entry is not None:
            await entry[0].close(None)

    async def close(self) -> None:
        """Close every channel, cancelling calls still running on them."""
        channels, self._channels = self._channels, {}
        for channel, _ in channels.values():
            await channel.close(None)
