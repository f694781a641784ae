"""The distill stage's progress line: its ETA from the measured pace, and what it says early on."""

import re
from pathlib import Path

from pipelines.schema import load_pipeline_config
from pipelines.stages.distill.progress import Progress, format_duration

TOY = Path(__file__).parents[1] / "pipelines" / "configs" / "toy.yaml"


def test_format_duration():
    assert [format_duration(s) for s in (0, 44.6, 60, 725, 3599, 3600, 11_250)] == \
        ["0s", "45s", "1m00s", "12m05s", "59m59s", "1h00m", "3h07m"]
    assert format_duration(-3) == "0s"


def test_eta_follows_the_pace_after_the_first_step(capsys):
    cfg = load_pipeline_config(TOY, ["distill.steps=100", "distill.log_every=10"])
    now = [0.0]
    p = Progress(cfg, rank=0, nodes=1, clock=lambda: now[0])
    terms = {"mmd": 0.5}

    def step(n: int, seconds: float) -> str:
        now[0] += seconds
        p.log(p.metrics(n, 0, terms, seconds, 0.0, 1e-3), terms, save=False)
        return capsys.readouterr().out

    # the first step pays for warm-up (60 s): no pace yet, and it is not counted in the pace after
    assert step(1, 60.0).rstrip().endswith("ETA unknown")
    for n in range(2, 10):
        assert step(n, 2.0) == ""  # no line between log_every steps
    # 9 steps after the first in 18 s: 2 s/step, 90 steps left
    line = step(10, 2.0)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[distill\] step 10/100 ", line), line
    assert line.rstrip().endswith("ETA 3m00s")
    # a slow stretch (a checkpoint, a validation) slows the pace it reports
    now[0] += 40.0
    for n in range(11, 20):
        step(n, 2.0)
    assert step(20, 2.0).rstrip().endswith(f"ETA {format_duration((18 + 40 + 20) / 19 * 80)}")
    assert p.eta(100) == "ETA 0s"


def test_only_rank_0_prints(capsys):
    cfg = load_pipeline_config(TOY, ["distill.steps=100"])
    p = Progress(cfg, rank=1, nodes=1, clock=lambda: 0.0)
    p.log(p.metrics(1, 0, {}, 1.0, 0.0, 1e-3), {}, save=True)
    assert capsys.readouterr().out == ""
