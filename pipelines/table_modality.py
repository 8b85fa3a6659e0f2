"""The table modality: a CSV/Parquet table and a target column (`--target`), trained as fastai's TabularModel
and/or LightGBM's trees (table_learners.py; the recipe: table_fit.py; the column schema: tabular.py), predicted
chunk by chunk with the input columns in front (predict.table_predictions)."""
from __future__ import annotations

from pathlib import Path

from .bundle import FORMAT_VERSION, library_versions
from .modality import Modality, register_modality
from .predict import table_predictions
from .sources import TABLE_EXTS
from .table_learners import KINDS, learner_of
from .tabular import TabularPreprocessing


class TableModality(Modality):
    name = "tabular"
    what = "CSV or Parquet tables"
    counted = "rows"
    exts = frozenset(TABLE_EXTS)
    row_per_file = False

    def claims(self, data: Path, target: str | None) -> bool:
        return target is not None

    def describe(self, config) -> str:
        return f"a tabular model of '{config.target}'"

    def fit(self, config, log):
        from .table_fit import fit_table  # the training stages import fastai: prediction must not pay for it at start-up
        return fit_table(self, config, log)

    def lr_find(self, config):
        from .table_fit import lr_find_table
        return lr_find_table(config)

    def predict(self, bundle, inputs, config):
        return table_predictions(bundle, inputs, config)

    def preprocessing(self, meta: dict) -> TabularPreprocessing:
        return TabularPreprocessing.from_json(meta["preprocessing"])

    def bundle_meta(self, prep, model: dict, *, training: dict) -> dict:
        """itfits.json for a tabular model: the column schema, vocabularies, fill values and normalisation
        (`TabularPreprocessing`) and what rebuilds the model (`model`: a TabularModelSpec's or GBDTSpec's JSON)."""
        return {"format_version": FORMAT_VERSION, "modality": self.name, "task": prep.task,
                "classes": list(prep.classes), "preprocessing": prep.json(), "model": model,
                "training": training, "versions": library_versions()}

    def rebuild(self, meta: dict):
        return learner_of(meta["model"]).rebuild(meta["model"])

    def meta_problem(self, meta: dict) -> str | None:
        missing = [k for k in ("model", "task") if k not in meta]
        if missing:
            return f"itfits.json has no {', '.join(missing)}"
        if meta["task"] not in ("classification", "regression") or not isinstance(meta["model"], dict):
            return "task must be classification or regression, and model a JSON object"
        if meta["task"] == "classification" and len(meta["classes"]) < 2:
            return "classes must be a list of 2 or more class names"
        if meta["calibration"] is None and meta["task"] != "regression":
            return "calibration is missing (only a regression model has none)"
        kind = meta["model"].get("kind", "nn")
        if not isinstance(kind, str) or kind not in KINDS:
            return f"model.kind must be one of {', '.join(KINDS)}, got {kind!r}"
        return KINDS[kind].problem(meta["model"])  # the schema is checked as it is rebuilt (load_bundle)


TABLES = register_modality(TableModality())
