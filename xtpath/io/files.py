"""Atomic file output: write to a temporary name in the same folder, then rename.

A killed job therefore leaves either the previous file or none, never a half-written one. Temporary names
start with ``.`` and end with ``.tmp`` so that they are easy to recognise and clean up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "publish", "write_json", "write_text", "file_fingerprint"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Give a finished temporary file the usual permissions (``mkstemp`` makes it owner-only) and rename it."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on error delete it.

    Examples
    --------
    >>> with atomic_path("out.png") as tmp:          # doctest: +SKIP
    ...     image.save(tmp, format="PNG")
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        publish(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def file_fingerprint(path: str | os.PathLike[str], head: int = 1 << 20) -> str:
    """A cheap identity of a slide's bytes, which survives moving or copying the file: its size and the
    SHA-256 of its first ``head`` bytes (for a folder, e.g. DICOM: its files' names and sizes)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(q for q in p.iterdir() if q.is_file()):
            h.update(f"{f.name}:{f.stat().st_size};".encode())
        return f"dir:{h.hexdigest()[:32]}"
    with open(p, "rb") as f:
        h.update(f.read(head))
    return f"{p.stat().st_size}:{h.hexdigest()[:32]}"
