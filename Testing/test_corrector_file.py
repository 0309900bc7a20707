"""The click corrector as a file of its own: the one rule for which corrector a model gets, and safe loading."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

import segvolgru
from engine_support import tiny_model
from segvolgru.checkpoint import save_checkpoint
from segvolgru.corrector_file import SHIPPED_CORRECTION_FILE, attach_corrector, read_corrector, save_corrector
from segvolgru.errors import WeightsError


def test_the_demo_model_keeps_its_own_corrector_and_a_file_replaces_it(tmp_path):
    demo = segvolgru.load_model(segvolgru.demo_model_path())
    assert demo.corrector_source == "own (segvolgru)"
    other = tiny_model({"k": 8, "hidden_size": 4, "row_dim": 4}).correction
    path = tmp_path / "mine.pt"
    save_corrector(other, path, {"trained_on": "a test"})
    mine = segvolgru.load_model(segvolgru.demo_model_path(), correction=path)
    assert mine.corrector_source == str(path) and mine.correction.config.hidden_size == 4
    assert read_corrector(path)[1] == {"trained_on": "a test"}


def test_a_checkpoint_without_a_corrector_gets_the_shipped_one(tmp_path):
    bare = tiny_model()
    assert bare.correction is None
    save_checkpoint(bare, tmp_path / "bare.pt")
    loaded = segvolgru.load_model(tmp_path / "bare.pt")
    assert loaded.corrector_source == str(SHIPPED_CORRECTION_FILE) and loaded.correction is not None
    shipped, recipe = read_corrector(SHIPPED_CORRECTION_FILE)
    assert all(torch.equal(a, b) for a, b in zip(loaded.correction.state_dict().values(),
                                                  shipped.state_dict().values()))
    assert "trained_on" in recipe
    assert segvolgru.load_model(tmp_path / "bare.pt", correction=None).correction is None


def test_a_corrector_file_that_is_not_one_is_refused_and_runs_nothing(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(pickle.dumps({"config": {}, "model": Exploit()}))
    with pytest.raises(WeightsError, match="not a readable corrector file"):
        read_corrector(crafted)
    assert not (tmp_path / "pwned").exists()
    wrong = tmp_path / "wrong.pt"
    torch.save({"config": {"hidden_size": 8, "row_dim": 4}, "model": {"head.0.weight": torch.zeros(2, 2)}}, wrong)
    with pytest.raises(WeightsError, match="does not fit"):
        read_corrector(wrong)
    with pytest.raises(WeightsError, match="does not exist"):
        attach_corrector(tiny_model(), tmp_path / "missing.pt")
