"""DATA layouts -> items table, the seeded stratified split, file checks, odd image modes, class requirements."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from helpers import BROKEN, CLASSES, FASHION, write_broken_files
from pipelines.errors import ItfitsError
from pipelines.images import load_image
from pipelines.sources import check_files, check_image, read_source, require_classes, stratified_split

N_PER_CLASS = 60  # data/fashion: 60 PNGs in each of 4 classes


def _tiny_class_folder(root: Path, counts: dict[str, int]) -> Path:
    for label, n in counts.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("L", (8, 8), 40 * i % 256).save(root / label / f"{label}_{i}.png")
    return root


# ---- layouts ----------------------------------------------------------------------------------------------

def test_class_folders():
    items = read_source(FASHION)
    assert items.columns == ["path", "label", "split", "error"]
    assert items.height == 4 * N_PER_CLASS and sorted(items["label"].unique()) == CLASSES
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in items["path"])
    assert all(Path(p).parent.name == label for p, label in items.select("path", "label").iter_rows())
    assert items["error"].null_count() == items.height


def test_train_valid_folders_keep_their_split(tmp_path):
    for split, n in (("train", 5), ("valid", 2)):
        _tiny_class_folder(tmp_path / split, {"cat": n, "dog": n})
    items = read_source(tmp_path, valid_pct=0.5)
    counts = {(r["split"], r["label"]): r["len"] for r in items.group_by("split", "label").len().iter_rows(named=True)}
    assert counts == {("train", "cat"): 5, ("train", "dog"): 5, ("valid", "cat"): 2, ("valid", "dog"): 2}
    assert all(f"/{s}/" in p for p, s in items.select("path", "split").iter_rows())


def test_a_broken_link_is_a_skipped_file_and_an_error_row(tmp_path):
    from pipelines.sources import expand_inputs
    _tiny_class_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    (tmp_path / "data" / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    items = check_files(read_source(tmp_path / "data"))
    bad = items.filter(pl.col("error").is_not_null())
    assert bad["path"].to_list() == [str(tmp_path / "data" / "dog" / "gone.png")]
    assert bad["error"][0] == f"broken link to {tmp_path / 'nowhere.png'}"
    found = dict(expand_inputs([str(tmp_path / "data" / "dog")]))
    assert len(found) == 3 and found[str(tmp_path / "data" / "dog" / "gone.png")] is None  # its error when read


def test_an_empty_class_folder_is_pointed_out(tmp_path):
    from pipelines.errors import ItfitsWarning
    _tiny_class_folder(tmp_path, {"cat": 2, "dog": 2})
    (tmp_path / "bird").mkdir()
    (tmp_path / "bird" / "notes.txt").write_text("no images here")
    with pytest.warns(ItfitsWarning, match="in bird, so it is not a class"):
        items = read_source(tmp_path)
    assert sorted(items["label"].unique()) == ["cat", "dog"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_paths_are_relative_to_the_table(tmp_path, fmt):
    images = _tiny_class_folder(tmp_path / "images", {"a": 3, "b": 4})
    rows = [(str(p.relative_to(tmp_path)), p.parent.name) for p in sorted(images.rglob("*.png"))]
    table = pl.DataFrame(rows, schema=["path", "label"], orient="row")
    (tmp_path / "meta").mkdir()
    path = tmp_path / f"labels.{fmt}"
    table.write_csv(path) if fmt == "csv" else table.write_parquet(path)
    items = read_source(path)
    assert items.height == 7
    assert items["path"].to_list() == [str((tmp_path / p).resolve()) for p, _ in rows]
    assert items["label"].to_list() == [label for _, label in rows]
    assert set(items["split"]) == {"train", "valid"}


@pytest.mark.parametrize("column,values", [("split", ["train", "valid"]), ("is_valid", [False, True])])
def test_table_split_column_is_kept(tmp_path, column, values):
    images = _tiny_class_folder(tmp_path / "images", {"a": 4, "b": 4})
    paths = sorted(images.rglob("*.png"))
    flags = [values[i % 2] for i in range(len(paths))]
    pl.DataFrame({"path": [str(p.relative_to(tmp_path)) for p in paths], "label": [p.parent.name for p in paths],
                  column: flags}).write_csv(tmp_path / "t.csv")
    items = read_source(tmp_path / "t.csv", seed=3)
    assert items["split"].to_list() == ["valid" if f in ("valid", True) else "train" for f in flags]


def test_table_without_label_column_is_a_clear_error(tmp_path):
    path = tmp_path / "t.csv"
    pl.DataFrame({"path": ["x.png"], "klass": ["a"]}).write_csv(path)
    with pytest.raises(ItfitsError, match="path,label"):
        read_source(path)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(ItfitsError, match="does not exist"):
        read_source(tmp_path / "nope")
    with pytest.raises(ItfitsError, match="no files"):
        read_source(tmp_path)


# ---- the split -----------------------------------------------------------------------------------------------

def test_split_is_seeded_stratified_80_20():
    a, b, c = (read_source(FASHION, seed=s) for s in (7, 7, 8))
    assert a["split"].to_list() == b["split"].to_list(), "same seed, same split"
    assert a["split"].to_list() != c["split"].to_list(), "another seed, another split"
    per_class = a.group_by("label").agg(valid=(pl.col("split") == "valid").sum(), n=pl.len())
    for label, valid, n in per_class.iter_rows():
        assert valid == round(0.2 * n), f"{label}: {valid} of {n} in valid"
    assert set(a.filter(pl.col("split") == "train")["label"]) == set(CLASSES)
    assert set(a.filter(pl.col("split") == "valid")["label"]) == set(CLASSES)


def test_split_puts_every_class_in_both_splits_even_when_small():
    labels = ["a"] * 2 + ["b"] * 3 + ["c"] * 50
    split = np.array(stratified_split(labels, valid_pct=0.2, seed=0))
    for label in "abc":
        got = set(split[np.array(labels) == label])
        assert got == {"train", "valid"}, f"class {label}: {got}"


def test_split_leaves_every_class_a_training_file_even_with_a_large_valid_pct():
    labels = ["a"] * 2 + ["b"] * 3
    split = np.array(stratified_split(labels, valid_pct=0.9, seed=0))
    for label in "ab":
        assert "train" in set(split[np.array(labels) == label]), f"class {label} has no training file"


# ---- broken files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_file_has_a_reason(tmp_path, name):
    path = write_broken_files(tmp_path)[name]
    reason = check_image(str(path))
    assert reason is not None and BROKEN[name] in reason.lower(), f"{name}: {reason!r}"


def test_check_files_marks_only_the_broken(tmp_path):
    data = _tiny_class_folder(tmp_path / "data", {"a": 4, "b": 4})
    for (name, path), label in zip(sorted(write_broken_files(tmp_path / "x").items()), "abababab"):
        shutil.move(path, data / label / name)
    items = check_files(read_source(data))
    bad = items.filter(pl.col("error").is_not_null())
    assert sorted(Path(p).name for p in bad["path"]) == sorted(BROKEN)
    assert items.filter(pl.col("error").is_null()).height == 8
    assert require_classes(items) == ["a", "b"]


def test_missing_path_in_a_table_is_skipped(tmp_path):
    _tiny_class_folder(tmp_path / "images", {"a": 3, "b": 3})
    rows = [(f"images/{p.parent.name}/{p.name}", p.parent.name) for p in sorted((tmp_path / "images").rglob("*.png"))]
    rows.append(("images/a/gone.png", "a"))
    pl.DataFrame(rows, schema=["path", "label"], orient="row").write_csv(tmp_path / "t.csv")
    items = check_files(read_source(tmp_path / "t.csv"))
    bad = items.filter(pl.col("error").is_not_null())
    assert bad["path"].to_list() == [str(tmp_path / "images" / "a" / "gone.png")]
    assert "not found" in bad["error"][0]


def test_file_names_that_are_not_utf8_are_used_and_written_readably(tmp_path):
    """A name's bytes that are not UTF-8 (Python holds them as lone surrogates, which polars refuses) appear as
    \\xNN in the table, and the file is still read from that path; a broken one gets its reason."""
    data = _tiny_class_folder(tmp_path / "data", {"a": 2, "b": 2})
    root = os.fsencode(data)
    os.mkdir(os.path.join(root, b"caf\xe9"))  # a class folder too
    for name in (b"caf\xe9/x\xff.png", b"caf\xe9/y.png", b"a/caf\xe9.png"):
        Image.new("L", (8, 8), 99).save(os.path.join(root, name))
    with open(os.path.join(root, b"b/bad\xe9.png"), "wb") as f:
        f.write(b"not an image")
    items = check_files(read_source(data))
    rows = {Path(p).relative_to(data).as_posix(): (label, error)
            for p, label, error in items.select("path", "label", "error").iter_rows()}
    assert rows["caf\\xe9/x\\xff.png"] == ("caf\\xe9", None) and rows["a/caf\\xe9.png"] == ("a", None)
    assert rows["b/bad\\xe9.png"][1] == "not an image"
    assert require_classes(items) == ["a", "b", "caf\\xe9"]
    assert load_image(str(data / "caf\\xe9" / "x\\xff.png")).size == (8, 8)  # what training and evaluation read


def test_decompression_bomb_by_pixel_limit(tmp_path, monkeypatch):
    """A real, valid image larger than PIL's limit is a bomb (the limit lowered to keep the file small)."""
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 300), (10, 20, 30)).save(path)
    assert check_image(str(path)) is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 4)  # 2x over the limit: PIL raises
    assert "bomb" in check_image(str(path))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 * 3 // 4)  # over, but under 2x: PIL only warns
    assert "bomb" in check_image(str(path))


# ---- odd image modes load to 8-bit RGB -------------------------------------------------------------------

def _rgb(path) -> np.ndarray:
    img = load_image(str(path))
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8
    return arr


def test_grayscale(odd_images):
    arr = _rgb(odd_images["gray"])
    assert arr.shape == (30, 40, 3) and (arr == 128).all()


def test_palette_with_transparency_is_white_where_transparent(odd_images):
    arr = _rgb(odd_images["palette"])
    assert (arr[:, :20] == 255).all(), "transparent palette entries must become white"
    assert (arr[:, 20:] == (255, 0, 0)).all()


def test_rgba_transparent_area_is_white_not_black(odd_images):
    arr = _rgb(odd_images["rgba"])
    assert (arr[:, :20] == (255, 0, 0)).all()
    assert (arr[:, 20:] == 255).all(), f"transparent area became {arr[0, 30]}, expected white"


def test_gray_with_alpha_is_white_where_transparent(tmp_path):
    la = np.zeros((10, 20, 2), np.uint8)
    la[:, :10] = (50, 255)  # left: opaque dark gray; right: transparent black
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    arr = _rgb(tmp_path / "la.png")
    assert (arr[:, :10] == 50).all() and (arr[:, 10:] == 255).all()


def test_16_bit_grayscale_is_scaled_not_clipped(odd_images, tmp_path):
    arr = _rgb(odd_images["gray16"])[..., 0].astype(int)
    assert arr.min() == 0 and arr.max() == 255, "the full 16-bit range maps onto 0..255"
    dark = tmp_path / "dark16.png"
    Image.fromarray(np.full((30, 40), 200, np.uint16)).save(dark)  # 200 of 65535: nearly black
    assert _rgb(dark).max() == 1, "a dark 16-bit image is scaled by its depth, not shown as 8-bit values"
    wide = tmp_path / "int32.tif"
    Image.fromarray(np.linspace(0, 2 ** 31 - 1, 30 * 40).reshape(30, 40).astype(np.int32)).save(wide)
    arr = _rgb(wide)[..., 0].astype(int)
    assert arr.min() == 0 and arr.max() == 255 and 100 < arr.mean() < 155, "32-bit integers span 0..255 too"
    assert len(np.unique(arr)) > 200, "a ramp stays a ramp, not a few clipped values"
    assert (np.diff(arr.ravel()) >= 0).all()


def test_exif_rotation_is_applied(odd_images):
    with Image.open(odd_images["exif"]) as raw:
        assert raw.size == (40, 30)
    arr = _rgb(odd_images["exif"])
    assert arr.shape[:2] == (40, 30), "orientation 6: width and height swap"
    assert abs(int(arr[20, 15, 1]) - 200) < 8


# ---- classes that cannot be trained -----------------------------------------------------------------------

def test_one_class_is_an_error():
    items = read_source(FASHION).filter(pl.col("label") == "bag")
    with pytest.raises(ItfitsError, match="at least 2 classes"):
        require_classes(items)


def test_class_with_one_usable_file_is_an_error(tmp_path):
    data = _tiny_class_folder(tmp_path, {"a": 5, "b": 1})
    (data / "b" / "broken.png").write_bytes(b"")  # two files, one usable
    with pytest.raises(ItfitsError, match=r"at least 2 usable files.*\bb \(1\)"):
        require_classes(check_files(read_source(data)))


def test_a_broken_file_takes_no_place_in_the_validation_split(tmp_path):
    """A class of 3 files gets 1 validation file; when that one cannot be read, the 2 usable ones are split
    instead, so the class is still in both splits (README: every class with 2 or more files is in both)."""
    from pipelines.image_modality import IMAGES
    from pipelines.prepare import prepare_data
    from pipelines.run import FitConfig
    data = _tiny_class_folder(tmp_path / "data", {"a": 3, "b": 3})
    in_valid = read_source(data).filter((pl.col("label") == "a") & (pl.col("split") == "valid"))["path"][0]
    Path(in_valid).write_bytes(b"not an image")
    files = prepare_data(IMAGES, FitConfig(data=str(data), out=str(tmp_path / "run"), size=32, num_workers=0),
                         tmp_path / "run", log=lambda *a: None).files
    assert files.filter(pl.col("path") == in_valid)["error"][0] == "not an image"
    usable = files.filter(pl.col("error").is_null())
    assert usable.group_by("label", "split").len().height == 4, usable  # a and b, each in train and valid


@pytest.mark.parametrize("counts", [{"a": 5}, {"a": 5, "b": 1}])
def test_fit_fails_before_any_training(tmp_path, monkeypatch, counts):
    import pipelines.learners
    from pipelines.run import FitConfig, fit

    def no_learner(*a, **k):
        raise AssertionError("a Learner was built although the data cannot be trained")
    monkeypatch.setattr(pipelines.learners, "image_learner", no_learner)
    data = _tiny_class_folder(tmp_path / "data", counts)
    with pytest.raises(ItfitsError):
        fit(FitConfig(data=str(data), out=str(tmp_path / "run"), lr=1e-3, size=32, num_workers=0), log=lambda *a: None)
    assert not (tmp_path / "run" / "model").exists()
