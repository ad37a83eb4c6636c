from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from lioncub.protocol import (
    BadSignature,
    Identity,
    KeyFilePermissionError,
    check_peer_id,
    peer_id_from_public_key,
    verify,
)


def test_key_file_is_private_and_reload_gives_same_peer_id(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "peer.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = Identity.load_or_create(path)
    assert again.peer_id == first.peer_id
    assert again.public_key == first.public_key
    assert [p.name for p in path.parent.iterdir()] == ["peer.key"]  # no temp files left behind


def test_refuses_group_or_world_readable_key(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    Identity.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFilePermissionError, match="chmod 600"):
        Identity.load_or_create(path)


def test_peer_id_is_derived_from_public_key(alice: Identity, bob: Identity) -> None:
    assert re.fullmatch(r"[a-z2-7]{32}", alice.peer_id)
    assert alice.peer_id == peer_id_from_public_key(alice.public_key)
    assert alice.peer_id != bob.peer_id
    check_peer_id(alice.peer_id, alice.public_key)
    with pytest.raises(BadSignature):
        check_peer_id(alice.peer_id, bob.public_key)


def test_sign_verify_round_trip_and_tampering(alice: Identity, bob: Identity) -> None:
    sig = alice.sign(b"hello")
    verify(alice.public_key, sig, b"hello")
    with pytest.raises(BadSignature):
        verify(alice.public_key, sig, b"hellp")
    with pytest.raises(BadSignature):
        verify(bob.public_key, sig, b"hello")
    with pytest.raises(BadSignature, match="missing"):
        verify(alice.public_key, b"", b"hello")
    with pytest.raises(BadSignature):
        verify(alice.public_key, sig[:-1], b"hello")
    with pytest.raises(BadSignature):
        verify(b"\x00" * 5, sig, b"hello")
