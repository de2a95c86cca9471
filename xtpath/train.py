"""``xtpath train``: slide classification or segmentation on the feature cache, or end to end through the encoder.

One run folder holds everything a person or ``xtpath score`` needs:

    RUN_DIR/config.yaml            resolved settings (CLI + YAML + defaults)
    RUN_DIR/classes.json           class names in index order
    RUN_DIR/splits.csv             each slide's part (train/val/test) in every split or fold
    RUN_DIR/extract.json           region encoder settings (score uses them to build missing caches)
    RUN_DIR/model.safetensors      best model (by the validation metric) + model.json (its config)
    RUN_DIR/last/state.pt          last epoch: model, optimizer, scheduler, RNG (loaded with weights_only=True)
    RUN_DIR/metrics.csv            one row per epoch
    RUN_DIR/report.json, *.png     test metrics, predictions, loss curves, ROC curves, confusion matrix
    RUN_DIR/fold<k>/...            the same per fold with --folds K (RUN_DIR/report.json then aggregates, and
                                   RUN_DIR/predictions.csv holds each slide from the fold that tested it)

Determinism: every random draw of an epoch (slide order, grid symmetries, dropout) is seeded from
``(seed, epoch)``, so ``--resume`` after a kill reproduces an uninterrupted run on CPU, and a DDP run draws the
same as a single process.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xtpath.cache import cache_path, load_features, same_setting
from xtpath.data import (
    IGNORE_INDEX,
    CachedSlides,
    SlideItem,
    Split,
    check_folds,
    class_names_from_masks,
    make_splits,
    region_class_weights,
    region_targets,
)
from xtpath.errors import CacheError, CheckpointError, InvalidParameterError, ManifestError
from xtpath.io import SlideRow, read_slides_csv
from xtpath.io.files import atomic_path, write_json, write_text
from xtpath.metrics import (
    classification_metrics,
    jsonable,
    roc_and_confusion_plots,
    save_figure,
    segmentation_metrics,
    segmentation_plot,
)
from xtpath.stop import check_stop

__all__ = ["TrainConfig", "classification_metrics", "evaluate", "load_config", "segmentation_metrics", "train"]

TASKS = ("classification", "segmentation")
MODES = ("cached", "end2end")
MONITORS = {"classification": ("auto", "auc", "balanced_accuracy", "accuracy", "f1", "loss"),
            "segmentation": ("auto", "dice", "iou", "accuracy", "loss")}


@dataclass
class TrainConfig:
    """Settings of a training run; every field can come from the YAML ``--config`` or a CLI option."""

    task: str = "classification"
    """``classification`` (one label per slide) or ``segmentation`` (a mask per slide: region label maps)."""
    mode: str = "cached"
    """``cached``: train the context model on cached region features; ``end2end``: train the encoder too."""
    context: str = "mamba"
    """Context encoder: mamba, transformer, abmil or mean."""
    context_options: dict = field(default_factory=dict)
    """Extra ContextConfig fields (d_model, n_layers, scan, ...)."""
    head_options: dict = field(default_factory=dict)
    """Extra HeadConfig fields."""
    encoder: str | None = None
    """Region encoder (timm name or alias); default: whatever the existing caches were made with."""
    weights: str | None = None
    """Region encoder weights file."""
    features: str = "pooled"
    """Cached feature kind when caches are built: pooled or tokens."""
    target_mpp: float | None = None
    """Microns per pixel of the regions (default: the existing caches'; 0.5 when caches are built)."""
    region_px: int | None = None
    """Region side in pixels (default: the existing caches'; 256 when caches are built)."""
    encoder_px: int | None = None
    """Encoder input side (default: the model's)."""
    min_tissue: float = 0.25
    """Smallest tissue fraction of a region."""
    tissue_preset: str = "default"
    """Tissue detector preset."""
    cache: str | None = None
    """Feature cache folder (default: RUN_DIR/cache)."""
    epochs: int = 20
    """Maximum number of epochs."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    warmup_epochs: float = 1.0
    """Linear warm-up length, then a cosine decay to 1% of ``lr``."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables)."""
    accumulate: int = 4
    """Slides per optimizer step (gradient accumulation; across all processes under DDP)."""
    class_weights: bool = True
    """Weight the loss by inverse class frequency."""
    balanced_sampling: bool = False
    """Draw training slides with equal probability per class instead of weighting the loss."""
    amp: bool = True
    """Mixed precision (bf16/fp16) on GPU; ignored on CPU."""
    patience: int = 8
    """Early stopping: epochs without improvement of the validation metric."""
    monitor: str = "auto"
    """Validation metric: auc, balanced_accuracy, accuracy, f1, loss, dice (auto: auc or dice)."""
    folds: int = 0
    """K-fold cross-validation over cases (0: one split)."""
    val_fraction: float = 0.2
    """Validation share when the CSV gives no split."""
    test_fraction: float = 0.2
    """Test share when the CSV gives no split."""
    augment: bool = True
    """Random flips, transposes and 90° rotations of the region grid (and pixels in end2end)."""
    stain_augment: bool = False
    """end2end: random haematoxylin/eosin intensity jitter of the region pixels."""
    seed: int = 0
    """Seed of every random draw."""
    device: str = "auto"
    """auto, cpu or cuda[:N]."""
    e2e_chunk: int = 16
    """end2end: regions per encoder chunk (peak memory does not grow with the slide)."""
    e2e_backprop: str = "bounded"
    """end2end: bounded (exact gradient, chunked re-computation) or full (plain backprop, memory grows)."""
    num_workers: int = 0
    """end2end: reader processes per slide."""
    classes: list = field(default_factory=list)
    """Class names in index order (default: sorted labels; segmentation: background + mask classes)."""


def load_config(path: str | os.PathLike[str] | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults <- YAML file <- CLI overrides (``None`` values are not overrides)."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InvalidParameterError(f"--config {p}: no such file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise InvalidParameterError(f"--config {p}: not valid YAML ({str(e).splitlines()[0]})") from e
        if not isinstance(data, dict):
            raise InvalidParameterError(f"--config {p}: expected a mapping of option: value")
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InvalidParameterError(f"--config {path}: unknown option(s) {', '.join(unknown)}; valid: "
                                    f"{', '.join(sorted(names))}")
    defaults = TrainConfig()
    for k in list(data):
        data[k] = _config_value(path, k, data[k], getattr(defaults, k))
    from_yaml = set(data)
    data.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**data)
    cfg._given = frozenset(data)  # type: ignore[attr-defined]  # what --resume must not replace by the run's own
    _check_model_options(path, cfg)
    try:
        _check_values(cfg)
    except InvalidParameterError as e:  # name the YAML file when the value came from it
        name = str(e).split("=", 1)[0]
        if path is not None and name in from_yaml and overrides.get(name) is None:
            raise InvalidParameterError(f"--config {path}: {e}") from None
        raise
    if cfg.cache is not None:
        cfg.cache = str(Path(cfg.cache).expanduser().resolve())  # config.yaml records where the features are
    if cfg.weights is not None:
        from xtpath.models.encoders import weights_path

        cfg.weights = str(weights_path(cfg.weights))  # recorded absolute: the run is scored from anywhere
    return cfg


def _check_values(cfg: TrainConfig) -> None:
    """Each setting's allowed values (one line naming the setting and an example)."""
    if cfg.task not in TASKS:
        raise InvalidParameterError(f"task={cfg.task!r}: use one of {', '.join(TASKS)}")
    monitors = MONITORS[cfg.task]
    if cfg.monitor not in monitors:
        raise InvalidParameterError(f"monitor={cfg.monitor!r}: for {cfg.task} use one of {', '.join(monitors)}")
    if cfg.features not in ("pooled", "tokens"):
        raise InvalidParameterError(f"features={cfg.features!r}: use pooled (one vector per region) or tokens "
                                    "(a token grid per region)")
    if not (isinstance(cfg.classes, list) and all(isinstance(c, str) and c.strip() for c in cfg.classes)):
        raise InvalidParameterError(f"classes={cfg.classes!r}: expected a list of class names in index order, "
                                    "e.g. classes: [background, tumour, stroma]")
    if cfg.mode not in MODES:
        raise InvalidParameterError(f"mode={cfg.mode!r}: use one of {', '.join(MODES)}")
    if cfg.e2e_backprop not in ("bounded", "full"):
        raise InvalidParameterError(f"e2e_backprop={cfg.e2e_backprop!r}: use bounded or full")
    if not 0 <= int(cfg.seed) < 2**32:
        raise InvalidParameterError(f"seed={cfg.seed!r} must be a whole number from 0 to 2**32 - 1")
    for name in ("epochs", "accumulate", "e2e_chunk", "patience"):
        if int(getattr(cfg, name)) < 1:
            raise InvalidParameterError(f"{name}={getattr(cfg, name)!r} must be at least 1")
    for name in ("region_px", "encoder_px"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1
                                  or value != int(value)):
            raise InvalidParameterError(f"{name}={value!r} must be a positive whole number of pixels (e.g. "
                                        f"--{name.replace('_', '-')} 256)")
    if not 0 <= float(cfg.min_tissue) <= 1:
        raise InvalidParameterError(f"min_tissue={cfg.min_tissue!r} must be a fraction from 0 to 1 (e.g. 0.25)")
    if float(cfg.warmup_epochs) < 0:
        raise InvalidParameterError(f"warmup_epochs={cfg.warmup_epochs!r} must be 0 or more")
    for name, example in (("lr", "2e-4"), ("target_mpp", "0.5")):
        value = getattr(cfg, name)
        if value is None:
            continue
        try:
            ok = math.isfinite(float(value)) and float(value) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InvalidParameterError(f"{name}={value!r} must be a positive number (e.g. "
                                        f"--{name.replace('_', '-')} {example})")
    for name in ("weight_decay", "grad_clip"):
        if float(getattr(cfg, name)) < 0:
            raise InvalidParameterError(f"{name}={getattr(cfg, name)!r} must be 0 or more")
    for name in ("val_fraction", "test_fraction"):
        if not 0 <= float(getattr(cfg, name)) < 1:
            raise InvalidParameterError(f"{name}={getattr(cfg, name)!r} must be at least 0 and below 1")
    check_folds(int(cfg.folds))


def _check_model_options(path: Any, cfg: TrainConfig) -> None:
    """``context_options`` and ``head_options``: known names, values of each field's type, values the model
    accepts (its own range checks), each problem as one line naming the option."""
    from xtpath.models.config import ContextConfig, HeadConfig

    for name, kind, example in (("context_options", ContextConfig, "{d_model: 256, n_layers: 4}"),
                                ("head_options", HeadConfig, "{upsample: 4}")):
        opts = getattr(cfg, name)
        if not isinstance(opts, dict):
            raise InvalidParameterError(f"{name}={opts!r}: expected a mapping, e.g. {example}")
        known = {f.name: f for f in fields(kind) if f.name != "name"}
        bad = sorted(map(str, set(opts) - set(known)))
        if bad:
            raise InvalidParameterError(f"{name}: unknown option(s) {', '.join(bad)}; valid: "
                                        f"{', '.join(sorted(known))}")
        defaults = kind()
        for k in list(opts):
            opts[k] = _config_value(path, f"{name}.{k}", opts[k], _typed_default(defaults, known[k]))
        kind(**({"name": cfg.context} if kind is ContextConfig else {}), **opts)  # its own range checks


def _typed_default(obj: Any, f: Any) -> Any:
    """A field's default, or for an optional number (``int | None``) a number of its type to check against."""
    value = getattr(obj, f.name)
    if value is None:
        t = str(f.type)
        return 0 if t.startswith("int") else 0.0 if t.startswith("float") else None
    return value


def _config_value(path: Any, name: str, value: Any, default: Any) -> Any:
    """A YAML value of the type of the option's default (whole numbers for counts, numbers for rates, true or
    false for switches); a one-line error naming the option otherwise."""
    if value is None or default is None or isinstance(default, (str, list, dict)):
        return value
    kind = "true or false" if isinstance(default, bool) else "a whole number" if isinstance(default, int) \
        else "a number"
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
        elif not isinstance(value, bool):
            number = float(value)
            if not isinstance(default, int):
                return number
            if number == int(number):
                return int(number)
    except (TypeError, ValueError, OverflowError):
        pass
    raise InvalidParameterError(f"--config {path}: {name}: {value!r} is not {kind} (e.g. {name}: "
                                f"{str(default).lower() if isinstance(default, bool) else default})")


# -- helpers --------------------------------------------------------------------------------------------------

def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidParameterError(f"--device {spec}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError(f"--device {spec}: CUDA is not available here; use --device cpu")
    return dev


def _seed_all(*key: int) -> None:
    import random

    s = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    torch.manual_seed(s)
    random.seed(s)


def _autocast(device: torch.device, enabled: bool) -> Any:
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return contextlib.nullcontext()


class _Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), a single process otherwise."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0])
        torch.distributed.broadcast(t, 0)
        return bool(t.item())

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# -- preparation ----------------------------------------------------------------------------------------------

@dataclass
class _Prepared:
    rows: list[SlideRow]
    classes: list[str]
    labels: list[int] | None
    files: list[Path]
    splits: list[Split]
    in_shape: tuple[int, ...]
    enc_settings: dict[str, Any]


def _class_map(rows: Sequence[SlideRow], cfg: TrainConfig) -> tuple[list[str], list[int] | None]:
    if cfg.task == "segmentation":
        images = [r for r in rows if r.mask is not None and r.mask.suffix.lower() not in (".geojson", ".json")]
        if images and not cfg.classes:
            raise InvalidParameterError(
                f"{images[0].where}: mask {images[0].mask.name} is a label image, whose values have no names; "
                "list the classes in the --config YAML in label order, e.g. classes: [background, tumour, "
                "stroma] (value 0 is background)")
        classes = list(cfg.classes) or class_names_from_masks(rows)
        return classes, None
    found = sorted({r.label for r in rows if r.label is not None})
    if not cfg.classes:
        _check_label_spellings(rows, found)
    classes = list(cfg.classes) or found
    index = {c: i for i, c in enumerate(classes)}
    bad = [f"{r.where}: label {r.label!r} is not in the class map ({', '.join(classes)})"
           for r in rows if r.label not in index]
    if bad:
        raise ManifestError("\n".join(bad))
    if len(classes) < 2:
        raise ManifestError(f"classification needs at least two classes; the CSV has {classes}")
    return classes, [index[r.label] for r in rows]  # type: ignore[index]


def _label_key(label: str) -> str:
    try:
        return repr(float(label))  # 1, 1.0 and 01 are one number
    except ValueError:
        return " ".join(label.split()).casefold()


def _check_label_spellings(rows: Sequence[SlideRow], found: Sequence[str]) -> None:
    """Labels that differ only in case, spaces or number format would silently be classes of their own."""
    groups: dict[str, list[str]] = {}
    for lab in found:
        groups.setdefault(_label_key(lab), []).append(lab)
    clashes = [g for g in groups.values() if len(g) > 1]
    if clashes:
        first = {lab: next(r.where for r in rows if r.label == lab) for g in clashes for lab in g}
        text = "; ".join(" vs ".join(f"{lab!r} ({first[lab]})" for lab in g) for g in clashes)
        raise ManifestError(f"labels that differ only in case, spaces or number format: {text}; write each class "
                            "the same way (or list the classes in the --config YAML to keep them apart)")


def _prepare(csv_path: Path, cfg: TrainConfig, run_dir: Path, progress: Callable[[str], None]) -> _Prepared:
    from xtpath.extract import ExtractConfig, config_of_cache, encoder_settings

    need = {"require_labels": cfg.task == "classification", "require_masks": cfg.task == "segmentation"}
    try:
        rows = read_slides_csv(csv_path, **need)
    except ManifestError as e:  # with only missing files wrong, say what is wrong with the labels too: all at once
        try:
            loose = read_slides_csv(csv_path, check_files=False, **need)
        except ManifestError:
            raise e from None
        try:
            _class_map(loose, cfg)
        except ManifestError as labels_wrong:
            raise ManifestError(f"{e}\n{labels_wrong}") from None
        raise
    classes, labels = _class_map(rows, cfg)
    by_path: dict[str, list[SlideRow]] = {}
    for r in rows:
        by_path.setdefault(str(Path(r.path).resolve()), []).append(r)
    for path, same in by_path.items():
        if len(same) > 1:
            where = ", ".join(r.where for r in same[:3]) + (", ..." if len(same) > 3 else "")
            progress(f"warning: {path} is listed {len(same)} times ({where}): one slide in two rows can land in "
                     "training and test at once; keep one row per slide")
    if labels is not None:
        for c, name in enumerate(classes):
            if labels.count(c) == 0:
                progress(f"warning: class {name!r} has no slides: its AUC and recall are undefined")
            elif labels.count(c) == 1:
                import difflib

                others = [o for i, o in enumerate(classes) if i != c and labels.count(i) > 1]
                close = difflib.get_close_matches(name, others, n=1, cutoff=0.6)
                typo = (f"; did you mean {close[0]!r}? (a misspelt label is a class of its own: fix it in the CSV)"
                        if close else "")
                progress(f"warning: class {name!r} has a single slide: it cannot be in training and evaluation "
                         f"both{typo}")
    cache = (Path(cfg.cache) if cfg.cache else run_dir / "cache").resolve()  # extract.json records it whole
    files = [cache_path(cache, r.slide_id) for r in rows]
    enc_settings: dict[str, Any] = {}
    ecfg: ExtractConfig | None = None  # how the caches are (or were) made: RUN_DIR/extract.json
    first: Any = None  # the first CLAM/TRIDENT file, once read
    if cfg.encoder is None:  # train on existing caches, adopting their settings
        from xtpath.cache import read_settings

        missing = [r for r, f in zip(rows, files) if not f.exists()]
        present = [f for f in files if f.exists()]
        found = [s for s in (read_settings(f) for f in present) if s]
        if missing and not found:
            why = ("the feature files here are not xtpath's, so xtpath cannot make the others: add them with the "
                   "same extractor" if present else "pass --encoder (and --weights) to build them")
            raise CacheError("\n".join(f"{r.where}: no feature cache {cache_path(cache, r.slide_id)}"
                                        for r in missing[:20]) + f"\n{why}, or --cache with the feature files")
        if found:
            s0 = found[0]
            enc_settings = {k: s0.get(k) for k in ("encoder", "weights_sha256", "features_kind", "encoder_px")}
            given = {"target_mpp": cfg.target_mpp, "region_px": cfg.region_px, "encoder_px": cfg.encoder_px,
                     "features_kind": cfg.features if cfg.features != "pooled" else None}  # pooled: the default
            if cfg.weights:
                from xtpath.models.encoders import file_sha256

                given["weights_sha256"] = file_sha256(cfg.weights)
            for key, value in given.items():
                if value is not None and not same_setting(value, s0.get(key)):
                    raise CacheError(f"{present[0]}: the caches were made with {key}={s0.get(key)!r}, this run asks "
                                     f"for {value!r}; drop the option to train on these caches, or pass --encoder "
                                     "with another --cache to build new ones")
            _check_cache_encoders(rows, files, {**enc_settings, "target_mpp": s0.get("target_mpp"),
                                                "region_px": s0.get("region_px")})
            cfg.encoder = str(s0["encoder"])  # recorded in config.yaml; nothing is built in cached mode
            cfg.features = str(s0.get("features_kind", cfg.features))
            cfg.target_mpp, cfg.region_px = float(s0["target_mpp"]), int(s0["region_px"])
            cfg.encoder_px = int(s0["encoder_px"])
            # the whole extraction recipe of these caches (tissue, edge, order, feature kind), so that score and
            # extract --like build new slides' caches the same way; the weights file is named only by its
            # SHA-256 in a cache: from --weights, or kept from this run's earlier extract.json (--resume)
            weights = cfg.weights or _earlier_weights(run_dir / "extract.json", s0.get("weights_sha256"))
            ecfg = config_of_cache(s0, weights)
            if missing:  # new slides in a cached cohort: their caches are made the way the others were
                sha = str(s0.get("weights_sha256", ""))
                if not ecfg.weights and not sha.startswith("random-init:"):
                    raise CacheError(f"{missing[0].where}: {len(missing)} slide(s) have no feature cache in {cache} "
                                     f"(first: {missing[0].slide_id}); they are made the way the other caches were "
                                     f"({ecfg.encoder}), which needs its weights file: pass --weights FILE (SHA-256 "
                                     f"{sha[:16]}...)")
                _build_missing(missing, cache, ecfg, progress,
                               f"the way the other caches were made ({ecfg.encoder}, {ecfg.region_px} px at "
                               f"{ecfg.target_mpp:g} µm/px)")
        else:  # CLAM or TRIDENT feature files: the regions' resolution from TRIDENT's attributes or the options
            cfg.target_mpp, cfg.region_px = _foreign_resolution(files[0], cfg.target_mpp, cfg.region_px)
            progress(f"training on feature files not made by xtpath ({files[0].name}...): regions of "
                     f"{cfg.region_px} px at {cfg.target_mpp:g} µm/px; xtpath score can use this model only with "
                     "--cache holding such files (it cannot make them for new slides)")
            first = load_features(files[0])  # also gives the input shape below
            um = _foreign_region_um(rows[0], first.region_size_level0)
            if um is not None:  # what score checks other files against (their size in µm on their own slide)
                write_json(run_dir / FOREIGN_REGIONS_JSON, {"region_um": um, "measured_on": str(files[0])})
                said = cfg.region_px * cfg.target_mpp
                if abs(um / said - 1.0) > 0.1:
                    progress(f"warning: {files[0].name}'s regions are {um:.0f} µm wide on {rows[0].path.name}, but "
                             f"{cfg.region_px} px at {cfg.target_mpp:g} µm/px are {said:.0f} µm; give the "
                             "--target-mpp and --region-px the files were made at (they set the segmentation "
                             "head's scale and what is recorded)")
    else:
        cfg.target_mpp = 0.5 if cfg.target_mpp is None else float(cfg.target_mpp)
        cfg.region_px = 256 if cfg.region_px is None else int(cfg.region_px)
        ecfg = ExtractConfig(encoder=cfg.encoder, weights=cfg.weights, features=cfg.features,
                             target_mpp=cfg.target_mpp, region_px=cfg.region_px, encoder_px=cfg.encoder_px,
                             min_tissue=cfg.min_tissue, tissue_preset=cfg.tissue_preset, seed=cfg.seed)
        enc_settings = encoder_settings(ecfg)
        _check_cache_encoders(rows, files, {**enc_settings, "target_mpp": cfg.target_mpp, "region_px": cfg.region_px})
        if cfg.mode == "cached":
            missing = [r for r, f in zip(rows, files) if not f.exists()]
            if missing:
                _build_missing(missing, cache, ecfg, progress)
    if ecfg is not None:
        write_json(run_dir / "extract.json", {**asdict(ecfg), **enc_settings, "cache": str(cache)})
    splits = make_splits(rows, labels, folds=cfg.folds, val_fraction=cfg.val_fraction,
                         test_fraction=cfg.test_fraction, seed=cfg.seed)
    if not cfg.folds and any(r.split for r in rows) and not any(r.split == "val" for r in rows) and splits[0].val:
        progress(f"the CSV's split column has no val rows: {len(splits[0].val)} of its train slides are held out "
                 "for validation (early stopping, choice of the best epoch)")
    if cfg.folds:
        tr = round(float(np.mean([len(sp.train) for sp in splits])))
        progress(f"--folds {cfg.folds}: each fold tests on one of {cfg.folds} parts, validates on another and trains "
                 f"on the rest (about {tr} of {len(rows)} slides)"
                 + ("; 5 or more folds train on more of them" if cfg.folds < 5 else ""))
    if not cfg.folds:
        _say_missing_parts(splits[0], len(rows), progress)
    elif any(r.split for r in rows):
        progress(f"note: --folds {cfg.folds}: the CSV's split column is not used; the folds are drawn over all "
                 f"{len(rows)} slides (drop --folds to train on the column's split)")
    if cfg.mode == "cached":
        sf = first if first is not None else load_features(files[0])
        in_shape = tuple(sf.features.shape[1:])
    else:
        in_shape = ()
    return _Prepared(rows, classes, labels, files, splits, in_shape, enc_settings)


def _build_missing(missing: Sequence[SlideRow], cache: Path, ecfg: Any, progress: Callable[[str], None],
                   how: str = "") -> None:
    """Extract the slides that have no cache yet; a slide that fails stops training with every reason."""
    from xtpath.extract import extract_slides

    progress(f"building {len(missing)} missing feature caches in {cache}" + (f" {how}" if how else ""))
    if not ecfg.weights:
        from xtpath.models.encoders import random_weights_note

        progress(f"warning: {random_weights_note(str(ecfg.encoder))}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        summary = extract_slides(missing, cache, ecfg)
    if summary.failed:
        bad = "\n".join(f"{r.where}: {r.slide_id}: {summary.failed[r.slide_id]}"
                        for r in missing if r.slide_id in summary.failed)
        raise CacheError(f"{bad}\nfix or remove these rows (details in {cache / 'failures.csv'})")


#: Beside ``config.yaml`` of a run trained on CLAM/TRIDENT files: the side of their regions in µm, measured on the
#: first training slide, which ``xtpath score`` checks the files it is given against.
FOREIGN_REGIONS_JSON = "foreign_regions.json"


def _foreign_region_um(row: SlideRow, size: float | None) -> float | None:
    """Side in µm of a CLAM/TRIDENT file's regions (``size`` level-0 pixels) on its slide (``None`` when the file
    or the slide does not say)."""
    from xtpath.io import open_slide

    if size is None:
        return None
    with open_slide(row.path, mpp=row.mpp) as slide:
        return None if slide.mpp is None else float(size * slide.mpp[0])


def _foreign_resolution(path: Path, target_mpp: float | None, region_px: int | None) -> tuple[float, int]:
    """``(target_mpp, region_px)`` of a CLAM or TRIDENT feature file: the options when given, else TRIDENT's
    ``target_magnification`` and ``patch_size`` (20x = 0.5 µm/px); CLAM records no resolution."""
    from xtpath.cache import read_coords_attrs

    attrs = read_coords_attrs(path)
    mag, size = attrs.get("target_magnification"), attrs.get("patch_size")
    if target_mpp is None and mag is not None and float(np.atleast_1d(mag)[0]) > 0:
        target_mpp = 10.0 / float(np.atleast_1d(mag)[0])
    if region_px is None and size is not None and mag is not None:
        region_px = int(np.atleast_1d(size)[0])
    if target_mpp is None or region_px is None:
        raise CacheError(f"{path}: a feature file not made by xtpath (CLAM-style: coords and features) does not "
                         "record the resolution of its patches; pass --target-mpp and --region-px (e.g. "
                         "--target-mpp 0.5 --region-px 256 for 256-px patches at 20x)")
    return float(target_mpp), int(region_px)


def _say_missing_parts(split: Any, n_rows: int, progress: Callable[[str], None]) -> None:
    """Warn when a split has no validation or no test slides (too few slides to hold some out, or a split
    column without them): the metrics then come from slides that also trained or chose the model."""
    if not split.val:
        progress(f"warning: no validation slides ({n_rows} slides, too few per class to hold some out): the best "
                 "epoch is chosen on the training slides; add slides, or val rows to the CSV's split column")
    if not split.test:
        on = "validation slides, which also chose the best epoch" if split.val else "training slides"
        progress(f"warning: no test slides: the final metrics are on the {on}, so they flatter the model; add "
                 "slides, or test rows to the CSV's split column")


def _earlier_weights(extract_json: Path, sha: Any) -> str | None:
    """The weights file this run's earlier ``extract.json`` names, when it still has the caches' SHA-256."""
    import json

    try:
        prev = json.loads(extract_json.read_text())
    except (OSError, ValueError):
        return None
    w = prev.get("weights") if isinstance(prev, dict) else None
    return str(w) if w and prev.get("weights_sha256") == sha else None


_CACHE_OPTIONS = {"encoder": "--encoder", "weights_sha256": "--weights", "features_kind": "--features",
                  "encoder_px": "--encoder-px", "target_mpp": "--target-mpp", "region_px": "--region-px"}


def _check_cache_encoders(rows: Sequence[SlideRow], files: Sequence[Path], enc: dict[str, Any]) -> None:
    """Every existing xtpath cache must have been made with the run's encoder settings ``enc``. When they all
    share one other recipe (the usual case: options left at their defaults), one message says which options
    give it; otherwise one line per cache."""
    from xtpath.cache import read_settings

    keys = [k for k in _CACHE_OPTIONS if k in enc]
    checked, problems = 0, []
    for r, f in zip(rows, files):
        if not f.exists():
            continue
        s = read_settings(f)
        if not s:
            continue  # a CLAM/TRIDENT file: nothing recorded to compare
        checked += 1
        diff = [k for k in keys if not same_setting(s.get(k), enc.get(k))]
        if diff:
            problems.append((r, f, s, diff))
    if not problems:
        return
    recipes = {tuple(repr(p[2].get(k)) for k in keys) for p in problems}
    if len(recipes) == 1 and len(problems) == checked:  # the caches agree with each other, not with the run
        _, f, s, diff = problems[0]
        made = ", ".join(f"{k}={s.get(k)!r}" for k in diff)
        asked = ", ".join(f"{enc.get(k)!r}" for k in diff)
        parts = [f"{_CACHE_OPTIONS[k]} {s.get(k)}" for k in diff if k != "weights_sha256"]
        sha = str(s.get("weights_sha256"))
        if "weights_sha256" in diff and sha.startswith("random-init:seed="):
            parts.append(f"--seed {sha.split('=', 1)[1]} without --weights (they were made with random weights)")
        elif "weights_sha256" in diff:
            parts.append(f"--weights FILE (SHA-256 {sha[:16]}...)")
        raise CacheError(f"{f.parent}: its {checked} caches were made with {made}; this run asks for {asked}. To "
                         "train on them, leave out --encoder (the run takes their settings and builds missing "
                         f"caches the same way) or pass {' '.join(parts)}; or give another --cache")
    lines = [f"{r.where}: {f} was made with {diff[0]}={s.get(diff[0])!r}, this run uses {enc.get(diff[0])!r}; "
             "every cache of a run needs the same encoder settings: re-extract it (xtpath extract --overwrite) or "
             "use another --cache" for r, f, s, diff in problems[:20]]
    more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise CacheError("\n".join(lines) + more)


# -- the model ------------------------------------------------------------------------------------------------

def _model_config(cfg: TrainConfig, in_shape: tuple[int, ...], n_classes: int) -> Any:
    from xtpath.models import ContextConfig, HeadConfig, XTConfig

    token_grid = (int(in_shape[0]), int(in_shape[1])) if len(in_shape) == 3 else None
    task = "classification" if cfg.task == "classification" else "segmentation"
    ctx = ContextConfig(name=cfg.context, **cfg.context_options)
    head = HeadConfig(**{"region_um": float(cfg.region_px * cfg.target_mpp), **cfg.head_options})
    return XTConfig(in_dim=int(in_shape[-1]), token_grid=token_grid, num_classes=n_classes, task=task,
                    context=ctx, head=head)


def _loss(cfg: TrainConfig, out: Any, item: SlideItem, weights: torch.Tensor | None) -> torch.Tensor:
    # a class without training slides has weight 0; a slide (or mask) of only such classes, which only
    # validation and test parts can hold, gets the unweighted loss instead of 0 / 0
    if cfg.task == "classification":
        target = torch.tensor([item.label], device=out.logits.device)
        loss = F.cross_entropy(out.logits.float().reshape(1, -1), target)
        # one slide per loss: cross_entropy(weight=w) would divide by the same w[label] it multiplies with, so
        # the weight is applied here (the weights average 1 over the training slides, so the loss's scale holds)
        if weights is not None and float(weights[item.label]) > 0:
            loss = loss * weights[item.label].to(loss.dtype)
        return loss
    logits = out.mask_logits.float()  # (N, C, m, m)
    tgt = item.targets.to(logits.device)  # type: ignore[union-attr]
    if tgt.shape[-1] != logits.shape[-1]:
        raise InvalidParameterError(f"mask of {tgt.shape[-1]} cells per region but the model gives "
                                    f"{logits.shape[-1]}")
    if (tgt != IGNORE_INDEX).sum() == 0:
        return logits.sum() * 0.0
    if weights is not None and float(weights.to(tgt.device)[tgt[tgt != IGNORE_INDEX]].sum()) == 0:
        weights = None
    return F.cross_entropy(logits, tgt, weight=weights, ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate(model: Any, dataset: Any, cfg: TrainConfig, device: torch.device, indices: Sequence[int],
             class_weights: torch.Tensor | None = None) -> dict[str, Any]:
    """Loss, metrics and per-slide outputs of ``model`` on ``dataset[indices]``."""
    model.eval()
    losses, probs, labels, preds, tgts, ids = [], [], [], [], [], []
    for i in indices:
        check_stop()
        item = dataset[i]
        with _autocast(device, cfg.amp):
            out = model(item.features.to(device), item.grid.to(device))
        losses.append(float(_loss(cfg, out, item, class_weights)))
        ids.append(item.slide_id)
        if cfg.task == "classification":
            probs.append(torch.softmax(out.logits.float().reshape(-1), 0).cpu().numpy())
            labels.append(item.label)
        else:
            preds.append(out.mask_logits.float().argmax(1).cpu().numpy())
            tgts.append(item.targets.numpy())  # type: ignore[union-attr]
    res: dict[str, Any] = {"loss": float(np.mean(losses)) if losses else math.nan, "slide_ids": ids}
    if not indices:
        return res
    if cfg.task == "classification":
        P, Y = np.stack(probs), np.array(labels)
        res.update(classification_metrics(P, Y, P.shape[1]))
        res["probs"], res["labels"] = P, Y
    else:
        n_cls = int(model.cfg.num_classes)
        res.update(segmentation_metrics(np.concatenate([p.ravel() for p in preds]),
                                        np.concatenate([t.ravel() for t in tgts]), n_cls))
    return res


def _monitor(cfg: TrainConfig) -> tuple[str, bool]:
    """The validation metric and whether larger is better."""
    name = cfg.monitor
    if name == "auto":
        name = "auc" if cfg.task == "classification" else "dice"
    return name, name != "loss"


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load the last checkpoint ({type(e).__name__}: {e}); delete "
                              "RUN_DIR/last to start over") from e


def _rng_state() -> dict[str, Any]:
    import random

    st = random.getstate()
    return {"torch": torch.get_rng_state(), "python": [st[0], list(st[1]), st[2]]}


def _set_rng_state(s: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(s["torch"])
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for h in history:
        keys += [k for k in h if k not in keys]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for h in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in h.items()})


# -- one split ------------------------------------------------------------------------------------------------

class _EpochBar:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def start(self, epoch: int, epochs: int, total: int, last_val: str) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn(f"[bold]epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("mean loss {task.fields[loss]}"), TextColumn("{task.fields[val]}"),
                            TimeElapsedColumn(), console=Console(stderr=True), transient=False)
        self.task = self.bar.add_task("train", total=total, loss="-", val=last_val)
        self.bar.start()

    def step(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, loss=f"{loss:.4f}")

    def end(self, val: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, val=val)
            self.bar.stop()
            self.bar = None


def _fit_split(prep: _Prepared, split: Split, cfg: TrainConfig, out_dir: Path, device: torch.device,
               dist: _Dist, resume: bool, show: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from xtpath.models import XTModel, load_model, save_model

    out_dir.mkdir(parents=True, exist_ok=True)
    train_idx, val_idx, test_idx = split.train, split.val, split.test
    if not train_idx:
        raise ManifestError(f"split {split.name}: no training slides")
    targets = None
    _seed_all(cfg.seed)
    if cfg.mode == "end2end":
        from xtpath.e2e import EndToEnd

        runner = EndToEnd(prep, cfg, device)
        model = XTModel(_model_config(cfg, runner.feature_shape, len(prep.classes))).to(device)
        if cfg.task == "segmentation":
            targets = runner.segmentation_targets(model)
        dataset = runner.train_dataset(targets)
    else:
        model = XTModel(_model_config(cfg, prep.in_shape, len(prep.classes))).to(device)
        if cfg.task == "segmentation":
            targets = _segmentation_targets(prep, model, device)
        dataset = CachedSlides(prep.rows, prep.files, labels=prep.labels, targets=targets, augment=cfg.augment,
                               seed=cfg.seed)
        runner = None
    if runner is not None:
        eval_set = runner.eval_dataset()
    else:
        eval_set = CachedSlides(prep.rows, prep.files, labels=prep.labels, targets=targets, augment=False,
                                seed=cfg.seed)
        eval_set._data = dataset._data  # share the loaded features
    # class weights from the training slides
    weights = None
    if cfg.class_weights and not cfg.balanced_sampling:
        if cfg.task == "classification":
            counts = np.bincount([prep.labels[i] for i in train_idx], minlength=len(prep.classes))  # type: ignore
        else:
            t = np.concatenate([targets[i].ravel() for i in train_idx]) if targets is not None else np.zeros(1, int)
            counts = np.bincount(t[t >= 0], minlength=len(prep.classes))
        weights = region_class_weights(counts).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if runner is not None:
        params += runner.encoder_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.accumulate % dist.world:
        raise InvalidParameterError(f"accumulate={cfg.accumulate} must be a multiple of the {dist.world} processes")
    per_rank_acc = cfg.accumulate // dist.world
    n_per_rank = math.ceil(len(train_idx) / dist.world)
    steps_per_epoch = math.ceil(n_per_rank / per_rank_acc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps_per_epoch * cfg.epochs,
                                                              int(round(cfg.warmup_epochs * steps_per_epoch))))
    ddp_model = model
    if dist.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    metric, larger = _monitor(cfg)
    state = {"epoch": -1, "best": None, "best_epoch": -1, "bad_epochs": 0, "history": [], "stopped": False,
             "monitor": metric}
    last = out_dir / "last" / "state.pt"
    if resume and last.exists():
        s = _load_state(last)
        model.load_state_dict(s["model"])
        if runner is not None and "encoder" in s:
            runner.encoder.load_state_dict(s["encoder"])
        opt.load_state_dict(s["optimizer"])
        sched.load_state_dict(s["scheduler"])
        _set_rng_state(s["rng"])
        state.update({k: s.get(k, state[k]) for k in state})
        metric = str(state["monitor"])
        larger = metric != "loss"
        log(("" if split.name == "split" else f"{split.name}: ") + f"resuming after epoch {state['epoch'] + 1}")
    bar = _EpochBar(show and dist.main)
    last_val = ""
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        if state["stopped"]:
            break
        t0 = time.perf_counter()
        _seed_all(cfg.seed, epoch, 1)
        dataset.set_epoch(epoch)
        order = _epoch_order(train_idx, prep, cfg, epoch)
        padded = order + order[: (-len(order)) % dist.world]
        mine = padded[dist.rank::dist.world]
        model.train()
        if runner is not None:
            runner.train_mode()
        opt.zero_grad(set_to_none=True)
        bar.start(epoch, cfg.epochs, len(mine), last_val)
        losses = []
        for j, i in enumerate(mine):
            check_stop()
            group_end = min(len(mine), (j // per_rank_acc + 1) * per_rank_acc)
            group_size = group_end - (j // per_rank_acc) * per_rank_acc
            last_in_group = j + 1 == group_end
            sync = ddp_model.no_sync() if (dist.enabled and not last_in_group) else contextlib.nullcontext()
            with sync:
                _seed_all(cfg.seed, epoch, 2, i)
                if runner is not None:
                    loss = runner.step(ddp_model, dataset, i, lambda out, item: _loss(cfg, out, item, weights),
                                       scale=1.0 / group_size)
                else:
                    item = dataset[i]
                    with _autocast(device, cfg.amp):
                        out = ddp_model(item.features.to(device), item.grid.to(device))
                    loss_t = _loss(cfg, out, item, weights)
                    (loss_t / group_size).backward()
                    loss = float(loss_t.detach())
            losses.append(loss)
            bar.step(float(np.mean(losses)))  # the epoch's mean so far: it ends at metrics.csv's train_loss
            if last_in_group:
                if runner is not None and dist.enabled:
                    runner.all_reduce_grads(dist.world)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
        train_loss = float(np.mean(losses))
        if dist.enabled:
            t = torch.tensor([train_loss * len(losses), len(losses)], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            train_loss = float(t[0] / t[1])
        improved = False
        if dist.main:
            val = evaluate(model, eval_set, cfg, device, val_idx or train_idx, weights)
            score = val.get(metric, math.nan)
            if metric != "loss" and state["best"] is None and isinstance(score, float) and math.isnan(score):
                log(f"{split.name}: val {metric} is undefined (the validation slides hold a single class); the "
                    "model is chosen by val loss instead (give the CSV's split column a val part with every class)")
                metric, larger = "loss", False
                state["monitor"], score = metric, val["loss"]
            if not (isinstance(score, float) and math.isnan(score)):
                improved = state["best"] is None or (score > state["best"] if larger else score < state["best"])
            elif state["best"] is None:
                improved = True
            row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"],
                   **{f"val_{k}": v for k, v in val.items() if isinstance(v, float) and k != "loss"},
                   "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            state["history"].append(row)
            if improved:
                state["best"], state["best_epoch"], state["bad_epochs"] = score, epoch, 0
                save_model(model, out_dir)
                if runner is not None:
                    runner.save_encoder(out_dir)
            else:
                state["bad_epochs"] += 1
            state["stopped"] = state["bad_epochs"] >= cfg.patience
            last_val = f"val {metric} {score:.4f}"
            _write_metrics(out_dir / "metrics.csv", state["history"])
        state["stopped"] = dist.broadcast_flag(bool(state["stopped"]))
        state["epoch"] = epoch
        if dist.main:
            snap = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "rng": _rng_state(), **{k: state[k] for k in state}}
            if runner is not None:
                snap["encoder"] = runner.encoder.state_dict()
            _save_state(last, snap)
        bar.end(last_val)
        if dist.main:
            prefix = "" if split.name == "split" else f"{split.name} "
            log(f"{prefix}epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, {last_val}"
                + (" (best)" if improved else ""))
        dist.barrier()
    result: dict[str, Any] = {"split": split.name, "best_epoch": state["best_epoch"] + 1,
                              "n_train": len(train_idx), "n_val": len(val_idx), "n_test": len(test_idx)}
    if dist.main:
        best = load_model(out_dir, map_location=device)
        if runner is not None:
            runner.load_encoder(out_dir)
        ev = evaluate(best, eval_set, cfg, device, test_idx or val_idx or train_idx, weights)
        result["evaluated_on"] = "test" if test_idx else "val" if val_idx else "train"
        result["metrics"] = {k: v for k, v in ev.items() if k not in ("probs", "labels", "slide_ids")}
        _write_split_outputs(out_dir, ev, prep, cfg, state["history"], result)
    return result


def _epoch_order(train_idx: list[int], prep: _Prepared, cfg: TrainConfig, epoch: int) -> list[int]:
    rng = np.random.default_rng([cfg.seed, epoch, 0])
    if cfg.balanced_sampling and prep.labels is not None:
        labels = np.array([prep.labels[i] for i in train_idx])
        counts = np.bincount(labels)
        p = 1.0 / counts[labels]
        p /= p.sum()
        return [train_idx[j] for j in rng.choice(len(train_idx), size=len(train_idx), replace=True, p=p)]
    return [train_idx[j] for j in rng.permutation(len(train_idx))]


def _segmentation_targets(prep: _Prepared, model: Any, device: torch.device) -> list[np.ndarray]:
    """Region label maps for every slide, at the model's mask resolution (found by one probe forward)."""
    from xtpath.io import open_slide

    sf0 = load_features(prep.files[0])
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(sf0.features[:1], np.float32)).to(device),
                    torch.from_numpy(np.asarray(sf0.grid[:1])).to(device))
    m = int(out.mask_logits.shape[-1])
    targets = []
    for row, f in zip(prep.rows, prep.files):
        sf = load_features(f)
        dims = tuple(sf.settings.get("slide_dimensions") or open_slide(row.path, mpp=row.mpp).dimensions)
        targets.append(region_targets(row, sf, prep.classes, m, slide_dimensions=dims))  # type: ignore[arg-type]
    return targets


# -- outputs --------------------------------------------------------------------------------------------------

def _write_split_outputs(out_dir: Path, ev: dict[str, Any], prep: _Prepared, cfg: TrainConfig,
                         history: list[dict[str, Any]], result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if history:
        fig, ax = plt.subplots(figsize=(6, 4))
        ep = [h["epoch"] for h in history]
        ax.plot(ep, [h["train_loss"] for h in history], label="train")
        ax.plot(ep, [h["val_loss"] for h in history], label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylabel("loss")
        ax.set_title("Loss")
        ax.legend()
        save_figure(fig, out_dir / "loss.png")
    if cfg.task == "classification" and "probs" in ev:
        P, Y = ev["probs"], ev["labels"]
        cm = roc_and_confusion_plots(P, Y, prep.classes, out_dir, title=result.get("evaluated_on", "test"))
        lines = ["slide_id,label,predicted," + ",".join(f"p_{c}" for c in prep.classes)]
        for sid, y, p in zip(ev["slide_ids"], Y, P):
            lines.append(f"{sid},{prep.classes[y]},{prep.classes[int(p.argmax())]}," + ",".join(f"{v:.6f}" for v in p))
        write_text(out_dir / "predictions.csv", "\n".join(lines) + "\n")
        result["metrics"]["confusion_matrix"] = cm
    elif cfg.task == "segmentation" and "dice_per_class" in ev:
        segmentation_plot(ev, prep.classes, out_dir / "segmentation.png", title="Segmentation per class")
    result["classes"] = prep.classes
    write_json(out_dir / "report.json", jsonable(result))


# -- entry point ----------------------------------------------------------------------------------------------

def train(csv_path: str | os.PathLike[str], run_dir: str | os.PathLike[str], cfg: TrainConfig, *,
          resume: bool = False, show_progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train per the config; returns the report (also written to ``RUN_DIR/report.json``).

    Launched by ``torchrun`` (``WORLD_SIZE > 1``) it runs DistributedDataParallel, training slides sharded
    over the processes; rank 0 validates and writes the outputs.
    """
    import yaml

    run = Path(run_dir)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist = _Dist(device)
    created = dist.main and not run.exists()
    try:
        if dist.main:
            run.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        say = log if dist.main else (lambda _m: None)
        from xtpath.models.kernels import INSTALL_HINT, mamba_ssm_installed

        if device.type == "cuda" and cfg.context == "mamba" and not mamba_ssm_installed() and \
                cfg.context_options.get("backend", "auto") == "auto":
            say("warning: mamba-ssm's CUDA kernels are not installed: the Mamba context trains with xtpath's own "
                f"scan, about 100x slower on a GPU (measured on an H100); install them with: {INSTALL_HINT}")
        if dist.main and not resume and ((run / "last").exists() or any(run.glob("fold*/last"))):
            raise InvalidParameterError(f"{run} already holds a run; pass --resume to continue it or choose "
                                        "another --out")
        if resume:  # every rank: they all train with the run's settings
            if not any(run.glob("**/last")):  # a mistyped --out must not pass for a resumed run unnoticed
                say(f"warning: --resume: {run} holds no finished epoch yet; training starts from the beginning")
            _resume_settings(run, cfg)
        prep = _prepare(Path(csv_path), cfg, run, say) if dist.main else None
        if dist.enabled:  # the other ranks prepare after rank 0 built any caches
            dist.barrier()
            if not dist.main:
                prep = _prepare(Path(csv_path), cfg, run, say)
        assert prep is not None
        if resume and any(run.glob("**/last")):
            _check_resumed_splits(run / "splits.csv", prep)
        if dist.main:
            cfg.classes = list(prep.classes)
            write_text(run / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
            write_json(run / "classes.json", prep.classes)
            _write_splits(run / "splits.csv", prep)
        results = []
        for split in prep.splits:
            out = run if len(prep.splits) == 1 else run / split.name
            results.append(_fit_split(prep, split, cfg, out, device, dist, resume, show_progress, say))
        report: dict[str, Any] = results[0] if len(results) == 1 else _aggregate(results)
        if dist.main and len(results) > 1:
            if cfg.task == "classification":
                report["out_of_fold"] = _out_of_fold(run, prep)
            write_json(run / "report.json", jsonable(report))
        return report
    except BaseException:
        if created:
            _remove_unstarted_run(run)
        raise
    finally:
        dist.close()


# settings that may differ when a run is resumed (where things are and what runs them, not what is trained)
_RESUME_FREE = {"device", "cache", "weights"}
# settings the run resolved from its caches (checked against them again), and the class map it wrote
_RESUME_RESOLVED = {"classes", "encoder", "features", "target_mpp", "region_px", "encoder_px"}


def _resume_settings(run: Path, cfg: TrainConfig) -> None:
    """``--resume`` continues the run as it was set up: settings not given now are taken from the run's
    ``config.yaml``; a setting given now that contradicts it (another context model, more epochs, other
    folds...) is an error before anything is written, even when it is the default value (``--context mamba``
    on an ABMIL run). What was given is what :func:`load_config` read from the YAML file and the command line;
    a config made otherwise counts the settings left at their defaults as not given."""
    import yaml

    saved_path = run / "config.yaml"
    if not saved_path.exists():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return
    fresh = asdict(TrainConfig())
    given = getattr(cfg, "_given", None)
    changed = []
    for name, value in asdict(cfg).items():
        if name not in saved or name in _RESUME_RESOLVED:
            continue
        if (name not in given) if given is not None else (value == fresh.get(name)):  # the run's own value
            setattr(cfg, name, saved[name])
        elif name not in _RESUME_FREE and not same_setting(saved[name], value) and saved[name] != value:
            changed.append(f"{name}: {saved[name]!r} -> {value!r}")
    if changed:
        more = (" (the learning-rate schedule is laid out over the run's epochs, so a run cannot be lengthened)"
                if any(c.startswith("epochs:") for c in changed) else "")
        raise InvalidParameterError(f"--resume {run}: settings differ from the run's config.yaml "
                                    f"({'; '.join(changed)}){more}; resume with the run's settings, or start a new "
                                    "run with another --out")


def _remove_unstarted_run(run: Path) -> None:
    """After a failure before any checkpoint: remove what this call wrote into the new ``run`` folder (the
    settings files, the folder if then empty), so that nothing looks like a run. Caches built there stay."""
    if any(run.glob("**/last")):
        return
    for name in ("config.yaml", "classes.json", "splits.csv", FINGERPRINTS_JSON, "extract.json", FOREIGN_REGIONS_JSON):
        (run / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run.rmdir()


#: Beside ``splits.csv``: each slide's file fingerprint (from its cache), so that ``xtpath report`` can tell a
#: training slide from another cohort's slide that reuses its slide_id.
FINGERPRINTS_JSON = "slide_fingerprints.json"


def _write_splits(path: Path, prep: _Prepared) -> None:
    """``splits.csv``: each slide's part (train, val, test) in every split, so that a later evaluation can keep
    to the slides a model never trained on (``xtpath report --labels`` reads it); and beside it the slides'
    fingerprints (:data:`FINGERPRINTS_JSON`), where their caches recorded them."""
    from xtpath.cache import read_settings

    write_text(path, _splits_text(prep))
    prints = {}
    for r, f in zip(prep.rows, prep.files):
        known = (read_settings(f) or {}).get("slide_fingerprint") if f.exists() else None
        if known:
            prints[r.slide_id] = known
    write_json(path.parent / FINGERPRINTS_JSON, prints)


def _check_resumed_splits(path: Path, prep: _Prepared) -> None:
    """``--resume`` trains on the run's own slides and splits: another CSV (slides added, removed, relabelled or
    moved between train and test) would mix slides the model trained on into its test set."""
    if not path.exists():
        return
    old, new = path.read_text(), _splits_text(prep)
    if old == new:
        return
    before, after = (_split_rows(t) for t in (old, new))
    changed = [k for k in before.keys() & after.keys() if before[k] != after[k]]
    parts = [f"{len(after.keys() - before.keys())} slides added", f"{len(before.keys() - after.keys())} removed",
             f"{len(changed)} with another label or part"]
    example = sorted(changed)[:1]
    if example:
        parts.append(f"e.g. {example[0]}: {' '.join(before[example[0]])} -> {' '.join(after[example[0]])}")
    raise InvalidParameterError(f"--resume: the slides or their splits differ from {path} ({'; '.join(parts)}); "
                                "resume with the run's own slides CSV, or start a new run with another --out")


def _split_rows(text: str) -> dict[str, tuple[str, ...]]:
    rows = list(csv.reader(text.splitlines()))
    return {r[0]: tuple(r[1:]) for r in rows[1:] if r}


def _splits_text(prep: _Prepared) -> str:
    import io

    parts = []
    for split in prep.splits:
        part = [""] * len(prep.rows)
        for name in ("train", "val", "test"):
            for i in getattr(split, name):
                part[i] = name
        parts.append(part)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["slide_id", "label", *[s.name for s in prep.splits]])
    for i, r in enumerate(prep.rows):
        w.writerow([r.slide_id, r.label or "", *[p[i] for p in parts]])
    return buf.getvalue()


def _out_of_fold(run: Path, prep: _Prepared) -> dict[str, Any]:
    """Cross-validation's pooled view: every slide as predicted by the fold that held it out for testing, in
    ``RUN_DIR/predictions.csv`` (with its fold), with metrics over all of them and ``roc.png``/``confusion.png``.
    Fold means weigh a fold of 3 slides like one of 30; these weigh every slide once."""
    lines = ["slide_id,fold,label,predicted," + ",".join(f"p_{c}" for c in prep.classes)]
    probs, labels = [], []
    index = {c: i for i, c in enumerate(prep.classes)}
    for split in prep.splits:
        with open(run / split.name / "predictions.csv", newline="") as f:
            for r in csv.DictReader(f):
                p = [float(r[f"p_{c}"]) for c in prep.classes]
                probs.append(p)
                labels.append(index[r["label"]])
                lines.append(f"{r['slide_id']},{split.name},{r['label']},{r['predicted']}," +
                             ",".join(f"{v:.6f}" for v in p))
    write_text(run / "predictions.csv", "\n".join(lines) + "\n")
    P, Y = np.array(probs), np.array(labels)
    metrics = classification_metrics(P, Y, len(prep.classes))
    metrics["confusion_matrix"] = roc_and_confusion_plots(P, Y, prep.classes, run, title="out-of-fold")
    return {"n_slides": len(Y), "metrics": metrics}


def _aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in results[0].get("metrics", {}).items() if isinstance(v, float)]
    summary = {}
    for k in keys:
        vals = np.array([r["metrics"][k] for r in results], dtype=float)
        ok = np.isfinite(vals)  # a metric undefined on a fold (AUC of a single-class test part) is left out
        summary[k] = {"mean": float(vals[ok].mean()) if ok.any() else math.nan,
                      "std": float(vals[ok].std()) if ok.any() else math.nan,
                      "n_folds": int(ok.sum()), "folds": vals.tolist()}
    return {"folds": results, "summary": summary, "classes": results[0].get("classes")}
