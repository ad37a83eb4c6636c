"""Splitting an encoded payload into signed chunks of at most 1 MiB.

A payload (an :class:`~lioncub.optim.codec.Encoded` vector) travels as ``chunk_total`` chunks,
every one with the same :class:`~lioncub.protocol.lioncub_pb2.ChunkHeader` except
``chunk_index``. Chunks are cut at ``chunk_bytes`` boundaries (the last one may be shorter; an
empty payload is one empty chunk). :mod:`lioncub.protocol.reassembly` is the receiving side.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from lioncub.optim.codec import Encoded

from . import lioncub_pb2 as pb
from .identity import Identity
from .limits import MAX_CHUNK_BYTES, PROTOCOL_VERSION
from .signing import sign_chunk

__all__ = ["ShardKey", "chunk_payload"]


@dataclass(frozen=True)
class ShardKey:
    """Which payload a stream of chunks is: the routing fields of :class:`ChunkHeader`.

    Attributes:
        run_id: the training run.
        round: the round the payload belongs to.
        group_id: the group of that round ("" for state downloads).
        purpose: ``pb.PURPOSE_PUSH``, ``pb.PURPOSE_RESULT`` or ``pb.PURPOSE_STATE``.
        exchange: which tensor of the round ("update", "momentum", "params", or a state tensor name).
        shard_index: index in the group's shard plan (tensor index for state downloads).
    """

    run_id: str
    round: int
    group_id: str
    purpose: pb.Purpose
    exchange: str
    shard_index: int

    @classmethod
    def of(cls, header: pb.ChunkHeader) -> ShardKey:
        """The key a received header claims (unverified until the chunk's signature is checked)."""
        return cls(
            run_id=header.run_id,
            round=header.round,
            group_id=header.group_id,
            purpose=header.purpose,
            exchange=header.exchange,
            shard_index=header.shard_index,
        )


def chunk_payload(
    key: ShardKey,
    encoded: Encoded,
    identity: Identity,
    *,
    weight: float = 1.0,
    contributors: int = 1,
    chunk_bytes: int = MAX_CHUNK_BYTES,
) -> list[pb.Chunk]:
    """Split ``encoded`` into signed chunks of at most ``chunk_bytes`` bytes.

    ``weight`` and ``contributors`` travel in every header: for a push, the samples behind this
    contribution and 1; for a result, the sum of the reduced contributions' weights and their count.
    """
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
    payload = encoded.to_bytes()
    total = max(1, -(-len(payload) // chunk_bytes))
    header = pb.ChunkHeader(
        protocol_version=PROTOCOL_VERSION,
        run_id=key.run_id,
        round=key.round,
        group_id=key.group_id,
        sender_id=identity.peer_id,
        purpose=key.purpose,
        exchange=key.exchange,
        shard_index=key.shard_index,
        codec=encoded.codec,
        numel=encoded.numel,
        payload_nbytes=len(payload),
        payload_digest=hashlib.sha256(payload).digest(),
        chunk_total=total,
        weight=weight,
        contributors=contributors,
    )
    view = memoryview(payload)
    chunks = []
    for index in range(total):
        header.chunk_index = index
        chunk = pb.Chunk(header=header, data=bytes(view[index * chunk_bytes : (index + 1) * chunk_bytes]))
        sign_chunk(chunk, identity)
        chunks.append(chunk)
    return chunks
