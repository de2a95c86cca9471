"""A small labelled dataset of pyramidal TIFF slides made of real H&E pixels, for the offline demo and tests.

Each slide is a grid of 128-µm cells (256 px at 0.5 µm/px). Two tissue kinds, cut from the bundled test slides,
fill two blobs of cells on glass:

* ``dense``: hematoxylin-rich tissue (crops of CMU-1-Small-Region.svs, an Aperio H&E skin section);
* ``pink``: eosin-rich tissue (crops of the TCGA JPEG2000 slide tcga-cr-7395-01a-01-ts1.svs).

The slide label is ``touch`` when some ``dense`` cell shares an edge with some ``pink`` cell, ``apart`` when every
``pink`` cell is at least two cells from every ``dense`` cell. Both classes have blobs of the same sizes, so no
single region and no pooled statistic of regions tells them apart: only the arrangement over the whole slide
does, which is what a long-context model is for. Each slide also gets a QuPath GeoJSON mask of the two kinds.

Everything is determined by the seed. The texture crops ship with the package
(``xtpath/assets/demo_textures.npz``, JPEG bytes); :func:`build_texture_asset` regenerates them from the test
slides.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xtpath.errors import InvalidParameterError
from xtpath.io.files import write_text
from xtpath.io.geojson import mask_polygons, polygon_feature, write_geojson
from xtpath.io.tiffwriter import write_pyramid_tiff

__all__ = ["DemoSpec", "make_demo_dataset", "build_texture_asset", "KINDS", "CELL_UM", "SLIDE_MPP"]

KINDS = ("dense", "pink")
KIND_COLORS = {"dense": (120, 40, 160), "pink": (230, 110, 160)}
SLIDE_MPP = 0.5  # µm per level-0 pixel of the demo slides
CELL_UM = 128.0  # side of one grid cell in µm (256 px)
CELL_PX = int(CELL_UM / SLIDE_MPP)
ASSET = Path(__file__).parent / "assets" / "demo_textures.npz"


@dataclass(frozen=True)
class DemoSpec:
    """Shape of the demo dataset.

    Attributes
    ----------
    n_slides : int
        Number of slides (balanced touch/apart).
    grid : int
        Cells per slide side (a slide is ``grid * 256`` pixels square).
    blob_cells : (int, int)
        Smallest and largest number of cells in one blob.
    seed : int
    """

    n_slides: int = 60
    grid: int = 10
    blob_cells: tuple[int, int] = (3, 7)
    seed: int = 0


def _load_textures() -> dict[str, list[np.ndarray]]:
    from PIL import Image

    if not ASSET.exists():
        raise FileNotFoundError(f"{ASSET} is missing; rebuild it with xtpath.demo_data.build_texture_asset")
    data = np.load(ASSET)
    out: dict[str, list[np.ndarray]] = {k: [] for k in KINDS}
    for key in sorted(data.files):
        kind = key.split("_")[0]
        out[kind].append(np.asarray(Image.open(io.BytesIO(data[key].tobytes())).convert("RGB")))
    return out


def build_texture_asset(data_dir: str | os.PathLike[str], out: str | os.PathLike[str] = ASSET, n: int = 40) -> Path:
    """Cut ``n`` tissue-filled 256-px crops at 0.5 µm/px of each kind from the bundled test slides."""
    from PIL import Image
    from skimage.color import rgb2hed

    from xtpath.io import open_slide

    d = Path(data_dir)
    sources = {"dense": (d / "CMU-1-Small-Region.svs", None), "pink": (d / "tcga-cr-7395-01a-01-ts1.svs", 0.5)}
    arrays: dict[str, np.ndarray] = {}
    for kind, (path, mpp) in sources.items():
        s = open_slide(path, mpp=mpp)
        W, H = s.dimensions
        step = CELL_PX * SLIDE_MPP / s.mpp[0]  # type: ignore[index]
        cands = []
        for y in np.arange(0, H - step, step / 3):
            for x in np.arange(0, W - step, step / 3):
                a = s.read_region((x, y), (CELL_PX, CELL_PX), mpp=SLIDE_MPP)
                if (a.mean(axis=2) < 215).mean() < 0.9:
                    continue
                h = rgb2hed(a)[..., 0].mean()
                cands.append((h, x, y, a))
        cands.sort(key=lambda c: -c[0] if kind == "dense" else c[0])
        for i, (_, _, _, a) in enumerate(cands[:n]):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=88)
            arrays[f"{kind}_{i:03d}"] = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return out


def _grow(rng: np.random.Generator, free: np.ndarray, start: tuple[int, int], size: int) -> list[tuple[int, int]]:
    """A 4-connected blob of up to ``size`` cells grown from ``start`` over ``free`` cells."""
    G = free.shape[0]
    blob, frontier = [start], [start]
    taken = {start}
    while len(blob) < size and frontier:
        r, c = frontier[rng.integers(len(frontier))]
        nbrs = [(r + dr, c + dc) for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))
                if 0 <= r + dr < G and 0 <= c + dc < G and free[r + dr, c + dc] and (r + dr, c + dc) not in taken]
        if not nbrs:
            frontier.remove((r, c))
            continue
        cell = nbrs[rng.integers(len(nbrs))]
        taken.add(cell)
        blob.append(cell)
        frontier.append(cell)
    return blob


def _layout(rng: np.random.Generator, spec: DemoSpec, touch: bool) -> np.ndarray:
    """Cell labels ``(G, G)``: 0 glass, 1 dense, 2 pink, with the touch/apart relation."""
    G = spec.grid
    lo, hi = spec.blob_cells
    for _ in range(1000):
        lab = np.zeros((G, G), np.int64)
        na, nb = rng.integers(lo, hi + 1, size=2)
        a = _grow(rng, lab == 0, (int(rng.integers(G)), int(rng.integers(G))), int(na))
        if len(a) < na:
            continue
        for r, c in a:
            lab[r, c] = 1
        a_set = np.argwhere(lab == 1)
        if touch:
            # start the pink blob next to a dense cell
            r, c = a_set[rng.integers(len(a_set))]
            opts = [(r + dr, c + dc) for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))
                    if 0 <= r + dr < G and 0 <= c + dc < G and lab[r + dr, c + dc] == 0]
            if not opts:
                continue
            start = opts[rng.integers(len(opts))]
            free = lab == 0
        else:
            # keep pink at Chebyshev distance >= 2 from every dense cell
            near = np.zeros((G, G), bool)
            for r, c in a_set:
                near[max(0, r - 1):r + 2, max(0, c - 1):c + 2] = True
            free = ~near
            cands = np.argwhere(free)
            if len(cands) == 0:
                continue
            start = tuple(cands[rng.integers(len(cands))])
        b = _grow(rng, free, (int(start[0]), int(start[1])), int(nb))
        if len(b) < nb:
            continue
        for r, c in b:
            lab[r, c] = 2
        touching = any(lab[min(G - 1, max(0, r + dr)), min(G - 1, max(0, c + dc))] == 1
                       for r, c in b for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)))
        if touching == touch:
            return lab
    raise RuntimeError("could not place the blobs; use a larger grid")


def _render(rng: np.random.Generator, lab: np.ndarray, textures: dict[str, list[np.ndarray]]
            ) -> tuple[np.ndarray, np.ndarray]:
    """RGB slide and its pixel label map (0 glass, 1 dense, 2 pink) from cell labels, with ragged tissue edges."""
    from scipy import ndimage as ndi

    G = lab.shape[0]
    side = G * CELL_PX
    img = np.clip(rng.normal(243, 2.0, (side, side, 3)), 0, 255).astype(np.uint8)
    pix = np.kron(lab, np.ones((CELL_PX, CELL_PX), np.int64))
    for (r, c), v in np.ndenumerate(lab):
        if v == 0:
            continue
        tex = textures[KINDS[v - 1]]
        t = tex[rng.integers(len(tex))]
        t = np.rot90(t, int(rng.integers(4)))
        if rng.random() < 0.5:
            t = t[:, ::-1]
        img[r * CELL_PX:(r + 1) * CELL_PX, c * CELL_PX:(c + 1) * CELL_PX] = t
    # ragged outline against the glass: smooth noise moves the tissue edge by up to ~30 px
    tissue = (pix > 0).astype(np.float32)
    noise = ndi.gaussian_filter(rng.normal(0, 1, (side // 8, side // 8)), 3)
    noise = np.kron(noise / (np.abs(noise).max() + 1e-9), np.ones((8, 8)))[:side, :side]
    soft = ndi.gaussian_filter(tissue, 24) + 0.25 * noise
    glass = (soft < 0.5) & (tissue > 0)
    img[glass] = np.clip(rng.normal(243, 2.0, (int(glass.sum()), 3)), 0, 255).astype(np.uint8)
    pix[glass] = 0
    return img, pix


def check_spec(spec: DemoSpec) -> None:
    """One-line errors for sizes no demo dataset can be made with."""
    if spec.n_slides < 4:
        raise InvalidParameterError(f"--n-slides {spec.n_slides}: use at least 4 (two per label)")
    if spec.grid < 5:
        raise InvalidParameterError(f"--grid {spec.grid}: use at least 5 cells per side")
    if spec.grid > 200:  # 200 cells of 256 px: a 51200 px slide, 7.5 GB of pixels in memory while written
        raise InvalidParameterError(f"--grid {spec.grid}: use at most 200 cells per side (demo slides are built in "
                                    "memory)")


def make_demo_dataset(out_dir: str | os.PathLike[str], spec: DemoSpec = DemoSpec(), *,
                      progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``spec.n_slides`` slides, their GeoJSON masks and ``slides.csv`` to ``out_dir``; return the CSV.

    Splits: 60% train, 20% val, 20% test, balanced per label. Slides that already exist are rewritten only if
    missing (a rerun with the same seed is quick and gives the same files).
    """
    check_spec(spec)
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    textures = _load_textures()
    n = spec.n_slides
    labels = [i % 2 == 0 for i in range(n)]  # touch, apart, touch, ...
    order = np.random.default_rng([spec.seed, 1]).permutation(n)
    splits = {}
    for pos, i in enumerate(order):
        frac = pos / n
        splits[int(i)] = "train" if frac < 0.6 else "val" if frac < 0.8 else "test"
    lines = ["slide_id,path,label,split,case_id,mask"]
    for i in range(n):
        sid = f"demo_{i:03d}"
        rng = np.random.default_rng([spec.seed, 2, i])
        lab = _layout(rng, spec, labels[i])
        slide_path = out / "slides" / f"{sid}.tif"
        mask_path = out / "masks" / f"{sid}.geojson"
        if not (slide_path.exists() and mask_path.exists()):
            img, pix = _render(rng, lab, textures)
            write_pyramid_tiff(slide_path, img, SLIDE_MPP, compression="jpeg", quality=90)
            feats = []
            for v, kind in enumerate(KINDS, start=1):
                small = pix[::8, ::8] == v
                for poly in mask_polygons(small, (8.0, 8.0), exact=True):
                    feats.append(polygon_feature(poly, name=kind, color=KIND_COLORS[kind]))
            write_geojson(mask_path, feats)
        lines.append(f"{sid},slides/{sid}.tif,{'touch' if labels[i] else 'apart'},{splits[i]},case_{i:03d},"
                     f"masks/{sid}.geojson")
        if progress:
            progress(i + 1, n)
    csv = out / "slides.csv"
    write_text(csv, "\n".join(lines) + "\n")
    return csv
