"""save_model / load_model (safetensors + JSON, no pickle) and stitch_region_masks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from xtpath.errors import CheckpointError, InvalidParameterError
from xtpath.models import (ContextConfig, HeadConfig, XTConfig, XTModel, load_model, save_model,
                           stitch_region_masks)
from xtpath.models.checkpoint import CONFIG_NAME, WEIGHTS_NAME


@pytest.mark.parametrize("name", ["mamba", "transformer", "abmil", "mean"])
def test_round_trip_gives_identical_outputs(tmp_path, name):
    torch.manual_seed(0)
    cfg = XTConfig(in_dim=6, num_classes=2, task="segmentation", token_grid=(2, 2),
                   context=ContextConfig(name=name, d_model=16, n_layers=1, n_heads=2, d_state=4),
                   head=HeadConfig(decoder_dim=8, upsample=2, region_um=64.0))
    model = XTModel(cfg).eval()
    save_model(model, tmp_path / "ckpt", metadata={"epoch": 3})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    doc = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert doc["format"] == "xtpath-model" and doc["metadata"] == {"epoch": 3}
    assert doc["config"]["context"]["name"] == name
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.cfg == cfg and not loaded.training
    x, grid = torch.randn(3, 2, 2, 6), torch.tensor([[0, 0], [1, 1], [0, 3]])
    with torch.no_grad():
        assert torch.equal(model(x, grid).mask_logits, loaded(x, grid).mask_logits)


def test_weights_file_is_plain_safetensors(tmp_path):
    model = XTModel(XTConfig(in_dim=4, num_classes=2, context=ContextConfig(name="mean", d_model=8)))
    save_model(model, tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    assert set(state) == set(model.state_dict())
    assert (tmp_path / WEIGHTS_NAME).read_bytes()[:1] != b"\x80"  # not a pickle


def test_saving_again_replaces_files_and_leaves_no_temporaries(tmp_path):
    model = XTModel(XTConfig(in_dim=4, num_classes=2, context=ContextConfig(name="mean", d_model=8)))
    save_model(model, tmp_path)
    with torch.no_grad():
        model.proj.weight.add_(1.0)
    save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    torch.testing.assert_close(load_model(tmp_path).proj.weight, model.proj.weight)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=CONFIG_NAME):
        load_model(tmp_path)
    model = XTModel(XTConfig(in_dim=4, num_classes=2, context=ContextConfig(name="mean", d_model=8)))
    save_model(model, tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path)
    save_model(model, tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_model(tmp_path)
    # weights of another model next to this config
    other = XTModel(XTConfig(in_dim=5, num_classes=2, context=ContextConfig(name="mean", d_model=8)))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match="wrong shape: proj.weight"):
        load_model(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable model config"):
        load_model(tmp_path)
    bad = {"format": "xtpath-model", "version": 1, "config": {"in_dim": 4, "num_classes": 2, "task": "nope"}}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="invalid model config"):
        load_model(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not an xtpath model config"):
        load_model(tmp_path)


def test_missing_keys_are_reported(tmp_path):
    model = XTModel(XTConfig(in_dim=4, num_classes=2, context=ContextConfig(name="abmil", d_model=8)))
    save_model(model, tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    del state["context.attn_w.bias"]
    save_file(state, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match="missing: context.attn_w.bias"):
        load_model(tmp_path)


def test_save_model_needs_an_xtmodel(tmp_path):
    with pytest.raises(InvalidParameterError, match="XTModel"):
        save_model(torch.nn.Linear(2, 2), tmp_path)


def test_stitch_places_masks_on_the_bounding_box():
    masks = torch.arange(3 * 1 * 2 * 2, dtype=torch.float32).reshape(3, 1, 2, 2) + 1
    grid = torch.tensor([[5, 11], [6, 10], [5, 10]])  # offset; (6, 11) is a hole
    out = stitch_region_masks(masks, grid)
    assert out.shape == (1, 4, 4)
    expected = torch.tensor([[[9, 10, 1, 2],
                              [11, 12, 3, 4],
                              [5, 6, 0, 0],
                              [7, 8, 0, 0]]], dtype=torch.float32)
    assert torch.equal(out, expected)


def test_stitch_region_level_masks_is_a_heatmap():
    probs = torch.tensor([[0.1, 0.9], [0.7, 0.3]])[:, :, None, None]
    out = stitch_region_masks(probs, torch.tensor([[0, 0], [0, 2]]))
    assert out.shape == (2, 1, 3)
    assert out[1].tolist() == [[pytest.approx(0.9), 0.0, pytest.approx(0.3)]]


def test_stitch_errors():
    with pytest.raises(InvalidParameterError, match="masks"):
        stitch_region_masks(torch.zeros(2, 4), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(InvalidParameterError, match="same"):
        stitch_region_masks(torch.zeros(2, 1, 2, 2), torch.tensor([[0, 0], [0, 0]]))
