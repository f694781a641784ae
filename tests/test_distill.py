"""The distill stage end to end: Ray Train + DeepSpeed on a real local 2-node Ray cluster,
the committed toy-sd3 teacher and a store made by the precompute stage."""

import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipelines.schema import parse_pipeline_config

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.ray


def definition(tmp: Path, name: str, **distill) -> dict:
    d = {
        # two scales (32 and 64 px): a round of the schedule is 2 iterations, so short runs still
        # checkpoint after full rounds
        "schedule": {"scales": [8, 16], "boundaries": [0, 14]},
        "losses": {"feature_block": 4, "dmd": {"guidance_scale": 4.5}},
        "mode": "lora", "lora": {"rank": 4}, "zero_stage": 2,
        "batch_size": 4, "steps": 2, "lr": 1e-3, "fake_updates": 1,
        "checkpoint_every": 2, "log_every": 1,
    }
    d.update(distill)
    return {
        "name": name,
        "teacher": {"path": "builtin:toy-sd3", "max_sequence_length": 0},
        # 135 rows: three Parquet files (64 + 64 + 7), so the workers' rows (67 and 68) span files
        "data": {"sources": [{"path": "builtin:shapes", "format": "shapes", "limit": 135}],
                 "preview_prompts": ["a red circle", "a blue square on a black background"]},
        "precompute": {"batch_size": 16, "actors": 1, "cpus_per_actor": 1, "output": str(tmp / "store")},
        "distill": d,
        "resources": {"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "SPREAD",
                      "storage": str(tmp / "runs")},
    }


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, ray_cluster):
    tmp = tmp_path_factory.mktemp("distill")
    from pipelines.stages import precompute

    precompute.run(parse_pipeline_config(definition(tmp, "store")))
    return tmp


def _checkpoint_states(run_dir: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((run_dir / "train").glob("**/checkpoint_*/state.json"))]


def _stock_pipeline(folder: Path):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
                                                    torch_dtype=torch.float32)


def _stock_image(pipe, prompt: str, seed: int = 0):
    """Stock diffusers sampling: 2 steps from 32 px (scale 8); the scheduler upscales to 64 px."""
    return pipe(prompt, height=32, width=32, num_inference_steps=2, guidance_scale=0.0, max_sequence_length=0,
                generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


# a student EMA and validation: both must come back from a checkpoint (the resume test)
EMA_AND_VALIDATION = {"ema_decay": 0.9, "validation": {"num_prompts": 4, "metric": "prompt_accuracy"}}


@pytest.fixture(scope="module")
def lora2(store_dir):
    """One LoRA / ZeRO-2 run in this process, read by the tests below (never written); the resume
    test's first run is the same definition under another name, from the command line."""
    import signal

    from pipelines.stages import distill

    ctrl_c = signal.getsignal(signal.SIGINT)
    out = distill.run(parse_pipeline_config(definition(store_dir, "lora2", **EMA_AND_VALIDATION)))
    # Ray Train's fit leaves its own Ctrl-C handler in place (it would swallow a later stage's
    # Ctrl-C); the stage puts back the one it found
    assert signal.getsignal(signal.SIGINT) is ctrl_c
    return out


def test_lora_zero2_two_nodes_exports_a_stock_loadable_student(store_dir, lora2):
    out = lora2
    m = out["final_metrics"]
    assert m["nodes"] == 2, "the two workers were not placed on the cluster's two nodes"
    workers = _checkpoint_states(store_dir / "runs" / "lora2")[-1]["workers"]
    assert len({w["node_id"] for w in workers}) == 2 and {w["rank"] for w in workers} == {0, 1}
    assert m["step"] == 2 and {"mmd", "dmd", "gan_g", "fake_denoise", "gan_d", "grad_norm_g"} <= set(m)
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
    student = Path(out["student"])
    assert (student / "samples.png").exists() and (student / "lora").is_dir()
    merged = student / "merged"
    record = json.loads((merged / "swd_schedule.json").read_text())
    assert record["scales"] == [8, 16]

    # the stock pipeline loads the merged student; its scheduler samples scale-wise up to 64 px
    pipe = _stock_pipeline(merged)
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    image = _stock_image(pipe, "a red circle")
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0.01  # an image, not a flat field
    # the trained LoRA moved the weights away from the teacher's
    from swd_core.tiny_models import resolve_pretrained

    teacher = _stock_pipeline(Path(resolve_pretrained("builtin:toy-sd3")))
    diff = max((a - b).abs().max().item()
               for a, b in zip(pipe.transformer.parameters(), teacher.transformer.parameters()))
    assert diff > 0


def _mlflow_run(tracking: dict):
    """(client, run, {metric: its logged steps}, every artifact's path) of a tracked run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking["uri"])
    run = client.get_run(tracking["run_id"])
    steps = {k: [m.step for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics}

    def artifacts(path=None):
        for f in client.list_artifacts(run.info.run_id, path):
            yield from artifacts(f.path) if f.is_dir else [f.path]

    return client, run, steps, set(artifacts())


def test_the_run_is_one_mlflow_run_with_every_logged_step_samples_and_curves(lora2):
    """Read back through MlflowClient from the run folder's SQLite store: the definition, one value
    per logged step of each metric (log_every 1: steps 1 and 2; validation at the checkpoint,
    step 2), the checkpoint's samples, the curves and the student's location."""
    _, run, steps, artifacts = _mlflow_run(lora2["tracking"])
    assert lora2["tracking"]["uri"] == f"sqlite:///{Path(lora2['student']).parent.resolve()}/mlflow.db"
    assert run.info.status == "FINISHED" and run.info.run_name == "lora2"
    assert {"lr", "samples_per_s", "iter_s", "mmd", "dmd", "gan_g", "fake_denoise", "gan_d", "grad_norm_g",
            "grad_norm_f", "val_prompt_accuracy", "val_fd"} <= set(steps)
    assert all(v == ([2] if k.startswith("val_") else [1, 2]) for k, v in steps.items()), steps
    assert run.data.params["distill.steps"] == "2"
    assert run.data.params["distill.validation.metric"] == "prompt_accuracy"
    assert run.data.params["data.preview_prompts"] == json.dumps(
        ["a red circle", "a blue square on a black background"])
    assert {"definition.yaml", "curves.png", "checkpoints/step_000002/samples.png", "student/samples.png"} <= artifacts
    assert run.data.tags["student"] == f"{lora2['student']}/merged"
    assert (Path(lora2["student"]) / "curves.png").stat().st_size > 10_000


def _validation_record(student: Path) -> dict:
    """The export's validation.json, checked against itself."""
    return _checked_validation(json.loads((student / "validation.json").read_text()))


def _checked_validation(record: dict) -> dict:
    """The chosen step is the history's best (the latest of tied ones)."""
    best, history = record["best"], record["history"]
    key = best["metric"]
    scores = [h[key] for h in history]
    chosen = min(scores) if key == "val_fd" else max(scores)
    latest = max(i for i, v in enumerate(scores) if v == chosen)
    assert best["value"] == chosen and history[latest]["step"] == best["step"]
    return record


def test_full_finetune_zero3(store_dir):
    # validation samples the student on every rank: under ZeRO-3 each forward gathers shards collectively
    from pipelines.stages import distill

    losses = {"feature_block": 4, "dmd": {"weight": 0.0}, "gan": {"weight": 0.0}}
    cfg = parse_pipeline_config(definition(store_dir, "full3", mode="full", zero_stage=3, steps=4, checkpoint_every=2,
                                           validation={"num_prompts": 6, "batch_size": 2}, export_at_checkpoints=True,
                                           losses=losses))
    out = distill.run(cfg)
    m = out["final_metrics"]
    assert m["step"] == 4 and "mmd" in m and "dmd" not in m
    assert {"val_fd", "val_prompt_accuracy", "val_best_step"} <= set(m)
    record = _validation_record(Path(out["student"]))
    assert [h["step"] for h in record["history"]] == [2, 4] and m["val_best_step"] == record["best"]["step"]
    merged = Path(out["student"]) / "merged"
    assert not (Path(out["student"]) / "lora").exists()
    pipe = _stock_pipeline(merged)
    from swd_core.tiny_models import resolve_pretrained

    teacher = _stock_pipeline(Path(resolve_pretrained("builtin:toy-sd3")))
    changed = [n for (n, a), b in zip(pipe.transformer.named_parameters(), teacher.transformer.parameters())
               if not torch.equal(a, b)]
    assert changed, "full fine-tuning left every weight equal to the teacher's"
    assert _stock_image(pipe, "a blue square").shape == (64, 64, 3)
    # export_at_checkpoints: the checkpoint before the last exported too, a stock folder of its own
    at2 = Path(out["student"]) / "step_2"
    assert (at2 / "merged" / "model_index.json").exists() and (at2 / "samples.png").exists()
    assert not (Path(out["student"]) / "step_4").exists()  # the last step is the final export
    # the final export is the step the validation chose: step 2's weights exactly when it chose step 2
    step2 = _stock_pipeline(at2 / "merged")
    same = all(torch.equal(a, b) for a, b in zip(step2.transformer.parameters(), pipe.transformer.parameters()))
    assert same == (record["best"]["step"] == 2), record["best"]


def _run_cli(cfg_dict: dict, tmp: Path, cluster, name: str):
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    env = dict(os.environ, RAY_ADDRESS=cluster.address, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "pipelines/distill.py", "--config", str(path), "--stages", "distill"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_rerun_resumes_and_continues_the_step_count(store_dir, ray_cluster, lora2, s3_server):
    """The first run is `lora2`'s definition under another name, from the command line, with its
    run folder on S3 (checkpoints, export, validation record; the store stays local): the same
    definition and store train the same student (each worker reads the same rows in the same
    order, pipelines/sharding.py, and draws the same noise). Run again with more steps, it goes
    on from its checkpoint on S3, the student EMA and the validation history and choice
    included. Run a third time unchanged, it finds the run finished and trains nothing."""
    import s3fs
    from safetensors.torch import load

    def on_s3(d: dict) -> dict:
        d["resources"].update(storage="s3://swd-test/distill-runs", s3={"endpoint_url": s3_server})
        d["tracking"] = {"uri": f"sqlite:///{store_dir}/resume-mlflow.db"}  # no local run folder for the default
        return d

    run = "swd-test/distill-runs/resume"

    def lora(fs) -> dict:
        return load(fs.cat(f"{run}/student/lora/pytorch_lora_weights.safetensors"))

    first = on_s3(definition(store_dir, "resume", **EMA_AND_VALIDATION))
    proc = _run_cli(first, store_dir, ray_cluster, "resume1")
    out1, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out1[-4000:]
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    a = load((Path(lora2["student"]) / "lora" / "pytorch_lora_weights.safetensors").read_bytes())
    b = lora(fs)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    second = on_s3(definition(store_dir, "resume", steps=4, checkpoint_every=2, **EMA_AND_VALIDATION))  # more steps
    proc = _run_cli(second, store_dir, ray_cluster, "resume2")
    out2, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out2[-4000:]
    assert "resumed from checkpoint at step 2" in out2
    assert "the export does not hold" not in out2  # every rank got the export's record, and it names step 2
    assert "step 3/4" in out2 and "step 1/4" not in out2 and "step 2/4" not in out2
    assert "holds no student EMA" not in out2
    fs.invalidate_cache()
    emas = sorted(fs.glob(f"{run}/train/**/checkpoint_*/student_ema.pt"))
    assert [torch.load(io.BytesIO(fs.cat(f)), weights_only=True)["optimization_step"] for f in emas][-1] == 4  # 2 + 2
    assert "validation at step 2" in out1 and "validation at step 4" in out2
    record = _checked_validation(json.loads(fs.cat(f"{run}/student/validation.json")))
    assert [h["step"] for h in record["history"]] == [2, 4]
    # each rank's data position came back: 2 batches of 2 rows per step, so 16 rows of epoch 0
    # after 4 steps (a restart at a new epoch would say [1, 8])
    states = [json.loads(fs.cat(f)) for f in sorted(fs.glob(f"{run}/train/**/checkpoint_*/state.json"))]
    assert states[-1]["data_positions"] == [[0, 16], [0, 16]]
    assert f"the exported student is step {record['best']['step']} of 4" in out2
    exported = lora(fs)
    # one MLflow run across both: each step logged once, the change of definition noted
    tracking = json.loads(fs.cat(f"{run}/mlflow_run.json"))
    _, tracked, steps, artifacts = _mlflow_run(tracking)
    assert steps["lr"] == [1, 2, 3, 4] and steps["grad_norm_g"] == [1, 2, 3, 4] and steps["val_fd"] == [2, 4], steps
    assert tracked.info.status == "FINISHED" and tracked.data.params["distill.steps"] == "2"
    assert "distill.steps: 2 -> 4" in tracked.data.tags["definition_changes.after_step_2"]
    assert {"checkpoints/step_000002/samples.png", "checkpoints/step_000004/samples.png", "curves.png"} <= artifacts
    assert "MLflow run " + tracking["run_id"] + " (continued after step 2)" in out2

    # the finished run, submitted again: it resumes at its last step, trains and exports nothing,
    # and names the exported student again
    proc = _run_cli(second, store_dir, ray_cluster, "resume3")
    out3, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out3[-4000:]
    assert "resumed from checkpoint at step 4" in out3 and "step 5/" not in out3 and "[distill] step " not in out3
    assert "validation at step" not in out3 and "exported the student" not in out3
    assert f"the exported student is step {record['best']['step']} of 4" in out3
    fs.invalidate_cache()
    again = lora(fs)
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in again)
    assert json.loads(fs.cat(f"{run}/mlflow_run.json")) == tracking
    assert _mlflow_run(tracking)[2]["lr"] == [1, 2, 3, 4]


def test_killed_worker_is_recovered_and_the_run_finishes(store_dir, ray_cluster):
    import signal

    """24 steps: enough to kill a worker after the first registered checkpoint and resume, and to
    run the data into a second epoch on both ranks; the numbers below follow from that count."""
    # with a learning-rate decay over the last half: its state must survive the restart too
    cfg = definition(store_dir, "killed", steps=24, checkpoint_every=2, log_every=10, lr_decay_fraction=0.5)
    proc = _run_cli(cfg, store_dir, ray_cluster, "killed")
    run_dir = store_dir / "runs" / "killed"
    snapshot = run_dir / "train" / "distill" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 600
    # Kill only once Ray Train has registered a checkpoint (its snapshot names one); files in
    # storage alone may belong to a checkpoint still being reported.
    while not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.5)
    victim = _checkpoint_states(run_dir)[0]["workers"][1]["pid"]
    os.kill(victim, signal.SIGKILL)  # a real worker process (rank 1) dies mid-run
    out, _ = proc.communicate(timeout=900)
    (run_dir / "cli.log").write_text(out)
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from checkpoint at step" in out, out[-6000:]
    assert "step 24/24" in out
    # the restored schedule: lr = 1e-3 · (24 − step) / 12 over steps 12..24, so 1e-3/6 at 22 and 0 at 24
    lrs = {s["step"]: s["metrics"]["lr"] for s in _checkpoint_states(run_dir)}
    assert sorted(lrs) == [22, 24]  # keep_checkpoints (2, the default): older checkpoints were pruned
    assert lrs[24] == 0.0 and lrs[22] == pytest.approx(1e-3 / 6), lrs
    # and the data: 24 steps × 4 rows = 96 rows per rank, epochs running on into each other:
    # rank 0 has 67 rows (1 epoch + 29), rank 1 has 68 (1 epoch + 28)
    assert _checkpoint_states(run_dir)[-1]["data_positions"] == [[1, 29], [1, 28]]


def test_a_run_out_of_max_failures_fails_and_says_how_to_go_on(store_dir, ray_cluster):
    """max_failures 0: the first lost worker ends the run (killed as soon as rank 0 names it and
    has opened its MLflow run), the command fails saying so, and the MLflow run ends FAILED."""
    import re
    import signal

    proc = _run_cli(definition(store_dir, "fragile", steps=24, max_failures=0), store_dir, ray_cluster, "fragile")
    record = store_dir / "runs" / "fragile" / "mlflow_run.json"
    seen = []
    for line in proc.stdout:
        seen.append(line)
        victim = re.search(r"rank 1 node \w+ pid (\d+)", line)
        if victim:
            deadline = time.monotonic() + 120
            while not record.exists() and time.monotonic() < deadline:  # rank 0's tracking thread opens it
                time.sleep(0.1)
            os.kill(int(victim.group(1)), signal.SIGKILL)
            break
    out = "".join(seen) + proc.communicate(timeout=600)[0]
    assert victim, out[-4000:]
    assert proc.returncode != 0 and "step 24/24" not in out, out[-4000:]
    assert "[distill] error: failed (0 restart(s) allowed by distill.max_failures)" in out, out[-4000:]
    assert f"its checkpoints stay under {store_dir / 'runs' / 'fragile'}/train" in out
    assert "resumed from checkpoint" not in out  # no restart
    _, run, _, _ = _mlflow_run(json.loads(record.read_text()))
    assert run.info.status == "FAILED"


def test_ctrl_c_during_training_stops_the_command_with_exit_130(store_dir, ray_cluster):
    """Ctrl-C once training has begun: Ray Train's own SIGINT handler aborts the run, and the
    command says so once and fails with 130 (Ray's handler alone ends it with a bare exit 1);
    the MLflow run ends KILLED and nothing is exported. Steps enough never to finish first."""
    import signal

    proc = _run_cli(definition(store_dir, "interrupted", steps=10_000), store_dir, ray_cluster,
                    "interrupted")
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "[distill] step 1/10000" in line:
            proc.send_signal(signal.SIGINT)
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    run_dir = store_dir / "runs" / "interrupted"
    (run_dir / "cli.log").write_text(out)
    assert proc.returncode == 130, out[-4000:]
    assert out.count("[pipeline] SIGINT received: stopping") == 1, out[-4000:]
    driver = [line for line in out.splitlines() if not line.startswith("(")]  # not the workers' lines
    assert "exported the student" not in out and not [x for x in driver if "Traceback" in x], out[-4000:]
    assert not (run_dir / "student").exists()
    _, run, _, _ = _mlflow_run(json.loads((run_dir / "mlflow_run.json").read_text()))
    assert run.info.status == "KILLED"


def test_store_made_for_another_definition_is_refused(store_dir):
    from pipelines.stages import distill
    from pipelines.store import StoreMismatchError

    other = definition(store_dir, "mismatch", schedule={"preset": "toy_6step"}, steps=6, checkpoint_every=6)
    mismatch = r"scales: store has \[8, 16\], definition has \[4, 6, 8, 10, 12, 16\]"
    with pytest.raises(StoreMismatchError, match=mismatch):
        distill.run(parse_pipeline_config(other))
