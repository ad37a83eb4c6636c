"""Pure parts of matchmaking: what a peer posts as ready, how it is read back, and who groups with whom.

Nothing here does I/O: every peer computes the same groups from the same ready set.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lioncub.protocol import lioncub_pb2 as pb
from lioncub.protocol.canonical import encode_values
from lioncub.protocol.errors import ProtocolError
from lioncub.protocol.limits import MAX_ID_CHARS, PUBLIC_KEY_BYTES
from lioncub.protocol.validate import check_peer_info

__all__ = ["PlannedGroup", "ReadyPeer", "parse_ready_info", "plan_groups", "ready_info"]

_READY_FORMAT = 1
_MAX_WEIGHT = 1e15
_MAX_BANDWIDTH_MBPS = 1e9


@dataclass(frozen=True)
class ReadyPeer:
    """A peer that declared itself ready for a round: who it is, how to reach it, what it weighs."""

    info: pb.PeerInfo
    weight: float

    @property
    def peer_id(self) -> str:
        return self.info.peer_id


def ready_info(info: pb.PeerInfo, weight: float) -> dict[str, Any]:
    """The plain dict a peer posts under ``<run_id>.round<r>.ready`` (its peer id is the subkey)."""
    return {
        "format": _READY_FORMAT,
        "endpoint": info.endpoint,
        "client_mode": info.client_mode,
        "bandwidth_mbps": float(info.bandwidth_mbps),
        "weight": float(weight),
        "public_key": info.public_key.hex(),
        "version": info.software_version,
    }


def _number(value: Any, name: str, limit: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    result = float(value)
    if not (math.isfinite(result) and 0.0 <= result <= limit):
        raise ValueError(f"{name} must be finite and in [0, {limit:g}], got {result!r}")
    return result


def _text(value: Any, name: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{name} must be a string of at most {limit} characters")
    return value


def parse_ready_info(peer_id: str, value: Mapping[str, Any]) -> ReadyPeer:
    """Check a ready entry read from the DHT; raise ``ValueError`` naming what is wrong.

    The public key must hash to ``peer_id`` (the subkey), so an entry cannot impersonate a peer;
    the endpoint must be ``host:port`` unless the peer is in client mode.
    """
    if value.get("format") != _READY_FORMAT:
        raise ValueError(f"unknown ready-info format {value.get('format')!r:.20}")
    key_hex = _text(value.get("public_key"), "public_key", 2 * PUBLIC_KEY_BYTES)
    try:
        public_key = bytes.fromhex(key_hex)
    except ValueError:
        raise ValueError("public_key is not hex") from None
    client_mode = value.get("client_mode")
    if not isinstance(client_mode, bool):
        raise ValueError("client_mode must be a bool")
    info = pb.PeerInfo(
        peer_id=peer_id,
        public_key=public_key,
        endpoint=_text(value.get("endpoint"), "endpoint", 256),
        client_mode=client_mode,
        bandwidth_mbps=_number(value.get("bandwidth_mbps"), "bandwidth_mbps", _MAX_BANDWIDTH_MBPS),
        software_version=_text(value.get("version"), "version", MAX_ID_CHARS),
    )
    try:
        check_peer_info(info, "ready peer")
    except ProtocolError as e:
        raise ValueError(str(e)) from None
    return ReadyPeer(info=info, weight=_number(value.get("weight"), "weight", _MAX_WEIGHT))


@dataclass(frozen=True)
class PlannedGroup:
    """One group of a round as every peer computes it from the same ready set.

    ``members`` are in the round's hash order; ``leader`` is the first member not in client mode,
    or None when every member is in client mode (such a group cannot form).
    """

    members: tuple[str, ...]
    leader: str | None


def _order_key(run_id: str, round: int, peer_id: str) -> bytes:
    return hashlib.sha256(encode_values("lioncub.v1/matchmaking", run_id, round, peer_id)).digest()


def plan_groups(
    run_id: str, round: int, client_mode: Mapping[str, bool], group_size: int
) -> list[PlannedGroup]:
    """Cut the ready peers of a round into groups, deterministically.

    :param client_mode: peer id -> whether that peer is in client mode, for every ready peer.
    :param group_size: target size G; 0 (or G >= number of peers) puts everyone in one group.

    Peers are ordered by SHA-256 of (run id, round, peer id), so groups change every round, and
    cut into consecutive groups of G; a last group smaller than 2 joins the one before it.
    """
    if group_size < 0 or group_size == 1:
        raise ValueError(f"group_size must be 0 (everyone) or >= 2, got {group_size}")
    order = sorted(client_mode, key=lambda peer_id: (_order_key(run_id, round, peer_id), peer_id))
    if not order:
        return []
    size = len(order) if group_size == 0 else group_size
    cuts = [order[i : i + size] for i in range(0, len(order), size)]
    if len(cuts) > 1 and len(cuts[-1]) < 2:
        cuts[-2].extend(cuts.pop())
    return [
        PlannedGroup(
            members=tuple(members),
            leader=next((peer_id for peer_id in members if not client_mode[peer_id]), None),
        )
        for members in cuts
    ]
