"""`itfits serve`: the page, uploads under their limits and only into a temp folder, predictions as
`itfits predict` makes them, the CSV download and the run's report; then the same in headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from browser import FLAGS, install_chromium
from helpers import FASHION_TEST, REPO, free_port, run_cli

MAX_FILE_MB = 0.05  # small, so that an over-limit file is quick to make
TEST_FILES = sorted(FASHION_TEST.glob("*/*.png"))[::10][:3]


def big_png(path: Path) -> Path:
    """A PNG of noise over MAX_FILE_MB."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(path)
    assert path.stat().st_size > MAX_FILE_MB * 2**20
    return path


def expected_rows(model: Path, files: list[Path]) -> list[dict]:
    """What `predict` (and so `itfits predict`) says about the files."""
    from pipelines.bundle import load_bundle
    from pipelines.predict import PredictConfig, predict
    return list(predict(load_bundle(model), [str(f) for f in files], PredictConfig(num_workers=0)))


def result_rows(page: str) -> list[tuple[str, str]]:
    """(data-file, data-label) of each result row of the page."""
    return re.findall(r'<tr class="result [^"]*" data-label="([^"]*)" data-file="([^"]*)"', page)


def csv_download(page: str) -> pl.DataFrame:
    href = re.search(r'href="data:text/csv;charset=utf-8;base64,([^"]*)"[^>]*download="predictions.csv"', page)
    assert href, "no CSV download link"
    return pl.read_csv(io.BytesIO(base64.b64decode(href.group(1))))


def problems(page: str) -> str:
    found = re.search(r'<ul id="problems".*?</ul>', page, re.S)
    return found.group(0) if found else ""


def upload(client, files: list[tuple[str, bytes]]):
    return client.post("/predict", files=[("files", (name, data, "application/octet-stream")) for name, data in files])


# ---- in process: the app on the trained run --------------------------------------------------------------

@pytest.fixture(scope="module")
def client(trained_run):
    from starlette.testclient import TestClient
    from app.web import create_app
    app = create_app(trained_run.run, max_files=3, max_file_mb=MAX_FILE_MB)
    with TestClient(app, base_url="http://localhost") as c:  # a Host the server answers (checks.py)
        yield c


def test_page_offers_upload_limits_and_report(client, trained_run):
    page = client.get("/").text
    assert 'enctype="multipart/form-data"' in page and 'type="file"' in page and "multiple" in page
    assert "Up to 3 files of at most 0.05 MB each" in page and ".png" in page
    assert 'href="/report"' in page
    assert "<script src" not in page and "://" not in page, "the page loads nothing from elsewhere: works offline"
    report = client.get("/report")
    assert report.status_code == 200 and report.content == (trained_run.run / "report.html").read_bytes()


def test_upload_predicts_as_predict_does(client, trained_run):
    response = upload(client, [(f.name, f.read_bytes()) for f in TEST_FILES])
    assert response.status_code == 200
    expected = expected_rows(trained_run.model, TEST_FILES)
    assert result_rows(response.text) == [(r["label"], Path(r["path"]).name) for r in expected]
    table = csv_download(response.text)
    assert table.columns[:6] == ["path", "label", "confidence", "unknown", "error", "score"]
    assert table.columns[6:12] == ["top1", "top1_prob", "top2", "top2_prob", "top3", "top3_prob"]
    assert table["path"].to_list() == [f.name for f in TEST_FILES], "the CSV names the files, not temp paths"
    assert table["label"].to_list() == [r["label"] for r in expected]
    np.testing.assert_allclose(table["confidence"], [r["confidence"] for r in expected], rtol=1e-5)
    for r in expected:  # the unknown mark and the top-k are on the page
        assert f"{r['confidence']:.1%}" in response.text and f"{r['top2']} " in response.text


def test_limits_give_clear_messages(client, tmp_path):
    good = TEST_FILES[0].read_bytes()
    big = big_png(tmp_path / "big.png").read_bytes()
    response = upload(client, [("big.png", big), ("notes.txt", b"hello"), ("a.png", good), ("b.png", good)])
    text = problems(response.text)
    assert "big.png was not taken: larger than the limit of 0.05 MB per file" in text
    assert "notes.txt was not taken: .txt is not a type this model reads" in text
    assert "b.png was not taken: at most 3 files per upload" in text  # every file sent counts
    assert [f for _, f in result_rows(response.text)] == ["a.png", "big.png", "notes.txt", "b.png"]
    table = csv_download(response.text)  # one row per file sent, refused ones with the reason in `error`
    assert table.filter(pl.col("error").is_not_null())["path"].to_list() == ["big.png", "notes.txt", "b.png"]

    huge = client.post("/predict", content=b"x" * 10, headers={
        "content-type": "multipart/form-data; boundary=b", "content-length": str(10**9)})
    assert huge.status_code == 413 and "the upload is larger than" in problems(huge.text)
    wrong = client.post("/predict", content=b"hello", headers={"content-type": "text/plain"})
    assert wrong.status_code == 400 and "multipart/form-data" in problems(wrong.text)
    empty = client.post("/predict", files=[("files", ("", b"", "application/octet-stream"))])
    assert "no files came with the upload" in problems(empty.text)
    assert client.get("/predict", follow_redirects=False).status_code == 303


def test_uploads_stay_in_a_temp_folder_that_is_deleted(client, tmp_path, monkeypatch):
    import app.web.server as server
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    seen = []
    real = server._predict_uploads

    def spy(site, uploads, **options):
        seen.extend(uploads)
        for u in uploads:  # while predicting: every saved file sits directly in the request's temp folder
            assert u.path.parent.parent == temp_root and u.path.parent.name.startswith("itfits-upload-")
            assert u.path.is_file() and not u.path.name.startswith(".")
        return real(site, uploads, **options)

    monkeypatch.setattr(server, "_predict_uploads", spy)
    good = TEST_FILES[0].read_bytes()
    names = ["../../escape.png", "/etc/cron.d/evil.png", "..\\..\\win.png"]
    response = upload(client, [(n, good) for n in names])
    assert response.status_code == 200 and len(seen) == 3
    assert [f for _, f in result_rows(response.text)] == ["escape.png", "evil.png", "win.png"]
    assert list(temp_root.iterdir()) == [], "the request's temp folder must be deleted after the prediction"
    assert not (tmp_path / "escape.png").exists() and not (REPO / "escape.png").exists()


def test_safe_names():
    from app.web.uploads import display_name, safe_name
    assert display_name("../../a.png") == "a.png" and display_name("C:\\Users\\me\\b.JPG") == "b.JPG"
    assert display_name("") == "unnamed"
    assert safe_name(3, "..x y/<z>.png") == "0003_x_y__z_.png"
    assert safe_name(1, "é" * 300 + ".png").endswith(".png") and len(safe_name(1, "a" * 300)) <= 105


def test_other_modalities_are_refused(trained_run, tmp_path):
    from app.web import create_app
    from pipelines.errors import ItfitsError
    bundle = tmp_path / "model"
    shutil.copytree(trained_run.model, bundle)
    meta = json.loads((bundle / "itfits.json").read_text())
    (bundle / "itfits.json").write_text(json.dumps({**meta, "modality": "smell"}))
    with pytest.raises(ItfitsError, match="modality 'smell' is not one of image, audio, tabular"):
        create_app(bundle)


def test_serve_errors_are_one_line(tmp_path):
    proc = run_cli("serve", tmp_path / "nope")
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "not a model bundle" in proc.stderr
    from app.web.server import check_port
    from pipelines.errors import ItfitsError
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ItfitsError, match="choose another --port"):
            check_port("127.0.0.1", s.getsockname()[1])
    for port in (99999, -1):  # the socket calls would listen on 99999 % 65536, or blame the host for -1
        with pytest.raises(ItfitsError, match="--port must be between 1 and 65535"):
            check_port("127.0.0.1", port)
    with pytest.raises(ItfitsError, match="--host 192.0.2.1 is not an address of this machine"):  # TEST-NET-1
        check_port("192.0.2.1", 8000)


# ---- JSON: POST /predict for programs ---------------------------------------------------------------------

JSON = {"accept": "application/json"}


def test_json_request_gets_the_predictions_table_as_records(client, trained_run):
    files = [(f.name, f.read_bytes()) for f in TEST_FILES[:2]] + [("notes.txt", b"hello")]
    answer = client.post("/predict", headers=JSON,
                         files=[("files", (n, d, "application/octet-stream")) for n, d in files])
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    records = answer.json()
    expected = expected_rows(trained_run.model, TEST_FILES[:2])
    assert [r["path"] for r in records] == [f.name for f in TEST_FILES[:2]] + ["notes.txt"]
    for got, want in zip(records, expected):
        assert got["label"] == want["label"] and got["unknown"] == want["unknown"]
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-6)
        assert set(got) == set(want)  # the predictions table's columns
    assert records[2]["label"] is None and "not a type this model reads" in records[2]["error"]
    # a JSON request never gets HTML: errors, the home page and the report answer in JSON too
    for response, status in [(client.post("/predict", headers=JSON, content=b"x"), 400),
                             (client.post("/predict", json=[{"a": 1}]), 415),
                             (client.get("/predict", headers=JSON), 405),
                             (client.get("/report", headers=JSON), 406)]:
        assert response.status_code == status and "error" in response.json(), response.text
    about = client.get("/", headers=JSON).json()
    assert about["classes"] == trained_run.summary["resolved"]["classes"] and "POST /predict" in about["predict"]
    # a browser (text/html first) and curl (*/*) get the page
    assert client.get("/", headers={"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}).text.startswith("<!doctype")


def test_json_rows_for_a_table_model(table_run):
    from starlette.testclient import TestClient
    from app.web import create_app
    from pipelines.bundle import load_bundle
    from pipelines.predict import PredictConfig, predict
    penguins = REPO / "data" / "penguins.csv"
    rows = pl.read_csv(penguins, infer_schema_length=0).head(4)
    want = pl.concat(predict(load_bundle(table_run), [str(penguins)], PredictConfig())).head(4)
    with TestClient(create_app(table_run), base_url="http://localhost") as client:
        # numbers as JSON numbers, a missing value as null
        body = [{k: (None if v == "NA" else float(v) if k.endswith(("_mm", "_g")) else v) for k, v in r.items()}
                for r in rows.iter_rows(named=True)]
        answer = client.post("/predict", json=body)
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert [r["label"] for r in got] == want["label"].to_list()
        assert [r["confidence"] for r in got] == pytest.approx(want["confidence"].to_list(), abs=1e-6)
        assert got[0]["island"] == rows["island"][0]  # the rows' own columns come first, as in the table
        for bad, words in [([{"island": "Biscoe"}], "lacks column"), ({"island": "Biscoe"}, "JSON array"),
                           ([[1, 2]], "row 0 is not a JSON object"), ([{"island": {"x": 1}}], "not a JSON object")]:
            refused = client.post("/predict", json=bad)
            assert refused.status_code == 400 and words in refused.json()["error"], refused.text



def test_json_rows_wait_for_the_lock_a_while_not_forever(table_run, monkeypatch):
    import threading
    from types import SimpleNamespace
    from starlette.testclient import TestClient
    from app.web import create_app, server
    lock = threading.Lock()  # the server's one prediction lock, held here as by another prediction in flight
    monkeypatch.setattr(server, "threading", SimpleNamespace(Lock=lambda: lock))
    monkeypatch.setattr(server, "LOCK_WAIT_S", 0.2)
    rows = pl.read_csv(REPO / "data" / "penguins.csv", infer_schema_length=0).head(1).to_dicts()
    with TestClient(create_app(table_run), base_url="http://localhost") as client:
        with lock:
            busy = client.post("/predict", json=rows)
        assert busy.status_code == 503 and "busy" in busy.json()["error"], busy.text
        assert client.post("/predict", json=rows).status_code == 200


def test_the_page_has_one_doctype(client):
    page = client.get("/").text
    assert page.lower().count("<!doctype") == 1 and page.startswith("<!doctype html>")


# ---- who may ask: Host, Origin, malformed requests ---------------------------------------------------------

def test_a_foreign_host_header_is_refused(client, trained_run):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example."""
    for host in ("evil.example", "evil.example:8000", "testserver", "127.0.0.1.evil.example", "localhost.evil"):
        for path in ("/", "/report"):
            refused = client.get(path, headers={"host": host})
            assert refused.status_code == 421 and "itfits.report" not in refused.text, (host, path)
            assert "not for the host" in refused.text
    assert client.get("/report", headers={"host": "evil.example", **JSON}).json()["error"]
    for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
        assert client.get("/", headers={"host": host}).status_code == 200, host
    from starlette.testclient import TestClient
    from app.web import create_app
    with TestClient(create_app(trained_run.run, host="box.lan")) as named:  # --host box.lan: its name too
        assert named.get("/", headers={"host": "box.lan:8000"}).status_code == 200
        assert named.get("/", headers={"host": "other.lan"}).status_code == 421
    with TestClient(create_app(trained_run.run, host="0.0.0.0")) as anywhere:  # any address, still no foreign name
        assert anywhere.get("/", headers={"host": "192.0.2.7:8000"}).status_code == 200
        assert anywhere.get("/", headers={"host": "evil.example"}).status_code == 421


def test_a_post_from_another_origin_is_refused(client):
    one = [(TEST_FILES[0].name, TEST_FILES[0].read_bytes())]
    files = [("files", (n, d, "image/png")) for n, d in one]
    for origin in ("http://evil.example", "null", "http://localhost:9999", "https://localhost",
                   "http://localhost.evil"):
        refused = client.post("/predict", files=files, headers={"origin": origin})
        assert refused.status_code == 403 and "another site" in refused.text and "result" not in refused.text, origin
    for headers in ({"origin": "http://localhost"}, {}):  # the page's own origin; curl sends none
        taken = client.post("/predict", files=files, headers=headers)
        assert taken.status_code == 200 and len(result_rows(taken.text)) == 1, headers


def test_malformed_multipart_is_a_400_with_a_message(client):
    long = "b" * 1000
    body = (f"--{long}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\nabc\r\n"
            f"--{long}--\r\n").encode()
    answer = client.post("/predict", content=body, headers={"content-type": f"multipart/form-data; boundary={long}"})
    assert answer.status_code == 400 and "could not be read as multipart/form-data" in problems(answer.text)
    as_json = client.post("/predict", content=body, headers={
        "content-type": f"multipart/form-data; boundary={long}", **JSON})
    assert as_json.status_code == 400 and "boundary" in as_json.json()["error"].lower()
    garbled = client.post("/predict", content=b"--zz\r\nno headers here", headers={
        "content-type": "multipart/form-data; boundary=zz", **JSON})
    assert garbled.status_code in (200, 400) and garbled.headers["content-type"] == "application/json"


# ---- in a browser: `itfits serve` in a subprocess, driven by headless Chromium ------------------------------

@pytest.fixture(scope="module")
def server(trained_run):
    """`itfits serve RUN` on a free localhost port; yields its URL once it answers; always stopped."""
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", str(trained_run.run), "--port", str(port),
                             "--max-file-mb", str(MAX_FILE_MB)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"itfits serve did not answer on {url}:\n{log.read().decode()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    """A page in headless Chromium (the system one, installed here when missing and we are root)."""
    chromium, why = install_chromium()
    if chromium is None:
        pytest.skip(why)
    sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs it: pip install -e '.[test]'")
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh --user-data-dir
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, headless=True, args=[f for f in FLAGS if f != "--headless"],
            accept_downloads=True)
        try:
            tab = context.new_page()
            tab.set_default_timeout(120_000)
            yield tab
        finally:
            context.close()


def test_browser_upload_shows_the_predicted_label(page, server, trained_run):
    page.goto(server)
    page.set_input_files("#files", str(TEST_FILES[0]))
    page.click("#predict")
    row = page.locator("tr.result").first
    row.wait_for()
    expected = expected_rows(trained_run.model, TEST_FILES[:1])[0]
    assert row.get_attribute("data-file") == TEST_FILES[0].name
    assert row.get_attribute("data-label") == expected["label"]
    label = row.locator("td.label").inner_text()
    assert expected["label"] in label
    if expected["unknown"]:
        assert f"best guess: {expected['top1']}" in label
    assert f"{expected['confidence']:.1%}" in row.inner_text()


def test_browser_drop_predicts_the_dropped_file(page, server, trained_run):
    page.goto(server)
    data = base64.b64encode(TEST_FILES[1].read_bytes()).decode()
    dropped = page.evaluate_handle("""data => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        return dt;
    }""", data)
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})  # the page submits the dropped files
    row = page.locator("tr.result").first
    row.wait_for()
    assert row.get_attribute("data-file") == "dropped.png"
    assert row.get_attribute("data-label") == expected_rows(trained_run.model, TEST_FILES[1:2])[0]["label"]


def test_browser_downloads_the_results(page, server, trained_run, tmp_path):
    page.goto(server)
    page.set_input_files("#files", [str(f) for f in TEST_FILES])
    page.click("#predict")
    page.locator("#download").wait_for()
    with page.expect_download() as download:
        page.click("#download")
    target = tmp_path / "predictions.csv"
    download.value.save_as(target)
    table = pl.read_csv(target)
    assert download.value.suggested_filename == "predictions.csv"
    assert table["path"].to_list() == [f.name for f in TEST_FILES]
    assert table["label"].to_list() == [r["label"] for r in expected_rows(trained_run.model, TEST_FILES)]


def test_browser_over_limit_upload_says_why(page, server, tmp_path):
    page.goto(server)
    page.set_input_files("#files", str(big_png(tmp_path / "too big.png")))
    page.click("#predict")
    message = page.locator("#problems").inner_text()
    assert "too big.png was not taken: larger than the limit of 0.05 MB per file" in message


def test_browser_opens_the_report(page, server, tmp_path):
    """The report in Chromium, with a screenshot of the whole page: results above the fold, the settings last with
    the ones at their defaults folded (not shown until opened)."""
    page.goto(server)
    with page.context.expect_page() as new_tab:
        page.click("#report-link")
    report = new_tab.value
    report.wait_for_load_state()
    assert report.locator("h1").inner_text() == "itfits run report"
    shot = tmp_path / "report.png"
    report.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.height > im.width, "a full-page screenshot of a long report"
    heading = {name: report.locator("h2", has_text=name).first.bounding_box()["y"]
               for name in ("Summary", "Confusion matrix", "Loss and metrics", "Settings")}
    assert heading["Summary"] < heading["Confusion matrix"] < heading["Loss and metrics"] < heading["Settings"]
    assert heading["Summary"] < report.viewport_size["height"], "the summary is on the first screen"
    folded = report.locator("details th", has_text="arch").first
    assert not folded.is_visible(), "settings at their defaults are folded"
    report.locator("details summary").first.click()
    assert folded.is_visible()
    print(f"report screenshot: {shot}")
    report.close()
