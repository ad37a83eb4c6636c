"""State download for joiners: a signed manifest, then each tensor's chunks in manifest order.

The serving peer sends :func:`state_replies` (a generator of ``StateReply`` messages); the
joiner consumes them with :func:`receive_state`, which checks the manifest's signature and config
document, reassembles every tensor with the digest and size the manifest announced, and returns
nothing unless every tensor arrived whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lioncub.optim.codec import Encoded

from . import lioncub_pb2 as pb
from .admission import AdmissionPolicy, check_admission
from .errors import BadSignature, ChunkOrderError, InvalidMessage, SizeError
from .framing import ShardKey, chunk_payload
from .identity import Identity
from .limits import DIGEST_BYTES, MAX_CHUNK_BYTES, MAX_NUMEL, PROTOCOL_VERSION
from .reassembly import Reassembler, ShardExpectation
from .signing import sign_message, verify_message
from .validate import (
    CodecLookup,
    check_id,
    check_peer_info,
    check_run,
    check_version,
    parse_config_json,
    registry_codec,
    resolve_codec,
    show,
)

__all__ = ["MAX_STATE_TENSORS", "ReceivedState", "check_state_request", "receive_state", "state_replies"]

MAX_STATE_TENSORS = 64


@dataclass(frozen=True)
class ReceivedState:
    """A verified state download."""

    sender_id: str
    round: int
    config_json: str
    config: dict[str, Any]
    tensors: dict[str, Encoded]


def check_state_request(
    request: pb.StateRequest, *, run_id: str, policy: AdmissionPolicy, now_ms: int | None = None
) -> None:
    """The serving peer's checks on a joiner's request: identity, signature, run, admission."""
    check_version(request.protocol_version, "state request")
    check_peer_info(request.peer, "joining peer")
    verify_message(request, request.peer.public_key)
    check_run(request.run_id, run_id, "state request")
    check_admission(policy, request.peer, request.admission, run_id=run_id, now_ms=now_ms)


def state_replies(
    identity: Identity,
    sender: pb.PeerInfo,
    *,
    run_id: str,
    round: int,
    config_json: str,
    tensors: Sequence[tuple[str, Encoded]],
    chunk_bytes: int = MAX_CHUNK_BYTES,
) -> Iterator[pb.StateReply]:
    """The reply stream of ``DownloadState``: manifest first, then the tensors' chunks, lazily."""
    manifest = pb.StateManifest(
        protocol_version=PROTOCOL_VERSION, run_id=run_id, round=round, sender=sender, config_json=config_json
    )
    for name, enc in tensors:
        payload = enc.to_bytes()
        manifest.tensors.add(
            name=name,
            codec=enc.codec,
            numel=enc.numel,
            payload_nbytes=len(payload),
            payload_digest=hashlib.sha256(payload).digest(),
        )
    sign_message(manifest, identity)
    yield pb.StateReply(manifest=manifest)
    for index, (name, enc) in enumerate(tensors):
        key = ShardKey(run_id, round, "", pb.PURPOSE_STATE, name, index)
        for chunk in chunk_payload(key, enc, identity, chunk_bytes=chunk_bytes):
            yield pb.StateReply(chunk=chunk)


def _check_manifest(
    manifest: pb.StateManifest, run_id: str, sender_id: str | None, lookup: CodecLookup
) -> dict[str, Any]:
    check_version(manifest.protocol_version, "state manifest")
    check_peer_info(manifest.sender, "state sender")
    if sender_id is not None and manifest.sender.peer_id != sender_id:
        raise BadSignature(
            f"state comes from {manifest.sender.peer_id}, the peer asked was {show(sender_id)}"
        )
    verify_message(manifest, manifest.sender.public_key)
    check_run(manifest.run_id, run_id, "state manifest")
    config = parse_config_json(manifest.config_json)
    if len(manifest.tensors) > MAX_STATE_TENSORS:
        raise SizeError(f"state manifest lists {len(manifest.tensors)} tensors, at most {MAX_STATE_TENSORS}")
    names = set()
    for t in manifest.tensors:
        check_id("tensor name", t.name)
        if t.name in names:
            raise InvalidMessage(f"state manifest lists tensor {t.name!r} twice")
        names.add(t.name)
        codec = resolve_codec(t.codec, lookup)
        if t.numel > MAX_NUMEL or t.payload_nbytes not in codec.valid_nbytes(t.numel):
            raise SizeError(
                f"tensor {t.name!r}: {t.numel} elements cannot be {t.payload_nbytes} bytes of {t.codec}"
            )
        if len(t.payload_digest) != DIGEST_BYTES:
            raise InvalidMessage(
                f"tensor {t.name!r}: digest has {len(t.payload_digest)} bytes, need {DIGEST_BYTES}"
            )
    return config


async def receive_state(
    replies: AsyncIterable[pb.StateReply],
    *,
    run_id: str,
    sender_id: str | None = None,
    codec_lookup: CodecLookup | None = None,
) -> ReceivedState:
    """Consume a ``DownloadState`` reply stream; ``sender_id`` pins the peer that was asked."""
    lookup = codec_lookup or registry_codec
    manifest: pb.StateManifest | None = None
    config: dict[str, Any] = {}
    tensors: dict[str, Encoded] = {}
    current: Reassembler | None = None
    async for reply in replies:
        if manifest is None:
            if reply.WhichOneof("body") != "manifest":
                raise InvalidMessage("state download must start with a manifest")
            manifest = reply.manifest
            config = _check_manifest(manifest, run_id, sender_id, lookup)
            continue
        if reply.WhichOneof("body") != "chunk":
            raise InvalidMessage("state download sent a second manifest")
        if current is None:
            index = len(tensors)
            if index >= len(manifest.tensors):
                raise ChunkOrderError("state download continues after its last tensor")
            t = manifest.tensors[index]
            current = Reassembler(
                ShardExpectation(
                    key=ShardKey(run_id, manifest.round, "", pb.PURPOSE_STATE, t.name, index),
                    senders={manifest.sender.peer_id: manifest.sender.public_key},
                    numel=t.numel,
                    codecs=frozenset({t.codec}),
                    digest=t.payload_digest,
                ),
                codec_lookup=lookup,
            )
        encoded = current.feed(reply.chunk)
        if encoded is not None:
            tensors[manifest.tensors[len(tensors)].name] = encoded
            current = None
    if manifest is None:
        raise ChunkOrderError("state download ended before its manifest")
    if len(tensors) != len(manifest.tensors):
        raise ChunkOrderError(f"state download ended after {len(tensors)} of {len(manifest.tensors)} tensors")
    return ReceivedState(
        sender_id=manifest.sender.peer_id,
        round=manifest.round,
        config_json=manifest.config_json,
        config=config,
        tensors=tensors,
    )
