"""The project's log lines (pipelines/logs.py): one line per event with its time and stage, the
level chosen by --quiet/--verbose, warnings on stderr, and one rank speaking for a Ray Train run."""

import argparse
import re

import pytest

from pipelines.logs import LEVEL_ENV, add_verbosity_arguments, apply_verbosity, configure, logger, tag_of

TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


@pytest.fixture(autouse=True)
def default_level(monkeypatch):
    monkeypatch.delenv(LEVEL_ENV, raising=False)
    yield
    configure("INFO")  # the next test's capture streams, at the default level


def test_a_line_says_when_which_stage_and_what(capsys):
    configure()
    logger("pipelines.stages.distill.export").info("exported the student")
    logger("pipelines.retraining.cycle").warning("the gate failed")
    logger("pipelines.distill").info("starting", extra={"tag": "precompute"})
    logger("pipelines.stages.distill.export").debug("not at the default level")
    out, err = capsys.readouterr()
    assert re.fullmatch(rf"{TIME} \[distill\] exported the student\n{TIME} \[precompute\] starting\n", out), out
    assert re.fullmatch(rf"{TIME} \[retrain\] warning: the gate failed\n", err), err


def test_tags_follow_the_module():
    assert [tag_of(n) for n in ("pipelines.stages.precompute.stage", "pipelines.retrain", "pipelines.tracking",
                                "pipelines.distill", "pipelines.stages.evaluate")] == \
        ["precompute", "retrain", "tracking", "pipeline", "evaluate"]


def test_ranks_other_than_0_say_only_what_goes_wrong(capsys):
    configure(rank=1)
    logger("pipelines.stages.distill.progress").info("step 10/100")
    logger("pipelines.stages.distill.trainer").error("rank 1 failed")
    out, err = capsys.readouterr()
    assert out == "" and "[distill] error: rank 1 failed" in err
    configure(rank=0)
    logger("pipelines.stages.distill.progress").info("step 10/100")
    assert "[distill] step 10/100" in capsys.readouterr().out


@pytest.mark.parametrize("flags, info, debug", [([], True, False), (["--quiet"], False, False),
                                                (["-v"], True, True)])
def test_quiet_and_verbose(flags, info, debug, capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    add_verbosity_arguments(parser)
    level = apply_verbosity(parser.parse_args(flags))
    import os

    assert os.environ[LEVEL_ENV] == level  # what the Ray workers it starts read (ray_runtime.worker_env)
    log = logger("pipelines.stages.precompute.stage")
    log.info("checked 4 rows")
    log.debug("read 3 files")
    log.warning("1 row quarantined")
    out, err = capsys.readouterr()
    assert ("checked 4 rows" in out) == info and ("read 3 files" in out) == debug
    assert "warning: 1 row quarantined" in err
    with pytest.raises(SystemExit):
        parser.parse_args(["--quiet", "--verbose"])


def test_the_level_reaches_the_workers(monkeypatch):
    from pipelines.ray_runtime import worker_env

    monkeypatch.setenv(LEVEL_ENV, "WARNING")
    assert worker_env()[LEVEL_ENV] == "WARNING"
    monkeypatch.setenv(LEVEL_ENV, "LOUD")
    with pytest.raises(ValueError, match="not a logging level"):
        configure()
