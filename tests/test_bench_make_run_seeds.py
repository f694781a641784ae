"""bench/make_run_seeds.py reads each seed's evaluate report and continues an interrupted sweep."""

import json

import pytest

from bench import make_run_seeds


def _report(student_acc, student_fd, teacher_acc=0.255, teacher_fd=3.0):
    def model(name, acc, fd):
        return {"name": name, "prompt_accuracy": acc, "fd": fd, "n": 192}

    return {"models": [model("teacher_28_cfg", 0.45, 1.4), model("teacher_4", teacher_acc, teacher_fd),
                       model("swd_4", student_acc, student_fd)], "student": {"chosen": {"step": 144}}}


def test_reads_existing_reports_instead_of_rerunning_and_counts_seeds_that_beat_the_teacher(tmp_path, monkeypatch):
    for seed, (acc, fd) in {0: (0.30, 1.5), 1: (0.25, 1.2), 2: (0.28, 3.5)}.items():
        path = tmp_path / f"seed{seed}" / "toy" / "eval" / "report.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(_report(acc, fd)))
    monkeypatch.setattr(make_run_seeds, "run_seed", lambda cmd: pytest.fail("a stored seed was rerun"))
    out = tmp_path / "out.json"
    make_run_seeds.main(["--seeds", "0,1,2", "--storage", str(tmp_path), "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["seed"] for r in result["rows"]] == [0, 1, 2]
    assert [(r["beats_on_accuracy"], r["beats_on_fd"]) for r in result["rows"]] == [(True, True), (False, True),
                                                                                   (True, False)]
    assert result["summary"]["beats_on_both"] == 1 and result["summary"]["student_fd"]["max"] == 3.5
    assert result["rows"][0]["teacher_4_accuracy"] == 0.255 and result["runs"][0]["reused_report"]
    assert "machine" in result and "command" in result


def test_a_failed_seed_stops_the_sweep_with_its_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(make_run_seeds, "run_seed", lambda cmd: 3)
    with pytest.raises(SystemExit, match="seed 4: the run failed \\(rc 3\\)"):
        make_run_seeds.main(["--seeds", "4", "--storage", str(tmp_path), "--out", str(tmp_path / "o.json")])


def test_the_seed_and_storage_are_not_overridable(tmp_path):
    with pytest.raises(SystemExit):
        make_run_seeds.main(["--set", "distill.seed=3", "--storage", str(tmp_path)])
