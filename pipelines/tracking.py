"""Run tracking in MLflow (docs/tracking.md): every distill run is one MLflow run holding the
resolved definition (flattened parameters and `definition.yaml`), every loss term, gradient norm,
learning rate and throughput at each logged step, the validation scores and a sample grid per
checkpoint, `curves.png`, the exported student's location and the evaluate stage's report.

The store: `tracking.uri`, else MLFLOW_TRACKING_URI, else the SQLite file `mlflow.db` in the run
folder (`resolve_store`, in the driver, with no MLflow import: a server is asked once over HTTP).
The run: `mlflow_run.json` in the run folder names the store and run a run logs to, so a resumed
run (the definition run again, a restart after a worker failure) continues the same MLflow run,
each step logged once. Rank 0 of the distill workers logs (`RunLogger`, on a thread of its own:
the training loop never waits for the store, except to flush before a checkpoint is reported).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipelines.logs import logger

RUN_RECORD = "mlflow_run.json"  # in the run folder: {"uri": store, "run_id": run}
DB_FILE = "mlflow.db"  # the default store, in the run folder
SAMPLE_ROWS = 8  # validation prompts in each checkpoint's sample grid
# what a distill step reports besides its loss terms and gradient norms (stages/distill/progress.py)
NOT_TERMS = {"scale", "nodes", "iter_s", "data_wait_s", "mean_iter_s", "samples_per_s", "lr"}
PARAM_BATCH = 100  # MLflow's limit of parameters per log_batch call
PARAM_VALUE_LIMIT = 6000  # MLflow's limit of a parameter value's length


log = logger(__name__)


def local_store(run_dir: str) -> str | None:
    """The default store: SQLite in the run folder; None for a run folder on s3://."""
    if run_dir.startswith("s3://"):
        return None
    return f"sqlite:///{Path(run_dir).resolve() / DB_FILE}"


def unreachable(uri: str, timeout: float = 5.0) -> str | None:
    """Why the tracking server at `uri` cannot be reached, or None when it answers (any HTTP
    status: an answer is reachability) or `uri` is no http(s) server. One request, no retries:
    MLflow's own client retries for minutes before it gives up."""
    if not uri.startswith(("http://", "https://")):
        return None
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=swd-probe"
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))
    return None


def resolve_store(cfg) -> dict | None:
    """Where this run is tracked: {"uri", "experiment", "run_name", "artifacts"}; None when it is
    not (tracking.enabled false, or no store can be had: said in one line)."""
    t = cfg.tracking
    if not t.enabled:
        return None
    configured = t.uri or os.environ.get("MLFLOW_TRACKING_URI")
    local = local_store(cfg.run_dir)
    uri = configured or local
    if configured:
        why = unreachable(configured)
        if why is not None:
            uri = local
            log.warning(f"the tracking server {configured} does not answer ({why}): "
                        + (f"this run logs to {local} instead" if local else
                           "this run is not tracked (storage is on s3://, so there is no local store to "
                           "fall back to)"))
    elif local is None:
        log.warning("storage is on s3:// and neither tracking.uri nor MLFLOW_TRACKING_URI names a tracking server: "
                    "this run is not tracked")
    if uri is None:
        return None
    # a SQLite store keeps artifacts beside its file; a server keeps them where it is set up to
    artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlflow-artifacts").as_uri() \
        if uri.startswith("sqlite:///") else None
    log.debug(f"store {uri}, experiment {t.experiment or cfg.name!r}, "
              f"artifacts {artifacts or 'where the server keeps them'}")
    return {"uri": uri, "experiment": t.experiment or cfg.name, "run_name": cfg.name, "artifacts": artifacts}


def client(uri: str):
    """An MlflowClient on `uri`, MLflow's chatter silenced. A new SQLite store starts as a copy of
    an empty one made once per MLflow version (`_empty_store`): MLflow makes each new file by
    running its schema migrations, seconds per run."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow import MlflowClient

    try:
        os.getcwd()
    except FileNotFoundError:  # a stopped Ray job's working folder goes while its driver ends,
        os.chdir(tempfile.gettempdir())  # and MLflow resolves its default artifact root against the cwd

    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.exists():
            import shutil

            db.parent.mkdir(parents=True, exist_ok=True)
            part = db.with_name(f".{db.name}.{os.getpid()}")
            shutil.copyfile(_empty_store(), part)
            os.replace(part, db)
    return MlflowClient(tracking_uri=uri)


def _empty_store() -> Path:
    """A SQLite store with MLflow's schema and nothing in it, made once per MLflow version."""
    import mlflow
    from mlflow import MlflowClient

    path = Path.home() / ".cache" / "swd" / "mlflow" / f"empty-{mlflow.__version__}.db"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.{os.getpid()}")
        MlflowClient(tracking_uri=f"sqlite:///{part}").search_experiments()  # MLflow's migrations make the schema
        os.replace(part, path)
    return path


def experiment_id(c, name: str, artifacts: str | None) -> str:
    found = c.get_experiment_by_name(name)
    return found.experiment_id if found is not None else c.create_experiment(name, artifact_location=artifacts)


def log_metrics(c, run_id: str, metrics: dict, step: int) -> None:
    """The numeric, non-NaN values of `metrics` at `step`, in one call to the store."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    if batch:
        c.log_batch(run_id, metrics=batch)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """A nested definition as MLflow parameters: dotted keys, lists and null as JSON."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = (v if isinstance(v, str) else json.dumps(v))[:PARAM_VALUE_LIMIT]
    return out


def run_record(run_dir: str, resources) -> dict | None:
    from pipelines.storage import read_json

    try:
        return read_json(f"{run_dir}/{RUN_RECORD}", resources)
    except ValueError:  # cut short by a stopped attempt
        return None


def end_run(cfg, status: str) -> None:
    """Mark the run folder's MLflow run `status` ("FAILED", "KILLED") if it is still RUNNING: a
    run whose workers died or were stopped never closed it. A resumed run sets it RUNNING again.

    Args:
        cfg (`PipelineConfig`): the definition whose run folder names the run.
        status (`str`): an MLflow run status.
    """
    record = None
    try:
        record = run_record(cfg.run_dir, cfg.resources)
        if not record:
            return
        why = unreachable(record["uri"])
        if why:  # MLflow's client would retry for minutes: longer than a pod's grace period
            raise ConnectionError(f"the tracking server does not answer ({why})")
        c = client(record["uri"])
        if c.get_run(record["run_id"]).info.status == "RUNNING":
            c.set_terminated(record["run_id"], status)
    except Exception as err:  # the store is gone or unreachable: the failure itself is what matters
        log.warning(f"could not mark MLflow run {record['run_id'] if record else '(unknown)'} {status}: {err}")


def write_run_record(run_dir: str, resources, uri: str, run_id: str) -> None:
    from pipelines.storage import write_bytes

    write_bytes(f"{run_dir}/{RUN_RECORD}", json.dumps({"uri": uri, "run_id": run_id}).encode(), resources)


def open_run(cfg, store: dict, c=None) -> tuple[object, object, bool]:
    """(client, run, continued): the run the run folder's record names in this store, else a new
    one (and the record rewritten)."""
    from mlflow.exceptions import MlflowException

    c = c or client(store["uri"])
    record = run_record(cfg.run_dir, cfg.resources)
    if record and record.get("uri") == store["uri"]:
        try:
            run = c.get_run(record["run_id"])
            if run.info.lifecycle_stage == "active":
                return c, run, True
        except MlflowException:
            pass
    exp = experiment_id(c, store["experiment"], store.get("artifacts"))
    run = c.create_run(exp, run_name=store["run_name"], tags={"run_dir": cfg.run_dir})
    write_run_record(cfg.run_dir, cfg.resources, store["uri"], run.info.run_id)
    return c, run, False


def log_definition(c, run, cfg, step: int) -> None:
    """The definition as parameters (new keys) and `definition.yaml` (the latest). A run resumed
    under a changed definition cannot change a parameter (MLflow keeps them fixed): the changes
    become a tag, `definition_changes.after_step_<n>`, n the last step the run held."""
    import yaml
    from mlflow.entities import Param

    definition = cfg.model_dump(mode="json")
    flat, have = flatten(definition), run.data.params
    new = [Param(k, v) for k, v in flat.items() if k not in have]
    for i in range(0, len(new), PARAM_BATCH):
        c.log_batch(run.info.run_id, params=new[i:i + PARAM_BATCH])
    changed = [f"{k}: {have[k]} -> {v}" for k, v in flat.items() if k in have and have[k] != v]
    if changed:
        c.set_tag(run.info.run_id, f"definition_changes.after_step_{step}", "; ".join(changed)[:8000])
    c.log_text(run.info.run_id, yaml.safe_dump(definition, sort_keys=False), "definition.yaml")


def _local_file(uri: str, resources, tmp: str) -> str | None:
    """A local path holding the file at `uri` (downloaded from s3://), or None when there is none."""
    from pipelines.storage import filesystem

    if not uri.startswith("s3://"):
        return uri if Path(uri).exists() else None
    fs = filesystem(uri, resources)
    if not fs.exists(uri):
        return None
    local = os.path.join(tmp, os.path.basename(uri))
    fs.get(uri, local)
    return local


class RunLogger:
    """Rank 0's MLflow run: calls queue work for one thread, which opens the store (importing
    MLflow there, while the networks build) and logs in order. Steps the run logged already (a
    resumed run goes on from its checkpoint, before the step it had logged up to) are skipped. A
    store that fails is said once; training goes on untracked."""

    def __init__(self, cfg, store: dict):
        self.cfg, self.store = cfg, store
        self.client = self.run_id = None
        self.last_step = 0  # the last step the run holds
        self.broken = False
        self.logged = 0  # steps logged by this attempt
        self.waited = 0.0  # seconds the training loop waited for the store (flush, close)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="mlflow-run", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the training loop's calls

    def metrics(self, step: int, metrics: dict) -> None:
        self._queue.put(("metrics", step, {k: v for k, v in metrics.items() if k != "step"}))

    def samples(self, step: int, images=None, captions=None, export_png: str | None = None) -> None:
        """A checkpoint's sample grid: validation images (tensor, with their captions) or the
        samples.png of an export made at this checkpoint."""
        self._queue.put(("samples", step, images, captions, export_png))

    def flush(self, timeout: float = 300) -> None:
        """Wait until everything queued is in the store (before a checkpoint is reported: a run
        resumed from it has logged every step up to it)."""
        t0 = time.monotonic()
        while self._queue.unfinished_tasks and time.monotonic() < t0 + timeout and self._thread.is_alive():
            time.sleep(0.01)
        self.waited += time.monotonic() - t0

    def curves(self, chosen_step: int) -> None:
        """curves.png into the student folder and the run (queued before the final export, so it
        is drawn meanwhile)."""
        self._queue.put(("curves", chosen_step))

    def close(self, status: str = "FINISHED", timeout: float = 300) -> None:
        """The student's location and final samples, the run's status; waits for the thread."""
        t0 = time.monotonic()
        self._queue.put(("close", status))
        self._queue.put(None)
        self._thread.join(timeout)
        self.waited += time.monotonic() - t0
        if self._thread.is_alive():
            log.warning(f"the store has not taken the run's last records after {timeout:.0f} s; leaving them")
        elif not self.broken:
            log.info(f"MLflow run {self.run_id}: {self.logged} steps logged by this attempt; training waited "
                 f"{self.waited:.2f} s for the store")

    # ------------------------------------------------------------------ the thread

    def _work(self) -> None:
        try:
            self._open()
        except Exception as err:  # noqa: BLE001 - any store failure: said once, training goes on
            self._fail("cannot open the run", err)
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if not self.broken:
                    getattr(self, f"_{item[0]}")(*item[1:])
            except Exception as err:  # noqa: BLE001
                self._fail(f"logging {item[0]}", err)
            finally:
                self._queue.task_done()

    def _fail(self, doing: str, err: Exception) -> None:
        self.broken = True
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        log.warning(f"{doing} in {self.store['uri']} failed ({type(err).__name__}: {first}); "
                    "the run goes on untracked")

    def _open(self) -> None:
        t0 = time.perf_counter()
        self.client, run, continued = open_run(self.cfg, self.store)
        self.run_id = run.info.run_id
        if continued:
            self.client.update_run(self.run_id, status="RUNNING")
            self.last_step = max((m.step for m in self.client.get_metric_history(self.run_id, "lr")), default=0)
        log_definition(self.client, run, self.cfg, self.last_step)
        state = ("continued" + (f" after step {self.last_step}" if self.last_step else "")) if continued else "new"
        log.info(f"MLflow run {self.run_id} ({state}), "
                 f"experiment {self.store['experiment']!r} in {self.store['uri']} ({time.perf_counter() - t0:.1f} s)")

    def _metrics(self, step: int, metrics: dict) -> None:
        if step > self.last_step:
            log_metrics(self.client, self.run_id, metrics, step)
            self.last_step = step
            self.logged += 1

    def _samples(self, step: int, images, captions, export_png: str | None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = None
            if images is not None:
                from swd_core.generate import to_pil
                from swd_core.grid import image_grid

                path = os.path.join(tmp, "samples.png")
                image_grid([[im] for im in to_pil(images)], captions, [f"step {step}"],
                           title=f"{self.cfg.name} step {step}: validation prompts").save(path)
            elif export_png:
                path = _local_file(export_png, self.cfg.resources, tmp)
            if path:
                self.client.log_artifact(self.run_id, path, f"checkpoints/step_{step:06d}")

    def _curves(self, chosen_step: int) -> None:
        from pipelines.stages.distill.export import student_dir
        from pipelines.storage import write_bytes

        d = self.cfg.distill
        terms = sorted(k for k in self.client.get_run(self.run_id).data.metrics
                       if k not in NOT_TERMS and not k.startswith(("val_", "gate.")))
        keys = [*terms, *([d.validation.score_key] if d.validation.num_prompts else [])]
        history = {k: [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, k)] for k in keys}
        checkpoints = sorted({*range(d.checkpoint_every, d.steps + 1, d.checkpoint_every), d.steps})
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "curves.png")
            draw_curves(history, terms, d.validation.score_key if d.validation.num_prompts else None,
                        checkpoints, chosen_step, path, title=f"{self.cfg.name}: training curves")
            write_bytes(f"{student_dir(self.cfg)}/curves.png", Path(path).read_bytes(), self.cfg.resources)
            self.client.log_artifact(self.run_id, path)

    def _close(self, status: str) -> None:
        from pipelines.stages.distill.export import student_dir

        student = student_dir(self.cfg)
        if status == "FINISHED":
            self.client.set_tag(self.run_id, "student", f"{student}/merged")
            with tempfile.TemporaryDirectory() as tmp:
                path = _local_file(f"{student}/samples.png", self.cfg.resources, tmp)
                if path:
                    self.client.log_artifact(self.run_id, path, "student")
        self.client.set_terminated(self.run_id, status)


def draw_curves(history: dict[str, list[tuple[int, float]]], terms: list[str], val_key: str | None,
                checkpoints: list[int], chosen_step: int, path: str, title: str = "") -> None:
    """Losses, gradient norms and the validation metric over steps; checkpoints as dotted lines,
    the exported one as a solid line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups = [("losses", [k for k in terms if not k.startswith("grad_norm")]),
              ("gradient norms", [k for k in terms if k.startswith("grad_norm")])]
    if val_key:
        groups.append((f"validation: {val_key}", [val_key]))
    groups = [(name, keys) for name, keys in groups if any(history.get(k) for k in keys)]
    fig, axes = plt.subplots(len(groups) or 1, 1, figsize=(8, 2.6 * max(len(groups), 1)), sharex=True,
                             squeeze=False)
    for ax, (name, keys) in zip(axes[:, 0], groups):
        for k in keys:
            points = sorted(history.get(k, []))
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=k)
        for s in checkpoints:
            ax.axvline(s, color="grey", linestyle=":", linewidth=0.8)
        ax.axvline(chosen_step, color="crimson", linewidth=1.6, label=f"exported: step {chosen_step}")
        if keys == [val_key]:
            ax.scatter([s for s, _ in history[val_key] if s == chosen_step],
                       [v for s, v in history[val_key] if s == chosen_step], s=80, color="crimson", zorder=3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step (dotted: checkpoints)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_evaluation(cfg, outputs: dict) -> None:
    """The evaluate stage's grid and report into the run's MLflow run, when the run folder names
    one (a run the distill stage tracked); nothing is imported otherwise."""
    if not cfg.tracking.enabled:
        return
    record = run_record(cfg.run_dir, cfg.resources)
    if not record:
        return
    try:
        c = client(record["uri"])
        with tempfile.TemporaryDirectory() as tmp:
            for key in ("grid", "report_md", "report_json"):
                path = _local_file(outputs[key], cfg.resources, tmp) if outputs.get(key) else None
                if path:
                    c.log_artifact(record["run_id"], path, "eval")
    except Exception as err:  # noqa: BLE001 - the evaluation stands without its copy in the run
        log.warning(f"logging the evaluation to {record['uri']} failed ({type(err).__name__}: {err})")
