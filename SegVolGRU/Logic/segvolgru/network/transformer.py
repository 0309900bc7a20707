"""The SAM-style two-way transformer of SegVol's mask decoder (tokens <-> image tokens).

Shapes: image tokens (B, N_img, C) with N_img the flattened embedding grid in raster (d, h, w) order; prompt and
output tokens (B, N_tok, C). Attribute names are the checkpoint format.

This is the plain module chain (training, and the reference in tests); decoding a new prompt on a cached image
goes through :mod:`.factored_decoder`, which reuses these modules on the token side.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


class Heads(NamedTuple):
    """An attention input already projected and split into heads, (B, heads, N, C_head)."""

    value: torch.Tensor


class Attention(nn.Module):
    """Multi-head attention whose q/k/v live in ``dim // downsample_rate`` channels."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        internal = dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"attention width {internal} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, internal)
        self.k_proj = nn.Linear(dim, internal)
        self.v_proj = nn.Linear(dim, internal)
        self.out_proj = nn.Linear(internal, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def heads(self, projection: nn.Linear, x: torch.Tensor | Heads) -> torch.Tensor:
        return x.value if isinstance(x, Heads) else self.split_heads(projection(x))

    def forward(self, q: torch.Tensor | Heads, k: torch.Tensor | Heads, v: torch.Tensor | Heads) -> torch.Tensor:
        q, k, v = self.heads(self.q_proj, q), self.heads(self.k_proj, k), self.heads(self.v_proj, v)
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        out = torch.softmax(attn, dim=-1) @ v
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, dim)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image, MLP, image->token; each followed by its LayerNorm."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        queries = self.token_self_attention(queries, query_pe)
        with_pe = keys + key_pe
        queries = self.tokens_from_image(queries, query_pe, with_pe, keys)
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(with_pe, q, queries))
        return queries, keys

    def token_self_attention(self, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        if self.skip_first_layer_pe:
            # The first layer replaces the tokens by their self-attention: no positional term, no residual.
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        return self.norm1(queries)

    def tokens_from_image(self, queries: torch.Tensor, query_pe: torch.Tensor, image_k: torch.Tensor | Heads,
                          image_v: torch.Tensor | Heads) -> torch.Tensor:
        """token->image attention on the image keys (with PE) and values, then the MLP, each with its norm."""
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, image_k, image_v))
        return self.norm3(queries + self.mlp(queries))


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=(i == 0))
            for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        """image, image_pe (B, C, g0, g1, g2); tokens (B, N, C) -> (tokens (B, N, C), image tokens (B, G, C))."""
        keys = image.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
