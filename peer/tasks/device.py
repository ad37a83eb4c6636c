"""Choosing the torch device a peer trains on, with a clean CPU fallback."""

from __future__ import annotations

import logging

import torch

__all__ = ["select_device"]

log = logging.getLogger(__name__)


def select_device(pref: str | torch.device = "auto") -> torch.device:
    """Resolve a device preference to a usable ``torch.device``.

    Args:
        pref: ``"auto"`` (CUDA device 0 when available, else CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"`` or ``"mps"``; a ``torch.device`` is accepted too.

    Returns:
        The device. When CUDA (or MPS) is requested but not available, logs a warning and returns
        the CPU instead of failing, so one config works on every volunteer's machine.

    Raises:
        ValueError: for an unknown preference, or a CUDA index this machine does not have.
    """
    text = str(pref).strip().lower()
    if text == "auto":
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        log.info("device 'auto' resolved to %s", device)
        return device
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ValueError(
            f"unknown device {pref!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from err
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            log.warning("device %r requested but CUDA is not available here; falling back to CPU", text)
            return torch.device("cpu")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {pref!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            log.warning("device %r requested but MPS is not available here; falling back to CPU", text)
            return torch.device("cpu")
        return device
    raise ValueError(f"unsupported device {pref!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
