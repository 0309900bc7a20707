"""Fidelity of the SegVol network against the official code's outputs on deterministic synthetic weights."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from golden_support import cases, golden_image, manifest_entries, manifest_hash, max_abs_diff, reference, stats
from segvolgru import load_model
from segvolgru.network.factored_decoder import DecoderSide
from segvolgru.synthetic_weights import state_hash, synthetic_state_dict
from segvolgru.tokenizer import default_tokenizer, organ_prompts

TOL = 1e-3
pytestmark = pytest.mark.golden


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory):
    state = synthetic_state_dict(manifest_entries())
    path = tmp_path_factory.mktemp("golden") / "SegVol_v1_synthetic.pth"
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def model(official_pth):
    torch.manual_seed(0)
    return load_model(official_pth)


@pytest.fixture(scope="module")
def embedding(model):
    with torch.inference_mode():
        return model.encode(torch.from_numpy(golden_image())[None, None])


def _prompts(case: dict):
    boxes = torch.tensor([case["box"]], dtype=torch.float32) if case["box"] else None
    points = None
    if case["points"]:
        points = (torch.tensor([case["points"]], dtype=torch.float32),
                  torch.tensor([case["labels"]], dtype=torch.float32))
    return boxes, points


def test_golden_synthetic_weights_follow_the_manifest_rule():
    assert state_hash(synthetic_state_dict(manifest_entries())) == manifest_hash()


def test_golden_image_is_the_reference_input(ref):
    image = golden_image()
    assert hashlib.sha256(image.tobytes()).digest() == ref["image_sha256_u8"].tobytes()
    np.testing.assert_allclose(stats(image), ref["image_stats"], atol=1e-7)


def test_golden_image_embedding_matches_official(embedding, ref):
    emb = embedding.numpy()
    assert emb.shape == (1, 768, 8, 16, 16)
    assert max_abs_diff(emb[:, ::8, :, ::2, ::2], ref["image_embedding_sub"]) <= TOL
    assert max_abs_diff(stats(emb), ref["image_embedding_stats"]) <= TOL


def test_golden_dense_positional_encoding_matches_official(model, ref):
    pe = model.prompt_encoder.get_dense_pe().detach().numpy()
    assert max_abs_diff(pe[:, ::8, ::2, ::2, ::2], ref["dense_pe_sub"]) <= TOL
    assert max_abs_diff(stats(pe), ref["dense_pe_stats"]) <= TOL


def test_golden_text_tokens_match_official(ref):
    ids, mask = default_tokenizer()(organ_prompts(["liver"]))
    np.testing.assert_array_equal(ids.numpy(), ref["text_box_text_ids"])
    np.testing.assert_array_equal(mask.numpy(), ref["text_box_text_attention_mask"])
    assert default_tokenizer().encode("liver") == [49406, 12639, 49407]


@pytest.mark.parametrize("name", ["box", "points", "box_points", "text_box"])
def test_golden_case_matches_official(name, model, embedding, ref):
    case = cases()[name]
    boxes, points = _prompts(case)
    with torch.inference_mode():
        text_embedding = model.embed_text(case["text"]) if case["text"] else None
        boxes_3d = boxes[:, None, :] if boxes is not None else None
        sparse, _ = model.prompt_encoder(points=points, boxes=boxes_3d, text_embedding=text_embedding)
        low_res = model.decode(embedding, boxes, points, text_embedding)
        logits = model.upsample(low_res)
        # the engine's path: the factored decoder on the cached image side
        side = DecoderSide(model.decoder_image_side(embedding), model.decoder_shared_side())
        factored = model.decode(embedding, boxes, points, text_embedding, side)
    assert max_abs_diff(factored.numpy(), ref[f"{name}_low_res_logits"]) <= TOL
    if text_embedding is not None:
        assert max_abs_diff(text_embedding.numpy(), ref[f"{name}_text_embedding"]) <= TOL
    if boxes is not None:
        np.testing.assert_array_equal(boxes.numpy(), ref[f"{name}_boxes"])
    if points is not None:
        np.testing.assert_array_equal(points[0].numpy(), ref[f"{name}_point_coords"])
    assert max_abs_diff(sparse.numpy(), ref[f"{name}_sparse_embeddings"]) <= TOL
    assert max_abs_diff(low_res.numpy(), ref[f"{name}_low_res_logits"]) <= TOL
    assert max_abs_diff(logits.numpy()[..., ::2, ::4, ::4], ref[f"{name}_logits_sub"]) <= TOL
    assert max_abs_diff(stats(logits.numpy()), ref[f"{name}_logits_stats"]) <= TOL


def test_golden_official_forward_equals_encoder_then_decoder(model, embedding, ref):
    boxes, _ = _prompts(cases()["box"])
    with torch.inference_mode():
        logits = model(torch.from_numpy(golden_image())[None, None], boxes=boxes)
    assert max_abs_diff(logits.numpy()[..., ::2, ::4, ::4], ref["box_logits_sub"]) <= TOL


def test_golden_hugging_face_layout_loads_the_same_numbers(model, tmp_path):
    state = {"model." + k: v for k, v in synthetic_state_dict(manifest_entries()).items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    del state
    hf_model = load_model(tmp_path)
    ours, theirs = model.state_dict(), hf_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_official_checkpoint_runs_sessions_with_the_shipped_corrector(model):
    from segvolgru.corrector_file import SHIPPED_CORRECTION_FILE
    from segvolgru.session import InteractiveSession

    assert model.correction is not None and model.corrector_source == str(SHIPPED_CORRECTION_FILE)
    volume = (golden_image()[:, :128, :128] * 1000).astype(np.int16)
    session = InteractiveSession(model, volume, spacing=(1.5, 1.5, 1.5))
    session.set_box((8, 24, 24, 24, 100, 100))
    result = session.add_click((16, 60, 60), positive=True)
    assert session.correction_active and session.hidden_state is not None
    assert result.mask.shape == volume.shape and result.mask.any()


def test_correction_none_loads_the_official_checkpoint_without_a_corrector(official_pth):
    bare = load_model(official_pth, correction=None)
    assert bare.correction is None and bare.corrector_source == "none"
