"""SegVol's 3-D mask decoder: two-way transformer, 4x transposed-conv upscaling, hypernetworks, text fusion.

Output: low-resolution mask logits (B, 1, 4·g0, 4·g1, 4·g2), e.g. (B, 1, 32, 64, 64) officially.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import SegVolConfig
from .transformer import TwoWayTransformer


class MLP(nn.Module):
    """Linear layers with ReLU between them (keys ``layers.N``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class MaskDecoder(nn.Module):
    def __init__(self, config: SegVolConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(
            depth=config.decoder_depth, dim=dim, num_heads=config.decoder_heads, mlp_dim=config.decoder_mlp_dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        up_grid = tuple(2 * g for g in config.embedding_grid)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, kernel_size=2, stride=2),
            # Normalises channels and space jointly, with a per-voxel affine: this is why a network only accepts
            # its configured input size.
            nn.LayerNorm((dim // 4, *up_grid)),
            nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        # Computed by the official decoder and then discarded; kept for the strict checkpoint format only.
        self.iou_prediction_head = MLP(dim, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth)
        self.txt_align_upscaled_embedding = nn.Linear(dim, dim // 8)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        text_embedding: torch.Tensor | None,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> torch.Tensor:
        """(B, C, g0, g1, g2) embedding + prompts -> mask-0 logits (B, 1, 4g0, 4g1, 4g2).

        ``image_embeddings`` may have batch 1 and be shared by B prompt sets.
        """
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings.expand(b, -1, -1, -1, -1) + dense_prompt_embeddings
        pos = image_pe.expand(b, -1, -1, -1, -1)
        hs, image_tokens = self.transformer(src, pos, tokens)
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens]
        c = src.shape[1]
        upscaled = self.output_upscaling(image_tokens.transpose(1, 2).reshape(b, c, *src.shape[2:]))
        up_c, grid = upscaled.shape[1], upscaled.shape[2:]
        flat = upscaled.reshape(b, up_c, -1)
        # Only mask 0 is ever used (multimask_output=False): the other hypernetworks are in the checkpoint only.
        hyper = self.output_hypernetworks_mlps[0](mask_tokens_out[:, 0]).unsqueeze(1)
        masks = hyper @ flat
        if text_embedding is not None:
            # Text enters twice: as a sparse token above, and as this similarity map added to the mask logits.
            text_down = self.txt_align_upscaled_embedding(text_embedding).unsqueeze(1)
            masks = masks + text_down @ flat
        return masks.reshape(b, 1, *grid)
