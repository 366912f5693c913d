"""Example models that the training app builds from its config by ``_target_``.

``TinyTransformerLM`` pairs with :func:`shardadam.datasets.text_corpus` (byte-level language
modelling, so ``vocab_size`` is 256) and ``MLPClassifier`` with
:func:`shardadam.datasets.teacher_classification`. Nothing in the app is specific to them: any
importable ``torch.nn.Module`` class or factory works the same way, given the keyword arguments
its config holds and an output that fits the data's loss (logits ``(..., classes)`` for
``"cross_entropy"``, a tensor shaped like the target for ``"mse"``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import check_number_range, check_positive_int

__all__ = ["MLPClassifier", "TinyTransformerLM"]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t attends to positions <= t only."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, d_model = x.shape
        # (B, T, 3C) -> three (B, heads, T, C / heads)
        q, k, v = (
            part.view(batch, length, self.n_heads, d_model // self.n_heads).transpose(1, 2)
            for part in self.qkv(x).split(d_model, dim=2)
        )
        attended = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        attended = attended.transpose(1, 2).reshape(batch, length, d_model)
        return self.proj_dropout(self.proj(attended))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class TinyTransformerLM(nn.Module):
    """A small decoder-only transformer: ``forward(idx (B, T) int64) -> logits (B, T, vocab)``.

    Token plus learned position embeddings, ``n_layers`` pre-LayerNorm blocks of causal
    self-attention and a GELU MLP (4 * d_model wide), a final LayerNorm and a linear head.
    ``block_size`` is the longest sequence it accepts; give the data the same value.

    The head is not tied to the token embedding: every parameter is its own tensor, so the
    optimizer's ``model.parameters()`` and name-keyed checkpoints see each exactly once. Weights
    start as in GPT-2 (normal, std 0.02, residual projections scaled by 1/sqrt(2 * n_layers)),
    drawn from torch's global generator, so ``torch.manual_seed`` fixes the model.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 64,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_transformer_args(vocab_size, block_size, d_model, n_heads, n_layers, dropout)
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(block_size, d_model)
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_final = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(n_layers)

    def _init_weights(self, n_layers: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Each block adds two projections to the residual stream; scaling them keeps the
        # stream's variance at initialisation independent of depth.
        for block in self.blocks:
            for residual_out in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(residual_out.weight, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, idx: Tensor) -> Tensor:
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(
                f"Invalid idx: a {idx.dtype} tensor of shape {tuple(idx.shape)} (expected int64 "
                "token ids of shape (batch, length))"
            )
        length = idx.shape[1]
        if not 1 <= length <= self.block_size:
            raise ValueError(
                f"Invalid idx: sequence length {length} (expected 1 <= length <= "
                f"block_size={self.block_size}, the number of learned positions)"
            )
        positions = torch.arange(length, device=idx.device)
        x = self.embedding_dropout(self.token_embedding(idx) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x))


def _check_transformer_args(
    vocab_size: int, block_size: int, d_model: int, n_heads: int, n_layers: int, dropout: float
) -> None:
    for name, value in (
        ("vocab_size", vocab_size),
        ("block_size", block_size),
        ("d_model", d_model),
        ("n_heads", n_heads),
        ("n_layers", n_layers),
    ):
        check_positive_int(value, name, minimum=1, optional=False)
    check_number_range(dropout, "dropout", low=0.0, high=1.0)
    if d_model % n_heads != 0:
        raise ValueError(
            f"Invalid n_heads: {n_heads} (expected a divisor of d_model={d_model}, so that "
            "every head gets d_model // n_heads features)"
        )


class MLPClassifier(nn.Module):
    """``forward(x (B, in_features)) -> logits (B, classes)``.

    ``depth`` hidden layers of width ``hidden`` (each Linear then GELU), then a linear head;
    ``depth=0`` is a linear classifier. Weights use torch's default initialisation, drawn from
    the global generator, so ``torch.manual_seed`` fixes the model.
    """

    def __init__(
        self, in_features: int = 16, hidden: int = 64, classes: int = 4, depth: int = 2
    ) -> None:
        super().__init__()
        for name, value, minimum in (
            ("in_features", in_features, 1),
            ("hidden", hidden, 1),
            ("classes", classes, 2),
            ("depth", depth, 0),
        ):
            check_positive_int(value, name, minimum=minimum, optional=False)
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        layers.append(nn.Linear(width, classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
