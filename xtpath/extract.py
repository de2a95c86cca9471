"""``xtpath extract``: every tissue region of every slide through the region encoder, cached per slide in HDF5.

The pipeline per slide: tissue mask and region grid (main process) -> DataLoader worker processes read and decode
regions (each worker opens the slide itself) -> the main process encodes batches under ``torch.inference_mode``
(bf16/fp16 autocast and channels-last on GPU) -> features are written into a temporary HDF5 file that is renamed
into place when complete.

Reliability: a slide whose cache exists with the same settings is skipped (resume); a cache made with other
settings stops the run before any work unless ``overwrite``; a slide that fails (corrupt, no mpp, no tissue) is
written to ``CACHE_DIR/failures.csv`` and the batch goes on; a lock file per slide lets several processes (or
machines sharing a folder) work on the same CSV without doing a slide twice.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xtpath.cache import (
    CacheWriter,
    cache_path,
    feature_dtype,
    other_slide,
    read_settings,
    settings_differences,
)
from xtpath.errors import CacheError, InvalidParameterError, XtpathError
from xtpath.io import SlideRow, open_slide
from xtpath.io.files import atomic_path, file_fingerprint
from xtpath.stop import check_stop, request_stop
from xtpath.tiling import RegionGrid, check_resolution, encoder_reads, make_region_grid
from xtpath.tissue import TissueParams, detect_tissue, tissue_params

__all__ = ["ExtractConfig", "ExtractSummary", "extract_slides", "extract_on_device", "plan_slide",
           "wanted_settings", "encoder_settings", "record_failure", "clear_failure", "FAILURES_CSV"]

FAILURES_CSV = "failures.csv"
_FAILURE_FIELDS = ("slide_id", "path", "error", "message", "time")


@dataclass
class ExtractConfig:
    """Settings of an extraction run (the CLI options of ``xtpath extract``)."""

    encoder: str = "resnet18"
    """timm model name, alias (``uni``, ...) or timm model folder (``local-dir:FOLDER``, ``hf-hub:ORG/NAME``
    from the local Hugging Face cache), whose weights file is the default ``weights``."""
    weights: str | None = None
    """Local weights file; None = random init (tests and demos only)."""
    features: str = "pooled"
    """``pooled`` (one vector per region) or ``tokens`` (the region's token grid)."""
    target_mpp: float = 0.5
    """Microns per pixel of the regions."""
    region_px: int = 256
    """Region side in pixels at ``target_mpp``."""
    encoder_px: int | None = None
    """Encoder input side (default: the model's)."""
    tissue_preset: str = "default"
    """Tissue detector preset."""
    tissue_mode: str = "auto"
    """Tissue detector mode (auto, he, fluorescence)."""
    min_tissue: float = 0.25
    """Smallest tissue fraction of a kept region."""
    edge: str = "pad"
    """Partial edge regions: pad or drop."""
    order: str = "raster"
    """Region order in the file: raster or hilbert."""
    batch_size: int = 32
    """Regions per encoder batch."""
    num_workers: int | None = None
    """Reader processes per device (default: CPU cores - 1, at least 1, at most 8)."""
    backend: str = "auto"
    """Slide reader: ``auto``, ``openslide`` or ``tiffslide`` (not part of a cache's key: both give the same
    pixels). ``auto`` reads ``.tif`` with tiffslide, which is faster but decodes a damaged JPEG tile as grey
    where openslide reports it as a failure."""
    dtype: str | None = None
    """Stored feature type (default float32 for pooled, float16 for tokens)."""
    overwrite: bool = False
    """Redo slides whose cache exists (also when made with other settings)."""
    seed: int = 0
    """Seed of the random init when no weights are given."""

    def __post_init__(self) -> None:
        if ":" not in str(self.encoder):  # timm names and aliases: nothing to look up (and no torch import here)
            return
        from xtpath.errors import InvalidParameterError
        from xtpath.models.encoders import HUB_PREFIXES, hub_folder, hub_weights

        if str(self.encoder).startswith(HUB_PREFIXES):  # a timm model folder: its own weights file
            # settings of caches made elsewhere may name a folder that is not here: nothing is needed from it
            # until something is extracted, and building the encoder then says what is missing
            with contextlib.suppress(InvalidParameterError):
                if self.encoder.startswith("local-dir:"):
                    self.encoder = f"local-dir:{hub_folder(self.encoder)}"  # recorded absolute, like --weights
                if not self.weights:
                    self.weights = str(hub_weights(self.encoder))

    def tissue(self) -> TissueParams:
        return tissue_params(self.tissue_preset, mode=self.tissue_mode)

    def tissue_settings(self) -> dict[str, Any]:
        return {"params": asdict(self.tissue()), "min_tissue": self.min_tissue, "edge": self.edge}


@dataclass
class ExtractSummary:
    """What a run did, per slide id."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    busy: list[str] = field(default_factory=list)
    regions: int = 0
    seconds: float = 0.0

    def merge(self, other: "ExtractSummary") -> None:
        self.done += other.done
        self.skipped += other.skipped
        self.failed.update(other.failed)
        self.busy += other.busy
        self.regions += other.regions


# -- settings -------------------------------------------------------------------------------------------------------

def encoder_settings(cfg: ExtractConfig) -> dict[str, Any]:
    """The encoder part of a cache's key, computed without building the model."""
    import timm

    from xtpath.models.encoders import file_sha256, resolve_encoder

    spec = resolve_encoder(cfg.encoder)
    px = cfg.encoder_px or spec.input_px
    if px is None:
        pcfg = timm.models.get_pretrained_cfg(spec.arch)
        px = int(pcfg.input_size[-1]) if pcfg is not None else 224
    sha = file_sha256(cfg.weights) if cfg.weights else f"random-init:seed={cfg.seed}"
    return {"encoder": cfg.encoder, "weights_sha256": sha, "features_kind": cfg.features, "encoder_px": int(px)}


def config_of_cache(settings: dict[str, Any], weights: str | None = None) -> ExtractConfig:
    """The extraction settings that made a cache with these ``settings`` (its stored key), for a run that adopts
    existing caches to extract more slides the same way. ``weights``: the encoder's weights file, which a cache
    names only by its SHA-256 (random-init weights are rebuilt from their seed)."""
    from xtpath.tissue import PRESETS

    tissue = settings.get("tissue") or {}
    params = tissue.get("params") or {}
    preset, mode = "default", str(params.get("mode", "auto"))
    for name in PRESETS:  # the preset whose parameters these are (a cache stores them resolved)
        if asdict(tissue_params(name, mode=mode)) == params:
            preset = name
            break
    sha = str(settings.get("weights_sha256", ""))
    seed = int(sha.split("seed=")[1]) if sha.startswith("random-init:seed=") else 0
    return ExtractConfig(encoder=str(settings["encoder"]), weights=weights,
                         features=str(settings.get("features_kind", "pooled")),
                         target_mpp=float(settings["target_mpp"]), region_px=int(settings["region_px"]),
                         encoder_px=int(settings["encoder_px"]) if settings.get("encoder_px") else None,
                         tissue_preset=preset, tissue_mode=mode,
                         min_tissue=float(tissue.get("min_tissue", ExtractConfig.min_tissue)),
                         edge=str(tissue.get("edge", ExtractConfig.edge)),
                         order=str(settings.get("order", ExtractConfig.order)), seed=seed)


def wanted_settings(cfg: ExtractConfig, enc: dict[str, Any], slide_mpp: tuple[float, float]) -> dict[str, Any]:
    """Everything that identifies a slide's cache (see :data:`xtpath.cache.KEY_FIELDS`)."""
    from xtpath.cache import SCHEMA_VERSION

    return {"schema_version": SCHEMA_VERSION, **enc, "mpp": [float(slide_mpp[0]), float(slide_mpp[1])],
            "target_mpp": float(cfg.target_mpp), "region_px": int(cfg.region_px), "tissue": cfg.tissue_settings()}


# -- locks and the failures file ---------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _slide_lock(cache_dir: Path, slide_id: str) -> Iterator[bool]:
    """Hold ``CACHE_DIR/.locks/<slide_id>.lock`` while working on a slide; yields False if another live process
    holds it. A lock left by a dead process on this host is taken over."""
    d = cache_dir / ".locks"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{slide_id}.lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                host, pid = path.read_text().split()[:2]
            except (OSError, ValueError):
                host, pid = "", "0"
            if host == socket.gethostname() and not _pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            yield False
            return
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        try:
            yield True
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return
    yield False


@contextlib.contextmanager
def _failures_locked(cache_dir: Path) -> Iterator[Path]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".failures.lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        try:
            yield cache_dir / FAILURES_CSV
        finally:
            fcntl.flock(lk, fcntl.LOCK_UN)


def _rewrite_failures(cache_dir: Path, slide_id: str, new: dict[str, str] | None) -> None:
    with _failures_locked(cache_dir) as path:
        rows: list[dict[str, str]] = []
        if path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("slide_id") != slide_id]
        if new is not None:
            rows.append(new)
        if not rows and not path.exists():
            return
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=_FAILURE_FIELDS)
            w.writeheader()
            w.writerows(rows)


def failure_time() -> str:
    """The local time a failure is recorded with (``failures.csv``, a failed slide's ``prediction.json``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def record_failure(cache_dir: Path, row: SlideRow, err: BaseException) -> str:
    """Write (or replace) the slide's line in ``failures.csv`` and return the one-line reason."""
    msg = _one_line(err)
    _rewrite_failures(cache_dir, row.slide_id, {"slide_id": row.slide_id, "path": str(row.path),
                                                "error": type(err).__name__, "message": msg,
                                                "time": failure_time()})
    return msg


def extraction_failures(cache_dir: Path) -> dict[str, str]:
    """``slide_id -> reason`` of the failures recorded in ``cache_dir``'s ``failures.csv``."""
    path = Path(cache_dir) / FAILURES_CSV
    if not path.exists():
        return {}
    with _failures_locked(Path(cache_dir)), open(path, newline="") as f:
        return {r["slide_id"]: r.get("message") or "failed" for r in csv.DictReader(f) if r.get("slide_id")}


def clear_failure(cache_dir: Path, slide_id: str) -> None:
    _rewrite_failures(cache_dir, slide_id, None)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if "Original Traceback" in text:  # an error re-raised from a DataLoader worker: keep its last line
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split()) or type(err).__name__


# -- per-slide work ---------------------------------------------------------------------------------------------

class _RegionDataset:
    """Regions of one slide as uint8 ``(S, S, 3)`` tensors; the slide reopens itself in each worker process."""

    def __init__(self, slide: Any, locations: np.ndarray, read_mpp: float, read_px: int) -> None:
        self.slide, self.locations, self.read_mpp, self.read_px = slide, locations, read_mpp, read_px

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, i: int) -> Any:
        import torch

        x, y = self.locations[i]
        px = self.slide.read_region((float(x), float(y)), (self.read_px, self.read_px), mpp=self.read_mpp)
        return torch.from_numpy(px)


def _reader_init(worker_id: int) -> None:
    """Reader processes yield the CPU to the encoder: when a reader preempts one of the encoder's OpenMP
    threads, the whole parallel operation waits for it. Niced readers run in the encoder's idle moments."""
    nice = int(os.environ.get("XTPATH_READER_NICE", "10"))
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)
    sys.excepthook = _quiet_when_parent_left


def _quiet_when_parent_left(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    """In a reader process, a connection error means the main process stopped (Ctrl-C, SIGTERM) while taking a
    batch (multiprocessing's resource sharer reports it through ``sys.excepthook``): the main process says so in
    one line, the reader has nothing to add."""
    if not issubclass(exc_type, (BrokenPipeError, ConnectionResetError, EOFError)):
        sys.__excepthook__(exc_type, exc, tb)


def plan_slide(row: SlideRow, cfg: ExtractConfig, encoder_px: int) -> tuple[Any, RegionGrid]:
    """Open a slide, find its tissue and cut its region grid (raises :class:`XtpathError` subclasses)."""
    slide = open_slide(row.path, mpp=row.mpp, backend=cfg.backend)
    try:
        check_resolution(row.path, slide.require_mpp(), cfg.target_mpp, cfg.region_px)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "no tissue" is reported below as a failure
            tm = detect_tissue(slide, cfg.tissue(), keep_image=False)
        regions = make_region_grid(slide.dimensions, slide.mpp, cfg.target_mpp, cfg.region_px,
                                   encoder_px=encoder_px, tissue=tm, min_tissue=cfg.min_tissue, edge=cfg.edge,
                                   order=cfg.order)  # type: ignore
        if len(regions) == 0:
            # a slide smaller than one region: the likelier reason is a wrong mpp (millimetres for microns)
            check_resolution(row.path, slide.require_mpp(), cfg.target_mpp, cfg.region_px, slide.dimensions)
            raise NoTissueError(f"{row.path}: no region has at least {cfg.min_tissue:.0%} tissue "
                                f"(tissue area {tm.area_mm2:.3f} mm²); check the slide or lower --min-tissue")
    except BaseException:
        slide.close()  # a batch of a thousand slides must not keep the failed ones open
        raise
    return slide, regions


class NoTissueError(XtpathError):
    """A slide gives no tissue region."""


Progress = Callable[[str, dict[str, Any]], None]


def _autocast(device: Any) -> Any:
    import torch

    if device.type == "cuda":
        dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dt)
    return contextlib.nullcontext()


def _encode_slide(row: SlideRow, encoder: Any, cfg: ExtractConfig, cache_dir: Path, enc: dict[str, Any],
                  progress: Progress, num_workers: int, upsampled: list[str] | None = None) -> int:
    slide, regions = plan_slide(row, cfg, encoder.input_px)
    finest = min(slide.require_mpp())
    if upsampled is not None and regions.read_mpp < finest * (1 - UPSAMPLE_TOLERANCE):
        if not upsampled:  # once per run: a thousand slides scanned at 20x would say it a thousand times
            warnings.warn(f"{row.path}: regions are read at {regions.read_mpp:.4g} µm/px, finer than the slide's "
                          f"level 0 ({finest:.4g} µm/px), so the encoder sees its pixels blown up "
                          f"{finest / regions.read_mpp:.2g}x (said for the first such slide only); use a coarser "
                          "--target-mpp or a larger --region-px, or check the slide's mpp", UserWarning, stacklevel=2)
        upsampled.append(row.slide_id)
    with slide:
        return _encode_planned(row, slide, regions, encoder, cfg, cache_dir, enc, progress, num_workers)


def _encode_planned(row: SlideRow, slide: Any, regions: RegionGrid, encoder: Any, cfg: ExtractConfig,
                    cache_dir: Path, enc: dict[str, Any], progress: Progress, num_workers: int) -> int:
    import torch
    from torch.utils.data import DataLoader

    wanted = wanted_settings(cfg, enc, slide.mpp)
    k = regions.subregions_per_side
    dataset = _RegionDataset(slide, regions.locations(), regions.read_mpp, regions.read_px)
    device = next(encoder.parameters()).device
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=num_workers, shuffle=False,  # type: ignore
                        pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None,
                        worker_init_fn=_reader_init if num_workers else None)
    dtype = cfg.dtype or ("float16" if cfg.features == "tokens" else "float32")
    progress("slide_start", {"slide_id": row.slide_id, "regions": len(regions)})
    extra = {"slide_id": row.slide_id, "slide_path": str(row.path), "slide_fingerprint": file_fingerprint(row.path),
             "read_mpp": regions.read_mpp,
             "normalize_mean": encoder.mean.flatten().div(255.0).tolist(),
             "normalize_std": encoder.std.flatten().div(255.0).tolist(),
             "subregions_per_side": k, "token_grid": list(encoder.token_grid) if encoder.token_grid else None,
             "order": regions.order}
    with CacheWriter(cache_path(cache_dir, row.slide_id), regions, feature_shape=encoder.feature_shape(k),
                     settings=wanted, name=row.slide_id, dtype=dtype, objective_power=slide.objective_power,
                     extra_attrs=extra) as writer:
        start = 0
        with torch.inference_mode(), _autocast(device):
            for batch in loader:
                check_stop()
                feats = encoder(batch.to(device, non_blocking=True))
                writer.write(start, feats.float().cpu().numpy())
                start += len(batch)
                progress("regions", {"n": len(batch)})
    return len(regions)


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def extract_on_device(rows: Sequence[SlideRow], cfg: ExtractConfig, cache_dir: Path, device: str,
                      enc_settings: dict[str, Any], progress: Progress) -> ExtractSummary:
    """Extract ``rows`` on one device in this process (no preflight; see :func:`extract_slides`)."""
    import torch

    from xtpath.models.encoders import build_region_encoder

    summary = ExtractSummary()
    encoder = None
    workers = cfg.num_workers if cfg.num_workers is not None else _default_workers()
    upsampled: list[str] = []  # slides read finer than their level 0
    for row in rows:
        check_stop()
        out = cache_path(cache_dir, row.slide_id)
        if out.exists() and not cfg.overwrite:
            summary.skipped.append(row.slide_id)
            progress("slide_done", {"slide_id": row.slide_id, "status": "cached"})
            continue
        with _slide_lock(cache_dir, row.slide_id) as mine:
            if not mine:
                summary.busy.append(row.slide_id)
                progress("slide_done", {"slide_id": row.slide_id, "status": "busy"})
                continue
            if out.exists() and not cfg.overwrite:  # finished by another process meanwhile
                summary.skipped.append(row.slide_id)
                progress("slide_done", {"slide_id": row.slide_id, "status": "cached"})
                continue
            if encoder is None:  # outside the per-slide try: weights that do not fit fail every slide, so stop
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    encoder = build_region_encoder(cfg.encoder, cfg.weights, features=cfg.features,  # type: ignore
                                                   input_px=enc_settings["encoder_px"], device=device,
                                                   seed=cfg.seed)
                if torch.device(device).type == "cuda":
                    encoder = encoder.to(memory_format=torch.channels_last)
            try:
                t0 = time.perf_counter()
                n = _encode_slide(row, encoder, cfg, cache_dir, enc_settings, progress, workers, upsampled)
                summary.done.append(row.slide_id)
                summary.regions += n
                clear_failure(cache_dir, row.slide_id)
                progress("slide_done", {"slide_id": row.slide_id, "status": "done", "regions": n,
                                        "seconds": time.perf_counter() - t0})
            except (XtpathError, OSError, RuntimeError, ValueError) as e:
                if isinstance(e, RuntimeError) and not _is_worker_error(e):
                    raise
                msg = record_failure(cache_dir, row, e)
                summary.failed[row.slide_id] = msg
                progress("slide_done", {"slide_id": row.slide_id, "status": "failed", "message": msg})
    return summary


def _is_worker_error(e: BaseException) -> bool:
    return "DataLoader worker" in str(e) or "Original Traceback" in str(e)


def preflight(rows: Sequence[SlideRow], cfg: ExtractConfig, cache_dir: Path, enc: dict[str, Any]) -> None:
    """Stop before any work if a cache exists with other settings (unless ``overwrite``): all at once."""
    if cfg.overwrite:
        return
    problems, kept = [], []
    for row in rows:
        path = cache_path(cache_dir, row.slide_id)
        if not path.exists():
            continue
        try:
            stored = read_settings(path)
        except CacheError as e:
            problems.append(str(e))
            continue
        if stored is None:
            problems.append(f"{path}: not an xtpath cache (no settings)")
            continue
        try:
            with open_slide(row.path, mpp=row.mpp, backend=cfg.backend) as slide:
                mpp, dims = slide.require_mpp(), slide.dimensions
        except XtpathError:
            continue  # the slide itself is the problem; it will be reported as a failure
        other = other_slide(stored, dims, file_fingerprint(row.path))
        if other:
            problems.append(f"{path}: {other} ({row.where}: {row.path})")
            continue
        diffs = settings_differences(stored, wanted_settings(cfg, enc, mpp))
        if diffs:
            problems.append(f"{path}: made with other settings ({'; '.join(diffs)})")
            continue
        other = _kept_as_made(path, stored, cfg)
        if other:
            kept.append(f"{row.slide_id} has {other}")
    if problems:
        raise CacheError("\n".join(problems) + "\nrerun with --overwrite to redo these slides, or use another --out")
    if kept:
        more = ", ..." if len(kept) > 1 else ""
        warnings.warn(f"{len(kept)} slide(s) already cached are kept as they were made ({kept[0]}{more}): the "
                      "region order and the feature dtype do not make a cache stale; pass --overwrite to make them "
                      "again", UserWarning, stacklevel=3)


def _kept_as_made(path: Path, stored: dict[str, Any], cfg: ExtractConfig) -> str:
    """What a cache with this run's key settings keeps that this run asks otherwise (``--order``, ``--dtype``)."""
    out = []
    if str(stored.get("order", "raster")) != cfg.order:
        out.append(f"order {stored.get('order', 'raster')} (asked {cfg.order})")
    if cfg.dtype:
        have = feature_dtype(path)
        if have != cfg.dtype:
            out.append(f"dtype {have} (asked {cfg.dtype})")
    return ", ".join(out)


def _device_worker(rank: int, rows: list[SlideRow], cfg: ExtractConfig, cache_dir: Path, devices: list[str],
                   enc: dict[str, Any], queue: Any) -> None:
    mine = [r for i, r in enumerate(rows) if i % len(devices) == rank]

    def progress(event: str, data: dict[str, Any]) -> None:
        queue.put((event, data))

    summary = extract_on_device(mine, cfg, cache_dir, devices[rank], enc, progress)
    queue.put(("summary", asdict(summary)))


def check_config(cfg: ExtractConfig) -> None:
    """One-line errors for settings no extraction can run with (before any warning, folder or progress bar)."""
    if cfg.features not in ("pooled", "tokens"):
        raise InvalidParameterError(f"--features {cfg.features!r}: use pooled or tokens")
    if not (isinstance(cfg.region_px, int) and cfg.region_px > 0):
        raise InvalidParameterError(f"--region-px {cfg.region_px}: must be a positive whole number of pixels, "
                                    "e.g. 256")
    if not (cfg.target_mpp > 0 and math.isfinite(cfg.target_mpp)):
        raise InvalidParameterError(f"--target-mpp {cfg.target_mpp}: must be positive (microns per pixel, e.g. 0.5)")
    if not 0.0 <= cfg.min_tissue <= 1.0:
        hint = f" ({cfg.min_tissue:g} % is {cfg.min_tissue / 100:g})" if 1 < cfg.min_tissue <= 100 else ""
        raise InvalidParameterError(f"--min-tissue {cfg.min_tissue:g}: must be a fraction between 0 and 1, e.g. 0.25"
                                    + hint)
    if cfg.batch_size < 1:
        raise InvalidParameterError(f"--batch-size {cfg.batch_size}: must be at least 1")
    if cfg.backend not in ("auto", "openslide", "tiffslide"):
        raise InvalidParameterError(f"--backend {cfg.backend!r}: use auto, openslide or tiffslide")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise InvalidParameterError(f"--workers {cfg.num_workers}: must be 0 (read in this process) or more")
    if cfg.weights:
        from xtpath.models.encoders import weights_path

        weights_path(cfg.weights)


#: Largest relative difference between the encoder's read resolution and ``--target-mpp`` that is not warned
#: about: CLAM's and TRIDENT's own practice (256-px patches resized to a 224-px encoder, 0.571 µm/px for a
#: 0.5 target, 14 %) and xtpath's defaults pass; a region twice the encoder's size read as one input does not.
READ_MPP_TOLERANCE = 0.15
#: Reading this much finer than a slide's level 0 (upsampling its pixels) is said once per run (an Aperio "40x"
#: slide of 0.2527 µm/px read at 0.25 is not worth a word; a 20x slide read at 0.25 is)
UPSAMPLE_TOLERANCE = 0.1


def _warn_read_resolution(cfg: ExtractConfig, encoder_px: int) -> None:
    """Say so when the encoder will see a resolution far from ``target_mpp``: a region that is not a whole
    number of encoder inputs is resized to ``k x k`` of them. Within :data:`READ_MPP_TOLERANCE` (the
    defaults: 256-px regions for a 224-px encoder, read at 0.571 µm/px for a target of 0.5) it says nothing,
    so that a warning on every default run does not teach people to ignore warnings."""
    k, read_mpp = encoder_reads(cfg.target_mpp, cfg.region_px, encoder_px)
    if abs(read_mpp / cfg.target_mpp - 1) > READ_MPP_TOLERANCE:
        warnings.warn(f"regions of {cfg.region_px} px are read as {k}x{k} encoder inputs of {encoder_px} px, at "
                      f"{read_mpp:.4g} µm/px rather than --target-mpp {cfg.target_mpp:g}; for inputs at "
                      f"{cfg.target_mpp:g} µm/px give --region-px {k * encoder_px} (a multiple of the encoder's "
                      f"{encoder_px} px) or an --encoder-px that divides {cfg.region_px}", UserWarning, stacklevel=3)


def extract_slides(rows: Sequence[SlideRow], cache_dir: str | os.PathLike[str], cfg: ExtractConfig, *,
                   devices: Sequence[str] = ("cpu",), progress: Progress | None = None) -> ExtractSummary:
    """Extract features of ``rows`` into ``cache_dir``.

    Parameters
    ----------
    rows : sequence of SlideRow
        From :func:`xtpath.io.read_slides_csv`.
    cache_dir : path-like
        Output folder: ``<slide_id>.h5`` per slide and ``failures.csv``.
    cfg : ExtractConfig
    devices : sequence of str
        ``["cpu"]``, ``["cuda:0"]``, or several CUDA devices: one process per device, slides divided among them.
    progress : callable, optional
        ``progress(event, data)`` with events ``slide_start``, ``regions``, ``slide_done``.

    Raises
    ------
    CacheError
        Before any work, when caches exist with other settings and ``overwrite`` is False.
    """
    cache = Path(cache_dir)
    check_config(cfg)
    enc = encoder_settings(cfg)
    _warn_read_resolution(cfg, int(enc["encoder_px"]))
    preflight(rows, cfg, cache, enc)
    cache.mkdir(parents=True, exist_ok=True)  # after every check: a refused run leaves no folder behind
    _clean_stale_temp(cache)
    progress = progress or (lambda event, data: None)
    t0 = time.perf_counter()
    devices = list(devices)
    if len(devices) <= 1:
        summary = extract_on_device(list(rows), cfg, cache, devices[0] if devices else "cpu", enc, progress)
    else:
        summary = ExtractSummary()
        for data in run_device_workers(
                _device_worker, [(r, list(rows), cfg, cache, devices, enc) for r in range(len(devices))], progress):
            summary.merge(ExtractSummary(**data))
    summary.seconds = time.perf_counter() - t0
    return summary


def run_device_workers(target: Callable[..., None], args: Sequence[tuple[Any, ...]],
                       progress: Callable[[str, Any], None]) -> list[dict[str, Any]]:
    """Run ``target(*a, queue)`` in one spawned process per ``a`` (one per device) and wait for them all.

    Workers put ``(event, data)`` progress events on the queue, which are passed to ``progress``, and a last
    ``("summary", dict)``; the summaries are returned. A worker that dies without its summary (killed, out of
    memory, a CUDA fault) stops the others and raises instead of leaving the parent waiting forever; what the
    workers wrote so far stays (every output is written atomically), so a rerun resumes.
    """
    import queue as queue_mod

    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(target, a, queue)) for a in args]
    for p in procs:
        p.start()
    summaries: list[dict[str, Any]] = []
    try:
        while len(summaries) < len(procs):
            try:
                event, data = queue.get(timeout=2.0)
            except queue_mod.Empty:
                dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    i, code = dead[0]
                    raise XtpathError(f"device worker {i} (of {len(procs)}) died with exit status {code} before "
                                      "finishing; see its messages above, then rerun to resume the missing slides")
                continue
            if event == "summary":
                summaries.append(data)
            elif event == "error":  # a problem of the whole run (weights that do not fit, ...): one line
                raise XtpathError(data)
            else:
                progress(event, data)
    finally:
        for p in procs:
            if p.is_alive() and len(summaries) < len(procs):
                p.terminate()
            p.join()
    return summaries


def _worker_main(target: Callable[..., None], args: tuple[Any, ...], queue: Any) -> None:
    """A device worker: ``target(*args, queue)``; an xtpath error goes to the parent as one line.

    Ctrl-C reaches every process of the terminal's group: the parent alone decides, and stops the workers with
    SIGTERM, which unwinds here like Ctrl-C (temporary files and locks removed) without a traceback per worker.
    """
    import signal

    def _stop(signum: int, frame: object) -> None:
        request_stop(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)
    try:
        target(*args, queue)
    except XtpathError as e:
        queue.put(("error", str(e)))
    except KeyboardInterrupt:
        pass


def _clean_stale_temp(cache: Path) -> None:
    """Remove ``.<slide>.h5.<pid>.<rand>.tmp`` files left by killed runs of this host."""
    for tmp in cache.glob(".*.h5.*.tmp"):
        parts = tmp.name.split(".")
        try:
            pid = int(parts[-3])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
