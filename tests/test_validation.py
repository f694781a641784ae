"""How the distill stage chooses its export by validation (`Validation`), without Ray: the scores
are stubbed, the rules are real (best score, ties, non-finite scores, a resumed choice)."""

import json
from pathlib import Path

import pytest
import yaml

from pipelines.schema import parse_pipeline_config
from pipelines.stages.distill.validation import Validation

TOY = Path(__file__).parents[1] / "pipelines" / "configs" / "toy.yaml"
NAN = float("nan")


def _validation(tmp_path, image_size: int = 64, **validation) -> Validation:
    data = yaml.safe_load(TOY.read_text())
    data["distill"]["validation"] = {"num_prompts": 8, **validation}
    data["resources"]["storage"] = str(tmp_path)
    return Validation(parse_pipeline_config(data), rank=0, world=1, image_size=image_size)


def _score(step: int, fd: float, accuracy: float = 0.5) -> dict:
    return {"step": step, "val_fd": fd, "val_fd_mean_term": 0.0, "val_prompt_accuracy": accuracy}


def test_the_export_follows_the_best_score(tmp_path):
    val = _validation(tmp_path)
    fds = iter([NAN, 2.0, 1.5, 1.5, 3.0, NAN])
    val.scores = lambda nets: {k: v for k, v in _score(0, next(fds)).items() if k != "step"}
    chosen, exports = val.restore(None), []
    for step in range(1, 7):
        metrics = val.choose(step, None, chosen, export=lambda validation: exports.append(validation["best"]["step"]))
        assert metrics["val_best_step"] == chosen["best"]["step"]
    # a NaN is chosen only while nothing else is; a tie goes to the later step, as Ray ranks checkpoints
    assert exports == [1, 2, 3, 4]
    assert chosen["best"] == {"step": 4, "metric": "val_fd", "value": 1.5}
    # scores that change nothing still reach the export's record
    record = json.loads((tmp_path / "toy" / "student" / "validation.json").read_text())
    assert [h["step"] for h in record["history"]] == [1, 2, 3, 4, 5, 6] and record["best"]["step"] == 4


def _export_record(tmp_path, record: dict) -> None:
    """The record `export_student` writes last into the toy run's export."""
    path = tmp_path / "toy" / "student" / "validation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_a_resumed_choice_restarts_when_the_definition_chooses_differently(tmp_path, capsys):
    history = [_score(1, 1.0, accuracy=0.2), _score(2, 2.0, accuracy=0.3)]
    record = {"num_prompts": 8, "best": {"step": 1, "metric": "val_fd", "value": 1.0}, "history": history}
    _export_record(tmp_path, record)
    assert _validation(tmp_path).restore(record) == record
    # `best` names the exported weights: under another metric nothing exported is chosen yet
    by_accuracy = _validation(tmp_path, metric="prompt_accuracy").restore(record)
    assert by_accuracy["best"] is None and by_accuracy["history"] == history
    assert _validation(tmp_path, num_prompts=16).restore(record) == {"num_prompts": 16, "best": None, "history": []}
    printed = capsys.readouterr().out
    assert "validation.metric changed (val_fd -> val_prompt_accuracy)" in printed
    assert "earlier scores are not comparable" in printed


def test_a_resumed_choice_is_dropped_when_the_export_holds_another_step(tmp_path, capsys):
    # the checkpoint chose step 1; an attempt after it exported step 3 (or stopped while
    # exporting, before the record) and died before its checkpoint
    history = [_score(1, 1.0)]
    record = {"num_prompts": 8, "best": {"step": 1, "metric": "val_fd", "value": 1.0}, "history": history}
    val = _validation(tmp_path)
    assert val.restore(record) == {**record, "best": None}  # no record: the export is unfinished
    _export_record(tmp_path, {**record, "best": {"step": 3, "metric": "val_fd", "value": 0.9},
                              "history": [*history, _score(3, 0.9)]})
    restored = val.restore(record)
    assert restored["best"] is None and restored["history"] == history
    (tmp_path / "toy" / "student" / "validation.json").write_text(json.dumps(record)[:40])  # cut short
    assert val.restore(record)["best"] is None
    assert "the export does not hold step 1, the checkpoint's choice" in capsys.readouterr().out
    # so the next score replaces the export, whatever it is
    val.scores = lambda nets: {k: v for k, v in _score(0, 5.0).items() if k != "step"}
    exports = []
    val.choose(3, None, restored, export=lambda validation: exports.append(validation["best"]["step"]))
    assert exports == [3]


def test_a_student_the_evaluator_cannot_read_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="128 px images and the shapes evaluator reads 64 px"):
        _validation(tmp_path, image_size=128)
