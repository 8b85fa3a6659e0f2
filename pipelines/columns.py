"""A table's columns as typed values: reading text and numbers as their types (with a reason per bad value), dates
as their parts, and which columns are categorical or continuous (fastai's cont_cat_split rules)."""
from __future__ import annotations

import numpy as np
import polars as pl

from .errors import ItfitsError
from .sources import NULL_VALUES

NA = "#na#"  # fastai's name for the missing/unseen category, code 0
MAX_CARD = 20  # integer columns (and targets) with more distinct values are continuous (fastai's cont_cat_split)
BOOL_WORDS = {"true": True, "false": False, "t": True, "f": False, "yes": True, "no": False, "y": True, "n": False,
              "1": True, "0": False}
DEFAULT_LAYERS = (200, 100)  # fastai's tabular_learner default
FLOAT32_MAX = float(np.finfo(np.float32).max)  # larger numbers are infinite to the model: bad values, as inf is
_ROW, _TRAIN = "__itfits_row", "__itfits_train"
_DTYPES = {str(t): t for t in (pl.String, pl.Boolean, pl.Float64, pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8,
                               pl.UInt16, pl.UInt32, pl.UInt64)}




# ---- reading values as their types ------------------------------------------------------------------------------

def _describe(dtype) -> str:
    return ("a finite number" if dtype == pl.Float64 else "true/false" if dtype == pl.Boolean else "text"
            if dtype == pl.String else "a whole number")


def _too_large(s: pl.Series) -> pl.Series:
    """Per value of a float column: inf, or a number that is inf once the model's float32 (a bad value)."""
    return (s.abs() > FLOAT32_MAX).fill_null(False)


def _readable(source, dtype) -> bool:
    """Whether a column of type `source` can hold values of the type `dtype` a model reads: text, numbers and
    booleans can (bad values become row errors); dates can as text only; lists, structs and binary never."""
    if source in (pl.String, pl.Boolean, pl.Null) or source.is_numeric():
        return True
    return isinstance(source, (pl.Categorical, pl.Enum)) or (dtype == pl.String and source.is_temporal())


def _from_text(value: str, dtype: str):
    """A vocabulary entry (text, as stored in itfits.json) back as a number of its column's type."""
    return float(value) if dtype == "Float64" else int(value)


def _parse(s: pl.Series, dtype) -> pl.Series:
    """`s` as `dtype`; values that cannot be read as it become null."""
    if s.dtype == dtype or (dtype == pl.String and isinstance(s.dtype, pl.Categorical)):
        return s
    if s.dtype != pl.String:
        if dtype.is_integer() and s.dtype.is_float():  # 2007.0 is the whole number 2007; 2007.5 is none
            whole = s.cast(dtype, strict=False)
            return whole.set((whole.cast(pl.Float64) != s).fill_null(False), None)
        try:
            return s.cast(dtype, strict=False)  # numeric widening, bool -> float, categorical -> string
        except pl.exceptions.InvalidOperationError:
            pass
    text = s.cast(pl.String).str.strip_chars()
    if dtype == pl.Boolean:
        return text.str.to_lowercase().replace_strict(list(BOOL_WORDS), list(BOOL_WORDS.values()), default=None,
                                                      return_dtype=pl.Boolean)
    out = text.cast(dtype, strict=False)
    if dtype.is_integer() and out.null_count() > text.null_count():  # "2007.0": a CSV written from floats
        out = out.fill_null(_parse(text.cast(pl.Float64, strict=False), dtype))
    return out


def parse_columns(df: pl.DataFrame, dtypes: dict[str, object], *, source, training: bool = False
                  ) -> tuple[pl.DataFrame, pl.Series, list[str]]:
    """(the columns of `dtypes` parsed to those types, per-row error or null, names of columns with bad values).
    A column where no value can be read as its type is an ItfitsError naming it; where only some rows are bad,
    those rows get an error that names the column and the value. Infinite numbers are bad values: a model cannot
    normalise them. `training`: the errors' advice is for `itfits fit` (else for prediction)."""
    parsed, messages, partly_bad = {}, [], []
    for name, dtype in dtypes.items():
        s = df[name]
        advice = (f"Fix the column, or leave it out of --cont (or --ignore {name})" if training else
                  f"The model was trained on '{name}' holding {_describe(dtype)}: fix the column")
        if not _readable(s.dtype, dtype):
            raise ItfitsError(f"column '{name}' in {source} has type {s.dtype}; the model reads it as "
                              f"{_describe(dtype)}. {advice}")
        if isinstance(s.dtype, pl.Categorical) and dtype != pl.String:
            s = s.cast(pl.String)
        if s.dtype == pl.String and dtype != pl.String:  # NA words are missing values (Parquet text, say), not bad
            s = s.set(s.str.strip_chars().is_in(NULL_VALUES), None)
        out = _parse(s, dtype)
        bad = None if out is s else s.is_not_null() & out.is_null()  # None: of its type already, nothing bad
        infinite = _too_large(out) if dtype == pl.Float64 else None
        if infinite is not None and infinite.any():
            out, bad = out.set(infinite, None), infinite if bad is None else bad | infinite
        parsed[name] = out
        if bad is None:
            continue
        n_bad = int(bad.sum())
        if n_bad and n_bad == s.len() - s.null_count():
            examples = ", ".join(repr(v) for v in s.filter(bad).cast(pl.String).unique(maintain_order=True).head(3))
            raise ItfitsError(f"column '{name}' in {source} has no value that reads as {_describe(dtype)} ({dtype}), "
                              f"as the model needs (e.g. {examples}). {advice}")
        if n_bad:
            partly_bad.append(name)
            value = s.cast(pl.String)
            messages.append(pl.when(bad).then(pl.lit(f"{name}: '") + value + pl.lit(f"' is not {_describe(dtype)}")))
    return pl.DataFrame(parsed, height=df.height), _join_errors(messages, df.height), partly_bad


# ---- dates -> fastai's date parts --------------------------------------------------------------------------------

# Text formats a date column is recognised in, tried in order on the column's values; the one found is stored in the
# bundle, so prediction reads the same day out of "01/02/2020" as training did.
DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y")
DATETIME_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M",
                    "%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z")
# fastai's add_datepart (time=True adds the TIME_PARTS), named <column>_<part>: no clash with the table's own columns
DATE_PARTS = ("Year", "Month", "Week", "Day", "Dayofweek", "Dayofyear", "Is_month_end", "Is_month_start",
              "Is_quarter_end", "Is_quarter_start", "Is_year_end", "Is_year_start")
TIME_PARTS = ("Hour", "Minute", "Second")


def _parts(spec: dict) -> tuple[str, ...]:
    return DATE_PARTS + (TIME_PARTS if spec["time"] else ()) + ("Elapsed",)


def date_columns(name: str, spec: dict) -> list[str]:
    """The model columns a date column becomes; `spec` as in TabularPreprocessing.dates."""
    return [f"{name}_{p}" for p in _parts(spec)]


def _text_date_format(s: pl.Series) -> str | None:
    """The first of DATE_FORMATS / DATETIME_FORMATS that reads every distinct value of text column `s`, or None."""
    values = s.drop_nulls().cast(pl.String).str.strip_chars().unique()
    if values.len() == 0:
        return None
    for fmt in DATE_FORMATS + DATETIME_FORMATS:
        # a sample first: a text column that is no date (an id of a million values) fails in microseconds
        if all(_read_dates(v, fmt).null_count() == 0 for v in (values.head(64), values)):
            return fmt
    return None


def _read_dates(text: pl.Series, fmt: str) -> pl.Series:
    """Text as dates (a date format) or datetimes; null where a value does not read as `fmt`."""
    return (text.str.to_date(fmt, strict=False) if fmt in DATE_FORMATS else
            text.str.to_datetime(fmt, strict=False, time_unit="us"))


def detect_dates(df: pl.DataFrame, *, skip=()) -> dict[str, dict]:
    """{column: {"format": text format or None (a Date/Datetime column), "time": whether it has a time of day}}
    for the Date and Datetime columns of `df` and the text columns whose every value reads as one date format."""
    found = {}
    for name, dtype in df.schema.items():
        if name in skip:
            continue
        if dtype == pl.Date or isinstance(dtype, pl.Datetime):
            found[name] = {"format": None, "time": dtype != pl.Date}
        elif dtype == pl.String or isinstance(dtype, pl.Categorical):
            fmt = _text_date_format(df[name])
            if fmt is not None:
                found[name] = {"format": fmt, "time": fmt in DATETIME_FORMATS}
    return found


def _as_dates(s: pl.Series, spec: dict, source) -> tuple[pl.Series, pl.Series, str]:
    """(column `s` as Date, or Datetime (spec["time"]); per row whether its value is not a date of the format;
    the format). A date column of a Parquet-trained model that comes as text reads in the first format that fits."""
    if s.dtype == pl.Null:
        s = s.cast(pl.String)
    fmt = spec["format"] or "a Date or Datetime column"
    if s.dtype == pl.String or isinstance(s.dtype, pl.Categorical):
        text = s.cast(pl.String).str.strip_chars()
        text = text.set(text.is_in(NULL_VALUES), None)  # NA words are missing dates, not bad ones
        fmt = spec["format"] or _text_date_format(text) or DATE_FORMATS[0]
        s = _read_dates(text, fmt)
        bad = text.is_not_null() & s.is_null()
    elif s.dtype == pl.Date or isinstance(s.dtype, pl.Datetime):
        bad = pl.repeat(False, s.len(), eager=True)
    else:
        raise ItfitsError(f"column '{s.name}' in {source} has type {s.dtype}; the model reads it as dates "
                          f"({fmt}): fix the column")
    if isinstance(s.dtype, pl.Datetime) and s.dtype.time_zone is not None:
        s = s.dt.replace_time_zone(None)  # a zoned column: its wall-clock time, as pandas' .dt gives; text with an
        # offset (%#z) was read into UTC
    return s.cast(pl.Datetime("us") if spec["time"] else pl.Date), bad, fmt


def expand_dates(df: pl.DataFrame, dates: dict[str, dict], *, source) -> tuple[pl.DataFrame, pl.Series]:
    """(`df` with each date column replaced by its fastai date parts (`date_columns`), per-row error or null).
    A missing date gives missing parts; a value that is not a date of the column's format is a row error naming it."""
    parts, messages = [], []
    for name, spec in dates.items():
        d, bad, fmt = _as_dates(df[name], spec, source)
        n_bad = int(bad.sum())
        if n_bad and d.null_count() == d.len():  # values given, none of them a date
            raise ItfitsError(f"column '{name}' in {source} has no value that reads as a date ({fmt}), as the model "
                              "needs. Fix the column")
        if n_bad:
            messages.append(pl.when(bad).then(pl.lit(f"{name}: '") + df[name].cast(pl.String)
                                              + pl.lit(f"' is not a date ({fmt})")))
        t = pl.col(name)
        day, month = t.dt.day(), t.dt.month()
        month_end = day == t.dt.days_in_month()
        exprs = {"Year": t.dt.year(), "Month": month, "Week": t.dt.week(), "Day": day,
                 "Dayofweek": t.dt.weekday() - 1,  # pandas: Monday is 0
                 "Dayofyear": t.dt.ordinal_day(), "Is_month_end": month_end, "Is_month_start": day == 1,
                 "Is_quarter_end": month_end & (month % 3 == 0), "Is_quarter_start": (day == 1) & (month % 3 == 1),
                 "Is_year_end": (month == 12) & (day == 31), "Is_year_start": (month == 1) & (day == 1),
                 "Hour": t.dt.hour(), "Minute": t.dt.minute(), "Second": t.dt.second(),
                 "Elapsed": t.dt.epoch("s").cast(pl.Float64)}  # seconds since 1970, a float as in fastai
        parts += pl.DataFrame(d.alias(name)).select(exprs[p].alias(f"{name}_{p}") for p in _parts(spec)).get_columns()
    # a column named like a part (a predicted table's extra column; training refuses such a clash) gives way to it
    out = df.drop([*dates, *(c.name for c in parts)], strict=False).hstack(parts)
    return out, _join_errors(messages, out.height)


def _join_errors(messages: list, height: int) -> pl.Series:
    """One error per row from per-column `pl.when(bad).then(message)` expressions or error Series, joined with
    "; ": null where none applies."""
    if not messages:
        return pl.repeat(None, height, dtype=pl.String, eager=True).alias("error")
    return pl.select(pl.concat_str(messages, separator="; ", ignore_nulls=True).replace("", None)).to_series() \
        .alias("error")


# ---- which column is what -------------------------------------------------------------------------------------

def _parse_dtype(dtype, role: str) -> str:
    """The type a column is read as at prediction time: text for categories, numbers as themselves."""
    if role == "cont":
        return "Float64"
    if dtype == pl.Boolean or (dtype.is_integer() and str(dtype) in _DTYPES):
        return str(dtype)
    return "Float64" if dtype.is_float() else "String"  # Int128 categories too: compared as text


def infer_columns(df: pl.DataFrame, *, cat=(), cont=()) -> tuple[list[str], list[str]]:
    """(categorical, continuous) names: text, bool and integer columns with at most MAX_CARD values are
    categorical, other numbers continuous (fastai's cont_cat_split); `cat`/`cont` override the guess."""
    ints = [c for c, t in df.schema.items() if t.is_integer() and c not in cat and c not in cont]
    card = df.select(pl.col(ints).n_unique()).row(0, named=True) if ints else {}
    cats, conts = [], []
    for name, dtype in df.schema.items():
        if name in cat or name in cont:
            (cats if name in cat else conts).append(name)
        elif dtype in (pl.String, pl.Boolean, pl.Null) or isinstance(dtype, (pl.Categorical, pl.Enum)):
            cats.append(name)
        elif dtype.is_integer():
            (cats if card[name] <= MAX_CARD else conts).append(name)
        elif dtype.is_float() or dtype.is_decimal():
            conts.append(name)
        else:
            raise ItfitsError(f"column '{name}' has type {dtype}, which itfits cannot use as it is: --ignore {name}, "
                              f"or derive numbers or categories from it (e.g. year, month) first")
    return cats, conts


def infer_task(target: pl.Series) -> str:
    """classification for text, bool and integer targets with at most MAX_CARD values; else regression."""
    dtype = target.dtype
    if dtype.is_float() or dtype.is_decimal() or (dtype.is_integer() and target.n_unique() > MAX_CARD):
        return "regression"
    if dtype in (pl.String, pl.Boolean) or dtype.is_integer() or isinstance(dtype, (pl.Categorical, pl.Enum)):
        return "classification"
    raise ItfitsError(f"target column '{target.name}' has type {dtype}; it must hold classes (text, bool, integers) "
                      "or numbers")


def _median(x: np.ndarray) -> float:
    """np.median(x), partitioning `x` in place around its middle: several times faster than np.median (which
    copies) and than polars."""
    k = len(x) // 2
    x.partition((k - 1, k) if len(x) % 2 == 0 else k)
    return float((x[k - 1] + x[k]) / 2 if len(x) % 2 == 0 else x[k])


# ---- text categories as integer ids -----------------------------------------------------------------------------

def _text_ids(s: pl.Series) -> tuple[list[str], np.ndarray]:
    """(the distinct strings, per row the index of its string in them, or their count when missing) of a text
    column. Each string is hashed once, when it becomes a Categorical (already while a CSV is read); the vocabulary
    and the codes are then numpy on the ids."""
    if not isinstance(s.dtype, pl.Categorical):
        s = s.cast(pl.String).cast(pl.Categorical(pl.Categories.random()))  # categories of its own: dense ids
    values = s.dtype.categories.to_series().to_list()
    return values, s.to_physical().fill_null(len(values)).to_numpy()


def _text_vocab(s: pl.Series, least: int = 1) -> list[str]:
    """The distinct strings of a text column seen at least `least` times, sorted."""
    values, ids = _text_ids(s)
    return sorted(v for v, n in zip(values, np.bincount(ids, minlength=len(values) + 1)) if n >= least)


def _text_codes(s: pl.Series, codes: dict[str, int], missing: int) -> np.ndarray:
    """Per row the code of its string (int32); `missing` where it is missing or has no code."""
    values, ids = _text_ids(s)
    return np.array([codes.get(v, missing) for v in values] + [missing], np.int32)[ids]
