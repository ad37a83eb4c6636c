"""Checkpoints: atomic writes, crash safety, fallback past damaged files, validation, pruning."""

from __future__ import annotations

import io
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from lioncub.optim.strategies import OuterState
from lioncub.peer.checkpoint import (
    Checkpoint,
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointStore,
)
from lioncub.peer.config import RunConfig, from_dict, to_dict

RUN = "test-run"


def _optimizer_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt.state_dict()


def make_ckpt(round_: int, n: int = 64, run_id: str = RUN, **kw: Any) -> Checkpoint:
    g = torch.Generator().manual_seed(round_)
    args: dict[str, Any] = {
        "round": round_,
        "anchor": torch.randn(n, generator=g),
        "momentum": torch.randn(n, generator=g),
        "params": torch.randn(n, generator=g),
        "optimizer_state": _optimizer_state(),
        "config": to_dict(RunConfig(run_id=run_id)),
        "run_id": run_id,
        "peer_id": "12D3KooWpeer",
        "samples_seen": 100 * round_,
        "extras": {"nesterov": torch.ones(n)},
    }
    args.update(kw)
    return Checkpoint(**args)


def assert_same(a: Checkpoint, b: Checkpoint) -> None:
    for name in ("anchor", "momentum", "params"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.extras.keys() == b.extras.keys()
    assert all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)
    assert _plain(a.optimizer_state) == _plain(b.optimizer_state)
    assert (a.round, a.config, a.run_id, a.peer_id) == (b.round, b.config, b.run_id, b.peer_id)
    assert (a.samples_seen, a.wall_time) == (b.samples_seen, b.wall_time)


def _plain(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return ("tensor", obj.dtype, obj.tolist())
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_plain(v) for v in obj)
    return obj


def test_round_trip_including_optimizer_state(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    ckpt = make_ckpt(7)
    path = store.save(ckpt)
    assert path == tmp_path / "ckpt-00000007.pt"
    loaded = store.load_latest(run_id=RUN)
    assert loaded is not None
    assert_same(ckpt, loaded)
    assert from_dict(RunConfig, loaded.config) == RunConfig(run_id=RUN)
    # The optimizer state dict goes back into an optimizer.
    opt = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1e-2)
    opt.load_state_dict(loaded.optimizer_state)
    assert _plain(opt.state_dict()) == _plain(ckpt.optimizer_state)
    # Files are plain data: torch's safe loader reads them on its own.
    assert torch.load(path, weights_only=True, map_location="cpu")["round"] == 7


def test_outer_state_conversion(tmp_path: Path) -> None:
    state = OuterState.create(torch.arange(8.0))
    state.round = 3
    state.extras["buf"] = torch.full((8,), 2.0)
    ckpt = Checkpoint.from_outer_state(
        state, params=torch.zeros(8), optimizer_state={}, config={}, run_id=RUN, peer_id="p"
    )
    back = ckpt.outer_state()
    assert back.round == 3 and torch.equal(back.anchor, state.anchor) and back.extras.keys() == {"buf"}


def test_empty_directory_has_no_checkpoint(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "new").load_latest() is None


def test_keep_prunes_oldest_and_latest_pointer(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for r in range(1, 6):
        store.save(make_ckpt(r))
    assert [p.name for p in store.paths()] == ["ckpt-00000004.pt", "ckpt-00000005.pt"]
    assert '"file": "ckpt-00000005.pt"' in (tmp_path / "latest").read_text()
    # Rounds can go backwards after a resume from an older file: the new file is never pruned.
    store.save(make_ckpt(3))
    assert [p.name for p in store.paths()] == ["ckpt-00000003.pt", "ckpt-00000005.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000003.pt", "ckpt-00000005.pt", "latest"]


def test_due_by_rounds(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, every_rounds=3)
    assert not store.due(2) and store.due(3)
    store.save(make_ckpt(3))
    assert not store.due(5) and store.due(6)
    # A new store resumes the period from the newest file on disk.
    assert not CheckpointStore(tmp_path, every_rounds=3).due(4)
    assert not CheckpointStore(tmp_path, every_rounds=0).due(100)


def test_crash_before_rename_keeps_previous_checkpoint(tmp_path: Path) -> None:
    def crash(tmp: Path, final: Path) -> None:
        assert tmp.parent == final.parent and tmp.stat().st_size > 0
        if final.name == "ckpt-00000002.pt":
            raise OSError("simulated crash")

    store = CheckpointStore(tmp_path, write_hook=crash)
    store.save(make_ckpt(1))
    with pytest.raises(OSError, match="simulated crash"):
        store.save(make_ckpt(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.pt", "latest"]
    loaded = store.load_latest()
    assert loaded is not None and loaded.round == 1


def test_crash_before_the_pointer_update_keeps_the_new_checkpoint(tmp_path: Path) -> None:
    """The checkpoint file is complete once renamed; a stale ``latest`` pointer does not matter."""

    def crash(tmp: Path, final: Path) -> None:
        if final.name == "latest" and (tmp_path / "ckpt-00000002.pt").exists():
            raise OSError("simulated crash")

    store = CheckpointStore(tmp_path, write_hook=crash)
    store.save(make_ckpt(1))
    with pytest.raises(OSError, match="simulated crash"):
        store.save(make_ckpt(2))
    assert '"round": 1' in (tmp_path / "latest").read_text()
    loaded = store.load_latest()
    assert loaded is not None and loaded.round == 2


def test_killed_writer_leaves_no_partial_checkpoint(tmp_path: Path) -> None:
    """A process SIGKILLed between writing the temp file and renaming it: the old file wins."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint import make_ckpt
        from lioncub.peer.checkpoint import CheckpointStore

        def die(tmp, final):
            if final.name == "ckpt-00000002.pt":
                os.kill(os.getpid(), signal.SIGKILL)

        store = CheckpointStore({str(tmp_path)!r}, write_hook=die)
        store.save(make_ckpt(1))
        store.save(make_ckpt(2))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].name.startswith(".ckpt-00000002.pt.")
    store = CheckpointStore(tmp_path)
    assert [p.name for p in store.paths()] == ["ckpt-00000001.pt"]
    loaded = store.load_latest()
    assert loaded is not None
    assert_same(make_ckpt(1, wall_time=loaded.wall_time), loaded)
    # The next save clears the orphaned temp file.
    store.save(make_ckpt(2))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_half_written_temp_file_is_ignored(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(make_ckpt(1))
    data = (tmp_path / "ckpt-00000001.pt").read_bytes()
    (tmp_path / ".ckpt-00000002.pt.abc123.tmp").write_bytes(data[: len(data) // 2])
    loaded = store.load_latest()
    assert loaded is not None and loaded.round == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "bitflip"])
def test_damaged_newest_falls_back_with_warning(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(make_ckpt(1, n=4096))
    newest = store.save(make_ckpt(2, n=4096))
    data = bytearray(newest.read_bytes())
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    elif damage == "empty":
        data = bytearray()
    else:  # one flipped bit inside the anchor's raw bytes, which torch itself does not notice
        at = data.find(make_ckpt(2, n=4096).anchor.numpy().tobytes()[:64])
        assert at > 0
        data[at + 100] ^= 0x01
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="lioncub.peer.checkpoint"):
        loaded = store.load_latest()
    assert loaded is not None and loaded.round == 1
    assert "ckpt-00000002.pt" in caplog.text
    with pytest.raises(CheckpointCorruptError, match=r"ckpt-00000002\.pt"):
        store.load(newest)


def test_all_damaged_gives_none(tmp_path: Path) -> None:
    (tmp_path / "ckpt-00000001.pt").write_bytes(b"not a checkpoint")
    assert CheckpointStore(tmp_path).load_latest() is None


def test_run_id_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(make_ckpt(1, run_id="other-run"))
    with pytest.raises(CheckpointMismatchError, match="belongs to run 'other-run', not 'test-run'"):
        store.load_latest(run_id=RUN)
    assert store.load_latest() is not None


_UNPICKLED: list[str] = []


def _mark(tag: str) -> str:
    _UNPICKLED.append(tag)
    return tag


class Payload:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_mark, ("executed",))


def test_pickled_objects_are_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "ckpt-00000009.pt"
    torch.save({"format": "lioncub-checkpoint", "version": 1, "evil": Payload()}, path)
    (tmp_path / "ckpt-00000008.pt").write_bytes(pickle.dumps(Payload(), protocol=2))
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointCorruptError, match="unreadable"):
        store.load(path)
    assert store.load_latest() is None
    assert _UNPICKLED == []


def test_a_well_formed_file_with_bad_values_is_rejected(tmp_path: Path) -> None:
    from lioncub.peer import checkpoint as mod

    body = {k: v for k, v in mod._to_doc(make_ckpt(4)).items() if k != "digest"}
    body["momentum"] = body["momentum"][:-1]
    doc, digest = mod._seal(body)
    torch.save({**doc, "digest": digest}, tmp_path / "ckpt-00000004.pt")
    with pytest.raises(CheckpointCorruptError, match="momentum has 63 elements"):
        CheckpointStore(tmp_path).load(tmp_path / "ckpt-00000004.pt")
    # A file whose name and contents disagree on the round is not trusted either.
    (tmp_path / "ckpt-00000004.pt").rename(tmp_path / "ckpt-00000005.pt")
    store = CheckpointStore(tmp_path)
    store.save(make_ckpt(4))
    (tmp_path / "ckpt-00000004.pt").rename(tmp_path / "ckpt-00000006.pt")
    with pytest.raises(CheckpointCorruptError, match="holds round 4"):
        store.load(tmp_path / "ckpt-00000006.pt")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"anchor": torch.full((64,), float("nan"))}, "anchor holds NaN"),
        ({"params": torch.zeros(65)}, "params has 65 elements"),
        ({"momentum": torch.zeros(64, dtype=torch.float64)}, "momentum must be float32"),
        ({"anchor": torch.zeros(8, 8)}, "flat floating-point tensor"),
        ({"round": -1}, "round must be an integer >= 0"),
        ({"peer_id": ""}, "peer_id must be a string"),
        ({"config": {"x": object()}}, "JSON-able"),
        ({"extras": {"m": torch.tensor([float("inf")])}}, "extra buffer 'm'"),
    ],
)
def test_invalid_checkpoints_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_ckpt(1, **change)


def test_optimizer_state_must_be_plain_data(tmp_path: Path) -> None:
    ckpt = make_ckpt(1, optimizer_state={"state": {0: {"fn": print}}})
    with pytest.raises(ValueError, match="cannot checkpoint a builtin_function_or_method"):
        CheckpointStore(tmp_path).save(ckpt)
    assert list(tmp_path.iterdir()) == []


def test_store_arguments_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep must be"):
        CheckpointStore(tmp_path, keep=0)
    with pytest.raises(ValueError, match="every_seconds"):
        CheckpointStore(tmp_path, every_seconds=float("nan"))
    with pytest.raises(TypeError, match="expected a Checkpoint"):
        CheckpointStore(tmp_path).save(io.BytesIO())  # type: ignore[arg-type]
