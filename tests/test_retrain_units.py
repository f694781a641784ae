"""Scheduled retraining without a cluster: the `retrain` section's checks, the schedule's ticks,
rollback's choice, cycle ids, and the registry on a real MLflow SQLite store."""

import json
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
import yaml

from pipelines.retrain import next_tick
from pipelines.retraining.cycle import cycle_config, next_cycle, previous_champion, served_model
from pipelines.schema import PipelineConfigError, load_pipeline_config, parse_pipeline_config

RETRAIN = "pipelines/configs/toy_retrain.yaml"


def with_retrain(**retrain) -> dict:
    d = yaml.safe_load(open(RETRAIN))
    d["retrain"] = {**d["retrain"], **retrain}
    return d


@pytest.mark.parametrize("schedule,words", [
    ("@daily", "5-field cron"),
    ("0 3 * *", "got 4 field"),
    ("0 25 * * *", "not a valid cron expression"),
    ("*/5 * * * * *", "got 6 field"),
])
def test_bad_schedules_are_refused_with_what_kubernetes_accepts(schedule, words):
    with pytest.raises(PipelineConfigError, match=words):
        parse_pipeline_config(with_retrain(schedule=schedule))


def test_bad_retrain_settings_name_the_field():
    with pytest.raises(PipelineConfigError, match="retrain.timezone.*unknown time zone"):
        parse_pipeline_config(with_retrain(timezone="Mars/Olympus"))
    with pytest.raises(PipelineConfigError,
                       match="retrain.steps 50 is not a multiple of the schedule's 4 steps.*48 or 52"):
        parse_pipeline_config(with_retrain(steps=50))
    d = with_retrain(gate={"metrics": [{"name": "prompt_accuracy"}]})
    d["teacher"]["path"] = "builtin:tiny-sd3"
    d["data"]["sources"] = [{"path": "s3://b/x.parquet"}]
    d["distill"]["validation"] = {"num_prompts": 0}
    with pytest.raises(PipelineConfigError, match="need the shapes-domain scorer.*teacher_cfg_denoise, teacher_fd"):
        parse_pipeline_config(d)
    d = with_retrain(gate={"num_prompts": 8})  # no metrics: the domain's default
    assert [m.name for m in parse_pipeline_config(d).retrain.gate.metrics] == ["fd"]
    d["teacher"]["path"] = "builtin:tiny-sd3"
    d["data"]["sources"] = [{"path": "s3://b/x.parquet"}]
    d["distill"]["validation"] = {"num_prompts": 0}
    assert [m.name for m in parse_pipeline_config(d).retrain.gate.metrics] == ["teacher_cfg_denoise"]
    d = with_retrain()
    d["resources"]["storage"] = "s3://bucket/swd"
    with pytest.raises(PipelineConfigError, match="tracking server URI"):
        parse_pipeline_config(d)


def test_ticks_follow_the_time_zone():
    after = datetime(2026, 3, 28, 12, 0, tzinfo=ZoneInfo("Europe/Berlin"))  # the night clocks go forward
    tick = next_tick("0 3 * * *", "Europe/Berlin", after)
    assert (tick.year, tick.month, tick.day, tick.hour) == (2026, 3, 29, 3)
    assert tick.utcoffset().total_seconds() == 2 * 3600  # summer time from 02:00 that night
    utc = next_tick("30 2 * * 1", "UTC", datetime(2026, 12, 2, 14, 0, tzinfo=ZoneInfo("UTC")))
    assert utc.isoformat() == "2026-12-07T02:30:00+00:00"  # the next Monday


def test_rollback_goes_back_through_promotions_not_back_and_forth():
    history = [{"version": 1, "why": "cycle-0001: gate passed"}, {"version": 2, "why": "cycle-0002: gate passed"},
               {"version": 4, "why": "cycle-0004: gate passed"}]
    assert previous_champion(history, 4) == 2
    history.append({"version": 2, "why": "rollback from v4"})
    assert previous_champion(history, 2) == 1  # twice: two versions back
    assert previous_champion(history[:1], 1) is None


def test_each_cycle_has_its_folder_and_the_run_shares_its_store(tmp_path):
    d = with_retrain()
    d["resources"]["storage"] = str(tmp_path)
    cfg = parse_pipeline_config(d)
    assert next_cycle(cfg) == ("cycle-0001", None)
    c = cycle_config(cfg, "cycle-0001", 96)
    assert c.run_dir == f"{tmp_path}/toy-retrain/cycles/cycle-0001"
    assert c.precompute.output == f"{tmp_path}/toy-retrain/store" and c.distill.steps == 96
    folder = tmp_path / "toy-retrain" / "cycles" / "cycle-0001"
    folder.mkdir(parents=True)
    (folder / "cycle.json").write_text(json.dumps({"state": "running"}))
    assert next_cycle(cfg) == ("cycle-0001", {"state": "running"})  # unfinished: resumed
    (folder / "cycle.json").write_text(json.dumps({"state": "finished"}))
    assert next_cycle(cfg)[0] == "cycle-0002"


def test_registry_versions_alias_and_its_history(tmp_path):
    from pipelines.retraining.registry import Registry

    d = with_retrain()
    d["resources"]["storage"] = str(tmp_path)
    cfg = parse_pipeline_config(d)
    reg = Registry(cfg)
    assert reg.uri == f"sqlite:///{tmp_path}/toy-retrain/registry.db" and reg.champion() is None
    run = reg.start_run("cycle-0001")
    reg.log_metrics(run, {"generator": 1.5, "not_a_number": float("nan")}, step=3)
    v1 = reg.register("/s/1", run, {"cycle": "cycle-0001", "metrics": json.dumps({"fd": 2.0})})
    v2 = reg.register("/s/2", run, {"cycle": "cycle-0002", "metrics": json.dumps({"fd": 1.0})})
    reg.set_champion(v1.number, "cycle-0001: gate passed")
    reg.set_champion(v2.number, "cycle-0002: gate passed")
    again = Registry(cfg)  # a new process sees the same
    assert again.champion().number == 2 and again.champion().source == "/s/2"
    assert [v.number for v in again.versions()] == [1, 2] and again.versions()[1].aliases == ["champion"]
    assert again.versions()[0].metrics == {"fd": 2.0}
    assert [(h["version"], h["previous"]) for h in again.alias_history()] == [(1, None), (2, 1)]
    assert [m.step for m in again.client.get_metric_history(run, "generator")] == [3]
    artifacts = again.client.get_experiment(again.experiment_id).artifact_location
    assert (tmp_path / "toy-retrain" / "mlflow-artifacts").as_uri() in artifacts


def test_a_cycle_registers_one_version_however_often_it_resumes(tmp_path):
    from pipelines.retraining.registry import Registry

    d = with_retrain()
    d["resources"]["storage"] = str(tmp_path)
    reg = Registry(parse_pipeline_config(d))
    run = reg.start_run("cycle-0001")
    first = reg.register_cycle("cycle-0001", "/s/1", run, {"gate": "passed"})
    again = reg.register_cycle("cycle-0001", "/s/1-resumed", run, {"gate": "failed"})  # killed after registering
    other = reg.register_cycle("cycle-0002", "/s/2", run, {"gate": "passed"})
    assert (first.number, again.number, other.number) == (1, 1, 2)
    assert [(v.number, v.source, v.tags["cycle"], v.tags["gate"]) for v in reg.versions()] == [
        (1, "/s/1", "cycle-0001", "passed"), (2, "/s/2", "cycle-0002", "passed")]


def test_the_teacher_fd_gate_metric_is_zero_on_the_teachers_own_samples_and_grows_away_from_them():
    """`teacher_fd`: the Fréchet distance between the teacher's readings of a model's samples and of
    its own (the references). The teacher's own samples score 0; the same images with noise added
    score above 0, and more noise scores higher."""
    import torch

    from pipelines.retraining.gate import Gate

    gate = Gate(parse_pipeline_config(with_retrain(gate={
        "metrics": [{"name": "teacher_fd"}], "num_prompts": 8, "batch_size": 8, "teacher_steps": 4})))
    images = gate._decode(gate.reference_latents())
    fd = [gate.score_samples(None, (images + s * torch.randn(images.shape, generator=torch.Generator().manual_seed(0)))
                             .clamp(-1, 1)).metrics["teacher_fd"] for s in (0.0, 0.3, 1.0)]
    assert abs(fd[0]) < 1e-6 * fd[2] and 0 < fd[1] < fd[2], fd


def test_the_served_model_id_names_the_version():
    cfg = load_pipeline_config(RETRAIN)

    class V:
        number, source = 7, "/runs/x/cycles/cycle-0007/student/merged"

    served = served_model(cfg, V)
    assert served.serve.model_id == "toy-retrain-swd-v7" and served.serve.model == V.source


def test_teacher_alignment_is_a_gate_metric_where_higher_is_better():
    from pipelines.schema import GateMetric

    assert GateMetric(name="teacher_alignment").resolved_direction == "max"
    assert GateMetric(name="teacher_alignment", direction="min").resolved_direction == "min"
    assert GateMetric(name="teacher_cfg_denoise").resolved_direction == "min"
    with pytest.raises(PipelineConfigError, match="alignment_sigmas"):
        parse_pipeline_config(with_retrain(gate={"alignment_sigmas": [0.5, 1.0]}))


def test_the_gate_reads_what_the_images_show_unless_told_to_read_raw_latents():
    """With `gate.reencode` (the default) the teacher metrics see only the decoded images: two
    latent sets behind the same images score alike. Raw, they score apart."""
    import torch

    from pipelines.retraining.gate import Gate

    d = with_retrain(gate={"num_prompts": 4, "batch_size": 4, "metrics": [{"name": "teacher_denoise"},
                                                                          {"name": "teacher_cfg_denoise"}]})
    d["evaluate"] = {**d.get("evaluate", {}), "num_prompts": 4}
    gate = Gate(parse_pipeline_config(d))
    torch.manual_seed(0)
    latents = torch.randn(4, gate.teacher().latent_channels, 16, 16)
    images = gate._decode(latents)
    other = latents + 0.5 * torch.randn_like(latents)  # not what these images encode to
    same = [gate.score_samples(x, images).metrics for x in (latents, other)]
    assert same[0] == same[1]
    gate.g.reencode = False
    raw = [gate.score_samples(x, images).metrics for x in (latents, other)]
    assert all(raw[0][m] != raw[1][m] for m in raw[0])


def _gate(metrics: list[dict]):
    """A Gate holding only the `retrain.gate` section (verdict reads nothing else): no prompts, no teacher."""
    from pipelines.retraining.gate import Gate

    gate = object.__new__(Gate)
    gate.g = parse_pipeline_config(with_retrain(gate={"metrics": metrics})).retrain.gate
    return gate


def scored(per_prompt: dict):
    """A model's gate scores: per metric, its per-prompt values (a number: 8 prompts scoring alike)."""
    import numpy as np

    from pipelines.retraining.gate import Scored
    from swd_core.bootstrap import Reading

    values = {k: np.full(8, v, dtype=float) if np.isscalar(v) else np.asarray(v, dtype=float)
              for k, v in per_prompt.items()}
    return Scored({k: float(v.mean()) for k, v in values.items()}, None,
                  {k: Reading(values=v) for k, v in values.items()})


# (metric, margin, candidate, champion, passes); values exact in binary, so the margin edge is exact.
# Every prompt scores alike here, so the interval of the difference is the difference itself.
# fd: lower is better, gain = champion - candidate; prompt_accuracy: higher is better, gain = candidate - champion.
VERDICTS = [
    ("fd", 0.0, 1.25, 1.5, True),         # better
    ("fd", 0.0, 1.75, 1.5, False),        # worse
    ("fd", 0.0, 1.5, 1.5, True),          # a tie passes a zero margin
    ("fd", 0.25, 1.25, 1.5, True),        # better by exactly the margin
    ("fd", 0.25, 1.375, 1.5, False),      # better, by less than the margin
    ("fd", -0.25, 1.625, 1.5, True),      # worse, within the tolerance
    ("fd", -0.25, 1.875, 1.5, False),     # worse, beyond it
    ("prompt_accuracy", 0.0, 0.625, 0.5, True),
    ("prompt_accuracy", 0.0, 0.375, 0.5, False),
    ("prompt_accuracy", 0.125, 0.625, 0.5, True),
    ("prompt_accuracy", 0.125, 0.5625, 0.5, False),
    ("prompt_accuracy", -0.125, 0.4375, 0.5, True),
    ("prompt_accuracy", -0.125, 0.25, 0.5, False),
]


@pytest.mark.parametrize("name,margin,candidate,champion,passes", VERDICTS)
def test_gate_verdict_follows_the_metric_direction_and_margin(name, margin, candidate, champion, passes):
    passed, lines, diffs = _gate([{"name": name, "min_margin": margin}]).verdict(scored({name: candidate}),
                                                                                 scored({name: champion}))
    gain = champion - candidate if name == "fd" else candidate - champion
    assert passed is passes
    assert lines == [f"{name}: candidate {candidate:.4f} vs champion {champion:.4f} "
                     f"({'lower' if name == 'fd' else 'higher'} is better; gain {gain:+.4f}, 95% interval "
                     f"[{gain:+.4f}, {gain:+.4f}] over 8 prompts, its lower end needs >= {margin:+.4f}): "
                     f"{'pass' if passes else 'FAIL'}"]
    assert diffs[name]["value"] == candidate - champion
    assert diffs[name]["lo"] == diffs[name]["hi"] == candidate - champion


def test_gate_verdict_takes_an_explicit_direction_over_the_metric_default():
    # teacher_denoise defaults to lower-is-better, teacher_alignment to higher-is-better
    assert _gate([{"name": "teacher_denoise", "direction": "max"}]).verdict(
        scored({"teacher_denoise": 2.0}), scored({"teacher_denoise": 1.0}))[0] is True
    assert _gate([{"name": "teacher_alignment", "direction": "min"}]).verdict(
        scored({"teacher_alignment": 0.75}), scored({"teacher_alignment": 0.5}))[0] is False


def test_gate_verdict_without_a_champion_promotes_the_first_candidate():
    gate = _gate([{"name": "fd", "min_margin": 0.5}])
    assert gate.verdict(scored({"fd": 99.0}), None) == (True, ["no champion yet: the first version is promoted"], {})


@pytest.mark.parametrize("fd,accuracy,passes", [
    (1.25, 0.625, True),    # better on both
    (1.25, 0.375, False),   # better FD, worse accuracy
    (1.75, 0.625, False),   # worse FD, better accuracy
    (1.75, 0.375, False),
])
def test_gate_verdict_needs_every_metric_to_pass(fd, accuracy, passes):
    gate = _gate([{"name": "fd"}, {"name": "prompt_accuracy"}])
    passed, lines, _ = gate.verdict(scored({"fd": fd, "prompt_accuracy": accuracy}),
                                    scored({"fd": 1.5, "prompt_accuracy": 0.5}))
    assert passed is passes
    assert [line.split(":")[0] for line in lines] == ["fd", "prompt_accuracy"]  # one line per metric, in order
    assert [line.endswith(": pass") for line in lines] == [fd < 1.5, accuracy > 0.5]


def test_gate_decides_on_the_interval_of_the_paired_difference_not_the_point_values():
    """The same mean gain of PickScore over the champion: when every prompt gains a little it
    passes; when a few prompts gain a lot and the others lose, the interval reaches below 0 and
    the candidate stays a candidate. A tolerance (negative margin) lets the noisy one through."""
    import numpy as np

    rng = np.random.default_rng(0)
    champion = rng.normal(20.0, 1.0, 64)
    steady = champion + 0.25 + rng.normal(0, 0.05, 64)
    noisy = champion + np.where(np.arange(64) % 4 == 0, 2.5, -0.5) + rng.normal(0, 0.05, 64)
    assert abs((steady - champion).mean() - (noisy - champion).mean()) < 0.05
    gate = _gate([{"name": "pickscore"}])
    assert gate.verdict(scored({"pickscore": steady}), scored({"pickscore": champion}))[0] is True
    passed, lines, diffs = gate.verdict(scored({"pickscore": noisy}), scored({"pickscore": champion}))
    assert passed is False and diffs["pickscore"]["value"] > 0 > diffs["pickscore"]["lo"]
    assert "FAIL" in lines[0] and "higher is better" in lines[0]
    assert _gate([{"name": "pickscore", "min_margin": -1.0}]).verdict(
        scored({"pickscore": noisy}), scored({"pickscore": champion}))[0] is True
    # a lower-is-better distance of features to the same reference: the paired Fréchet distances
    from pipelines.retraining.gate import Scored
    from swd_core.bootstrap import Reading

    ref = rng.normal(size=(64, 8))
    near, far = ref + rng.normal(0, 0.2, (64, 8)), ref + rng.normal(0.6, 0.2, (64, 8))

    def fd(x):
        reading = Reading(features=x, reference=ref)
        return Scored({"fd_dinov2": reading.statistic()}, None, {"fd_dinov2": reading})

    gate = _gate([{"name": "fd_dinov2"}])
    assert gate.verdict(fd(near), fd(far))[0] is True and gate.verdict(fd(far), fd(near))[0] is False
    assert _gate([{"name": "clip_score"}]).g.metrics[0].resolved_direction == "max"
    intervals = gate.intervals(fd(near))["fd_dinov2"]
    assert intervals["lo"] < intervals["value"] < intervals["hi"]


def test_the_scheduler_outlives_a_failed_cycle_a_broken_definition_and_a_refused_cycle(tmp_path, monkeypatch, capsys):
    """`retrain.py` without --once: each tick reads the definition again and runs a cycle; a cycle
    that raises, a definition that no longer validates and a cycle refused by the lock are
    reported, and the next tick comes. The cycles are stand-ins: what is checked is the loop."""
    from pipelines import retrain
    from pipelines.retraining import cycle

    path = tmp_path / "nightly.yaml"
    good = yaml.safe_dump(with_retrain())
    path.write_text(good)
    ticks = []

    def tick(schedule, timezone, after=None):
        ticks.append(schedule)
        if len(ticks) == 2:
            path.write_text(yaml.safe_dump(with_retrain(steps=50)))  # not a multiple of the schedule's 4 steps
        elif len(ticks) == 3:
            path.write_text(good)
        elif len(ticks) == 5:
            raise KeyboardInterrupt  # how the scheduler is stopped
        return datetime.now(ZoneInfo(timezone))

    outcomes = iter([RuntimeError("boom"), cycle.CycleRefused("another retraining cycle is running"), None])
    ran = []

    def run_cycle(cfg, force=False):
        ran.append(cfg.name)
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome
        return {"cycle": "cycle-0001"}

    monkeypatch.setattr(retrain, "next_tick", tick)
    monkeypatch.setattr(cycle, "run_cycle", run_cycle)
    with pytest.raises(KeyboardInterrupt):
        retrain.scheduler(str(path))
    out, err = capsys.readouterr()
    assert len(ticks) == 5 and len(ran) == 3  # tick 2 ran no cycle: its definition did not validate
    assert "[retrain] error: the cycle failed; it resumes at the next tick" in err and "RuntimeError: boom" in err
    assert "[retrain] error: the definition no longer validates; skipping this tick" in err
    assert "retrain.steps 50" in err
    assert "[retrain] warning: another retraining cycle is running" in err
    assert out.count("[retrain] next cycle of") == 4  # the fifth tick stopped it


def test_retrain_takes_set_as_distill_does(tmp_path, capsys):
    """`--set` before or after the command, applied before validation, refused with what is wrong."""
    from pipelines import retrain

    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(with_retrain()))
    name = with_retrain()["name"]
    for where, argv in (("a", ["status", "--config", str(path), "--set", f"resources.storage={tmp_path / 'a'}"]),
                        ("b", ["--set", f"resources.storage={tmp_path / 'b'}", "status", "--config", str(path)])):
        assert retrain.main(argv) == 0
        assert f"cycles under {tmp_path / where}/{name}/cycles" in capsys.readouterr().out
    assert retrain.main(["--config", str(path), "--once", "--set", "retrain.stepz=8"]) == 2
    assert "unknown field 'retrain.stepz' (did you mean 'retrain.steps'?)" in capsys.readouterr().err
    assert retrain.main(["--config", str(path), "--once", "--set", "retrain.steps=6"]) == 2
    assert "retrain.steps 6 is not a multiple" in capsys.readouterr().err
