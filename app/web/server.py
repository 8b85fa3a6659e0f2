"""`itfits serve`: a page to drop files on and see each prediction (confidence, top-k, a clear unknown mark),
download the results as CSV, and open the run's report; `POST /predict` answers a JSON request (Accept:
application/json, or a JSON body of table rows) with the predictions table as JSON records.

Starlette (the server FastHTML is built on) with fastcore's FT components (FastHTML's HTML layer, which
escapes every string). FastHTML's own route handlers read the whole multipart body into the system temp
folder, with no limit per file, before the handler runs; the upload route needs the raw stream instead
(uploads.py). The page loads nothing from other sites (no CDN scripts): it works offline.

Who may ask (checks.py): the Host header must name this server (DNS rebinding), and a POST that says where it
comes from (Origin) must come from the page itself (cross-site forms and fetches).
"""
from __future__ import annotations

import base64
import errno
import json
import logging
import math
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import polars as pl
from fastcore.xml import (H1, A, Body, Button, Form, Head, Html, Img, Input, Label, Li, Main, Meta, NotStr, P,
                          Script, Span, Style, Table, Td, Th, Title, Tr, Ul, to_xml)
from python_multipart.multipart import parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from pipelines.bundle import Bundle, load_bundle
from pipelines.errors import ItfitsError
from pipelines.io import csv_unwritable, write_csv
from pipelines.predict import PredictConfig, predict, predict_rows
from pipelines.modality import Modality

from .checks import LOCAL_HOSTS, RequestChecks, json_error, wants_json
from .uploads import Upload, UploadLimits, UploadRefused, read_body, receive_files, rows_table
LOG = logging.getLogger("itfits.serve")


def _table_rows(bundle: Bundle, paths: list[str], config: PredictConfig) -> Iterator[dict]:
    """Predictions table rows for uploaded CSV/Parquet tables, one per table row; a table that cannot be
    predicted (a missing column, say) is one row with its error."""
    for path in paths:
        try:
            table = pl.concat(predict(bundle, [path], config))
            nested = csv_unwritable(table)
            if nested:  # the results download is a CSV
                raise ItfitsError(f"the table has columns a CSV cannot hold: {', '.join(nested)}; drop them and "
                                  "upload it again")
        except ItfitsError as e:
            yield {"path": path, "label": None, "confidence": None, "unknown": None, "error": str(e), "score": None}
            continue
        yield from ({"path": path, **row} for row in table.iter_rows(named=True))


@dataclass(frozen=True)
class Site:
    """Everything the pages need, built once at start."""
    bundle: Bundle
    modality: Modality
    limits: UploadLimits
    config: PredictConfig
    report: Path | None  # the run's report.html, when there is one
    lock: threading.Lock  # one prediction at a time: the cores are shared by the whole batch


def find_report(target: Path, bundle: Bundle) -> Path | None:
    """RUN/report.html when TARGET is the run folder or its model bundle."""
    for path in (Path(target) / "report.html", bundle.path.parent / "report.html"):
        if path.is_file():
            return path
    return None


def create_app(target: Path | str, *, host: str = "127.0.0.1", max_files: int = 100, max_file_mb: float = 20.0,
               topk: int = 3, workers: int = 0) -> Starlette:
    """The web app for the bundle in TARGET (a run folder or RUN/model); the bundle is loaded here, once. `host`:
    the address served (--host), which requests may name in their Host header beside localhost's names."""
    if max_files < 1 or max_file_mb <= 0 or topk < 1:
        raise ItfitsError("--max-files and --topk must be at least 1 and --max-file-mb positive")
    bundle = load_bundle(target)
    modality = bundle.modality
    site = Site(bundle=bundle, modality=modality, limits=UploadLimits(modality.exts, max_files, max_file_mb),
                config=PredictConfig(batch_size=32, num_workers=workers, topk=topk),  # default 0: none per request
                report=find_report(Path(target), bundle), lock=threading.Lock())

    async def home(request: Request) -> Response:
        return _about(site) if wants_json(request) else _page(site)

    async def upload(request: Request) -> Response:
        as_json = wants_json(request)
        if request.method == "GET":  # a reload of the results page
            return (json_error(f"POST to /predict: {_how_to_post(site)}", 405) if as_json else
                    RedirectResponse("/", status_code=303))
        content_type, _ = parse_options_header(request.headers.get("content-type", ""))
        try:
            if content_type == b"application/json":
                return _json_rows(await _predict_json(request, site))
            with tempfile.TemporaryDirectory(prefix="itfits-upload-") as folder:  # deleted after the prediction
                uploads = await receive_files(request, Path(folder), site.limits)
                if not uploads:
                    raise UploadRefused(f"no files came with the upload: choose or drop {modality.what} first")
                rows, previews = await run_in_threadpool(_predict_uploads, site, uploads, previews=not as_json)
        except UploadRefused as e:
            return json_error(str(e), e.status) if as_json else _page(
                site, problems=[str(e)], status_code=e.status)
        except ClientDisconnect:  # the browser went away mid-upload: nothing to answer, nothing kept
            LOG.warning("a client disconnected during an upload; its files were discarded")
            return Response(status_code=400)
        return _json_rows(rows) if as_json else _page(site, uploads=uploads, rows=rows, previews=previews)

    async def report(request: Request) -> Response:
        if wants_json(request):
            return json_error("the run report is an HTML page: open /report in a browser", 406)
        if site.report is None:
            return HTMLResponse("This model has no run report beside it (RUN/report.html, written by itfits fit).", 404)
        return FileResponse(site.report, media_type="text/html")

    return Starlette(routes=[Route("/", home), Route("/predict", upload, methods=["GET", "POST"]),
                             Route("/report", report)],
                     middleware=[Middleware(RequestChecks, host=host)])


REQUEST_S = 120.0  # one upload's prediction at most, holding the one prediction lock; its other files: error rows
LOCK_WAIT_S = 30.0  # how long an upload waits for another's prediction before it is answered "busy"
SHUTDOWN_S = 3  # after SIGTERM or Ctrl-C, seconds given to requests in flight before the server stops
STOPPING = threading.Event()  # set when the server stops: a prediction in flight ends after its current batch


def _how_to_post(site: Site) -> str:
    return ("multipart/form-data files in the field 'files' (curl -F files=@rows.csv), or a JSON array of rows "
            "(objects of column: value)" if not site.modality.row_per_file else
            f"multipart/form-data files in the field 'files' (curl -F files=@example"
            f"{'.png' if '.png' in site.limits.exts else min(site.limits.exts)})")


def _about(site: Site) -> Response:
    """GET / for a JSON client: the model and how to ask it."""
    b, calib = site.bundle, site.bundle.calibration
    return _json_response({
        "model": b.meta.get("backbone") or b.meta.get("model", {}).get("kind"), "modality": site.modality.name,
        "classes": list(b.classes), "unknown_score": calib and calib.score, "threshold": calib and calib.threshold,
        "max_files": site.limits.max_files, "max_file_mb": site.limits.max_file_mb, "exts": sorted(site.limits.exts),
        "predict": f"POST /predict with {_how_to_post(site)}; the answer is the predictions table as JSON records"})


async def _predict_json(request: Request, site: Site) -> list[dict]:
    """Rows of the predictions table for a JSON body of table rows (a table model's)."""
    if site.modality.row_per_file:
        raise UploadRefused(f"this model reads {site.modality.what}: send them as {_how_to_post(site)}", 415)
    table = rows_table(await read_body(request, site.limits.max_file_bytes))

    def run() -> list[dict]:
        if not site.lock.acquire(timeout=LOCK_WAIT_S):  # as an upload waits: a while, not forever
            raise UploadRefused(f"the server was busy with another prediction for {LOCK_WAIT_S:g} s; try again", 503)
        try:
            return predict_rows(site.bundle, table, site.config).to_dicts()
        finally:
            site.lock.release()
    try:
        return await run_in_threadpool(run)
    except UploadRefused:  # busy
        raise
    except ItfitsError as e:  # a column the model needs is missing, or no value of one reads as its type
        raise UploadRefused(str(e), 400) from e


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _json_rows(rows: list[dict]) -> Response:
    """The predictions table as JSON records: NaN and infinities as null, dates and other values as text."""
    return _json_response([{k: _finite(v) for k, v in row.items()} for row in rows])


def _json_response(content, status_code: int = 200) -> Response:
    return Response(json.dumps(content, default=str, allow_nan=False), status_code=status_code,
                    media_type="application/json")


def _predict_uploads(site: Site, uploads: list[Upload], *, previews: bool = True
                     ) -> tuple[list[dict], list[str | None]]:
    """Rows of the predictions table for the saved uploads, with the client's file names in place of the temp
    paths, then a row with `error` set for each refused upload; and a preview per row (or None)."""
    saved = [u for u in uploads if u.path is not None]
    names = {str(u.path): u.name for u in saved}
    if not site.lock.acquire(timeout=LOCK_WAIT_S):  # a client waits a while for another's upload, not forever
        busy = (f"not predicted: the server was busy with another upload for {LOCK_WAIT_S:g} s; try again")
        return [{"path": u.name, "label": None, "confidence": None, "unknown": None, "error": u.problem or busy,
                 "score": None} for u in uploads], [None] * len(uploads)
    try:
        # files: one prediction of every upload; tables: one each, so that a bad table is a row of its own
        rows_of = predict if site.modality.row_per_file else _table_rows
        rows, done, deadline = [], set(), time.monotonic() + REQUEST_S
        produced = rows_of(site.bundle, list(names), site.config) if saved else iter(())
        for row in produced:  # rows come batch by batch (a table's all at once): past the time limit, or when the
            # server stops, the files not begun are not predicted
            if done and row.get("path") not in done and (time.monotonic() > deadline or STOPPING.is_set()):
                break
            done.add(row.get("path"))
            rows.append(row)
        getattr(produced, "close", lambda: None)()
    finally:
        site.lock.release()
    late = (f"not predicted: the upload passed the server's time limit of {REQUEST_S:g} s, or the server is "
            "stopping; upload fewer or smaller files, or use itfits predict")
    rows += [{"path": p, "label": None, "confidence": None, "unknown": None, "error": late, "score": None}
             for p in names if p not in done]
    pictures = []
    for row in rows:
        temp = row.get("path")
        ok = previews and temp in names and not row.get("error")
        pictures.append(site.modality.preview(Path(temp)) if ok else None)
        row["path"] = names.get(temp, temp)
    refused = [{"path": u.name, "label": None, "confidence": None, "unknown": None, "error": u.problem, "score": None}
               for u in uploads if u.path is None]
    return rows + refused, pictures + [None] * len(refused)


# ---- the page --------------------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:70em;padding:0 1em;color:#222}
.muted{color:#666}.drop{display:block;border:2px dashed #889;border-radius:8px;padding:2em;text-align:center;
background:#f7f7fb;margin:.8em 0}.drop.over{background:#e6ecff;border-color:#36c}
button{font-size:1em;padding:.4em 1.2em}table{border-collapse:collapse;margin:.8em 0}
td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:middle}
td.num{text-align:right;font-variant-numeric:tabular-nums}.problems li{color:#a00}
.badge{display:inline-block;padding:.1em .5em;border-radius:4px;font-weight:600}
.known .badge{background:#dff3e3;color:#135}.unknown .badge{background:#ffd8a8;color:#7a3b00}
tr.unknown{background:#fff6ea}tr.error{background:#fdecec}td img{width:64px;image-rendering:pixelated}"""

# Dropping files on the zone submits them; a drop that misses the zone must not make the browser open the file.
_DROP_JS = """const zone = document.getElementById('drop'), input = document.getElementById('files');
const mark = on => ev => {ev.preventDefault(); zone.classList.toggle('over', on);};
for (const e of ['dragenter', 'dragover']) zone.addEventListener(e, mark(true));
for (const e of ['dragleave', 'drop']) zone.addEventListener(e, mark(false));
zone.addEventListener('drop', ev => {input.files = ev.dataTransfer.files; document.getElementById('upload').submit();});
for (const e of ['dragover', 'drop']) window.addEventListener(e, ev => ev.preventDefault());"""


def _page(site: Site, *, uploads: list[Upload] | None = None, rows: list[dict] | None = None,
          previews: list[str | None] | None = None, problems: list[str] = (), status_code: int = 200) -> HTMLResponse:
    b, calib = site.bundle, site.bundle.calibration
    what = site.modality.what
    header = [H1("itfits"),
              P(f"{b.meta.get('backbone', '')} model, {len(b.classes)} classes: {', '.join(b.classes)}.",
                *([" ", A("Open the run report", href="/report", target="_blank", id="report-link")]
                  if site.report else [])),
              P(f"A file is marked unknown when its {calib.score} score is below {calib.threshold:.4g} "
                "(a threshold chosen on validation data at training time).", cls="muted")]
    form = Form(Label(f"Drop {what} here, or choose them: ",
                      Input(type="file", name="files", id="files", multiple=True,
                            accept=",".join(sorted(site.limits.exts))), id="drop", cls="drop"),
                Button("Predict", type="submit", id="predict"),
                P(f"Up to {site.limits.describe()}.", cls="muted", id="limits"),
                method="post", action="/predict", enctype="multipart/form-data", id="upload")
    problems = list(problems) + [f"{u.name} was not taken: {u.problem}" for u in uploads or [] if u.problem]
    body = [*header, form, Script(NotStr(_DROP_JS))]  # our own constant: not escaped, or `=>` breaks
    if problems:
        body.append(Ul(*[Li(p) for p in problems], id="problems", cls="problems"))
    if rows:
        body += _results(rows, previews or [None] * len(rows), site.config.topk)
    page = Html(Head(Meta(charset="utf-8"), Title(f"itfits: {b.meta.get('backbone', 'model')}"), Style(NotStr(_CSS))),
                Body(Main(*body)))
    return HTMLResponse(to_xml(page), status_code=status_code)  # to_xml writes the doctype of an Html


def _results(rows: list[dict], previews: list[str | None], topk: int) -> list:
    n_unknown = sum(bool(r.get("unknown")) for r in rows)
    n_error = sum(bool(r.get("error")) for r in rows)
    csv = write_csv(pl.DataFrame(rows, infer_schema_length=None))
    href = "data:text/csv;charset=utf-8;base64," + base64.b64encode(csv.encode("utf-8")).decode("ascii")
    head = Tr(*[Th(h) for h in ("", "file", "prediction", "confidence", f"top {topk}", "score")])
    return [P(f"{len(rows)} files: {len(rows) - n_unknown - n_error} predicted, {n_unknown} unknown, "
              f"{n_error} not predicted. ", A("Download the results (CSV)", href=href, download="predictions.csv",
                                               id="download"), id="summary"),
            Table(head, *[_row(r, p, topk) for r, p in zip(rows, previews)], id="results")]


def _row(row: dict, preview: str | None, topk: int):
    top = [(row.get(f"top{j}"), row.get(f"top{j}_prob")) for j in range(1, topk + 1)]
    top_text = " · ".join(f"{c} {p:.0%}" for c, p in top if c is not None)
    if row.get("error"):
        state, label = "error", Span(f"not predicted: {row['error']}")
    elif row.get("unknown"):
        state = "unknown"
        label = Span(Span("unknown", cls="badge"), " ", Span(f"best guess: {row.get('top1')}", cls="muted"))
    else:
        state, label = "known", Span(row.get("label"), cls="badge")
    conf, score = row.get("confidence"), row.get("score")
    return Tr(Td(Img(src=preview, alt="") if preview else ""), Td(str(row.get("path", ""))),
              Td(label, cls="label"), Td("" if conf is None else f"{conf:.1%}", cls="num"), Td(top_text),
              Td("" if score is None else f"{score:.4g}", cls="num"),
              cls=f"result {state}", data_label=str(row.get("label")), data_file=str(row.get("path", "")))


def check_port(host: str, port: int) -> None:
    """An ItfitsError naming the way out when HOST:PORT cannot be listened on."""
    if not 1 <= port <= 65535:  # the socket calls would take 99999 as 34463, or blame the host for -1
        raise ItfitsError(f"--port must be between 1 and 65535, got {port}")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ItfitsError(f"--host {host} is not an address of this machine: {e}") from e
    with socket.socket(family, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:  # the host is no address of this machine, whatever the port
                raise ItfitsError(f"--host {host} is not an address of this machine ({e.strerror})") from e
            raise ItfitsError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from e


def serve(target: Path | str, *, host: str = "127.0.0.1", port: int = 8000, log=print, **app_kwargs) -> None:
    """Serve the page until Ctrl-C. app_kwargs go to create_app (max_files, max_file_mb, topk, workers)."""
    import uvicorn
    check_port(host, port)
    app = create_app(target, host=host, **app_kwargs)
    if host not in LOCAL_HOSTS:
        log(f"warning: listening on {host}: anyone who can reach this machine can upload files to it")
    url_host = f"[{host}]" if ":" in host else host
    log(f"itfits serve: http://{url_host}:{port}/ (Ctrl-C stops)")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=SHUTDOWN_S))
    stop = server.handle_exit

    def handle_exit(sig, frame):  # SIGTERM, Ctrl-C: a prediction in flight ends after its current batch
        STOPPING.set()
        stop(sig, frame)
    server.handle_exit = handle_exit
    try:
        server.run()
    finally:  # the interpreter waits for the prediction thread at exit
        STOPPING.set()
