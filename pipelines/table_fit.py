"""The recipe of a table (`itfits fit TABLE --target COLUMN`): the rows read and encoded once (tabular.prepare_table),
each learner of `--model` trained on the same split (table_learners.py: fastai's TabularModel, LightGBM's trees;
auto: both, the better on validation kept), then calibration, the bundle, run.json and the report as `fit` writes
them for images."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import torch

from .bundle import save_bundle
from .calibration import calibrate_table, calibration_line, unknown_rows
from .io import write_json, write_table
from .logs import emit
from .metrics import regression_metrics
from .modality import Fitted
from .prepare import nn_learner, read_training_table
from .reports import Validation, guarded, write_report
from .sources import read_table
from .tabular import TABLE_EPOCHS, TabularModelSpec
from .table_learners import KINDS, TableFit, blend_fit, choose, learners_for, valid_scores, weighs_blend
from .training import CHOSEN_SUGGESTION, best_epoch, find_lr, train


# Training rows up to which a table trains on one thread (torch's and LightGBM's): a table's batches are too small
# for threads to share. With the machine busy (load 10 on 2 cores) a step of fastai's TabularModel at bs 32 took
# 8 ms on one thread and 350-570 on two, and LightGBM 1.1 s for 1,000 rows against 34-39 (bench/BENCHMARKS.md,
# "A table in seconds").
ONE_THREAD_ROWS = 100_000


@contextmanager
def table_threads(n_rows: int):
    """torch (and so LightGBM, which takes torch's count) on one thread for a table of up to ONE_THREAD_ROWS rows."""
    threads = torch.get_num_threads()
    if n_rows <= ONE_THREAD_ROWS:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_nn(data, config, run: Path, log) -> TableFit:
    """fastai's TabularModel with fit_one_cycle (lr_find's suggestion unless --lr), the epoch of lowest validation
    loss kept."""
    t0 = time.perf_counter()
    bs, learn = nn_learner(data, config, run)
    epochs = config.epochs or TABLE_EPOCHS
    log(f"nn: batch size {bs}{' (chosen from the data size)' if config.bs is None else ''}; epochs {epochs}"
        + (" (the default for tables; --epochs sets it)" if config.epochs is None else ""))
    lr, suggestions = choose_lr(learn, config, run, log)
    history = train(learn, epochs=epochs, lr=lr, fine_tune=False)
    kept = best_epoch(history["valid_loss"].to_list())  # the epoch whose weights train() kept
    if kept != history.height - 1:
        log(f"nn: kept the weights of epoch {kept} (validation loss {history['valid_loss'][kept]:.4f}, the lowest; "
            f"{history['valid_loss'][-1]:.4f} after the last)")
    spec = TabularModelSpec.for_data(data.prep, config.layers)
    resolved = {"epochs": epochs, "epochs_why": None if config.epochs else "the default for tables", "lr": lr,
                "lr_suggestions": suggestions, "bs": bs, "kept_epoch": kept, "layers": list(spec.layers),
                "emb_szs": spec.json()["emb_szs"]}
    return TableFit(kind="nn", model=learn.model.eval(), history=history, resolved=resolved,
                    model_json={"kind": "nn", **spec.json()},
                    seconds=round(time.perf_counter() - t0, 2), learn=learn)


def choose_lr(learn, config, run: Path, log) -> tuple[float, dict[str, float] | None]:
    """config.lr, or lr_find's chosen suggestion (plot and table written into the run folder)."""
    if config.lr is not None:
        return config.lr, None
    lr, suggestions = find_lr(learn, run, num_it=config.lr_find_iters)
    emit(log, "lr_find", lr_line(lr, suggestions, run), lr=lr, suggestions=suggestions)
    return lr, suggestions


def lr_line(lr: float, suggestions: dict[str, float], run: Path) -> str:
    return ("lr_find suggestions: " + ", ".join(f"{k} {v:.2e}" for k, v in suggestions.items())
            + f"; using {CHOSEN_SUGGESTION} {lr:.2e} (plot: {run / 'lr_find.png'})")


def _describe_data(data, config, run: Path, log) -> None:
    prep, n_skipped = data.prep, data.skipped.height
    n_valid = int(data.valid.sum())
    log(f"{data.n_rows} rows: {len(data.y) - n_valid} train, {n_valid} valid, {n_skipped} skipped"
        + (f" (listed in {run / 'skipped.csv'})" if n_skipped else ""))
    log(f"{prep.task} of '{prep.target}'" + (f" into {len(prep.classes)} classes" if prep.task == "classification"
                                            else "")
        + f"; categorical: {', '.join(prep.cat) or 'none'}; continuous: {', '.join(prep.cont) or 'none'}"
        + (f"; missing-value flags for: {', '.join(prep.na)}" if prep.na else ""))
    for note in data.notes:
        log(f"note: {note}")


def _score_line(kind: str, s: dict, seconds: float) -> str:
    figures = ", ".join(f"{k.removeprefix('valid_').replace('_', ' ')} {v:.4g}" for k, v in s.items()
                        if k.startswith("valid_"))
    return f"{kind}: validation {figures} ({seconds:.1f} s)"


def fit_table(modality, config, log=print) -> Fitted:
    """`itfits fit TABLE --target COLUMN`: train the learners of --model on one split, keep the better on validation,
    calibrate it and write the run folder as `fit` does for images. Returns the run summary (run.json) and the
    kept model's fastai Learner (None for LightGBM's trees)."""
    t0 = time.perf_counter()
    run = Path(config.out)
    data = read_training_table(config, run)
    prep = data.prep
    unknown = unknown_rows(config, prep)
    _describe_data(data, config, run, log)
    with table_threads(len(data.y)):
        return _fit_learners(modality, config, data, unknown, run, log, t0)


def _fit_learners(modality, config, data, unknown, run: Path, log, t0: float) -> Fitted:
    from .run import config_defaults  # run imports this module: no cycle at import
    prep = data.prep
    fits, scores = {}, {}
    for learner in learners_for(config.model):
        fits[learner.name] = learner.train(data, config, run, log)
        scores[learner.name] = valid_scores(learner, fits[learner.name], data)
        log(_score_line(learner.name, scores[learner.name], fits[learner.name].seconds))
    if weighs_blend(config.model, prep.task):
        fits["blend"] = blend_fit(fits["nn"], fits["gbdt"])
        scores["blend"] = valid_scores(KINDS["blend"], fits["blend"], data)
        log(_score_line("blend", scores["blend"], fits["blend"].seconds))
    kind, why = choose(scores, config.model)
    fit, learner, chosen = fits[kind], KINDS[kind], scores[kind]
    if len(fits) > 1:
        log(f"model: {kind}, {learner.describe} ({why}; --model nn, gbdt or blend keeps one)")
    write_table(fit.history, run / "history.csv")

    v_rows = data.rows[data.valid]
    rows = read_table(Path(config.data))[v_rows.tolist()]  # the validation rows as the file has them
    calibration = calib_report = None
    if prep.task == "classification":
        calibration, calib_report, _, _ = calibrate_table(learner.outputs, fit.model, data, config, unknown=unknown,
                                                          default_score=learner.default_score)
        v_y = data.y[data.valid]
        results = {"valid_accuracy": chosen["valid_accuracy"]}
        emit(log, "calibration", calibration_line(calibration, calib_report), **calib_report)
        probs, unknown_scores, _ = calibration.apply(chosen["logits"], chosen["features"])
        outputs = dict(logits=chosen["logits"], targets=v_y, probs=probs, scores=unknown_scores)
    else:
        v_pred = prep.decode_target(chosen["logits"][:, 0])
        v_true = rows[prep.target].cast(pl.Float64).to_numpy()  # exact: data.y holds it normalised, in float32
        results = regression_metrics(v_pred, v_true)
        outputs = dict(predictions=v_pred, targets=v_true)
    # the kept epoch's or round's loss; the blend's own on the standardised target (its history is the network's)
    valid_loss = (fit.history["valid_loss"].min() if kind != "blend" else
                  float(np.mean((chosen["logits"][:, 0] - data.y[data.valid]) ** 2)) if prep.task != "classification"
                  else chosen["valid_nll"])
    results.update(valid_loss=float(valid_loss), model=kind, seconds=round(time.perf_counter() - t0, 1))
    if len(fits) > 1:  # every learner's validation figures: the report shows the one not kept too
        results["models"] = {k: {**{n: v for n, v in s.items() if n.startswith("valid_")}, "seconds": fits[k].seconds}
                             for k, s in scores.items()}
    summary = {
        "config": asdict(config),
        "resolved": {"model": f"{learner.describe} of '{config.target}'", "learner": kind, "learner_why": why,
                     **fit.resolved, "task": prep.task, "classes": prep.classes, "cat": prep.cat, "cont": prep.cont,
                     "na_flags": prep.na, "dates": prep.dates, "ignore": prep.ignore, "n_rows": data.n_rows,
                     "n_train": int((~data.valid).sum()), "n_valid": int(data.valid.sum()),
                     "n_skipped": data.skipped.height,
                     "learners": {k: f.resolved for k, f in fits.items()}},
        "results": results,
        "calibration": calib_report,
    }
    training = {k: v for k, v in results.items() if k != "models"}
    save_bundle(fit.model, modality.bundle_meta(prep, fit.model_json, training=training), calibration, run / "model",
                files=fit.files)
    write_json(summary, run / "run.json")
    report = guarded([], "report.html", write_report, run, summary, fit.history,
                     Validation(names=[f"row {r}" for r in v_rows], rows=rows, **outputs), defaults=config_defaults())
    log(", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in results.items() if k.startswith("valid_"))
        + f"; model bundle in {run / 'model'}; report: {report or 'not written'}")
    return Fitted(summary, fit.learn)


def lr_find_table(config) -> tuple[float, dict[str, float]]:
    """`itfits lr-find` of a table: fastai's TabularModel's (the trees take no learning-rate search)."""
    run = Path(config.out)
    data = read_training_table(config, run)
    with table_threads(len(data.y)):
        return find_lr(nn_learner(data, config, run)[1], run, num_it=config.lr_find_iters)
