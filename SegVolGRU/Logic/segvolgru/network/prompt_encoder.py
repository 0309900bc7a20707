"""SegVol's 3-D prompt encoder: points, one box per sample and a text embedding -> sparse tokens.

Coordinates are voxel indices of the model input in (d, h, w) order. Two conventions of the official code are kept
on purpose because the released weights were trained with them (they are not bugs to fix here):
- sparse coordinates are normalised as (d / H, h / D, w / W) — axis 0 is divided by the size of axis 1 and vice
  versa — while the dense positional encoding swaps its first two components instead;
- exactly one +0.5 is added to every raw point or box coordinate before normalising.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import SegVolConfig


class LayerNorm2d(nn.Module):
    """Channel LayerNorm of (B, C, H, W) maps, kept only because ``mask_downscaling`` is in the checkpoints."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of coordinates in [0, 1]^3: PE(c) = [sin(2π(2c−1)G), cos(2π(2c−1)G)]."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        # Persistent: the checkpoints carry the Gaussian matrix the model was trained with.
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_pos_feats))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, grid_size: tuple[int, int, int]) -> torch.Tensor:
        """Dense encoding of an embedding grid (g0, g1, g2) -> (C, g0, g1, g2).

        The vector encoded at grid index (a0, a1, a2) is ((a1+½)/g1, (a0+½)/g0, (a2+½)/g2): the official order.
        """
        device = self.positional_encoding_gaussian_matrix.device
        g0, g1, g2 = grid_size
        grid = torch.ones((g0, g1, g2), device=device, dtype=torch.float32)
        along0 = (grid.cumsum(dim=0) - 0.5) / g0
        along1 = (grid.cumsum(dim=1) - 0.5) / g1
        along2 = (grid.cumsum(dim=2) - 0.5) / g2
        pe = self._pe_encoding(torch.stack([along1, along0, along2], dim=-1))
        return pe.permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int, int]) -> torch.Tensor:
        """Encode (B, N, 3) coordinates already shifted by +0.5; normalised as (c0/S1, c1/S0, c2/S2) (quirk)."""
        scale = torch.tensor([image_size[1], image_size[0], image_size[2]], dtype=torch.float32,
                             device=coords.device)
        return self._pe_encoding(coords.float() / scale)


class PromptEncoder(nn.Module):
    """Turns prompts into sparse tokens (B, N, C) and the dense (no-mask) embedding (B, C, g0, g1, g2)."""

    def __init__(self, config: SegVolConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.embed_dim = dim
        self.input_image_size = config.spatial_size
        self.image_embedding_size = config.embedding_grid
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        # 0 negative point, 1 positive point, 2 box min corner, 3 box max corner.
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, dim) for _ in range(4)])
        self.not_a_point_embed = nn.Embedding(1, dim)
        chans = config.mask_in_chans
        # A 2-D leftover of SAM that SegVol never calls; its weights are in every checkpoint, so it must exist.
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(chans // 4),
            nn.GELU(),
            nn.Conv2d(chans // 4, chans, kernel_size=2, stride=2),
            LayerNorm2d(chans),
            nn.GELU(),
            nn.Conv2d(chans, dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Dense positional encoding of the image embedding grid, (1, C, g0, g1, g2)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        coords = coords.float() + 0.5
        labels = labels.float()
        if pad:
            # The padding point is appended after the shift, so its coordinates stay exactly 0.
            coords = torch.cat([coords, coords.new_zeros((coords.shape[0], 1, 3))], dim=1)
            labels = torch.cat([labels, -labels.new_ones((labels.shape[0], 1))], dim=1)
        emb = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        ignored = (labels == -1).unsqueeze(-1)
        emb = torch.where(ignored, self.not_a_point_embed.weight.expand_as(emb), emb)
        emb = emb + (labels == 0).unsqueeze(-1) * self.point_embeddings[0].weight
        emb = emb + (labels == 1).unsqueeze(-1) * self.point_embeddings[1].weight
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes.float() + 0.5).reshape(-1, 2, 3)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_type = torch.stack([self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]])
        return emb + corner_type

    @staticmethod
    def _batch_size(points, boxes, text_embedding) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if text_embedding is not None:
            return text_embedding.shape[0]
        return 1

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        text_embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (sparse (B, N, C), dense (B, C, g0, g1, g2)).

        ``points``: coords (B, N, 3) float (d, h, w) and labels (B, N) with 1 positive, 0 negative, −1 ignore;
        without a box one ignored padding point is appended. ``boxes``: (B, 1, 6) or (B, 6) as
        (d0, h0, w0, d1, h1, w1), inclusive. ``text_embedding``: (B, C). Token order: points, box corners, text.
        """
        bs = self._batch_size(points, boxes, text_embedding)
        device = self.point_embeddings[0].weight.device
        tokens = [torch.empty((bs, 0, self.embed_dim), device=device)]
        if points is not None:
            tokens.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            tokens.append(self._embed_boxes(boxes))
        if text_embedding is not None:
            tokens.append(text_embedding.unsqueeze(1))
        sparse = torch.cat(tokens, dim=1)
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense

