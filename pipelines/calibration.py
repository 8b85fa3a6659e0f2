"""Calibration at fit time, beside unknown.py's methods: the fine-tuned model's outputs on validation, training and
--unknown items (batches.py for files, the table learner's `outputs` for rows) -> temperature, unknown score,
threshold and feature statistics (unknown.calibrate) for the bundle."""
from __future__ import annotations

import warnings
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from .backbones import get_spec
from .features import WithReference
from .batches import file_outputs, unknown_outputs
from .errors import ItfitsError, ItfitsWarning
from .multilabel import calibrate_multilabel, label_matrix
from .unknown import (DEFAULT_SCORE, TABLE_DEFAULT_SCORE, UnknownStats, calibrate, leave_class_out,
                      loo_reference_scores, unknown_estimate_line)

if TYPE_CHECKING:
    from .modality import Modality
    from .run import FitConfig


def calibrate_outputs(config: FitConfig, n_classes: int, *, valid: tuple, train: tuple, unknown: tuple | None,
               head_dim: int, default_score: str, ref_dim: int = 0):
    """calibrate() on (logits, features, targets) of the validation set, (features, targets) of training items
    and optional (logits, features) of unknown examples, with the config's score, threshold and keep.
    `head_dim`, `ref_dim`: how many feature columns are the head's and the reference body's (see unknown.py)."""
    stats = UnknownStats.fit(train[0], train[1], n_classes, head_dim=head_dim, ref_dim=ref_dim, seed=config.seed)
    known = {"pretrained_mahalanobis": loo_reference_scores(train[0][:, -ref_dim:], train[1], n_classes)} \
        if ref_dim else None
    u_logits, u_feats = unknown if unknown is not None else (None, None)
    threshold = None if config.threshold == "auto" else float(config.threshold)
    calibration, report = calibrate(valid[0], valid[2], valid[1], stats, keep=config.keep, score=config.score,
                                    threshold=threshold, unknown_logits=u_logits, unknown_features=u_feats,
                                    default_score=default_score, known_scores=known)
    if calibration.score == "pretrained_mahalanobis":
        report["leave_class_out"] = leave_class_out(
            train[0][:, -ref_dim:], train[1], n_classes, keep=config.keep, valid_x=valid[1][:, -ref_dim:],
            valid_targets=valid[2], valid_correct=valid[0].argmax(1) == valid[2], seed=config.seed)
    return calibration, report


def calibrate_images(model, items: pl.DataFrame, classes: list[str], prep, config: FitConfig, *, modality: Modality,
                     options=None, max_train: int = 4096, precision=None):
    """Temperature, unknown score and threshold from the validation set, feature statistics from (up to
    `max_train`) training items, score choice from config.unknown examples when given. Items are files of
    `modality` (with its `options`), whose outputs are computed exactly as prediction computes them (audio: a
    clip's are the mean over its windows).
    `precision`: the training's (a precision.Precision), so image outputs match the Learner's validation.
    `model`: the fine-tuned model, or features.WithReference of it and its pretrained body.
    Multi-label items (a `labels` column): targets are (N, C) 0/1 and multilabel.calibrate_multilabel chooses.
    Returns (Calibration, report, validation outputs {logits, features, targets, paths, ref_dim}, with the features
    and paths of the training items used: train_features, train_paths)."""
    fast = {"precision": precision, "channels_last": get_spec(config.arch).channels_last}

    def outputs(paths):
        return file_outputs(model, prep, paths, modality=modality, options=options, num_workers=config.num_workers,
                            what="calibration", **fast)

    ok = items.filter(pl.col("error").is_null())
    index = {c: i for i, c in enumerate(classes)}
    valid = ok.filter(pl.col("split") == "valid")
    train = ok.filter(pl.col("split") == "train")
    train = train.sample(min(max_train, train.height), seed=config.seed) if train.height > max_train else train
    v_logits, v_feats, _ = outputs(valid["path"].to_list())
    _, t_feats, _ = outputs(train["path"].to_list())
    multi = "labels" in items.columns

    def targets(part: pl.DataFrame) -> np.ndarray:
        return (label_matrix(part["labels"].to_list(), classes) if multi else
                np.array([index[c] for c in part["label"]], dtype=np.int64))
    v_targets = targets(valid)
    core = model.model if isinstance(model, WithReference) else model
    head_dim = core[1][-1].in_features
    # the reference is the same architecture: its last-stage input is as wide as the model's own
    ref_dim = (v_feats.shape[1] - head_dim) // 2 if isinstance(model, WithReference) else 0
    unknown = None
    if config.unknown:
        u_logits, u_feats, unreadable = unknown_outputs(model, prep, config.unknown, modality=modality, options=options,
                                                        num_workers=config.num_workers, **fast)
        if unreadable:  # left out, as unreadable files of DATA are
            path, error = unreadable[0]
            warnings.warn(f"--unknown {config.unknown}: {len(unreadable)} of its {len(unreadable) + len(u_logits)} "
                          f"files could not be read and were left out (the first, {path}: {error})", ItfitsWarning)
        unknown = (u_logits, u_feats)
    calibrated = partial(calibrate_multilabel, config, classes) if multi else partial(calibrate_outputs, config,
                                                                                       len(classes))
    calibration, report = calibrated(valid=(v_logits, v_feats, v_targets), train=(t_feats, targets(train)),
                                     unknown=unknown, head_dim=head_dim, ref_dim=ref_dim, default_score=DEFAULT_SCORE)
    return calibration, report, {"logits": v_logits, "features": v_feats, "targets": v_targets,
                                 "paths": valid["path"].to_list(), "ref_dim": ref_dim,
                                 # the training items' too, for the check's mislabel pass (check.py)
                                 "train_features": t_feats, "train_paths": train["path"].to_list()}


def unknown_rows(config: FitConfig, prep) -> pl.DataFrame | None:
    """The usable rows of config.unknown (a table of examples of none of the classes), parsed; read before
    training, so that a wrong table fails in seconds, not after the training."""
    if not config.unknown:
        return None
    if prep.task == "regression":
        raise ItfitsError(f"--unknown is for classification; '{prep.target}' holds numbers (regression), which "
                          "flags no unknowns")
    _, parsed, errors = prep.read_rows(config.unknown)
    parsed = parsed.filter(errors.is_null())
    if parsed.height == 0:
        raise ItfitsError(f"--unknown {config.unknown}: no usable rows")
    return parsed


def calibrate_table(outputs, model, data, config: FitConfig, *, unknown: pl.DataFrame | None = None,
                    default_score: str = TABLE_DEFAULT_SCORE, max_train: int = 4096):
    """As calibrate_images, for a table: temperature, score and threshold from the validation rows, feature
    statistics from (up to `max_train`) training rows, score choice from `unknown` (rows of none of the classes,
    from `unknown_rows`) when given. `outputs(model, x_cat, x_cont)` -> (logits, features): the learner's
    (table_learners.py). Returns (Calibration, report, validation logits, features)."""
    t_cat, t_cont, t_y = data.part(False)
    if len(t_y) > max_train:
        keep = np.random.default_rng(config.seed).choice(len(t_y), max_train, replace=False)
        t_cat, t_cont, t_y = t_cat[keep], t_cont[keep], t_y[keep]
    v_cat, v_cont, v_y = data.part(True)
    v_logits, v_feats = outputs(model, v_cat, v_cont)
    if unknown is not None:
        unknown = outputs(model, *data.prep.encode(unknown))
    calibration, report = calibrate_outputs(config, len(data.prep.classes), valid=(v_logits, v_feats, v_y),
                                            train=(outputs(model, t_cat, t_cont)[1], t_y), unknown=unknown,
                                            head_dim=v_feats.shape[1],  # tabular features are the head's only
                                            default_score=default_score)
    return calibration, report, v_logits, v_feats


def calibration_line(calibration, report: dict) -> str:
    temperature = (f"temperature {report['temperature_note']}" if report.get("temperature_note") else
                   f"temperature {calibration.temperature:.2f} (valid ECE {report['valid_ece']['before']:.3f} -> "
                   f"{report['valid_ece']['after']:.3f})")
    line = (f"{temperature}; unknown score {calibration.score}, threshold {calibration.threshold:.4g} "
            f"({report.get('score_chosen_by', 'given')})")
    estimate = unknown_estimate_line(report)
    return line + (f"\n{estimate}" if estimate else "")

