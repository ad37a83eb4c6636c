from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from lioncub.protocol import (
    AdmissionDenied,
    AdmissionPolicy,
    BadSignature,
    Identity,
    KeyFilePermissionError,
    NotAllowListed,
    check_admission,
    generate_swarm_key,
    load_allow_list,
    load_swarm_key,
    make_admission,
    parse_allow_list,
)
from lioncub.protocol import lioncub_pb2 as pb

KEY = b"0123456789abcdef-swarm"
NOW = 1_700_000_000_000


def info(identity: Identity) -> pb.PeerInfo:
    return pb.PeerInfo(peer_id=identity.peer_id, public_key=identity.public_key, endpoint="127.0.0.1:5000")


def test_right_swarm_key_is_admitted(alice: Identity) -> None:
    adm = make_admission(KEY, alice, run_id="run-a", now_ms=NOW)
    assert len(adm.swarm_proof) == 32 and len(adm.nonce) == 16
    check_admission(AdmissionPolicy(swarm_key=KEY), info(alice), adm, run_id="run-a", now_ms=NOW + 5_000)


def test_wrong_key_missing_proof_other_run_or_peer_are_rejected(alice: Identity, bob: Identity) -> None:
    policy = AdmissionPolicy(swarm_key=KEY)
    wrong = make_admission(b"another-swarm-key-xyz", alice, run_id="run-a", now_ms=NOW)
    with pytest.raises(AdmissionDenied, match="wrong"):
        check_admission(policy, info(alice), wrong, run_id="run-a", now_ms=NOW)
    with pytest.raises(AdmissionDenied, match="no swarm key proof"):
        check_admission(
            policy,
            info(alice),
            make_admission(None, alice, run_id="run-a", now_ms=NOW),
            run_id="run-a",
            now_ms=NOW,
        )
    good = make_admission(KEY, alice, run_id="run-a", now_ms=NOW)
    with pytest.raises(AdmissionDenied, match="wrong"):
        check_admission(policy, info(alice), good, run_id="run-b", now_ms=NOW)
    with pytest.raises(AdmissionDenied, match="wrong"):  # bob replays alice's proof
        check_admission(policy, info(bob), good, run_id="run-a", now_ms=NOW)
    forged = pb.PeerInfo(peer_id=alice.peer_id, public_key=bob.public_key)
    with pytest.raises(BadSignature):  # id does not match key
        check_admission(policy, forged, good, run_id="run-a", now_ms=NOW)


def test_expired_or_future_timestamp_is_rejected(alice: Identity) -> None:
    policy = AdmissionPolicy(swarm_key=KEY, max_clock_skew_s=30)
    adm = make_admission(KEY, alice, run_id="run-a", now_ms=NOW)
    with pytest.raises(AdmissionDenied, match="away from"):
        check_admission(policy, info(alice), adm, run_id="run-a", now_ms=NOW + 31_000)
    with pytest.raises(AdmissionDenied, match="away from"):
        check_admission(policy, info(alice), adm, run_id="run-a", now_ms=NOW - 31_000)
    tampered = pb.Admission()
    tampered.CopyFrom(adm)
    tampered.timestamp_ms += 1
    with pytest.raises(AdmissionDenied, match="wrong"):
        check_admission(policy, info(alice), tampered, run_id="run-a", now_ms=NOW)


def test_open_swarm_admits_anyone(alice: Identity) -> None:
    check_admission(AdmissionPolicy(), info(alice), pb.Admission(), run_id="run-a")


def test_allow_list(alice: Identity, bob: Identity, tmp_path: Path) -> None:
    path = tmp_path / "allow.txt"
    path.write_text(
        f"# swarm members\n{alice.public_key.hex()}  # alice\n\n{base64.b64encode(bob.public_key).decode()}\n"
    )
    keys = load_allow_list(path)
    assert keys == {alice.public_key, bob.public_key}
    policy = AdmissionPolicy(allow_list=frozenset({alice.public_key}))
    check_admission(policy, info(alice), pb.Admission(), run_id="r")
    with pytest.raises(NotAllowListed):
        check_admission(policy, info(bob), pb.Admission(), run_id="r")
    with pytest.raises(ValueError, match="line 2"):
        parse_allow_list("# ok\nnot-a-key\n")
    with pytest.raises(ValueError, match="line 1"):
        parse_allow_list(alice.public_key.hex()[:-2])


def test_swarm_key_file(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    path.write_text(generate_swarm_key() + "\n")
    os.chmod(path, 0o600)
    key = load_swarm_key(path)
    assert len(key) == 64
    AdmissionPolicy(swarm_key=key)
    os.chmod(path, 0o640)
    with pytest.raises(KeyFilePermissionError):
        load_swarm_key(path)
    with pytest.raises(ValueError):
        AdmissionPolicy(swarm_key=b"short")
