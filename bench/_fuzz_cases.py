"""The malformed messages of ``bench/fuzz.py``: one :class:`Case` per (RPC, category, variant) draw.

Every case is definitely bad: it is built from a legit message of :class:`~bench._fuzz_peer.FuzzPeer`
by a change that no correct peer may accept (random bytes never carry a valid signature; re-signed
messages always carry a wrong field). Draws come from one ``random.Random``, so a seed gives the same
sequence of cases; the bytes are the same too, but for admission timestamps (wall clock).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench._fuzz_peer import NUMEL, ROUND0, ROUND1, RUN, FuzzPeer
from lioncub.protocol import MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES, Identity, sign_chunk, sign_message
from lioncub.protocol import lioncub_pb2 as pb

__all__ = ["CATEGORIES", "METHODS", "Case", "draw_case"]

CATEGORIES = (
    "malformed",
    "truncated",
    "oversized",
    "invalid_fields",
    "wrong_codec",
    "wrong_round",
    "replayed",
    "unsigned",
    "bad_signature",
    "wrong_run_or_group",
    "impersonated",
)
#: RPC -> the categories that apply to it (Health and CheckReachable carry no signed fields).
METHODS: dict[str, tuple[str, ...]] = {
    "PushShard": CATEGORIES,
    "PullResult": tuple(c for c in CATEGORIES if c != "wrong_codec"),
    "JoinGroup": tuple(c for c in CATEGORIES if c != "wrong_codec"),
    "DownloadState": tuple(c for c in CATEGORIES if c not in ("wrong_codec", "wrong_round")),
    "CheckReachable": ("malformed", "truncated", "oversized", "invalid_fields", "impersonated"),
    "Health": ("malformed", "truncated", "oversized"),
}
#: How often each RPC is drawn (the data paths most).
WEIGHTS = {
    "PushShard": 5,
    "PullResult": 2,
    "JoinGroup": 2,
    "DownloadState": 2,
    "CheckReachable": 1,
    "Health": 1,
}
#: Oversized messages (over MAX_MESSAGE_BYTES) are costly to send: only this share of "oversized" draws.
BIG_SHARE = 0.1


@dataclass(frozen=True)
class Case:
    """One attack: the raw request bytes (PushShard: the stream's messages; otherwise exactly one)."""

    method: str
    category: str
    variant: str
    messages: tuple[bytes, ...]


def _random_bytes(rng: random.Random, max_size: int = 300) -> bytes:
    return rng.randbytes(rng.randint(0, max_size))


def _flip(rng: random.Random, raw: bytes, flips: int = 3) -> bytes:
    data = bytearray(raw)
    for _ in range(flips if data else 0):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


# --- shared variants: bytes-level ----------------------------------------------------------------


def _bytes_case(rng: random.Random, method: str, category: str, valid: bytes) -> Case | None:
    """malformed / truncated / oversized at the byte level, for a one-message request."""
    if category == "malformed":
        variant = rng.choice(["random", "random-small", "flipped"])
        raw = {
            "random": _random_bytes(rng),
            "random-small": _random_bytes(rng, 8),
            "flipped": _flip(rng, valid),
        }[variant]
        if variant == "flipped" and method in ("JoinGroup", "DownloadState", "PullResult"):
            variant, raw = "flipped-unsigned", _flip(rng, _strip_signature(method, valid))
        return Case(method, category, variant, (raw,))
    if category == "truncated":
        cut = rng.randrange(len(valid)) if valid else 0
        return Case(method, category, f"cut-at-{cut}", (valid[:cut],))
    if category == "oversized":
        if rng.random() < BIG_SHARE:
            size = MAX_MESSAGE_BYTES + rng.randint(1, 4096)
            return Case(method, category, "over-message-limit", (rng.randbytes(size),))
        return Case(method, category, "padded-string", (_padded(rng, method, valid),))
    return None


def _strip_signature(method: str, raw: bytes) -> bytes:
    msg: pb.JoinGroupRequest | pb.StateRequest | pb.PullResultRequest
    if method == "JoinGroup":
        msg = pb.JoinGroupRequest.FromString(raw)
    elif method == "DownloadState":
        msg = pb.StateRequest.FromString(raw)
    else:
        msg = pb.PullResultRequest.FromString(raw)
    msg.signature = b""
    return msg.SerializeToString()


def _padded(rng: random.Random, method: str, valid: bytes) -> bytes:
    """A request with one string field of 100 KiB .. 1 MiB (well-formed, within the message limit)."""
    size = rng.randint(100 << 10, 1 << 20)
    if method == "JoinGroup":
        join = pb.JoinGroupRequest.FromString(valid)
        join.matchmaking_key = "k" * size
        return join.SerializeToString()
    if method == "DownloadState":
        state = pb.StateRequest.FromString(valid)
        state.peer.software_version = "v" * size
        return state.SerializeToString()
    if method == "PullResult":
        pull = pb.PullResultRequest.FromString(valid)
        pull.exchange = "e" * size
        return pull.SerializeToString()
    if method == "CheckReachable":
        return pb.ReachabilityRequest(port=1, peer_id="p" * size).SerializeToString()
    return b"\x0a" + _varint(size) + b"x" * size  # Health: an unknown length-delimited field 1


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# --- PushShard -------------------------------------------------------------------------------------


def _resign(chunks: list[pb.Chunk], signer: Identity | None) -> list[pb.Chunk]:
    for chunk in chunks:
        if signer is None:
            chunk.signature = b""
        else:
            sign_chunk(chunk, signer)
    return chunks


def _copy(chunks: list[pb.Chunk]) -> list[pb.Chunk]:
    out = []
    for chunk in chunks:
        c = pb.Chunk()
        c.CopyFrom(chunk)
        out.append(c)
    return out


def _set_header(chunks: list[pb.Chunk], **fields: object) -> list[pb.Chunk]:
    for chunk in chunks:
        for name, value in fields.items():
            setattr(chunk.header, name, value)
    return chunks


def _ser(chunks: list[pb.Chunk]) -> tuple[bytes, ...]:
    return tuple(c.SerializeToString() for c in chunks)


def _push(rng: random.Random, peer: FuzzPeer, category: str) -> Case:
    c = peer.captured
    member = signer = rng.choice([peer.m1, peer.m2])
    base = _copy(c.update1[member.peer_id])
    m = "PushShard"
    if category == "malformed":
        variant = rng.choice(["random", "flipped-stale", "random-after-valid-first"])
        if variant == "random":
            return Case(m, category, variant, tuple(_random_bytes(rng) for _ in range(rng.randint(1, 4))))
        if variant == "flipped-stale":
            return Case(
                m, category, variant, tuple(_flip(rng, raw) for raw in rng.choice(list(c.push0.values())))
            )
        return Case(m, category, variant, (_ser(base)[0], _random_bytes(rng)))
    if category == "truncated":
        variant = rng.choice(["stream-cut", "bytes-cut", "empty-stream"])
        if variant == "stream-cut":
            return Case(m, category, variant, _ser(base)[: rng.randint(1, len(base) - 1)])
        if variant == "bytes-cut":
            raws = list(_ser(base))
            i = rng.randrange(len(raws))
            raws[i] = raws[i][: rng.randrange(len(raws[i]))]
            return Case(m, category, variant, tuple(raws))
        return Case(m, category, variant, ())
    if category == "oversized":
        variant = rng.choice(["over-message-limit", "chunk-over-1MiB", "declared-huge", "extra-chunk"])
        if variant == "over-message-limit" and rng.random() >= BIG_SHARE:
            variant = "declared-huge"
        if variant == "over-message-limit":
            return Case(m, category, variant, (rng.randbytes(MAX_MESSAGE_BYTES + rng.randint(1, 4096)),))
        if variant == "chunk-over-1MiB":
            base[0].data = rng.randbytes(MAX_CHUNK_BYTES + rng.randint(1, 100))
            return Case(m, category, variant, _ser(_resign(base[:1], signer)))
        if variant == "declared-huge":
            field = rng.choice(["numel", "payload_nbytes", "chunk_total"])
            huge = (
                rng.choice([2**32 - 1, 2**40, 2**40 + 1, 2**64 - 1]) if field != "chunk_total" else 2**32 - 1
            )
            return Case(
                m, category, f"{variant}-{field}", _ser(_resign(_set_header(base, **{field: huge}), signer))
            )
        extra = pb.Chunk()
        extra.CopyFrom(base[-1])
        extra.header.chunk_index += 1
        return Case(m, category, variant, _ser([*base, *_resign([extra], signer)]))
    if category == "invalid_fields":
        field = rng.choice(
            ["protocol_version", "numel", "payload_nbytes", "payload_digest", "chunk_total", "chunk_index",
             "weight", "contributors", "data", "padding"]
        )  # fmt: skip
        h = base[0].header
        if field == "chunk_index":
            order = rng.choice(["reversed", "duplicate", "skip"])
            idx = {"reversed": [2, 1, 0], "duplicate": [0, 0, 1, 2], "skip": [0, 2]}[order]
            return Case(m, category, f"chunk-order-{order}", _ser([base[i] for i in idx]))
        if field == "data":
            i = rng.randrange(len(base))
            base[i].data = _flip(rng, base[i].data, 1)
            return Case(m, category, "data-changed-resigned", _ser(_resign(base, signer)))
        if field == "padding":  # the sign1 payload's unused high bits of the last byte set
            payload = bytearray(b"".join(ch.data for ch in base))
            payload[-1] |= 0xFF << (NUMEL % 8) & 0xFF
            base[-1].data = bytes(payload[len(payload) - len(base[-1].data) :])
            _set_header(base, payload_digest=hashlib.sha256(bytes(payload)).digest())
            return Case(m, category, "sign1-padding-bits-set", _ser(_resign(base, signer)))
        value = {
            "protocol_version": rng.choice([0, 2, 2**32 - 1]),
            "numel": rng.choice([0, NUMEL - 1, NUMEL + 1, NUMEL + 8]),
            "payload_nbytes": rng.choice([0, h.payload_nbytes - 1, h.payload_nbytes + 1]),
            "payload_digest": rng.choice([b"", b"\x00" * 32, b"\x01" * 31, hashlib.sha256(b"x").digest()]),
            "chunk_total": rng.choice([0, 1, 2, 4, 1000]),
            "weight": rng.choice([float("nan"), float("inf"), -1.0, 0.5, 2.0**60]),
            "contributors": rng.choice([0, 2, 2**32 - 1]),
        }[field]
        return Case(m, category, f"bad-{field}", _ser(_resign(_set_header(base, **{field: value}), signer)))
    if category == "wrong_codec":
        codec = rng.choice(
            ["tern", "fp16", "fp32", "int8", "pbit1", "counts3", "zzz", "", "SIGN1", "sign1 ", "int8b0",
             "pbit0", "pbit999", "counts99", "x" * 200, "sign1\x00"]
        )  # fmt: skip
        return Case(
            m, category, f"codec-{codec[:12]!r}", _ser(_resign(_set_header(base, codec=codec), signer))
        )
    if category == "wrong_round":
        rnd = rng.choice([ROUND0, ROUND1 - 1, ROUND1 + 1, ROUND1 + 1000, 0, 2**63, 2**64 - 1])
        return Case(m, category, f"round-{rnd}", _ser(_resign(_set_header(base, round=rnd), signer)))
    if category == "replayed":
        variant = rng.choice(["stale-round", "duplicate-accepted"])
        raws = rng.choice(list(c.push0.values())) if variant == "stale-round" else c.momentum1_m1
        return Case(m, category, variant, tuple(raws))
    if category == "unsigned":
        where = rng.choice(["all", "first", "later"])
        targets = {"all": base, "first": base[:1], "later": base[1:]}[where]
        for chunk in targets:
            chunk.signature = b""
        return Case(m, category, f"unsigned-{where}", _ser(base))
    if category == "bad_signature":
        variant = rng.choice(
            ["random", "flipped", "short", "other-member-key", "outsider-key", "later-chunk"]
        )
        i = len(base) - 1 if variant == "later-chunk" else 0
        sig = base[i].signature
        other = peer.m2 if member is peer.m1 else peer.m1
        # Every entry is evaluated (and draws from rng), whatever the variant: keeps the seeded stream.
        base[i].signature = {
            "random": rng.randbytes(64),
            "flipped": _flip(rng, sig, 1),
            "short": sig[: rng.randrange(64)],
            "other-member-key": other.sign(b"x"),
            "outsider-key": peer.outsider.sign(b"x"),
            "later-chunk": rng.randbytes(64),
        }[variant]
        if variant == "other-member-key":  # a valid signature, by the wrong key
            _resign(base[:1], other)
        elif variant == "outsider-key":
            _resign(base[:1], peer.outsider)
        return Case(m, category, variant, _ser(base))
    if category == "wrong_run_or_group":
        field = rng.choice(["run_id", "group_id", "exchange", "shard_index", "purpose"])
        wrong: object = {
            "run_id": rng.choice(["other-run", "", "x" * 300, "bad id!", RUN + "x"]),
            "group_id": rng.choice(
                ["", "g-000000000000000000000000", peer.plan(ROUND0).group_id, "x" * 300, "g\n"]
            ),
            "exchange": rng.choice(["params", "", "e" * 200, "up date", "update\x00"]),
            "shard_index": rng.choice([1, 2, 2**32 - 1]),
            "purpose": rng.choice([pb.PURPOSE_RESULT, pb.PURPOSE_STATE, pb.PURPOSE_UNSPECIFIED, 77]),
        }[field]
        return Case(m, category, f"bad-{field}", _ser(_resign(_set_header(base, **{field: wrong}), signer)))
    # impersonated
    variant = rng.choice(["member-id-outsider-key", "owner-id", "outsider-id", "other-member-id"])
    claimed, key = {
        "member-id-outsider-key": (member.peer_id, peer.outsider),
        "owner-id": (peer.owner.peer_id, peer.outsider),
        "outsider-id": (peer.outsider.peer_id, peer.outsider),
        "other-member-id": ((peer.m2 if member is peer.m1 else peer.m1).peer_id, member),
    }[variant]
    return Case(m, category, variant, _ser(_resign(_set_header(base, sender_id=claimed), key)))


# --- PullResult ------------------------------------------------------------------------------------


def _pull(rng: random.Random, peer: FuzzPeer, category: str) -> Case:
    m = "PullResult"
    member = rng.choice([peer.m1, peer.m2])
    base = pb.PullResultRequest()
    base.CopyFrom(peer.captured.pull1[member.peer_id])
    base.wait_ms = rng.choice([0, 10, 2**32 - 1])
    sign_message(base, member)
    case = _bytes_case(rng, m, category, base.SerializeToString())
    if case is not None:
        return case
    signer: Identity | None = member
    variant = category
    if category == "invalid_fields":
        variant = "bad-protocol_version"
        base.protocol_version = rng.choice([0, 2, 2**32 - 1])
    elif category == "wrong_round":
        base.round = rng.choice([ROUND0, ROUND1 - 1, ROUND1 + 1, 0, 2**64 - 1])
        variant = f"round-{base.round}"
    elif category == "replayed":
        return Case(m, category, "stale-round", (peer.captured.pull0,))
    elif category == "unsigned":
        signer = None
    elif category == "bad_signature":
        variant = rng.choice(["random", "outsider-key", "other-member-key"])
        signer = {
            "random": None,
            "outsider-key": peer.outsider,
            "other-member-key": peer.m2 if member is peer.m1 else peer.m1,
        }[variant]
    elif category == "wrong_run_or_group":
        variant = rng.choice(["run_id", "group_id", "exchange", "shard_index"])
        value = {
            "run_id": rng.choice(["other-run", "", "x" * 300]),
            "group_id": rng.choice(["", peer.plan(ROUND0).group_id, "g-000000000000000000000000"]),
            "exchange": rng.choice(["params", "", "e" * 200, "bad exchange"]),
            "shard_index": rng.choice([1, 2**32 - 1]),
        }[variant]
        setattr(base, variant, value)
        variant = f"bad-{variant}"
    else:  # impersonated
        variant = rng.choice(["member-id-outsider-key", "owner-id", "outsider-id"])
        base.requester_id = {"outsider-id": peer.outsider.peer_id, "owner-id": peer.owner.peer_id}.get(
            variant, member.peer_id
        )
        signer = peer.outsider
    if signer is None:
        base.signature = rng.randbytes(64) if category == "bad_signature" else b""
    else:
        sign_message(base, signer)
    return Case(m, category, variant, (base.SerializeToString(),))


# --- JoinGroup and DownloadState -----------------------------------------------------------------


def _signed_request(rng: random.Random, peer: FuzzPeer, method: str, category: str) -> Case:
    """JoinGroup / DownloadState: signed by the joining peer, with the swarm's HMAC admission."""
    base: pb.JoinGroupRequest | pb.StateRequest
    if method == "JoinGroup":
        base = pb.JoinGroupRequest()
        base.CopyFrom(peer.captured.join)
    else:
        base = pb.StateRequest()
        base.CopyFrom(peer.captured.state)
    member = peer.m1
    now_ms = time.time_ns() // 1_000_000
    nonce = rng.randbytes(16)
    base.admission.CopyFrom(peer.admission(member, now_ms, nonce))
    sign_message(base, member)
    case = _bytes_case(rng, method, category, base.SerializeToString())
    if case is not None:
        return case
    signer: Identity | None = member
    variant = category
    if category == "invalid_fields":
        variant = rng.choice(
            ["protocol_version", "endpoint", "bandwidth", "peer_id", "nonce", "weight", "mm-key"]
        )
        if variant == "protocol_version":
            base.protocol_version = rng.choice([0, 2, 2**32 - 1])
        elif variant == "endpoint":  # a client-mode peer with an endpoint, or a reachable one without
            base.peer.client_mode = rng.random() < 0.5
            bad = ["127.0.0.1:1"] if base.peer.client_mode else ["", "nohost", ":0", "[::1]:65536", "h:1 "]
            base.peer.endpoint = rng.choice(bad)
        elif variant == "bandwidth":
            base.peer.bandwidth_mbps = rng.choice([float("nan"), float("inf"), -1.0])
        elif variant == "peer_id":
            base.peer.peer_id = rng.choice(["", "x" * 200, "bad id"])
        elif variant == "nonce":
            base.admission.nonce = rng.randbytes(rng.choice([0, 15, 17]))
            base.admission.swarm_proof = peer.admission(member, now_ms, base.admission.nonce).swarm_proof
        elif variant == "weight" and isinstance(base, pb.JoinGroupRequest):
            base.weight = rng.choice([float("nan"), float("inf"), -1.0])
        elif isinstance(base, pb.JoinGroupRequest):
            base.matchmaking_key = rng.choice(["", "bad key", "k" * 200])
        else:
            base.protocol_version = 0
            variant = "protocol_version"
        variant = f"bad-{variant}"
    elif category == "wrong_round" and isinstance(base, pb.JoinGroupRequest):
        base.round = rng.choice([ROUND0, ROUND1 + 1, 0, 2**64 - 1])
        variant = f"round-{base.round}"
    elif category == "replayed":
        variant = rng.choice(["expired-admission", "future-admission"])
        skew = int(peer.policy.max_clock_skew_s * 1000) + rng.randint(1000, 10**6)
        ts = now_ms - skew if variant == "expired-admission" else now_ms + skew
        base.admission.CopyFrom(peer.admission(member, ts, nonce))
    elif category == "unsigned":
        variant = rng.choice(["no-signature", "no-admission-proof"])
        if variant == "no-signature":
            signer = None
        else:
            base.admission.swarm_proof = b""
    elif category == "bad_signature":
        variant = rng.choice(["random", "outsider-key", "wrong-swarm-key", "proof-of-other-peer"])
        if variant == "random":
            signer = None
            base.signature = rng.randbytes(64)
        elif variant == "outsider-key":
            signer = peer.outsider
        elif variant == "wrong-swarm-key":
            base.admission.CopyFrom(peer.admission(member, now_ms, nonce, key=rng.randbytes(32)))
        else:
            base.admission.CopyFrom(peer.admission(peer.m2, now_ms, nonce))
    elif category == "wrong_run_or_group":
        base.run_id = rng.choice(["other-run", "", "x" * 300, RUN + "x"])
        variant = "bad-run_id"
    else:  # impersonated: another peer's id or key, or a proof for an outsider not in the swarm
        variant = rng.choice(["id-of-other-key", "key-of-other-id", "outsider-no-swarm-key"])
        if variant == "id-of-other-key":
            base.peer.peer_id = peer.m2.peer_id
        elif variant == "key-of-other-id":
            base.peer.public_key = peer.m2.public_key
            signer = peer.m2
        else:
            base.peer.peer_id, base.peer.public_key = peer.outsider.peer_id, peer.outsider.public_key
            base.admission.CopyFrom(peer.admission(peer.outsider, now_ms, nonce, key=rng.randbytes(32)))
            signer = peer.outsider
    if signer is None:
        if category == "unsigned":
            base.signature = b""
    else:
        sign_message(base, signer)
    return Case(method, category, variant, (base.SerializeToString(),))


# --- CheckReachable and Health -------------------------------------------------------------------


def _reachable(rng: random.Random, peer: FuzzPeer, category: str, closed_port: int) -> Case:
    m = "CheckReachable"
    valid = pb.ReachabilityRequest(port=closed_port, peer_id=peer.m1.peer_id).SerializeToString()
    case = _bytes_case(rng, m, category, valid)
    if case is not None:
        return case
    if category == "invalid_fields":
        variant = rng.choice(["port-0", "port-over-65535", "empty-peer-id", "long-peer-id"])
        request = {
            "port-0": pb.ReachabilityRequest(port=0, peer_id=peer.m1.peer_id),
            "port-over-65535": pb.ReachabilityRequest(
                port=rng.randint(65536, 2**32 - 1), peer_id=peer.m1.peer_id
            ),
            "empty-peer-id": pb.ReachabilityRequest(port=closed_port),
            "long-peer-id": pb.ReachabilityRequest(port=closed_port, peer_id="p" * rng.randint(129, 5000)),
        }[variant]
        return Case(m, category, variant, (request.SerializeToString(),))
    # impersonated: ask to be dialled back as another peer: at the owner's own port, or a closed one
    port = rng.choice([peer.server.port, closed_port])
    who = rng.choice([peer.m1.peer_id, peer.outsider.peer_id])
    return Case(
        m, category, "other-peer-id", (pb.ReachabilityRequest(port=port, peer_id=who).SerializeToString(),)
    )


def draw_case(rng: random.Random, peer: FuzzPeer, closed_port: int) -> Case:
    """One case: an RPC by :data:`WEIGHTS`, then one of its categories uniformly."""
    method = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    category = rng.choice(METHODS[method])
    makers: dict[str, Callable[[], Case]] = {
        "PushShard": lambda: _push(rng, peer, category),
        "PullResult": lambda: _pull(rng, peer, category),
        "JoinGroup": lambda: _signed_request(rng, peer, "JoinGroup", category),
        "DownloadState": lambda: _signed_request(rng, peer, "DownloadState", category),
        "CheckReachable": lambda: _reachable(rng, peer, category, closed_port),
    }
    if method == "Health":
        case = _bytes_case(rng, method, category, b"")
        assert case is not None
        return case
    return makers[method]()
