"""The embedded default: the shapes domain, the toy SD3 teacher trained on it,
and the evaluator that makes quality measurable on a CPU."""

from pathlib import Path

# The committed weights: read by the evaluator (swd_core.evaluate_model) and written by the
# trainer (swd_core.toy.train), which imports the evaluator.
WEIGHTS = Path(__file__).parent / "weights"
CLASSIFIER = WEIGHTS / "classifier.safetensors"
TEACHER = WEIGHTS / "toy-sd3"
RECORD = WEIGHTS / "training_record.json"
