"""Folder / CSV / Parquet -> items table (path, label, split, error), and checks of the files in it.

The items table is a polars DataFrame with one row per file: `path` (absolute, str; see `text_path`), `label` (str),
`split` ("train" or "valid") and `error` (null, or why the file cannot be used).
"""
from __future__ import annotations

import glob as globlib
import os
import re
import stat
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import polars as pl

from .errors import ItfitsError, ItfitsWarning

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}  # what libsndfile >= 1.1 decodes (soundfile)
TABLE_EXTS = {".csv", ".parquet"}
INFER_ROWS = 10_000  # CSV rows polars infers types from; the whole file when a later value does not fit
# CSV words read as missing, besides empty fields: pandas' list (a float column reads NaN as NaN: missing too), and
# "" (a quoted empty field, which polars reads as text)
NULL_VALUES = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
               "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]


def _check_table(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ItfitsError(f"{path} is a folder; a table is a .csv or .parquet file")
    if not path.is_file():
        raise ItfitsError(f"{path} does not exist or is not a file; a table is a .csv or .parquet file")
    if path.suffix.lower() not in TABLE_EXTS:
        raise ItfitsError(f"{path}: a table must be a .csv or .parquet file")
    if path.suffix.lower() == ".csv":
        _check_encoding(path)
    return path


# byte order marks of the encodings a CSV is saved in besides UTF-8 (spreadsheets' "Unicode text" is UTF-16)
BOMS = {b"\xff\xfe\x00\x00": "UTF-32 (little-endian)", b"\x00\x00\xfe\xff": "UTF-32 (big-endian)",
        b"\xff\xfe": "UTF-16 (little-endian)", b"\xfe\xff": "UTF-16 (big-endian)"}
ENCODING_HEAD = 1 << 16  # bytes of a CSV looked at before reading it; polars finds bad bytes past them


def not_utf8(path: Path | str, where: str = "", encoding: str = "ENCODING") -> ItfitsError:
    return ItfitsError(f"{path} is not UTF-8 text{where}; itfits reads CSV as UTF-8: save it as UTF-8 (a "
                       f"spreadsheet's 'CSV UTF-8', or iconv -f {encoding} -t UTF-8 < old.csv > new.csv)")


def _check_encoding(path: Path) -> None:
    """An ItfitsError naming the encoding of a CSV that is not UTF-8 (UTF-16/32 by their byte order mark or NUL
    bytes, else the first byte UTF-8 cannot read), instead of polars reading garbled column names."""
    with open(path, "rb") as f:
        head = f.read(ENCODING_HEAD)
    bom = next((name for mark, name in BOMS.items() if head.startswith(mark)), None)
    if bom or head.count(b"\x00") > len(head) // 8:  # UTF-16 text without a BOM: every other byte NUL for ASCII
        raise not_utf8(path, f": it is {bom or 'UTF-16 or UTF-32 (it holds NUL bytes)'}", (bom or "UTF-16")[:6])
    import codecs
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < ENCODING_HEAD)
    except UnicodeDecodeError as e:
        raise not_utf8(path, f": byte {head[e.start]:#04x} at offset {e.start} is not UTF-8 (Latin-1 or "
                             "Windows-1252, maybe)", "CP1252") from e


def table_columns(path: Path | str) -> list[str]:
    """Column names of a CSV (its header) or Parquet file, without reading the data. A name given twice, or a CSV
    of one column that other separators split (a ';' or tab-separated file), is an ItfitsError."""
    path = _check_table(path)
    try:
        if path.suffix.lower() == ".parquet":
            return pl.scan_parquet(path).collect_schema().names()
        names = pl.read_csv(path, n_rows=0, infer_schema=False).columns
    except Exception as e:
        raise ItfitsError(f"cannot read table {path}: {e}") from e
    twice = sorted({m[1] for n in names if (m := re.fullmatch(r"(.+)_duplicated_\d+", n)) and m[1] in names})
    if twice:  # polars renames the second 'x' to 'x_duplicated_0'
        raise ItfitsError(f"{path}: column name(s) {', '.join(twice)} appear more than once in the header; "
                          "rename them so that each column has its own name")
    separator = next((s for s in (";", "\t", "|") if len(names) == 1 and s in names[0]), None)
    if separator:
        raise ItfitsError(f"{path} reads as one column, {names[0][:60]!r}...: its fields look separated by "
                          f"{separator!r}; itfits reads comma-separated CSV (or Parquet): save it with commas")
    return names


def read_table(path: Path | str, columns: list[str] | None = None, *, strings=(), categorical: bool = False
               ) -> pl.DataFrame:
    """`columns` (default all) of a CSV or Parquet file, scanned lazily so other columns are never parsed.
    CSV: empty fields and the NULL_VALUES words are missing; columns named in `strings` are read as text, to be
    parsed with `tabular.parse_columns`. `categorical`: the other text columns come as pl.Categorical, each with
    categories of its own, so each string is hashed once (while a CSV is parsed) and preprocessing works on ids."""
    path = _check_table(path)
    parquet = path.suffix.lower() == ".parquet"

    def scan(infer_rows: int | None) -> pl.LazyFrame:
        if parquet:
            lf = pl.scan_parquet(path)
        else:  # the schema inferred once, then given whole: the read itself infers nothing (about 7% faster)
            schema = pl.scan_csv(path, infer_schema_length=infer_rows,
                                 schema_overrides={c: pl.String for c in strings}).collect_schema()
            lf = pl.scan_csv(path, schema=schema)
            if _has_empty_lines(path):  # blank lines (and lines of commas only) are not rows; polars reads them so
                lf = lf.filter(~pl.all_horizontal(pl.all().is_null()))
        lf = lf.select(columns) if columns is not None else lf
        if not categorical:
            return lf
        text = [c for c, t in lf.collect_schema().items() if t == pl.String and c not in strings]
        return lf.with_columns(pl.col(c).cast(pl.Categorical(pl.Categories.random())) for c in text)

    try:
        try:
            df = scan(INFER_ROWS).collect()
        except pl.exceptions.ComputeError:  # a value past the first INFER_ROWS rows does not fit the inferred type
            df = scan(None).collect()
    except Exception as e:
        if "more fields than defined" in str(e):  # polars' advice names one of its own options
            raise ItfitsError(f"cannot read table {path}: a row has more fields than the header (a comma in a field "
                              "that is not quoted?)") from e
        if "invalid utf-8" in str(e):  # past the bytes _check_encoding looked at
            raise not_utf8(path, " (past its first 64 KB)") from e
        raise ItfitsError(f"cannot read table {path}: {e}") from e
    if not parquet:
        _refuse_short_rows(path, df)
    return df if parquet else _missing_words(df, keep_text=strings)


def _has_empty_lines(path: Path) -> bool:
    """Whether a CSV has a line that is empty or holds only commas (a search of the bytes: no parsing)."""
    import mmap
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return re.search(rb"\n,*\r?\n|\n,+\r?\Z", data) is not None


def _refuse_short_rows(path: Path, df: pl.DataFrame) -> None:
    """An ItfitsError for a CSV record with fewer fields than the header, as for one with more: polars pads it
    with missing values without a word (a lost comma shifts every later field). Such a record leaves the last
    column missing, so Python's csv module (slow) looks for one only when the last column has missing values."""
    import csv
    names = pl.scan_csv(path, n_rows=0, infer_schema=False).collect_schema().names()
    last = names[-1]
    missing = (df[last].null_count() if last in df.columns else
               pl.scan_csv(path, infer_schema=False).select(pl.col(last).null_count()).collect().item())
    if not missing:
        return
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        next(reader, None)
        for row in reader:
            if row and len(row) < len(names):
                raise ItfitsError(f"cannot read table {path}: line {reader.line_num} has {len(row)} fields where "
                                  f"the header has {len(names)} (a lost comma?); fix or remove that row")


def _missing_words(df: pl.DataFrame, *, keep_text=()) -> pl.DataFrame:
    """NULL_VALUES words in text columns -> missing; a text column then holding only numbers becomes a number
    column (Int64, else Float64) unless in `keep_text`. Same result as polars' `null_values=` option, which
    slows the whole read (about 0.7 s instead of 0.4 s for a million rows), where this looks at text columns only
    (at a Categorical column's categories only)."""
    text = [c for c, t in df.schema.items() if t == pl.String]
    found = df.select(pl.col(text).is_in(NULL_VALUES).any()).row(0, named=True) if text else {}
    found.update({c: t.categories.to_series().is_in(NULL_VALUES).any() for c, t in df.schema.items()
                  if isinstance(t, pl.Categorical)})
    fixed = []
    for name in (c for c in df.columns if found.get(c)):
        s = df[name].cast(pl.String)
        s = s.set(s.is_in(NULL_VALUES), None)
        for dtype in (() if name in keep_text else (pl.Int64, pl.Float64)):
            number = s.str.strip_chars().cast(dtype, strict=False)
            if number.null_count() == s.null_count():
                s = number
                break
        fixed.append(s.cast(df.schema[name]) if s.dtype == pl.String else s)  # text stays Categorical if it was
    return df.with_columns(fixed) if fixed else df


def text_path(path: str) -> str:
    """`path` as valid UTF-8 text, for tables, CSV and JSON: a file name's bytes that are not UTF-8 (which Python
    holds as lone surrogates, PEP 383; polars refuses them) written as \\xNN, e.g. caf\\xe9.png. `os_path` undoes it."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")  # what text_path writes for a byte that is not UTF-8


def os_path(path: str) -> str:
    """The file a `text_path` names: `path` itself when it holds no \\xNN or exists as it is written, else with
    each \\xNN back as the byte it stands for. Used where files are opened; costs a lookup only for such names."""
    if "\\x" not in path or os.path.lexists(path):
        return path
    return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m[1], 16)), path)


def _files_under(folder: Path, exts: set[str]) -> list[Path]:
    """Files with `exts` at any depth, and links to nothing and other non-folders (FIFOs, sockets) with them:
    reading one gives its error (not_a_file), so such a path is a skipped file or an error row, not one dropped
    without a word. Links to folders are not followed (pathlib's rglob), so a link loop ends."""
    return sorted(p for p in visible_under(folder) if not p.is_dir() and p.suffix.lower() in exts)


def visible_under(folder: Path | str):
    """Everything below `folder` at any depth, less hidden files and what hidden folders hold (.thumbs/,
    .ipynb_checkpoints/): they are not data."""
    folder = Path(folder)
    return (p for p in folder.rglob("*") if not any(n.startswith(".") for n in p.relative_to(folder).parts))


def not_found(path: Path) -> str:
    """Why a path that should be a file is not one: a broken link (to where) or no such file."""
    return f"broken link to {os.readlink(path)}" if path.is_symlink() and not path.exists() else "file not found"


def not_a_file(path: Path | str) -> str | None:
    """Why `path` cannot be read as a file, found without reading it (one stat), or None: missing, a broken link,
    or not a regular file: reading a FIFO waits forever for a writer, a device may never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return not_found(Path(path))
    except OSError as e:
        return f"cannot read: {e.strerror}"
    if stat.S_ISREG(mode):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket"
            if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special")
    return f"{kind}, not a regular file; not read"


def glob_files(pattern: str) -> list[str]:
    """What a shell-style `pattern` matches (`**`: any depth), sorted, as glob.glob would give it but without
    following links to folders (glob.glob follows them: a link to a parent folder repeats every file about 40
    levels deep). Hidden files and folders match only a part of the pattern that starts with a dot."""
    parts = Path(pattern).parts
    first = next((i for i, part in enumerate(parts) if globlib.has_magic(part)), len(parts))
    if first == len(parts):
        return [pattern] if os.path.lexists(pattern) else []
    base, rest = Path(*parts[:first]) if first else Path("."), list(parts[first:])
    if rest[-1] == "**":  # glob.glob's "dir/**" matches the files below too; pathlib's only the folders
        rest.append("*")
    matches = []
    for m in base.glob("/".join(rest)):
        names = m.parts[len(base.parts):]
        if "**" in rest:  # the folders ** crossed were not named in the pattern
            hidden = any(n.startswith(".") for n in names[:-1]) or (names[-1].startswith(".")
                                                                   and not rest[-1].startswith("."))
        else:
            hidden = any(n.startswith(".") and not r.startswith(".") for n, r in zip(names, rest))
        if not hidden:
            matches.append(str(m))
    return sorted(matches)


def has_files(folder: Path, exts: set[str]) -> bool:
    """Whether `folder` holds a file with one of `exts` at any depth; stops at the first. Unlike `_files_under`,
    a broken link does not count: there is nothing in it to use."""
    return any(p.suffix.lower() in exts and p.is_file() for p in visible_under(folder))


def _class_folder(folder: Path, exts: set[str], split: str | None) -> pl.DataFrame:
    classes = {d: _files_under(d, exts) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    empty = [text_path(d.name) for d, files in classes.items() if not files]
    if empty and len(empty) < len(classes):  # with no files at all, the caller's error says what is wrong
        warnings.warn(f"{text_path(str(folder))}: no files with the extensions {' '.join(sorted(exts))} in "
                      f"{', '.join(empty)}, so {'they are' if len(empty) > 1 else 'it is'} not a class here",
                      ItfitsWarning)
    rows = [(text_path(str(f.resolve() if f.exists() else f.absolute())), text_path(d.name), split)  # a broken link
            for d, files in classes.items() for f in files]  # is listed as itself
    return pl.DataFrame(rows, schema={"path": pl.String, "label": pl.String, "split": pl.String}, orient="row")


def _label_column(path: Path, columns: list[str]) -> str:
    """`label`, or `labels` (a multi-label table), the column of `path`'s classes; an ItfitsError without one."""
    if "label" in columns and "labels" in columns:
        raise ItfitsError(f"{path} has both a label and a labels column; keep label (one class per file) or labels "
                          "(several, for a multi-label model)")
    missing = ({"path"} - set(columns)) | ({"label"} if not {"label", "labels"} & set(columns) else set())
    if missing:
        raise ItfitsError(f"{path} needs columns path,label (or path,labels: multi-label) (missing: "
                          f"{', '.join(sorted(missing))}; has: {', '.join(columns)}). For a tabular model, pass "
                          "--target COLUMN")
    return "labels" if "labels" in columns else "label"


LABEL_SEPARATORS = (";", " ")  # between the labels of a multi-label cell: ';' where any cell has one, else spaces
NOT_SEPARATORS = (",", "|")


def split_labels(cells: list[str | None], *, where: str) -> list[list[str]]:
    """Each multi-label cell (line i + 2 of the table `where`) as its sorted distinct class names; an empty cell is
    [] (a file of none of the classes). The separator is ';' where any cell holds one (class names may then hold
    spaces), else whitespace. An ItfitsError names the cell for ',' or '|', and for a cell of a ';' table whose
    spaces separate names that other cells hold (the two separators mixed)."""
    text = ["" if c is None else str(c).strip() for c in cells]
    for i, t in enumerate(text):
        bad = next((s for s in NOT_SEPARATORS if s in t), None)
        if bad:
            raise ItfitsError(f"{where}: line {i + 2}: labels cell {t!r} holds {bad!r}; separate labels with a space "
                              "or ';'")
    if not any(";" in t for t in text):
        return [sorted(set(t.split())) for t in text]
    lists = [sorted({n.strip() for n in t.split(";") if n.strip()}) for t in text]
    names = {n for names in lists for n in names}
    for i, found in enumerate(lists):
        mixed = next((n for n in found if len(n.split()) > 1 and all(p in names for p in n.split())), None)
        if mixed:
            raise ItfitsError(f"{where}: line {i + 2}: labels cell {text[i]!r} separates {mixed!r} with spaces where "
                              "other cells use ';'; use one separator in the whole table")
    return lists


def _from_table(path: Path, multi_label: bool = False) -> pl.DataFrame:
    df = read_table(path)
    column = _label_column(path, df.columns)
    multi, df = multi_label or column == "labels", df.rename({column: "label"}) if column == "labels" else df
    split = pl.col("split").cast(pl.String) if "split" in df.columns else (
        pl.when(pl.col("is_valid").cast(pl.Boolean)).then(pl.lit("valid")).otherwise(pl.lit("train"))
        if "is_valid" in df.columns else pl.lit(None, pl.String))
    base = str(path.resolve().parent)
    # an empty cell is a row to skip with its reason, not a file None or a class named None
    given, label = pl.col("path").cast(pl.String).str.strip_chars(), pl.col("label").cast(pl.String).str.strip_chars()
    row = (pl.int_range(pl.len()) + 2).cast(pl.String)  # the line in the file, counting the header as line 1
    error = (pl.when((given == "") | given.is_null()).then(pl.lit("empty path cell (line ") + row + ")")
             .when((label == "") | label.is_null()).then(pl.lit("empty label cell (line ") + row + ")"))
    items = df.select(
        pl.when(given != "").then(given).map_elements(lambda p: text_path(str((Path(base) / p).resolve())),
                                                      return_dtype=pl.String).alias("path"),
        pl.when(label != "").then(label).alias("label"), split.alias("split"), error.alias("error"))
    if not multi:
        return items
    # multi-label: an empty cell is a file of none of the classes, not a row to skip
    lists = split_labels(df["label"].cast(pl.String).to_list(), where=str(path))
    return items.with_columns(
        label=pl.Series([";".join(names) for names in lists], dtype=pl.String),
        labels=pl.Series(lists, dtype=pl.List(pl.String)),
        error=pl.when(given.is_null() | (given == "")).then(pl.col("error")))


def read_source(data: str | Path, *, exts: set[str] = IMAGE_EXTS, valid_pct: float = 0.2, seed: int = 42,
                check: Callable[[str], str | None] | None = None, multi_label: bool = False) -> pl.DataFrame:
    """Items table from a class-per-folder tree, a folder with train/ and valid/, or a path,label table.

    Without a given split, a seeded stratified split puts `valid_pct` of each class in "valid". With `check`
    (e.g. check_image), `error` is filled first (see check_files) and the split is made among the usable files,
    so that every class with 2 or more of them is in both splits (an unusable file gets "train").
    Multi-label (a path,labels table, or `multi_label`: a label cell may hold several, see `split_labels`): the
    items have `labels` too (a list of class names; `label` holds them joined by ';') and the split is a seeded
    random `valid_pct` of the usable files (a file has several classes, so there is no class to stratify by).
    """
    data = Path(data)
    if not data.exists():
        raise ItfitsError(f"{data} does not exist; DATA is a folder with one sub-folder per class, or a CSV/Parquet "
                          "with path,label columns")
    if data.is_file():
        if data.suffix.lower() not in TABLE_EXTS:
            raise ItfitsError(f"{data} is a file, not a folder or a .csv/.parquet table")
        items = _from_table(data, multi_label)
    elif (data / "train").is_dir() and (data / "valid").is_dir():
        items = pl.concat([_class_folder(data / s, exts, s) for s in ("train", "valid")])
    else:
        items = _class_folder(data, exts, None)
    if items.height == 0:
        raise ItfitsError(f"no files with extensions {', '.join(sorted(exts))} found in class sub-folders of {data}")
    bad_split = items.filter(pl.col("split").is_not_null() & ~pl.col("split").is_in(["train", "valid"]))
    if bad_split.height:
        raise ItfitsError(f"split values must be train or valid, got {bad_split['split'][0]!r}")
    if "error" not in items.columns:
        items = items.with_columns(error=pl.lit(None, pl.String))
    if multi_label and "labels" not in items.columns:  # class folders: one label each
        items = items.with_columns(labels=pl.concat_list(pl.col("label")))
    if check is not None:  # before the split: an unusable file takes no class's place in valid
        items = check_files(items, check)
    if items["split"].null_count():
        usable = items["error"].is_null().to_numpy()
        split = np.full(items.height, "train", dtype=object)
        labels = items.filter(pl.Series(usable))["label"].to_list()
        split[usable] = (random_split(len(labels), valid_pct=valid_pct, seed=seed) if "labels" in items.columns else
                         stratified_split(labels, valid_pct=valid_pct, seed=seed))
        items = items.with_columns(split=pl.Series(split.tolist(), dtype=pl.String))
    return items


def data_exts(data: str | Path) -> set[str]:
    """The file extensions (lower case) of DATA: of the files under a folder, or of a path,label table's paths."""
    data = Path(data)
    if data.is_dir():
        return {p.suffix.lower() for p in visible_under(data) if p.is_file()}
    if data.is_file() and data.suffix.lower() in TABLE_EXTS:
        df = read_table(data)
        return {Path(p).suffix.lower() for p in df["path"].cast(pl.String).drop_nulls()} if "path" in df.columns else set()
    return set()


def stratified_split(labels: list[str], *, valid_pct: float, seed: int) -> list[str]:
    """'train'/'valid' per item: per class, a seeded shuffle puts round(n * valid_pct) (at least 1) in valid."""
    _, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    return np.where(stratified_valid(codes, valid_pct=valid_pct, seed=seed), "valid", "train").tolist()


def random_split(n: int, *, valid_pct: float, seed: int) -> list[str]:
    """'train'/'valid' per item: a seeded shuffle puts round(n * valid_pct) (at least 1, at most n - 1) in valid."""
    valid = np.zeros(n, dtype=bool)
    valid[np.random.default_rng(seed).permutation(n)[:min(n - 1, max(1, round(n * valid_pct)))]] = True
    return np.where(valid, "valid", "train").tolist()


def stratified_valid(codes: np.ndarray, *, valid_pct: float, seed: int) -> np.ndarray:
    """Valid mask for items with class codes 0..C-1 (classes in sorted order), as `stratified_split` splits:
    per class, in code order, a seeded shuffle puts round(n * valid_pct) (at least 1) in valid; none of a class
    of one. Vectorised over items, so it serves a table of millions of rows too."""
    rng = np.random.default_rng(seed)
    codes = np.asarray(codes, dtype=np.int64).ravel()
    n_classes = int(codes.max()) + 1 if len(codes) else 0
    if n_classes <= 64:  # item indices per class, ascending: a scan per class beats a sort for few classes
        groups = (np.flatnonzero(codes == k) for k in range(n_classes))
    else:
        groups = np.split(np.argsort(codes, kind="stable"), np.cumsum(np.bincount(codes))[:-1])
    valid = np.zeros(len(codes), dtype=bool)
    for idx in groups:
        idx = rng.permutation(idx)
        valid[idx[:min(len(idx) - 1, max(1, round(len(idx) * valid_pct)))]] = True  # n >= 2: one or more in each split
    return valid


# pixels decoded at once in one process (a batch's decoding threads, serve's uploads): about 0.6 GB as RGB, so that
# 16 threads on 9,000 x 9,000 PNGs hold 3 of them, not 16; an image larger than this is decoded alone
DECODE_PIXELS = 200_000_000
_decoding = threading.Condition()
_in_flight = [0]  # pixels being decoded now


@contextmanager
def decode_budget(pixels: int):
    """Waits until `pixels` more fit in DECODE_PIXELS being decoded in this process, and holds them meanwhile."""
    pixels = min(int(pixels), DECODE_PIXELS)
    with _decoding:
        _decoding.wait_for(lambda: _in_flight[0] + pixels <= DECODE_PIXELS)
        _in_flight[0] += pixels
    try:
        yield
    finally:
        with _decoding:
            _in_flight[0] -= pixels
            _decoding.notify_all()


def open_image(path):
    """PIL's Image.open, refusing an image over Image.MAX_IMAGE_PIXELS (DecompressionBombError) where PIL only
    warns below twice that. Checked here, not by turning PIL's warning into an error: that changes the process's
    warning filters, which is not thread-safe (check_files reads in threads)."""
    from PIL import Image
    im = Image.open(os_path(path) if isinstance(path, str) else path)
    pixels = im.width * im.height
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
        im.close()
        raise Image.DecompressionBombError(f"image size ({pixels} pixels) exceeds the limit of "
                                           f"{Image.MAX_IMAGE_PIXELS} pixels, could be a decompression bomb")
    return im


def read_checked(path: str, read: Callable[[str], object]) -> tuple[object | None, str | None]:
    """(read(path), None), or (None, the reason the file cannot be used): missing, empty, a decompression bomb,
    not an image, truncated. `read` opens the file with `open_image`. Prediction reads each file once this way
    instead of checking, then decoding; one stat first refuses what is not a regular file (a FIFO, a device),
    whether the file is empty is asked only when reading fails. `path` goes to `read` as it is: PIL opens a str about 8 us sooner
    than a Path, a tenth of decoding a small PNG."""
    from PIL import Image
    special = not_a_file(os_path(str(path)))  # before any read: open() on a FIFO would wait forever
    if special:
        return None, special
    try:
        return read(path), None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning: where filters raise it
        return None, f"decompression bomb: {e}"
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        p = Path(os_path(str(path)))
        if not p.is_file():
            return None, not_found(p)
        if p.stat().st_size == 0:
            return None, "empty file (0 bytes)"
        return None, "not an image" if isinstance(e, Image.UnidentifiedImageError) else f"cannot decode: {e}"


def _decode_fully(path: str) -> None:
    with open_image(path) as im, decode_budget(im.width * im.height):
        im.load()  # a truncated file fails here, not at verify()


def check_image(path: str) -> str | None:
    """None when the file decodes fully as an image, else the reason it cannot be used."""
    return read_checked(path, _decode_fully)[1]


def check_files(items: pl.DataFrame, check: Callable[[str], str | None] = check_image, *, workers: int = 8) -> pl.DataFrame:
    """The items table with `error` filled for every file that `check` rejects (threads: decoding is I/O + C);
    rows that have an error already keep it, unchecked."""
    todo = items["error"].is_null() if "error" in items.columns else pl.repeat(True, items.height, eager=True)
    with ThreadPoolExecutor(workers) as ex:
        found = iter(list(ex.map(check, items.filter(todo)["path"].to_list())))
    given = items["error"].to_list() if "error" in items.columns else [None] * items.height
    errors = [(e := next(found)) and text_path(e) if ok else old for ok, old in zip(todo.to_list(), given)]
    return items.with_columns(error=pl.Series(errors, dtype=pl.String))


def require_classes(items: pl.DataFrame) -> list[str]:
    """Sorted class names of the usable items; an ItfitsError when training cannot work with them."""
    ok = items.filter(pl.col("error").is_null())
    counts = ok.group_by("label").len().sort("label")
    require_counts(counts, "label")
    require_splits(ok)
    return counts["label"].to_list()


UNKNOWN_LABEL = "unknown"  # the label predict gives a row the model should not trust


def refuse_unknown_class(classes, *, rename: str = "its folder, or its label in the table") -> None:
    """An ItfitsError when a class is named like predict's unknown label: its predictions could not be told from
    rows the model does not trust."""
    if UNKNOWN_LABEL in classes:
        raise ItfitsError(f"a class is named '{UNKNOWN_LABEL}', the label predict gives what the model should not "
                          f"trust, so the two could not be told apart; rename the class ({rename}), e.g. to 'other'")


def require_counts(counts: pl.DataFrame, column: str) -> None:
    """An ItfitsError unless (`column`: class, len: usable files) has 2 or more classes of 2 or more files each,
    none named 'unknown'."""
    refuse_unknown_class(counts[column].to_list())
    if counts.height < 2:
        raise ItfitsError(f"need at least 2 classes with usable files, found {counts.height} "
                          f"({', '.join(counts[column].to_list()) or 'none'})")
    small = counts.filter(pl.col("len") < 2)
    if small.height:
        raise ItfitsError("every class needs at least 2 usable files; too few in: " + ", ".join(
            f"{r[column]} ({r['len']})" for r in small.iter_rows(named=True)))


def require_splits(ok: pl.DataFrame) -> None:
    """An ItfitsError unless the usable items `ok` fill both the train and the valid split."""
    for split in ("train", "valid"):
        if ok.filter(pl.col("split") == split).height == 0:
            raise ItfitsError(f"no usable files in the {split} split")


def expand_inputs(inputs: Iterable[str], exts: set[str] = IMAGE_EXTS) -> list[tuple[str, str | None]]:
    """(path, error) for prediction inputs: files as given, folders searched recursively, globs expanded."""
    out: list[tuple[str, str | None]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += [(str(f), None) for f in _files_under(p, exts)] or [
                (item, f"no files in this folder with the extensions {' '.join(sorted(exts))}")]
        elif p.exists():
            out.append((str(p), None))
        elif globlib.has_magic(item):
            matches = glob_files(item)
            out += [(m, None) for m in matches if not Path(m).is_dir()] or [(item, "no files match this pattern")]
        else:
            out.append((item, not_found(p)))
    return out
