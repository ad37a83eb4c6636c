from __future__ import annotations

import json

import pytest

from lioncub.protocol import (
    FutureRound,
    InvalidMessage,
    StaleRound,
    TooLarge,
    check_round,
    encode_message,
    encode_values,
    parse_config_json,
)
from lioncub.protocol import lioncub_pb2 as pb


def test_check_round() -> None:
    check_round(5, 5)
    with pytest.raises(StaleRound):
        check_round(4, 5)
    with pytest.raises(FutureRound):
        check_round(6, 5)


def test_config_json_is_bounded_and_safe() -> None:
    assert parse_config_json('{"a": "x\\\\\\"[[[[", "b": [1, {"c": null}]}')["b"][1] == {"c": None}
    with pytest.raises(InvalidMessage, match="object"):
        parse_config_json("3")
    with pytest.raises(InvalidMessage, match="not valid JSON"):
        parse_config_json('{"a": NaN}')
    with pytest.raises(InvalidMessage, match="not valid JSON"):
        parse_config_json("{'a': 1}")
    with pytest.raises(InvalidMessage, match="nests"):
        parse_config_json('{"a": ' + "[" * 40 + "]" * 40 + "}")
    with pytest.raises(InvalidMessage, match="nests"):
        parse_config_json("[" * 100_000)
    with pytest.raises(TooLarge):
        parse_config_json(json.dumps({"a": "x" * (300 << 10)}))


def test_canonical_encoding_is_unambiguous_and_covers_defaults() -> None:
    assert encode_values("ab", "c") != encode_values("a", "bc")
    assert encode_values(1) != encode_values(True) != encode_values(1.0)
    empty = encode_message(pb.ChunkHeader())
    assert empty != encode_message(pb.ChunkHeader(round=1))
    assert empty == encode_message(pb.ChunkHeader(round=0))  # proto3: default == unset
    info = pb.PeerInfo(peer_id="p")
    present_but_empty = encode_message(pb.StateManifest(sender=pb.PeerInfo()))
    assert present_but_empty != encode_message(pb.StateManifest())
    assert encode_message(pb.StateManifest(sender=info), skip=["sender"]) == encode_message(
        pb.StateManifest(), skip=["sender"]
    )
