"""Shared test set-up: hypothesis profiles and a guard that no child process outlives the suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _reap(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


@pytest.fixture(autouse=True, scope="session")
def _no_orphan_processes() -> Iterator[None]:
    """Kill (and report) any child process, p2pd included, that the suite left running."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leftover = [p for p in me.children(recursive=True) if p.pid not in before]
    if leftover:
        names = sorted({p.name() for p in leftover if p.is_running()})
        _reap(leftover)
        print(f"\n[conftest] reaped {len(leftover)} stray child processes: {names}")
