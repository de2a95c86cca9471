"""Region encoders: any timm model, built offline and loaded from a local weights file.

The encoder turns a region's pixels into either one pooled vector or its token grid (the last feature map, as
xT feeds its context encoder: e.g. 8x8 tokens for a 256-px region through Swin). A region made of ``k x k``
encoder inputs (see :mod:`xtpath.tiling`) gives the mean of their vectors, or their token grids stitched into one
``(k*h, k*w, D)`` grid.

Models are built with ``pretrained=False`` (nothing is downloaded) and filled from ``weights`` (safetensors, or a
PyTorch state dict read with ``weights_only=True``). Normalisation and input size come from the model's timm
config, or from the alias of a pathology foundation model (:data:`ALIASES`).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from xtpath.errors import CheckpointError, InvalidParameterError

__all__ = ["ALIASES", "HUB_PREFIXES", "EncoderSpec", "RegionEncoder", "build_region_encoder", "file_sha256",
           "hub_folder", "hub_weights", "resolve_encoder", "weights_path"]

FeatureKind = Literal["pooled", "tokens"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one encoder: a timm architecture and the keyword arguments its weights were trained with.

    Attributes
    ----------
    arch : str
        timm model name.
    kwargs : dict
        Extra ``timm.create_model`` arguments (string values ``"SwiGLUPacked"``/``"SiLU"`` name layers).
    mean, std : tuple or None
        Input normalisation (None: from the timm config).
    input_px : int or None
        Input side (None: from the timm config).
    pooling : {"default", "cls+mean"}
        How the pooled vector is formed: timm's head (``num_classes=0``), or the class token concatenated with
        the mean of the patch tokens (Virchow's recipe).
    doc : str
        Where the recipe comes from.
    """

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    input_px: int | None = None
    pooling: str = "default"
    doc: str = ""


# Pathology foundation models that are plain timm architectures plus a local weights file (recipes from the
# models' cards and official loaders; TRIDENT's loaders agree). Pass the downloaded file with --weights.
_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}
_BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
ALIASES: dict[str, EncoderSpec] = {
    "uni": EncoderSpec(
        "vit_large_patch16_224", {"patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        IMAGENET_MEAN, IMAGENET_STD, 224,
        doc="UNI (MahmoodLab/UNI): ViT-L/16, 1024-d class token; weights pytorch_model.bin"),
    "uni2-h": EncoderSpec(
        "vit_giant_patch14_224",
        {"patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
         "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True, **_SWIGLU},
        IMAGENET_MEAN, IMAGENET_STD, 224,
        doc="UNI2-h (MahmoodLab/UNI2-h): ViT-H/14 with 8 registers, 1536-d class token; weights pytorch_model.bin"),
    "gigapath": EncoderSpec(
        "vit_giant_patch14_dinov2",
        {"in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24, "init_values": 1e-5,
         "mlp_ratio": 5.33334},
        IMAGENET_MEAN, IMAGENET_STD, 224,
        doc="Prov-GigaPath tile encoder (prov-gigapath/prov-gigapath): ViT-g/16, 1536-d; weights pytorch_model.bin"),
    "h-optimus-0": EncoderSpec(
        "vit_giant_patch14_reg4_dinov2", {"init_values": 1e-5, "global_pool": "token", "dynamic_img_size": False},
        *_BIOPTIMUS, 224,
        doc="H-optimus-0 (bioptimus): ViT-g/14 with 4 registers, 1536-d; 224-px tiles at 0.5 µm/px"),
    "h-optimus-1": EncoderSpec(
        "vit_giant_patch14_reg4_dinov2", {"init_values": 1e-5, "global_pool": "token", "dynamic_img_size": False},
        *_BIOPTIMUS, 224,
        doc="H-optimus-1 (bioptimus): as H-optimus-0"),
    "virchow2": EncoderSpec(
        "vit_huge_patch14_224",
        {"init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
         **_SWIGLU},
        IMAGENET_MEAN, IMAGENET_STD, 224, pooling="cls+mean",
        doc="Virchow2 (paige-ai): ViT-H/14 with 4 registers; class token + mean patch token, 2560-d"),
    "lunit-vits16": EncoderSpec(
        "vit_small_patch16_224", {}, (0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464),
        224, doc="Lunit DINO ViT-S/16 (lunit-io/benchmark-ssl-pathology): 384-d; dino_vit_small_patch16_ep200.torch"),
    "kaiko-vits16": EncoderSpec(
        "vit_small_patch16_224", {"dynamic_img_size": True}, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224,
        doc="kaiko.ai ViT-S/16 (kaiko-ai/towards_large_pathology_fms): 384-d; vits16.pth"),
    "kaiko-vitb16": EncoderSpec(
        "vit_base_patch16_224", {"dynamic_img_size": True}, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224,
        doc="kaiko.ai ViT-B/16: 768-d; vitb16.pth"),
}


#: Encoder names of timm model folders (``config.json`` + weights), as ``timm.create_model`` takes them
HUB_PREFIXES = ("local-dir:", "hf-hub:")
_HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def hub_folder(name: str) -> Path | None:
    """The folder of a timm model-folder encoder name, or ``None`` for other names: ``local-dir:FOLDER``, or
    ``hf-hub:ORG/NAME`` found in the local Hugging Face cache (nothing is downloaded).

    Raises
    ------
    InvalidParameterError
        No such folder, no ``config.json`` in it, or the model is not in the local Hugging Face cache.
    """
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):]).expanduser()
    elif name.startswith("hf-hub:"):
        repo = name[len("hf-hub:"):].split("@")[0]
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(repo, local_files_only=True))
        except Exception as e:  # not cached, no huggingface_hub, a malformed name
            raise InvalidParameterError(
                f"--encoder {name}: {repo} is not in this machine's Hugging Face cache ({type(e).__name__}); "
                f"download it once where there is internet (huggingface-cli download {repo}) or give the model's "
                "folder as --encoder local-dir:FOLDER") from e
    else:
        return None
    if not (folder / "config.json").is_file():
        raise InvalidParameterError(f"--encoder {name}: {folder} has no config.json; a timm model folder holds "
                                    "config.json and model.safetensors (or pytorch_model.bin)")
    return folder.resolve()


def hub_weights(name: str) -> Path | None:
    """The weights file of a timm model-folder encoder name (``None`` for other names)."""
    folder = hub_folder(name)
    if folder is None:
        return None
    for f in _HUB_WEIGHTS:
        if (folder / f).is_file():
            return folder / f
    raise InvalidParameterError(f"--encoder {name}: {folder} holds no {' or '.join(_HUB_WEIGHTS)}")


def _hub_spec(name: str, folder: Path) -> EncoderSpec:
    """A timm model folder's architecture, its ``model_args`` and its ``pretrained_cfg`` normalisation and size."""
    import json

    import timm

    where = folder / "config.json"
    try:
        cfg = json.loads(where.read_text())
    except (OSError, ValueError) as e:
        raise InvalidParameterError(f"{where}: not a readable JSON file ({e})") from e
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise InvalidParameterError(f"{where}: architecture {arch!r} is not a timm model of this timm "
                                    f"({timm.__version__}); --encoder {name} needs a timm model folder")
    args = {k: v for k, v in (cfg.get("model_args") or {}).items() if k not in ("num_classes", "pretrained_cfg")}
    pc = cfg.get("pretrained_cfg") or {}
    px = args.pop("img_size", None) or (pc.get("input_size") or [None])[-1]
    mean, std = pc.get("mean"), pc.get("std")
    return EncoderSpec(arch, args, tuple(mean) if mean else None, tuple(std) if std else None,
                       int(px if not isinstance(px, (list, tuple)) else px[-1]) if px else None,
                       doc=f"timm model folder {folder}")


def resolve_encoder(name: str) -> EncoderSpec:
    """The :class:`EncoderSpec` of an alias, a timm model name or a timm model folder (:data:`HUB_PREFIXES`).

    Raises
    ------
    InvalidParameterError
        Unknown name; the message lists the aliases and the closest timm names.
    """
    import timm

    key = name.lower()
    if key in ALIASES:
        return ALIASES[key]
    folder = hub_folder(name)
    if folder is not None:
        return _hub_spec(name, folder)
    if timm.is_model(name):
        return EncoderSpec(name)
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close timm names: {', '.join(close)}" if close else ""
    raise InvalidParameterError(f"encoder {name!r} is neither an alias ({', '.join(sorted(ALIASES))}), a timm "
                                f"model (see timm.list_models()) nor a timm model folder (local-dir:FOLDER, "
                                f"hf-hub:ORG/NAME){hint}")


_HASH_CACHE: dict[tuple[str, int, float], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file (remembered per path, size and modification time)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def _layer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    import timm.layers

    out = dict(kwargs)
    for k in ("mlp_layer", "act_layer", "norm_layer"):
        v = out.get(k)
        if isinstance(v, str):  # "SwiGLUPacked", or a model folder's "timm.layers.SwiGLUPacked", "torch.nn.SiLU"
            last = v.rsplit(".", 1)[-1]
            layer = getattr(timm.layers, last, None) or getattr(nn, last, None)
            if layer is not None:
                out[k] = layer  # otherwise a name timm resolves itself ("rmsnorm", "gelu")
    return out


def random_weights_note(encoder: str) -> str:
    """What is said when an encoder runs without ``--weights`` (extract, train, the end2end encoder)."""
    return (f"no --weights: {encoder} is randomly initialised; its features mean nothing outside tests and "
            "demos")


def weights_path(path: str | os.PathLike[str]) -> Path:
    """A ``--weights`` file as an absolute path, checked before any work starts (runs record where it is)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            raise InvalidParameterError(f"--weights {path}: a timm model folder; give it as --encoder "
                                        f"local-dir:{p} (its config.json names the architecture, its settings and "
                                        "normalisation) and leave out --weights")
        raise InvalidParameterError(f"--weights {path}: a folder, not a file; give the weights file inside it "
                                    "(.safetensors or a PyTorch state dict)")
    if not p.is_file():
        raise InvalidParameterError(f"--weights {path}: no such file; give the region encoder's weights "
                                    "(safetensors or a PyTorch state dict)")
    return p.resolve()


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a PyTorch file (``weights_only=True``: no pickled code runs)."""
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p}: a folder, not a weights file; give --weights the .safetensors/.pth/.bin file "
                              "inside it")
    if not p.is_file():
        raise CheckpointError(f"{p}: weights file not found; give --weights a local .safetensors/.pth/.bin file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: the weights file is empty (an interrupted download or copy?); get it again")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p))
        else:
            import argparse

            # timm's train.py (and DINO, DeiT) save their arguments as an argparse.Namespace beside the weights:
            # plain data, allowed; any other class is still refused by weights_only=True
            allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
            with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
                sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch's message has terminal bold codes
        found = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
        why = found.group(0) if found else (text.splitlines() or [""])[0].strip()
        raise CheckpointError(f"{p}: cannot read weights ({type(e).__name__}: {why[:200]}); save the weights "
                              "alone, e.g. safetensors.torch.save_file(model.state_dict(), 'w.safetensors'), on a "
                              "machine where the file can be trusted") from e
    # checkpoints: the weights under one key (timm's EMA weights only when there are no others)
    for key in ("state_dict", "model", "teacher", "module", "state_dict_ema", "model_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        found = f"top-level keys: {', '.join(map(str, list(sd)[:8]))}" if isinstance(sd, dict) else type(sd).__name__
        raise CheckpointError(f"{p}: not a state dict of tensors ({found}); save the model's state_dict() alone")
    return sd


_HEAD = ("head.", "fc.", "classifier.", "head_dist.")


def _misfits(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """Missing, unexpected (heads aside) and other-shaped keys of ``sd`` for a model whose state is ``own``."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not k.startswith(_HEAD)]
    shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, shape


def _timm_filtered(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """``sd`` through the ``checkpoint_filter_fn`` of the model's timm module, which timm applies to its own
    pretrained files: it resamples position embeddings and relative-position tables to this model's input size
    (weights trained at 224 px for a 256-px ``--encoder-px``) and converts the original repositories' layouts.
    ``None`` when the module has none or it fails on these weights."""
    import importlib

    fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return None
    try:
        return dict(fn(dict(sd), model))
    except Exception:  # noqa: BLE001 - a filter written for other layouts; the plain mismatch is reported
        return None


def _fit_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, name: str) -> None:
    own = model.state_dict()
    for prefix in ("", "module.", "model.", "backbone.", "encoder.", "trunk."):
        cand = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} if prefix else sd
        if cand and sum(k in own for k in cand) >= 0.5 * len(own):
            sd = cand
            break
    missing, unexpected, shape = _misfits(own, sd)
    if missing or unexpected or shape:
        filtered = _timm_filtered(model, sd)
        if filtered is not None and not any(_misfits(own, filtered)):
            sd, missing, unexpected, shape = filtered, [], [], []
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shape:
            parts.append(f"{len(shape)} of other shape (e.g. {shape[0]}: {tuple(sd[shape[0]].shape)} vs "
                         f"{tuple(own[shape[0]].shape)})")
        sized = [k for k in shape if "pos_embed" in k or "relative_position" in k or "patch_embed" in k]
        hint = (" (these depend on the input size: give --encoder-px the size the weights were trained at)"
                if sized and len(sized) == len(shape) and not missing and not unexpected else "")
        raise CheckpointError(f"{path}: weights do not fit encoder {name!r}: {'; '.join(parts)}{hint}; check "
                              "--encoder (and the alias's kwargs) against the model the weights came from")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True)


class RegionEncoder(nn.Module):
    """A timm model that maps uint8 region pixels to a pooled vector or a token grid.

    Parameters
    ----------
    name : str
        timm model name or alias (see :data:`ALIASES`).
    weights : path, optional
        Local weights. Without weights the model is randomly initialised with a fixed seed (only useful for tests
        and demos; a warning says so).
    features : {"pooled", "tokens"}
    input_px : int, optional
        Encoder input side in pixels (default: the model's).
    seed : int
        Seed of the random initialisation when ``weights`` is None.

    Attributes
    ----------
    input_px : int
    out_dim : int
    token_grid : (int, int) or None
        Tokens per input side, for ``features="tokens"``.
    weights_sha256 : str
        Hash of the weights file, or ``"random-init:seed=<seed>"``.
    """

    def __init__(self, name: str, weights: str | os.PathLike[str] | None = None, *,
                 features: FeatureKind = "pooled", input_px: int | None = None, seed: int = 0) -> None:
        super().__init__()
        import timm

        if features not in ("pooled", "tokens"):
            raise InvalidParameterError(f"features={features!r}: use 'pooled' or 'tokens'")
        spec = resolve_encoder(name)
        self.name, self.spec, self.features = name, spec, features
        kwargs = _layer_kwargs(spec.kwargs)
        px = input_px or spec.input_px
        if px is not None:
            kwargs["img_size"] = px
        devnull = torch.random.fork_rng(devices=[])
        with devnull:
            torch.manual_seed(seed)
            try:
                model = timm.create_model(spec.arch, pretrained=False, num_classes=0, **kwargs)
            except TypeError:  # convolutional models take any input size and have no img_size argument
                kwargs.pop("img_size", None)
                model = timm.create_model(spec.arch, pretrained=False, num_classes=0, **kwargs)
        cfg = timm.data.resolve_data_config({}, model=model)
        self.input_px = int(px or cfg["input_size"][-1])
        mean = spec.mean or tuple(cfg["mean"])
        std = spec.std or tuple(cfg["std"])
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0,
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0,
                             persistent=False)
        if weights is None:
            weights = hub_weights(name)  # a timm model folder brings its own
        if weights is not None:
            wpath = Path(weights)
            _fit_state_dict(model, load_state_dict_file(wpath), wpath, name)
            self.weights_sha256 = file_sha256(wpath)
            self.weights_path: Path | None = wpath
        else:
            self.weights_sha256 = f"random-init:seed={seed}"
            self.weights_path = None
            warnings.warn(random_weights_note(name), UserWarning, stacklevel=2)
        self.model = model.eval()
        self._token_mode = "features"
        try:
            with torch.no_grad():
                probe = self._encode(torch.zeros(1, 3, self.input_px, self.input_px))
        except (RuntimeError, ValueError, AssertionError) as e:
            first = (str(e).splitlines() or [""])[0]
            raise InvalidParameterError(
                f"--encoder-px {self.input_px}: encoder {name!r} cannot take {self.input_px}-px inputs "
                f"({type(e).__name__}: {first[:160]}); use a larger --encoder-px (its default is "
                f"{int(cfg['input_size'][-1])})") from e
        if features == "tokens":
            self.out_dim = int(probe.shape[-1])
            self.token_grid: tuple[int, int] | None = (int(probe.shape[1]), int(probe.shape[2]))
        else:
            self.out_dim = int(probe.shape[-1])
            self.token_grid = None

    # -- core ---------------------------------------------------------------------------------------------------
    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, h, w, D) last feature map."""
        m = self.model
        if self._token_mode == "features":
            f = m.forward_features(x)
            if f.ndim == 4:
                return f if getattr(m, "output_fmt", "NCHW") == "NHWC" else f.permute(0, 2, 3, 1)
            self._token_mode = "intermediates"
        # token sequences (ViT, Hiera): let timm drop prefix tokens and restore the 2-D layout
        for norm in (True, False):
            try:
                inter = m.forward_intermediates(x, indices=1, norm=norm, output_fmt="NCHW", intermediates_only=True)
                return inter[-1].permute(0, 2, 3, 1)
            except (AssertionError, TypeError, NotImplementedError):
                continue
        raise InvalidParameterError(f"encoder {self.name!r} gives no 2-D token grid; use features='pooled'")

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.pooling == "cls+mean":
            f = self.model.forward_features(x)
            n = int(getattr(self.model, "num_prefix_tokens", 1))
            return torch.cat([f[:, 0], f[:, n:].mean(dim=1)], dim=-1)
        return self.model(x)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._tokens(x) if self.features == "tokens" else self._pooled(x)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` (or float 0..255 ``(B, 3, H, W)``) -> normalised float ``(B, 3, H, W)``."""
        if pixels.ndim == 4 and pixels.shape[-1] == 3 and pixels.shape[1] != 3:
            pixels = pixels.permute(0, 3, 1, 2)
        x = pixels.to(dtype=self.mean.dtype)
        return (x - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode regions.

        Parameters
        ----------
        pixels : (B, S, S, 3) uint8 tensor
            Whole regions, ``S = k * input_px`` (``k >= 1`` sub-regions per side).

        Returns
        -------
        (B, D) pooled vectors, or (B, k*h, k*w, D) token grids.
        """
        if pixels.ndim == 4 and pixels.shape[-1] == 3:
            pixels = pixels.permute(0, 3, 1, 2)
        B, _, H, W = pixels.shape
        px = self.input_px
        if H % px or W % px or H != W:
            raise InvalidParameterError(f"region of {W}x{H} px is not k x k inputs of {px} px for {self.name!r}")
        k = H // px
        x = self.normalize(pixels)
        if k > 1:  # (B, 3, k*px, k*px) -> (B*k*k, 3, px, px), row-major sub-regions
            x = x.reshape(B, 3, k, px, k, px).permute(0, 2, 4, 1, 3, 5).reshape(B * k * k, 3, px, px)
        if x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._encode(x)
        if k == 1:
            return out
        if self.features == "pooled":
            return out.reshape(B, k * k, -1).mean(dim=1)
        h, w, D = out.shape[1:]
        return out.reshape(B, k, k, h, w, D).permute(0, 1, 3, 2, 4, 5).reshape(B, k * h, k * w, D)

    def feature_shape(self, k: int = 1) -> tuple[int, ...]:
        """Shape of one region's features for ``k x k`` sub-regions."""
        if self.features == "pooled":
            return (self.out_dim,)
        assert self.token_grid is not None
        return (k * self.token_grid[0], k * self.token_grid[1], self.out_dim)

    def settings(self) -> dict[str, Any]:
        """What identifies this encoder's features in a cache."""
        return {"encoder": self.name, "weights_sha256": self.weights_sha256, "features_kind": self.features,
                "encoder_px": self.input_px}


def build_region_encoder(name: str, weights: str | os.PathLike[str] | None = None, *,
                         features: FeatureKind = "pooled", input_px: int | None = None,
                         device: str | torch.device = "cpu", seed: int = 0) -> RegionEncoder:
    """Build a :class:`RegionEncoder` in eval mode on ``device``."""
    enc = RegionEncoder(name, weights, features=features, input_px=input_px, seed=seed)
    return enc.to(device).eval()
