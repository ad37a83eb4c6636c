"""Every decoder fed arbitrary bytes: a tensor of the right size or the decoder's own error, nothing else.

* every codec's ``decode`` on payloads of every size ``valid_nbytes`` allows (plus wrong sizes);
* the boundary check :func:`lioncub.protocol.validate.check_finite` never refuses what the codec
  decodes cleanly to finite values, and for integer-only codecs refuses a payload whose padding bits
  are set (it would spoil the whole reduction);
* the state download parser (``receive_state``) on mutated reply streams: the original state or a
  :class:`ProtocolError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lioncub.optim.codec import CodecError, Encoded
from lioncub.optim.codecs import get_codec
from lioncub.protocol import Identity, ProtocolError, receive_state, state_replies
from lioncub.protocol import lioncub_pb2 as pb
from lioncub.protocol.validate import check_finite

CODECS = [
    "sign1",
    "tern",
    "fp16",
    "fp32",
    "int8",
    "int8b7",
    "pbit1",
    "pbit3",
    "counts1",
    "counts5",
    "counts32",
]
INTEGER_ONLY = ("sign1", "tern", "counts")


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(CODECS), numel=st.integers(0, 70), data=st.data())
def test_decode_of_any_bytes_is_a_vector_or_a_codec_error(name: str, numel: int, data: st.DataObject) -> None:
    codec = get_codec(name)
    size = data.draw(st.one_of(st.sampled_from(codec.valid_nbytes(numel)), st.integers(0, 600)))
    raw = data.draw(st.binary(min_size=size, max_size=size))
    enc = Encoded(
        name,
        numel,
        torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8),
    )
    try:
        out = codec.decode(enc)
    except CodecError:
        decoded = False
    else:
        decoded = True
        assert out.shape == (numel,) and out.dtype == torch.float32
    if size not in codec.valid_nbytes(numel):
        assert not decoded
        return
    try:
        check_finite(enc, codec)
    except ProtocolError:
        accepted = False
    else:
        accepted = True
    if decoded and bool(torch.isfinite(out).all()):
        assert accepted, "the boundary refused a payload its codec decodes"
    if not name.startswith(INTEGER_ONLY):
        assert accepted == (decoded and bool(torch.isfinite(out).all()))
    elif name == "sign1":
        assert accepted == decoded  # padding is all sign1's decoder checks


@settings(max_examples=100, deadline=None)
@given(numel=st.integers(1, 70).filter(lambda n: n % 8), name=st.sampled_from(["sign1", "tern", "counts3"]))
def test_padding_bits_are_refused_at_the_boundary(numel: int, name: str) -> None:
    codec = get_codec(name)
    x = torch.linspace(-1, 1, numel)
    enc = codec.encode(x)
    raw = bytearray(enc.to_bytes())
    width = -(-numel // 8)
    last = {"sign1": width - 1, "tern": width, "counts3": 4 + width - 1}[name]
    raw[last] |= 0x80
    bad = Encoded(name, numel, torch.frombuffer(raw, dtype=torch.uint8))
    try:
        check_finite(bad, codec)
    except ProtocolError:
        return
    raise AssertionError("payload with padding bits set passed the boundary")


ALICE = Identity.generate()
SENDER = pb.PeerInfo(peer_id=ALICE.peer_id, public_key=ALICE.public_key, endpoint="127.0.0.1:7000")
_FP32 = get_codec("fp32")
_REPLIES = [
    r.SerializeToString()
    for r in state_replies(
        ALICE, SENDER, run_id="run", round=3, config_json='{"a": 1}',
        tensors=[("anchor", _FP32.encode(torch.arange(40.0))), ("momentum", _FP32.encode(torch.ones(3)))],
        chunk_bytes=64,
    )
]  # fmt: skip


async def _stream(items: list[pb.StateReply]) -> AsyncIterator[pb.StateReply]:
    for item in items:
        yield item


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_state_stream_parser_returns_the_state_or_a_protocol_error(data: st.DataObject) -> None:
    raws = list(_REPLIES)
    op = data.draw(st.sampled_from(["flip", "drop", "dup", "swap", "cut", "append"]))
    i = data.draw(st.integers(0, len(raws) - 1))
    if op == "flip":
        raw = bytearray(raws[i])
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        raws[i] = bytes(raw)
    elif op == "drop":
        del raws[i]
    elif op == "dup":
        raws.insert(i, raws[i])
    elif op == "swap":
        j = data.draw(st.integers(0, len(raws) - 1))
        raws[i], raws[j] = raws[j], raws[i]
    elif op == "cut":
        raws = raws[:i]
    else:
        raws.append(data.draw(st.binary(max_size=200)))
    try:
        items = [pb.StateReply.FromString(r) for r in raws]
    except Exception:  # DecodeError: the servicer / channel layer answers INVALID_ARGUMENT
        return
    try:
        state = asyncio.run(receive_state(_stream(items), run_id="run", sender_id=ALICE.peer_id))
    except ProtocolError:
        return
    # Accepted: it must be exactly what was sent (a mutation that changes nothing, e.g. swap i with i).
    assert state.round == 3 and state.config == {"a": 1}
    assert torch.equal(_FP32.decode(state.tensors["anchor"]), torch.arange(40.0))
    assert torch.equal(_FP32.decode(state.tensors["momentum"]), torch.ones(3))
