"""Shared test set-up: hypothesis profiles and a guard that no child process outlives the suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.peer._reap import become_subreaper, child_pids, reap_new_children

settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True, scope="session")
def _no_orphan_processes() -> Iterator[None]:
    """Adopt orphans (a p2pd whose DHT died) and kill any child the suite left running."""
    become_subreaper()
    before = child_pids()
    yield
    leftovers = reap_new_children(before)
    if leftovers:
        print(f"\n[conftest] reaped stray child processes: {leftovers}")


def pytest_configure(config: pytest.Config) -> None:
    # Two shared cores: one intra-op thread per test process keeps timings sane and runs reproducible.
    import torch

    torch.set_num_threads(1)
