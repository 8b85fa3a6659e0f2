"""Polars table -> model inputs (fastai's TabularModel), and the same preprocessing at prediction time; the columns' types:
columns.py; the DataLoaders: prepare.py.

What fastai's TabularPandas does with Categorify, FillMissing and Normalize, done with polars expressions and
kept as plain JSON (`TabularPreprocessing`) so a bundle never pickles its procs:
  categorical: vocabulary "#na#" + sorted training values; code 0 = missing or unseen
  continuous:  missing -> training median, plus a `<col>_na` categorical flag where training had missing values;
               then (x - training mean) / training std
The model is fastai's `TabularModel` on (x_cat, x_cont) tensors batched straight from memory.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from .columns import (_DTYPES, _ROW, _TRAIN, DEFAULT_LAYERS, NA, _from_text, _join_errors, _median, _parse_dtype,
                      _text_codes, _text_vocab, _too_large, date_columns, detect_dates, expand_dates, infer_columns,
                      infer_task, parse_columns)
from .errors import ItfitsError, did_you_mean
from .sources import NULL_VALUES, read_table, refuse_unknown_class, stratified_valid, table_columns

# epochs of fit_one_cycle when --epochs is not given. On bench/table_suite.py (7 tables, 5 seeds; with the batch size
# from the data size an epoch is 16-32 steps, and the best epoch's weights are kept): test accuracy over 5 tables,
# mean / worst, 0.821 / 0.651 at 5 epochs, 0.838 / 0.660 at 10, 0.844 / 0.688 at 20; about 3x the seconds.
TABLE_EPOCHS = 20
# A text column of many values for its rows (a name: 199 values in 244 rows) tells little row by row: a category of
# its own for each value would be a 199-level embedding (or as many tree splits) fitted to one or two rows each.
# Past MANY_VALUES distinct values and a quarter of the training rows, the values seen fewer than RARE times in
# training share code 0 with missing and unseen ones (a note says so).
MANY_VALUES, RARE = 50, 3

# ---- preprocessing ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TabularPreprocessing:
    """Everything between a table's rows and the model's inputs; stored in itfits.json as is."""
    target: str
    task: str  # classification | regression
    classes: list[str]  # class names (classification), [] for regression
    cat: list[str]
    cont: list[str]
    ignore: list[str]
    dtypes: dict[str, str]  # input column -> type it is read as: String, Boolean, Int64, ..., Float64
    vocab: dict[str, list[str]]  # categorical column -> ["#na#", training values...]
    na: list[str]  # continuous columns that get a <col>_na flag (they had missing values in training)
    fill: dict[str, float]  # continuous column -> training median
    mean: dict[str, float]
    std: dict[str, float]
    target_mean: float = 0.0  # regression: the model predicts (y - target_mean) / target_std
    target_std: float = 1.0
    # date column of the table -> {"format": its text format, None for a Date/Datetime column; "time": bool}; each is
    # read as dates and replaced by its date parts (`date_columns`), which are model inputs in `cat`/`cont`.
    # Bundles before dates were expanded have none.
    dates: dict[str, dict] = field(default_factory=dict)

    @property
    def inputs(self) -> list[str]:
        """The model's input columns (date parts included)."""
        return self.cat + self.cont

    @property
    def columns(self) -> list[str]:
        """The columns a table to predict must have: the inputs, with each date column in place of its parts."""
        parts = {p for name, spec in self.dates.items() for p in date_columns(name, spec)}
        return [*self.dates, *(c for c in self.inputs if c not in parts)]

    @property
    def cat_sizes(self) -> list[int]:
        """Vocabulary size of each categorical model input: the columns, then the _na flags (#na#, false, true)."""
        return [len(self.vocab[c]) for c in self.cat] + [3] * len(self.na)

    def json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TabularPreprocessing":
        return cls(**d)

    @classmethod
    def fit(cls, df: pl.DataFrame, train: np.ndarray, *, target: str, task: str, classes: list[str], cat: list[str],
            cont: list[str], ignore: list[str], dtypes: dict[str, str], dates: dict[str, dict] | None = None
            ) -> "TabularPreprocessing":
        """Statistics from the `train` rows (a bool mask) of `df` (columns parsed by `parse_columns`)."""
        rows = pl.Series(_TRAIN, train)  # polars filters with it several times faster than numpy does
        vocab = {c: _text_vocab(df[c].filter(rows)) for c in cat if dtypes[c] == "String"}
        n = int(train.sum())
        vocab.update({c: _text_vocab(df[c].filter(rows), least=RARE) for c, v in vocab.items()
                      if many_values(len(v), n)})
        t = pl.col(_TRAIN)
        stats = [pl.col(c).filter(t).drop_nulls().unique().sort().cast(pl.String).implode().alias(c)
                 for c in cat if c not in vocab]  # numbers and booleans: few values, no strings to hash
        if task == "regression":
            y = pl.col(target).filter(t).cast(pl.Float64)
            stats += [y.mean().alias(_TRAIN + "y_mean"), y.std(ddof=0).alias(_TRAIN + "y_std")]
        row = df.with_columns(rows).select(stats).row(0, named=True) if stats else {}
        fill, mean, std, na = {}, {}, {}, []
        for c in cont:
            s = df[c].filter(rows)
            s = s.fill_nan(None) if s.dtype.is_float() else s
            xs = s.drop_nulls().cast(pl.Float64).to_numpy(writable=True)  # partitioned and centred in place
            k = len(xs)
            if k < n:
                na.append(c)
            fill[c] = _median(xs) if k else 0.0
            filled_mean = (xs.sum() + (n - k) * fill[c]) / max(n, 1)
            xs -= filled_mean
            var = (xs @ xs + (n - k) * (fill[c] - filled_mean) ** 2) / max(n, 1)
            mean[c], std[c] = float(filled_mean), float(np.sqrt(var)) + 1e-7  # fastai Normalize: +1e-7
        return cls(target=target, task=task, classes=list(classes), cat=list(cat), cont=list(cont),
                   ignore=list(ignore), dtypes=dtypes, vocab={c: [NA] + (vocab[c] if c in vocab else row[c]) for c in cat},
                   na=na, fill=fill, mean=mean, std=std, target_mean=float(row.get(_TRAIN + "y_mean") or 0.0),
                   target_std=float(row.get(_TRAIN + "y_std") or 1.0), dates=dict(dates or {}))

    @property
    def parse_dtypes(self) -> dict[str, object]:
        return {c: _DTYPES[self.dtypes[c]] for c in self.inputs}

    def encode(self, parsed: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(x_cat (N, n_cat) int32 codes, x_cont (N, n_cont) float32) from columns parsed by `parse_columns`.
        Both are column-major: each column is written once, contiguously."""
        x_cat = np.empty((len(self.cat) + len(self.na), parsed.height), np.int32)
        x_cont = np.empty((len(self.cont), parsed.height), np.float32)
        exprs = [self._codes(c).alias(f"cat:{c}") for c in self.cat if self.dtypes[c] != "String"]
        exprs += [pl.col(c).fill_nan(None).is_null().cast(pl.Int32).add(1).alias(f"na:{c}") for c in self.na]
        exprs += [((pl.col(c).fill_nan(None).fill_null(self.fill[c]) - self.mean[c]) / self.std[c])
                  .cast(pl.Float32).alias(f"cont:{c}") for c in self.cont]
        done = parsed.select(exprs)  # in parallel, a column per thread
        for j, c in enumerate(self.cat):
            x_cat[j] = (_text_codes(parsed[c], {v: i for i, v in enumerate(self.vocab[c][1:], start=1)}, missing=0)
                        if self.dtypes[c] == "String" else done[f"cat:{c}"].to_numpy())
        for j, c in enumerate(self.na, start=len(self.cat)):
            x_cat[j] = done[f"na:{c}"].to_numpy()
        for j, c in enumerate(self.cont):
            x_cont[j] = done[f"cont:{c}"].to_numpy()
        return x_cat.T, x_cont.T

    def _codes(self, name: str) -> pl.Expr:
        """Category codes of a parsed number or boolean column (text: `_text_codes`): 1 + index in the training
        vocabulary; 0 when missing or unseen."""
        vocab, dtype = self.vocab[name][1:], self.dtypes[name]
        if dtype == "Boolean":
            code = {v: i + 1 for i, v in enumerate(vocab)}
            return pl.when(pl.col(name)).then(code.get("true", 0)).when(~pl.col(name)).then(code.get("false", 0)) \
                .otherwise(0).cast(pl.Int32).alias(name)
        values = [_from_text(v, dtype) for v in vocab]  # compare as numbers: no cast of the column to text
        return pl.col(name).replace_strict(values, range(1, len(vocab) + 1), default=0, return_dtype=pl.Int32)

    def encode_target(self, target: pl.Series) -> np.ndarray:
        if self.task == "classification":
            return target.cast(pl.String).replace_strict(self.classes, range(len(self.classes)),
                                                         return_dtype=pl.Int64).to_numpy()
        return ((target.cast(pl.Float64) - self.target_mean) / self.target_std).cast(pl.Float32).to_numpy()

    def decode_target(self, outputs: np.ndarray) -> np.ndarray:
        """Regression outputs back in the target's units."""
        return outputs.astype(np.float64) * self.target_std + self.target_mean

    def read_rows(self, path: Path | str) -> tuple[pl.DataFrame, pl.DataFrame, pl.Series]:
        """(the table to show in the output, the model's columns parsed, per-row error or null) for prediction.
        Extra columns are kept; a missing model column is an ItfitsError naming it."""
        names = table_columns(path)
        missing = [c for c in self.columns if c not in names]
        if missing:
            hint = did_you_mean(missing[0], names)
            raise ItfitsError(f"{path} lacks column(s) the model was trained on: {', '.join(missing)}."
                              f"{hint} It has: {', '.join(names)}")
        table = read_table(path, strings=self.columns)  # CSV: model columns as text, parsed here with row errors
        parsed, errors, partly_bad = self._parse(table, source=path)
        clean = [c for c in self.inputs if c not in partly_bad and c in names]  # shown typed; partly bad ones as read
        return table.with_columns(parsed.select(clean)), parsed, errors

    def parse_rows(self, table: pl.DataFrame, *, source: str = "the table") -> tuple[pl.DataFrame, pl.Series]:
        """(the model's columns parsed, per-row error or null) of rows read elsewhere (a Ray Data batch; a CSV's
        columns as text, where the words of sources.NULL_VALUES are missing values, as read_table reads them)."""
        missing = [c for c in self.columns if c not in table.columns]
        if missing:
            raise ItfitsError(f"{source} lacks column(s) the model was trained on: {', '.join(missing)}. It has: "
                              f"{', '.join(table.columns)}")
        model = table.select(self.columns)
        text = [c for c, t in model.schema.items() if t == pl.String]
        model = model.with_columns(pl.when(pl.col(c).is_in(NULL_VALUES)).then(None).otherwise(pl.col(c)).alias(c)
                                   for c in text)
        parsed, errors, _ = self._parse(model, source=source)
        return parsed, errors

    def _parse(self, table: pl.DataFrame, *, source) -> tuple[pl.DataFrame, pl.Series, set]:
        expanded, date_errors = expand_dates(table, self.dates, source=source)
        parsed, errors, partly_bad = parse_columns(expanded, self.parse_dtypes, source=source)
        # a row without a single value is no evidence of any class: an error row, never a confident label
        empty = parsed.select(pl.all_horizontal(pl.all().is_null()) if parsed.width else pl.lit(False)).to_series()
        empty = pl.select(pl.when(empty).then(pl.lit("every column the model reads is missing"))).to_series()
        return parsed, _join_errors([date_errors, errors, empty], table.height), partly_bad


def many_values(n_values: int, n_rows: int) -> bool:
    """Whether a text column of `n_values` distinct values in `n_rows` training rows keeps its frequent ones only."""
    return n_values > max(MANY_VALUES, n_rows / 4)


# ---- the data stage of a run ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TabularData:
    """A training table, preprocessed: model inputs for every usable row and which rows were skipped."""
    prep: TabularPreprocessing
    x_cat: np.ndarray  # (N, n_cat) int32 category codes (nn.Embedding takes int32), 0 = missing or unseen
    x_cont: np.ndarray  # (N, n_cont) float32, normalised
    y: np.ndarray  # (N,) class index (int64), or normalised target (float32)
    valid: np.ndarray  # (N,) bool: in the validation split
    rows: np.ndarray  # (N,) row number (0-based) in the file of each usable row
    skipped: pl.DataFrame  # row (0-based, in the file), error
    n_rows: int  # rows in the file
    notes: list[str] = field(default_factory=list)  # things the user may want to know about their columns

    def part(self, valid: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m = self.valid if valid else ~self.valid
        return self.x_cat[m], self.x_cont[m], self.y[m]


def _check_names(path: Path, names: list[str], *, target: str, cat, cont, ignore) -> None:
    for flag, given in (("--target", [target]), ("--cat", cat), ("--cont", cont), ("--ignore", ignore)):
        for n in given:
            if n not in names:
                raise ItfitsError(f"{flag} {n}: {path} has no column '{n}';{did_you_mean(n, names)} "
                                  f"columns: {', '.join(names)}")
    given = {"--cat": cat, "--cont": cont, "--ignore": ignore}
    for a, b in (("--cat", "--cont"), ("--cat", "--ignore"), ("--cont", "--ignore")):
        both = sorted(set(given[a]) & set(given[b]))
        if both:
            raise ItfitsError(f"column(s) {', '.join(both)} given to both {a} and {b}; choose one")
    if target in [*cat, *cont, *ignore]:
        raise ItfitsError(f"'{target}' is the --target; it cannot also be in --cat, --cont or --ignore")
    reserved = [n for n in names if n.startswith("__itfits")]
    if reserved:
        raise ItfitsError(f"{path}: column names starting with __itfits are itfits' own; rename {', '.join(reserved)}")


def _classes(y: pl.Series) -> tuple[list[str], np.ndarray]:
    """(class names in sorted order, class index per row)."""
    if y.dtype == pl.String or isinstance(y.dtype, (pl.Categorical, pl.Enum)):
        names = _text_vocab(y)
        return names, _text_codes(y, {v: i for i, v in enumerate(names)}, missing=-1).astype(np.int64)
    classes = y.unique().sort()
    return classes.cast(pl.String).to_list(), y.replace_strict(classes, range(len(classes)),
                                                               return_dtype=pl.Int64).to_numpy()


def _check_classes(classes: list[str], codes: np.ndarray, valid: np.ndarray) -> None:
    counts = np.bincount(codes, minlength=len(classes))
    refuse_unknown_class(classes, rename="its value in the target column")
    if len(classes) < 2:
        raise ItfitsError(f"the target needs at least 2 classes, found {len(classes)} ({', '.join(classes)}); "
                          "for numbers to predict, use a float column (regression)")
    small = [f"{c} ({n})" for c, n in zip(classes, counts) if n < 2]
    if small:
        raise ItfitsError(f"every class needs at least 2 rows; too few in: {', '.join(small[:20])}"
                          + (f" and {len(small) - 20} more" if len(small) > 20 else ""))
    if valid.all() or not valid.any():
        raise ItfitsError(f"no rows in the {'train' if valid.all() else 'valid'} split; check --valid-pct")


def _skip(df: pl.DataFrame, drop: pl.Series, errors) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(df without the `drop` rows, those rows' numbers and errors)."""
    if not drop.any():
        return df, pl.DataFrame(schema={"row": pl.UInt32, "error": pl.String})
    gone = df.filter(drop).select(pl.col(_ROW).alias("row"), error=errors.filter(drop) if isinstance(errors, pl.Series)
                                  else pl.lit(errors))
    return df.filter(~drop), gone


def _stray_words(values_of: dict[str, list[str]]) -> list[str]:
    """Notes on text columns (name -> their distinct training values) that hold numbers but for a few words (a typo,
    a unit, "unknown"): one word makes a CSV column text, and so categorical, with every number a category of its
    own."""
    notes = []
    for c, distinct in values_of.items():
        if len(distinct) < 10:
            continue
        values = pl.Series(distinct, dtype=pl.String)
        words = values.filter(values.str.strip_chars().cast(pl.Float64, strict=False).is_null())
        if 0 < words.len() <= values.len() // 10:
            notes.append(f"column '{c}' is read as categories because of {words.len()} value(s) that are not numbers "
                         f"({', '.join(repr(w) for w in words.head(3))}); if it holds numbers, fix those, or train "
                         f"with --cont {c} (rows with such values are then skipped)")
    return notes


def _dates_and_ids(df: pl.DataFrame, used: list[str], *, path, cat, cont):
    """(`df` with its date columns expanded into date parts, the input columns then (parts in place of the dates,
    ids left out), the dates found, per-row date errors, the ids left out, notes saying so). Date columns:
    Date/Datetime, or text that reads as dates (as a category a date has one value per row, which tells nothing
    about new rows). An id: a text column with a different value in every row; left out unless --cat names it."""
    dates = detect_dates(df.select(used), skip=[*cat, *cont])
    clash = sorted(set(p for c, spec in dates.items() for p in date_columns(c, spec)) & set(df.columns))
    if clash:
        raise ItfitsError(f"{path}: column(s) {', '.join(clash)} have the names of the date parts itfits derives from "
                          f"a date column; rename them, or --ignore them")
    df, errors = expand_dates(df, dates, source=path)
    notes = [f"column '{c}' read as dates ({spec['format'] or 'Date/Datetime'}): it becomes "
             f"{len(date_columns(c, spec))} date parts ({c}_Year, {c}_Month, ..., {c}_Elapsed)" for c, spec in dates.items()]
    used = [p for c in used for p in (date_columns(c, dates[c]) if c in dates else [c])]
    ids = [c for c in used if c not in cat and (df.schema[c] == pl.String or isinstance(df.schema[c], pl.Categorical))
           and df.height > 1 and df[c].n_unique() == df.height]
    notes += [f"column '{c}' has a different value in every row (an id?): left out; --cat {c} uses it" for c in ids]
    return df, [c for c in used if c not in ids], dates, errors, ids, notes


def prepare_table(path: Path | str, *, target: str, cat=(), cont=(), ignore=(), valid_pct: float = 0.2,
                  seed: int = 42) -> TabularData:
    """Read a CSV/Parquet table and preprocess it for training: columns inferred (or as given), rows with a
    missing target or unreadable values skipped, seeded split, statistics from the training rows."""
    path = Path(path)
    names = table_columns(path)
    cat, cont, ignore = list(cat), list(cont), list(ignore)
    _check_names(path, names, target=target, cat=cat, cont=cont, ignore=ignore)
    used = [c for c in names if c != target and c not in ignore]
    if not used:
        raise ItfitsError(f"no input columns left in {path} besides the target '{target}' and --ignore")
    df = read_table(path, [target, *used], categorical=True).with_row_index(_ROW)
    n_rows = df.height
    t = df[target]
    floats = t.dtype.is_float()
    infinite = _too_large(t) if floats else pl.repeat(False, df.height, eager=True)
    no_value = t.is_null() | (t.is_nan() if floats else False) | infinite
    why = f"missing target '{target}'"
    if infinite.any():
        why = pl.select(pl.when(infinite).then(pl.lit(f"target '{target}' is not a finite number"))
                        .otherwise(pl.lit(why))).to_series()
    df, no_target = _skip(df, no_value, why)
    if df.height == 0:
        raise ItfitsError(f"no row of {path} has a value in the target column '{target}'")
    df, used, dates, date_errors, ids, notes = _dates_and_ids(df, used, path=path, cat=cat, cont=cont)
    ignore += ids  # recorded in the schema with --ignore's columns
    if not used:
        raise ItfitsError(f"no input columns left in {path} besides the target '{target}', --ignore and the ids "
                          f"left out ({', '.join(ids)}; --cat names one to use it)")
    cats, conts = infer_columns(df.select(used), cat=cat, cont=cont)
    dtypes = {c: _parse_dtype(df.schema[c], "cat" if c in cats else "cont") for c in used}
    parsed, errors, _ = parse_columns(df, {c: _DTYPES[dtypes[c]] for c in used}, source=path, training=True)
    errors = _join_errors([date_errors, errors], df.height)
    df = df.with_columns(parsed.get_columns())
    df, unreadable = _skip(df, errors.is_not_null(), errors)
    y = df[target]
    task = infer_task(y)
    if task == "classification":
        classes, codes = _classes(y)
        valid = stratified_valid(codes, valid_pct=valid_pct, seed=seed)
        _check_classes(classes, codes, valid)
    else:
        classes, codes = [], None
        valid = np.zeros(df.height, bool)
        valid[np.random.default_rng(seed).permutation(df.height)[:max(1, round(df.height * valid_pct))]] = True
    n_train = int((~valid).sum())
    if n_train < 2:  # BatchNorm needs 2 rows a batch; the last partial batch is dropped
        raise ItfitsError(f"{df.height} usable rows leave {n_train} for training after {int(valid.sum())} for "
                          "validation; training needs at least 2 (more rows, or a lower --valid-pct)")
    if task == "regression" and y.filter(pl.Series(~valid)).n_unique() < 2:
        raise ItfitsError(f"the target '{target}' has one value in every training row: there is nothing to learn")
    prep = TabularPreprocessing.fit(df, ~valid, target=target, task=task, classes=classes, cat=cats,
                                    cont=conts, ignore=ignore, dtypes=dtypes, dates=dates)
    train_rows = pl.Series(~valid)
    values_of = {c: _text_vocab(df[c].filter(train_rows)) for c in cats if dtypes[c] == "String"}
    for c, values in values_of.items():
        n_values = len(values)
        if many_values(n_values, n_train):
            notes.append(f"column '{c}' has {n_values} distinct values in {n_train} training rows: the "
                         f"{len(prep.vocab[c]) - 1} seen {RARE} or more times are categories, the rest one category "
                         f"with missing and unseen values (a category per value would fit one or two rows each); "
                         f"if it is an id, --ignore {c}")
    notes += _stray_words(values_of)
    x_cat, x_cont = prep.encode(df)
    y = codes if codes is not None else prep.encode_target(y)
    return TabularData(prep=prep, x_cat=x_cat, x_cont=x_cont, y=y, valid=valid, rows=df[_ROW].to_numpy(),
                       skipped=pl.concat([no_target, unreadable]).sort("row"),
                       n_rows=n_rows, notes=notes)


# ---- the model -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TabularModelSpec:
    """What rebuilds fastai's TabularModel; stored in itfits.json."""
    emb_szs: tuple[tuple[int, int], ...]  # (vocabulary size, embedding size) per categorical input
    n_cont: int
    n_out: int  # classes, or 1 for regression
    layers: tuple[int, ...] = DEFAULT_LAYERS

    @classmethod
    def for_data(cls, prep: TabularPreprocessing, layers=None) -> "TabularModelSpec":
        """Embedding sizes by fastai's rule of thumb (`emb_sz_rule`, as `get_emb_sz` does)."""
        from fastai.tabular.model import emb_sz_rule
        return cls(emb_szs=tuple((n, emb_sz_rule(n)) for n in prep.cat_sizes), n_cont=len(prep.cont),
                   n_out=len(prep.classes) if prep.task == "classification" else 1,
                   layers=tuple(layers or DEFAULT_LAYERS))

    def json(self) -> dict:
        return {"emb_szs": [list(e) for e in self.emb_szs], "n_cont": self.n_cont, "n_out": self.n_out,
                "layers": list(self.layers)}

    @classmethod
    def from_json(cls, d: dict) -> "TabularModelSpec":
        return cls(emb_szs=tuple(tuple(e) for e in d["emb_szs"]), n_cont=d["n_cont"], n_out=d["n_out"],
                   layers=tuple(d["layers"]))


def create_tabular_model(spec: TabularModelSpec) -> torch.nn.Module:
    """fastai's TabularModel as tabular_learner builds it (BatchNorm, ReLU, no dropout, no y_range)."""
    from fastai.tabular.model import TabularModel
    return TabularModel(list(spec.emb_szs), spec.n_cont, spec.n_out, list(spec.layers))


def forward_features(model, x_cat: torch.Tensor, x_cont: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features): features are the input of the last Linear (B, layers[-1]), for the unknown scores."""
    seen: list[torch.Tensor] = []
    hook = model.layers[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        logits = model(x_cat, x_cont)
    finally:
        hook.remove()
    return logits, seen[0]


def tabular_outputs(model, x_cat: np.ndarray, x_cont: np.ndarray, *, bs: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, n_out), features (N, D)) for all rows, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    logits, feats = [], []
    with torch.inference_mode():
        for i in range(0, max(len(x_cat), 1), bs):  # no rows: one empty batch, for the outputs' shapes
            lo, fe = forward_features(model, torch.as_tensor(x_cat[i:i + bs], device=device),
                                      torch.as_tensor(x_cont[i:i + bs], device=device))
            logits.append(lo.float().cpu().numpy())
            feats.append(fe.float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(feats)

