"""`itfits predict --engine ray`: the same `Predictor` as the local engine, run by Ray Data's `map_batches` on a
local Ray instance or across a cluster, writing Parquet part files from the workers.

The driver lists the inputs (as the local engine does: `expand_inputs`), or hands a table to Ray Data's readers,
and never holds the predictions: each actor loads the bundle once, and `write_parquet` streams its rows to files
(no driver-side collect). Ray is an optional extra (`pip install -e '.[ray]'`) and is imported here only.
"""
from __future__ import annotations

import os
import re
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path

import polars as pl

from .batches import TTA_IMAGES_ONLY
from .bundle import load_bundle
from .errors import ItfitsError
from .io import atomic_dir, atomic_path, temp_prefix
from .predict import PredictConfig, Predictor
from .sources import expand_inputs, table_columns

INSTALL = "--engine ray needs Ray, an optional extra: pip install -e '.[ray]' (in the itfits folder)"
TABLE_BATCH = 8192  # table rows per batch through the model
# Reads and writes ask for no core (num_cpus=0): where every core holds an actor (the default), a read or write task
# waiting for a core runs only once the actors are done (seen on 2 cores: a CSV of paths stalled; every prediction
# held in the object store before the first write). Reading and writing are I/O; the actors do the work.
IO_CPUS = 0


def import_ray(*, local: bool = False):
    """ray and ray.data, or the ItfitsError that says how to install them. `local`: Ray is to run on this machine
    alone (no --address), so it binds to 127.0.0.1: Ray reads that switch when it is imported."""
    # Ray sends usage statistics to its makers unless told not to: nothing leaves this machine unasked
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if local:  # else Ray swaps 127.0.0.1 for this machine's network address and listens on every interface
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    elif "RAY_AUTH_MODE" not in os.environ and _has_token():
        # `ray start` turns token authentication on where a token is at hand, but a driver joining with ray.init
        # does not send it unless told to: it would retry for 30 s, then fail
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ItfitsError(INSTALL) from e
    return ray


def _has_token() -> bool:
    """Whether a Ray authentication token is at hand where Ray looks for one."""
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(
        os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").is_file()


def start_ray(address: str | None, *, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address`, or start a Ray instance on this machine's cores, bound to 127.0.0.1 (no
    other machine can join it). Returns whether this call started Ray (then the caller shuts it down)."""
    ray = import_ray(local=not address)
    if ray.is_initialized():
        return False
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as e:  # it answers, but not as a Ray cluster that lets us in
            raise ItfitsError(f"--address {address}: cannot join the Ray cluster there ({e}); where it uses token "
                              "authentication, give this machine its token (RAY_AUTH_TOKEN or ~/.ray/auth_token)") from e
    else:
        # "local": a new instance, always (without it Ray joins the last `ray start` cluster of this machine)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def _check_reachable(address: str) -> None:
    """An ItfitsError at once when nothing listens at a HOST:PORT address (ray.init would retry for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # "auto", ray://...: Ray's to resolve
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise ItfitsError(f"--address {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
                          "ray start --head on that machine, or leave --address out to run on this one") from e


def _listed(inputs: list[str], exts: set[str], *, block: int):
    """A dataset of (path, error): the files and folders expand_inputs lists, in blocks of `block` rows (a batch:
    blocks are what Ray hands out to the actors)."""
    import pyarrow as pa
    import ray.data
    items = expand_inputs(inputs, exts)
    schema = pa.schema([("path", pa.large_string()), ("error", pa.large_string())])
    blocks = [pa.Table.from_pylist([{"path": p, "error": e} for p, e in items[i:i + block]], schema=schema)
              for i in range(0, len(items), block)]
    return ray.data.from_arrow(blocks)


def _table_reader(path: Path, *, columns: list[str] | None = None):
    """Ray Data's reader for a CSV (every column as text: types inferred block by block could differ between
    blocks, and a model column's bad value must become a row error, not a failed read) or a Parquet file."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import ray.data
    if path.suffix.lower() == ".parquet":
        return ray.data.read_parquet(str(path), columns=columns, num_cpus=IO_CPUS)
    names = table_columns(path)
    convert = pacsv.ConvertOptions(column_types={n: pa.large_string() for n in names}, include_columns=columns)
    return ray.data.read_csv(str(path), convert_options=convert, num_cpus=IO_CPUS)


def _resolve_paths(base: str):
    """A batch of a table of paths -> (path, error): relative paths are relative to the table's folder, as in
    `itfits fit paths.csv`; an empty cell is an error row."""
    def resolve(batch):
        import pyarrow as pa
        paths = [None if p is None else str(p).strip() for p in batch.column("path").to_pylist()]
        out = [os.path.join(base, p) if p else "" for p in paths]
        errors = [None if p else "empty path cell" for p in paths]
        return pa.table({"path": pa.array(out, pa.large_string()), "error": pa.array(errors, pa.large_string())})
    return resolve


def input_dataset(inputs: list[str], *, tabular: bool, exts: set[str], block: int = 64):
    """The dataset to predict: a table's rows (tabular bundles), or files as (path, error). A .csv/.parquet input
    of an image or audio bundle is a list of files in its `path` column, read by Ray Data's readers."""
    if tabular:
        if len(inputs) != 1:
            raise ItfitsError(f"a tabular model predicts one table at a time, got {len(inputs)} inputs: "
                              "itfits predict MODEL rows.csv --out preds/ --engine ray")
        return _table_reader(Path(inputs[0]))
    parts, listed = [], []
    for given in inputs:
        p = Path(given)
        if p.is_file() and p.suffix.lower() in (".csv", ".parquet"):
            if "path" not in table_columns(p):
                raise ItfitsError(f"{p} has no `path` column; a table of files to predict lists them in one")
            reader = _table_reader(p, columns=["path"])
            parts.append(reader.map_batches(_resolve_paths(str(p.resolve().parent)), batch_format="pyarrow"))
        else:
            listed.append(given)
    if listed or not parts:
        parts.insert(0, _listed(listed, exts, block=block))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _workers(gpus_per_worker: float, concurrency: int | None) -> int:
    """--concurrency, or as many actors as the cluster has GPUs (with --gpus-per-worker) or CPUs for."""
    import ray
    if concurrency is not None:
        return concurrency
    resources = ray.cluster_resources()
    if gpus_per_worker:
        return max(1, int(resources.get("GPU", 0) // gpus_per_worker))
    return max(1, int(resources.get("CPU", 1)))


def _user_error(e: BaseException) -> ItfitsError | None:
    """The ItfitsError an actor raised, from the exceptions Ray wraps it in (which keep it as an object, or only in
    their traceback text: a pickled exception loses its __cause__), or None."""
    seen, text = set(), str(e)
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ItfitsError):
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    found = re.findall(r"ItfitsError: (.+)", text)
    return ItfitsError(found[-1].strip()) if found else None


def count_rows(parquet: Path) -> dict[str, int]:
    """files (rows), unknown and errors of written predictions: a file or a folder of part files, read one
    column at a time."""
    if parquet.is_dir() and not any(parquet.glob("*.parquet")):  # no rows: Ray writes no part file
        return {"files": 0, "unknown": 0, "errors": 0}
    scan = pl.scan_parquet(str(parquet / "*.parquet") if parquet.is_dir() else str(parquet))
    got = scan.select(pl.len().alias("files"), pl.col("unknown").fill_null(False).sum().alias("unknown"),
                      pl.col("error").is_not_null().sum().alias("errors")).collect()
    return {k: int(v) for k, v in got.row(0, named=True).items()}


def merge_parts(folder: Path, out) -> None:
    """The part files in `folder` -> one Parquet file `out`, one row group at a time (memory holds one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    parts = sorted(folder.glob("*.parquet"))
    schema = pa.unify_schemas([pq.read_schema(p) for p in parts], promote_options="permissive") if parts else None
    if schema is None:
        raise ItfitsError("nothing to predict: the inputs hold no files or rows")
    with pq.ParquetWriter(str(out), schema) as writer:
        for p in parts:
            f = pq.ParquetFile(p)
            for i in range(f.num_row_groups):
                writer.write_table(f.read_row_group(i).cast(schema))


def predict_on_ray(model: str | Path, inputs: list[str], out: str | Path, config: PredictConfig = PredictConfig(), *,
                   address: str | None = None, concurrency: int | None = None, gpus_per_worker: float = 0,
                   num_cpus: int | None = None) -> dict[str, int]:
    """Predict `inputs` with the bundle `model` on Ray; write Parquet: a folder of part files, or one file when
    `out` ends in .parquet (both atomically). Returns counts (files, unknown, errors). `num_cpus`: the cores of a
    Ray instance started here (default: all)."""
    bundle = load_bundle(model)  # here first: a bad bundle is one error line, not a failure in every actor
    tabular = not bundle.modality.row_per_file  # rows of tables, not files
    if config.tta and not bundle.modality.tta:  # before starting Ray; the local engine's words
        raise ItfitsError(TTA_IMAGES_ONLY)
    if concurrency is not None and concurrency < 1 or gpus_per_worker < 0:
        raise ItfitsError("--concurrency must be at least 1 and --gpus-per-worker at least 0")
    out = Path(out)
    if out.suffix.lower() != ".parquet" and out.is_dir() and any(not f.name.endswith(".parquet") for f in out.iterdir()):
        raise ItfitsError(f"--out {out} is a folder that holds other files than Parquet parts; the predictions "
                          "replace the folder whole: give a new folder, or a .parquet file")
    started = start_ray(address, num_cpus=num_cpus)
    from ray.data import ActorPoolStrategy
    try:
        ds = input_dataset(inputs, tabular=tabular, exts=bundle.input_exts, block=config.batch_size)
        # Ray hands an actor one batch per call, and DataLoader workers would start afresh at every call: decode in
        # the actor (image_batches' thread pool takes over where decoding is slow), unless --workers says otherwise
        options = {**asdict(config), "num_workers": 0 if config.num_workers is None else config.num_workers}
        ds = ds.map_batches(Predictor, fn_constructor_args=(str(bundle.path),), fn_constructor_kwargs=options,
                            batch_size=TABLE_BATCH if tabular else config.batch_size, batch_format="pyarrow",
                            compute=ActorPoolStrategy(size=_workers(gpus_per_worker, concurrency)),
                            num_gpus=gpus_per_worker or None)
        if out.suffix.lower() == ".parquet":  # parts in a temporary folder beside it (sweep_temps finds it)
            with atomic_path(out) as tmp, tempfile.TemporaryDirectory(prefix=temp_prefix(out), suffix=".tmp",
                                                                      dir=out.parent) as parts:
                ds.write_parquet(parts, ray_remote_args={"num_cpus": IO_CPUS})
                merge_parts(Path(parts), tmp)
        else:
            with atomic_dir(out) as tmp:
                ds.write_parquet(str(tmp), ray_remote_args={"num_cpus": IO_CPUS})
    except Exception as e:
        user = _user_error(e)
        if user is None:
            raise
        raise ItfitsError(str(user)) from e  # what an actor refused (a table column none of whose values reads)
    finally:
        if started:
            import ray
            ray.shutdown()
    return count_rows(out)
