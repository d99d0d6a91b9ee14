"""Experiment trackers: every training's metrics.jsonl rows streamed live to TensorBoard, W&B or MLflow.

A recipe's `logging.report_to: [tensorboard, wandb, mlflow]` names them; none by default. Each is
an optional extra whose package is imported only when a run starts (`elmforest[tensorboard]`, ...).

    TRACKERS   name -> class with start(run_name, group, config), log(step, row),
               summary(metrics, columns, rows, claims) and finish(failed)
    following  a context: while it is open, every metrics.jsonl line written in this process
               (`train.state.METRICS_OBSERVERS`) goes to one tracker run per training folder,
               started at the folder's first line and finished when the context closes
    tracked    a decorator for functions whose first argument is a Recipe (`btm.seed.train_seed`, ...)
    report     one tracker run holding a study's final table and claims

Who is who, read from the disk alone (a worker process on another core or node finds the same):
the study folder is the nearest folder above a training folder that holds a `recipe.yaml` (the run
folder a study claimed; for one training seed's RUN/seed-<s>, the study RUN above it; the training
folder's parent when there is none). A tracker run is named by the training folder's path inside
it (`dense`, `experts/wiki`, `random_experts/random0`, `demix`, `seed-1/experts/wiki`) and grouped
by `logging.group`, default the study folder's name.
Its config is the recipe and the run's `train.json` spec. x-axis: the `step` field.

    TensorBoard  DIR/tensorboard/<run name>/ event files, one scalar per field; a resumed run
                 purges the steps it re-runs (SummaryWriter's purge_step)
    W&B          wandb.init(project, group, name, id stable per study folder and run name,
                 resume="allow", dir=DIR) with `step` as every metric's x-axis; its own login and
                 WANDB_MODE (offline, disabled) apply
    MLflow       experiment `project` ($MLFLOW_EXPERIMENT_NAME wins), one run per training tagged
                 `elmforest.group` (continued when the run name comes back); the study's results
                 run becomes the parent of the group's runs. Tracking URI: logging.mlflow_tracking_uri,
                 $MLFLOW_TRACKING_URI, else a file store DIR/mlruns (parallel workers write it safely)

DIR is `logging.dir`, default the study folder. A tracker that cannot start (package missing, a bad
directory, W&B not logged in while online) or fails while logging is one line on stderr and is
dropped; the training goes on untouched.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from elmforest.config import LoggingConfig, Recipe
from elmforest.train.state import METRICS_OBSERVERS, TRAIN_JSON_NAME, read_train_json

RECIPE_FILE = "recipe.yaml"  # what a study's run folder holds (elmforest.study.run_folder writes it)
SEED_RUN = re.compile(r"seed-\d+")  # one training seed's run inside a study of several (elmforest.study.run)
X_AXIS = "step"


class Tracker(Protocol):
    def start(self, run_name: str, group: str, config: dict[str, Any]) -> None: ...

    def log(self, step: int, row: dict[str, float]) -> None: ...

    def summary(self, metrics: dict[str, float], columns: list[str], rows: list[list[Any]], claims: list[str]) -> None: ...

    def finish(self, failed: bool = False) -> None: ...


def study_folder(folder: Path) -> Path:
    """The run folder a training belongs to: the nearest folder at or above `folder` holding a
    recipe.yaml, or the study above it when that is one training seed's run (RUN/seed-<s>, itself
    holding a recipe.yaml); else `folder`'s parent."""
    folder = Path(folder).resolve()
    for p in (folder, *folder.parents):
        if (p / RECIPE_FILE).is_file():
            return p.parent if SEED_RUN.fullmatch(p.name) and (p.parent / RECIPE_FILE).is_file() else p
    return folder.parent


def run_name(folder: Path, root: Path) -> str:
    """`experts/wiki`: the training folder's path inside the study folder (its name when outside)."""
    folder = Path(folder).resolve()
    try:
        rel = folder.relative_to(root)
    except ValueError:
        return folder.name
    return rel.as_posix() if rel.parts else folder.name


def run_key(root: Path, name: str) -> str:
    """An id stable for one study folder and run name (W&B's run id, MLflow's `elmforest.key` tag)."""
    return hashlib.sha1(f"{Path(root).resolve()}\n{name}".encode()).hexdigest()[:16]


def _files_dir(settings: LoggingConfig, root: Path) -> Path:
    return Path(settings.dir) if settings.dir else Path(root)


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric fields except the x-axis."""
    return {k: v for k, v in row.items() if k != X_AXIS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def markdown(columns: list[str], rows: list[list[Any]]) -> str:
    """A markdown table (numbers to 4 significant digits)."""
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class TensorBoard:
    """Event files in DIR/tensorboard/<run name>/ (torch.utils.tensorboard's SummaryWriter)."""

    def __init__(self, settings: LoggingConfig, root: Path):
        self.base = _files_dir(settings, root) / "tensorboard"
        self.writer = None

    def start(self, run_name: str, group: str, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        self.dir = self.base / run_name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config, self.make = config, SummaryWriter

    def _writer(self, step: int):
        if self.writer is None:  # at the first step logged: a resumed run hides its old steps from here on
            self.writer = self.make(log_dir=str(self.dir), purge_step=step)
            self.writer.add_text("config", "```\n" + json.dumps(self.config, indent=1) + "\n```", step)
        return self.writer

    def log(self, step: int, row: dict[str, float]) -> None:
        writer = self._writer(step)
        for key, value in row.items():
            writer.add_scalar(key, value, step)
        writer.flush()

    def summary(self, metrics: dict[str, float], columns: list[str], rows: list[list[Any]], claims: list[str]) -> None:
        writer = self._writer(0)
        for key, value in metrics.items():
            writer.add_scalar(key, value, 0)
        writer.add_text("results", markdown(columns, rows), 0)  # TensorBoard renders markdown tables
        writer.add_text("claims", "\n".join(f"- {c}" for c in claims), 0)

    def finish(self, failed: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()


class Wandb:
    """A W&B run in DIR/wandb; W&B's own settings (login, WANDB_MODE, WANDB_ENTITY) apply."""

    def __init__(self, settings: LoggingConfig, root: Path):
        self.settings, self.root = settings, Path(root)

    def start(self, run_name: str, group: str, config: dict[str, Any]) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE", "online")
        if mode in ("online", "run") and not wandb.login(prompt=False, verify=False):
            raise RuntimeError("W&B is not logged in (run `wandb login`, or set WANDB_MODE=offline)")
        where = _files_dir(self.settings, self.root)
        where.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.settings.project, group=group, name=run_name, id=run_key(self.root, run_name),
            resume="allow", dir=str(where), config=config, reinit="create_new",
        )
        self.run.define_metric(X_AXIS)
        self.run.define_metric("*", step_metric=X_AXIS)  # not wandb's own _step: a resumed run re-logs steps

    def log(self, step: int, row: dict[str, float]) -> None:
        self.run.log({X_AXIS: step, **row})

    def summary(self, metrics: dict[str, float], columns: list[str], rows: list[list[Any]], claims: list[str]) -> None:
        import wandb

        self.run.summary.update(metrics)
        self.run.log({"results": wandb.Table(columns=columns, data=rows),
                      "claims": wandb.Table(columns=["claim"], data=[[c] for c in claims])})

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Mlflow:
    """An MLflow run in experiment `project`, tagged with the group (MlflowClient, no global state)."""

    GROUP_TAG, KEY_TAG = "elmforest.group", "elmforest.key"

    def __init__(self, settings: LoggingConfig, root: Path):
        self.settings, self.root = settings, Path(root)

    def start(self, run_name: str, group: str, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = self.settings.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3 asks file-store users to opt in; this default is elmforest's choice
            store = _files_dir(self.settings, self.root) / "mlruns"
            store.mkdir(parents=True, exist_ok=True)
            uri = store.resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or self.settings.project
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                self.experiment = client.create_experiment(name)
            except Exception:  # another worker created it first
                self.experiment = client.get_experiment_by_name(name).experiment_id
        else:
            self.experiment = experiment.experiment_id
        self.group, key = group, run_key(self.root, run_name)
        found = client.search_runs([self.experiment], filter_string=f"tags.`{self.KEY_TAG}` = '{key}'", max_results=1)
        if found:  # the same training continued (the seed phase, then the dense run), or a resumed one
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            return
        run = client.create_run(self.experiment, run_name=run_name, tags={self.GROUP_TAG: group, self.KEY_TAG: key})
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, row: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in row.items()])

    def summary(self, metrics: dict[str, float], columns: list[str], rows: list[list[Any]], claims: list[str]) -> None:
        self.log(0, metrics)
        self.client.log_table(self.run_id, data={c: [r[i] for r in rows] for i, c in enumerate(columns)},
                              artifact_file="results.json")
        self.client.log_text(self.run_id, markdown(columns, rows) + "\n\n" + "\n".join(f"- {c}" for c in claims),
                             "results.md")
        group = self.group.replace("'", "")
        for run in self.client.search_runs([self.experiment], filter_string=f"tags.`{self.GROUP_TAG}` = '{group}'"):
            if run.info.run_id != self.run_id:  # the study's runs nest under its results in MLflow's UI
                self.client.set_tag(run.info.run_id, "mlflow.parentRunId", self.run_id)

    def finish(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


TRACKERS: dict[str, Callable[[LoggingConfig, Path], Tracker]] = {
    "tensorboard": TensorBoard,
    "wandb": Wandb,
    "mlflow": Mlflow,
}


def warn(tracker: str, run: str, what: str, error: BaseException) -> None:
    """One line on stderr: the tracker is dropped, the training goes on."""
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    print(f"elmforest: {tracker} tracker {what} for {run} ({reason}); training goes on without it", file=sys.stderr, flush=True)


def start_trackers(settings: LoggingConfig, root: Path, name: str, config: dict[str, Any]) -> dict[str, Tracker]:
    """The recipe's trackers started on one run; one that cannot start is a warning and left out."""
    group = settings.group or Path(root).name
    started: dict[str, Tracker] = {}
    for kind in settings.report_to:
        try:
            tracker = TRACKERS[kind](settings, Path(root))
            tracker.start(name, group, config)
        except Exception as e:
            warn(kind, name, "could not start", e)
            continue
        started[kind] = tracker
    return started


def _call(trackers: dict[str, Tracker], name: str, what: str, fn: Callable[[Tracker], None]) -> None:
    """fn(tracker) for each; a tracker that raises is a warning and dropped."""
    for kind, tracker in list(trackers.items()):
        try:
            fn(tracker)
        except Exception as e:
            warn(kind, name, f"failed to {what}", e)
            trackers.pop(kind)


class _Follower:
    """The metrics observer: one set of started trackers per training folder."""

    def __init__(self, settings: LoggingConfig, recipe: dict[str, Any]):
        self.settings, self.recipe = settings, recipe
        self.runs: dict[Path, tuple[str, dict[str, Tracker]]] = {}

    def __call__(self, folder: Path, row: dict[str, Any]) -> None:
        if folder not in self.runs:
            root = study_folder(folder)
            name = run_name(folder, root)
            spec = (read_train_json(folder / TRAIN_JSON_NAME) or {}).get("spec", {})
            config = {"recipe": self.recipe, "train": spec, "folder": str(Path(folder).resolve())}
            self.runs[folder] = (name, start_trackers(self.settings, root, name, config))
        name, trackers = self.runs[folder]
        values = _numbers(row)
        _call(trackers, name, "log", lambda t: t.log(int(row[X_AXIS]), values))

    def close(self, failed: bool) -> None:
        for name, trackers in self.runs.values():
            _call(trackers, name, "finish", lambda t: t.finish(failed))


def _settings(recipe: Recipe | dict[str, Any] | None) -> tuple[LoggingConfig | None, dict[str, Any]]:
    """(logging settings, the recipe as JSON) of a Recipe or of its JSON (as job.json holds it)."""
    if isinstance(recipe, Recipe):
        return recipe.logging, recipe.model_dump(mode="json")
    data = recipe if isinstance(recipe, dict) else {}
    try:
        return LoggingConfig.model_validate(data.get("logging") or {}), data
    except ValueError as e:
        warn("every", "this job", "setting is invalid", e)
        return None, data


@contextlib.contextmanager
def following(recipe: Recipe | dict[str, Any] | None) -> Iterator[None]:
    """While open, stream every metrics.jsonl line this process writes to the recipe's trackers
    (`logging.report_to`), one tracker run per training folder; each finishes (failed if the
    block raises) when it closes. Inside another `following` it adds nothing: the outer one sees
    every line already. Under G data-parallel ranks only rank 0 writes lines, so only it starts any."""
    settings, data = _settings(recipe)
    if settings is None or not settings.report_to or any(isinstance(o, _Follower) for o in METRICS_OBSERVERS):
        yield
        return
    follower = _Follower(settings, data)
    METRICS_OBSERVERS.append(follower)
    failed = True
    try:
        yield
        failed = False
    finally:
        METRICS_OBSERVERS.remove(follower)
        follower.close(failed)


def tracked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn(recipe, ...)` run inside `following(recipe)`: the trainings it starts are tracked."""

    @functools.wraps(fn)
    def run(recipe: Recipe, *args: Any, **kwargs: Any) -> Any:
        with following(recipe):
            return fn(recipe, *args, **kwargs)

    return run


def report(
    recipe: Recipe, root: Path, name: str, metrics: dict[str, float], columns: list[str], rows: list[list[Any]],
    claims: list[str],
) -> None:
    """One tracker run `name` in the study's group holding summary metrics, a table and claims."""
    settings, data = _settings(recipe)
    if settings is None or not settings.report_to:
        return
    trackers = start_trackers(settings, Path(root).resolve(), name, {"recipe": data})
    _call(trackers, name, "record the results", lambda t: t.summary(metrics, columns, rows, claims))
    _call(trackers, name, "finish", lambda t: t.finish())
