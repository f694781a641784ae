"""The embedded default: the shapes domain, the toy SD3 teacher trained on it,
and the evaluator that makes quality measurable on a CPU."""
