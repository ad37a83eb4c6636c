"""State transfer for joiners: a live peer serves its latest round-boundary snapshot; a joiner pulls it.

The snapshot is the anchor θ_anchor, the outer momentum, the number of rounds applied and the run
config, taken right after a round was applied (never mid-round). Tensors travel lossless (fp32),
chunked, signed and digest-checked by :mod:`lioncub.protocol.state`.

Memory bound: every download encodes the snapshot afresh (about four times the anchor + momentum
bytes while it runs), so a :class:`StateService` serves at most ``max_concurrent`` downloads at once
and refuses more with ``UNAVAILABLE`` (:class:`StateBusy`): a flood of joiners costs at most
``max_concurrent`` times that, never one copy per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from lioncub.optim.codecs import get_codec
from lioncub.protocol import (
    AdmissionPolicy,
    Identity,
    ReceivedState,
    Unavailable,
    check_state_request,
    make_admission,
    receive_state,
    sign_message,
    state_replies,
)
from lioncub.protocol import lioncub_pb2 as pb
from lioncub.protocol.limits import PROTOCOL_VERSION

from ._exchange_channels import ChannelPool
from .server import CallInfo

__all__ = [
    "DEFAULT_MAX_CONCURRENT_DOWNLOADS",
    "Snapshot",
    "StateBusy",
    "StateDownloadError",
    "StateService",
    "download_state",
]

log = logging.getLogger(__name__)

_FP32 = "fp32"

#: State downloads one peer serves at once (see the module docstring).
DEFAULT_MAX_CONCURRENT_DOWNLOADS = 4


@dataclass(frozen=True)
class Snapshot:
    """A consistent round-boundary state: ``round`` rounds applied, then these vectors."""

    round: int
    anchor: torch.Tensor
    momentum: torch.Tensor


class StateBusy(Unavailable):
    """This peer already serves as many state downloads as it may; ask another (``UNAVAILABLE``)."""


class StateDownloadError(RuntimeError):
    """A state download failed; the message says from whom and why."""


class StateService:
    """The ``DownloadState`` handler of a peer's server (``server.state = StateService(...)``)."""

    def __init__(
        self,
        identity: Identity,
        peer_info: pb.PeerInfo,
        run_id: str,
        config: dict[str, Any],
        *,
        policy: AdmissionPolicy | None = None,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT_DOWNLOADS,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.identity = identity
        self.peer_info = peer_info
        self.run_id = run_id
        self.config_json = json.dumps(config, sort_keys=True)
        self.policy = policy or AdmissionPolicy()
        self.max_concurrent = max_concurrent
        self._snapshot: Snapshot | None = None
        self._active = 0
        self.served = 0

    @property
    def active(self) -> int:
        """Downloads being served now."""
        return self._active

    def publish(self, round: int, anchor: torch.Tensor, momentum: torch.Tensor) -> None:
        """Offer a new snapshot (copies are taken, so the caller may keep training)."""
        self._snapshot = Snapshot(
            round,
            anchor.detach().to("cpu", torch.float32).clone(),
            momentum.detach().to("cpu", torch.float32).clone(),
        )

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    async def download_state(self, request: pb.StateRequest, call: CallInfo) -> AsyncIterator[pb.StateReply]:
        check_state_request(request, run_id=self.run_id, policy=self.policy)
        snap = self._snapshot
        if snap is None:
            raise Unavailable("this peer has no state to share yet; try another peer or retry shortly")
        if self._active >= self.max_concurrent:
            raise StateBusy(
                f"this peer already serves {self._active} state download(s); try another peer or retry"
            )
        self._active += 1
        try:
            codec = get_codec(_FP32)
            tensors = [("anchor", codec.encode(snap.anchor)), ("momentum", codec.encode(snap.momentum))]
            self.served += 1
            log.info("serving state of round %d to %s", snap.round, request.peer.peer_id)
            for reply in state_replies(
                self.identity,
                self.peer_info,
                run_id=self.run_id,
                round=snap.round,
                config_json=self.config_json,
                tensors=tensors,
            ):
                yield reply
        finally:
            self._active -= 1


async def download_state(
    channels: ChannelPool,
    endpoint: str,
    *,
    identity: Identity,
    peer_info: pb.PeerInfo,
    run_id: str,
    swarm_key: bytes | None = None,
    expect_peer_id: str | None = None,
    timeout: float = 60.0,
) -> tuple[ReceivedState, Snapshot]:
    """Pull the state of ``run_id`` from the peer at ``endpoint``; raise StateDownloadError on failure."""
    request = pb.StateRequest(
        protocol_version=PROTOCOL_VERSION,
        run_id=run_id,
        peer=peer_info,
        admission=make_admission(swarm_key, identity, run_id=run_id),
    )
    sign_message(request, identity)
    stub = channels.stub(endpoint)
    try:
        call = stub.DownloadState(request, timeout=timeout)
        received = await asyncio.wait_for(
            receive_state(call, run_id=run_id, sender_id=expect_peer_id), timeout=timeout
        )
    except grpc.aio.AioRpcError as exc:
        raise StateDownloadError(
            f"state download from {endpoint} failed: {exc.code().name}: {exc.details()}"
        ) from exc
    except TimeoutError as exc:
        raise StateDownloadError(f"state download from {endpoint} timed out after {timeout:.0f}s") from exc
    except Exception as exc:  # a ProtocolError from validation, or a codec error
        raise StateDownloadError(f"state download from {endpoint} was invalid: {exc}") from exc
    codec = get_codec(_FP32)
    try:
        anchor = codec.decode(received.tensors["anchor"])
        momentum = codec.decode(received.tensors["momentum"])
    except KeyError as exc:
        raise StateDownloadError(f"state from {endpoint} lacks tensor {exc}") from None
    if anchor.numel() != momentum.numel():
        raise StateDownloadError(f"state from {endpoint}: anchor and momentum sizes differ")
    return received, Snapshot(received.round, anchor, momentum)
