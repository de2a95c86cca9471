"""Package-level rules: imports flow one way, the public API is cheap to import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_contract():
    """io -> tissue -> tiling -> cache -> models -> ... -> cli: checked by import-linter (pyproject)."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    r = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" in r.stdout and "0 broken" in r.stdout


def test_public_api_is_lazy():
    code = ("import sys, xtpath; assert 'openslide' not in sys.modules and 'torch' not in sys.modules; "
            "from xtpath import open_slide, detect_tissue, make_region_grid, XtpathError; "
            "print(open_slide.__module__, detect_tissue.__module__, make_region_grid.__module__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["xtpath.io.slide", "xtpath.tissue", "xtpath.tiling"]
