"""The slides CSV: every problem reported at once, as FILE:LINE: problem."""

from __future__ import annotations

import pytest

from xtpath.errors import ManifestError
from xtpath.io import read_slides_csv

from ..conftest import DATA


def _write(tmp_path, text, name="slides.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_reads_rows_with_relative_paths_and_extra_columns(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.svs").write_bytes(b"x")
    (tmp_path / "a.geojson").write_text("{}")
    p = _write(tmp_path, "slide_id,path,label,split,case_id,mpp,mask,site\n"
                         f"A,imgs/a.svs,tumour,Train,P1,0.25,a.geojson,oslo\n"
                         f"B,{DATA / 'CMU-1-Small-Region.svs'},normal,,P1,,,bergen\n")
    a, b = read_slides_csv(p)
    assert a.slide_id == "A" and a.path == (tmp_path / "imgs" / "a.svs").resolve()
    assert a.label == "tumour" and a.split == "train" and a.case_id == "P1" and a.mpp == 0.25
    assert a.mask == tmp_path / "a.geojson" and a.extra == {"site": "oslo"} and a.line == 2
    assert b.split is None and b.mpp is None and b.mask is None and b.case == "P1" and b.line == 3


def test_every_problem_at_once(tmp_path):
    p = _write(tmp_path, "slide_id,path,label,split,mpp\n"
                         f"A,{DATA / 'CMU-1-Small-Region.svs'},x,train,\n"
                         f"A,{DATA / 'CMU-1-Small-Region.svs'},x,train,\n"
                         "B,missing.svs,x,train,\n"
                         f"C,{DATA / 'CMU-1-Small-Region.svs'},,train,\n"
                         f"D,{DATA / 'CMU-1-Small-Region.svs'},x,holdout,\n"
                         f"E,{DATA / 'CMU-1-Small-Region.svs'},x,test,-1\n"
                         f"F/G,{DATA / 'CMU-1-Small-Region.svs'},x,test,\n"
                         ",,x,test,\n"
                         f"..,{DATA / 'CMU-1-Small-Region.svs'},x,test,\n")
    with pytest.raises(ManifestError) as e:
        read_slides_csv(p, require_labels=True)
    lines = str(e.value).splitlines()
    assert lines == [
        "slides.csv:3: slide_id 'A' is already used on line 2",
        f"slides.csv:4: slide 'missing.svs' not found (looked at {tmp_path / 'missing.svs'})",
        "slides.csv:5: empty label; training needs a label on every row (or remove the row)",
        "slides.csv:6: split 'holdout' is not one of train, val, test",
        "slides.csv:7: mpp '-1' is not a positive number of microns per pixel",
        "slides.csv:8: slide_id 'F/G' is unsafe as a file name; use ASCII letters, digits, '.', '_', '-', '+', not "
        "starting with '.'",
        "slides.csv:9: empty slide_id",
        "slides.csv:9: empty path",
        "slides.csv:10: slide_id '..' is unsafe as a file name; use ASCII letters, digits, '.', '_', '-', '+', not "
        "starting with '.'",
    ]
    # the same file is fine when labels are not needed, apart from the other problems
    with pytest.raises(ManifestError) as e2:
        read_slides_csv(p)
    assert not any("empty label" in line for line in str(e2.value).splitlines())
    # a job that runs some slides checks only those rows (and a duplicated selected id is still ambiguous)
    rows = read_slides_csv(p, only={"C"})
    assert [(r.slide_id, r.line) for r in rows] == [("C", 5)]
    rows = read_slides_csv(p, only={"C", "missing"}, require_labels=False)
    assert [r.slide_id for r in rows] == ["C"]
    with pytest.raises(ManifestError) as e3:
        read_slides_csv(p, only={"A", "E"})
    assert str(e3.value).splitlines() == ["slides.csv:3: slide_id 'A' is already used on line 2",
                                          "slides.csv:7: mpp '-1' is not a positive number of microns per pixel"]
    with pytest.raises(ManifestError) as e4:
        read_slides_csv(p, exclude={"A", "B", "D", "E", "F/G", ".."})
    assert str(e4.value).splitlines() == ["slides.csv:9: empty slide_id", "slides.csv:9: empty path"]


def test_missing_columns_and_masks(tmp_path):
    with pytest.raises(ManifestError, match=r"slides.csv:1: missing column\(s\) path"):
        read_slides_csv(_write(tmp_path, "slide_id,file\nA,a.svs\n"))
    p = _write(tmp_path, f"slide_id,path,label\nA,{DATA / 'CMU-1-Small-Region.svs'},x\n")
    with pytest.raises(ManifestError, match="missing column.*mask"):
        read_slides_csv(p, require_masks=True)
    p2 = _write(tmp_path, f"slide_id,path,mask\nA,{DATA / 'CMU-1-Small-Region.svs'},\n", "s2.csv")
    with pytest.raises(ManifestError, match="s2.csv:2: empty mask"):
        read_slides_csv(p2, require_masks=True)
    # a mask that is not there matters only when masks are needed (segmentation), not to a classifier
    p3 = _write(tmp_path, f"slide_id,path,label,mask\nA,{DATA / 'CMU-1-Small-Region.svs'},x,gone.geojson\n", "s3.csv")
    assert read_slides_csv(p3, require_labels=True)[0].mask == tmp_path / "gone.geojson"
    with pytest.raises(ManifestError, match=r"s3.csv:2: mask 'gone.geojson' not found \(looked at "):
        read_slides_csv(p3, require_masks=True)
    with pytest.raises(ManifestError, match="no such slides CSV"):
        read_slides_csv(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match="no slides"):
        read_slides_csv(_write(tmp_path, "slide_id,path\n", "empty.csv"))


def test_semicolon_and_tab_separated(tmp_path):
    p = _write(tmp_path, f"slide_id;path\nA;{DATA / 'CMU-1-Small-Region.svs'}\n")
    assert read_slides_csv(p)[0].slide_id == "A"
    p = _write(tmp_path, f"slide_id\tpath\nA\t{DATA / 'CMU-1-Small-Region.svs'}\n", "t.tsv")
    assert read_slides_csv(p)[0].slide_id == "A"


def test_a_csv_that_is_not_utf8_text_is_one_line(tmp_path):
    latin = tmp_path / "latin1.csv"
    latin.write_bytes(b"slide_id,path,note\nA," + str(DATA / "CMU-1-Small-Region.svs").encode() + b",caf\xe9\n")
    with pytest.raises(ManifestError, match=r"^latin1.csv:2: not UTF-8 text \(byte 0xe9\); save it as CSV UTF-8"):
        read_slides_csv(latin)
    with pytest.raises(ManifestError, match=r"^CMU-1-Small-Region.svs: a binary file \(a slide, an Excel"):
        read_slides_csv(DATA / "CMU-1-Small-Region.svs")


def test_a_row_with_more_fields_than_the_header_is_named(tmp_path):
    p = _write(tmp_path, "slide_id,path,label\n"
                         f"A,{DATA / 'CMU-1-Small-Region.svs'},tumour\n"
                         f"B,{DATA / 'CMU-1-Small-Region.svs'},tumour,grade 2,extra\n")
    with pytest.raises(ManifestError, match=r"^slides.csv:3: 2 more field\(s\) than the header has columns"):
        read_slides_csv(p)
