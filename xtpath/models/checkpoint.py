"""Save and load an :class:`XTModel`: safetensors weights + JSON config, no pickle.

A checkpoint is a folder with ``model.safetensors`` (the state dict) and ``model.json``
(``{"format": "xtpath-model", "version": 1, "config": XTConfig.to_dict()}``). Each file is written to a
temporary name in the same folder and moved into place with ``os.replace``, so a reader never sees half a
file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from xtpath.errors import CheckpointError, InvalidParameterError
from xtpath.models.config import XTConfig
from xtpath.models.xt import XTModel

__all__ = ["save_model", "load_model", "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT", "FORMAT_VERSION"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.json"
FORMAT = "xtpath-model"
FORMAT_VERSION = 1


def _atomic_write(path: Path, write: Any) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then move it into place with the usual permissions."""
    from xtpath.io.files import atomic_path

    with atomic_path(path) as tmp:
        write(str(tmp))


def save_model(model: XTModel, folder: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/model.json`` (folder created if needed).

    Parameters
    ----------
    model : XTModel
        The model; weights are saved from CPU copies, contiguous.
    folder : str or PathLike
        Checkpoint folder.
    metadata : dict, optional
        Extra JSON-serialisable information stored under ``"metadata"`` in ``model.json``.

    Returns
    -------
    Path
        The folder.
    """
    if not isinstance(model, XTModel):
        raise InvalidParameterError(f"save_model needs an XTModel, got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.cfg.to_dict(),
           "metadata": metadata or {}}
    text = json.dumps(doc, indent=2)
    _atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": FORMAT}))
    _atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return folder


def read_config(folder: str | os.PathLike) -> XTConfig:
    """The :class:`XTConfig` stored in ``folder/model.json``.

    Raises
    ------
    CheckpointError
        If the file is missing, not JSON, not an xtpath model config, or has invalid settings.
    """
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no model config; pass the folder written by save_model "
                              f"(it holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable model config ({exc}); save the model again") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an xtpath model config (format != {FORMAT!r}); pass a folder "
                              "written by save_model")
    if doc.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {doc.get('version')!r}, this xtpath reads "
                              f"version {FORMAT_VERSION}; upgrade xtpath or save the model again")
    try:
        return XTConfig.from_dict(doc.get("config"))
    except (InvalidParameterError, TypeError) as exc:
        raise CheckpointError(f"{path}: invalid model config ({exc}); save the model again with this "
                              "xtpath version") from exc


def load_model(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> XTModel:
    """Rebuild an :class:`XTModel` from a :func:`save_model` folder (no pickle involved).

    Parameters
    ----------
    folder : str or PathLike
        Checkpoint folder.
    map_location : str or torch.device
        Device for the weights and the model.

    Returns
    -------
    XTModel
        In eval mode.

    Raises
    ------
    CheckpointError
        If a file is missing or unreadable, or the weights do not match the config; the message names
        the path and the fix.
    """
    folder = Path(folder)
    cfg = read_config(folder)
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no weights file; pass the folder written by save_model")
    device = torch.device(map_location)
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors weights ({exc}); save the model "
                              "again") from exc
    model = XTModel(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
        raise CheckpointError(f"{path}: weights do not match {CONFIG_NAME} ({'; '.join(parts)}); the two "
                              "files come from different models, save the model again")
    model.load_state_dict(state)
    return model.to(device).eval()
