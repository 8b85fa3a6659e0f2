"""Writing files so that a crash never leaves a half-written output: write beside it, then rename."""
from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from .errors import ItfitsError
from .sources import glob_files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TEMP_NAME_BYTES = 100  # of the output's name in its temporary file's: a 250-byte name must still leave room


def temp_prefix(path: Path | str) -> str:
    """`.NAME.PID.` : the start of a temporary file's or folder's name beside `path` (mkstemp adds random letters and
    `.tmp`). The PID tells `sweep_temps` whether its owner still runs: a second command writing the same output must
    not remove the first one's live file. A long NAME is cut, so that the temporary name stays a legal one."""
    name = os.fsdecode(os.fsencode(Path(path).name)[:TEMP_NAME_BYTES])
    return f".{name}.{os.getpid()}."


# what a write fails with when the place cannot hold the file, and the way out of each
FULL = {errno.ENOSPC: "the disk is full: free space there, or write elsewhere",
        errno.EDQUOT: "the disk quota is used up: free space there, or write elsewhere",
        errno.EFBIG: "the file is over this system's or shell's file size limit (ulimit -f): raise it, or write "
                     "elsewhere",
        errno.ENAMETOOLONG: "a name in the path is too long (most file systems allow 255 bytes): give a shorter one"}
PLACE = {errno.ENOTDIR: "a file stands where a folder is needed: move it, or write elsewhere",
         errno.EEXIST: "a file stands where a folder is needed: move it, or write elsewhere",
         errno.EACCES: "no permission to write there: write elsewhere", errno.EPERM: "no permission to write there: "
         "write elsewhere", errno.EROFS: "the disk is read-only: write elsewhere"}
# torch.save reports a failed write (a full disk) in its own words, without an errno
TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")


def write_error(path: Path | str, e: BaseException, *, place: bool = False) -> ItfitsError | None:
    """The ItfitsError for an OSError `e` met writing `path` (a full disk, a file size limit, a name too long; with
    `place`, also a path through a file or without permission: errors of the folder, not of the data written), or
    None when `e` is not such an error."""
    if isinstance(e, RuntimeError) and any(words in str(e) for words in TORCH_WRITE_FAILED):
        return ItfitsError(f"cannot write {path}: the write failed (is the disk full, or a file size limit set?); "
                           "free space there, or write elsewhere")
    if not isinstance(e, OSError):
        return None
    code = e.errno
    if code is None and (found := re.search(r"\(os error (\d+)\)", str(e))):  # polars' writers give no errno
        code = int(found[1])
    advice = FULL.get(code) or (PLACE.get(code) if place else None)
    return advice and ItfitsError(f"cannot write {path}: {e.strerror or os.strerror(code)}; {advice}")


@contextmanager
def writing(path: Path | str, *, place: bool = False):
    """Turns a failed write of `path` (see write_error) into an ItfitsError that names it and the way out."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        error = write_error(path, e, place=place)
        if error is None:
            raise
        raise error from e


@contextmanager
def atomic_path(path: Path):
    """Yields a temporary path in the same folder; renamed onto `path` only if the block succeeds. Two processes
    writing one `path` each write their own temporary file: the last to finish wins, with a whole file. A full disk
    or a folder that cannot be written is an ItfitsError naming `path` (write_error)."""
    path = Path(path)
    with writing(path, place=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; the output is an ordinary file
    try:
        with writing(path):  # the block's own errors other than a full disk are its own
            yield Path(tmp)
        with writing(path, place=True):
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(path: Path):
    """Yields a temporary folder beside `path`; it replaces `path` only if the block succeeds. Errors as
    atomic_path's."""
    path = Path(path)
    with writing(path, place=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; the output is an ordinary folder
    try:
        with writing(path):
            yield tmp
        with writing(path, place=True):
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


NAME_MAX = 255  # bytes of one file name on Linux's, macOS's and Windows' file systems


def check_output(path: Path | str, *, folder: bool, inputs=()) -> None:
    """Refuse, before any work, an output that cannot be written where asked or that would replace an input:
    a folder where a file goes (or the reverse), a path under a file, a folder without write permission, one of
    `inputs`. `folder`: the output is a folder (a run), else a file."""
    path = Path(path)
    long = next((n for n in path.parts if len(os.fsencode(n)) > NAME_MAX), None)
    if long:
        raise ItfitsError(f"--out {path}: the name {long[:40]}... is {len(os.fsencode(long))} bytes, over the "
                          f"{NAME_MAX} most file systems allow; give a shorter name")
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
                   for m in (glob_files(g) if glob.has_magic(g) and not os.path.exists(g) else [g])]
    for given in map(Path, given_paths):
        if exists and given.exists() and os.path.samefile(path, given):
            raise ItfitsError(f"--out {path} is also an input; writing it would replace the input")
        if folder and given.is_dir() and path.resolve().is_relative_to(given.resolve()):
            raise ItfitsError(f"--out {path} is inside the input folder {given}: its plots would be read as "
                              "data by the next run; put the run folder elsewhere")


def _owner_gone(temp: Path) -> bool:
    """Whether the process named in a temporary file's name (`temp_prefix`) has ended; a name without a PID (an
    older itfits's) counts as ended."""
    _, pid, _ = (temp.name[1:-len(".tmp")].rsplit(".", 2) + ["", ""])[:3]
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's process: alive
        return False
    return False


def sweep_temps(path: Path | str, *, inside: bool = False) -> int:
    """Remove what atomic_path/atomic_dir left of `path` when a process was killed (SIGKILL: no cleanup runs): the
    `.NAME.PID.*.tmp` files and folders beside it, and with `inside` (a run folder) every `.*.tmp` below it, whose
    process PID has ended: another command writing the same output keeps its live file. Called when a command
    starts on that output. Returns how many were removed."""
    path = Path(path)
    found = list(path.parent.glob(glob.escape(temp_prefix(path).rsplit(".", 2)[0]) + ".*.tmp"))
    if inside and path.is_dir():
        found += list(path.rglob(".*.tmp"))
    found = [t for t in found if _owner_gone(t)]
    for stale in found:
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() and not stale.is_symlink() else stale.unlink(missing_ok=True)
    return len(found)


def claim_run_folder(run: Path | str, *, overwrite: bool, log=print) -> bool:
    """Make sure a new run does not mix its files with an old one's: a folder that holds anything is refused with
    the ways out, or with `overwrite` renamed aside (atomic: the old run is whole, under its new name). Returns
    whether the run folder is new, so that a run that fails may remove it."""
    run = Path(run)
    if not run.exists():
        return True
    if not run.is_dir() or not any(run.iterdir()):
        return False  # an empty folder the user made; a file was refused by check_output
    if Path.cwd().resolve().is_relative_to(run.resolve()):
        raise ItfitsError(f"--out {run} is the current folder (or holds it) and has files in it; a run needs a folder "
                          "of its own: give a new one, e.g. --out runs/NAME")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = next(c for i in range(1000) if not (c := run.with_name(f"{run.name}.old-{stamp}" + (f"-{i}" if i else ""))).exists())
    if not overwrite:
        what = "a finished run" if (run / "model").is_dir() else "files of another run or other files"
        raise ItfitsError(f"--out {run} holds {what}; nothing was changed. Continue an interrupted run with itfits fit "
                          f"--resume {run}, give a new --out, or add --overwrite to move the old one aside (to "
                          f"{aside.name}) and start afresh")
    os.rename(run, aside)
    log(f"moved the old run in {run} aside to {aside}")
    return True


def remove_failed_run(run: Path | str) -> None:
    """Remove the folder of a run that failed, unless it holds a checkpoint (`--resume` goes on from it)."""
    run = Path(run)
    if run.is_dir() and not (run / "checkpoints" / "last.pt").exists():
        shutil.rmtree(run, ignore_errors=True)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what spreadsheets read as a formula (OWASP CSV injection)


def escape_formulas(df: pl.DataFrame) -> pl.DataFrame:
    """Text cells that start like a spreadsheet formula get a leading ' (OWASP's advice), so a file named
    =HYPERLINK(...).png opens as text; for CSV written for people. Number columns are left alone: -3.2 is a number."""
    danger = "^[" + "".join(FORMULA_STARTS).replace("-", "\\-") + "]"
    text = [c for c, t in df.schema.items() if t == pl.String or isinstance(t, pl.Categorical)]
    return df.with_columns(pl.when(pl.col(c).cast(pl.String).str.contains(danger))
                           .then(pl.lit("'") + pl.col(c).cast(pl.String)).otherwise(pl.col(c).cast(pl.String)).alias(c)
                           for c in text)


def write_csv(df: pl.DataFrame, dest=None, *, include_header: bool = True) -> str | None:
    """The one way itfits writes CSV for people (predictions, the run folder's tables, check.csv, serve's download):
    text cells and column names (a class named like a formula heads a column of confusion_matrix.csv) escaped by
    escape_formulas. `dest`: a path or an open binary file; None: the CSV is returned as text."""
    df = escape_formulas(df)
    df = df.rename({c: "'" + c for c in df.columns if c.startswith(FORMULA_STARTS)})
    return df.write_csv(dest, include_header=include_header)


def csv_unwritable(df: pl.DataFrame) -> list[str]:
    """'name (type)' of each column a CSV cannot hold: lists, structs, arrays, binary, objects."""
    return [f"{c} ({t})" for c, t in df.schema.items() if t.is_nested() or t in (pl.Binary, pl.Object)]


def write_json(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def write_table(df: pl.DataFrame, path: Path) -> None:
    """CSV (write_csv: formulas escaped) or Parquet by the file's extension, written atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ItfitsError(f"cannot write {path}: the extension must be .csv or .parquet")
    with atomic_path(path) as tmp:
        df.write_parquet(tmp) if suffix == ".parquet" else write_csv(df, tmp)
