"""The mask decoder on a cached image, with the image tokens kept in factored form.

In the two-way transformer the image tokens only ever change by the image->token attention, whose output for
every image token is a mix of the few prompt tokens' values: an update of rank at most heads x tokens. The
LayerNorm after it scales each row and adds multiples of fixed vectors. So after each layer the image tokens are

    T = diag(scale) · (X ⊙ G) + L @ R

with X the prompt-free image tokens (embedding + no-mask embedding), G the product of the LayerNorm gains so far,
and L (N x r), R (r x C) small factors (r ~ heads x tokens). Every product of T with a weight matrix W then costs
N·r instead of N·C per output channel once (X ⊙ G) @ W is known, and the LayerNorm statistics of T follow from
X's own statistics and X @ Rᵀ. :func:`image_side` computes those prompt-free products once per embedding; a new
prompt on a cached window then costs about half the plain decoder's time on the CPU. The result is the same
function as the module chain up to float rounding (test).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .transformer import Attention, Heads


class WindowSide(NamedTuple):
    """Prompt-free products of one embedding (batch 1): what a new prompt on it does not recompute."""

    first: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # layer 0: token->image k, v and image->token q heads
    stats: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer: row mean and centred mean square of X ⊙ G
    layers: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]  # layers 1..: (X ⊙ G) @ W for k, v, q
    final: tuple[torch.Tensor, torch.Tensor]  # (X ⊙ G) @ W for the final token->image k and v
    upscaling: torch.Tensor  # (X ⊙ G) @ the first transposed convolution, (1, N, 8 C/4), without its bias


class SharedSide(NamedTuple):
    """Terms that are the same for every embedding of one model: the positional encoding's projections plus
    biases, added to the rows of every k and q (and the biases of every v)."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]
    final: tuple[torch.Tensor, torch.Tensor]


class DecoderSide(NamedTuple):
    window: WindowSide
    shared: SharedSide


def _linear_no_bias(x: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """(x ⊙ gain) @ weightᵀ without forming x ⊙ gain."""
    return x @ (weight * gain).transpose(0, 1)


def gains(transformer) -> list[torch.Tensor]:
    """G before each layer and after the last: the running product of the image-side LayerNorm gains."""
    out = [torch.ones_like(transformer.norm_final_attn.weight)]
    for layer in transformer.layers:
        out.append(out[-1] * layer.norm4.weight)
    return out


def centred(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Tokens less their mean over channels. The first LayerNorm ignores a constant added to a token, so every
    product after the first layer's projections may use them; without it, a token mean large against its spread
    would cancel between the factored terms and cost precision."""
    return x - x.mean(dim, keepdim=True)


def image_side(decoder, x: torch.Tensor, pe: torch.Tensor) -> WindowSide:
    """``x``, ``pe``: (1, N, C) prompt-free image tokens and positional encoding -> their :class:`WindowSide`."""
    transformer = decoder.transformer
    g = gains(transformer)
    first = transformer.layers[0]
    to_image, to_token = first.cross_attn_token_to_image, first.cross_attn_image_to_token
    with_pe = x + pe
    first_heads = (to_image.heads(to_image.k_proj, with_pe), to_image.heads(to_image.v_proj, x),
                   to_token.heads(to_token.q_proj, with_pe))
    x = centred(x, -1)
    stats = []
    for gain in g[:-1]:
        base = x * gain
        mean = base.mean(-1)
        stats.append((mean, (base - mean[..., None]).square().mean(-1)))
    layers = tuple(
        tuple(_linear_no_bias(x, proj.weight, gain) for proj in (
            layer.cross_attn_token_to_image.k_proj, layer.cross_attn_token_to_image.v_proj,
            layer.cross_attn_image_to_token.q_proj))
        for layer, gain in zip(transformer.layers[1:], g[1:-1]))
    last = transformer.final_attn_token_to_image
    final = (_linear_no_bias(x, last.k_proj.weight, g[-1]), _linear_no_bias(x, last.v_proj.weight, g[-1]))
    w1 = decoder.upscaling_weights()[0]
    return WindowSide(first_heads, tuple(stats), layers, final, (x * g[-1]) @ w1)


def shared_side(decoder, pe: torch.Tensor) -> SharedSide:
    """``pe`` (1, N, C) -> the :class:`SharedSide` of the decoder's current weights."""
    transformer = decoder.transformer

    def terms(k_proj, v_proj, q_proj=None):
        out = (k_proj(pe), v_proj.bias)
        return out + (q_proj(pe),) if q_proj is not None else out

    layers = tuple(terms(layer.cross_attn_token_to_image.k_proj, layer.cross_attn_token_to_image.v_proj,
                         layer.cross_attn_image_to_token.q_proj) for layer in transformer.layers[1:])
    last = transformer.final_attn_token_to_image
    return SharedSide(layers, terms(last.k_proj, last.v_proj))


class _Factored:
    """T = scale[:, :, None] · (X ⊙ G_level) + left @ right, batched over prompt sets (B)."""

    def __init__(self, scale: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        self.scale, self.left, self.right = scale, left, right  # (B, N), (B, N, r), (B, r, C)

    def project(self, cached: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """T @ weight given cached = (X ⊙ G) @ weight; ``weight`` is (C, out)."""
        return torch.baddbmm(self.scale[..., None] * cached, self.left, self.right @ weight)

    def plus(self, left: torch.Tensor, right: torch.Tensor) -> "_Factored":
        return _Factored(self.scale, torch.cat([self.left, left], -1), torch.cat([self.right, right], 1))

    def layer_norm(self, norm: torch.nn.LayerNorm, x_t: torch.Tensor, stats, gain: torch.Tensor) -> "_Factored":
        """LayerNorm over channels, given X channels-first (1, C, N); the result's base is X ⊙ gain ⊙ norm.weight.

        In float32 even under autocast: the statistics sum squares of unnormalised factors (fp16 could overflow),
        and they are only (B, N, r) and (B, r, r) products."""
        with torch.autocast(x_t.device.type, enabled=False):
            scale, left, right = self.scale.float(), self.left.float(), self.right.float()
            mean_base, var_base = (t.float() for t in stats)
            b, _, c = right.shape
            right_mean = right.mean(-1)  # (B, r)
            right_centred = right - right_mean[..., None]
            mean = scale * mean_base + (left @ right_mean[..., None])[..., 0]
            # centred rows: scale·(base − its mean) + left @ right_centred; the base's mean drops out against them
            cross = (left * ((right_centred * gain.float()) @ x_t.float()).transpose(1, 2)).sum(-1)
            quad = ((left @ (right_centred @ right_centred.transpose(1, 2))) * left).sum(-1)
            var = scale.square() * var_base + (2 * scale * cross + quad) / c
            inv = torch.rsqrt(var.clamp_min(0) + norm.eps)
            ones = torch.ones_like(inv)[..., None]
            new_left = torch.cat([left * inv[..., None], -(mean * inv)[..., None], ones], -1)
            new_right = torch.cat([right * norm.weight, norm.weight.expand(b, 1, c), norm.bias.expand(b, 1, c)], 1)
            return _Factored(scale * inv, new_left, new_right)


def _image_update(attention: Attention, q_image: torch.Tensor, q_tokens: torch.Tensor, tokens: torch.Tensor):
    """image->token attention of image-query heads (B, H, N, d) on the tokens, as factors (B, N, H·n + 1) and
    (B, H·n + 1, C) of its output (out_proj included)."""
    k = attention.heads(attention.k_proj, q_tokens)
    v = attention.heads(attention.v_proj, tokens)
    probs = torch.softmax((q_image @ k.transpose(-2, -1)) / math.sqrt(q_image.shape[-1]), dim=-1)  # (B, H, N, n)
    b, h, n_img, n = probs.shape
    out_w = attention.out_proj.weight  # (C, H·d)
    per_head = out_w.reshape(out_w.shape[0], h, -1).permute(1, 2, 0)  # (H, d, C)
    values = (v @ per_head).reshape(b, h * n, -1)  # (B, H·n, C)
    left = torch.cat([probs.permute(0, 2, 1, 3).reshape(b, n_img, h * n), probs.new_ones(b, n_img, 1)], -1)
    return left, torch.cat([values, attention.out_proj.bias.expand(b, 1, -1)], 1)


def run(decoder, side: DecoderSide, x_t: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-way transformer and the first upscaling product on a cached image.

    ``x_t`` (1, C, N) prompt-free image tokens channels-first (the embedding's own layout) less their channel
    mean (:func:`centred`, as :func:`image_side` used them), ``tokens`` (B, n, C)
    output + prompt tokens -> (token outputs (B, n, C), the first transposed convolution's output before its bias,
    (B, N, 8 C/4))."""
    transformer = decoder.transformer
    window, shared = side
    b, c, n_img = tokens.shape[0], x_t.shape[1], x_t.shape[2]
    g = gains(transformer)
    image = _Factored(x_t.new_ones(b, n_img), x_t.new_zeros(b, n_img, 0), x_t.new_zeros(b, 0, c))
    queries = tokens
    for index, layer in enumerate(transformer.layers):
        queries = layer.token_self_attention(queries, tokens)
        to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        if index == 0:
            k_img, v_img, q_img = window.first
        else:
            (ck, cv, cq), (pk, bv, pq) = window.layers[index - 1], shared.layers[index - 1]
            k_img = to_image.split_heads(image.project(ck, to_image.k_proj.weight.t()) + pk)
            v_img = to_image.split_heads(image.project(cv, to_image.v_proj.weight.t()) + bv)
            q_img = to_token.split_heads(image.project(cq, to_token.q_proj.weight.t()) + pq)
        queries = layer.tokens_from_image(queries, tokens, Heads(k_img), Heads(v_img))
        image = image.plus(*_image_update(to_token, q_img, queries + tokens, queries))
        image = image.layer_norm(layer.norm4, x_t, window.stats[index], g[index])
    last = transformer.final_attn_token_to_image
    (ck, cv), (pk, bv) = window.final, shared.final
    k_img = last.split_heads(image.project(ck, last.k_proj.weight.t()) + pk)
    v_img = last.split_heads(image.project(cv, last.v_proj.weight.t()) + bv)
    queries = transformer.norm_final_attn(queries + last(queries + tokens, Heads(k_img), Heads(v_img)))
    return queries, image.project(window.upscaling, decoder.upscaling_weights()[0])
