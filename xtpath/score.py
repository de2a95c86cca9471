"""``xtpath score``: a trained model over a batch of slides, with outputs people open.

Per run: ``OUT_DIR/predictions.csv`` (one line per slide, appended as slides finish, so a killed run keeps what
it scored and a rerun scores only what is missing) and ``OUT_DIR/failures.csv``. Per slide, in
``OUT_DIR/<slide_id>/``:

* ``prediction.json``: the slide's prediction (or its failure), the record the cluster workflow gathers;
* ``heatmap.png``: per-region probabilities (or the segmentation) over the thumbnail, with a colour bar;
* ``regions.h5``: ``coords`` (level-0 ``(x, y)``), ``grid`` and ``probs`` (N, C) per region;
* ``regions.geojson``: QuPath objects in level-0 pixels (regions as ``tile`` objects with one measurement per
  class, as WSInfer writes them; segmentation as annotation polygons with a classification);
* ``mask.ome.tif`` (segmentation): the label mask as a pyramidal OME-TIFF with its mpp (QuPath, napari);
  values are class indices (255: not scored), named in its OME metadata (``read_label_names``).

Region scores of a classifier are the slide head applied to each region's context output: they show where the
model's evidence lies, not a calibrated region label.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xtpath.cache import cache_path, load_features, other_slide, read_settings, same_setting
from xtpath.errors import CacheError, CheckpointError, InvalidParameterError, ManifestError, XtpathError
from xtpath.extract import (
    ExtractConfig,
    clear_failure,
    extraction_failures,
    failure_time,
    record_failure,
    run_device_workers,
)
from xtpath.io import SlideRow, open_slide
from xtpath.io.files import atomic_path, file_fingerprint, write_json
from xtpath.stop import check_stop

__all__ = ["ScoreModel", "check_run_folder", "load_run", "score_slides", "parse_shard", "shard_rows", "PREDICTIONS_CSV",
           "ScoreSummary", "region_colors", "gather_predictions", "read_predictions"]

PREDICTIONS_CSV = "predictions.csv"


@dataclass
class ScoreModel:
    """A trained run ready to score: models (one per fold), classes, task and encoder settings."""

    run_dir: Path
    models: list[Any]
    classes: list[str]
    task: str
    extract: dict[str, Any]
    device: torch.device = torch.device("cpu")
    model_files: list[Path] = field(default_factory=list)
    """The ``model.safetensors`` of every fold (what :meth:`identity` hashes)."""
    region_um: float | None = None
    """Side in µm of the CLAM/TRIDENT regions the model was trained on (``foreign_regions.json``, measured on a
    training slide): what the CLAM/TRIDENT files given to score, which name no encoder, are checked against."""

    def extract_config(self) -> ExtractConfig:
        """The run's region encoder settings, to extract the caches that are missing."""
        e = self.extract
        fields = {k: e[k] for k in ExtractConfig.__dataclass_fields__ if k in e}
        w = fields.get("weights")
        sha = str(e.get("weights_sha256") or "")
        if not w and sha and not sha.startswith("random-init"):
            raise CheckpointError(f"{self.run_dir / 'extract.json'}: the run names its region encoder weights only "
                                  f"by SHA-256 ({sha[:16]}...); pass --weights FILE (that file) to extract the "
                                  "missing caches")
        if w and not Path(w).is_file():
            raise CheckpointError(f"{self.run_dir / 'extract.json'}: the region encoder weights {w} are not on this "
                                  "machine; pass --weights FILE (the same file, SHA-256 "
                                  f"{str(e.get('weights_sha256'))[:16]}...) to extract the missing caches")
        return ExtractConfig(**fields)

    def encoder_key(self) -> dict[str, Any]:
        """What a cache must have been made with for this model: encoder, weights, feature kind and size, and
        the regions' mpp and size."""
        return {k: self.extract.get(k) for k in ("encoder", "weights_sha256", "features_kind", "encoder_px",
                                                 "target_mpp", "region_px")}

    def identity(self) -> dict[str, Any]:
        """The model's name and the SHA-256 of its weights (all folds), recorded next to its predictions."""
        import hashlib

        from xtpath.models.encoders import file_sha256

        digest = hashlib.sha256("".join(file_sha256(f) for f in self.model_files).encode()).hexdigest()
        return {"model": str(self.run_dir.resolve()), "model_sha256": digest, "classes": list(self.classes)}


def check_run_folder(run_dir: str | os.PathLike[str]) -> tuple[Path, list[Path]]:
    """Check that ``run_dir`` is a trained run (or one fold of one) without loading it: returns the folder with
    its settings (``classes.json``...) and the folders with a ``model.safetensors``.

    Raises
    ------
    CheckpointError
        No such folder, not a run folder, or no finished epoch.
    """
    run = Path(run_dir)
    if not run.is_dir():
        folds = sorted(p.name for p in run.parent.glob("fold*") if (p / "model.safetensors").exists())
        raise CheckpointError(f"{run}: no such run folder" + (f"; {run.parent} has {', '.join(folds)}" if folds else
                                                              "; give the --out of xtpath train"))
    # one fold of a cross-validation scores on its own, with the run's class map and settings
    meta = run.parent if run.name.startswith("fold") and not (run / "classes.json").exists() else run
    if not (meta / "classes.json").exists():
        raise CheckpointError(f"{run}: not an xtpath run folder (no classes.json); give the --out of xtpath train")
    folders = [run] if (run / "model.safetensors").exists() else sorted(run.glob("fold*/"))
    folders = [f for f in folders if (f / "model.safetensors").exists()]
    if not folders:
        raise CheckpointError(f"{run}: no model.safetensors (did training finish an epoch?)")
    return meta, folders


def load_run(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu",
             weights: str | os.PathLike[str] | None = None) -> ScoreModel:
    """Load ``RUN_DIR`` written by ``xtpath train`` (all folds of a cross-validation, averaged when scoring; or
    one fold, ``RUN_DIR/foldK``).

    ``weights``: the region encoder's weights file, for a run whose recorded path does not exist here (moved to
    another machine); it must be the same file (same SHA-256). An end-to-end run scores with its own fine-tuned
    encoder (``RUN_DIR/encoder.safetensors``).
    """
    import yaml

    from xtpath.models import load_model
    from xtpath.models.encoders import file_sha256, weights_path

    run = Path(run_dir)
    meta, folders = check_run_folder(run)
    dev = torch.device(device)
    models = [load_model(f, map_location=dev).eval() for f in folders]
    cfg = yaml.safe_load((meta / "config.yaml").read_text()) if (meta / "config.yaml").exists() else {}
    extract = json.loads((meta / "extract.json").read_text()) if (meta / "extract.json").exists() else {}
    tuned = run / "encoder.safetensors" if (run / "encoder.safetensors").exists() else meta / "encoder.safetensors"
    if tuned.exists():  # an end-to-end run: features come from its fine-tuned encoder
        extract.update(weights=str(tuned.resolve()), weights_sha256=file_sha256(tuned))
    elif weights is not None:
        w = weights_path(weights)
        sha, want = file_sha256(w), extract.get("weights_sha256")
        if want and sha != want:
            raise CheckpointError(f"--weights {weights}: SHA-256 {sha[:16]}... is not that of the weights the model "
                                  f"was trained with ({str(want)[:16]}...); give the same file")
        extract["weights"] = str(w)
    from xtpath.train import FOREIGN_REGIONS_JSON

    region_um = None  # runs trained on CLAM/TRIDENT files: their regions' side in µm
    with contextlib.suppress(OSError, KeyError, TypeError, ValueError):
        region_um = float(json.loads((meta / FOREIGN_REGIONS_JSON).read_text())["region_um"])
    return ScoreModel(run, models, json.loads((meta / "classes.json").read_text()),
                      str(cfg.get("task", "classification")), extract, dev,
                      [f / "model.safetensors" for f in folders], region_um)


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"I/N"`` (0-based I) -> ``(I, N)``; ``None`` -> ``(0, 1)``."""
    if spec is None:
        return 0, 1
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError as e:
        raise InvalidParameterError(f"--shard {spec!r}: use I/N, e.g. 0/4 (I from 0 to N-1)") from e
    if not (n >= 1 and 0 <= i < n):
        raise InvalidParameterError(f"--shard {spec!r}: I must be between 0 and N-1 and N at least 1")
    return i, n


def shard_rows(rows: Sequence[SlideRow], shard: tuple[int, int]) -> list[SlideRow]:
    """Rows ``I, I+N, I+2N, ...``: N shards cover the CSV exactly once."""
    i, n = shard
    return [r for k, r in enumerate(rows) if k % n == i]


@dataclass
class ScoreSummary:
    scored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def merge(self, o: "ScoreSummary") -> None:
        self.scored += o.scored
        self.skipped += o.skipped
        self.failed.update(o.failed)


# -- predictions.csv: appended line by line under a lock ---------------------------------------------------

@contextlib.contextmanager
def _locked(out: Path) -> Any:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".predictions.lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lk, fcntl.LOCK_UN)


def _header(classes: Sequence[str]) -> list[str]:
    return ["slide_id", "predicted", *[f"p_{c}" for c in classes], "n_regions", "seconds"]


def scored_ids(out: Path, classes: Sequence[str]) -> set[str]:
    """Slides already in ``predictions.csv`` (a cut-off last line from a killed run is dropped)."""
    path = out / PREDICTIONS_CSV
    if not path.exists():
        return set()
    with _locked(out):
        text = path.read_text()
        lines = text.splitlines()
        header = ",".join(_header(classes))
        if lines and lines[0] != header:
            raise CacheError(f"{path} was written for other classes ({lines[0]}); use another --out")
        good = [ln for ln in lines[1:] if len(ln.split(",")) == len(_header(classes))]
        if not text.endswith("\n") or len(good) != len(lines) - 1:
            with atomic_path(path) as tmp:
                tmp.write_text("\n".join([header, *good]) + "\n")
        return {ln.split(",")[0] for ln in good}


def _drop_predictions(out: Path, classes: Sequence[str], ids: set[str]) -> None:
    """Remove the rows of ``ids`` from ``predictions.csv`` (to score them again)."""
    path = out / PREDICTIONS_CSV
    if not ids or not (scored_ids(out, classes) & ids):
        return
    with _locked(out):
        lines = path.read_text().splitlines()
        keep = [lines[0]] + [ln for ln in lines[1:] if ln.split(",")[0] not in ids]
        with atomic_path(path) as tmp:
            tmp.write_text("\n".join(keep) + "\n")


def _drop_caches_of_other_files(cache: Path, rows: Sequence[SlideRow]) -> None:
    """``--rescore`` with the score's own cache (``OUT_DIR/cache``): a slide's cache made from another file
    (the slide_id now names a new file) is deleted, so that it is extracted again. A cache given with --cache
    may be shared and is left alone (scoring then says which file to delete)."""
    for r in rows:
        f = cache_path(cache, r.slide_id)
        if not f.exists() or not Path(r.path).exists():
            continue
        try:
            known = (read_settings(f) or {}).get("slide_fingerprint")
        except CacheError:
            known = None
        if known and known != file_fingerprint(r.path):
            f.unlink(missing_ok=True)


def _prediction_line(rec: dict[str, Any], classes: Sequence[str]) -> str:
    """A slide's ``predictions.csv`` line from its prediction record (columns of :func:`_header`)."""
    return ",".join([rec["slide_id"], rec["predicted"], *[f"{rec['probs'][c]:.6f}" for c in classes],
                     str(rec["n_regions"]), f"{rec['seconds']:.3f}"])


def _append_prediction(out: Path, classes: Sequence[str], rec: dict[str, Any]) -> None:
    path = out / PREDICTIONS_CSV
    line = _prediction_line(rec, classes)
    with _locked(out):
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a") as f:
            if new:
                f.write(",".join(_header(classes)) + "\n")
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


# -- per-slide outputs -------------------------------------------------------------------------------------

_PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def region_colors(n: int) -> list[tuple[int, int, int]]:
    """Fixed class colours (index 0 is black: background)."""
    return [_PALETTE[i % len(_PALETTE)] for i in range(n)]


@torch.no_grad()
def _predict(sm: ScoreModel, features: np.ndarray, grid: np.ndarray) -> dict[str, Any]:
    """Slide probabilities (C,), region probabilities (N, C) and, for segmentation, mask probs (N, C, m, m)."""
    f = torch.from_numpy(np.asarray(features, dtype=np.float32)).to(sm.device)
    g = torch.from_numpy(np.asarray(grid, dtype=np.int64)).to(sm.device)
    slide_p, region_p, mask_p = [], [], []
    for model in sm.models:
        feats = model.forward_features(f, g)
        out = model.forward_head(feats)
        if sm.task == "classification":
            slide_p.append(torch.softmax(out.logits.float(), -1))
            tok = feats.tokens.float()
            if tok.dim() == 4:
                tok = tok.mean(dim=(1, 2))
            region_p.append(torch.softmax(model.head(tok).float(), -1))
        else:
            mp = torch.softmax(out.mask_logits.float(), 1)
            mask_p.append(mp)
            region_p.append(mp.mean(dim=(2, 3)))
            slide_p.append(region_p[-1].mean(0))
    res = {"slide": torch.stack(slide_p).mean(0).cpu().numpy(), "regions": torch.stack(region_p).mean(0).cpu().numpy()}
    if mask_p:
        res["masks"] = torch.stack(mask_p).mean(0).cpu().numpy()
    return res


def _write_region_h5(path: Path, coords: np.ndarray, grid: np.ndarray, probs: np.ndarray, classes: list[str],
                     region_size: float | None) -> None:
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords, np.int64))
        f.create_dataset("grid", data=np.asarray(grid, np.int64))
        f.create_dataset("probs", data=np.asarray(probs, np.float32))
        f.attrs["classes"] = json.dumps(classes)
        if region_size is not None:
            f["coords"].attrs["patch_size_level0"] = float(region_size)


def _write_geojson(path: Path, sm: ScoreModel, coords: np.ndarray, probs: np.ndarray, size: float,
                   label_mask: np.ndarray | None, mask_scale: float, slide_wh: tuple[int, int]) -> None:
    """Regions (or the segmentation's polygons) in level-0 pixels, cut at the slide's border."""
    from xtpath.io.geojson import mask_polygons, polygon_feature, tile_features, write_geojson

    colors = region_colors(len(sm.classes))
    bounds = (float(slide_wh[0]), float(slide_wh[1]))
    if label_mask is None:
        feats = tile_features(coords, size, probs, sm.classes, colors, clip_xy=bounds)
    else:
        feats = []
        for c, name in enumerate(sm.classes):
            if c == 0:
                continue  # background
            for poly in mask_polygons(label_mask == c, (mask_scale, mask_scale), exact=True, clip_xy=bounds):
                feats.append(polygon_feature(poly, object_type="annotation", name=name, color=colors[c]))
    write_geojson(path, feats)


def _label_mask(sm: ScoreModel, masks: np.ndarray, grid: np.ndarray, slide_wh: tuple[int, int],
                region_size: float) -> tuple[np.ndarray, float]:
    """Slide label mask (uint8, 255 = not scored) from region masks, and level-0 px per mask pixel."""
    m = masks.shape[-1]
    scale = region_size / m
    W, H = int(math.ceil(slide_wh[0] / scale)), int(math.ceil(slide_wh[1] / scale))
    out = np.full((H, W), 255, np.uint8)
    labels = masks.argmax(1).astype(np.uint8)  # (N, m, m)
    for (r, c), lab in zip(grid, labels):
        y0, x0 = int(r) * m, int(c) * m
        y1, x1 = min(H, y0 + m), min(W, x0 + m)
        if y1 > y0 and x1 > x0:
            out[y0:y1, x0:x1] = lab[: y1 - y0, : x1 - x0]
    return out, scale


def _heatmap_png(path: Path, slide: Any, sm: ScoreModel, cells: np.ndarray, probs: np.ndarray,
                 region_size: float, label_mask: np.ndarray | None, mask_scale: float, predicted: str,
                 title: str) -> None:
    """The thumbnail with per-region probabilities (colour bar, class name) or the segmentation (legend).

    Drawn with Pillow (matplotlib gives the colour map only): about 0.05 s per slide instead of 0.4 s.
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    thumb = Image.fromarray(slide.thumbnail(1024)).convert("RGBA")
    W0, H0 = slide.dimensions
    f = thumb.width / W0  # thumbnail pixels per level-0 pixel
    font = ImageFont.load_default(size=14)
    if label_mask is None:
        target = 1 if len(sm.classes) == 2 else int(np.argmax(probs.mean(0)))
        rows, cols = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
        heat = np.full((rows, cols), np.nan)
        heat[cells[:, 0], cells[:, 1]] = probs[:, target]
        lut = (colormaps["inferno"](np.linspace(0, 1, 256)) * 255).astype(np.uint8)
        rgba = lut[np.clip(np.nan_to_num(heat) * 255, 0, 255).astype(np.uint8)]
        rgba[..., 3] = np.where(np.isfinite(heat), 150, 0)
        legend_w = 90
    else:
        colors = np.array([(*c, 140) for c in region_colors(len(sm.classes))] + [(0, 0, 0, 0)], np.uint8)
        colors[0, 3] = 0  # background stays clear
        rgba = colors[np.where(label_mask == 255, len(sm.classes), label_mask)]
        rows, cols = label_mask.shape
        legend_w = 20 + 9 * max(len(c) for c in sm.classes) + 30
    cell = region_size if label_mask is None else mask_scale
    over = Image.fromarray(rgba, "RGBA").resize((max(1, round(cols * cell * f)), max(1, round(rows * cell * f))),
                                                Image.Resampling.NEAREST)
    layer = Image.new("RGBA", thumb.size, (0, 0, 0, 0))
    layer.paste(over.crop((0, 0, min(over.width, thumb.width), min(over.height, thumb.height))), (0, 0))
    shown = Image.alpha_composite(thumb, layer).convert("RGB")
    top = 30
    canvas = Image.new("RGB", (shown.width + legend_w, shown.height + top), "white")
    canvas.paste(shown, (0, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 7), f"{title}: predicted {predicted}", fill="black", font=font)
    x0 = shown.width + 14
    if label_mask is None:
        bar_h = min(256, shown.height - 40)
        ramp = lut[np.linspace(255, 0, bar_h).astype(int), :3]
        canvas.paste(Image.fromarray(np.repeat(ramp[:, None, :], 18, axis=1)), (x0, top + 28))
        for v in (1.0, 0.5, 0.0):
            y = top + 28 + round((1 - v) * (bar_h - 1))
            draw.line([(x0 + 18, y), (x0 + 22, y)], fill="black")
            draw.text((x0 + 25, y - 8), f"{v:.1f}", fill="black", font=font)
        draw.text((x0 - 6, top + 2), f"P({sm.classes[target]})", fill="black", font=font)
    else:
        for i, name in enumerate(sm.classes[1:], start=1):
            y = top + 10 + 22 * (i - 1)
            draw.rectangle([x0, y, x0 + 14, y + 14], fill=tuple(int(v) for v in region_colors(len(sm.classes))[i]))
            draw.text((x0 + 20, y - 1), name, fill="black", font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", compress_level=3)  # 1.7x faster than the default (6), 6 % larger


def score_one(sm: ScoreModel, row: SlideRow, cache_file: Path, out: Path) -> dict[str, Any]:
    """Score one cached slide and write its outputs; returns the prediction record."""
    t0 = time.perf_counter()
    sf = load_features(cache_file)
    stored = sf.settings
    key = sm.encoder_key()
    k = _mismatch(stored, key) if stored and key.get("encoder") else None
    if k is not None:
        raise CacheError(f"{cache_file}: features made with {k}={stored.get(k)!r} but the model was trained "
                         f"on {key.get(k)!r}; score with the model's own encoder settings (drop --cache to "
                         "extract anew) or use a cache made with them")
    pred = _predict(sm, sf.features, sf.grid)
    with _slide_folder(out, row.slide_id) as folder:
        return _score_outputs(sm, row, sf, cache_file, pred, folder, t0)


@contextlib.contextmanager
def _slide_folder(out: Path, slide_id: str) -> Any:
    """A hidden ``OUT_DIR/.<slide_id>.partial`` folder to write a slide's outputs into, moved into place whole
    as ``OUT_DIR/<slide_id>`` (replacing an earlier result or failure) when the block succeeds, removed when it
    fails: a killed or failed slide leaves no half set of outputs."""
    final, folder = out / slide_id, out / f".{slide_id}.partial"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(folder, final)


def _score_outputs(sm: ScoreModel, row: SlideRow, sf: Any, cache_file: Path, pred: dict[str, Any], folder: Path,
                   t0: float) -> dict[str, Any]:
    """Write one slide's outputs into ``folder``; returns the prediction record."""
    probs = pred["slide"]
    predicted = sm.classes[int(np.argmax(probs))] if sm.task == "classification" else \
        sm.classes[int(np.argmax(probs[1:])) + 1] if len(probs) > 1 else sm.classes[0]
    size = float(sf.region_size_level0 or 0.0)
    if size <= 0:
        raise CacheError(f"{cache_file}: the region size is neither recorded nor told by the coordinates (no two "
                         "regions side by side); re-extract it with xtpath")
    cells = np.asarray(sf.grid, np.int64)  # (row, col) on the slide's own grid (CLAM's/TRIDENT's files too)
    with open_slide(row.path, mpp=row.mpp) as slide:  # closed now, not when the collector gets to it
        fingerprint = file_fingerprint(row.path)
        other = other_slide(sf.settings or {}, slide.dimensions, fingerprint)
        if other:
            raise CacheError(f"{cache_file}: {other}: slide_id {row.slide_id!r} was used for another file; "
                             "delete this cache file (it is made again) or use another --cache")
        if sf.source != "xtpath" and sm.region_um and slide.mpp:  # CLAM/TRIDENT: only the region size tells
            um = size * slide.mpp[0]
            if abs(um / sm.region_um - 1.0) > 0.1:
                raise CacheError(f"{cache_file}: its regions are {size:g} px wide at level 0, {um:.0f} µm on this "
                                 f"slide, but the model was trained on regions of {sm.region_um:.0f} µm; give "
                                 "--cache files patched at the training files' magnification and patch size")
        label_mask, mask_scale = None, 1.0
        if "masks" in pred:
            label_mask, mask_scale = _label_mask(sm, pred["masks"], cells, slide.dimensions, size)
            from xtpath.io.tiffwriter import label_names_metadata, write_pyramid_tiff

            mpp = slide.require_mpp()
            names = {**dict(enumerate(sm.classes)), 255: "not scored"}
            write_pyramid_tiff(folder / "mask.ome.tif", label_mask, (mpp[0] * mask_scale, mpp[1] * mask_scale),
                               compression="zlib", ome=True, min_size=64,
                               ome_metadata=label_names_metadata(names, f"{row.slide_id} segmentation"))
        _write_region_h5(folder / "regions.h5", sf.coords, sf.grid, pred["regions"], sm.classes, size)
        _write_geojson(folder / "regions.geojson", sm, sf.coords, pred["regions"], size, label_mask, mask_scale,
                       slide.dimensions)
        _heatmap_png(folder / "heatmap.png", slide, sm, cells, pred["regions"], size, label_mask, mask_scale,
                     predicted, row.slide_id)
        rec = {"slide_id": row.slide_id, "status": "ok", "predicted": predicted,
               "probs": {c: float(p) for c, p in zip(sm.classes, probs)}, "n_regions": int(len(sf)),
               "seconds": time.perf_counter() - t0, "task": sm.task, "classes": sm.classes,
               "slide_path": str(row.path), "slide_fingerprint": fingerprint,
               "slide_mpp": list(slide.require_mpp()), "slide_dimensions": list(slide.dimensions),
               "region_size_level0": size, "model": str(sm.run_dir.resolve())}
        if label_mask is not None:
            rec["mask_scale"] = mask_scale  # level-0 pixels per mask.ome.tif pixel
    write_json(folder / "prediction.json", rec)
    return rec


def _score_rows(sm: ScoreModel, rows: Sequence[SlideRow], cache: Path, out: Path, device: str,
                progress: Callable[[str, dict[str, Any]], None], batch_size: int | None,
                no_extract: bool = False) -> ScoreSummary:
    from xtpath.extract import encoder_settings, extract_on_device

    summary = ScoreSummary()
    done = scored_ids(out, sm.classes)
    todo = [r for r in rows if r.slide_id not in done]
    summary.skipped = [r.slide_id for r in rows if r.slide_id in done]
    for sid in summary.skipped:
        progress("slide_done", {"slide_id": sid, "status": "cached"})
    need = [r for r in todo if not cache_path(cache, r.slide_id).exists()]
    if need and no_extract:  # the extraction ran before (the cluster workflow): its failure is the slide's
        recorded = extraction_failures(cache)
        for r in need:
            summary.failed[r.slide_id] = recorded.get(r.slide_id) or (
                f"no feature cache {cache_path(cache, r.slide_id)}; run xtpath extract first (or drop "
                "--no-extract)")
    elif need and not sm.extract.get("encoder"):  # trained on CLAM/TRIDENT files: nothing here can make them
        for r in need:
            summary.failed[r.slide_id] = (
                f"no feature cache {cache_path(cache, r.slide_id)}; the model {sm.run_dir} was trained on feature "
                "files not made by xtpath (its run has no extract.json), so xtpath cannot make them for this slide: "
                "give --cache with the slide's feature file from the same extractor")
    elif need:
        ecfg = sm.extract_config()
        if batch_size:
            ecfg.batch_size = batch_size
        ex = extract_on_device(need, ecfg, cache, device, encoder_settings(ecfg),
                               lambda e, d: progress("extract_" + e, d))
        for sid, msg in ex.failed.items():
            summary.failed[sid] = _in_score_terms(msg, sm)
    for row in todo:
        check_stop()
        if row.slide_id in summary.failed:
            _record_score_failure(out, row, summary.failed[row.slide_id], "ExtractionError")
            progress("slide_done", {"slide_id": row.slide_id, "status": "failed",
                                    "message": summary.failed[row.slide_id]})
            continue
        try:
            rec = score_one(sm, row, cache_path(cache, row.slide_id), out)
        except (XtpathError, OSError, ValueError, RuntimeError) as e:
            msg = record_failure(out, row, e)
            summary.failed[row.slide_id] = msg
            _write_failed_record(out, row, type(e).__name__, msg)
            progress("slide_done", {"slide_id": row.slide_id, "status": "failed", "message": msg})
            continue
        _append_prediction(out, sm.classes, rec)
        clear_failure(out, row.slide_id)
        summary.scored.append(row.slide_id)
        progress("slide_done", {"slide_id": row.slide_id, "status": "done", "predicted": rec["predicted"],
                                "regions": rec["n_regions"], "seconds": rec["seconds"]})
    return summary


def _in_score_terms(msg: str, sm: ScoreModel) -> str:
    """An extraction failure that suggests extract's options (``--min-tissue``, ``--target-mpp``...), which score
    does not take: say where its settings come from and how to change them."""
    if not any(opt in msg for opt in ("--target-mpp", "--region-px", "--min-tissue", "--preset", "--tissue-mode")):
        return msg
    return (f"{msg} (xtpath score extracts with the training run's settings, {sm.run_dir / 'extract.json'}; to "
            "change them, make the cache with xtpath extract, the same encoder, --target-mpp and --region-px, and "
            "pass it with --cache)")


#: Names ``xtpath score`` (and ``report``) use inside ``OUT_DIR``: a slide's folder of that name would replace
#: them, or fail to be made.
RESERVED_NAMES = ("cache", "report", "score.json", PREDICTIONS_CSV, "failures.csv")


def _check_reserved_ids(rows: Sequence[SlideRow], out: Path, cache: Path) -> None:
    """A slide whose ``slide_id`` is one of the names score keeps in ``OUT_DIR`` (or the cache folder's, when it
    is in ``OUT_DIR``) would overwrite it with its outputs: refused before anything is done."""
    reserved = set(RESERVED_NAMES)
    if cache.parent.resolve() == out.resolve():
        reserved.add(cache.name)
    bad = [f"{r.where}: slide_id {r.slide_id!r} is a name xtpath score uses in {out} "
           f"({', '.join(sorted(reserved))}); rename the slide in the CSV" for r in rows if r.slide_id in reserved]
    if bad:
        raise ManifestError("\n".join(bad))


def _write_failed_record(out: Path, row: SlideRow, error: str, msg: str) -> None:
    """``OUT_DIR/<slide_id>/`` holding only the failure's ``prediction.json``: the outputs of an earlier
    result of this slide go with it (they no longer describe its state)."""
    with _slide_folder(out, row.slide_id) as folder:
        write_json(folder / "prediction.json", {"slide_id": row.slide_id, "status": "failed", "error": error,
                                                "message": msg, "time": failure_time()})


def _record_score_failure(out: Path, row: SlideRow, msg: str, error: str) -> None:
    class _E(Exception):
        pass

    _E.__name__ = error
    record_failure(out, row, _E(msg))
    _write_failed_record(out, row, error, msg)


def _device_worker(rank: int, run_dir: str, rows: list[SlideRow], cache: str, out: str, devices: list[str],
                   batch_size: int | None, weights: str | None, no_extract: bool, queue: Any) -> None:
    sm = load_run(run_dir, devices[rank], weights)
    mine = [r for i, r in enumerate(rows) if i % len(devices) == rank]
    s = _score_rows(sm, mine, Path(cache), Path(out), devices[rank], lambda e, d: queue.put((e, d)), batch_size,
                    no_extract)
    queue.put(("summary", asdict(s)))


def score_slides(rows: Sequence[SlideRow], run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                 cache_dir: str | os.PathLike[str] | None = None, devices: Sequence[str] = ("cpu",),
                 shard: tuple[int, int] = (0, 1), batch_size: int | None = None,
                 progress: Callable[[str, dict[str, Any]], None] | None = None,
                 weights: str | os.PathLike[str] | None = None, rescore: bool = False,
                 no_extract: bool = False) -> ScoreSummary:
    """Extract what is not cached yet (with the run's encoder settings), then score each slide.

    ``no_extract``: score only what is cached; a slide without a cache fails with the reason its extraction
    failed (from the cache's ``failures.csv``), as the cluster workflow wants after its own extract step.

    Slides already in ``predictions.csv`` are skipped, unless ``rescore``: their rows are dropped and they are
    scored again (their outputs are replaced).

    Several devices: one worker process per device, slides divided among them. ``shard=(I, N)`` keeps rows
    ``I, I+N, ...`` (for array jobs). ``OUT_DIR/score.json`` names the model; an ``OUT_DIR`` holding another
    model's predictions is refused. ``weights``: see :func:`load_run`.
    """
    if batch_size is not None and batch_size < 1:
        raise InvalidParameterError(f"--batch-size {batch_size}: must be at least 1 (regions per encoder batch)")
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    progress = progress or (lambda e, d: None)
    rows = shard_rows(rows, shard)
    _check_reserved_ids(rows, out, cache)
    t0 = time.perf_counter()
    sm = load_run(run_dir, devices[0] if len(devices) == 1 else "cpu", weights)
    _check_cache_dir(sm, rows, cache)  # before OUT_DIR is made: a refused run leaves nothing behind
    out.mkdir(parents=True, exist_ok=True)
    _claim_out_dir(sm, out)
    if rescore:
        _drop_predictions(out, sm.classes, {r.slide_id for r in rows})
        if cache.resolve() == (out / "cache").resolve():
            _drop_caches_of_other_files(cache, rows)
    else:
        _check_scored_files(out, sm.classes, rows)
    if len(devices) <= 1:
        summary = _score_rows(sm, rows, cache, out, devices[0] if devices else "cpu", progress, batch_size,
                              no_extract)
    else:
        summary = ScoreSummary()
        args = [(r, str(run_dir), list(rows), str(cache), str(out), list(devices), batch_size,
                 str(weights) if weights else None, no_extract)
                for r in range(len(devices))]
        for data in run_device_workers(_device_worker, args, progress):
            summary.merge(ScoreSummary(**data))
    summary.seconds = time.perf_counter() - t0
    return summary


def _mismatch(stored: dict[str, Any], key: dict[str, Any]) -> str | None:
    """The first setting of ``key`` a cache's ``stored`` settings differ in (settings the run did not record
    are not compared), or ``None``."""
    return next((k for k, want in key.items() if want is not None and not same_setting(stored.get(k), want)), None)


def _claim_out_dir(sm: ScoreModel, out: Path) -> None:
    """Record the model in ``OUT_DIR/score.json``, or refuse an ``OUT_DIR`` that holds another model's scores
    (a rerun skips the slides already in predictions.csv, which would silently keep the other model's)."""
    me = sm.identity()
    path = out / "score.json"
    if path.exists():
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError):
            before = {}
        if before.get("model_sha256") not in (None, me["model_sha256"]):
            raise CacheError(f"{out} holds the predictions of another model ({before.get('model')}); score "
                             f"{me['model']} into another --out (or delete {out} to start over)")
        return
    write_json(path, me)


def _check_scored_files(out: Path, classes: Sequence[str], rows: Sequence[SlideRow]) -> None:
    """A slide_id already scored from one file, now given with another (other bytes, not just moved), would be
    skipped with the old file's scores: all such rows are an error before any work."""
    done = scored_ids(out, classes)
    problems = []
    for r in rows:
        rec_path = out / r.slide_id / "prediction.json"
        if r.slide_id not in done or not rec_path.exists():
            continue
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            continue
        before = rec.get("slide_fingerprint")
        if rec.get("slide_path") == str(r.path) or not before or not Path(r.path).exists():
            continue
        if file_fingerprint(r.path) != before:
            problems.append(f"{r.where}: {r.slide_id} was scored from {rec.get('slide_path')}, and {r.path} is "
                            "another file")
    if problems:
        raise InvalidParameterError("\n".join(problems) + "\nscore them again with --rescore (and --only), or use "
                                    "another --out")


def _check_cache_dir(sm: ScoreModel, rows: Sequence[SlideRow], cache: Path) -> None:
    """A model refuses caches made by another encoder: all such slides listed before any work."""
    key = sm.encoder_key()
    if not key.get("encoder"):
        return
    problems = []
    for r in rows:
        f = cache_path(cache, r.slide_id)
        if not f.exists():
            continue
        try:
            s = read_settings(f)
        except CacheError:
            continue  # an unreadable file fails its own slide (recorded), not the batch
        if not s:
            continue
        k = _mismatch(s, key)
        if k is not None:
            problems.append(f"{f}: made with {k}={s.get(k)!r} but the model was trained on {key[k]!r}")
    if problems:
        raise CacheError("\n".join(problems) + "\nscore with the model's own encoder: drop --cache (features are "
                                               "then extracted into OUT_DIR/cache) or give a cache made with it")


def read_predictions(out_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    path = Path(out_dir) / PREDICTIONS_CSV
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def gather_predictions(out_dir: str | os.PathLike[str], rows: Sequence[SlideRow]) -> tuple[int, int]:
    """Rebuild ``predictions.csv`` and ``failures.csv`` from the per-slide ``prediction.json`` records, in CSV
    order (what the cluster workflow's last step does). Returns (scored, failed)."""
    out = Path(out_dir)
    recs = []
    for r in rows:
        p = out / r.slide_id / "prediction.json"
        if p.exists():
            recs.append(json.loads(p.read_text()))
    ok = [x for x in recs if x.get("status") == "ok"]
    bad = [x for x in recs if x.get("status") != "ok"]
    classes = list(ok[0]["probs"]) if ok else []
    with _locked(out):
        if ok:
            lines = [",".join(_header(classes))] + [_prediction_line(x, classes) for x in ok]
            with atomic_path(out / PREDICTIONS_CSV) as tmp:
                tmp.write_text("\n".join(lines) + "\n")
        by_id = {r.slide_id: r for r in rows}
        with atomic_path(out / "failures.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["slide_id", "path", "error", "message", "time"])
            for x in bad:
                w.writerow([x["slide_id"], str(by_id[x["slide_id"]].path), x.get("error", ""), x.get("message", ""),
                            x.get("time", "")])
    return len(ok), len(bad)


@dataclass
class LiveUpdate:
    """Partial result of :func:`iter_score_slide`: the regions encoded so far and the model's view of them.

    Attributes
    ----------
    done, total : int
        Regions encoded so far and in all.
    coords : (n, 2) int64
        Level-0 ``(x, y)`` of the regions encoded so far.
    cells : (n, 2) int64
        ``(row, col)`` of those regions on the slide's region grid.
    region_probs : (n, C) float
        Per-region class probabilities (None until the first model run).
    slide_probs : (C,) float or None
        Slide-level probabilities from the regions encoded so far (final when ``done == total``).
    region_size : float
        Region side in level-0 pixels.
    classes : list of str
    """

    done: int
    total: int
    coords: np.ndarray
    cells: np.ndarray
    region_probs: np.ndarray | None
    slide_probs: np.ndarray | None
    region_size: float
    classes: list[str]


def iter_score_slide(sm: ScoreModel, slide_path: str | os.PathLike[str], *, mpp: float | None = None,
                     box_xywh: tuple[float, float, float, float] | None = None, chunk: int = 16,
                     updates: int = 8) -> Any:
    """Score one slide interactively: yields a :class:`LiveUpdate` after each chunk of regions.

    The model runs on the regions encoded so far about ``updates`` times during the run (and at the end), so a
    viewer can fill a heatmap as regions finish. ``box_xywh`` (level-0 pixels) restricts the run to the regions
    that overlap it (e.g. the current field of view). Stop iterating to cancel.
    """
    from xtpath.extract import plan_slide
    from xtpath.io import SlideRow
    from xtpath.models.encoders import build_region_encoder

    ecfg = sm.extract_config()
    row = SlideRow(slide_id=Path(slide_path).stem, path=Path(slide_path), mpp=mpp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        encoder = build_region_encoder(ecfg.encoder, ecfg.weights, features=ecfg.features,  # type: ignore[arg-type]
                                       input_px=ecfg.encoder_px, device=sm.device, seed=ecfg.seed)
    slide, regions = plan_slide(row, ecfg, encoder.input_px)
    if box_xywh is not None:
        bx, by, bw, bh = box_xywh
        b = regions.boxes()
        keep = (b[:, 0] < bx + bw) & (b[:, 0] + b[:, 2] > bx) & (b[:, 1] < by + bh) & (b[:, 1] + b[:, 3] > by)
        if not keep.any():
            raise InvalidParameterError("no tissue region in the chosen field of view; zoom out or pick another "
                                        "part of the slide")
        regions = regions.take(np.nonzero(keep)[0])
    n = len(regions)
    loc = regions.locations()
    size = float(regions.region_size[0])
    every = max(1, math.ceil(n / max(1, updates)))
    feats: list[torch.Tensor] = []
    region_p = slide_p = None
    last_model_at = 0
    for s in range(0, n, chunk):
        idx = range(s, min(n, s + chunk))
        pix = np.stack([slide.read_region((float(loc[i, 0]), float(loc[i, 1])), (regions.read_px, regions.read_px),
                                          mpp=regions.read_mpp) for i in idx])
        with torch.inference_mode():
            feats.append(encoder(torch.from_numpy(pix).to(sm.device)).float().cpu())
        done = min(n, s + chunk)
        if done - last_model_at >= every or done == n:
            pred = _predict(sm, torch.cat(feats).numpy(), regions.grid[:done])
            region_p, slide_p = pred["regions"], pred["slide"]
            last_model_at = done
        yield LiveUpdate(done, n, regions.coords[:done], regions.grid[:done], region_p, slide_p, size,
                         list(sm.classes))
