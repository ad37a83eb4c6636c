"""A small decoder-only transformer over characters.

Pre-norm blocks (LayerNorm → causal multi-head self-attention → residual, LayerNorm → GELU MLP of
width 4·n_embd → residual), learned absolute position embeddings, a final LayerNorm and an untied
linear read-out. Weights start from N(0, 0.02); the two residual output projections of each block
are scaled down by 1/√(2·n_layer) so the residual stream's variance stays flat with depth.
Attention uses :func:`torch.nn.functional.scaled_dot_product_attention` with a causal mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import check_float, check_int

__all__ = ["CharGPT", "CharGPTConfig"]


@dataclass(frozen=True)
class CharGPTConfig:
    """Shape of a :class:`CharGPT`.

    Attributes:
        vocab_size: number of distinct tokens.
        block_size: longest context the model accepts (position embeddings).
        n_layer: transformer blocks.
        n_head: attention heads; must divide ``n_embd``.
        n_embd: width of the residual stream.
        dropout: dropout probability on embeddings, attention weights and residual branches.
    """

    vocab_size: int
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_int("CharGPTConfig", name, getattr(self, name), minimum=1)
        check_float("CharGPTConfig", "dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if self.n_embd % self.n_head:
            raise ValueError(f"CharGPTConfig: n_head ({self.n_head}) must divide n_embd ({self.n_embd})")


class _CausalSelfAttention(nn.Module):
    def __init__(self, cfg: CharGPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.proj_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, time, width = x.shape
        heads = self.qkv(x).view(batch, time, 3, self.n_head, width // self.n_head)
        q, k, v = heads.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, head, time, head_dim)
        attended = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        merged = attended.transpose(1, 2).reshape(batch, time, width)
        out: Tensor = self.proj_drop(self.proj(merged))
        return out


class _Block(nn.Module):
    def __init__(self, cfg: CharGPTConfig) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(cfg.n_embd)
        self.attn = _CausalSelfAttention(cfg)
        self.norm_mlp = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm_attn(x))
        out: Tensor = x + self.mlp(self.norm_mlp(x))
        return out


class CharGPT(nn.Module):
    """Decoder-only transformer: token ids ``(batch, time)`` → next-token logits ``(batch, time, vocab)``."""

    def __init__(self, cfg: CharGPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.position_embedding = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.embedding_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.norm_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            assert isinstance(block, _Block)
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            last = block.mlp[2]
            assert isinstance(last, nn.Linear)
            nn.init.normal_(last.weight, mean=0.0, std=residual_std)

    def forward(self, idx: Tensor) -> Tensor:
        if idx.dim() != 2:
            raise ValueError(f"CharGPT expects token ids of shape (batch, time), got {tuple(idx.shape)}")
        time = idx.shape[1]
        if time > self.config.block_size:
            raise ValueError(f"sequence length {time} exceeds block_size {self.config.block_size}")
        positions = torch.arange(time, device=idx.device)
        x = self.embedding_drop(self.token_embedding(idx) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        logits: Tensor = self.head(self.norm_out(x))
        return logits

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (``(batch, time)``) and return the result.

        Sampling uses ``generator`` when given (it must live on the model's device).
        """
        check_int("generate", "max_new_tokens", max_new_tokens, minimum=0)
        check_float("generate", "temperature", temperature, low=0.0, low_open=True)
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]
            logits = self(context)[:, -1, :] / temperature
            probs = torch.softmax(logits.float(), dim=-1)
            nxt = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat([idx, nxt.to(idx.dtype)], dim=1)
        return idx
