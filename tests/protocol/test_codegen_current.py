"""The committed protobuf / gRPC modules must be what scripts/gen_protos.py produces now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("lioncub_pb2.py", "lioncub_pb2.pyi", "lioncub_pb2_grpc.py", "lioncub_pb2_grpc.pyi")


def test_generated_modules_are_current(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    stale = [
        name
        for name in GENERATED
        if (tmp_path / name).read_bytes() != (ROOT / "protocol" / name).read_bytes()
    ]
    assert not stale, f"stale generated files {stale}: run `python scripts/gen_protos.py` and commit them"


def test_grpc_module_imports_its_messages_relatively() -> None:
    from lioncub.protocol import lioncub_pb2, lioncub_pb2_grpc

    assert getattr(lioncub_pb2_grpc, "lioncub__pb2") is lioncub_pb2  # noqa: B009
    assert hasattr(lioncub_pb2_grpc, "add_LioncubPeerServicer_to_server")
