"""The evaluate stage and its Ray-free helpers (swd_core.evaluate_model): metric plumbing on known
inputs, the latency split, and the stage end to end on a tiny teacher and an exported student."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipelines.schema import parse_pipeline_config
from pipelines.storage import filesystem, upload_dir, write_bytes
from swd_core.evaluate_model import ShapesScorer, latency_split, load_exported_student, render_real, sample_images
from swd_core.generate import to_pil
from swd_core.toy import shapes
from tests.conftest import TINY

TOY = Path(__file__).parents[1] / "pipelines" / "configs" / "toy.yaml"


@pytest.fixture(scope="module")
def scorer():
    return ShapesScorer(shapes.held_out_prompts()[:64])


def test_real_images_score_near_perfect_and_noise_scores_badly(scorer):
    # A second real render (other jitter) of the same prompts: what a perfect model draws.
    real = render_real(scorer.samples, seed=123)
    good, _ = scorer.score(real)
    assert good["prompt_accuracy"] >= 0.95 and good["n"] == 64 and good["fd_n"] == 64
    assert good["fd"] < 0.2
    # The same images answering the wrong prompts: accuracy collapses, so images are paired by index.
    shifted, _ = scorer.score(torch.roll(real, 1, dims=0))
    assert shifted["prompt_accuracy"] < 0.2
    noise, _ = scorer.score(torch.rand_like(real) * 2 - 1)
    assert noise["prompt_accuracy"] <= 0.05
    assert noise["fd"] > 20 * good["fd"]
    # A prefix is scored against the same prefix of prompts and real renders.
    part, _ = scorer.score(real[:16])
    assert part["n"] == 16 and part["fd_n"] == 16 and part["prompt_accuracy"] >= 0.9


def test_fd_floor_is_the_fd_of_a_second_real_set(scorer):
    floor = scorer.fd_floor(64)
    assert 0 <= floor < 0.2
    assert scorer.fd_floor(16) > floor  # fewer images, larger bias: why the report gives n


def test_scorer_refuses_images_it_cannot_read(scorer):
    with pytest.raises(ValueError, match="64x64"):
        scorer.score(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="only 64 prompts"):
        scorer.score(torch.zeros(65, 3, 64, 64))


def test_sampled_images_do_not_depend_on_the_batch_size(tiny_adapter, toy_schedule):
    prompts, seeds = ["a red circle", "a blue square", "a green cross"], [5, 6, 7]
    done = []
    a = sample_images(tiny_adapter, prompts, seeds, batch_size=2, progress=done.append, schedule=toy_schedule)
    b = sample_images(tiny_adapter, prompts, seeds, batch_size=3, schedule=toy_schedule)
    assert a.shape == (3, 3, 64, 64) and done == [2, 3]
    assert torch.allclose(a, b, atol=1e-5)


def test_latency_split_times_each_phase(tiny_adapter, toy_schedule):
    cfg = latency_split(tiny_adapter, "a red circle", 0, repeats=2, teacher_steps=3, guidance=4.5)
    # CFG: the conditional and unconditional halves go through the transformer in one call per step.
    assert cfg["transformer_calls"] == 3 and cfg["repeats"] == 2 and len(cfg["raw"]["total_s"]) == 2
    swd = latency_split(tiny_adapter, "a red circle", 0, repeats=1, schedule=toy_schedule)
    assert swd["transformer_calls"] == 4
    for lat in (cfg, swd):
        assert min(lat["text_s"], lat["transformer_s"], lat["vae_s"]) > 0
        assert lat["other_s"] >= 0 and lat["total_s"] >= lat["text_s"] + lat["transformer_s"] + lat["vae_s"]


def _config(tmp_path, **evaluate):
    data = yaml.safe_load(TOY.read_text())
    data["teacher"]["path"] = TINY
    data["distill"]["losses"]["feature_block"] = 1
    data["distill"]["validation"] = {"num_prompts": 0}  # some of these definitions leave the shapes domain
    data["resources"]["storage"] = str(tmp_path / "runs")
    data["evaluate"] = {"teacher_steps": 3, "teacher_guidance_scale": 4.5, "latency_repeats": 1, "batch_size": 4,
                        **evaluate}
    return data


@pytest.mark.ray
def test_stage_on_s3_with_an_exported_student(tmp_path, s3_server, ray_cluster):
    """Through the stage's entry point (a Ray task reading and writing S3), with a student whose
    weights are not the teacher's: its grid column is that student's images, pixel for pixel."""
    import os

    from pipelines.serve.stand_in import export_stand_in
    from pipelines.stages.evaluate import eval_prompts, run
    from swd_core.tiny_models import save_tiny_clip, save_tiny_dinov2

    # the image metrics' models: tiny random checkpoints, one of them read from S3
    metric_models = {"clip": save_tiny_clip(tmp_path / "clip", seed=2),
                     "pickscore": save_tiny_clip(tmp_path / "pickscore", seed=3, with_processor=False),
                     "pickscore_processor": save_tiny_clip(tmp_path / "processor", seed=4),
                     "dinov2": "s3://swd-test/metric-models/dinov2"}
    data = _config(tmp_path, num_prompts=6, teacher_num_prompts=4, grid_prompts=3, domain="shapes",
                   metrics=["clip_score", "pickscore", "fd_dinov2"], metric_models=metric_models,
                   bootstrap_resamples=200)
    data["resources"].update(storage="s3://swd-test/eval-runs", s3={"endpoint_url": s3_server})
    cfg = parse_pipeline_config(data)
    upload_dir(save_tiny_dinov2(tmp_path / "dinov2"), metric_models["dinov2"], cfg.resources)
    export_stand_in(cfg, tmp_path / "merged", perturb=1.0, seed=1)
    upload_dir(tmp_path / "merged", f"{cfg.run_dir}/student/merged", cfg.resources)
    # the record the distill stage leaves beside an export chosen by validation
    history = [{"step": 50, "val_fd": 2.5}, {"step": 100, "val_fd": 1.25}, {"step": 150, "val_fd": 3.0}]
    write_bytes(f"{cfg.run_dir}/student/validation.json", json.dumps(
        {"best": {"step": 100, "metric": "val_fd", "value": 1.25}, "history": history}).encode(), cfg.resources)

    out = run(cfg)
    assert out["student_found"] and out["report_json"] == f"{cfg.run_dir}/eval/report.json"
    fs = filesystem(cfg.run_dir, cfg.resources)
    report = json.loads(fs.cat(out["report_json"]))
    md = fs.cat(out["report_md"]).decode()
    with fs.open(out["grid"], "rb") as f:
        grid = Image.open(f).convert("RGB")

    models = {m["name"]: m for m in report["models"]}
    assert list(models) == ["teacher_3_cfg", "teacher_4", "swd_4"]
    assert [m["role"] for m in report["models"]] == ["teacher_cfg", "teacher_few_step", "student"]
    assert [m["n_prompts"] for m in report["models"]] == [4, 6, 6]
    assert models["swd_4"]["scales"] == [8, 10, 12, 16] and models["swd_4"]["sampler"] == "scale-wise"
    assert report["student"]["schedule"]["scales"] == [8, 10, 12, 16]
    assert report["student"]["chosen"] == {"step": 100, "metric": "val_fd", "value": 1.25,
                                           "candidates": [50, 100, 150]}
    assert "The student is step 100, chosen by val_fd 1.250 among the checkpoints at steps 50, 100, 150" in md
    floor = report["fd_floor"]
    assert set(floor) == {"4", "6"}
    for m in report["models"]:
        assert 0 <= m["prompt_accuracy"] <= 1 and set(m["per_attribute"]) >= {"shape", "color", "relation"}
        assert m["fd_common_n"] == 4 and np.isfinite(m["fd"])
        # Random weights draw no shapes: scored as the noise they are.
        assert m["prompt_accuracy"] <= 0.5 and m["fd_common"] > 5 * floor["4"]
        assert m["latency"]["total_s"] > 0 and m["latency"]["transformer_calls"] == m["steps"]
    assert [c["id"] for c in report["checks"]] == [
        "student_beats_teacher_few_step_accuracy", "student_beats_teacher_few_step_fd",
        "student_accuracy_vs_teacher_cfg", "student_fd_vs_teacher_cfg", "student_latency_vs_teacher_cfg"]
    assert report["checks"][1]["passed"] == (models["swd_4"]["fd"] < models["teacher_4"]["fd"])
    assert "## Checks" in md and "![comparison grid](grid.png)" in md
    assert "| swd_4 |" in md and "### Per attribute" in md
    # real render + 3 models, 3 rows, 128 px cells after the 220 px label column
    assert grid.size == (220 + 4 * 128, 56 + 3 * 128)
    assert report["placement"]["pid"] != os.getpid()  # a Ray task did the work
    # the student column (the 4th, drawn 2x nearest) is the exported student's scale-wise samples
    student, schedule, _ = load_exported_student(str(tmp_path / "merged"), "sd3")
    prompts, seeds = eval_prompts(cfg, "shapes", 3)[0][:3], [cfg.evaluate.seed + i for i in range(3)]
    own = sample_images(student, prompts, seeds, schedule=schedule)
    cells = np.asarray(grid)[56:, 220 + 3 * 128:][::2, ::2].reshape(3, 64, 64, 3)
    for cell, want in zip(cells, to_pil(own)):
        assert np.abs(cell.astype(int) - np.asarray(want, dtype=int)).max() <= 1
    from swd_core.adapters import load_adapter

    teacher = load_adapter("sd3", TINY, max_sequence_length=0)
    same_sampler = to_pil(sample_images(teacher, prompts, seeds, schedule=schedule))
    assert np.abs(np.stack(same_sampler).astype(int) - cells.astype(int)).mean() > 5  # not the teacher's weights

    # the image metrics beside the classifier's: each model's, with intervals, and paired differences
    info = report["image_metrics"]
    assert info["metrics"] == ["clip_score", "pickscore", "fd_dinov2"] and info["reference"] == "teacher_3_cfg"
    assert info["source_images"] == "real renders of the shapes prompts" and info["resamples"] == 200
    for m in report["models"]:
        im = m["image_metrics"]
        assert set(im) == {"clip_score", "pickscore", "fd_dinov2", "fd_dinov2_source"}
        assert im["clip_score"]["n"] == m["n_prompts"] and im["fd_dinov2_source"]["n"] == m["n_prompts"]
        for e in (im["clip_score"], im["pickscore"], im["fd_dinov2_source"]):
            assert e["lo"] <= e["value"] <= e["hi"] and e["level"] == 0.95
    assert models["teacher_3_cfg"]["image_metrics"]["fd_dinov2"] is None  # the reference itself
    assert models["swd_4"]["image_metrics"]["fd_dinov2"]["n"] == 4  # the guided teacher's prompts
    assert [(d["model"], d["baseline"]) for d in info["differences"]] == [
        ("teacher_4", "teacher_3_cfg"), ("swd_4", "teacher_3_cfg"), ("swd_4", "teacher_4")]
    student_vs = info["differences"][1]
    assert models["swd_4"]["vs_teacher"] == student_vs["difference"]
    assert set(student_vs["difference"]) == {"clip_score", "pickscore", "fd_dinov2_source"}
    assert 0 <= student_vs["pickscore_win_rate"]["value"] <= 1 and student_vs["pickscore_win_rate"]["n"] == 4
    # recomputed here from the student's and the guided teacher's own samples
    from swd_core.frechet import frechet_distance
    from swd_core.image_metrics import ClipSimilarity, DinoFeatures

    all_prompts, seeds = eval_prompts(cfg, "shapes", 6)[0], [cfg.evaluate.seed + i for i in range(6)]
    student_images = sample_images(student, all_prompts, seeds, schedule=schedule)
    teacher_images = sample_images(teacher, all_prompts[:4], seeds[:4], teacher_steps=3, guidance=4.5)
    # (other batches than the task's: a pixel may round to the next 8-bit value, moving a score by ~1e-4)
    clip = ClipSimilarity(metric_models["clip"])
    reported = models["swd_4"]["image_metrics"]["clip_score"]["value"]
    assert abs(reported - clip.scores(student_images, all_prompts).mean()) < 1e-3
    diff = (clip.scores(student_images[:4], all_prompts[:4]).mean()
            - clip.scores(teacher_images, all_prompts[:4]).mean())
    assert abs(student_vs["difference"]["clip_score"]["value"] - diff) < 1e-3
    dino = DinoFeatures(str(tmp_path / "dinov2"))
    fd = frechet_distance(dino.features(student_images[:4]), dino.features(teacher_images))
    assert models["swd_4"]["image_metrics"]["fd_dinov2"]["value"] == pytest.approx(fd, rel=1e-3)
    assert "## Image metrics" in md and "| swd_4 − teacher_4 | 6 |" in md and "PickScore win rate" in md


@pytest.mark.ray
def test_stage_without_a_student_evaluates_the_teacher_on_given_prompts(tmp_path, ray_cluster):
    """Through the stage's entry point: a Ray task, not the driver."""
    import os

    from pipelines.stages.evaluate import run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\na green cross\n")
    data = _config(tmp_path, num_prompts=5, domain="auto")
    data["data"] = {"eval_prompts": str(prompts)}
    cfg = parse_pipeline_config(data)  # a tiny random teacher is not the shapes domain
    out = run(cfg)
    assert not out["student_found"] and out["checks"] == {}
    report = json.loads(Path(out["report_json"]).read_text())
    md = Path(out["report_md"]).read_text()
    assert report["domain"] == "prompts" and [m["name"] for m in report["models"]] == ["teacher_3_cfg", "teacher_4"]
    assert all("prompt_accuracy" not in m and m["n_prompts"] == 3 for m in report["models"])
    assert "not found" in md and "--stages distill" in md and "latency and the grid only" in md
    assert "has 3 prompts" in md
    assert Image.open(out["grid"]).size == (220 + 2 * 128, 56 + 3 * 128)
    assert report["placement"]["device"] == "cpu" and report["placement"]["pid"] != os.getpid()


def test_stage_refuses_bad_input(tmp_path):
    from pipelines.stages.evaluate import evaluate_here as run

    cfg = parse_pipeline_config(_config(tmp_path, num_prompts=1000, domain="shapes"))
    with pytest.raises(ValueError, match="held-out set has 640"):
        run(cfg)
    (tmp_path / "not-a-student").mkdir()
    cfg = parse_pipeline_config(_config(tmp_path, num_prompts=2, domain="shapes",
                                        student=str(tmp_path / "not-a-student")))
    with pytest.raises(FileNotFoundError, match="swd_schedule.json"):
        run(cfg)
