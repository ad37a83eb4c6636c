"""Protocol constants: the version on the wire and every size bound a receiver enforces."""

from __future__ import annotations

__all__ = [
    "DIGEST_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_CONFIG_JSON_BYTES",
    "MAX_GROUP_SIZE",
    "MAX_ID_CHARS",
    "MAX_MESSAGE_BYTES",
    "MAX_NUMEL",
    "NONCE_BYTES",
    "PROTOCOL_VERSION",
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "grpc_message_options",
]

#: Version of the ``lioncub.v1`` wire format carried in every message; bumped on any change
#: that an older peer would misread. Receivers reject any other value.
PROTOCOL_VERSION = 1

#: Largest ``Chunk.data`` a sender produces and a receiver accepts (1 MiB).
MAX_CHUNK_BYTES = 1 << 20

#: gRPC message size limit for both directions: one full chunk plus room for its header and
#: signature, a group announcement of MAX_GROUP_SIZE members, or a state manifest with its config.
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + (512 << 10)

#: Largest element count a payload may declare (about 10^12, far beyond any model we train).
MAX_NUMEL = 1 << 40

#: Longest run id, group id, peer id, codec id, exchange name or tensor name (characters).
MAX_ID_CHARS = 128

#: Largest run configuration document in a state download (UTF-8 bytes).
MAX_CONFIG_JSON_BYTES = 256 << 10

#: Most members one group announcement may list.
MAX_GROUP_SIZE = 1024

DIGEST_BYTES = 32  # SHA-256
SIGNATURE_BYTES = 64  # Ed25519
PUBLIC_KEY_BYTES = 32  # raw Ed25519
NONCE_BYTES = 16


def grpc_message_options() -> list[tuple[str, int]]:
    """Channel / server options that cap gRPC messages at :data:`MAX_MESSAGE_BYTES`.

    Pass them to ``grpc.aio.server(options=...)`` and ``grpc.aio.insecure_channel(..., options=...)``
    so that an oversized message fails with ``RESOURCE_EXHAUSTED`` before it is parsed.
    """
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
