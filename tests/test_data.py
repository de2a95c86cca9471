"""Training data: grid symmetries, splits by case, segmentation targets from QuPath GeoJSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xtpath.cache import SlideFeatures
from xtpath.data import (
    IGNORE_INDEX,
    dihedral_grid,
    dihedral_regions,
    make_splits,
    region_targets,
)
from xtpath.errors import InvalidParameterError, ManifestError
from xtpath.io import SlideRow


def _as_image(grid: torch.Tensor, values: torch.Tensor) -> np.ndarray:
    g = grid - grid.min(0).values
    img = np.full((int(g[:, 0].max()) + 1, int(g[:, 1].max()) + 1), -1)
    img[g[:, 0].numpy(), g[:, 1].numpy()] = values.numpy()
    return img


def test_dihedral_grid_is_the_8_symmetries_of_the_region_image():
    """Moving positions by symmetry k equals turning/flipping the picture of the slide."""
    rng = np.random.default_rng(0)
    grid = torch.tensor([(r, c) for r in range(3) for c in range(5) if rng.random() < 0.8]) + 7
    vals = torch.arange(len(grid))
    img = _as_image(grid, vals)
    expected = {np.array2string(a) for a in (img, img.T, img[::-1], img.T[::-1], img[:, ::-1], img.T[:, ::-1],
                                             img[::-1, ::-1], img.T[::-1, ::-1])}
    got = {np.array2string(_as_image(dihedral_grid(grid, k), vals)) for k in range(8)}
    assert got == expected and len(got) == 8
    assert torch.equal(dihedral_grid(grid, 0), grid - 7)


def test_dihedral_regions_turn_with_the_grid():
    """A 2x2-region slide of 2x2 token grids: turning the whole token picture equals moving the regions and
    turning each region's tokens."""
    tokens = torch.arange(4 * 2 * 2).reshape(4, 2, 2, 1).float()
    grid = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])

    def picture(g, t):
        out = torch.zeros(4, 4)
        for (r, c), tok in zip(g, t):
            out[2 * r:2 * r + 2, 2 * c:2 * c + 2] = tok[..., 0]
        return out

    base = picture(grid, tokens)
    for k, want in enumerate([base, base.T, base.flip(0), base.T.flip(0), base.flip(1), base.T.flip(1),
                              base.flip(0).flip(1), base.T.flip(0).flip(1)]):
        assert torch.equal(picture(dihedral_grid(grid, k), dihedral_regions(tokens, k)), want), k
    pooled = torch.randn(4, 8)
    assert torch.equal(dihedral_regions(pooled, 5), pooled)
    with pytest.raises(InvalidParameterError):
        dihedral_grid(grid, 8)


def _rows(n, cases=None, labels=None, splits=None):
    return [SlideRow(slide_id=f"s{i}", path=Path(f"/x/s{i}.svs"), label=(labels[i] if labels else None),
                     case_id=(cases[i] if cases else None), split=(splits[i] if splits else None), line=i + 2)
            for i in range(n)]


def test_split_by_case_never_straddles_and_is_stratified():
    cases = [f"p{i // 3}" for i in range(60)]  # 20 patients, 3 slides each
    labels = [int(i // 3) % 2 for i in range(60)]
    rows = _rows(60, cases, labels)
    (s,) = make_splits(rows, labels, val_fraction=0.2, test_fraction=0.2, seed=1)
    parts = [set(cases[i] for i in p) for p in (s.train, s.val, s.test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sorted(s.train + s.val + s.test) == list(range(60))
    assert 6 <= len(s.test) <= 18 and 6 <= len(s.val) <= 18
    for p in (s.val, s.test):
        assert {labels[i] for i in p} == {0, 1}
    assert make_splits(rows, labels, seed=1)[0] == s  # deterministic


def test_k_folds_cover_every_case_once_as_test():
    cases = [f"p{i // 2}" for i in range(40)]
    labels = [i % 2 for i in range(40)]
    folds = make_splits(_rows(40, cases, labels), labels, folds=5, seed=0)
    assert len(folds) == 5
    tests = [i for f in folds for i in f.test]
    assert sorted(tests) == list(range(40))
    for f in folds:
        assert not set(f.train) & set(f.test) and not set(f.val) & set(f.test)
        assert not {cases[i] for i in f.train} & {cases[i] for i in f.test}
    with pytest.raises(InvalidParameterError, match="at most 20 folds"):
        make_splits(_rows(40, cases, labels), labels, folds=30)


def test_few_slides_per_class_still_get_validation_and_test_parts():
    # 3 classes x 3 slides: 5 stratified folds (a fifth each) cannot be made; fewer, larger ones can
    labels = [i % 3 for i in range(9)]
    rows = _rows(9, labels=labels)
    (s,) = make_splits(rows, labels, seed=0)
    assert s.val and s.test and sorted(s.train + s.val + s.test) == list(range(9))
    assert {labels[i] for i in s.test} == {0, 1, 2}  # still stratified: one slide of each class
    # a split column with train and test rows only: a validation part is carved out of 4 + 4 train slides
    labels = [0, 1] * 5
    rows = _rows(10, labels=labels, splits=["train"] * 8 + ["test"] * 2)
    (s,) = make_splits(rows, labels, seed=0)
    assert s.test == [8, 9] and len(s.val) == 2 and {labels[i] for i in s.val} == {0, 1} and len(s.train) == 6
    # a class with a single slide cannot be stratified at all: an unstratified split by case still gives parts
    labels = [0, 0, 0, 0, 1]
    (s,) = make_splits(_rows(5, labels=labels), labels, seed=0)
    assert s.val and s.test and sorted(s.train + s.val + s.test) == list(range(5))


def test_more_folds_than_the_largest_class_is_a_one_line_error():
    labels = [0] * 6 + [1] * 6
    with pytest.raises(InvalidParameterError, match=r"^--folds 7: stratified folds need a class with at least 7 "
                                                    r"slides, the largest has 6; use at most 6 folds$"):
        make_splits(_rows(12, labels=labels), labels, folds=7)
    assert len(make_splits(_rows(12, labels=labels), labels, folds=6)) == 6


def test_csv_split_column_is_used_and_checked():
    rows = _rows(6, cases=["a", "a", "b", "c", "d", "e"], labels=[0, 1] * 3,
                 splits=["train", "train", "train", "val", "test", "test"])
    (s,) = make_splits(rows, [0, 1] * 3)
    assert (s.train, s.val, s.test) == ([0, 1, 2], [3], [4, 5])
    bad = _rows(3, cases=["a", "a", "b"], splits=["train", "test", "val"])
    with pytest.raises(ManifestError, match="slides.csv:3: case 'a' is in two splits"):
        make_splits(bad, None)
    partial = _rows(3, splits=["train", None, "test"])
    with pytest.raises(ManifestError, match="slides.csv:3: empty split"):
        make_splits(partial, None)


def test_region_targets_from_qupath_geojson(tmp_path):
    """A tumour square with a stroma hole, regions of 100 level-0 px, 2x2 label cells per region."""
    gj = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
            [[100, 100], [300, 100], [300, 300], [100, 300], [100, 100]],
            [[150, 150], [250, 150], [250, 250], [150, 250], [150, 150]]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
            [[150, 150], [250, 150], [250, 250], [150, 250], [150, 150]]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Stroma"}}},
    ]}
    mask = tmp_path / "s.geojson"
    mask.write_text(json.dumps(gj))
    row = SlideRow(slide_id="s", path=Path("/x/s.svs"), mask=mask, line=2)
    grid = np.array([[r, c] for r in range(4) for c in range(4)])
    sf = SlideFeatures(features=np.zeros((16, 1)), coords=grid[:, ::-1] * 100, grid=grid, tissue=None,
                       settings={"region_size_level0": [100.0, 100.0]}, source="xtpath")
    classes = ["background", "Stroma", "Tumor"]
    t = region_targets(row, sf, classes, 2, slide_dimensions=(350, 400))
    assert t.shape == (16, 2, 2)
    picture = np.zeros((8, 8), int)
    for (r, c), lab in zip(grid, t):
        picture[2 * r:2 * r + 2, 2 * c:2 * c + 2] = lab
    want = np.zeros((8, 8), int)
    want[2:6, 2:6] = 2  # tumour at level-0 100..300 = cells 2..5
    want[3:5, 3:5] = 1  # stroma in the hole, 150..250 = cells 3..4
    want[:, 7] = IGNORE_INDEX  # level-0 x >= 350 is outside the slide
    assert np.array_equal(picture, want)
    one = region_targets(row, sf, classes, 1, slide_dimensions=(400, 400))  # one label per region: majority
    assert one[grid.tolist().index([1, 1]), 0, 0] == 2 and one[0, 0, 0] == 0
    with pytest.raises(ManifestError, match="'Tumor' is not one of"):
        region_targets(row, sf, ["background", "Stroma"], 1)


def test_region_targets_from_a_label_image(tmp_path):
    """A label PNG at a quarter of the slide's size gives the same cells as the GeoJSON test's picture."""
    from PIL import Image

    lab = np.zeros((100, 100), np.uint8)  # slide 400 x 400 level-0 px, 4 px per label pixel
    lab[25:75, 25:75] = 2  # tumour at level-0 100..300
    lab[37:63, 37:63] = 1  # stroma at ~150..250
    mask = tmp_path / "s_labels.png"
    Image.fromarray(lab).save(mask)
    row = SlideRow(slide_id="s", path=Path("/x/s.svs"), mask=mask, line=2)
    grid = np.array([[r, c] for r in range(4) for c in range(4)])
    sf = SlideFeatures(features=np.zeros((16, 1)), coords=grid[:, ::-1] * 100, grid=grid, tissue=None,
                       settings={"region_size_level0": [100.0, 100.0]}, source="xtpath")
    t = region_targets(row, sf, ["background", "Stroma", "Tumor"], 2, slide_dimensions=(400, 400))
    picture = np.zeros((8, 8), int)
    for (r, c), cells in zip(grid, t):
        picture[2 * r:2 * r + 2, 2 * c:2 * c + 2] = cells
    want = np.zeros((8, 8), int)
    want[2:6, 2:6] = 2
    want[3:5, 3:5] = 1
    assert np.array_equal(picture, want)
    with pytest.raises(ManifestError, match=r"label 2 but only 2 classes \(background, Stroma\); list every class"):
        region_targets(row, sf, ["background", "Stroma"], 2, slide_dimensions=(400, 400))
    # a mask of another aspect ratio (cropped, padded, transposed) would be stretched: refused; a downsampled
    # one whose sides rounded to whole pixels is fine
    with pytest.raises(ManifestError, match=r"s_labels.png: a label image of 100 x 100 px for a slide of 400 x 300 "
                                            r"px \(another aspect ratio\)"):
        region_targets(row, sf, ["background", "Stroma", "Tumor"], 2, slide_dimensions=(400, 300))
    assert region_targets(row, sf, ["background", "Stroma", "Tumor"], 2, slide_dimensions=(401, 399)).shape == t.shape
