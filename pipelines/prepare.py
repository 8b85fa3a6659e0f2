"""The data stages of a run: files (images, or audio clips rendered to spectrogram windows) or a table -> checked,
split items -> fastai DataLoaders, with the skipped inputs listed in RUN/skipped.csv."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.torch_core import default_device, set_seed

from .backbones import auto_arch, get_spec
from .balance import Balance, choose_balance, no_balance
from .distributed import is_main
from .errors import ItfitsError
from .images import OUTLIER, ImagePreprocessing, choose_batch_size, image_dataloaders
from .io import write_table
from .learners import OUTLIER_WEIGHT, tabular_learner
from .multilabel import label_classes, label_counts
from .sources import expand_inputs, has_files, require_classes
from .training import auto_epochs
from .tabular import TabularData, TabularModelSpec, prepare_table

if TYPE_CHECKING:
    from .modality import Modality
    from .run import FitConfig


@dataclass(frozen=True)
class Prepared:
    """The data of a run of files, ready for a Learner: images, or audio clips rendered to spectrogram images."""
    files: pl.DataFrame  # one row per input file: path, label, split, error (set for skipped files)
    classes: list[str]
    prep: ImagePreprocessing
    bs: int
    dls: object  # fastai DataLoaders over the images the Learner sees (audio: one per window of a clip)
    arch: str  # the backbone: --arch, or what `--arch auto` chose
    arch_why: str | None  # why auto chose it (None: --arch named it)
    epochs: int  # unfrozen epochs: --epochs, or training.auto_epochs by the data size
    epochs_why: str | None  # why (None: --epochs gave them)
    options: object = None  # the modality's options resolved from the data (audio: the MelConfig), for the bundle
    n_outliers: int = 0  # --outlier-exposure: training items of none of the classes (audio: windows)
    balance: Balance | None = None  # what the run does about its class counts (--balance)
    multi_label: bool = False  # files may have several classes, or none (multilabel.py)


def prepare_data(modality: Modality, config: FitConfig, run: Path, log=print) -> Prepared:
    """Read, check (audio: render) and split config.data, files of `modality`; skipped files listed in
    run/skipped.csv."""
    if config.arch != "auto":
        get_spec(config.arch)  # fail on a wrong name before reading any file
    modality.check_config(config)
    files, items, options = modality.read_items(config, log)
    multi = "labels" in files.columns
    if multi and not modality.multi_label:
        raise ItfitsError(f"multi-label training (a labels column, or --multi-label) is for images; {config.data} "
                          f"holds {modality.what}")
    if multi and (config.outlier_exposure or config.balance in ("weights", "sampler")):
        raise ItfitsError(f"{'--outlier-exposure' if config.outlier_exposure else '--balance ' + config.balance} is "
                          "for single-label runs; a multi-label run learns none of the classes from files with an "
                          "empty labels cell")
    if config.unknown and not has_files(Path(config.unknown), modality.exts):  # before training
        raise ItfitsError(f"--unknown {config.unknown} holds no {modality.what}; it takes examples of the same kind as "
                          f"DATA, {config.data}")
    outliers = outlier_items(modality, config, options, log) if config.outlier_exposure else None
    if is_main():  # data-parallel runs: rank 0 alone writes the run folder
        write_table(files.filter(pl.col("error").is_not_null()).select("path", "label", "error"), run / "skipped.csv")
    classes = label_classes(files) if multi else require_classes(files)
    train = items.filter(pl.col("error").is_null() & (pl.col("split") == "train"))
    n_train = train.height
    arch, arch_why = auto_arch(n_train, config.weights) if config.arch == "auto" else (config.arch, None)
    epochs, epochs_why = auto_epochs(n_train) if config.epochs is None else (config.epochs, None)
    spec = get_spec(arch)
    prep = ImagePreprocessing(size=config.size or spec.input_size, mean=spec.mean, std=spec.std)
    bs = config.bs or choose_batch_size(n_train)
    # counted on what the Learner trains on: images, or audio windows (a long clip gives many)
    counts = dict(train.group_by("label").len().iter_rows())
    balance = (no_balance(label_counts(items, classes), "multi-label: each class is a yes/no output of its own")
               if multi else choose_balance({c: counts.get(c, 0) for c in classes}, config.balance))
    dls = image_dataloaders(items, classes=classes, prep=prep, bs=bs, augment=modality.augment,
                            num_workers=config.num_workers, outliers=outliers, load=modality.load,
                            weigh=balance.item_weights, multi_label=multi)
    return Prepared(files=files, classes=classes, prep=prep, bs=bs, dls=dls, arch=arch, arch_why=arch_why,
                    epochs=epochs, epochs_why=epochs_why,
                    options=options, n_outliers=0 if outliers is None else outliers.height, balance=balance,
                    multi_label=multi)


def outlier_items(modality: Modality, config: FitConfig, options, log=print) -> pl.DataFrame:
    """The usable --unknown files as training items of no class (`--outlier-exposure`), audio rendered to windows."""
    paths = [p for p, err in expand_inputs([config.unknown], modality.exts) if err is None]
    items = pl.DataFrame({"path": paths, "label": OUTLIER, "split": "train", "error": None},
                         schema={"path": pl.String, "label": pl.String, "split": pl.String, "error": pl.String})
    items = modality.usable(items, options, config).filter(pl.col("error").is_null())
    log(f"outlier exposure: {items.height} --unknown {modality.train_unit.strip() or 'files'} join training as none "
        f"of the classes (loss: cross-entropy to uniform class probabilities, weight {OUTLIER_WEIGHT})")
    return items


def read_training_table(config: FitConfig, run: Path) -> TabularData:
    """The rows of a tabular run (fit and lr-find) read, split and encoded once for every learner; skipped rows
    listed in run/skipped.csv, the first file written into `run`: a table that fails its checks leaves no run
    folder."""
    data = prepare_table(config.data, target=config.target, cat=config.cat or (), cont=config.cont or (),
                         ignore=config.ignore or (), valid_pct=config.valid_pct, seed=config.seed)
    write_table(data.skipped, run / "skipped.csv")
    return data


def nn_learner(data: TabularData, config: FitConfig, run: Path):
    """(batch size, fastai Learner) of fastai's TabularModel on `data`."""
    bs = config.bs or choose_batch_size(int((~data.valid).sum()), largest=1024)
    set_seed(config.seed)
    dls = tabular_dataloaders(data, bs=bs, device=default_device())  # fastai's default; None kept it on the CPU
    learn = tabular_learner(dls, TabularModelSpec.for_data(data.prep, config.layers), path=run,
                            regression=data.prep.task == "regression", target_std=data.prep.target_std)
    return bs, learn


def prepare_tabular(config: FitConfig, run: Path):
    """(TabularData, bs, learner): `read_training_table`, then `nn_learner`."""
    data = read_training_table(config, run)
    return (data, *nn_learner(data, config, run))


class TabularTensors(torch.utils.data.Dataset):
    """(x_cat, x_cont, y) tensors; indexing with a tensor of row numbers gives a whole batch."""
    n_inp = 2  # fastai: the first two are the model's inputs, the last the target

    def __init__(self, x_cat: np.ndarray, x_cont: np.ndarray, y: np.ndarray):
        self.tensors = (torch.as_tensor(x_cat), torch.as_tensor(x_cont), torch.as_tensor(y))

    def __len__(self):
        return len(self.tensors[2])

    def __getitem__(self, idx):
        return tuple(t[idx] for t in self.tensors)


class TensorBatches(DataLoader):
    """A fastai DataLoader that takes each batch with one index (as fastai's TabDataLoader does with
    DataFrame.iloc): no per-row Python and no collate, so an epoch over a million rows stays cheap."""

    def do_item(self, s):
        return s  # keep the row number; create_batch reads the rows

    def create_batch(self, b):
        return self.dataset[torch.as_tensor(b)]

    def retain(self, res, b):
        return res


def tabular_dataloaders(data: TabularData, *, bs: int, device=None) -> DataLoaders:
    """fastai DataLoaders over the train (shuffled, last partial batch dropped for BatchNorm) and valid rows."""
    train, valid = TabularTensors(*data.part(False)), TabularTensors(*data.part(True))
    bs = max(2, min(bs, len(train)))
    return DataLoaders(TensorBatches(train, bs=bs, shuffle=True, drop_last=True),
                       TensorBatches(valid, bs=2 * bs), device=device)
