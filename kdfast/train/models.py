"""A small decoder-only Transformer LM in plain torch.nn, for the demo and the tests.

It answers the calls a Hugging Face causal LM answers and the trainer relies on:
``model(input_ids, output_hidden_states=True, logits_to_keep=1)`` returns an object with
``logits`` and ``hidden_states`` (the last one is the final normed hidden state, what the
output embedding is applied to), and ``get_output_embeddings()`` returns that ``nn.Linear``;
``final_hidden_module()`` names the module that outputs that last hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.options import check_positive_int


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    context: int = 128
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "context", "n_layer", "n_head", "d_model", "mlp_ratio"):
            check_positive_int(f"GPTConfig.{name}", getattr(self, name))
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig.d_model={self.d_model} must be a multiple of n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")


class LMOutput(NamedTuple):
    logits: Tensor
    hidden_states: Optional[tuple[Tensor, ...]] = None


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout))

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Pre-norm GPT: token + learned position embeddings, n_layer blocks, final LayerNorm, linear head."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, output_hidden_states: bool = False,
                logits_to_keep: int = 0) -> LMOutput:
        """attention_mask is accepted for interface parity and unused: the model is causal and
        padding sits at the end of a sequence, where it cannot affect earlier positions."""
        length = input_ids.shape[-1]
        if length > self.config.context:
            raise ValueError(f"input_ids has {length} positions but the model's context is {self.config.context}")
        positions = torch.arange(length, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(positions))
        hidden = [x] if output_hidden_states else None  # kept only when asked: each is B x S x H
        for block in self.blocks:
            x = block(x)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x  # as in Hugging Face models: the last hidden state is the normed one
        logits = self.lm_head(x[..., -logits_to_keep:, :] if logits_to_keep else x)
        return LMOutput(logits, tuple(hidden) if hidden is not None else None)

    def final_hidden_module(self) -> nn.Module:
        """The module whose output is the final hidden state, what lm_head is applied to (kdfast.train.lm
        captures it with a hook instead of keeping every layer's output)."""
        return self.norm
