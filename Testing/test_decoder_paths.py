"""The decoder's fast paths (matrix-product upscaling, factored decoding on a cached image) against the plain
module chain."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from segvolgru.config import TINY_TEXT_CONFIG
from segvolgru.network import build_model
from segvolgru.network.factored_decoder import DecoderSide


def _model(**changes):
    torch.manual_seed(3)
    model = build_model(dataclasses.replace(TINY_TEXT_CONFIG, **changes))
    with torch.no_grad():
        for p in model.mask_decoder.parameters():  # non-trivial LayerNorm affine and biases
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _inputs(model, batch: int):
    """Grid, random image tokens (B, G, C) and hypernetwork vectors (B, C/8) for the model's decoder."""
    grid = tuple(model.config.embedding_grid)
    tokens = torch.randn(batch, grid[0] * grid[1] * grid[2], model.config.hidden_size)
    return grid, tokens, torch.randn(batch, model.config.hidden_size // 8)


def _reference_upscaled_dot(decoder, tokens, grid, vector):
    b, _, c = tokens.shape
    up = decoder.output_upscaling(tokens.transpose(1, 2).reshape(b, c, *grid))
    return (vector[:, None] @ up.reshape(b, up.shape[1], -1)).reshape(b, *up.shape[2:])


def test_matrix_product_upscaling_equals_the_transposed_convolutions():
    model = _model()
    grid, tokens, vector = _inputs(model, 2)
    with torch.no_grad():
        fast = model.mask_decoder.upscaled_dot(tokens, grid, vector)
        plain = _reference_upscaled_dot(model.mask_decoder, tokens, grid, vector)
    assert fast.shape == plain.shape == (2, *(4 * g for g in grid))
    assert (fast - plain).abs().max() <= 1e-5 * plain.abs().max()


def test_upscaling_gradients_equal_the_module_chain():
    model = _model().train()
    grid, tokens, vector = _inputs(model, 1)
    grads = []
    for fn in (model.mask_decoder.upscaled_dot, lambda *a: _reference_upscaled_dot(model.mask_decoder, *a)):
        model.zero_grad()
        fn(tokens, grid, vector).square().sum().backward()
        grads.append([p.grad.clone() for p in model.mask_decoder.output_upscaling.parameters()])
    for fast, plain in zip(*grads):
        assert (fast - plain).abs().max() <= 1e-4 * plain.abs().max()


def test_weights_changed_in_place_are_never_served_from_the_arranged_copy():
    model = _model()
    grid, tokens, vector = _inputs(model, 1)
    with torch.no_grad():
        before = model.mask_decoder.upscaled_dot(tokens, grid, vector)
        model.mask_decoder.output_upscaling[1].weight.mul_(-1.0)
        after = model.mask_decoder.upscaled_dot(tokens, grid, vector)
        plain = _reference_upscaled_dot(model.mask_decoder, tokens, grid, vector)
    assert not torch.allclose(before, after)
    assert (after - plain).abs().max() <= 1e-5 * plain.abs().max()


def _side(model, embedding):
    return DecoderSide(model.decoder_image_side(embedding), model.decoder_shared_side())


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_factored_decoder_gives_the_module_chain_logits_for_every_prompt(depth):
    model = _model(decoder_depth=depth)
    embedding = 2.0 * torch.randn(1, model.config.hidden_size, *model.config.embedding_grid) + 0.5
    text = model.embed_text(["liver"]).detach()
    with torch.no_grad():
        side = _side(model, embedding)
        for boxes, points, text_emb in [
            (torch.tensor([[1.0, 2, 3, 10, 20, 25]]), None, None),
            (None, (torch.tensor([[[4.0, 9, 9], [6, 20, 3]]]), torch.tensor([[1.0, 0.0]])), None),
            (torch.tensor([[0.0, 0, 0, 5, 5, 5]]), (torch.tensor([[[2.0, 2, 2]]]), torch.tensor([[1.0]])), text),
        ]:
            plain = model.decode(embedding, boxes, points, text_emb)
            factored = model.decode(embedding, boxes, points, text_emb, side)
            assert (plain - factored).abs().max() <= 1e-5 * plain.abs().max() + 1e-5


def test_factored_decoder_batches_prompt_sets_on_one_cached_image():
    model = _model()
    embedding = torch.randn(1, model.config.hidden_size, *model.config.embedding_grid)
    boxes = torch.tensor([[1.0, 2, 3, 10, 20, 25], [0.0, 0, 0, 5, 5, 5]])
    points = (torch.tensor([[[4.0, 9, 9]], [[2.0, 2, 2]]]), torch.tensor([[1.0], [0.0]]))
    with torch.no_grad():
        factored = model.decode(embedding, boxes, points, None, _side(model, embedding))
        one_by_one = torch.cat([model.decode(embedding, boxes[i:i + 1], (points[0][i:i + 1], points[1][i:i + 1]))
                                for i in range(2)])
    assert factored.shape == one_by_one.shape == (2, 1, *(4 * g for g in model.config.embedding_grid))
    assert (factored - one_by_one).abs().max() <= 1e-5 * one_by_one.abs().max() + 1e-5


def test_factored_decoder_keeps_its_precision_for_tokens_with_a_large_mean():
    """Tokens whose channel mean is 1000x their spread: the factored terms would cancel without centring."""
    model = _model()
    embedding = torch.randn(1, model.config.hidden_size, *model.config.embedding_grid) + 1000.0
    boxes = torch.tensor([[1.0, 2, 3, 10, 20, 25]])
    with torch.no_grad():
        plain = model.decode(embedding, boxes)
        factored = model.decode(embedding, boxes, None, None, _side(model, embedding))
    # plain float32 rounding is ~1e-5 of the logits here; without the centring the factored path is ~5e-4
    assert (factored - plain).abs().max() <= 5e-5 * plain.abs().max()


def test_factored_decoder_refuses_a_batch_of_embeddings():
    model = _model()
    embedding = torch.randn(2, model.config.hidden_size, *model.config.embedding_grid)
    with torch.no_grad(), pytest.raises(ValueError, match="one embedding"):
        model.decode(embedding, torch.tensor([[1.0, 2, 3, 10, 20, 25]] * 2), None, None,
                     _side(model, embedding[:1]))
