"""Checkpoint formats, strict key matching and readable errors (small configurations)."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from segvolgru import load_model
from segvolgru.checkpoint import CheckpointError, save_checkpoint
from segvolgru.config import OFFICIAL_CONFIG, TINY_CONFIG, TINY_TEXT_CONFIG, SegVolConfig
from segvolgru.errors import WeightsError
from segvolgru.network import build_model
from segvolgru.synthetic_weights import synthetic_state_for


@pytest.fixture(scope="module")
def tiny_state():
    return synthetic_state_for(build_model(TINY_CONFIG))


def _probe(model) -> torch.Tensor:
    image = torch.linspace(0, 1, 16 * 64 * 64).reshape(1, 1, 16, 64, 64)
    with torch.inference_mode():
        return model(image, boxes=torch.tensor([[2.0, 10, 12, 9, 40, 50]]))


def test_official_hf_finetune_and_project_formats_give_identical_outputs(tiny_state, tmp_path):
    files = {
        "official.pth": {"model": {"module." + k: v for k, v in tiny_state.items()}, "epoch": 3},
        "pytorch_model.bin": {"model." + k: v for k, v in tiny_state.items()},
        "finetune.pth": {"model_state_dict": {"model." + k: v for k, v in tiny_state.items()}, "epoch": 1},
        "project.pt": {"config": TINY_CONFIG.to_dict(), "model": tiny_state, "recipe": {"seed": 1}},
    }
    outputs = []
    for name, content in files.items():
        torch.save(content, tmp_path / name)
        config = None if name == "project.pt" else TINY_CONFIG
        outputs.append(_probe(load_model(tmp_path / name, config=config)))
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])


def test_safetensors_release_loads(tiny_state, tmp_path):
    from safetensors.torch import save_file

    save_file({"model." + k: v.contiguous() for k, v in tiny_state.items()}, str(tmp_path / "model.safetensors"))
    model = load_model(tmp_path, config=TINY_CONFIG)
    assert torch.equal(model.state_dict()["mask_decoder.iou_token.weight"], tiny_state["mask_decoder.iou_token.weight"])


def test_project_file_rebuilds_its_own_config_and_keeps_correction_keys(tmp_path):
    model = build_model(TINY_CONFIG)
    save_checkpoint(model, tmp_path / "m.pt", recipe={"data": "phantoms"}, half=True)
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    raw["model"]["correction.gru.weight_ih_l0"] = torch.ones(3, 2)
    torch.save(raw, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.config == TINY_CONFIG
    assert loaded.recipe == {"data": "phantoms"}
    assert torch.equal(loaded.correction_state["gru.weight_ih_l0"], torch.ones(3, 2))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert not loaded.training


def test_published_gru_blocks_are_skipped_with_a_warning_naming_the_prefix(tiny_state, tmp_path):
    state = {"model." + k: v for k, v in tiny_state.items()}
    state["model.gru_blocks.0.gru.weight_ih_l0"] = torch.zeros(6, 4)
    torch.save({"model_state_dict": state}, tmp_path / "gru.pth")
    with pytest.warns(UserWarning, match="gru_blocks"):
        load_model(tmp_path / "gru.pth", config=TINY_CONFIG)


def test_missing_key_is_refused_with_a_readable_list(tiny_state, tmp_path):
    state = dict(tiny_state)
    del state["mask_decoder.iou_token.weight"]
    torch.save({"model": state}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"Missing keys \(1\): mask_decoder.iou_token.weight"):
        load_model(tmp_path / "x.pth", config=TINY_CONFIG)


def test_extra_key_is_refused(tiny_state, tmp_path):
    torch.save({"model": {**tiny_state, "decoder.extra": torch.zeros(1)}}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"Unexpected keys \(1\): decoder.extra"):
        load_model(tmp_path / "x.pth", config=TINY_CONFIG)


def test_wrong_shape_is_refused_with_both_shapes(tiny_state, tmp_path):
    state = dict(tiny_state)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 65)
    torch.save({"model": state}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"\(1, 65\) != \(1, 64\)"):
        load_model(tmp_path / "x.pth", config=TINY_CONFIG)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)).state_dict(), tmp_path / "r.pth")
    with pytest.raises(CheckpointError, match="does not look like a SegVol checkpoint"):
        load_model(tmp_path / "r.pth", config=TINY_CONFIG)


def test_official_weights_into_a_small_configuration_are_refused_not_truncated(tiny_state, tmp_path):
    torch.save({"model": tiny_state}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="Wrong shapes"):
        load_model(tmp_path / "x.pth", config=dataclasses.replace(TINY_CONFIG, spatial_size=(16, 32, 32)))


def test_truncated_file_gives_a_clear_error_not_a_pickle_traceback(tiny_state, tmp_path):
    torch.save({"model": tiny_state}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated, corrupted or not a PyTorch"):
        load_model(tmp_path / "cut.pth", config=TINY_CONFIG)


def test_missing_file_says_how_to_get_weights(tmp_path):
    with pytest.raises(WeightsError, match="download-weights"):
        load_model(tmp_path / "nope.pth")


def test_text_tower_keys_without_position_ids_still_load():
    model = build_model(TINY_TEXT_CONFIG)
    state = synthetic_state_for(model)
    del state["text_encoder.clip_text_model.text_model.embeddings.position_ids"]
    from segvolgru.checkpoint import Checkpoint, apply_state

    apply_state(model, Checkpoint("huggingface", state))
    with torch.inference_mode():
        emb = model.embed_text(["liver", "left kidney"])
    assert emb.shape == (2, 64)
    assert not torch.allclose(emb[0], emb[1])


def test_text_free_configuration_accepts_weights_with_a_text_tower():
    state = synthetic_state_for(build_model(TINY_TEXT_CONFIG))
    model = build_model(TINY_CONFIG)
    from segvolgru.checkpoint import Checkpoint, apply_state

    apply_state(model, Checkpoint("official-pth", state))
    assert model.text_encoder is None
    with pytest.raises(ValueError, match="no text tower"):
        model.embed_text("liver")


def test_official_configuration_parameter_count():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(OFFICIAL_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == 180_890_064


def test_config_round_trip_and_validation():
    assert SegVolConfig.from_dict(TINY_CONFIG.to_dict()) == TINY_CONFIG
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        SegVolConfig(spatial_size=(30, 256, 256))
    with pytest.raises(ValueError, match="unknown SegVolConfig fields"):
        SegVolConfig.from_dict({"depth": 3})
