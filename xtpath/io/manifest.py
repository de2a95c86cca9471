"""The slides CSV shared by ``xtpath extract``, ``train`` and ``score``.

Columns: ``slide_id`` and ``path`` (absolute, or relative to the CSV's folder) are required; ``label``,
``split`` (train/val/test), ``case_id``, ``mpp`` (overrides the file) and ``mask`` (segmentation ground truth:
a QuPath GeoJSON in level-0 pixels, or a mask image with its own mpp) are optional; any other column is kept in
:attr:`SlideRow.extra`. The whole file is checked before any work starts and every problem is reported at once,
one per line, as ``slides.csv:LINE: what is wrong``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from xtpath.errors import ManifestError

__all__ = ["SlideRow", "read_slides_csv", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "SPLITS"]

REQUIRED_COLUMNS = ("slide_id", "path")
OPTIONAL_COLUMNS = ("label", "split", "case_id", "mpp", "mask")
SPLITS = ("train", "val", "test")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._\-+]+$")  # ASCII: the ids become file names on every system


@dataclass(frozen=True)
class SlideRow:
    """One row of a slides CSV, with paths resolved.

    Attributes
    ----------
    slide_id : str
        Unique name; output files are named after it.
    path : pathlib.Path
        The slide (absolute).
    label, split, case_id : str or None
    mpp : float or None
        Microns per level-0 pixel overriding the file.
    mask : pathlib.Path or None
        Segmentation ground truth (absolute).
    line : int
        Line number in the CSV (the header is line 1).
    csv : str
        File name of the CSV (for messages such as ``slides.csv:7: ...``).
    extra : dict
        Other columns, as text.
    """

    slide_id: str
    path: Path
    label: str | None = None
    split: str | None = None
    case_id: str | None = None
    mpp: float | None = None
    mask: Path | None = None
    line: int = 0
    extra: dict[str, str] = field(default_factory=dict)
    csv: str = "slides.csv"

    @property
    def where(self) -> str:
        """``file:line`` of this row, for messages."""
        return f"{self.csv}:{self.line}"

    @property
    def case(self) -> str:
        """``case_id``, or the slide id when the CSV has none (each slide its own case)."""
        return self.case_id or self.slide_id


def _clean(v: str | None) -> str | None:
    if v is None:
        return None
    v = v.strip()
    return v or None


def read_slides_csv(csv_path: str | os.PathLike[str], *, require_labels: bool = False,
                    require_masks: bool = False, check_files: bool = True,
                    require_path: bool = True, only: Collection[str] | None = None,
                    exclude: Collection[str] = ()) -> list[SlideRow]:
    """Read and check a slides CSV.

    Parameters
    ----------
    csv_path : path-like
    require_labels : bool
        Every row needs a ``label`` (training a classifier).
    require_masks : bool
        Every row needs a ``mask`` (training segmentation).
    check_files : bool
        Check that slide files exist, and mask files when ``require_masks`` (a classifier never reads the
        ``mask`` column, so a CSV shared with a segmentation task can name masks that are not on this machine).
    require_path : bool
        Every row needs a ``path`` (all but reading labels back, e.g. ``xtpath report --labels``).
    only, exclude : collections of slide_id
        Keep only the rows of ``only`` (when given) and none of ``exclude``; the other rows are not checked, so
        a bad row elsewhere in the CSV does not stop a job that runs some slides (a cluster job per slide). An
        ``exclude`` id that is in no row is a problem (a misspelt id would exclude nothing).

    Raises
    ------
    ManifestError
        Listing every problem, one per line, as ``FILE:LINE: problem``.
    """
    p = Path(csv_path)
    name = p.name
    if p.is_dir():
        raise ManifestError(f"{p}: a folder, not a slides CSV; give a CSV with columns slide_id,path[,label,split,...]")
    if not p.is_file():
        raise ManifestError(f"{p}: no such slides CSV; give a CSV with columns slide_id,path[,label,split,...]")
    base = p.resolve().parent
    problems: list[str] = []
    rows: list[SlideRow] = []
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL byte")
    except UnicodeDecodeError as e:
        if raw[:2] == b"PK" or b"\x00" in raw[:4096]:
            raise ManifestError(f"{name}: a binary file (a slide, an Excel workbook?), not a CSV; give a slides CSV "
                                "(slide_id,path,...), from Excel saved as CSV UTF-8") from None
        line = raw[:e.start].count(b"\n") + 1
        raise ManifestError(f"{name}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save it as CSV UTF-8 "
                            "(Excel: Save As > CSV UTF-8)") from None
    with io.StringIO(text, newline="") as f:
        sample = f.read(4096)
        f.seek(0)
        try:
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t") if sample.strip() else csv.excel
        except csv.Error:
            dialect = csv.excel
        reader = csv.DictReader(f, dialect=dialect)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        missing = [c for c in REQUIRED_COLUMNS if c not in header and (require_path or c != "path")]
        if require_labels and "label" not in header:
            missing.append("label")
        if require_masks and "mask" not in header:
            missing.append("mask")
        if missing:
            needs = ["slide_id", *(["path"] if require_path else []), *(["label"] if require_labels else []),
                     *(["mask"] if require_masks else [])]
            raise ManifestError(f"{name}:1: missing column(s) {', '.join(missing)} (found: {', '.join(header) or 'none'})"
                                f"; the header needs {','.join(needs)}")
        seen: dict[str, int] = {}
        listed: set[str | None] = set()
        for i, rec in enumerate(reader, start=2):
            if not any((v or "").strip() for v in rec.values() if isinstance(v, str)):
                continue  # blank line
            where = f"{name}:{i}"
            sid = _clean(rec.get("slide_id"))
            listed.add(sid)
            if (only is not None and sid not in only) or sid in exclude:
                continue
            raw_path = _clean(rec.get("path"))
            if not sid:
                problems.append(f"{where}: empty slide_id")
            elif not _SAFE_ID.match(sid) or sid.startswith("."):
                problems.append(f"{where}: slide_id {sid!r} is unsafe as a file name; use ASCII letters, digits, "
                                "'.', '_', '-', '+', not starting with '.'")
            if None in rec:  # csv puts the fields beyond the header under None
                problems.append(f"{where}: {len(rec[None])} more field(s) than the header has columns; quote "
                                "values that hold the delimiter, or add the column to the header")
            elif sid in seen:
                problems.append(f"{where}: slide_id {sid!r} is already used on line {seen[sid]}")
            else:
                seen[sid] = i
            path = None
            if not raw_path:
                if require_path:
                    problems.append(f"{where}: empty path")
            else:
                path = Path(raw_path).expanduser()
                path = path if path.is_absolute() else (base / path)
                if check_files and not path.exists():
                    problems.append(f"{where}: slide {raw_path!r} not found (looked at {path})")
            label = _clean(rec.get("label"))
            if require_labels and not label:
                problems.append(f"{where}: empty label; training needs a label on every row (or remove the row)")
            split = _clean(rec.get("split"))
            if split is not None:
                split = split.lower()
                if split not in SPLITS:
                    problems.append(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
            mpp = None
            raw_mpp = _clean(rec.get("mpp"))
            if raw_mpp is not None:
                try:
                    mpp = float(raw_mpp)
                    if not (math.isfinite(mpp) and mpp > 0):
                        raise ValueError
                except ValueError:
                    problems.append(f"{where}: mpp {raw_mpp!r} is not a positive number of microns per pixel")
                    mpp = None
            mask = None
            raw_mask = _clean(rec.get("mask"))
            if raw_mask is not None:
                mask = Path(raw_mask).expanduser()
                mask = mask if mask.is_absolute() else (base / mask)
                if check_files and require_masks and not mask.exists():  # only segmentation reads masks
                    problems.append(f"{where}: mask {raw_mask!r} not found (looked at {mask})")
            elif require_masks:
                problems.append(f"{where}: empty mask; segmentation training needs a mask (GeoJSON or image) "
                                "on every row")
            extra = {k: (v or "") for k, v in rec.items() if k not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS
                     and k is not None}
            if sid and (path is not None or not require_path):
                path = Path() if path is None else path.resolve() if path.exists() else path
                rows.append(SlideRow(slide_id=sid, path=path, label=label,
                                     split=split, case_id=_clean(rec.get("case_id")), mpp=mpp,
                                     mask=mask, line=i, extra=extra, csv=name))
    if not rows and not problems and only is None:
        problems.append(f"{name}:2: the CSV has no slides")
    unknown = sorted(set(exclude) - listed)
    if unknown:
        problems.append(f"{name}: slide_id(s) to exclude that are in no row: {', '.join(map(repr, unknown))}; "
                        "check their spelling")
    if problems:
        raise ManifestError("\n".join(problems))
    return rows
