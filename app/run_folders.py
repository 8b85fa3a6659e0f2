"""Run folders of the commands that write one (fit, lr-find, evaluate): a new runs/KIND, runs/KIND2, ... where no
--out is given, and what stays of one when the command fails or is stopped (Ctrl-C, SIGTERM)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import typer

from pipelines.io import new_run_folder, remove_failed_run
from pipelines.logs import event_json, log_mode, say


def new_folder(kind: str) -> Path:
    """A new runs/KIND, runs/KIND2, ... for a command given no --out; printed (event "run")."""
    folder = new_run_folder(kind)
    say(f"run folder: {folder}", "run", run=str(folder))
    return folder


def say_resumable(run: Path) -> bool:
    """Where `run` holds a checkpoint and no finished run: say how to go on (stderr) and return True."""
    if not (run / "checkpoints" / "last.pt").is_file() or (run / "run.json").is_file():
        return False
    message = f"the run keeps its last finished epoch; continue it with: itfits fit --resume {run}"
    typer.echo(event_json("resumable", message, run=str(run)) if log_mode() == "json" else message, err=True)
    return True


@contextmanager
def kept_or_removed(run: Path, *, made: bool, emptied: bool = False):
    """Whatever stops the block (an error, Ctrl-C, SIGTERM: KeyboardInterrupt), `run` is left either resumable (it
    holds a checkpoint: the --resume command is printed) or gone: removed where this command `made` it, or, a
    user's folder that was empty (`emptied`), emptied again. Never a folder that refuses both fit and --resume."""
    try:
        yield
    except BaseException:
        if not say_resumable(run) and (made or emptied):
            remove_failed_run(run)
            if emptied and not made:
                run.mkdir(exist_ok=True)
        raise
