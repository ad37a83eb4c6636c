"""``shakespeare-char``: a character-level GPT on the complete works of Shakespeare.

Data. The corpus of :mod:`.shakespeare_data` (about 5.05 M characters, 84 distinct). The vocabulary
is the sorted set of its characters. The last ``val_fraction`` of the characters is the validation
split, the rest the training split.

Sharding. The training split is cut into consecutive chunks of ``shard_chunk_chars`` characters;
shard ``k`` of ``n`` owns the chunks whose index is ``k`` modulo ``n``, so every shard sees every
part of the works while no two shards share a character. A training example is a window of
``block_size + 1`` characters lying wholly inside one owned chunk: inputs are its first
``block_size`` characters, targets the last ``block_size``.

Evaluation. ``eval_batches × eval_batch_size`` windows evenly spaced over the validation split;
batch ``b`` takes every ``eval_batches``-th window starting at ``b``, so even a single batch spans
the whole split. The loss is the mean next-character cross-entropy (nats).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Batch, check_float, check_int, check_shard_args, mean_loss, seeded_model, shard_generator
from .char_gpt import CharGPT, CharGPTConfig
from .shakespeare_data import fetch_shakespeare
from .vocab import CharVocab

__all__ = ["ShakespeareCharConfig", "ShakespeareCharTask"]


@dataclass(frozen=True)
class ShakespeareCharConfig:
    """Hyperparameters of ``shakespeare-char``.

    Attributes:
        n_layer, n_head, n_embd, block_size, dropout: the model's shape (see :class:`CharGPTConfig`).
        val_fraction: share of the corpus, taken from its end, used for validation.
        shard_chunk_chars: granularity of the interleaved shard partition of the training split.
        eval_batches: validation batches per full evaluation.
        eval_batch_size: windows per validation batch.
    """

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    val_fraction: float = 0.1
    shard_chunk_chars: int = 4096
    eval_batches: int = 16
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "eval_batches", "eval_batch_size"):
            check_int("ShakespeareCharConfig", name, getattr(self, name), minimum=1)
        check_int(
            "ShakespeareCharConfig", "shard_chunk_chars", self.shard_chunk_chars, minimum=self.block_size + 1
        )
        check_float(
            "ShakespeareCharConfig", "val_fraction", self.val_fraction, low=0.0, high=0.5, low_open=True
        )
        check_float("ShakespeareCharConfig", "dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"ShakespeareCharConfig: n_head ({self.n_head}) must divide n_embd ({self.n_embd})"
            )


class ShakespeareCharTask:
    """The ``shakespeare-char`` task (see the module docstring); implements :class:`~.base.Task`.

    Args:
        config: hyperparameters; defaults to :class:`ShakespeareCharConfig()`.
        device: where the encoded corpus, models and batches live (default CPU).
        cache_dir: corpus cache directory (default: :func:`~.shakespeare_data.default_cache_dir`).
            The corpus is downloaded on first use; see :func:`~.shakespeare_data.fetch_shakespeare`.
    """

    def __init__(
        self,
        config: ShakespeareCharConfig | None = None,
        *,
        device: torch.device | None = None,
        cache_dir: Path | str | None = None,
    ) -> None:
        self._config = config or ShakespeareCharConfig()
        self._device = device or torch.device("cpu")
        text = fetch_shakespeare(cache_dir).read_text(encoding="utf-8")
        self.vocab = CharVocab.from_text(text)
        data = self.vocab.encode(text)
        n_val = int(len(data) * self._config.val_fraction)
        window = self._config.block_size + 1
        if n_val < window or len(data) - n_val < self._config.shard_chunk_chars:
            raise ValueError(
                "ShakespeareCharConfig: the split leaves too little text for one window or chunk"
            )
        self._train = data[: len(data) - n_val].to(self._device)
        self._val = data[len(data) - n_val :].to(self._device)
        self._offsets = torch.arange(window, device=self._device)

    @property
    def name(self) -> str:
        return "shakespeare-char"

    @property
    def config(self) -> ShakespeareCharConfig:
        return self._config

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def model_config(self) -> CharGPTConfig:
        """The shape of the models :meth:`make_model` builds."""
        c = self._config
        return CharGPTConfig(
            vocab_size=len(self.vocab),
            block_size=c.block_size,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_embd=c.n_embd,
            dropout=c.dropout,
        )

    @property
    def train_chars(self) -> int:
        """Characters in the training split."""
        return int(self._train.numel())

    @property
    def val_chars(self) -> int:
        """Characters in the validation split."""
        return int(self._val.numel())

    def make_model(self, seed: int) -> nn.Module:
        cfg = self.model_config
        return seeded_model(seed, lambda: CharGPT(cfg), self._device)

    def batches(self, shard: int, num_shards: int, batch_size: int, seed: int) -> Iterator[Batch]:
        starts = self.window_starts(shard, num_shards, batch_size, seed)
        return (self._windows(self._train, s.to(self._device)) for s in starts)

    def window_starts(self, shard: int, num_shards: int, batch_size: int, seed: int) -> Iterator[Tensor]:
        """The offsets into the training split of the windows :meth:`batches` yields (CPU, int64)."""
        check_shard_args(shard, num_shards, batch_size, seed)
        chunk = self._config.shard_chunk_chars
        chunks = self.train_chars // chunk
        if shard >= chunks:
            raise ValueError(
                f"shakespeare-char: {num_shards} shards is more than the {chunks} chunks of {chunk} "
                "characters; lower shard_chunk_chars or the number of shards"
            )
        owned = torch.arange(shard, chunks, num_shards)
        return self._start_stream(owned * chunk, batch_size, shard_generator(seed, 0x5BA4E, shard))

    def _start_stream(self, chunk_starts: Tensor, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
        span = self._config.shard_chunk_chars - self._config.block_size  # valid window starts per chunk
        while True:
            which = torch.randint(chunk_starts.numel(), (batch_size,), generator=gen)
            yield chunk_starts[which] + torch.randint(span, (batch_size,), generator=gen)

    def _windows(self, data: Tensor, starts: Tensor) -> Batch:
        tokens = data[starts[:, None] + self._offsets].long()
        return tokens[:, :-1], tokens[:, 1:]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def evaluate(self, model: nn.Module, max_batches: int | None = None) -> float:
        c = self._config
        count = c.eval_batches
        if max_batches is not None:
            check_int("evaluate", "max_batches", max_batches, minimum=1)
            count = min(count, max_batches)
        last_start = self.val_chars - (c.block_size + 1)
        starts = torch.linspace(0, last_start, c.eval_batches * c.eval_batch_size, dtype=torch.float64)
        starts = starts.round().long().to(self._device)
        batches = (self._windows(self._val, starts[b :: c.eval_batches]) for b in range(count))
        return mean_loss(self.loss, model, batches)
