"""docs/configuration.md is generated from the schema, and every field of the schema is described."""

import difflib

from pipelines.cli import main
from pipelines.schema import PipelineConfig
from pipelines.schema_docs import DOCS_PATH, REGENERATE, render_markdown


def test_committed_reference_is_current():
    expected = render_markdown()
    committed = DOCS_PATH.read_text() if DOCS_PATH.exists() else ""
    if committed != expected:
        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), expected.splitlines(True),
                                                 "docs/configuration.md (committed)", "generated", n=1))[:40])
        raise AssertionError(f"docs/configuration.md is out of date with pipelines/schema.py; regenerate it with "
                             f"`{REGENERATE}` (python -m pipelines.schema_docs docs/configuration.md)\n{diff}")


def test_every_field_has_a_description():
    schema = PipelineConfig.model_json_schema()
    models = {"PipelineConfig": schema, **schema["$defs"]}
    missing = [f"{name}.{field}" for name, model in models.items()
               for field, prop in model.get("properties", {}).items() if not prop.get("description", "").strip()]
    assert not missing, f"fields without Field(description=...) in pipelines/schema.py: {missing}"


def test_reference_lists_every_field_by_its_path():
    text = render_markdown()
    for path in ("`distill.losses.dmd.guidance_scale`", "`evaluate.teacher_guidance_scale`", "`retrain.steps`",
                 "`retrain.gate.metrics[].min_margin`", "`data.sources[].format`", "`resources.s3.endpoint_url`"):
        assert f"| {path} |" in text, path
    # a field with its type, default and description in one row
    assert ("| `distill.lora.rank` | integer (>= 1) | `64` | LoRA rank of both adapters. |") in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    schema = PipelineConfig.model_json_schema()
    fields = len(schema["properties"]) + sum(len(m.get("properties", {})) for m in schema["$defs"].values())
    assert len(rows) == fields


def test_swd_schema_markdown_prints_the_reference(capsys):
    assert main(["schema", "--markdown"]) == 0
    assert capsys.readouterr().out == render_markdown()
