"""The fault injector's spec language and its hooks, in process (the swarm cases are in test_faults)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lioncub.peer.checkpoint import CheckpointStore
from lioncub.peer.cli import main
from lioncub.peer.faults import Fault, FaultError, FaultInjector, parse_fault


@pytest.mark.parametrize(
    ("spec", "fault"),
    [
        ("kill@round=3", Fault("kill", round=3)),
        ("kill@round=5:at=group", Fault("kill", round=5, at="group")),
        ("partition@round=4:seconds=10", Fault("partition", round=4, seconds=10.0)),
        ("slow@factor=0.1", Fault("slow", factor=0.1)),
        ("slow@factor=0.5:round=7", Fault("slow", round=7, factor=0.5)),
        ("crash-in-checkpoint@round=6", Fault("crash-in-checkpoint", round=6)),
    ],
)
def test_specs_parse_and_print_back(spec: str, fault: Fault) -> None:
    assert parse_fault(spec) == fault
    assert str(fault) == spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("explode@round=1", "unknown fault"),
        ("kill", "needs round"),
        ("kill@round=x", "does not parse"),
        ("kill@round=-1", "round must be >= 0"),
        ("kill@round=3:at=somewhere", "at one of"),
        ("kill@round=3:round=4", "repeated"),
        ("kill@round=3:seconds=2", "bad or repeated setting"),
        ("partition@round=3", "needs seconds"),
        ("partition@round=3:seconds=0", "seconds must be in"),
        ("slow@factor=2", "factor must be in"),
        ("slow@factor=0", "factor must be in"),
    ],
)
def test_bad_specs_say_what_is_accepted(spec: str, message: str) -> None:
    with pytest.raises(FaultError, match=message):
        parse_fault(spec)


def test_the_cli_refuses_a_bad_fault_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["join", "--fault", "kill@round=soon", "--check-config"]) == 2
    out = capsys.readouterr()
    assert "--fault" in out.out + out.err


def test_the_cli_takes_faults_into_the_peer_settings(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["join", "--fault", "kill@round=3", "--fault", "slow@factor=0.5", "--check-config"])
    assert code == 0
    out = capsys.readouterr().out
    assert "kill@round=3" in out and "slow@factor=0.5" in out


def test_slow_stretches_a_round_by_one_over_the_factor_from_its_round_on() -> None:
    injector = FaultInjector([parse_fault("slow@factor=0.25:round=2")])
    assert injector.slow_delay(1, 0.2) == 0.0
    assert injector.slow_delay(2, 0.2) == pytest.approx(0.6)  # 0.2 s of compute -> 0.8 s in all
    assert FaultInjector([]).slow_delay(5, 0.2) == 0.0


def test_the_checkpoint_hook_dies_between_the_temp_write_and_the_rename(tmp_path: Path) -> None:
    """In a child process (it SIGKILLs itself): the round-4 checkpoint stays, round 6 never lands."""
    code = textwrap.dedent(
        f"""
        import torch
        from lioncub.peer.checkpoint import Checkpoint, CheckpointStore
        from lioncub.peer.faults import FaultInjector, parse_fault

        injector = FaultInjector([parse_fault("crash-in-checkpoint@round=6")])
        store = CheckpointStore({str(tmp_path)!r}, write_hook=injector.checkpoint_hook)
        for r in (2, 4, 6):
            z = torch.zeros(8)
            store.save(Checkpoint(r, z, z, z, {{}}, {{}}, "run", "peer"))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == -9, proc.stderr
    temps = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt-00000006.pt.")]
    assert temps, f"no temporary file of round 6 left: {sorted(p.name for p in tmp_path.iterdir())}"
    store = CheckpointStore(tmp_path)
    newest = store.load_latest()
    assert newest is not None and newest.round == 4
    assert [p.name for p in store.paths()] == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
