"""The model registry and run tracking of scheduled retraining, on MLflow.

Every cycle is one MLflow run (experiment: the registered model's name): its distill run
(pipelines/tracking.py: the definition, the training metrics per step, samples, curves) with
the gate's metrics and the candidate-vs-champion grid added. Every student
is a version of one registered model, tagged with its cycle, store rows, steps, metrics and the
gate's verdict. `champion` is an alias: the model Serve runs. An alias moves; its history does
not: each move is also a tag on the registered model (`alias.<time>`), so the registry shows who
was champion when, and why.

The default store is a SQLite file beside the run (`<storage>/<name>/registry.db`, local storage
only); on a cluster, a tracking server from `retrain.registry.tracking_uri`, `tracking.uri` or
MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.schema import PipelineConfig

CHAMPION = "champion"


def tracking_uri(cfg: PipelineConfig) -> str:
    configured = (cfg.retrain.registry.tracking_uri if cfg.retrain else None) or cfg.tracking.uri
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if cfg.run_dir.startswith("s3://"):
        raise ValueError("the registry's default SQLite file must be on a local disk and storage is on s3://: set "
                         "retrain.registry.tracking_uri, tracking.uri or MLFLOW_TRACKING_URI to a tracking server")
    return f"sqlite:///{Path(cfg.run_dir).resolve() / 'registry.db'}"


def model_name(cfg: PipelineConfig) -> str:
    """The registered model's name, also the experiment of the cycles' runs."""
    return (cfg.retrain.registry.model_name if cfg.retrain else None) or cfg.name


@dataclass
class Version:
    """One registered student."""

    number: int
    source: str  # the exported student folder (merged diffusers pipeline)
    tags: dict
    aliases: list[str]
    created: float

    @property
    def metrics(self) -> dict:
        return json.loads(self.tags.get("metrics", "{}"))


class Registry:
    def __init__(self, cfg: PipelineConfig):
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no table-creation chatter per command
        import mlflow
        from mlflow import MlflowClient

        self.uri = tracking_uri(cfg)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.name = model_name(cfg)
        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        experiment = self.client.get_experiment_by_name(self.name)
        if experiment is None:
            # artifacts beside the run's other outputs, not in the current directory
            artifacts = cfg.run_dir + "/mlflow-artifacts"
            if not artifacts.startswith("s3://"):
                artifacts = Path(artifacts).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(self.name, artifact_location=artifacts)
        else:
            self.experiment_id = experiment.experiment_id
        try:
            self.client.get_registered_model(self.name)
        except self._mlflow.exceptions.MlflowException:
            self.client.create_registered_model(self.name, description=f"SwD students of the definition {cfg.name!r}")

    # ------------------------------------------------------------------ runs

    def start_run(self, cycle: str) -> str:
        return self.client.create_run(self.experiment_id, run_name=cycle, tags={"cycle": cycle}).info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        from pipelines.tracking import log_metrics

        log_metrics(self.client, run_id, metrics, step)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_file(self, run_id: str, path: str) -> None:
        self.client.log_artifact(run_id, path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    # ------------------------------------------------------------------ versions

    def register(self, source: str, run_id: str, tags: dict) -> Version:
        mv = self.client.create_model_version(self.name, source=source, run_id=run_id,
                                              tags={k: str(v) for k, v in tags.items()})
        return self.version(int(mv.version))

    def register_cycle(self, cycle: str, source: str, run_id: str, tags: dict) -> Version:
        """The version of `cycle`: the one registered already (a cycle killed after registering
        and resumed), else a new one."""
        done = next((v for v in self.versions() if v.tags.get("cycle") == cycle), None)
        return done or self.register(source, run_id, {**tags, "cycle": cycle})

    def tag(self, version: int, **tags) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(self.name, str(version), k, str(v))

    def version(self, number: int) -> Version:
        mv = self.client.get_model_version(self.name, str(number))
        return Version(int(mv.version), mv.source, dict(mv.tags), list(mv.aliases or []), mv.creation_timestamp / 1000)

    def versions(self) -> list[Version]:
        found = self.client.search_model_versions(f"name='{self.name}'")
        champion = self.champion()
        out = [Version(int(mv.version), mv.source, dict(mv.tags), [], mv.creation_timestamp / 1000) for mv in found]
        for v in out:  # search results carry no aliases on every store: take them from the model
            v.aliases = [CHAMPION] if champion is not None and v.number == champion.number else []
        return sorted(out, key=lambda v: v.number)

    def champion(self) -> Version | None:
        model = self.client.get_registered_model(self.name)
        number = (model.aliases or {}).get(CHAMPION)
        return self.version(int(number)) if number is not None else None

    def set_champion(self, number: int, why: str) -> None:
        previous = self.champion()
        self.client.set_registered_model_alias(self.name, CHAMPION, str(number))
        # the alias history: one tag per move, its key sortable by time
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{time.time_ns() % 1_000_000_000:09d}"
        self.client.set_registered_model_tag(self.name, f"alias.{stamp}", json.dumps(
            {"alias": CHAMPION, "version": number, "previous": previous.number if previous else None, "why": why,
             "at": time.time()}))

    def alias_history(self) -> list[dict]:
        tags = self.client.get_registered_model(self.name).tags
        return [json.loads(tags[k]) for k in sorted(tags) if k.startswith("alias.")]
