"""SegVol's image encoder: MONAI's ViT with the "perceptron" patch embedding.

Input (B, 1, D, H, W) at the configuration's spatial size; output tokens (B, N, C) with N = the embedding grid in
raster (d, h, w) order. ``SegVol.encode`` reshapes them to (B, C, d, h, w).
"""
from __future__ import annotations

from monai.networks.nets import ViT
from torch import nn

from ..config import SegVolConfig

# Submodules that MONAI >= 1.4 builds in every block even without cross-attention. They never run
# (``with_cross_attention`` is False) and the SegVol checkpoints predate them, so a strict load needs them gone.
_UNUSED_CROSS_ATTENTION = ("norm_cross_attn", "cross_attn")


def build_image_encoder(config: SegVolConfig) -> ViT:
    """The ViT exactly as the official ``_build_sam`` builds it (keys ``patch_embedding.*``, ``blocks.N.*``, ``norm.*``)."""
    encoder = ViT(
        in_channels=1,
        img_size=config.spatial_size,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        mlp_dim=config.mlp_dim,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        # MONAI 1.3 renamed the official ``pos_embed='perceptron'`` to ``proj_type``; "conv" would give other keys.
        proj_type="perceptron",
        classification=False,
        dropout_rate=0.0,
    )
    for block in encoder.blocks:
        if getattr(block, "with_cross_attention", False):
            raise RuntimeError("MONAI built a ViT block with cross-attention; SegVol's encoder has none")
        for name in _UNUSED_CROSS_ATTENTION:
            if name in block._modules:
                delattr(block, name)
                block.register_module(name, nn.Identity())
    return encoder
