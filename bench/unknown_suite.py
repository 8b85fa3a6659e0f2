"""Unknown detection (and accuracy) with itfits' defaults on a suite of data sets nobody tuned them for.

Each set of bench/suite_sets.py (5 image, 2 audio, and the 3 harder ones) is trained with `itfits fit`'s defaults at
each --size and seed. The trained bundle and the un-fine-tuned pretrained body (the same backbone, weights=auto)
then give logits and features of the training, validation and test items of the known classes, and of near and far
held-out items; these are cached (RUN/outputs.npz), so the candidate scores are all scored on the same models and
new candidates cost no training. Per set and candidate: AUROC and FPR95 for near and far unknowns, and the operating
point (share of correctly classified known test items kept, of unknowns rejected) at the threshold
rule the candidate would ship with. Then the mean over sets and the worst set.

    python bench/unknown_suite.py                   # full: sizes 64,128, seeds 0,1, 5 epochs (about an hour)
    python bench/unknown_suite.py --quick           # development: size 64, seed 0, 3 epochs, 4 sets
    python bench/unknown_suite.py --sets glyphs --sizes 64 --seeds 0 --epochs 3
    python bench/unknown_suite.py --sizes 128 --seeds 0 --epochs 3 --arch efficientnet_lite2 --per-class 24

--arch, --per-class (the first N training files of each class, and N/4 validation files), --suggestion (the
lr_find suggestion fit trains with) and --frozen-stages (how many stages fine-tuning keeps pretrained) give the
runs that choose `--arch auto`'s data sizes (backbones.AUTO_ARCHS) and check the epochs, lr and frozen-stem
defaults (bench/BENCHMARKS.md).

Results: RUNS/summary.json and markdown tables on stdout (bench/BENCHMARKS.md keeps them with the command).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite_sets  # noqa: E402
from plain_recipe import plain_recipe  # noqa: E402
from pipelines.backbones import create_body, get_spec  # noqa: E402
from pipelines.bundle import load_bundle  # noqa: E402
from pipelines.images import ImagePreprocessing  # noqa: E402
from pipelines.batches import file_outputs  # noqa: E402
from pipelines.sources import AUDIO_EXTS, IMAGE_EXTS  # noqa: E402
from pipelines.run import FitConfig, fit  # noqa: E402
from pipelines import unknown as U  # noqa: E402

SPLITS = ("train", "valid", "test", "near", "far")
KEEP = 0.95  # the default --keep
KEEP_SWEEP = (0.85, 0.9, 0.925, 0.95)  # other --keep values, for the reference scores' cross-fitted rule


def files(folder: Path, exts) -> tuple[list[str], list[str]]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts)
    return [str(p) for p in paths], [p.parent.name for p in paths]


def reference_model(arch: str) -> nn.Module:
    """The un-fine-tuned pretrained body, shaped as itfits' models (body, head) so that forward_features gives
    [its pooled output | the pooled input of its last stage] (the head's dummy Linear gives meaningless logits)."""
    body, nf = create_body(get_spec(arch), weights="auto")
    return nn.Sequential(body, nn.Sequential(nn.Identity(), nn.Linear(nf, 2))).eval()


def subset(set_dir: Path, per_class: int | None) -> Path:
    """set_dir, or a copy of it (symlinks) whose fit/ keeps the first `per_class` training files of each class and a
    quarter as many validation files: the same set with less data."""
    if not per_class:
        return set_dir
    out = set_dir.parent / f"{set_dir.name}-n{per_class}"
    for split, n in (("train", per_class), ("valid", max(2, per_class // 4))):
        for cls in sorted(d for d in (set_dir / "fit" / split).iterdir() if d.is_dir()):
            (out / "fit" / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:n]:
                link = out / "fit" / split / cls.name / f.name
                if not link.exists():
                    link.symlink_to(f)
    for split in ("test", "near", "far"):
        if not (out / split).exists():
            (out / split).symlink_to(set_dir / split)
    return out


def train_and_dump(set_dir: Path, run: Path, *, audio: bool, size: int, seed: int, epochs: int,
                   arch: str = "auto") -> dict:
    """Fit with the defaults (cached by run folder), then every split's outputs from the bundle and the reference."""
    cache = run / "outputs.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        out["meta"] = json.loads((run / "suite_run.json").read_text())
        return out
    if not (run / "model").is_dir():  # else a run whose outputs were not dumped yet: its bundle is kept
        fit(FitConfig(data=str(set_dir / "fit"), out=str(run), size=size, seed=seed, epochs=epochs, arch=arch),
            log=lambda *a: None)
    summary = json.loads((run / "run.json").read_text())
    fit_seconds = summary["results"]["seconds"]
    bundle = load_bundle(run / "model")
    prep = ImagePreprocessing.from_json(bundle.meta["preprocessing"])
    ref = reference_model(bundle.meta["backbone"])
    classes, exts, calib = bundle.classes, AUDIO_EXTS if audio else IMAGE_EXTS, bundle.calibration
    out = {}
    torch.manual_seed(0)
    for split in SPLITS:
        folder = set_dir / "fit" / split if split in ("train", "valid") else set_dir / split
        paths, labels = files(folder, exts)
        # the bundle as itfits predict runs it: [head | stage | its reference's stage, where it has one]
        kinds = dict(modality=bundle.modality, options=bundle.options, num_workers=0)
        logits, feats, errors = file_outputs(bundle.scoring_model, prep, paths, **kinds)
        _, ref_feats, _ = file_outputs(ref, prep, paths, **kinds)
        assert not any(errors), (split, [e for e in errors if e][:3])
        out[f"{split}_logits"], out[f"{split}_ref"] = logits, ref_feats
        out[f"{split}_bundle_feats"] = feats
        out[f"{split}_feats"] = feats[:, :feats.shape[1] - calib.stats.ref_dim]  # the fine-tuned model's own
        out[f"{split}_y"] = np.array([classes.index(c) if c in classes else -1 for c in labels])
    meta = {"temperature": calib.temperature, "head_dim": calib.stats.head_dim,
            "ref_dim": int(ref[1][1].in_features), "fit_seconds": round(fit_seconds, 1),
            "valid_accuracy": summary["results"]["valid_accuracy"], "bs": summary["resolved"]["bs"],
            "lr": summary["resolved"]["lr"], "arch": bundle.meta["backbone"], "n_train": summary["resolved"]["n_train"]}
    # the bundle's own scores (its statistics, as itfits predict computes them)
    for split in ("valid", "test", "near", "far"):
        s = U.compute_scores(out[f"{split}_logits"], out.pop(f"{split}_bundle_feats"), temperature=calib.temperature,
                             stats=calib.stats, names=calib.scores)
        for name in ("knn", "mahalanobis", "combined", "pretrained_mahalanobis"):
            if name in s:
                out[f"{split}_bundle_{name}"] = s[name]
    np.savez(cache, **out)
    (run / "suite_run.json").write_text(json.dumps(meta))
    out["meta"] = meta
    return out


# ---- candidate scores: fit on training items, score any rows; higher = more likely known ----------------------

def _l2(x):
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def _shrunk_precision(centred: np.ndarray, shrink: float) -> np.ndarray:
    cov = centred.T @ centred / max(1, len(centred) - 1)
    d = cov.shape[0]
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / d * np.eye(d)
    return np.linalg.inv(cov)


def _quad(x, prec):
    return ((x @ prec) * x).sum(1)  # (N,) x_i^T P x_i


class Maha:
    """Mahalanobis with a shared covariance; `normalise`: on L2-normalised features (Mahalanobis++, Mueller & Hein
    2025); `relative`: minus the distance under one Gaussian of all training items (Ren et al. 2021)."""

    def __init__(self, x, y, *, normalise=True, relative=False, shrink=0.1):
        x = _l2(x) if normalise else x
        self.normalise, self.relative = normalise, relative
        classes = np.unique(y)
        self.means = np.stack([x[y == c].mean(0) for c in classes])
        self.prec = _shrunk_precision(x - self.means[np.searchsorted(classes, y)], shrink)
        if relative:
            self.mean0 = x.mean(0)
            self.prec0 = _shrunk_precision(x - self.mean0, shrink)

    def __call__(self, x):
        x = _l2(x) if self.normalise else x
        d = np.stack([_quad(x - m, self.prec) for m in self.means], 1)
        if self.relative:
            d = d - _quad(x - self.mean0, self.prec0)[:, None]
        return -d.min(1)


class KNN:
    def __init__(self, x, y, k=5):
        self.bank, self.k = _l2(x).astype(np.float32), k

    def __call__(self, x):
        sims = _l2(x).astype(np.float32) @ self.bank.T
        return np.sort(sims, 1)[:, -self.k]


def feature_space(d: dict, split: str, space: str) -> np.ndarray:
    head = d["meta"]["head_dim"]
    ref = d["meta"]["ref_dim"]
    return {"head": d[f"{split}_feats"][:, :head], "stage": d[f"{split}_feats"][:, head:],
            "ref": d[f"{split}_ref"][:, :ref], "ref_stage": d[f"{split}_ref"][:, ref:]}[space]


FEATURE_SCORES = {  # name -> (feature space, scorer class, kwargs)
    "knn_head": ("head", KNN, {}),
    "maha++_head": ("head", Maha, {}),
    "rmaha_head": ("head", Maha, {"relative": True, "normalise": False}),
    "knn_ref": ("ref", KNN, {}),
    "maha++_ref": ("ref", Maha, {}),
    "maha_ref": ("ref", Maha, {"normalise": False}),
    "rmaha_ref": ("ref", Maha, {"relative": True, "normalise": False}),
    "rmaha++_ref": ("ref", Maha, {"relative": True}),
    "knn_ref_stage": ("ref_stage", KNN, {}),
    "maha++_ref_stage": ("ref_stage", Maha, {}),
}
LOGIT_SCORES = ("max_softmax", "max_logit", "energy")
BUNDLE_SCORES = ("bundle_knn", "bundle_mahalanobis", "bundle_combined", "bundle_pretrained_mahalanobis")
SUMS = {  # standardised on the validation items, then added
    "maha++_ref+msp": ("maha++_ref", "max_softmax_log"),
    "knn_ref+msp": ("knn_ref", "max_softmax_log"),
    "maha++_ref+knn_ref": ("maha++_ref", "knn_ref"),
    "maha++_ref+maha++_head": ("maha++_ref", "maha++_head"),
    "maha++_ref+combined": ("maha++_ref", "bundle_combined"),
    "maha++_ref+maha++_head+msp": ("maha++_ref", "maha++_head", "max_softmax_log"),
    "maha++_ref_stage+msp": ("maha++_ref_stage", "max_softmax_log"),
    "maha++_ref_stage+combined": ("maha++_ref_stage", "bundle_combined"),
}
REF_ONLY = {n for n, (space, _, _) in FEATURE_SCORES.items() if space.startswith("ref")}


def all_scores(d: dict) -> dict[str, dict[str, np.ndarray]]:
    """{candidate: {split: scores}} for valid, test, near, far (and cross-fitted `train_cv` for reference-only)."""
    t = d["meta"]["temperature"]
    out: dict[str, dict] = {}
    for split in ("valid", "test", "near", "far"):
        s = U.compute_scores(d[f"{split}_logits"], None, temperature=t, stats=None, names=LOGIT_SCORES)
        s["max_softmax_log"] = np.log(np.clip(s["max_softmax"], 1e-30, None))
        for n in BUNDLE_SCORES:
            if f"{split}_{n}" in d:  # bundle_pretrained_mahalanobis: runs trained since the reference body
                s[n] = d[f"{split}_{n}"]
        for n, v in s.items():
            out.setdefault(n, {})[split] = v
    y = d["train_y"]
    for name, (space, cls, kw) in FEATURE_SCORES.items():
        scorer = cls(feature_space(d, "train", space), y, **kw)
        out[name] = {split: scorer(feature_space(d, split, space)) for split in ("valid", "test", "near", "far")}
        if name in REF_ONLY:  # out-of-fold scores of the known train + valid items: the pretrained body never saw them
            x = np.concatenate([feature_space(d, "train", space), feature_space(d, "valid", space)])
            yy = np.concatenate([y, d["valid_y"]])
            folds = np.random.default_rng(0).permutation(len(x)) % 5
            cv = np.empty(len(x))
            for f in range(5):
                cv[folds == f] = cls(x[folds != f], yy[folds != f], **kw)(x[folds == f])
            out[name]["train_cv"] = cv
    for name, parts in SUMS.items():
        mu = [out[p]["valid"].mean() for p in parts]
        sd = [max(out[p]["valid"].std(), 1e-9) for p in parts]
        out[name] = {split: sum((out[p][split] - m) / s for p, m, s in zip(parts, mu, sd))
                     for split in ("valid", "test", "near", "far")}
    del out["max_softmax_log"]
    return out


def evaluate_scores(d: dict) -> dict[str, dict]:
    """Per candidate: AUROC / FPR95 near and far; kept (correct known test items) and rejected (near, far) at the
    rule's threshold: keep 0.95 of the correct validation items, and for reference-only scores also keep 0.95 of
    the cross-fitted known items (train + valid: 5x as many)."""
    scores = all_scores(d)
    v_correct = d["valid_logits"].argmax(1) == d["valid_y"]
    t_correct = d["test_logits"].argmax(1) == d["test_y"]
    res = {}
    for name, s in scores.items():
        r = {}
        for kind in ("near", "far"):
            r[f"auroc_{kind}"] = U.auroc(s["test"], s[kind])
            r[f"fpr95_{kind}"] = U.fpr_at_tpr(s["test"], s[kind])
        rules = {"valid": U.choose_threshold(s["valid"], v_correct, KEEP)}
        if "train_cv" in s:
            rules["cv"] = U.threshold_for_share(s["train_cv"], KEEP)
            rules.update({f"cv@{k}": U.threshold_for_share(s["train_cv"], k) for k in KEEP_SWEEP})
        for rule, th in rules.items():
            r[f"kept_{rule}"] = float((s["test"][t_correct] >= th).mean())
            for kind in ("near", "far"):
                r[f"rejected_{kind}_{rule}"] = float((s[kind] < th).mean())
        res[name] = r
    return res


SHIPPED_KEEPS = (0.9, 0.95, 0.99)  # --keep values the library's own rule is measured at


def shipped_rule(d: dict) -> dict:
    """The library's own calibration (calibration.calibrate_outputs, as `itfits fit` runs it) on this run's outputs,
    at each of SHIPPED_KEEPS: kept (correct known test items accepted), near and far rejected, and the fit-time
    leave-one-class-out estimates: of the near rejection (`loco_lookalike`; `loco_caught` over all held-out
    classes) and of kept (`loco_kept`)."""
    from types import SimpleNamespace
    from pipelines.calibration import calibrate_outputs
    ref = d["meta"]["ref_dim"]
    feats = {s: np.concatenate([d[f"{s}_feats"], d[f"{s}_ref"][:, ref:]], 1) for s in SPLITS}
    n_classes = int(d["train_y"].max()) + 1
    t_correct = d["test_logits"].argmax(1) == d["test_y"]
    out = {}
    for keep in SHIPPED_KEEPS:
        config = SimpleNamespace(seed=0, keep=keep, score=None, threshold="auto")
        cal, report = calibrate_outputs(config, n_classes, valid=(d["valid_logits"], feats["valid"], d["valid_y"]),
                                        train=(feats["train"], d["train_y"]), unknown=None,
                                        head_dim=d["meta"]["head_dim"], default_score=U.DEFAULT_SCORE,
                                        ref_dim=d[f"train_ref"].shape[1] - ref)
        applied = {s: cal.apply(d[f"{s}_logits"], feats[s]) for s in ("test", "near", "far")}
        flags = {s: a[2] for s, a in applied.items()}
        out.update({f"auroc_{s}": U.auroc(applied["test"][1], applied[s][1]) for s in ("near", "far")})
        loco = report.get("leave_class_out") or {}
        out.update({f"kept@{keep}": float((~flags["test"][t_correct]).mean()),
                    f"near_rejected@{keep}": float(flags["near"].mean()),
                    f"far_rejected@{keep}": float(flags["far"].mean()),
                    f"loco_caught@{keep}": loco.get("caught", float("nan")),
                    f"loco_lookalike@{keep}": loco.get("caught_lookalike", float("nan")),
                    f"loco_kept@{keep}": loco.get("kept", float("nan"))})
        if keep == 0.95:
            out["temperature"] = cal.temperature
            out["temperature_note"] = report.get("temperature_note", "")
    return out


def mean_over(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in rows[0]}


def table(per_set: dict[str, dict], names: list[str], cols: list[str]) -> str:
    """Markdown: one row per candidate; the mean over sets and the worst set of each column."""
    lines = ["| score | " + " | ".join(f"{c} mean | {c} worst" for c in cols) + " |",
             "|---|" + "---|" * (2 * len(cols))]
    for n in names:
        cells = []
        for c in cols:
            vals = {s: r[n][c] for s, r in per_set.items() if c in r[n]}
            if not vals:
                cells += ["", ""]
                continue
            worst = min(vals, key=vals.get) if not c.startswith("fpr") else max(vals, key=vals.get)
            cells += [f"{np.mean(list(vals.values())):.3f}", f"{vals[worst]:.3f} ({worst})"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=",".join(suite_sets.SETS))
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="size 64, seed 0, 3 epochs, sets fashion,glyphs,icons,speech")
    ap.add_argument("--plain", action="store_true", help="also train the plain fastai recipe (issue 16) on each split")
    ap.add_argument("--arch", default="auto", help="itfits fit --arch")
    ap.add_argument("--per-class", type=int, default=None, help="train on the first N files of each class")
    ap.add_argument("--known-per-class", type=int, default=None,
                    help="build the sets with N train+valid files of each known class (default: suite_sets.COUNTS; "
                         "give another ITFITS_BENCH_CACHE, or the standard sets are rebuilt)")
    ap.add_argument("--suggestion", default=None, help="the lr_find suggestion fit uses (default: itfits')")
    ap.add_argument("--frozen-stages", type=int, default=None,
                    help="stages fine-tuning keeps pretrained (default: the backbone's BackboneSpec.frozen_stages)")
    ap.add_argument("--out", default="runs/unknown_suite")
    args = ap.parse_args()
    if args.frozen_stages is not None:  # the registry is what image_learner reads
        from dataclasses import replace
        from pipelines.backbones import BACKBONES
        BACKBONES.update({n: replace(s, frozen_stages=args.frozen_stages)
                          for n, s in BACKBONES.items() if s.frozen_stages})
    if args.suggestion:  # find_lr reads the module's constant at each call
        import pipelines.training
        pipelines.training.CHOSEN_SUGGESTION = args.suggestion
    if args.quick:
        args.sets, args.sizes, args.seeds, args.epochs = "fashion,glyphs,icons,speech", "64", "0", 3
    pools: dict = {}
    runs = {}
    for name in args.sets.split(","):
        counts = {**suite_sets.counts_of(name), "train": args.known_per_class or suite_sets.counts_of(name)["train"]}
        set_dir = subset(suite_sets.build(name, counts=counts, pools=pools), args.per_class)
        for size in map(int, args.sizes.split(",")):
            for seed in map(int, args.seeds.split(",")):
                tags = ((f"-{args.arch}" if args.arch != "auto" else "")
                        + (f"-n{args.per_class}" if args.per_class else "")
                        + (f"-{args.suggestion}" if args.suggestion else "")
                        + (f"-frozen{args.frozen_stages}" if args.frozen_stages is not None else ""))
                run = Path(args.out) / f"{name}-{size}px-e{args.epochs}-seed{seed}{tags}"
                d = train_and_dump(set_dir, run, audio=name in suite_sets.AUDIO_SETS, size=size, seed=seed,
                                   epochs=args.epochs, arch=args.arch)
                acc = float((d["test_logits"].argmax(1) == d["test_y"]).mean())
                runs[run.name] = {"set": name, "size": size, "seed": seed, "test_accuracy": acc, **d["meta"],
                                  "scores": evaluate_scores(d), "shipped": shipped_rule(d)}
                if args.plain:
                    plain = plain_recipe(set_dir, run, audio=name in suite_sets.AUDIO_SETS, size=size, seed=seed,
                                         epochs=args.epochs)
                    runs[run.name].update(plain_test_accuracy=plain["test_accuracy"], plain_seconds=plain["seconds"])
                print(f"{run.name}: test accuracy {acc:.3f}, fit {d['meta']['fit_seconds']} s", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(runs, indent=1))
    report(runs)


def report(runs: dict) -> None:
    names = [n for n in next(iter(runs.values()))["scores"] if all(n in r["scores"] for r in runs.values())]
    for size in sorted({r["size"] for r in runs.values()}):
        per_set = {}  # set -> candidate -> metrics averaged over seeds
        for s in dict.fromkeys(r["set"] for r in runs.values()):
            rs = [r for r in runs.values() if r["set"] == s and r["size"] == size]
            if rs:
                per_set[s] = {n: mean_over([r["scores"][n] for r in rs]) for n in names}
        kinds = {"image": [s for s in per_set if s not in suite_sets.AUDIO_SETS],
                 "audio": [s for s in per_set if s in suite_sets.AUDIO_SETS]}
        for kind, sets in kinds.items():
            if not sets:
                continue
            sub = {s: per_set[s] for s in sets}
            print(f"\n### {kind} sets at {size} px ({', '.join(sets)}); mean and worst set over seeds\n")
            print(table(sub, names, ["auroc_near", "auroc_far", "fpr95_near", "fpr95_far"]))
            print()
            print(table(sub, names, ["kept_valid", "rejected_near_valid", "rejected_far_valid", "kept_cv",
                                     "rejected_near_cv", "rejected_far_cv"]))
        sweep = "maha++_ref_stage"  # the default score, pretrained_mahalanobis, as the suite recomputes it
        print(f"\n### {sweep} at other --keep values (cross-fitted rule), {size} px: mean (worst set)\n")
        print("| keep | kept | near rejected | far rejected |\n|---|---|---|---|")
        for k in KEEP_SWEEP:
            cells = []
            for c in (f"kept_cv@{k}", f"rejected_near_cv@{k}", f"rejected_far_cv@{k}"):
                vals = {s: r[sweep][c] for s, r in per_set.items()}
                worst = min(vals, key=vals.get)
                cells.append(f"{np.mean(list(vals.values())):.3f} ({vals[worst]:.3f} {worst})")
            print(f"| {k} | " + " | ".join(cells) + " |")
        print(f"\n### the shipped rule (the library's calibration), {size} px: kept (correct known test items) "
              f"at each --keep; near rejected and its leave-one-class-out estimate at 0.95; far rejected at 0.95\n")
        print("| set | " + " | ".join(f"kept@{k}" for k in SHIPPED_KEEPS)
              + " | near rejected | LOCO look-alikes | LOCO all classes | LOCO kept | far rejected |\n|---|"
              + "---|" * (len(SHIPPED_KEEPS) + 5))
        for s in per_set:
            rs = [x["shipped"] for x in runs.values() if x["set"] == s and x["size"] == size]
            cols = [f"kept@{k}" for k in SHIPPED_KEEPS] + ["near_rejected@0.95", "loco_lookalike@0.95",
                                                          "loco_caught@0.95", "loco_kept@0.95", "far_rejected@0.95"]
            print(f"| {s} | " + " | ".join(f"{np.mean([x[c] for x in rs]):.3f}" for c in cols) + " |")
        if all("plain_test_accuracy" in r for r in runs.values()):
            print(f"\n### test accuracy and seconds to train at {size} px, mean over seeds\n")
            print("| set | itfits | plain fastai recipe | itfits s | recipe s |\n|---|---|---|---|---|")
            for s in per_set:
                rs = [x for x in runs.values() if x["set"] == s and x["size"] == size]
                print(f"| {s} | " + " | ".join(f"{np.mean([x[c] for x in rs]):.{p}f}" for c, p in (
                    ("test_accuracy", 3), ("plain_test_accuracy", 3), ("fit_seconds", 0), ("plain_seconds", 0))) + " |")
        print(f"\n### per set at {size} px: AUROC near / far\n")
        pick = ["max_softmax", "bundle_combined", "maha++_ref", "rmaha_ref", "maha++_ref_stage",
                "maha++_ref_stage+combined"]
        print("| set | test accuracy | " + " | ".join(pick) + " |\n|---|---|" + "---|" * len(pick))
        for s, r in per_set.items():
            acc = np.mean([x["test_accuracy"] for x in runs.values() if x["set"] == s and x["size"] == size])
            print(f"| {s} | {acc:.3f} | " + " | ".join(f"{r[n]['auroc_near']:.2f} / {r[n]['auroc_far']:.2f}"
                                                       for n in pick if n in r) + " |")


if __name__ == "__main__":
    main()
