"""CLIP text tower (openai/clip-vit-base-patch32 layout) and SegVol's ``dim_align`` projection.

Written here under the checkpoint's own key names (``clip_text_model.text_model.embeddings...``) so that no
transformers version can move them: transformers 4.31 made ``position_ids`` non-persistent and 5.x dropped the
``text_model`` level, both of which break a strict load of the SegVol checkpoints.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import SegVolConfig
from ..tokenizer import default_tokenizer, organ_prompts


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, width: int, max_positions: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_positions, width)
        # Persistent, as in the transformers version the checkpoints were saved with.
        self.register_buffer("position_ids", torch.arange(max_positions).unsqueeze(0))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1) + bias
        out = torch.softmax(attn, dim=-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # CLIP's "quick GELU"


class CLIPEncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = CLIPMLP(width, mlp_dim)
        self.layer_norm2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: SegVolConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(config.clip_width, config.clip_heads, config.clip_mlp_dim)
            for _ in range(config.clip_layers))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, bias)
        return x


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: SegVolConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config.clip_vocab_size, config.clip_width, config.clip_max_positions)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.clip_width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> pooled (B, width): the final-normed state at the first <|endoftext|>."""
        x = self.embeddings(input_ids)
        n = input_ids.shape[1]
        blocked = torch.finfo(x.dtype).min
        causal = torch.triu(torch.full((n, n), blocked, device=x.device, dtype=x.dtype), diagonal=1)
        padding = (1 - attention_mask[:, None, None, :].to(x.dtype)) * blocked
        bias = (causal[None, None] + padding).clamp(min=blocked)
        x = self.final_layer_norm(self.encoder(x, bias))
        # <|endoftext|> has the largest id, so argmax finds its first occurrence (the original CLIP pooling rule).
        return x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]


class CLIPTextModel(nn.Module):
    def __init__(self, config: SegVolConfig) -> None:
        super().__init__()
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids, attention_mask)


class TextEncoder(nn.Module):
    """Organ names -> (B, hidden) prompt embeddings: CLIP pooled output, then ``dim_align``."""

    def __init__(self, config: SegVolConfig) -> None:
        super().__init__()
        self.clip_text_model = CLIPTextModel(config)
        self.dim_align = nn.Linear(config.clip_width, config.hidden_size)
        # Frozen in every official training recipe.
        self.clip_text_model.requires_grad_(False)

    def tokenize(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return default_tokenizer()(organ_prompts(names))

    def forward(self, names: str | list[str]) -> torch.Tensor:
        if isinstance(names, str):
            names = [names]
        device = self.dim_align.weight.device
        ids, mask = self.tokenize(list(names))
        pooled = self.clip_text_model(ids.to(device), mask.to(device))
        return self.dim_align(pooled)
