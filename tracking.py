"""Experiment tracking, off the reading path: `--wandb=PROJECT` sends every row `fit` writes to
metrics.jsonl (training rows and dev rows) to a Weights & Biases run as well, from rank 0,
with the run's run.json (checkpoint.record_run) as its config.

    check(project)              at config time: the flag without wandb installed is one line
    start(project, info, dist, folder)
    log(row)                    one metrics.jsonl row (a no-op without an active run)
    finish()

wandb is imported only when the flag is given and is not in requirements.txt (pip install
wandb; the tests pin it in requirements-dev.txt). Each start of a run (a resume too) is one
wandb run, named after the output folder; rows are logged one history row each, with our
`step` as the x-axis, so wandb's history is metrics.jsonl row for row.
"""

import importlib.util
import os

from errors import UserError

_run = None   # this process's active wandb run (rank 0 of a fit with --wandb), else None


def check(project: str):
    """Before any work: --wandb given but wandb missing is one line, not a traceback later."""
    if project and importlib.util.find_spec("wandb") is None:
        raise UserError(f"--wandb={project}: wandb is not installed; pip install wandb (or drop --wandb)")


def start(project: str, info: dict, dist, folder: str):
    """Rank 0 with a project: a wandb run whose config is `info` (run.json). Elsewhere nothing;
    a run a crashed `fit` left open in this process is finished first either way."""
    global _run
    finish()
    if not project or not dist.is_main:
        return
    check(project)
    import wandb
    try:
        _run = wandb.init(project=project, name=os.path.basename(os.path.normpath(folder)), job_type=info["stage"],
                          config=info)
    except wandb.errors.Error as e:     # not logged in, no network: the user's to fix, one line
        raise UserError(f"--wandb={project}: {str(e).strip().splitlines()[0]} (or WANDB_MODE=offline to log locally)") \
            from None
    # our step is the x-axis: a dev row shares its step with a training row, one history row each
    _run.define_metric("step")
    _run.define_metric("*", step_metric="step")


def log(row: dict):
    if _run is not None:
        _run.log(row)


def finish():
    global _run
    if _run is not None:
        _run.finish()
        _run = None
