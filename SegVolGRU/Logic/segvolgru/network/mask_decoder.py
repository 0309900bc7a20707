"""SegVol's 3-D mask decoder: two-way transformer, 4x transposed-conv upscaling, hypernetworks, text fusion.

Output: low-resolution mask logits (B, 1, 4·g0, 4·g1, 4·g2), e.g. (B, 1, 32, 64, 64) officially.

The upscaling is evaluated as matrix products rather than through ConvTranspose3d: a transposed convolution with
kernel 2 and stride 2 sends each input voxel to its own 2x2x2 output block, so both of them, the LayerNorm's
per-voxel affine, the GELUs and the final dot product with the mask token's hypernetwork vector all act voxel by
voxel, in the layout the products give. Only the last step reorders the (g, 2, 2) blocks into space. Same
function as the module chain (test), fewer copies, and on the CPU about twice as fast.
"""
from __future__ import annotations

import torch
from torch import nn

from torch.nn import functional as F

from ..config import SegVolConfig
from . import factored_decoder
from .transformer import TwoWayTransformer


_TAIL_ROWS = 2048


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
        self.grid = tuple(config.embedding_grid)
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
        image_pe: torch.Tensor | None,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_side: factored_decoder.DecoderSide | None = None,
    ) -> torch.Tensor:
        """(B, C, g0, g1, g2) embedding + prompts -> mask-0 logits (B, 1, 4g0, 4g1, 4g2).

        ``image_embeddings`` may have batch 1 and be shared by B prompt sets; ``image_pe`` is only read without
        ``image_side``. ``image_side``: the
        :func:`~factored_decoder.image_side` of this embedding (plus the no-mask dense embedding, which it then
        must be) and the model's :func:`~factored_decoder.shared_side`, to decode in factored form.
        """
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        grid = tuple(image_embeddings.shape[2:])
        if image_side is not None:
            if image_embeddings.shape[0] != 1:
                raise ValueError("the factored decoder (image_side given) takes one embedding (batch 1), got "
                                 f"{image_embeddings.shape[0]}: decode each embedding with its own image side")
            x_t = factored_decoder.centred((image_embeddings + dense_prompt_embeddings[:1]).flatten(2), 1)
            hs, first = factored_decoder.run(self, image_side, x_t, tokens)
        else:
            src = image_embeddings.expand(b, -1, -1, -1, -1) + dense_prompt_embeddings
            pos = image_pe.expand(b, -1, -1, -1, -1)
            hs, image_tokens = self.transformer(src, pos, tokens)
            first = image_tokens @ self.upscaling_weights(grid)[0]
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens]
        # Only mask 0 is ever used (multimask_output=False): the other hypernetworks are in the checkpoint only.
        vector = self.output_hypernetworks_mlps[0](mask_tokens_out[:, 0])
        if text_embedding is not None:
            # Text enters twice: as a sparse token above, and as a similarity map with the upscaled embedding,
            # added to the mask logits; both maps are linear in it, so the two vectors are summed first.
            vector = vector + self.txt_align_upscaled_embedding(text_embedding)
        return self._upscaled_dot_from(first, grid, vector)[:, None]

    def upscaled_dot(self, image_tokens: torch.Tensor, grid: tuple[int, int, int],
                     vector: torch.Tensor) -> torch.Tensor:
        """``output_upscaling`` of the (B, G, C) image tokens on ``grid``, dotted over channels with the (B, C/8)
        ``vector``: (B, 4g0, 4g1, 4g2)."""
        return self._upscaled_dot_from(image_tokens @ self.upscaling_weights(grid)[0], grid, vector)

    def _upscaled_dot_from(self, first: torch.Tensor, grid: tuple[int, int, int],
                           vector: torch.Tensor) -> torch.Tensor:
        """:meth:`upscaled_dot` after its first product: ``first`` = image tokens @ the arranged first weight."""
        norm = self.output_upscaling[1]
        b, n, _ = first.shape
        _, b1, w2, b2, norm_weight, norm_bias = self.upscaling_weights(grid)
        c1 = w2.shape[0]
        # rows: input voxels; columns: (position in the voxel's 2x2x2 block, channel)
        y = (first + b1).view(b, -1)
        y = F.gelu(F.layer_norm(y, (y.shape[1],), norm_weight, norm_bias, norm.eps))
        # rows: (voxel, first block position); columns: (second block position, channel)
        rows = y.view(b, n * 8, c1)
        if torch.is_grad_enabled():
            z = F.gelu(torch.addmm(b2, rows.reshape(-1, c1), w2)).view(b, n * 64, -1)
            masks = z @ vector[:, :, None]
        else:
            # in row blocks that stay in cache: the (rows, 8 x C/8) product is 50 MB for an official window
            masks = rows.new_empty(b, n * 8, 8)
            for i in range(b):
                for start in range(0, n * 8, _TAIL_ROWS):
                    z = F.gelu(torch.addmm(b2, rows[i, start:start + _TAIL_ROWS], w2))
                    torch.mm(z.view(-1, vector.shape[1]), vector[i, :, None],
                             out=masks[i, start:start + _TAIL_ROWS].view(-1, 1))
        masks = masks.view(b, *grid, 2, 2, 2, 2, 2, 2)
        # voxel (d, h, w), blocks (a1, b1, e1) and (a2, b2, e2) -> (4d + 2 a1 + a2, 4h + 2 b1 + b2, 4w + 2 e1 + e2)
        masks = masks.permute(0, 1, 4, 7, 2, 5, 8, 3, 6, 9)
        return masks.reshape(b, 4 * grid[0], 4 * grid[1], 4 * grid[2])

    def upscaling_weights(self, grid: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, ...]:
        """The upscaling's weights in the layouts of :meth:`upscaled_dot` (for ``grid``, by default the
        configured one), cached until they change."""
        grid = self.grid if grid is None else tuple(grid)
        conv1, norm, _, conv2, _ = self.output_upscaling
        tensors = (conv1.weight, conv1.bias, conv2.weight, conv2.bias, norm.weight, norm.bias)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return _arrange(grid, *tensors)  # differentiable, for training
        key = (grid, conv1.weight.device, conv1.weight.dtype, *((t.data_ptr(), t._version) for t in tensors))
        cached = self.__dict__.get("_arranged")
        if cached is None or cached[0] != key:
            cached = (key, tuple(t.contiguous() for t in _arrange(grid, *(t.detach() for t in tensors))))
            self.__dict__["_arranged"] = cached  # a plain attribute: not part of the checkpoint
        return cached[1]


def _arrange(grid: tuple[int, int, int], w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
             norm_weight: torch.Tensor, norm_bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """ConvTranspose3d weights (C_in, C_out, 2, 2, 2) -> (C_in, 8 * C_out) with columns (block position, channel),
    their biases repeated to match, and the LayerNorm's (C1, 2g0, 2g1, 2g2) affine -> flat (voxel, block position,
    channel)."""
    g0, g1, g2 = grid

    def columns(w: torch.Tensor) -> torch.Tensor:
        return w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1)

    def voxels(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, g0, 2, g1, 2, g2, 2).permute(1, 3, 5, 2, 4, 6, 0).reshape(-1)

    return columns(w1), b1.repeat(8), columns(w2), b2.repeat(8), voxels(norm_weight), voxels(norm_bias)
