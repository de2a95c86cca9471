"""Training data: slides from the feature cache, grid augmentation, splits and segmentation targets.

Everything here hands the models plain tensors: region features ``(N, D)`` or ``(N, h, w, D)``, their grid
positions ``(N, 2)`` as ``(row, col)``, a slide label, and for segmentation per-region label maps ``(N, m, m)``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xtpath.cache import SlideFeatures, load_features
from xtpath.errors import InvalidParameterError, ManifestError
from xtpath.io import SlideRow
from xtpath.metrics import IGNORE_INDEX  # target of label cells outside the slide (the loss skips them)

__all__ = [
    "DIHEDRAL", "dihedral_grid", "dihedral_regions", "SlideItem", "CachedSlides", "make_splits", "check_folds", "Split",
    "region_targets", "class_names_from_masks", "IGNORE_INDEX",
]

DIHEDRAL = 8  # the symmetries of the square: identity, 3 rotations, 4 reflections


def _dihedral_parts(k: int) -> tuple[bool, bool, bool]:
    if not 0 <= k < DIHEDRAL:
        raise InvalidParameterError(f"dihedral index {k} must be in 0..7")
    return bool(k & 1), bool(k & 2), bool(k & 4)  # transpose, flip rows, flip columns (applied in that order)


def dihedral_grid(grid: torch.Tensor, k: int) -> torch.Tensor:
    """Move region positions ``(N, 2)`` ``(row, col)`` by symmetry ``k`` of their bounding box (0 = identity).

    The result starts at row 0 and column 0; neighbours stay neighbours.
    """
    transpose, flip_r, flip_c = _dihedral_parts(k)
    g = grid - grid.min(dim=0).values if len(grid) else grid.clone()
    if transpose:
        g = g[:, [1, 0]]
    if flip_r:
        g = torch.stack([g[:, 0].max() - g[:, 0], g[:, 1]], dim=1)
    if flip_c:
        g = torch.stack([g[:, 0], g[:, 1].max() - g[:, 1]], dim=1)
    return g


def dihedral_regions(x: torch.Tensor, k: int, *, channels_last: bool = True) -> torch.Tensor:
    """Apply symmetry ``k`` inside each region: token grids ``(N, h, w, D)``, pixels ``(N, H, W, 3)``
    (``channels_last``) or label maps ``(N, m, m)`` (``channels_last=False``), consistent with
    :func:`dihedral_grid`. Pooled vectors ``(N, D)`` are returned unchanged."""
    if x.ndim == 2:
        return x
    transpose, flip_r, flip_c = _dihedral_parts(k)
    r, c = (1, 2)
    if transpose:
        perm = list(range(x.ndim))
        perm[r], perm[c] = perm[c], perm[r]
        x = x.permute(*perm)
    if flip_r:
        x = x.flip(r)
    if flip_c:
        x = x.flip(c)
    return x.contiguous()


@dataclass
class SlideItem:
    """One slide ready for a model.

    Attributes
    ----------
    slide_id : str
    features : (N, D) or (N, h, w, D) float tensor
    grid : (N, 2) long tensor, ``(row, col)``
    label : int or None
        Slide class index (classification).
    targets : (N, m, m) long tensor or None
        Per-region class maps (segmentation); ``IGNORE_INDEX`` outside the slide.
    index : int
        Position in the dataset.
    """

    slide_id: str
    features: torch.Tensor
    grid: torch.Tensor
    label: int | None = None
    targets: torch.Tensor | None = None
    index: int = 0


class CachedSlides(torch.utils.data.Dataset):
    """Slides from cached feature files, with optional random grid symmetries for training.

    Parameters
    ----------
    rows : sequence of SlideRow
    cache_files : sequence of path
        One feature file per row (xtpath, TRIDENT or CLAM).
    labels : sequence of int or None
        Class index per row (classification).
    targets : sequence of (N, m, m) arrays or None
        Region label maps per row (segmentation), in the cache's region order.
    augment : bool
        Apply one of the 8 grid symmetries per slide and epoch (labels do not change under them).
    seed : int
        Augmentation draws depend only on ``(seed, epoch, slide index)``, so a resumed or distributed run draws
        the same as an uninterrupted one.
    """

    def __init__(self, rows: Sequence[SlideRow], cache_files: Sequence[str | os.PathLike[str]], *,
                 labels: Sequence[int] | None = None, targets: Sequence[np.ndarray] | None = None,
                 augment: bool = False, seed: int = 0) -> None:
        if len(rows) != len(cache_files):
            raise InvalidParameterError("rows and cache_files must have the same length")
        self.rows = list(rows)
        self.files = [Path(f) for f in cache_files]
        self.labels = list(labels) if labels is not None else None
        self.targets = list(targets) if targets is not None else None
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._data: list[SlideFeatures | None] = [None] * len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def features(self, i: int) -> SlideFeatures:
        if self._data[i] is None:
            self._data[i] = load_features(self.files[i])
        return self._data[i]  # type: ignore[return-value]

    def symmetry(self, i: int) -> int:
        if not self.augment:
            return 0
        rng = np.random.default_rng([self.seed, self.epoch, i])
        return int(rng.integers(DIHEDRAL))

    def __getitem__(self, i: int) -> SlideItem:
        sf = self.features(i)
        feats = torch.from_numpy(np.asarray(sf.features, dtype=np.float32))
        grid = torch.from_numpy(np.asarray(sf.grid, dtype=np.int64))
        tgt = torch.from_numpy(np.asarray(self.targets[i], dtype=np.int64)) if self.targets is not None else None
        k = self.symmetry(i)
        if k:
            grid = dihedral_grid(grid, k)
            feats = dihedral_regions(feats, k)
            if tgt is not None:
                tgt = dihedral_regions(tgt, k, channels_last=False)
        label = self.labels[i] if self.labels is not None else None
        return SlideItem(self.rows[i].slide_id, feats, grid, label, tgt, i)


@dataclass
class Split:
    """Row indices of one train/val/test split (``name`` is ``"split"`` or ``"fold<k>"``)."""

    name: str
    train: list[int]
    val: list[int]
    test: list[int]


def check_folds(folds: int) -> None:
    """``folds`` is 0 (one split) or at least 3 (fold ``k`` tests on one part, validates on the next)."""
    if folds in (1, 2) or folds < 0:
        raise InvalidParameterError(f"--folds {folds}: K-fold cross-validation needs at least 3 folds (each fold "
                                    "tests on one part, validates on the next and trains on the rest), or "
                                    "--folds 0 for a single train/val/test split")


def make_splits(rows: Sequence[SlideRow], labels: Sequence[int] | None, *, folds: int = 0,
                val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0) -> list[Split]:
    """Train/val/test splits that never put slides of one case on both sides.

    * ``folds >= 3``: K-fold cross-validation over cases (stratified by label): fold ``k`` tests on one part,
      validates on the next, trains on the rest.
    * otherwise, if every row has a ``split`` (train/val/test), that split; rows with ``train`` only and no
      ``val`` get a validation part carved out of the training cases.
    * otherwise a stratified split by case with the given fractions.
    """
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    n = len(rows)
    groups = np.array([r.case for r in rows])
    y = np.array(labels if labels is not None else [0] * n)

    def group_split(idx: np.ndarray, frac: float, salt: int) -> tuple[list[int], list[int]]:
        """Split ``idx`` into (rest, part) with about ``frac`` of the cases in ``part``, stratified by label.

        With few slides per class, stratified folds of size ``frac`` cannot be made (scikit-learn needs a class
        with as many slides as folds): fewer, larger folds are tried, then an unstratified split by case, so
        that a small data set still gets a part rather than none."""
        n_groups = len(set(groups[idx]))
        if frac <= 0 or len(idx) < 2 or n_groups < 2:
            return idx.tolist(), []
        for k in range(max(2, min(int(round(1 / frac)), n_groups)), 1, -1):
            try:
                sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + salt)
                with _rare_classes_said():
                    rest, part = next(sgkf.split(idx, y[idx], groups[idx]))
            except ValueError:
                continue
            return idx[rest].tolist(), idx[part].tolist()
        gss = GroupShuffleSplit(n_splits=1, test_size=max(1, round(frac * n_groups)), random_state=seed + salt)
        rest, part = next(gss.split(idx, y[idx], groups[idx]))
        return idx[rest].tolist(), idx[part].tolist()

    check_folds(folds)
    if folds:
        n_cases = len(set(groups))
        if folds > n_cases:
            raise InvalidParameterError(f"--folds {folds}: only {n_cases} cases; use at most {n_cases} folds")
        largest = int(np.bincount(y).max()) if n else 0
        if folds > largest:  # scikit-learn's stratified folds need a class with at least as many slides
            raise InvalidParameterError(f"--folds {folds}: stratified folds need a class with at least {folds} "
                                        f"slides, the largest has {largest}; use at most {largest} folds")
        sgkf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        with _rare_classes_said():
            parts = [test.tolist() for _, test in sgkf.split(np.arange(n), y, groups)]
        out = []
        for k in range(folds):
            test, val = parts[k], parts[(k + 1) % folds]
            train = [i for j, p in enumerate(parts) if j not in (k, (k + 1) % folds) for i in p]
            out.append(Split(f"fold{k}", sorted(train), sorted(val), sorted(test)))
        return out
    given = [r.split for r in rows]
    if all(s is not None for s in given):
        train = [i for i, s in enumerate(given) if s == "train"]
        val = [i for i, s in enumerate(given) if s == "val"]
        test = [i for i, s in enumerate(given) if s == "test"]
        if not val:
            train, val = group_split(np.array(train), val_fraction, 1)
        _check_no_case_overlap(rows, train, val, test)
        return [Split("split", sorted(train), sorted(val), sorted(test))]
    if any(s is not None for s in given):
        missing = [r.where for r in rows if r.split is None][:5]
        raise ManifestError("\n".join(f"{w}: empty split while other rows have one; fill it "
                                      "(train/val/test) or clear the column" for w in missing))
    rest, test = group_split(np.arange(n), test_fraction, 2)
    train, val = group_split(np.array(rest), val_fraction / max(1e-9, 1 - test_fraction), 3)
    return [Split("split", sorted(train), sorted(val), sorted(test))]


@contextlib.contextmanager
def _rare_classes_said() -> Iterator[None]:
    """Quiet scikit-learn's "least populated class" warning: training already says which classes have too few
    slides, in its own words."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        yield


def _check_no_case_overlap(rows: Sequence[SlideRow], *parts: list[int]) -> None:
    seen: dict[str, int] = {}
    problems = []
    for p, idx in enumerate(parts):
        for i in idx:
            case = rows[i].case
            if case in seen and seen[case] != p:
                problems.append(f"{rows[i].where}: case {case!r} is in two splits (train/val/test); "
                                "slides of one case must stay together")
            seen.setdefault(case, p)
    if problems:
        raise ManifestError("\n".join(problems))


# -- segmentation targets ------------------------------------------------------------------------------------

def class_names_from_masks(rows: Sequence[SlideRow]) -> list[str]:
    """``["background", ...]`` plus the sorted annotation class names found in the rows' GeoJSON masks."""
    from xtpath.io.geojson import read_annotations

    names: set[str] = set()
    for r in rows:
        if r.mask is not None and r.mask.suffix.lower() in (".geojson", ".json"):
            names.update(n for n, _ in read_annotations(r.mask))
    names.discard("background")
    return ["background", *sorted(names)]


def region_targets(row: SlideRow, sf: SlideFeatures, class_names: Sequence[str], m: int, *,
                   slide_dimensions: tuple[int, int] | None = None) -> np.ndarray:
    """Per-region label maps ``(N, m, m)`` (int64) from the row's mask, aligned with the cache's regions.

    Parameters
    ----------
    row : SlideRow
        ``row.mask`` is a QuPath GeoJSON (class = ``classification.name``; later features paint over earlier
        ones) or a label image covering the whole slide (pixel value = class index).
    sf : SlideFeatures
        The slide's cache: region grid and region size in level-0 pixels.
    class_names : sequence of str
        Class index of each name (index 0 is background).
    m : int
        Label cells per region side (1 = one label per region, by majority).
    slide_dimensions : (int, int), optional
        Level-0 size; label cells outside the slide get :data:`IGNORE_INDEX`.
    """
    from skimage.draw import polygon as draw_polygon

    from xtpath.io.geojson import read_annotations

    if row.mask is None:
        raise ManifestError(f"{row.where}: slide {row.slide_id!r} has no mask; segmentation needs one")
    size = sf.region_size_level0
    if size is None:
        raise InvalidParameterError(f"{sf.path}: region size unknown; re-extract with xtpath")
    sub = 4  # paint at 4x the cell resolution, then take the majority per cell
    cell = size / (m * sub)
    grid = np.asarray(sf.grid)
    r0, c0 = grid.min(axis=0)
    rows_n, cols_n = (grid.max(axis=0) - grid.min(axis=0) + 1)
    H, W = int(rows_n * m * sub), int(cols_n * m * sub)
    canvas = np.zeros((H, W), dtype=np.int64)
    ox, oy = c0 * size, r0 * size  # level-0 position of the canvas origin
    index = {n: i for i, n in enumerate(class_names)}
    if row.mask.suffix.lower() in (".geojson", ".json"):
        for name, rings in read_annotations(row.mask):
            if name not in index:
                raise ManifestError(f"{row.mask}: class {name!r} is not one of {', '.join(class_names)}")
            for j, ring in enumerate(rings):
                pts = np.asarray(ring, dtype=np.float64)
                rr, cc = draw_polygon((pts[:, 1] - oy) / cell - 0.5, (pts[:, 0] - ox) / cell - 0.5, shape=(H, W))
                canvas[rr, cc] = index[name] if j == 0 else 0  # holes go back to background
    else:
        from PIL import Image

        lab = np.asarray(Image.open(row.mask))
        if lab.ndim == 3:
            lab = lab[..., 0]
        if slide_dimensions is None:
            raise InvalidParameterError("a label-image mask needs the slide's dimensions to be placed")
        sx, sy = slide_dimensions[0] / lab.shape[1], slide_dimensions[1] / lab.shape[0]
        # a downsampled mask is fine (its sides round to whole pixels); another aspect ratio (cropped, padded,
        # transposed) would be stretched onto the slide and misplace every label
        if abs(sx - sy) / max(sx, sy) > 0.02 + 1.0 / min(lab.shape[:2]):
            raise ManifestError(f"{row.mask}: a label image of {lab.shape[1]} x {lab.shape[0]} px for a slide of "
                                f"{slide_dimensions[0]} x {slide_dimensions[1]} px (another aspect ratio); give "
                                "the mask at the slide's size or downsampled by one factor")
        yy = ((np.arange(H) + 0.5) * cell + oy) / sy
        xx = ((np.arange(W) + 0.5) * cell + ox) / sx
        yi = np.clip(yy.astype(int), 0, lab.shape[0] - 1)
        xi = np.clip(xx.astype(int), 0, lab.shape[1] - 1)
        canvas = lab[yi][:, xi].astype(np.int64)
        if canvas.max(initial=0) >= len(class_names):
            raise ManifestError(f"{row.mask}: label {int(canvas.max())} but only {len(class_names)} classes "
                                f"({', '.join(class_names)}); list every class in label order under classes: "
                                "in the --config YAML")
    if slide_dimensions is not None:
        ys = (np.arange(H) + 0.5) * cell + oy
        xs = (np.arange(W) + 0.5) * cell + ox
        canvas[ys >= slide_dimensions[1], :] = IGNORE_INDEX
        canvas[:, xs >= slide_dimensions[0]] = IGNORE_INDEX
    # majority label per cell, per region
    n_cls = len(class_names)
    cells = canvas.reshape(H // sub, sub, W // sub, sub).transpose(0, 2, 1, 3).reshape(H // sub, W // sub, -1)
    valid = cells >= 0
    counts = np.stack([(cells == c).sum(-1) for c in range(n_cls)], axis=-1)
    label = counts.argmax(-1)
    label[valid.sum(-1) * 2 < sub * sub] = IGNORE_INDEX  # mostly outside the slide
    out = np.empty((len(grid), m, m), dtype=np.int64)
    for i, (r, c) in enumerate(grid - np.array([r0, c0])):
        out[i] = label[r * m:(r + 1) * m, c * m:(c + 1) * m]
    return out


def collate_single(items: list[SlideItem]) -> SlideItem:
    """DataLoader collate for one slide per step (slides differ in length)."""
    if len(items) != 1:
        raise InvalidParameterError("slides are processed one at a time; use batch_size=1")
    return items[0]


def region_class_weights(counts: Sequence[int]) -> torch.Tensor:
    """Inverse-frequency class weights normalised to mean 1 (classes never seen get weight 0)."""
    c = np.asarray(counts, dtype=np.float64)
    w = np.where(c > 0, c.sum() / np.maximum(c, 1) / max(1, (c > 0).sum()), 0.0)
    return torch.tensor(w, dtype=torch.float32)
