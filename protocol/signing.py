"""Ed25519 signatures over canonical encodings, one domain tag per signed message type.

========================  ==============================  ===========================================
message                   domain tag                      signed bytes
========================  ==============================  ===========================================
``Chunk``                 ``lioncub.v1/chunk``            canonical(header) + SHA-256(chunk data)
``PullResultRequest``     ``lioncub.v1/pull``             canonical(all fields but ``signature``)
``JoinGroupRequest``      ``lioncub.v1/join``             canonical(all fields but ``signature``)
``GroupAnnouncement``     ``lioncub.v1/group``            canonical(all fields but ``signature``)
``StateRequest``          ``lioncub.v1/state-request``    canonical(all fields but ``signature``)
``StateManifest``         ``lioncub.v1/state``            canonical(all fields but ``signature``)
========================  ==============================  ===========================================

A chunk's header carries run id, round, group id, purpose, exchange, shard index, codec, sizes,
chunk index/total and the digest of the whole payload, and the signature also covers the digest
of the chunk's own bytes: a chunk cannot be moved to another shard, group, run, role or position,
or have its bytes changed, without failing verification. A chunk replayed from an earlier round
verifies, and is then rejected by the round check (``StaleRound``).
"""

from __future__ import annotations

import hashlib

from google.protobuf.message import Message

from . import lioncub_pb2 as pb
from .canonical import signing_bytes
from .identity import Identity, verify

__all__ = [
    "CHUNK_DOMAIN",
    "chunk_signing_bytes",
    "sign_chunk",
    "sign_message",
    "verify_chunk",
    "verify_message",
]

CHUNK_DOMAIN = "lioncub.v1/chunk"

_DOMAINS: dict[str, str] = {
    pb.PullResultRequest.DESCRIPTOR.full_name: "lioncub.v1/pull",
    pb.JoinGroupRequest.DESCRIPTOR.full_name: "lioncub.v1/join",
    pb.GroupAnnouncement.DESCRIPTOR.full_name: "lioncub.v1/group",
    pb.StateRequest.DESCRIPTOR.full_name: "lioncub.v1/state-request",
    pb.StateManifest.DESCRIPTOR.full_name: "lioncub.v1/state",
}


def _domain(msg: Message) -> str:
    try:
        return _DOMAINS[msg.DESCRIPTOR.full_name]
    except KeyError:
        raise TypeError(f"{msg.DESCRIPTOR.full_name} is not a signed message type") from None


def sign_message(msg: Message, identity: Identity) -> None:
    """Set ``msg.signature`` to ``identity``'s signature of its other fields (in place)."""
    msg.signature = identity.sign(signing_bytes(_domain(msg), msg))  # type: ignore[attr-defined]


def verify_message(msg: Message, public_key: bytes) -> None:
    """Raise :class:`~lioncub.protocol.errors.BadSignature` unless ``public_key`` signed ``msg``."""
    signature: bytes = msg.signature  # type: ignore[attr-defined]
    verify(public_key, signature, signing_bytes(_domain(msg), msg))


def chunk_signing_bytes(header: pb.ChunkHeader, data: bytes) -> bytes:
    """The bytes a chunk's signature covers (see the module docstring)."""
    return signing_bytes(CHUNK_DOMAIN, header, hashlib.sha256(data).digest(), skip=())


def sign_chunk(chunk: pb.Chunk, identity: Identity) -> None:
    """Set ``chunk.signature`` (in place)."""
    chunk.signature = identity.sign(chunk_signing_bytes(chunk.header, chunk.data))


def verify_chunk(chunk: pb.Chunk, public_key: bytes) -> None:
    """Raise :class:`~lioncub.protocol.errors.BadSignature` unless ``public_key`` signed ``chunk``."""
    verify(public_key, chunk.signature, chunk_signing_bytes(chunk.header, chunk.data))
