"""The ``xtpath`` command line.

Heavy libraries (torch, openslide, scikit-image, h5py) are imported inside the commands, so ``xtpath --help``
answers at once. Every error xtpath raises on purpose is printed as one line and exits with status 1.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="xtpath",
    help="xT for whole-slide pathology: read slides, find tissue, cut regions, encode, train and score.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from xtpath import __version__

        typer.echo(f"xtpath {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """xT for whole-slide pathology: read slides, find tissue, cut regions, encode, train and score."""


class Backend(str, Enum):
    auto = "auto"
    openslide = "openslide"
    tiffslide = "tiffslide"


class Preset(str, Enum):
    default = "default"
    biopsy = "biopsy"
    resection = "resection"


class Mode(str, Enum):
    auto = "auto"
    he = "he"
    fluorescence = "fluorescence"


class Edge(str, Enum):
    pad = "pad"
    drop = "drop"


class Order(str, Enum):
    raster = "raster"
    hilbert = "hilbert"


SlideArg = Annotated[Path, typer.Argument(help="Slide file (SVS, NDPI, TIFF, OME-TIFF, DICOM .dcm) or DICOM folder.",
                                          show_default=False)]
BackendOpt = Annotated[Backend, typer.Option(help="Slide library; auto picks the one suited to the format.")]
MppOpt = Annotated[Optional[float], typer.Option(
    "--mpp", help="Microns per level-0 pixel, overriding the file (needed when the file has none).")]


# exit status when the batch finished but some slides failed (they are listed in failures.csv)
EXIT_SLIDES_FAILED = 3


def _echo_err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


def _tissue_options(preset: Preset, mode: Mode, mask_mpp: Optional[float], min_area_um2: Optional[float]):
    from xtpath.tissue import tissue_params

    return tissue_params(preset.value, mode=mode.value, mask_mpp=mask_mpp, min_area_um2=min_area_um2)


@app.command()
def info(slide: SlideArg, backend: BackendOpt = Backend.auto, mpp: MppOpt = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:
    """Show a slide's format, size, pyramid, resolution (and where it came from) and objective power."""
    from xtpath.io import open_slide

    with open_slide(slide, backend=backend.value, mpp=mpp) as s:
        d = s.describe()
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(show_header=False, box=None)
    mpp_txt = f"{d['mpp'][0]:.4f} x {d['mpp'][1]:.4f} µm/px" if d["mpp"] else "unknown (pass --mpp)"
    if d["mpp_note"]:
        mpp_txt += f" [{d['mpp_note']}]"
    rows = [
        ("backend", d["backend"]), ("vendor", str(d["vendor"])),
        ("size", f"{d['dimensions'][0]} x {d['dimensions'][1]} px"),
        ("mpp", mpp_txt), ("mpp source", d["mpp_source"]),
        ("objective", f"{d['objective_power']:g}x" if d["objective_power"] else "unknown"),
        ("levels", str(d["level_count"])),
    ]
    for i, (dims, ds, gs) in enumerate(zip(d["level_dimensions"], d["level_downsamples"], d["level_grid_scales"])):
        grid = "" if abs(gs[0] - ds) < 1e-9 and abs(gs[1] - ds) < 1e-9 else f" (pixel grid scale {gs[0]:g})"
        rows.append((f"  level {i}", f"{dims[0]} x {dims[1]}  downsample {ds:.6g}{grid}"))
    rows.append(("associated", ", ".join(d["associated_images"]) or "-"))
    for k, v in rows:
        t.add_row(k, v)
    console = Console()
    console.print(str(slide), soft_wrap=True, markup=False, highlight=False)  # a long path stays whole
    console.print(t)


@app.command()
def tissue(
    slide: SlideArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the mask PNG, QC PNG and GeoJSON.")],
    preset: Annotated[Preset, typer.Option(help="Detector preset (sizes tuned for biopsies or resections).")]
    = Preset.default,
    mode: Annotated[Mode, typer.Option(help="he: coloured tissue on white; fluorescence: bright on dark.")]
    = Mode.auto,
    mask_mpp: Annotated[Optional[float], typer.Option(help="Mask resolution in µm/px (default 8).")] = None,
    min_area_um2: Annotated[Optional[float], typer.Option(min=0, help="Drop tissue pieces smaller than this (µm²).")]
    = None,
    backend: BackendOpt = Backend.auto,
    mpp: MppOpt = None,
) -> None:
    """Find tissue; write <slide>_tissue.png, <slide>_qc.png, <slide>_tissue.geojson and print the area."""
    import warnings

    from xtpath.io import open_slide
    from xtpath.tissue import detect_tissue, save_tissue_outputs

    params = _tissue_options(preset, mode, mask_mpp, min_area_um2)
    with open_slide(slide, backend=backend.value, mpp=mpp) as s:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            tm = detect_tissue(s, params)
        for w in caught:
            typer.echo(f"warning: {w.message}", err=True)
        paths = save_tissue_outputs(tm, out, s.name)
    typer.echo(f"{s.name}: tissue area {tm.area_mm2:.3f} mm² ({tm.mode}, mask {tm.mask.shape[1]}x{tm.mask.shape[0]} "
               f"at {tm.mpp[0]:.2f} µm/px)")
    for kind, p in paths.items():
        typer.echo(f"  {kind}: {p}")


@app.command()
def tile(
    slide: SlideArg,
    target_mpp: Annotated[float, typer.Option(help="Microns per pixel of the regions (0.5 is about 20x).")],
    region_px: Annotated[int, typer.Option(help="Region side in pixels at --target-mpp.")],
    encoder_px: Annotated[Optional[int], typer.Option(help="Region encoder input side (default: --region-px).")]
    = None,
    min_tissue: Annotated[float, typer.Option(help="Keep regions with at least this tissue fraction (extract's "
                                                   "default too), and some tissue even at 0 (--no-tissue keeps "
                                                   "every region).")] = 0.25,
    edge: Annotated[Edge, typer.Option(help="Partial regions at the slide edge: pad (keep) or drop.")] = Edge.pad,
    order: Annotated[Order, typer.Option(help="Region order: raster or along a Hilbert curve.")] = Order.raster,
    no_tissue: Annotated[bool, typer.Option("--no-tissue", help="Keep every region; skip tissue detection.")]
    = False,
    preset: Annotated[Preset, typer.Option(help="Tissue detector preset.")] = Preset.default,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write coordinates to FILE.h5 or FILE.csv.")]
    = None,
    backend: BackendOpt = Backend.auto,
    mpp: MppOpt = None,
) -> None:
    """Cut a slide into regions (nested tokenization); print how many hold tissue and save their coordinates."""
    import warnings

    from xtpath.errors import InvalidParameterError
    from xtpath.io import open_slide
    from xtpath.tiling import check_resolution, make_region_grid
    from xtpath.tissue import detect_tissue

    if out is not None and out.suffix.lower() not in (".h5", ".csv"):
        raise InvalidParameterError(f"--out {out}: use a .h5 or .csv file name")
    with open_slide(slide, backend=backend.value, mpp=mpp) as s:
        smpp = s.require_mpp()
        check_resolution(slide, smpp, target_mpp, region_px)
        tm = None
        if not no_tissue:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                tm = detect_tissue(s, _tissue_options(preset, Mode.auto, None, None), keep_image=False)
            for w in caught:
                typer.echo(f"warning: {w.message}", err=True)
        regions = make_region_grid(s.dimensions, smpp, target_mpp, region_px, encoder_px=encoder_px,
                                   tissue=tm, min_tissue=min_tissue, edge=edge.value, order=order.value)
        if len(regions) == 0:  # a slide smaller than one region says why (usually a wrong mpp)
            check_resolution(slide, smpp, target_mpp, region_px, s.dimensions)
        name, power = s.name, s.objective_power
    k = regions.subregions_per_side
    typer.echo(f"{name}: {len(regions)} regions of {region_px} px at {target_mpp:g} µm/px "
               f"({regions.region_size[0]:.1f} level-0 px; grid of {regions.grid_shape[0]} rows x {regions.grid_shape[1]} columns; "
               f"{k}x{k} encoder inputs of {regions.encoder_px} px each at {regions.read_mpp:.4g} µm/px)")
    if out is not None:
        if out.suffix.lower() == ".h5":
            from xtpath.cache import write_coords

            write_coords(out, regions, name=name, objective_power=power)
        else:
            from xtpath.io.files import write_text

            lines = ["x,y,row,col,tissue"] + [f"{x},{y},{r},{c},{t:.4f}" for (x, y), (r, c), t in
                                              zip(regions.coords, regions.grid, regions.tissue)]
            write_text(out, "\n".join(lines) + "\n")
        typer.echo(f"  coordinates: {out}")


class Features(str, Enum):
    pooled = "pooled"
    tokens = "tokens"


def parse_devices(spec: str) -> list[str]:
    """``auto`` | ``cpu`` | ``0,1`` | ``cuda:0,cuda:1`` -> torch device strings (checks CUDA is there)."""
    import torch

    from xtpath.errors import InvalidParameterError

    spec = spec.strip().lower()
    if spec == "auto":
        return ["cuda:0"] if torch.cuda.is_available() else ["cpu"]
    if spec == "cpu":
        return ["cpu"]
    devs = []
    for part in spec.split(","):
        part = part.strip()
        idx = part.split(":", 1)[1] if part.startswith("cuda:") else part
        if not idx.isdigit():
            raise InvalidParameterError(f"--devices {spec!r}: use auto, cpu, or GPU numbers such as 0,1")
        devs.append(f"cuda:{int(idx)}")
    n = torch.cuda.device_count()
    bad = [d for d in devs if int(d.split(":")[1]) >= n]
    if bad:
        raise InvalidParameterError(f"--devices {spec!r}: this machine has {n} CUDA device(s); use --devices cpu "
                                    "or existing GPU numbers")
    return devs


OnlyOpt = Annotated[Optional[list[str]], typer.Option(
    "--only", help="Process only this slide_id of the CSV (repeatable).")]


def _only(rows: list, only: Optional[list[str]]) -> list:
    if not only:
        return rows
    from xtpath.errors import InvalidParameterError

    ids = {r.slide_id for r in rows}
    unknown = [o for o in only if o not in ids]
    if unknown:
        raise InvalidParameterError(f"--only {', '.join(unknown)}: no such slide_id in the CSV")
    return [r for r in rows if r.slide_id in set(only)]


class _ExtractProgress:
    """Progress bar (slides done, regions/s) on stderr, plus one log line per slide."""

    def __init__(self, n_slides: int) -> None:
        import time

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._time = time.perf_counter
        self.console = Console(stderr=True, log_path=False)
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=self.console)
        self.task = self.bar.add_task("slides", total=n_slides, rate="")
        self.n_regions, self.t0 = 0, self._time()

    def __enter__(self) -> "_ExtractProgress":
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def __call__(self, event: str, data: dict) -> None:
        if event == "regions":
            self.n_regions += data["n"]
            rate = self.n_regions / max(self._time() - self.t0, 1e-9)
            self.bar.update(self.task, rate=f"{self.n_regions} regions, {rate:.1f} regions/s")
        elif event == "slide_done":
            sid, status = data["slide_id"], data["status"]
            if status == "done":
                self.bar.console.log(f"{sid}: {data['regions']} regions in {data['seconds']:.1f} s")
            elif status == "failed":
                self.bar.console.log(f"[red]{sid}: FAILED[/red] {data['message']}")
            elif status == "busy":
                self.bar.console.log(f"{sid}: being extracted by another process, skipped")
            else:
                self.bar.console.log(f"{sid}: already cached, skipped")
            self.bar.advance(self.task)


@app.command()
def extract(
    ctx: typer.Context,
    slides: Annotated[Path, typer.Argument(help="Slides CSV: slide_id,path[,mpp,...] (paths relative to the CSV).",
                                           show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Cache folder: <slide_id>.h5 per slide, failures.csv.")],
    encoder: Annotated[str, typer.Option(help="timm model name (with its tag, e.g. vit_small_patch16_224.dino: "
                                              "the tag sets the normalisation), alias (uni, ...), or a timm model "
                                              "folder: local-dir:FOLDER or hf-hub:ORG/NAME from the local Hugging "
                                              "Face cache; see README.")] = "resnet18",
    weights: Annotated[Optional[Path], typer.Option(help="Local weights (.safetensors, .pth, .bin; a model folder "
                                                         "has its own). Without: random init, for tests and demos "
                                                         "only.")] = None,
    features: Annotated[Features, typer.Option(help="pooled: one vector per region; tokens: the region's token grid "
                                                    "(xT's input).")] = Features.pooled,
    target_mpp: Annotated[float, typer.Option(help="Microns per pixel of the regions (0.5 is about 20x).")] = 0.5,
    region_px: Annotated[int, typer.Option(help="Region side in pixels at --target-mpp.")] = 256,
    encoder_px: Annotated[Optional[int], typer.Option(min=1, help="Encoder input side (default: the model's).")] = None,
    devices: Annotated[str, typer.Option(help="auto, cpu, or GPU numbers (0,1): one process per GPU.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Regions per encoder batch.")] = 32,
    workers: Annotated[Optional[int], typer.Option(help="Reader processes per device (default: cores - 1).")] = None,
    preset: Annotated[Preset, typer.Option(help="Tissue detector preset.")] = Preset.default,
    tissue_mode: Annotated[Mode, typer.Option(help="Tissue detector mode.")] = Mode.auto,
    min_tissue: Annotated[float, typer.Option(help="Keep regions with at least this tissue fraction.")] = 0.25,
    edge: Annotated[Edge, typer.Option(help="Partial regions at the slide edge: pad or drop.")] = Edge.pad,
    order: Annotated[Order, typer.Option(help="Region order in the cache file.")] = Order.raster,
    dtype: Annotated[Optional[str], typer.Option(help="Stored feature type: float32 or float16 (default: float32 "
                                                      "pooled, float16 tokens).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo slides that are cached already (also those "
                                                                "made with other settings).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random init when no --weights.")] = 0,
    backend: Annotated[Backend, typer.Option(help="Slide library; auto reads .tif with tiffslide (faster), which "
                                                  "decodes a damaged JPEG tile as grey where openslide reports "
                                                  "it.")] = Backend.auto,
    like: Annotated[Optional[Path], typer.Option(help="Take the encoder and region settings of this trained run "
                                                      "(its extract.json), for the features it was trained on.")]
    = None,
    only: OnlyOpt = None,
) -> None:
    """Encode every tissue region of every slide and cache the features per slide (resumes by default).

    Exit status 0 when every slide is cached, 3 when some failed (listed in OUT/failures.csv), 1 on errors.
    """
    from xtpath.errors import InvalidParameterError
    from xtpath.extract import FAILURES_CSV, ExtractConfig, check_config, extract_slides
    from xtpath.io import read_slides_csv

    if dtype not in (None, "float32", "float16"):
        raise InvalidParameterError(f"--dtype {dtype!r}: use float32 or float16")
    # a missing slide file is one failed slide of the batch (failures.csv), not a reason to stop the others
    rows = _only(read_slides_csv(slides, check_files=False, only=only), only)
    devs = parse_devices(devices)
    if like is not None:
        from xtpath.score import load_run

        clash = [f"--{n.replace('_', '-')}" for n in ("encoder", "features", "target_mpp", "region_px", "encoder_px",
                                                      "preset", "tissue_mode", "min_tissue", "edge", "order", "dtype",
                                                      "seed")
                 if getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"]  # typer's own click
        if clash:
            raise InvalidParameterError(f"--like {like} takes the encoder and region settings from the run; drop "
                                        f"{', '.join(clash)} (or drop --like to choose them yourself)")
        cfg = load_run(like, weights=weights).extract_config()
        cfg.batch_size, cfg.num_workers, cfg.overwrite = batch_size, workers, overwrite
        cfg.backend = backend.value
        encoder = cfg.encoder
    else:
        cfg = ExtractConfig(encoder=encoder, weights=str(weights) if weights else None, features=features.value,
                            target_mpp=target_mpp, region_px=region_px, encoder_px=encoder_px,
                            tissue_preset=preset.value, tissue_mode=tissue_mode.value, min_tissue=min_tissue,
                            edge=edge.value, order=order.value, batch_size=batch_size, num_workers=workers,
                            dtype=dtype, overwrite=overwrite, seed=seed, backend=backend.value)
    from xtpath.models.encoders import resolve_encoder

    resolve_encoder(cfg.encoder)  # an unknown name is an error before any warning or progress bar
    check_config(cfg)
    if not cfg.weights:  # (a timm model folder brings its own)
        from xtpath.models.encoders import random_weights_note

        typer.echo(f"warning: {random_weights_note(encoder)}", err=True)
    with _ExtractProgress(len(rows)) as prog:
        summary = extract_slides(rows, out, cfg, devices=devs, progress=prog)
    rate = summary.regions / summary.seconds if summary.seconds else 0.0
    typer.echo(f"{len(summary.done)} extracted ({summary.regions} regions, {rate:.1f} regions/s), "
               f"{len(summary.skipped)} cached, {len(summary.busy)} in progress elsewhere, "
               f"{len(summary.failed)} failed -> {out}")
    if summary.failed:
        typer.echo(f"failures are listed in {Path(out) / FAILURES_CSV}", err=True)
        raise typer.Exit(EXIT_SLIDES_FAILED)


class Task(str, Enum):
    classification = "classification"
    segmentation = "segmentation"


class TrainMode(str, Enum):
    cached = "cached"
    end2end = "end2end"


class Context(str, Enum):
    mamba = "mamba"
    transformer = "transformer"
    abmil = "abmil"
    mean = "mean"


@app.command()
def train(
    slides: Annotated[Path, typer.Argument(help="Slides CSV: slide_id,path,label[,split,case_id,mpp,mask].",
                                           show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (model, metrics, report, plots).")],
    config: Annotated[Optional[Path], typer.Option(help="YAML file with any of these options (CLI wins).")] = None,
    task: Annotated[Optional[Task], typer.Option(help="classification (slide labels; the default) or "
                                                     "segmentation (masks).")]
    = None,
    mode: Annotated[Optional[TrainMode], typer.Option(help="cached (the default): train on cached features; "
                                                           "end2end: train the region encoder too, in bounded "
                                                           "memory.")] = None,
    context: Annotated[Optional[Context], typer.Option(help="Context encoder over the region sequence (default "
                                                             "mamba).")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="Feature cache folder (default: OUT/cache).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs (default 20).")] = None,
    folds: Annotated[Optional[int], typer.Option(help="K-fold cross-validation over cases, K >= 3 (default: one "
                                                      "split).")]
    = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default 2e-4).")] = None,
    accumulate: Annotated[Optional[int], typer.Option(help="Slides per optimizer step (default 4).")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="Region encoder for missing caches or end2end "
                                                        "(default: what the caches were made with).")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Region encoder weights file.")] = None,
    features: Annotated[Optional[Features], typer.Option(help="Feature kind of caches built now.")] = None,
    target_mpp: Annotated[Optional[float], typer.Option(help="Microns per pixel of the regions.")] = None,
    region_px: Annotated[Optional[int], typer.Option(help="Region side in pixels.")] = None,
    encoder_px: Annotated[Optional[int], typer.Option(min=1, help="Encoder input side (default: the model's).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda[:N].")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of every random draw (default 0).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in OUT from its last epoch.")] = False,
) -> None:
    """Train a slide classifier or segmenter (xT: region encoder + long-context model over the whole slide).

    Splits come from the CSV's split column, or a stratified split by case_id, or --folds K. Run it under
    torchrun for several GPUs or nodes: torchrun --nproc_per_node=N -m xtpath train ...
    """
    import os

    from xtpath.train import load_config
    from xtpath.train import train as run_training

    overrides = {"task": task.value if task else None, "mode": mode.value if mode else None,
                 "context": context.value if context else None, "cache": str(cache) if cache else None,
                 "epochs": epochs, "folds": folds, "lr": lr, "accumulate": accumulate, "encoder": encoder,
                 "weights": str(weights) if weights else None, "features": features.value if features else None,
                 "target_mpp": target_mpp, "region_px": region_px, "encoder_px": encoder_px, "device": device,
                 "seed": seed}
    cfg = load_config(config, overrides)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    report = run_training(slides, out, cfg, resume=resume, log=lambda m: typer.echo(m, err=True))
    if rank0:
        metrics = report.get("metrics") or {k: v["mean"] for k, v in report.get("summary", {}).items()}
        n_folds = len(report.get("folds", []))
        partial = {k: v.get("n_folds", n_folds) for k, v in report.get("summary", {}).items()
                   if v.get("n_folds", n_folds) < n_folds}
        shown = ", ".join(f"{k} {v:.4f}" + (f" ({partial[k]} of {n_folds} folds)" if k in partial else "")
                          for k, v in metrics.items() if isinstance(v, float))
        undefined = [k for k, v in metrics.items() if isinstance(v, float) and math.isnan(v)]
        if "summary" in report:
            where = f"mean over {n_folds} test folds"
        else:
            part = report.get("evaluated_on", "test")
            where = f"on the {part} split ({report.get('n_' + part, '?')} slides)"
        typer.echo(f"done: {where}: {shown} -> {out}")
        if undefined:
            typer.echo(f"note: {', '.join(undefined)} undefined: they need test slides of more than one class")
        if "out_of_fold" in report:
            oof = report["out_of_fold"]
            pooled = ", ".join(f"{k} {v:.4f}" for k, v in oof["metrics"].items() if isinstance(v, float))
            typer.echo(f"out of fold (each of {oof['n_slides']} slides predicted by the fold that tested it): "
                       f"{pooled} -> {out / 'predictions.csv'}")


class _ScoreProgress(_ExtractProgress):
    """Slides done with their predicted class (and extraction of the missing caches)."""

    def __call__(self, event: str, data: dict) -> None:
        if event.startswith("extract_"):
            if event == "extract_regions":
                super().__call__("regions", data)
            return
        if event == "slide_done" and data["status"] == "done":
            self.bar.console.log(f"{data['slide_id']}: {data['predicted']} ({data['regions']} regions, "
                                 f"{data['seconds']:.2f} s)")
            self.bar.advance(self.task)
            return
        super().__call__(event, data)


@app.command()
def score(
    slides: Annotated[Path, typer.Argument(help="Slides CSV: slide_id,path[,mpp,...].", show_default=False)],
    model: Annotated[Path, typer.Option(help="Run folder written by xtpath train.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: predictions.csv, failures.csv and a "
                                                          "folder per slide.")],
    cache: Annotated[Optional[Path], typer.Option(help="Feature cache (default: OUT/cache).")] = None,
    devices: Annotated[str, typer.Option(help="auto, cpu, or GPU numbers (0,1): one process per GPU.")] = "auto",
    shard: Annotated[Optional[str], typer.Option(help="I/N: score rows I, I+N, ... (0-based; array jobs).")]
    = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Regions per encoder batch when extracting.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="The region encoder's weights file, when the path the run "
                                                         "recorded does not exist here (a run moved to another "
                                                         "machine); it must be the same file.")] = None,
    only: OnlyOpt = None,
    rescore: Annotated[bool, typer.Option("--rescore", help="Score the slides again even if predictions.csv "
                                                            "has them (their rows and outputs are replaced); "
                                                            "with --only, just those.")] = False,
    no_extract: Annotated[bool, typer.Option("--no-extract", help="Score only slides whose features are "
                                                                  "cached; the others fail with the reason their "
                                                                  "extraction failed (from the cache's "
                                                                  "failures.csv).")] = False,
) -> None:
    """Score slides with a trained model: predictions, heatmaps, region scores, QuPath GeoJSON, masks.

    Extracts features that are not cached yet with the model's own encoder settings; a rerun scores only the
    slides missing from predictions.csv (--rescore: all selected slides again). Exit status 0 when every slide
    is scored, 3 when some failed (listed in OUT/failures.csv), 1 on errors.
    """
    from xtpath.io import read_slides_csv
    from xtpath.score import parse_shard, score_slides

    # a missing slide file is one failed slide of the batch (failures.csv), not a reason to stop the others
    rows = _only(read_slides_csv(slides, check_files=False, only=only), only)
    devs = parse_devices(devices)
    sh = parse_shard(shard)
    n = len([r for i, r in enumerate(rows) if i % sh[1] == sh[0]])
    with _ScoreProgress(n) as prog:
        summary = score_slides(rows, model, out, cache_dir=cache, devices=devs, shard=sh, batch_size=batch_size,
                               progress=prog, weights=weights, rescore=rescore, no_extract=no_extract)
    typer.echo(f"{len(summary.scored)} scored, {len(summary.skipped)} already scored, {len(summary.failed)} "
               f"failed -> {out / 'predictions.csv'}")
    if summary.failed:
        typer.echo(f"failures are listed in {out / 'failures.csv'}", err=True)
        raise typer.Exit(EXIT_SLIDES_FAILED)


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="Folder written by xtpath score.", show_default=False)],
    labels: Annotated[Optional[Path], typer.Option(help="Slides CSV of ground truth: a label column (classifier: "
                                                        "accuracy, AUC, F1, ROC and confusion plots) or a mask "
                                                        "column (segmenter: Dice and IoU per class).")] = None,
) -> None:
    """Summarise scored slides; with --labels compute metrics on the slides the model did not train on.

    A classifier's predictions are compared with the label column (accuracy, balanced accuracy, AUC, F1); a
    segmenter's mask.ome.tif files with the mask column (QuPath GeoJSON or label images: Dice and IoU).
    """
    from rich.console import Console
    from rich.table import Table

    from xtpath.report import report as make_report

    rep = make_report(out, labels)
    console = Console()
    console.print(f"{out}: {rep['n_scored']} slides scored, {rep['n_failed']} failed", soft_wrap=True)
    t = Table()
    t.add_column("class")
    t.add_column("predicted", justify="right")
    for c in rep["classes"]:
        t.add_row(c, str(rep["predicted_counts"][c]))
    console.print(t)
    console.print(f"{rep['regions_per_slide']:.0f} regions and {rep['seconds_per_slide']:.2f} s per slide")
    if rep.get("labelled_not_scored"):
        missing = rep["labelled_not_scored"]
        console.print(f"{len(missing)} labelled slides have no prediction (not scored, or failed): "
                      f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", soft_wrap=True)
    if rep.get("not_scored_seen"):
        console.print(f"{rep['not_scored_seen']} labelled slides are not scored and are the model's training or "
                      "validation slides (left out of the metrics in any case)", soft_wrap=True)
    if rep.get("training_slides_unknown"):
        console.print(f"warning: the model's training slides are unknown ({rep['training_slides_unknown']}), so "
                      "none could be left out: the metrics may include slides it trained on", soft_wrap=True,
                      style="yellow", markup=False)
    if rep.get("excluded_seen"):
        console.print(f"left out {rep['excluded_seen']} labelled slides the model trained or validated on "
                      f"({rep['splits_file']})", soft_wrap=True)
    if rep.get("same_id_other_slide"):
        same = rep["same_id_other_slide"]
        console.print(f"kept {len(same)} slides whose slide_ids are training slides' but whose files are other "
                      f"slides (fingerprints differ): {', '.join(same[:5])}{' ...' if len(same) > 5 else ''}",
                      soft_wrap=True)
    if "metrics" in rep:
        m = rep["metrics"]
        console.print(f"on {rep['n_labelled']} held-out labelled slides: " + ", ".join(
            f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)), soft_wrap=True)
        if "dice_per_class" in m:
            console.print("Dice per class: " + ", ".join(  # NaN: the class is in neither mask
                f"{c} {d:.4f}" if d == d else f"{c} -" for c, d in zip(rep["classes"], m["dice_per_class"])),
                soft_wrap=True)
        console.print(f"plots and report.json in {out / 'report'}", soft_wrap=True)
    elif labels is not None:
        console.print("no metrics: none of the labelled slides is both scored and held out from training",
                      soft_wrap=True)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder for slides/, masks/ and slides.csv.", show_default=False)],
    n_slides: Annotated[int, typer.Option(help="Number of slides (balanced touch/apart).")] = 60,
    grid: Annotated[int, typer.Option(help="Cells per slide side (256 px each at 0.5 µm/px).")] = 10,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
) -> None:
    """Write a small labelled dataset of pyramidal TIFF slides made of real H&E pixels (offline).

    Two tissue kinds form blobs on glass; the label is whether they touch somewhere (touch) or not (apart), so it
    cannot be read off any single region. A QuPath GeoJSON mask of the two kinds is written for every slide.
    """
    from rich.progress import Progress

    from xtpath.demo_data import DemoSpec, make_demo_dataset

    with Progress(transient=True) as bar:
        task = bar.add_task("slides", total=n_slides)
        csv = make_demo_dataset(out, DemoSpec(n_slides=n_slides, grid=grid, seed=seed),
                                progress=lambda i, n: bar.update(task, completed=i))
    typer.echo(f"{n_slides} slides and their masks in {out}; slides CSV: {csv}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for everything the demo writes.")]
    = Path("demo_out"),
    n_slides: Annotated[int, typer.Option(help="Number of generated slides.")] = 60,
    epochs: Annotated[int, typer.Option(help="Training epochs per model.")] = 15,
    grid: Annotated[int, typer.Option(help="Cells per slide side.")] = 10,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """The whole pipeline on generated slides, offline: data, features, Mamba vs mean, scores, reports."""
    import time

    from xtpath.demo import DemoSettings, run_demo

    t0 = time.perf_counter()
    res = run_demo(out, DemoSettings(n_slides=n_slides, grid=grid, epochs=epochs, seed=seed),
                   log=lambda m: typer.echo(m, err=True))
    m, b = res["mamba"], res["mean"]
    typer.echo("")
    typer.echo(f"held-out test slides: {res['n_test']}   (label: do the two tissue kinds touch?)")
    typer.echo(f"  {'model':<16}{'accuracy':>10}{'AUC':>8}")
    typer.echo(f"  {'xT Mamba':<16}{m['accuracy']:>10.3f}{m['auc']:>8.3f}")
    typer.echo(f"  {'mean pooling':<16}{b['accuracy']:>10.3f}{b['auc']:>8.3f}")
    typer.echo(f"finished in {time.perf_counter() - t0:.0f} s. Look at:")
    for path, what in ((out / "scored_mamba" / "predictions.csv", "predictions of the test slides"),
                       (out / "scored_mamba" / "<slide>" / "heatmap.png", "region heatmaps (regions.geojson: QuPath)"),
                       (out / "run_mamba", "model, metrics.csv, loss/ROC/confusion plots"),
                       (out / "scored_mamba" / "report", "test-set report (and the same for mean)")):
        typer.echo(f"  {what:<44} {path}")
    typer.echo("the region encoder had random weights (no download); on real slides use e.g. --encoder uni "
               "--weights FILE")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning xtpath errors into one-line messages and exit status 1.

    Usage errors (a missing option, a bad value) are reported by typer itself, with exit status 2.
    """
    import signal
    import warnings

    from xtpath.errors import XtpathError

    # warnings from the library are for the person at the terminal: one line, without Python's file and line
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"  # type: ignore
    from xtpath.stop import clear_stop, request_stop, stop_signals

    clear_stop()

    def _stop(signum: int, frame: object) -> None:
        request_stop(signum)  # the long loops check it too: this interrupt can be lost inside a finaliser
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM (what SLURM, systemd and `kill` send) unwind the same way: temporary files and locks
    # are removed; typer turns the KeyboardInterrupt into exit status 130, and the line below says what to do
    handlers = {}
    with contextlib.suppress(ValueError):  # not in the main thread (embedded use): leave the defaults
        handlers = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        app(args=argv)
    except SystemExit as e:
        if e.code == 130 or stop_signals():
            _stopped(argv, signal.SIGTERM in stop_signals())
        raise
    except XtpathError as e:
        for line in str(e).splitlines():  # a slides CSV reports every bad row, one per line
            _echo_err(line)
        sys.exit(1)
    except OSError as e:  # a path given where a folder is needed, no permission, a full disk: not a bug
        _echo_err(_os_error_line(e))
        sys.exit(1)
    except KeyboardInterrupt:  # outside typer's own handling
        _stopped(argv, signal.SIGTERM in stop_signals())
    finally:
        # the work is over (done, failed or stopped): a signal from now on must not raise into exit handlers
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        clear_stop()


def _stopped(argv: list[str] | None, terminated: bool) -> None:
    """Say how to resume after Ctrl-C or SIGTERM, and exit 130 or 143."""
    args = list(sys.argv[1:] if argv is None else argv)
    how = "terminated" if terminated else "interrupted"
    if args[:1] == ["train"] and "--resume" not in args:
        out = next((a.split("=", 1)[1] for a in args if a.startswith("--out=")), None) or \
            next((b for a, b in itertools.pairwise(args) if a in ("--out", "-o")), None)
        if out is not None and not Path(out).exists():  # stopped before the first checkpoint: nothing kept
            typer.echo(f"{how} before the first epoch finished: nothing was kept; run the same command again",
                       err=True)
            sys.exit(143 if terminated else 130)
    again = "add --resume to the same command" if args[:1] == ["train"] and "--resume" not in args \
        else "run the same command again"
    typer.echo(f"{how}: what was finished is kept; {again} to resume", err=True)
    sys.exit(143 if terminated else 130)


_OS_HINTS = {
    FileExistsError: "a file is in the way of a folder: choose another output folder",
    NotADirectoryError: "a file is in the way of a folder: choose another output folder",
    IsADirectoryError: "a folder was given where a file is needed",
    FileNotFoundError: "check the path",
    PermissionError: "check its permissions or choose another folder",
}


def _os_error_line(e: OSError) -> str:
    """One line for an operating-system error: the path, what went wrong and what to do."""
    import errno

    what = (e.strerror or str(e)).rstrip(".")
    hint = next((h for t, h in _OS_HINTS.items() if isinstance(e, t)), None)
    if e.errno == errno.ENOSPC:
        hint = "free some space or choose another output folder; rerun to resume"
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{what.lower()}" + (f"; {hint}" if hint else "")


if __name__ == "__main__":
    main()
