"""The modality registry: a new modality is one module. A toy one, .npy arrays as images, is registered here, in
the test alone, and fits, predicts and evaluates end to end through the same stages as the built-in ones."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

import pipelines.modality as registry
from pipelines.errors import ItfitsError
from pipelines.image_modality import ImageModality
from pipelines.sources import data_exts, read_checked

REPO = Path(__file__).resolve().parents[1]


class NpyModality(ImageModality):
    """Grayscale images saved as numpy arrays (H, W) of uint8."""
    name = "npy-arrays"
    what = "numpy arrays"
    exts = frozenset({".npy"})

    def claims(self, data: Path, target: str | None) -> bool:
        return target is None and ".npy" in data_exts(data)

    def load(self, path: str, *, gray: bool = False) -> Image.Image:
        image = Image.fromarray(np.load(path, allow_pickle=False), "L")  # never unpickles a file
        return image if gray else image.convert("RGB")

    def check_file(self, path: str) -> str | None:
        return read_checked(path, self.load)[1]


@pytest.fixture
def npy(monkeypatch):
    registry.modalities()  # the built-in ones registered first, as in any process
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the toy leaves with the test
    return registry.register_modality(NpyModality())


def _as_arrays(src: Path, dst: Path, per_class: int) -> Path:
    for folder in sorted(p for p in src.iterdir() if p.is_dir())[:2]:
        (dst / folder.name).mkdir(parents=True)
        for png in sorted(folder.glob("*.png"))[:per_class]:
            np.save(dst / folder.name / f"{png.stem}.npy", np.asarray(Image.open(png).convert("L")))
    return dst


def test_a_modality_registered_in_a_test_fits_predicts_and_evaluates(npy, tmp_path):
    from pipelines.bundle import load_bundle
    from pipelines.evaluate import evaluate
    from pipelines.predict import PredictConfig, predict, write_predictions
    from pipelines.run import FitConfig, fit

    train = _as_arrays(REPO / "data" / "fashion", tmp_path / "train", 30)
    test = _as_arrays(REPO / "data" / "fashion_test", tmp_path / "test", 20)
    (train / "bag" / "broken.npy").write_bytes(b"not an array")  # a file of the modality that cannot be read
    original = sorted((train / "sneaker").glob("*.npy"))[0]  # a near copy: the data check reads it with `load`
    np.save(train / "sneaker" / "near_copy.npy", np.clip(np.load(original).astype(int) + 3, 0, 255).astype(np.uint8))
    config = FitConfig(data=str(train), out=str(tmp_path / "run"), epochs=2, freeze_epochs=1, size=48, lr=3e-3,
                       num_workers=0, precision="fp32", seed=0)
    assert registry.modality_for(train) is npy
    summary = fit(config, log=lambda *a: None)
    assert summary["resolved"]["n_skipped"] == 1
    skipped = pl.read_csv(tmp_path / "run" / "skipped.csv")
    assert skipped["path"].to_list() == [str(train / "bag" / "broken.npy")]
    near = pl.read_csv(tmp_path / "run" / "check.csv").filter(pl.col("kind") == "near_duplicate")
    assert {str(original), str(train / "sneaker" / "near_copy.npy")} in [{a, b} for a, b in near.select(
        "path", "other_path").iter_rows()], near

    bundle = load_bundle(tmp_path / "run" / "model")
    assert bundle.meta["modality"] == "npy-arrays" and bundle.modality is npy and bundle.input_exts == {".npy"}
    (test / "bag" / "empty.npy").write_bytes(b"")
    rows = list(predict(bundle, [str(test)], PredictConfig(num_workers=0, precision="fp32")))
    n = len(list(test.rglob("*.npy")))
    assert len(rows) == n and all(r["path"].endswith(".npy") for r in rows)
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert list(errors) == ["empty.npy"] and "No data left" in errors["empty.npy"]
    labelled = [r for r in rows if not r["error"]]
    right = sum(Path(r["path"]).parent.name == r["top1"] for r in labelled)
    assert right >= 0.7 * len(labelled), f"{right} of {len(labelled)} test arrays right: the model learnt nothing"
    counts = write_predictions(iter(rows), tmp_path / "predictions.csv")
    assert counts["files"] == n and counts["errors"] == 1

    (test / "bag" / "empty.npy").unlink()
    metrics = evaluate(tmp_path / "run" / "model", test, out=tmp_path / "evaluate", num_workers=0)
    assert metrics["n_known"] == n - 1 and metrics["accuracy"] == right / (n - 1)


def test_the_registry_names_the_modalities_and_refuses_unknown_ones(tmp_path):
    from pipelines.bundle import load_bundle
    names = [m.name for m in registry.modalities()]
    assert names[:3] == ["image", "audio", "tabular"]
    with pytest.raises(ItfitsError, match="did you mean 'audio'"):
        registry.get_modality("audoi")
    bundle = tmp_path / "model"
    bundle.mkdir()
    (bundle / "model.safetensors").write_bytes(b"")
    (bundle / "itfits.json").write_text('{"format_version": 1, "modality": "video", "classes": ["a", "b"]}')
    with pytest.raises(ItfitsError, match="modality 'video' is not one of image, audio, tabular"):
        load_bundle(bundle)


def test_predict_of_images_loads_no_training_or_table_modules():
    """The registry imports a modality's module when first asked for: predicting images neither starts fastai
    nor loads the table modality."""
    import subprocess
    import sys
    code = ("import sys; import pipelines.predict, pipelines.bundle; from pipelines.modality import get_modality; "
            "get_modality('image'); print(sorted(m for m in sys.modules if m == 'pipelines.run' "
            "or m.startswith(('fastai', 'pipelines.table_modality'))))")  # pipelines.runtime is the CPU policy
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"
