"""Finding and reaping child processes (hivemind DHT processes and their p2pd daemons) left by tests."""

from __future__ import annotations

import ctypes
import sys

import psutil

_PR_SET_CHILD_SUBREAPER = 36

# Helpers that live as long as the test process by design: hivemind sets torch's "file_system"
# sharing strategy (for MPFuture), so torch starts one torch_shm_manager per process; killing it
# would break shared memory for the rest of the session.
PROCESS_LIFETIME_HELPERS = frozenset({"torch_shm_manager"})


def become_subreaper() -> bool:
    """On Linux, adopt orphaned descendants (e.g. a p2pd whose DHT process died) so they can be reaped.

    Without this, an orphan is re-parented to init and escapes :func:`child_pids`. Returns whether it
    took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def child_pids() -> set[int]:
    """Pids of all live descendants of this process."""
    return {p.pid for p in psutil.Process().children(recursive=True) if _alive(p)}


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _name(proc: psutil.Process) -> str:
    try:
        return str(proc.name())
    except psutil.NoSuchProcess:
        return ""


def reap_new_children(before: set[int], grace: float = 5.0) -> list[str]:
    """Kill descendants not in ``before`` and collect zombies; return ``"name(pid)"`` for each live one.

    Processes that exit by themselves within ``grace`` seconds (a DHT finishing its shutdown) are
    not reported; :data:`PROCESS_LIFETIME_HELPERS` are left alone.
    """
    procs = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and _name(p) not in PROCESS_LIFETIME_HELPERS
    ]
    _, alive = psutil.wait_procs(procs, timeout=grace)
    leftovers = []
    for proc in alive:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                leftovers.append(f"{proc.name()}({proc.pid})")
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    return leftovers
