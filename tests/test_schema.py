"""The pipeline definition: shipped configs load, and bad files fail with readable messages."""

from pathlib import Path

import pytest
import yaml

from pipelines.distill import main
from pipelines.schema import (
    RENAMED,
    PipelineConfig,
    PipelineConfigError,
    apply_overrides,
    load_pipeline_config,
    model_at,
    parse_pipeline_config,
)

CONFIGS = sorted((Path(__file__).parents[1] / "pipelines" / "configs").glob("*.yaml"))
MEDIUM6 = Path(__file__).parents[1] / "pipelines" / "configs" / "sd35_medium_6step.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_pipeline_config(path)
    assert cfg.schedule().num_steps in (4, 6)


def test_published_presets():
    medium6 = load_pipeline_config(MEDIUM6)
    s = medium6.schedule()
    assert s.scales == (32, 48, 64, 80, 96, 128)
    assert s.sigmas == pytest.approx((1.0, 0.9454, 0.8959, 0.7904, 0.7371, 0.6022), abs=1e-4)
    assert medium6.distill.losses.feature_block == 11 and medium6.distill.losses.dmd.guidance_scale == 7.0
    assert (medium6.distill.lr, medium6.distill.batch_size, medium6.distill.lora.rank) == (5e-6, 64, 64)
    large = load_pipeline_config(MEDIUM6.with_name("sd35_large_4step.yaml"))
    assert large.schedule().scales == (64, 80, 96, 128)
    assert large.distill.losses.feature_block == 20 and large.distill.losses.dmd.guidance_scale == 4.5
    assert large.distill.batch_size == 32


def test_flux_definition_indexes_flux_grid_and_embeds_guidance(capsys):
    """The FLUX.1-dev definition: SD3.5 Large's scales and grid indices, its sigmas from FLUX's grid
    at the final size (not SD3's), and the DMD teacher's guidance as the embedding (dry run)."""
    from swd_core.schedules import family_sigma_grid

    path = MEDIUM6.with_name("flux1_dev_4step.yaml")
    flux = load_pipeline_config(path)
    large = load_pipeline_config(MEDIUM6.with_name("sd35_large_4step.yaml"))
    s = flux.schedule()
    assert flux.teacher.family == "flux"
    assert s.scales == large.schedule().scales and s.boundaries == large.schedule().boundaries
    grid = family_sigma_grid("flux", s.final_scale)
    assert s.sigmas == tuple(float(grid[b]) for b in s.boundaries) and s.sigmas != large.schedule().sigmas
    assert flux.distill.batch_size % flux.resources.num_workers == 0
    assert main(["--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "family flux" in out and f"DMD(guidance embedding {flux.distill.losses.dmd.guidance_scale}" in out
    with pytest.raises(PipelineConfigError, match="T5"):
        parse_pipeline_config({**yaml.safe_load(path.read_text()),
                               "teacher": {"path": "x", "family": "flux", "max_sequence_length": 0}})


def test_dry_run_prints_the_published_schedule(capsys):
    assert main(["--config", str(MEDIUM6), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "scales [32, 48, 64, 80, 96, 128]" in out
    assert "sigmas [1.0, 0.9454, 0.8959, 0.7904, 0.7371, 0.6022]" in out
    assert "step 3: scale 80  sigma 0.7904" in out and "ZeRO stage 2" in out
    assert "16 worker(s) × 8.0 CPU, 1.0 GPU" in out and "evaluate and preview: one task × (8.0 CPU, 1.0 GPU)" in out
    assert "LoRA targets (student and fake score): to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2, " \
           "ff_context.net.0.proj, ff_context.net.2" in out
    assert "5 fake-score update(s), then 1 generator update" in out and "every 240 iterations (40 rounds" in out


@pytest.mark.parametrize("field,value,hint", [("checkpoint_every", 250, "use 246 or 252"),
                                              ("steps", 3001, "use 3000 or 3006"), ("checkpoint_every", 4, "use 6")])
def test_checkpoints_must_follow_a_full_round_of_scales(field, value, hint):
    data = _medium6()  # 6 scales
    data["distill"][field] = value
    msg = _error(data)
    assert f"{field} {value} is not a multiple of the schedule's 6 steps" in msg and hint in msg
    data["distill"][field] = 12
    data["distill"]["steps" if field == "checkpoint_every" else "checkpoint_every"] = 12
    assert parse_pipeline_config(data).distill.checkpoint_every == 12


def _medium6() -> dict:
    return yaml.safe_load(MEDIUM6.read_text())


def _error(data) -> str:
    with pytest.raises(PipelineConfigError) as err:
        parse_pipeline_config(data, "test.yaml")
    return str(err.value)


def test_typo_in_a_field_is_named_with_the_allowed_fields():
    data = _medium6()
    data["distill"]["lerning_rate"] = data["distill"].pop("lr")
    msg = _error(data)
    assert "distill.lerning_rate: unknown field" in msg and "lr," in msg
    data = _medium6()
    data["distill"]["schedul"] = data["distill"].pop("schedule")
    msg = _error(data)
    assert "distill.schedul: unknown field; did you mean 'schedule'?" in msg
    assert "distill.schedule: required field is missing" in msg


def test_bad_values_are_named_with_what_is_allowed():
    data = _medium6()
    data["distill"]["zero_stage"] = 5
    data["teacher"]["dtype"] = "fp8"
    data["distill"]["schedule"]["preset"] = "sd35_medum_6step"
    data["resources"]["storage"] = "gs://bucket/x"
    msg = _error(data)
    assert "distill.zero_stage: got 5: Input should be 0, 1, 2 or 3" in msg
    assert "teacher.dtype: got 'fp8'" in msg and "'bfloat16'" in msg
    assert "did you mean 'sd35_medium_6step'?" in msg
    assert "resources.storage: got 'gs://bucket/x'" in msg and "s3://" in msg
    assert "4 problems" in msg


def test_grid_ranges_are_checked_up_front():
    data = _medium6()
    data["distill"]["losses"]["dmd"] = {"grid_range": [30, 10]}
    data["distill"]["losses"]["mmd"] = {"grid_range": [18, 40]}
    msg = _error(data)
    assert "distill.losses.dmd.grid_range: got [30, 10]" in msg and "0 <= low < high <= 28" in msg
    assert "distill.losses.mmd.grid_range: got [18, 40]" in msg


def test_schedule_errors_point_at_the_schedule():
    data = _medium6()
    data["distill"]["schedule"] = {"scales": [32, 48, 40, 128], "boundaries": [0, 7, 14, 18]}
    assert "distill.schedule: scales [32, 48, 40, 128]: must be non-decreasing" in _error(data)
    data["distill"]["schedule"] = {"scales": [32, 49, 64, 128], "boundaries": [0, 7, 14, 18]}
    assert "not divisible by the transformer patch size 2" in _error(data)
    data["distill"]["schedule"] = {"scales": [32, 48, 64, 128], "boundaries": [0, 7, 14]}
    assert "one grid index per scale" in _error(data)
    data["distill"]["schedule"] = {"preset": "toy_4step", "scales": [8]}
    assert "not both" in _error(data)


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    data = _medium6()
    data["distill"]["losses"]["mmd"]["weight"] = -1
    bad.write_text(yaml.safe_dump(data))
    assert main(["--config", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "distill.losses.mmd.weight: got -1" in err and "Traceback" not in err
    assert main(["--config", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2
    assert "no such pipeline definition" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("name: [unclosed")
    assert main(["--config", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_validation_needs_the_shapes_scorer_and_an_equal_share_per_worker():
    data = _medium6()  # a real SD3.5 teacher: no scorer to choose a checkpoint by
    data["distill"]["validation"] = {"num_prompts": 64}
    assert "distill.validation scores students with the shapes-domain evaluator" in _error(data)
    toy = yaml.safe_load((MEDIUM6.parent / "toy.yaml").read_text())
    toy["distill"]["validation"] = {"num_prompts": 9}  # 2 workers
    assert "must be divisible by resources.num_workers 2" in _error(toy)
    toy["distill"]["validation"] = {"num_prompts": 1}
    assert "needs at least 2 images" in _error(toy)
    toy["distill"]["validation"] = {"num_prompts": 64, "metric": "prompt_accuracy"}
    assert parse_pipeline_config(toy).distill.validation.metric == "prompt_accuracy"


def test_renamed_fields_name_their_new_name():
    retrain = yaml.safe_load((MEDIUM6.parent / "toy_retrain.yaml").read_text())
    retrain["evaluate"] = {"teacher_guidance": 4.5}
    retrain["retrain"]["iterations"] = retrain["retrain"].pop("steps")
    retrain["retrain"]["gate"] = {"teacher_guidance": 4.5}
    msg = _error(retrain)
    assert "evaluate.teacher_guidance: was renamed to evaluate.teacher_guidance_scale" in msg
    assert "retrain.gate.teacher_guidance: was renamed to retrain.gate.teacher_guidance_scale" in msg
    assert "retrain.iterations: was renamed to retrain.steps" in msg and "3 problems" in msg
    with pytest.raises(PipelineConfigError,
                       match="evaluate.teacher_guidance was renamed to evaluate.teacher_guidance_scale"):
        apply_overrides(_medium6(), ["evaluate.teacher_guidance=3"])
    # the new names are the real fields, and no old name is still a field of its model
    for (model, old), new in RENAMED.items():
        assert new in model.model_fields and old not in model.model_fields


def test_renames_are_only_reported_in_their_own_section():
    data = _medium6()
    data["synthesize"] = {"iterations": 3}  # `iterations` was renamed in retrain, never existed here
    msg = _error(data)
    assert "synthesize.iterations: unknown field" in msg and "renamed" not in msg
    assert model_at(PipelineConfig, ("retrain", "gate", "x")).__name__ == "GateConfig"


def test_the_loss_section_builds_every_loss_setting_with_the_algorithms_defaults():
    """`distill.losses` and `swd_core`'s `LossSettings` cannot drift: the section's defaults are
    the settings' defaults, and every field of the section reaches its setting."""
    from dataclasses import fields

    from pipelines.schema import LossesConfig
    from swd_core.training import LossSettings

    assert LossesConfig().settings() == LossSettings()
    given = {"feature_block": 3,
             "mmd": {"weight": 0.5, "kernel": "rbf", "c": 0.25, "rbf_bandwidth": 7.0, "grid_range": [1, 2]},
             "dmd": {"weight": 0.25, "guidance_scale": 3.0, "grid_range": [3, 4], "min_scale": 16},
             "gan": {"weight": 0.125, "discriminator_weight": 0.0625}}

    def leaves(section: dict) -> list[str]:
        return sorted(f"{k}.{f}" if isinstance(v, dict) else k for k, v in section.items()
                      for f in (v if isinstance(v, dict) else [None]))

    assert leaves(given) == leaves(LossesConfig().model_dump())  # a new field of the section is given here
    built, default = LossesConfig.model_validate(given).settings(grid=(1.0, 0.5)), LossSettings()
    unset = [f.name for f in fields(LossSettings) if getattr(built, f.name) == getattr(default, f.name)]
    assert unset == ["fake_range"]  # a setting the definition does not offer
