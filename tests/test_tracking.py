"""Where a run is tracked (pipelines/tracking.py), without Ray: the store a definition names, and
a tracking server that does not answer at the start (real HTTP on 127.0.0.1)."""

import http.server
import threading

import pytest

from pipelines.schema import parse_pipeline_config
from pipelines.tracking import resolve_store
from tests.conftest import free_port


def definition(storage: str, **tracking) -> object:
    return parse_pipeline_config({
        "name": "tracked", "teacher": {"path": "builtin:toy-sd3", "max_sequence_length": 0},
        "distill": {"schedule": {"preset": "toy_4step"}, "validation": {"num_prompts": 0}},
        "resources": {"storage": storage}, "tracking": tracking})


@pytest.fixture
def no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_a_server_that_does_not_answer_falls_back_to_the_local_store_said_once(tmp_path, no_env_uri, capsys):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = resolve_store(definition(str(tmp_path), uri=closed, experiment="exp"))
    lines = capsys.readouterr().err.splitlines()  # a warning
    assert store["uri"] == f"sqlite:///{tmp_path.resolve()}/tracked/mlflow.db" and store["experiment"] == "exp"
    assert len(lines) == 1, lines
    assert f"[tracking] warning: the tracking server {closed} does not answer (" in lines[0], lines
    assert lines[0].endswith(f"this run logs to {store['uri']} instead")


def test_with_storage_on_s3_there_is_no_local_store_to_fall_back_to(no_env_uri, capsys):
    closed = f"http://127.0.0.1:{free_port()}"
    assert resolve_store(definition("s3://bucket/runs", uri=closed)) is None
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "this run is not tracked (storage is on s3://" in lines[0], lines
    assert resolve_store(definition("s3://bucket/runs")) is None
    assert "neither tracking.uri nor MLFLOW_TRACKING_URI" in capsys.readouterr().err


def test_a_server_that_answers_is_used_and_the_default_is_the_run_folder(tmp_path, no_env_uri, monkeypatch, capsys):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # any HTTP answer shows the server is there
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        store = resolve_store(definition(str(tmp_path), uri=uri))
        assert store["uri"] == uri and store["experiment"] == "tracked" and store["artifacts"] is None
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert resolve_store(definition(str(tmp_path)))["uri"] == uri
    finally:
        server.shutdown()
    said = capsys.readouterr()
    assert said.out == said.err == ""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    local = resolve_store(definition(str(tmp_path)))
    assert local["uri"] == f"sqlite:///{tmp_path.resolve()}/tracked/mlflow.db"
    assert local["artifacts"] == (tmp_path.resolve() / "tracked" / "mlflow-artifacts").as_uri()
    assert resolve_store(definition(str(tmp_path), enabled=False)) is None


def test_a_run_its_workers_never_closed_is_marked_failed_and_a_closed_one_is_left_alone(tmp_path, no_env_uri,
                                                                                        capsys):
    """What the distill stage does when `fit` fails or is stopped: the run folder's MLflow run, left
    RUNNING by a rank 0 that died, ends FAILED (or KILLED); a finished run stays FINISHED; a run
    folder without a record, or a store that is gone, changes nothing and raises nothing."""
    from pipelines.tracking import client, end_run, write_run_record

    cfg = definition(str(tmp_path))
    store = resolve_store(cfg)
    end_run(cfg, "FAILED")  # no record yet: nothing to mark
    c = client(store["uri"])
    experiment = c.create_experiment("tracked")
    runs = {name: c.create_run(experiment).info.run_id for name in ("died", "closed")}
    c.set_terminated(runs["closed"], "FINISHED")
    for name, status, expected in (("died", "FAILED", "FAILED"), ("closed", "KILLED", "FINISHED")):
        write_run_record(cfg.run_dir, cfg.resources, store["uri"], runs[name])
        assert c.get_run(runs[name]).info.status == ("RUNNING" if name == "died" else "FINISHED")
        end_run(cfg, status)
        assert c.get_run(runs[name]).info.status == expected
    assert capsys.readouterr().err == ""

    write_run_record(cfg.run_dir, cfg.resources, f"sqlite:///{tmp_path}/gone/no.db", runs["died"])
    (tmp_path / "gone").write_text("a file where the store's folder should be")
    end_run(cfg, "FAILED")
    err = capsys.readouterr().err
    assert f"[tracking] warning: could not mark MLflow run {runs['died']} FAILED" in err, err


def test_marking_a_run_on_a_server_that_does_not_answer_is_one_warning(tmp_path, no_env_uri, capsys):
    """MLflow's client would retry for minutes; a stop must not wait for it."""
    from pipelines.tracking import end_run, write_run_record

    cfg = definition(str(tmp_path))
    closed = f"http://127.0.0.1:{free_port()}"
    write_run_record(cfg.run_dir, cfg.resources, closed, "abc123")
    end_run(cfg, "KILLED")
    err = capsys.readouterr().err
    assert "could not mark MLflow run abc123 KILLED: the tracking server does not answer (" in err, err
