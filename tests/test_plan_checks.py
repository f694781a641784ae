"""What would fail on a cluster for a reason known in advance fails at plan time, with one line
naming the field: in `--dry-run`, in `render`, and before the job's first stage (the same
entry point a RayJob runs). Also the GPU memory estimates the checks compare."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.cluster.cli import main as render_main
from pipelines.distill import main as pipeline_main
from pipelines.gpu_memory import KNOWN, stage_needs
from pipelines.plan import plan_problems
from pipelines.schema import load_pipeline_config

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "registry.example/swd-ray:2.60.0"


def config(stem: str) -> str:
    return str(ROOT / "pipelines" / "configs" / f"{stem}.yaml")


def three_ways(stem: str, overrides: list[str], capsys, tmp_path) -> list[list[str]]:
    """stderr lines of --dry-run, of render and of a real run (stopped before its first stage,
    its storage in tmp_path untouched), each asserted to exit 2."""
    sets = [a for o in [*overrides, f"resources.storage={tmp_path / 'runs'}"] for a in ("--set", o)]
    out = []
    for run in (lambda: pipeline_main(["--config", config(stem), "--dry-run", *sets]),
                lambda: render_main(["render", "--config", config(stem), "--kind", "rayjob", "--image", IMAGE, *sets]),
                lambda: pipeline_main(["--config", config(stem), *sets])):
        assert run() == 2
        out.append(capsys.readouterr().err.strip().splitlines())
    assert not (tmp_path / "runs").exists()  # nothing ran
    return out


def test_batch_not_divisible_by_workers_fails_before_any_stage(capsys, tmp_path):
    for lines in three_ways("sd35_medium_4step", ["resources.num_workers=12"], capsys, tmp_path):
        assert len(lines) == 2 and lines[1].startswith("  - distill.batch_size 64 is not divisible by "
                                                       "resources.num_workers 12"), lines
        assert "num_workers 8 or 16" in lines[1] and "batch_size 60 or 72" in lines[1]


def test_gpu_memory_below_the_estimate_fails_before_any_stage(capsys, tmp_path):
    for lines in three_ways("sd35_medium_4step", ["cluster.gpu.memory=48G"], capsys, tmp_path):
        (line,) = lines
        assert line.startswith("cluster.gpu.memory 48G: distill needs ≈ ") and "a GPU there holds 48 GB" in line


@pytest.mark.parametrize("stem,fits,too_small", [
    ("sd35_medium_4step", "80G", "48G"), ("sd35_medium_6step", "80G", "48G"),
    ("sd35_large_4step", "141G", "80G"), ("flux1_dev_4step", "141G", "80G")])
def test_shipped_definitions_fit_the_gpus_they_name_and_not_smaller_ones(stem, fits, too_small):
    """docs/cluster.md's sizing, as the estimate has it: Medium fits an 80 GB GPU and not a 48 GB
    L40S; Large and FLUX.1-dev need more than 80 GB and fit a 141 GB H200."""
    cfg = load_pipeline_config(config(stem))
    assert cfg.cluster.gpu.memory == fits and plan_problems(cfg) == []
    small = load_pipeline_config(config(stem), [f"cluster.gpu.memory={too_small}"])
    assert [p.split(":")[0] for p in plan_problems(small)] == [f"cluster.gpu.memory {too_small}"]
    # a larger micro-batch needs more: 8 per worker is over 80 GB even for Medium
    bigger = load_pipeline_config(config(stem), ["distill.batch_size=128", "resources.num_workers=16",
                                                 "cluster.gpu.memory=80G"])
    assert any("distill needs" in p for p in plan_problems(bigger))


def test_distill_estimate_grows_with_what_it_counts():
    cfg = load_pipeline_config(config("sd35_medium_4step"))

    def distill(c):
        return next(n.gb for n in stage_needs(c) if n.stage == "distill")

    base = distill(cfg)
    assert distill(load_pipeline_config(config("sd35_medium_4step"), ["resources.num_workers=8"])) > 1.8 * base - 5
    assert distill(load_pipeline_config(config("sd35_medium_4step"), ["distill.lora.rank=128"])) > base
    assert distill(load_pipeline_config(config("sd35_medium_4step"), ["distill.mode=full"])) > base + 4.9
    assert distill(load_pipeline_config(config("sd35_large_4step"))) > base
    # only the stages that run: a definition without GPUs, or a Hub id neither known nor cached, has none
    assert stage_needs(load_pipeline_config(config("toy"))) == []
    unknown = load_pipeline_config(config("sd35_medium_4step"), ["teacher.path=someone/unknown-model"])
    assert "someone/unknown-model" not in KNOWN and stage_needs(unknown) == []
    no_distill = load_pipeline_config(config("sd35_medium_4step"), ["stages=[precompute]"])
    assert [n.stage for n in stage_needs(no_distill)] == ["precompute"]


def test_pods_that_cannot_hold_a_unit_or_its_placement(capsys, tmp_path):
    for overrides, words in [
        (["resources.placement_strategy=STRICT_PACK"], "resources.placement_strategy STRICT_PACK puts all 16"),
        (["cluster.gpu.per_pod=8", "resources.placement_strategy=STRICT_SPREAD"],
         "resources.placement_strategy STRICT_SPREAD puts each Ray Train worker on its own node"),
        (["cluster.gpu.per_pod=1", "resources.gpus_per_worker=2"],
         "cluster.gpu.per_pod 1: resources.gpus_per_worker 2"),
    ]:
        for lines in three_ways("sd35_medium_4step", overrides, capsys, tmp_path):
            assert len(lines) == 1 and lines[0].startswith(words), lines
    # 8 workers per 8-GPU pod with PACK, or all of them in one pod with STRICT_PACK, are fine
    assert plan_problems(load_pipeline_config(config("sd35_medium_4step"), ["cluster.gpu.per_pod=8"])) == []
    assert plan_problems(load_pipeline_config(config("sd35_medium_4step"), [
        "cluster.gpu.per_pod=16", "resources.placement_strategy=STRICT_PACK"])) == []


def test_launcher_instance_type_is_checked_or_chosen_to_fit(capsys):
    medium = config("sd35_medium_4step")
    assert render_main(["render", "--config", medium, "--kind", "launcher", "--image", IMAGE,
                        "--launcher-gpu-instance-type", "g6e.2xlarge"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("cluster.launcher.gpu_instance_type g6e.2xlarge (48 GB GPUs): distill needs ≈ ")
    for stem, chosen, gpus in [("sd35_medium_4step", "p4de.24xlarge", 8), ("sd35_large_4step", "p5e.48xlarge", 8)]:
        assert render_main(["render", "--config", config(stem), "--kind", "launcher", "--image", IMAGE]) == 0
        doc = yaml.safe_load(capsys.readouterr().out)
        node = doc["available_node_types"]["gpu_worker"]
        # the node declares every GPU of its type, and holds that many workers: 16 of them on 2 nodes
        declared = (node["node_config"]["InstanceType"], node["resources"]["GPU"], node["max_workers"])
        assert declared == (chosen, gpus, 2)
        assert node["resources"]["CPU"] == 8 * gpus
    # an 8-GPU type named explicitly: its GPUs are all declared (not 1 of 8)
    assert render_main(["render", "--config", medium, "--kind", "launcher", "--image", IMAGE,
                        "--launcher-gpu-instance-type", "p5.48xlarge"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 8


def test_plan_prints_the_estimates_it_checks(capsys):
    assert pipeline_main(["--config", config("sd35_large_4step"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "checked against cluster.gpu.memory 141G" in out
    assert "distill: ≈ " in out and "micro-batch 2" in out


def test_a_retraining_cycle_checks_its_plan_before_it_runs(tmp_path, capsys):
    from pipelines.retrain import main as retrain_main

    data = yaml.safe_load(Path(config("toy_retrain")).read_text())
    data["resources"].update(storage=str(tmp_path / "runs"), gpus_per_worker=1, placement_strategy="STRICT_PACK")
    definition = tmp_path / "retrain.yaml"
    definition.write_text(yaml.safe_dump(data))
    assert retrain_main(["--config", str(definition), "--once"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("resources.placement_strategy STRICT_PACK puts all 2 Ray Train workers on one node")
    assert not (tmp_path / "runs").exists()
