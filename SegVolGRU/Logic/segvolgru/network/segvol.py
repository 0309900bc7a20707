"""The SegVol network: image encoder, mask decoder, prompt encoder and (optionally) the CLIP text encoder.

The submodules are registered in the official order and under the official names: those names are the checkpoint
format. Tensors are (B, 1, D, H, W) at the configuration's spatial size; prompts are voxel indices of that input.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..config import SegVolConfig
from .image_encoder import build_image_encoder
from . import factored_decoder
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .text_encoder import TextEncoder
from ..correction import ClickCorrector, CorrectionConfig

Points = tuple[torch.Tensor, torch.Tensor]


class SegVol(nn.Module):
    def __init__(self, config: SegVolConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = build_image_encoder(config)
        self.mask_decoder = MaskDecoder(config)
        self.prompt_encoder = PromptEncoder(config)
        self.text_encoder = TextEncoder(config) if config.text_tower else None
        # The project's click-correction module (weights under ``correction.``); absent in the official model.
        self.correction = ClickCorrector(CorrectionConfig.from_dict(config.correction)) if config.correction else None
        # Filled by the checkpoint loader: the correction module's weights and the training recipe, if any.
        self.correction_state: dict[str, torch.Tensor] = {}
        self.recipe: dict = {}
        self.checkpoint_format: str | None = None

    @property
    def has_text(self) -> bool:
        return self.text_encoder is not None

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> image embedding (B, C, g0, g1, g2)."""
        expected = tuple(self.config.spatial_size)
        if image.dim() != 5 or tuple(image.shape[2:]) != expected or image.shape[1] != 1:
            raise ValueError(f"the encoder takes (B, 1, {', '.join(map(str, expected))}) tensors, "
                             f"got {tuple(image.shape)}")
        tokens = self.image_encoder(image)[0]
        b, _, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, c, *self.config.embedding_grid)

    def embed_text(self, names: str | list[str]) -> torch.Tensor:
        """Organ names -> (B, C) text embeddings."""
        if self.text_encoder is None:
            raise ValueError("this model has no text tower: give a box or clicks instead of text, or load a "
                             "model whose configuration has text_tower=True (the official SegVol weights)")
        return self.text_encoder(names)

    def decode(
        self,
        image_embedding: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: Points | None = None,
        text_embedding: torch.Tensor | None = None,
        image_side: factored_decoder.DecoderSide | None = None,
    ) -> torch.Tensor:
        """Embedding (1 or B, C, g...) + prompts -> low-resolution logits (B, 1, 4g0, 4g1, 4g2).

        ``boxes`` (B, 6) or (B, 1, 6) as (d0, h0, w0, d1, h1, w1) inclusive; ``points`` = (coords (B, N, 3) in
        (d, h, w), labels (B, N): 1 positive, 0 negative, −1 ignore); ``text_embedding`` (B, C);
        ``image_side``: ``DecoderSide(decoder_image_side(embedding), decoder_shared_side())``, when a caller keeps
        them across prompts (the factored decoder: same logits up to rounding, less than half the operations).
        """
        if boxes is not None and boxes.dim() == 2:
            boxes = boxes[:, None, :]
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, text_embedding=text_embedding)
        # the factored decoder has the positional encoding's products in its shared side already
        pe = self.prompt_encoder.get_dense_pe() if image_side is None else None
        return self.mask_decoder(image_embedding, text_embedding, pe, sparse, dense, image_side)

    def _dense_pe_tokens(self) -> torch.Tensor:
        return self.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2).contiguous()

    def decoder_image_side(self, image_embedding: torch.Tensor) -> factored_decoder.WindowSide:
        """The decoder's prompt-free products of an embedding (1, C, g...), for :meth:`decode`'s ``image_side``:
        every prompt sees the embedding plus the same no-mask dense embedding."""
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1, 1)
        x = (image_embedding[:1] + dense).flatten(2).transpose(1, 2).contiguous()
        return factored_decoder.image_side(self.mask_decoder, x, self._dense_pe_tokens())

    def decoder_shared_side(self) -> factored_decoder.SharedSide:
        """The decoder's terms common to every embedding (positional-encoding projections, biases)."""
        return factored_decoder.shared_side(self.mask_decoder, self._dense_pe_tokens())

    def upsample(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits -> logits at the spatial size (trilinear, align_corners=False, as official)."""
        return F.interpolate(low_res_logits, size=self.config.spatial_size, mode="trilinear", align_corners=False)

    def forward(
        self,
        image: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: Points | None = None,
        text: str | list[str] | None = None,
    ) -> torch.Tensor:
        """The official test-mode forward: (B, 1, D, H, W) + prompts -> logits (B, 1, D, H, W)."""
        text_embedding = self.embed_text(text) if text is not None else None
        return self.upsample(self.decode(self.encode(image), boxes, points, text_embedding))
