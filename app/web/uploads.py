"""Uploads: a multipart body streamed into one per-request folder, with limits on size, count and type.

Nothing is written outside the folder the caller gives: a client's file name is cut to its last part,
reduced to safe characters and prefixed with its index; its folders are never used. A file over the size
limit stops being written as soon as it passes the limit and is deleted.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import polars as pl
from python_multipart.multipart import MultipartParser, parse_options_header

from pipelines.errors import ItfitsError


class UploadRefused(ItfitsError):
    """The request as a whole cannot be taken; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    exts: frozenset[str]  # allowed extensions, lower case with the dot
    max_files: int = 100  # per upload
    max_file_mb: float = 20.0  # per file

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)

    @property
    def max_request_bytes(self) -> int:  # every file at its limit, plus room for the multipart headers
        return self.max_files * (self.max_file_bytes + 4096) + 65536

    def describe(self) -> str:
        return f"{self.max_files} files of at most {self.max_file_mb:g} MB each ({', '.join(sorted(self.exts))})"


@dataclass(frozen=True)
class Upload:
    name: str  # the client's file name without its folders: shown on the page and in the CSV
    path: Path | None  # where it was saved; None when it was refused
    problem: str | None = None  # why it was refused


def display_name(filename: str) -> str:
    """The last part of a client's file name (browsers may send a Windows path)."""
    return PurePosixPath(filename.replace("\\", "/")).name or "unnamed"


def safe_name(index: int, name: str) -> str:
    """`0007_name.png`: only [A-Za-z0-9._-], at most 100 characters, never a dot file, unique by its index."""
    return f"{index:04d}_" + re.sub(r"[^A-Za-z0-9._-]", "_", name)[-100:].lstrip(".")


class _Receiver:
    """python-multipart callbacks writing each file part into `folder` under the limits."""

    def __init__(self, folder: Path, limits: UploadLimits):
        self.folder, self.limits = folder, limits
        self.uploads: list[Upload] = []
        self.n_files = 0
        self._header, self._headers = [b"", b""], {}
        self._name = self._path = self._fh = None
        self._size = 0
        self._problem = None

    # ---- headers of a part ----
    def on_part_begin(self):
        self._headers, self._header = {}, [b"", b""]
        self._name = self._path = self._fh = self._problem = None
        self._size = 0

    def on_header_field(self, data, start, end):
        self._header[0] += data[start:end]

    def on_header_value(self, data, start, end):
        self._header[1] += data[start:end]

    def on_header_end(self):
        self._headers[self._header[0].strip().lower()] = self._header[1].strip()
        self._header = [b"", b""]

    def on_headers_finished(self):
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        filename = params.get(b"filename")
        if not filename:  # a plain field, or the empty part a form sends when no file was chosen
            return
        self.n_files += 1
        self._name = display_name(filename.decode("utf-8", "replace"))
        ext = PurePosixPath(self._name).suffix.lower()
        if self.n_files > self.limits.max_files:
            self._problem = f"at most {self.limits.max_files} files per upload; send the rest separately"
        elif ext not in self.limits.exts:
            self._problem = (f"{ext or 'no extension'} is not a type this model reads "
                             f"({', '.join(sorted(self.limits.exts))})")
        else:
            self._path = self.folder / safe_name(self.n_files, self._name)
            if self._path.parent != self.folder:  # cannot happen with safe_name; never write elsewhere
                raise RuntimeError(f"refusing to write {self._path} outside {self.folder}")
            self._fh = open(self._path, "xb")

    # ---- data of a part ----
    def on_part_data(self, data, start, end):
        if self._fh is None:
            return
        self._size += end - start
        if self._size > self.limits.max_file_bytes:
            self._drop(f"larger than the limit of {self.limits.max_file_mb:g} MB per file")
            return
        self._fh.write(data[start:end])

    def on_part_end(self):
        if self._name is None:
            return
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.uploads.append(Upload(self._name, self._path, self._problem))

    def _drop(self, problem: str):
        self._fh.close()
        self._fh = None
        self._path.unlink(missing_ok=True)
        self._path, self._problem = None, problem

    def close(self):
        if self._fh is not None:  # a body that ended inside a part: keep nothing half-written
            self._drop("the upload ended before this file was complete")
            self.uploads.append(Upload(self._name, None, self._problem))

    def callbacks(self) -> dict:
        return {name: getattr(self, name) for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
            "on_part_data", "on_part_end")}


async def receive_files(request, folder: Path, limits: UploadLimits) -> list[Upload]:
    """Stream the request's multipart body into `folder`; one Upload per file part, in order.
    UploadRefused (with the message to show) when the request is not a file upload or is too large as a whole."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadRefused("send files as multipart/form-data, as the page's form does")
    too_large = (f"the upload is larger than {limits.max_request_bytes / 2**20:.0f} MB in all; "
                 f"the page takes up to {limits.describe()}")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limits.max_request_bytes:
        raise UploadRefused(too_large, 413)
    receiver = _Receiver(Path(folder), limits)
    total = 0
    try:
        parser = MultipartParser(params[b"boundary"], receiver.callbacks())  # refuses a boundary over 256 bytes
        async for chunk in request.stream():
            total += len(chunk)
            if total > limits.max_request_bytes:
                raise UploadRefused(too_large, 413)
            parser.write(chunk)
        parser.finalize()
    except ValueError as e:  # python-multipart's MultipartParseError and friends
        raise UploadRefused(f"the upload could not be read as multipart/form-data: {e}") from e
    finally:
        receiver.close()
    return receiver.uploads


async def read_body(request, max_bytes: int) -> bytes:
    """The request's whole body, refused (413) as soon as it passes `max_bytes`."""
    too_large = f"the body is larger than {max_bytes / 2**20:g} MB (--max-file-mb)"
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise UploadRefused(too_large, 413)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise UploadRefused(too_large, 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _cell(value) -> str | None:
    """A JSON value as a CSV cell holds it: the table model parses it as it parses a CSV's text."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)  # numbers as JSON writes them, true / false


def rows_table(body: bytes) -> pl.DataFrame:
    """A JSON array of rows (objects of column name: value) -> a table of text columns, as a CSV of them reads; a
    key missing from a row is a missing value."""
    how = 'send a JSON array of rows, e.g. [{"island": "Biscoe", "bill_length_mm": 39.1}]'
    try:
        rows = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UploadRefused(f"the body is not JSON ({e}); {how}") from e
    if not isinstance(rows, list) or not rows:
        raise UploadRefused(f"the body is not a non-empty JSON array; {how}")
    columns: dict[str, list] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UploadRefused(f"row {i} is not a JSON object of column: value; {how}")
        for key, value in row.items():
            if isinstance(value, (dict, list)):
                raise UploadRefused(f"row {i}, column '{key[:100]}': a table cell holds a number, text, true/false "
                                    "or null, not a JSON object or array")
            columns.setdefault(key, [None] * len(rows))[i] = _cell(value)
    return pl.DataFrame({k: pl.Series(k, v, dtype=pl.String) for k, v in columns.items()})
