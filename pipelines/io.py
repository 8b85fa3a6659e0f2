"""Writing files so that a crash never leaves a half-written output: write beside it, then rename."""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from .errors import ItfitsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path):
    """Yields a temporary path in the same folder; renamed onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; the output is an ordinary file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(path: Path):
    """Yields a temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; the output is an ordinary folder
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_output(path: Path | str, *, folder: bool, inputs=()) -> None:
    """Refuse, before any work, an output that cannot be written where asked or that would replace an input:
    a folder where a file goes (or the reverse), a path under a file, a folder without write permission, one of
    `inputs`. `folder`: the output is a folder (a run), else a file."""
    path = Path(path)
    exists, what = path.exists(), "folder" if folder else "file"
    if exists and path.is_dir() != folder:
        raise ItfitsError(f"--out {path} is a {'file' if folder else 'folder'}; give a {what} path")
    parent = next(p for p in (path.parent, *path.parent.parents) if p.exists())  # the first that exists
    if not parent.is_dir():
        raise ItfitsError(f"--out {path}: {parent} is a file, so nothing can be written under it")
    written = path if exists else parent
    if not os.access(written, os.W_OK):
        raise ItfitsError(f"--out {path}: no permission to write in {written}")
    # a pattern among the inputs (predict "data/*.csv") counts as the files it matches, as expand_inputs reads it
    given_paths = [m for g in map(str, inputs)
                   for m in (glob.glob(g, recursive=True) if glob.has_magic(g) and not os.path.exists(g) else [g])]
    for given in map(Path, given_paths):
        if exists and given.exists() and os.path.samefile(path, given):
            raise ItfitsError(f"--out {path} is also an input; writing it would replace the input")
        if folder and given.is_dir() and path.resolve().is_relative_to(given.resolve()):
            raise ItfitsError(f"--out {path} is inside the input folder {given}: its plots would be read as "
                              "data by the next run; put the run folder elsewhere")


def write_json(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def write_table(df: pl.DataFrame, path: Path) -> None:
    """CSV or Parquet by the file's extension, written atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ItfitsError(f"cannot write {path}: the extension must be .csv or .parquet")
    with atomic_path(path) as tmp:
        df.write_parquet(tmp) if suffix == ".parquet" else df.write_csv(tmp)
