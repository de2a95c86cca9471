"""Region encoders: timm models built offline, local weights, pooled vectors and token grids."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch

from xtpath.errors import CheckpointError, InvalidParameterError
from xtpath.models.encoders import ALIASES, RegionEncoder, resolve_encoder


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _pixels(n, side, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name,grid", [("test_convnext", (2, 2)), ("test_vit", (4, 4))])
def test_tokens_of_a_2x2_region_are_its_subregions_stitched(name, grid):
    enc = RegionEncoder(name, features="tokens", input_px=64).eval()
    assert enc.token_grid == grid and enc.feature_shape(2) == (2 * grid[0], 2 * grid[1], enc.out_dim)
    x = _pixels(3, 128)
    with torch.inference_mode():
        whole = enc(x)
        tl = enc(x[:, :64, :64].contiguous())
        br = enc(x[:, 64:, 64:].contiguous())
    h, w = grid
    assert whole.shape == (3, 2 * h, 2 * w, enc.out_dim)
    assert torch.allclose(whole[:, :h, :w], tl, atol=1e-5)
    assert torch.allclose(whole[:, h:, w:], br, atol=1e-5)


def test_pooled_of_a_2x2_region_is_the_mean():
    enc = RegionEncoder("test_resnet", input_px=64).eval()
    x = _pixels(2, 128, seed=3)
    with torch.inference_mode():
        whole = enc(x)
        parts = torch.stack([enc(x[:, i:i + 64, j:j + 64].contiguous()) for i in (0, 64) for j in (0, 64)])
    assert whole.shape == (2, enc.out_dim)
    assert torch.allclose(whole, parts.mean(0), atol=1e-5)


def test_normalisation_comes_from_the_timm_config():
    enc = RegionEncoder("test_vit", input_px=64)
    import timm

    cfg = timm.data.resolve_data_config({}, model=enc.model)
    x = torch.full((1, 64, 64, 3), 255, dtype=torch.uint8)
    expected = (1.0 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
    assert torch.allclose(enc.normalize(x)[0, :, 0, 0], expected, atol=1e-6)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_weights_from_a_local_file(tmp_path, fmt):
    src = RegionEncoder("test_convnext", input_px=64, seed=7).eval()
    path = tmp_path / f"w.{fmt}"
    sd = {k: v.clone() for k, v in src.model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:  # a training checkpoint with a wrapper and DataParallel prefixes
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    dst = RegionEncoder("test_convnext", weights=path, input_px=64, seed=123).eval()
    x = _pixels(2, 64)
    with torch.inference_mode():
        assert torch.equal(src(x), dst(x))
    assert dst.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert RegionEncoder("test_convnext", input_px=64).weights_sha256 == "random-init:seed=0"


def test_wrong_or_unsafe_weights_are_refused(tmp_path):
    from safetensors.torch import save_file

    vit = RegionEncoder("test_vit", input_px=64)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.model.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match=r"vit.safetensors: weights do not fit encoder 'test_convnext'.*missing"):
        RegionEncoder("test_convnext", weights=path, input_px=64)

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    bad = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(CheckpointError, match="evil.pth: cannot read weights"):
        RegionEncoder("test_convnext", weights=bad, input_px=64)
    with pytest.raises(CheckpointError, match="weights file not found"):
        RegionEncoder("test_convnext", weights=tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth: the weights file is empty"):
        RegionEncoder("test_convnext", weights=tmp_path / "empty.pth", input_px=64)
    (tmp_path / "junk.pth").write_bytes(b"\x80")  # a pickle cut short: an error without a message
    with pytest.raises(CheckpointError, match="junk.pth: cannot read weights"):
        RegionEncoder("test_convnext", weights=tmp_path / "junk.pth", input_px=64)


def test_checkpoints_of_timm_training_and_ema_only_files_load(tmp_path):
    import argparse
    import pathlib

    src = RegionEncoder("test_convnext", input_px=64, seed=7).eval()
    sd = {k: v.clone() for k, v in src.model.state_dict().items()}
    x = _pixels(2, 64)
    # timm's train.py CheckpointSaver: the weights beside an argparse.Namespace of the arguments, an epoch, ...
    saver = tmp_path / "checkpoint-3.pth.tar"
    torch.save({"epoch": 3, "arch": "convnext", "state_dict": sd, "optimizer": {"lr": 0.1},
                "args": argparse.Namespace(lr=0.1, model="test_convnext")}, saver)
    ema = tmp_path / "ema.pth"
    torch.save({"state_dict_ema": sd}, ema)
    with torch.inference_mode():
        want = src(x)
        for path in (saver, ema):
            assert torch.equal(RegionEncoder("test_convnext", weights=path, input_px=64, seed=1).eval()(x), want)
    # any other class is still refused, naming what the file holds
    odd = tmp_path / "odd.pth"
    torch.save({"state_dict": sd, "where": pathlib.PurePosixPath("/runs/3")}, odd)
    with pytest.raises(CheckpointError, match=r"odd.pth: cannot read weights \(UnpicklingError: Unsupported global: "
                                              r"GLOBAL pathlib.PurePosixPath.*\); save the weights alone"):
        RegionEncoder("test_convnext", weights=odd, input_px=64)
    listed = tmp_path / "listed.pth"
    torch.save({"weights": sd, "epoch": 3}, listed)
    with pytest.raises(CheckpointError, match=r"listed.pth: not a state dict of tensors \(top-level keys: weights, "
                                              r"epoch\)"):
        RegionEncoder("test_convnext", weights=listed, input_px=64)


def test_vit_weights_load_at_another_encoder_px(tmp_path):
    """Position embeddings are resampled to the new input size, as timm does for its own pretrained files."""
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    src = RegionEncoder("test_vit", input_px=64, seed=7)
    path = tmp_path / "vit64.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    big = RegionEncoder("test_vit", weights=path, input_px=96).eval()
    assert big.input_px == 96 and big.model.pos_embed.shape != src.model.pos_embed.shape
    npt = src.model.num_prefix_tokens if not getattr(src.model, "no_embed_class", False) else 0
    want = resample_abs_pos_embed(src.model.pos_embed, new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=npt)
    assert torch.allclose(big.model.pos_embed, want)
    # every other weight is the file's
    assert torch.equal(big.model.blocks[0].attn.qkv.weight, src.model.blocks[0].attn.qkv.weight)
    with torch.inference_mode():
        assert big(_pixels(2, 96)).shape == (2, src.out_dim)


def _model_folder(folder, **args):
    """A timm model folder as the Hugging Face hub holds them: config.json (architecture, model_args,
    pretrained_cfg) and model.safetensors."""
    import json

    import timm
    from safetensors.torch import save_file

    folder.mkdir()
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, **args)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "test_vit", "num_features": model.num_features,
        "model_args": {"num_classes": 0, **args, "act_layer": "torch.nn.GELU"},
        "pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "input_size": [3, 64, 64]}}))
    return model


def test_a_timm_model_folder_is_an_encoder_with_its_settings_normalisation_and_weights(tmp_path):
    from xtpath.extract import ExtractConfig
    from xtpath.models.encoders import weights_path

    folder = tmp_path / "my_vit"
    model = _model_folder(folder, img_size=64, init_values=1e-5)  # layer scale: the default test_vit has none
    enc = RegionEncoder(f"local-dir:{folder}").eval()
    assert enc.input_px == 64 and enc.weights_sha256 == hashlib.sha256(
        (folder / "model.safetensors").read_bytes()).hexdigest()
    assert torch.allclose(enc.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]) * 255)
    assert torch.allclose(enc.std.flatten(), torch.tensor([0.4, 0.5, 0.6]) * 255)
    assert torch.equal(enc.model.blocks[0].ls1.gamma, model.blocks[0].ls1.gamma)
    x = _pixels(2, 64)
    norm = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) \
        / torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    with torch.inference_mode():
        assert torch.allclose(enc(x), model.eval()(norm), atol=1e-5)
    # extraction settings take the folder's weights file and record the folder absolute
    cfg = ExtractConfig(encoder=f"local-dir:{folder}")
    assert cfg.weights == str(folder.resolve() / "model.safetensors") and cfg.encoder == f"local-dir:{folder.resolve()}"
    with pytest.raises(InvalidParameterError, match=r"--weights .*my_vit: a timm model folder; give it as --encoder "
                                                    r"local-dir:.*my_vit"):
        weights_path(folder)
    with pytest.raises(InvalidParameterError, match=r"--encoder local-dir:.*nowhere has no config.json"):
        RegionEncoder(f"local-dir:{tmp_path / 'nowhere'}")
    with pytest.raises(InvalidParameterError, match=r"--encoder hf-hub:nobody/nothing: nobody/nothing is not in this "
                                                    r"machine's Hugging Face cache"):
        RegionEncoder("hf-hub:nobody/nothing")
    # the settings of caches made where the folder was: nothing is looked up until something is extracted
    gone = ExtractConfig(encoder="local-dir:/elsewhere/vit", weights=None)
    assert gone.encoder == "local-dir:/elsewhere/vit" and gone.weights is None
    # layer names: classes by (dotted) name; names timm resolves itself pass through
    import timm.layers

    from xtpath.models.encoders import _layer_kwargs

    got = _layer_kwargs({"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU", "norm_layer": "rmsnorm"})
    assert got == {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU, "norm_layer": "rmsnorm"}


def test_unknown_encoder_lists_choices():
    with pytest.raises(InvalidParameterError) as e:
        resolve_encoder("resnet_18")
    msg = str(e.value)
    assert "uni" in msg and "resnet18" in msg and "\n" not in msg


@pytest.mark.parametrize("alias,dim", [("uni", 1024), ("uni2-h", 1536), ("gigapath", 1536), ("h-optimus-0", 1536),
                                       ("virchow2", 1280), ("lunit-vits16", 384), ("kaiko-vitb16", 768)])
def test_foundation_model_aliases_build_offline(alias, dim):
    """Each alias is a valid timm recipe (built on the meta device: no memory, no download)."""
    import timm

    from xtpath.models.encoders import _layer_kwargs

    spec = ALIASES[alias]
    with torch.device("meta"):
        m = timm.create_model(spec.arch, pretrained=False, num_classes=0, img_size=spec.input_px,
                              **_layer_kwargs(spec.kwargs))
    assert m.num_features == dim
    assert sum(p.numel() for p in m.parameters()) > 20e6
