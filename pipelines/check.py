"""`itfits check DATA` and the check at the start of `fit`: exact duplicates (content hash), near duplicates
(correlated gray thumbnails of each image, or of an audio clip's first mel window), within a class, across classes
(conflicting labels) and across train/valid (leakage); files too small to learn from; class counts and imbalance.
The mislabelled-file pass (confident learning on pretrained features) is in mislabel.py; both write rows of the
same findings table, check.csv.
"""
from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch

from .audio import MelConfig
from .backbones import DEFAULT_BACKBONE
from .io import write_table
from .logs import Progress, emit
from .mislabel import mislabel_rows, reference_features
from .modality import modality_for
from .sources import TABLE_EXTS, open_image, os_path, table_columns

FINDINGS = {"path": pl.String, "kind": pl.String, "other_path": pl.String, "label": pl.String,
            "suggested_label": pl.String, "score": pl.Float64, "detail": pl.String}
# kinds, in the order the summary names them
KINDS = ("leakage", "label_conflict", "duplicate", "near_duplicate", "mislabelled", "too_small", "small_class",
         "unreadable")
THUMB = 32  # near duplicates are compared on THUMB x THUMB gray thumbnails (bilinear, antialiased)
COARSE = 8  # ... found first among pairs whose COARSE x COARSE block means correlate at PREFILTER or more
PREFILTER = 0.97  # (a planted copy's coarse correlation with its original was at least 0.98 in data/fashion; at
# 0.95, 12,000 Fashion-MNIST images gave 2.6x as many candidates to verify, and the same near pairs)
NEAR = 0.985  # near duplicate: Pearson correlation of the thumbnails' pixels at least this. On data/fashion's 240
# 28-px images: resized (1.5x PNG, 2x JPEG q85) and re-encoded (JPEG q90) copies of every file 0.992 or more; 2 of
# the 28,680 pairs of distinct files reached it, two nearly identical pairs of trousers. A 256-bit dHash did
# worse on such small images: re-encoding flipped up to 67 bits, while distinct trousers were 9 bits apart.
MIN_SIDE = 16  # pixels: an image smaller than this on a side holds too little to learn from
MIN_SECONDS = 0.1  # an audio clip shorter than this holds too little to learn from
IMBALANCE = 3.0  # a class with fewer than 1/IMBALANCE of the largest class's files is reported (issue 19 item 2)


@dataclass(frozen=True)
class CheckResult:
    """What a check found: one row per finding (FINDINGS columns), the class counts of the usable files and the
    seconds each pass took."""
    findings: pl.DataFrame
    counts: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what the check could not do (e.g. the mislabel pass covered a sample)

    def kinds(self) -> dict[str, int]:
        """Findings per kind, every kind listed."""
        found = dict(self.findings.group_by("kind").len().iter_rows()) if self.findings.height else {}
        return {k: int(found.get(k, 0)) for k in KINDS}

    def imbalance(self) -> float | None:
        """Files of the largest class / files of the smallest; None without two classes."""
        n = [v for v in self.counts.values() if v]
        return max(n) / min(n) if len(n) >= 2 else None

    def json(self) -> dict:
        return {"findings": self.kinds(), "class_counts": self.counts, "imbalance": self.imbalance(),
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()}, "notes": list(self.notes)}

    def line(self) -> str:
        """The one-line summary fit and check print."""
        found = [f"{n} {k.replace('_', ' ')}" for k, n in self.kinds().items() if n]
        ratio = self.imbalance()
        return ("check: " + (", ".join(found) if found else "no duplicates, leakage, conflicts or tiny files found")
                + (f"; classes {min(self.counts.values())}..{max(self.counts.values())} files (imbalance "
                   f"{ratio:.1f}x)" if ratio else "")
                + f" ({sum(self.seconds.values()):.1f} s)")

    def with_findings(self, rows: pl.DataFrame, *, seconds: dict | None = None, notes=()) -> "CheckResult":
        """This result with more findings (the mislabel pass's) and their seconds and notes."""
        return CheckResult(findings=pl.concat([self.findings, rows.select(list(FINDINGS))]),
                           counts=self.counts, seconds={**self.seconds, **(seconds or {})},
                           notes=self.notes + tuple(notes))

    def ordered(self) -> pl.DataFrame:
        """The findings, the most serious kinds first (KINDS), each kind by score, highest first."""
        order = {k: i for i, k in enumerate(KINDS)}
        df = self.findings.with_columns(pl.col("kind").replace_strict(order, return_dtype=pl.Int64).alias("_k"))
        return df.sort(["_k", "score"], descending=[False, True], nulls_last=True).drop("_k")

    def lines(self, n: int) -> list[str]:
        """What `itfits check` prints: the class counts, notes, then the first `n` findings, most serious first."""
        out = ["class counts: " + ", ".join(f"{k} {v}" for k, v in self.counts.items())]
        out += [f"note: {note}" for note in self.notes]
        for r in self.ordered().head(n).iter_rows(named=True):
            out.append(f"{r['kind']:15s} {r['path'] or 'class'}" + (f"  (copy: {r['other_path']})" if r["other_path"]
                       else "") + f"  {r['label']}" + (f" -> {r['suggested_label']}" if r["suggested_label"] else "")
                       + (f"  {r['score']:.3f}" if r["score"] is not None else ""))
        return out

    def write(self, path: Path) -> None:
        """check.csv: the findings, ordered."""
        write_table(self.ordered(), path)


def findings_frame(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=FINDINGS, orient="row")


# ---- per file: content hash, thumbnail, size -----------------------------------------------------------------

def thumbnail(img) -> np.ndarray:
    """(THUMB, THUMB) uint8 gray thumbnail of a PIL image, the picture near duplicates are compared on."""
    from PIL import Image
    return np.asarray(img.convert("L").resize((THUMB, THUMB), Image.BILINEAR), dtype=np.uint8)


def _file_facts(path: str, picture: str | None, load=None) -> tuple[str | None, np.ndarray | None, int | None]:
    """(content hash, thumbnail of `picture` (the image itself, or an audio clip's first window), the image's
    shorter side in pixels) of one file; Nones for what cannot be read (the items table has its error). `load`:
    the modality's reader (path -> PIL image), for files PIL does not open itself."""
    try:
        with open(os_path(path), "rb") as f:
            digest = hashlib.blake2b(f.read(), digest_size=16).hexdigest()
    except OSError:
        return None, None, None
    try:
        with open_image(picture or path) as im:
            side = min(im.size) if picture is None else None  # before draft, which changes .size
            im.draft("L", (4 * THUMB, 4 * THUMB))  # a JPEG decodes at a fraction of its size: enough here
            return digest, thumbnail(im), side
    except Exception:  # the items table says why a file is unusable; it just has no thumbnail here
        pass
    try:
        img = load(path) if load is not None and picture is None else None
        return digest, (None if img is None else thumbnail(img)), (None if img is None else min(img.size))
    except Exception:
        return digest, None, None


def file_facts(paths: list[str], pictures: list[str | None] | None = None, *, workers: int = 8, load=None):
    """(content hashes, thumbnails (N, THUMB, THUMB) uint8, readable mask, shorter sides in pixels (images; -1
    unknown)) of `paths`, read in threads (I/O and PIL's decoding release the GIL)."""
    pictures = pictures or [None] * len(paths)
    with ThreadPoolExecutor(workers) as ex:
        facts = list(ex.map(_file_facts, paths, pictures, [load] * len(paths)))
    thumbs = np.zeros((len(paths), THUMB, THUMB), np.uint8)
    ok = np.zeros(len(paths), bool)
    for i, (_, t, _) in enumerate(facts):
        if t is not None:
            thumbs[i], ok[i] = t, True
    sides = np.array([-1 if s is None else s for _, _, s in facts])
    return [d for d, _, _ in facts], thumbs, ok, sides


def _standardised(x: np.ndarray) -> torch.Tensor:
    """Rows of x (N, D) minus their mean, divided by their norm: dot products are Pearson correlations."""
    t = torch.from_numpy(x.reshape(len(x), -1).astype(np.float32))
    t = t - t.mean(1, keepdim=True)
    return t / t.norm(dim=1, keepdim=True).clamp(min=1e-6)


def near_pairs(thumbs: np.ndarray, ok: np.ndarray, *, near: float = NEAR, chunk: int = 1024):
    """(i, j, correlation) for i < j, both `ok`, whose thumbnails correlate at `near` or more. Every pair is
    compared on COARSE x COARSE block means (torch matmuls, `chunk` rows at a time), the pairs at PREFILTER or
    more then on the whole thumbnails (standardised once, kept as float16: 2 KB a file). 12,000 Fashion-MNIST
    images took 3.4 s on 2 cores; the all-pairs part grows with the square of the file count."""
    idx = np.flatnonzero(ok)
    n, k = len(idx), THUMB // COARSE
    if n < 2:  # no pair (files whose pictures PIL cannot open have no thumbnail)
        return []
    coarse = _standardised(thumbs[idx].reshape(n, COARSE, k, COARSE, k).mean((2, 4)))
    fine = torch.cat([_standardised(thumbs[idx[i:i + 4096]]).half() for i in range(0, n, 4096)]) if n else None
    out = []
    for start in range(0, n, chunk):
        sims = coarse[start:start + chunk] @ coarse[start:].T  # (B, n - start)
        a, b = np.nonzero(np.triu((sims >= PREFILTER).numpy(), 1))  # pairs (start + a, start + b), a < b
        a, b = torch.from_numpy(start + a), torch.from_numpy(start + b)
        for lo in range(0, len(a), 65536):  # the candidates' whole thumbnails, a batch at a time
            i, j = a[lo:lo + 65536], b[lo:lo + 65536]
            corr = (fine[i].float() * fine[j].float()).sum(1)
            hit = torch.nonzero(corr >= near).flatten()
            out += [(int(idx[i[h]]), int(idx[j[h]]), float(corr[h])) for h in hit]
    return out


# ---- findings -------------------------------------------------------------------------------------------------

def _pair_rows(items: pl.DataFrame, pairs: list[tuple[int, int, float | None]]) -> list[tuple]:
    """Findings of copies: each pair (i, j, thumbnail correlation; None: identical bytes) gives `label_conflict` when the
    labels differ, `leakage` when one is in train and the other in valid (both when both), else `duplicate` /
    `near_duplicate`. The row's path is the one to look at: the validation copy, or the later file."""
    paths, labels, splits = items["path"].to_list(), items["label"].to_list(), items["split"].to_list()
    rows = []
    for i, j, d in pairs:
        if splits[i] == "valid" and splits[j] != "valid":
            i, j = j, i  # j: the validation copy
        exact = d is None
        score = 1.0 if exact else d  # similarity: 1 for identical bytes, else the thumbnails' correlation
        what = "identical bytes" if exact else f"near copy: thumbnails correlate {d:.4f}"
        a, b = (paths[i], labels[i], splits[i]), (paths[j], labels[j], splits[j])
        if a[1] != b[1]:
            rows.append((b[0], "label_conflict", a[0], b[1], a[1], score, f"{what}; labelled {b[1]} and {a[1]}"))
        if {a[2], b[2]} == {"train", "valid"}:
            rows.append((b[0], "leakage", a[0], b[1], None, score, f"{what}; in valid, its copy in train"))
        if a[1] == b[1] and not {a[2], b[2]} == {"train", "valid"}:
            rows.append((b[0], "duplicate" if exact else "near_duplicate", a[0], b[1], None, score, what))
    return rows


def exact_pairs(digests: list[str | None]) -> list[tuple[int, int, None]]:
    """(first, other, None) for every file whose bytes equal an earlier file's (each against the first copy)."""
    first: dict[str, int] = {}
    pairs = []
    for i, d in enumerate(digests):
        if d is None:
            continue
        if d in first:
            pairs.append((first[d], i, None))
        else:
            first[d] = i
    return pairs


def class_rows(counts: dict[str, int]) -> list[tuple]:
    """`small_class` findings: classes with fewer than 1/IMBALANCE of the largest class's files."""
    if not counts:
        return []
    top, most = max(counts.items(), key=lambda kv: kv[1])
    return [(None, "small_class", None, c, None, most / max(n, 1),
             f"{n} files; the largest class, {top}, has {most} ({most / max(n, 1):.1f}x)")
            for c, n in sorted(counts.items()) if n * IMBALANCE < most]


def _class_counts(ok: pl.DataFrame) -> pl.DataFrame:
    """(class, files) of usable items; multi-label items (a `labels` column) count once per class they show, and
    not at all when they show none."""
    if "labels" not in ok.columns:
        return ok.group_by("label").len()
    return ok.select("labels").explode("labels").drop_nulls().group_by("labels").len()


def check_items(items: pl.DataFrame, *, workers: int = 8, load=None) -> CheckResult:
    """The hash pass of a check on an items table (path, label, split, error; clips rendered for training have
    `image`, their first mel window's PNG): unreadable files, exact and near duplicates, tiny files, class
    counts. Reads each file once (plus a clip's first window PNG and its header)."""
    t0 = time.perf_counter()
    audio = "image" in items.columns  # files shown by a rendered picture: audio clips
    ok = items.filter(pl.col("error").is_null())
    bad = items.filter(pl.col("error").is_not_null())
    rows = [(p, "unreadable", None, lab, None, None, err) for p, lab, err in bad.select("path", "label", "error").iter_rows()]
    paths = ok["path"].to_list()
    pictures = ok["image"].to_list() if audio else None
    digests, thumbs, readable, sides = file_facts(paths, pictures, workers=workers, load=load)
    exact = exact_pairs(digests)
    same = {(i, j) for i, j, _ in exact}
    dup_of = {j for _, j, _ in exact}  # a byte copy's near pairs are its original's: said once
    near = [(i, j, d) for i, j, d in near_pairs(thumbs, readable)
            if (i, j) not in same and i not in dup_of and j not in dup_of]
    rows += _pair_rows(ok, exact + near)
    if audio:
        from .audio import clip_seconds
        with ThreadPoolExecutor(workers) as ex:
            seconds = list(ex.map(clip_seconds, paths))
        rows += [(p, "too_small", None, lab, None, s, f"{s:.3f} s long, under {MIN_SECONDS:g} s")
                 for p, lab, s in zip(paths, ok["label"], seconds) if s is not None and s < MIN_SECONDS]
    else:
        rows += [(p, "too_small", None, lab, None, float(s), f"{s} px on its shorter side, under {MIN_SIDE} px")
                 for p, lab, s in zip(paths, ok["label"], sides) if 0 <= s < MIN_SIDE]
    counts = dict(sorted(_class_counts(ok).iter_rows()))
    rows += class_rows(counts)
    return CheckResult(findings=findings_frame(rows), counts={k: int(v) for k, v in counts.items()},
                       seconds={"hashes": time.perf_counter() - t0})


def add_mislabelled(result: CheckResult, paths: list[str], labels: list[str], features: np.ndarray,
                    classes: list[str], *, seed: int = 0, note: str | None = None) -> CheckResult:
    """`result` with the mislabel pass's findings on items with pretrained `features` (mislabel.py)."""
    rows, seconds, notes = mislabel_rows(paths, labels, features, classes, seed=seed)
    return result.with_findings(findings_frame(rows), seconds=seconds, notes=notes + ([note] if note else []))


def split_given(data: Path) -> bool:
    """Whether DATA says which files are validation files (train/ and valid/ folders, a split or is_valid
    column); otherwise a check has no split to look for leakage across."""
    if data.is_dir():
        return (data / "train").is_dir() and (data / "valid").is_dir()
    return data.suffix.lower() in TABLE_EXTS and bool({"split", "is_valid"} & set(table_columns(data)))


def check_data(data: str | Path, *, arch: str = "auto", weights: str = "auto", size: int | None = None,
               mislabel: bool = True, mel: MelConfig | None = None, num_workers: int = 0, seed: int = 42,
               log=print) -> CheckResult:
    """`itfits check DATA`: the hash pass, then (`mislabel`) the mislabel pass on `arch`'s pretrained features at
    `size` (default: the backbone's). Audio clips are rendered to mel windows as fit renders them (cached); a
    clip's features are the mean of its windows'. Leakage is looked for only where DATA gives a split."""
    data = Path(data)
    arch = DEFAULT_BACKBONE if arch == "auto" else arch  # the smallest body finds swapped labels as well (mislabel.py)
    from .run import FitConfig  # run imports this module: the fit's own check
    modality = modality_for(data)
    config = FitConfig(data=str(data), arch=arch, weights=weights, size=size, mel=mel, num_workers=num_workers,
                       seed=seed)
    modality.check_config(config)
    # files (one row per file), the items they become (audio: one row per window, with its `source` clip)
    items, windows, _ = modality.read_items(config, lambda line: emit(log, "note", line))
    if not split_given(data):
        items = items.with_columns(split=pl.lit(None, pl.String))
    result = check_items(items, load=modality.load)
    emit(log, "check", f"duplicate pass: {items.height} files, {result.seconds['hashes']:.1f} s", seconds=result.seconds)
    if mislabel and "labels" in items.columns:  # confident learning takes one class per file
        return replace(result, notes=result.notes + ("no mislabel pass: it is for single-label data, and this is "
                                                     "multi-label",))
    if not mislabel:
        return result
    ok = items.filter(pl.col("error").is_null())
    windows = windows.filter(pl.col("error").is_null())
    pictures = windows["path"].to_list()
    t0 = time.perf_counter()
    feats, errors = reference_features(pictures, arch=arch, weights=weights, size=size, num_workers=num_workers,
                                       progress=Progress("features", log=log))
    result = CheckResult(result.findings, result.counts, {**result.seconds, "features": time.perf_counter() - t0})
    good = np.array([not e for e in errors], bool)
    owners = windows["source" if "source" in windows.columns else "path"].to_numpy()[good]
    feats, seen = feats[good], set(owners)
    paths = [p for p in ok["path"].to_list() if p in seen]
    position = {p: i for i, p in enumerate(paths)}  # a file's features: the mean of its items' (an audio clip's windows)
    owner = np.array([position[o] for o in owners], dtype=np.int64)
    summed = np.zeros((len(paths), feats.shape[1]), feats.dtype)
    np.add.at(summed, owner, feats)
    feats = summed / np.bincount(owner, minlength=len(paths))[:, None]
    labels = dict(ok.select("path", "label").iter_rows())
    return add_mislabelled(result, paths, [labels[p] for p in paths], feats, sorted(result.counts), seed=seed)


# ---- at fit: the duplicate pass before training, the mislabel pass on calibration's features after it -------------

def check_at_fit(files: pl.DataFrame, run: Path, *, load=None, log=print) -> CheckResult:
    """The duplicate pass on a run's files (with the split fit made): RUN/check.csv and its line."""
    result = check_items(files, load=load)
    result.write(Path(run) / "check.csv")
    emit(log, "check", f"{result.line()}; {Path(run) / 'check.csv'}", **result.json())
    return result


def mislabelled_at_fit(result: CheckResult, files: pl.DataFrame, outputs: dict, classes: list[str], run: Path, *,
                       seed: int = 0, log=print) -> CheckResult:
    """The mislabel pass on the pretrained reference body's features that calibration computed (validation items
    and up to calibration's sample of training items: no model runs for it), added to RUN/check.csv."""
    ref = outputs["ref_dim"]
    paths = outputs["paths"] + outputs["train_paths"]
    feats = np.concatenate([outputs["features"][:, -ref:], outputs["train_features"][:, -ref:]])
    labels = dict(files.select("path", "label").iter_rows())
    usable = files["error"].is_null().sum()
    note = (f"mislabel pass: {len(paths)} of {usable} files (validation and calibration's sample of training "
            "items)") if len(paths) < usable else None
    result = add_mislabelled(result, paths, [labels[p] for p in paths], feats, classes, seed=seed, note=note)
    result.write(Path(run) / "check.csv")
    n = result.kinds()["mislabelled"]
    emit(log, "check", f"check: {n} likely mislabelled file{'s' * (n != 1)} (confident learning on pretrained "
         f"features, {result.seconds['mislabel']:.2f} s){'; ' + note if note else ''}; {Path(run) / 'check.csv'}",
         **result.json())
    return result
