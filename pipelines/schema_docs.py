"""docs/configuration.md, generated from the pipeline definition's schema (pipelines/schema.py).

    make docs                                   # writes docs/configuration.md
    python -m pipelines.schema_docs [PATH]      # the same; no PATH: to stdout
    swd schema --markdown                       # to stdout

The reference is the pydantic models' JSON Schema, read section by section: a table per model
with each field's dotted path, type, default and description. tests/test_schema_docs.py fails
when the committed file and this output differ.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

DOCS_PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
REGENERATE = "make docs"

HEADER = """# Configuration reference

<!-- Generated from pipelines/schema.py by `{regenerate}` \
(python -m pipelines.schema_docs docs/configuration.md); do not edit by hand. -->

A pipeline definition is one YAML file (`swd run --config my.yaml`); the shipped ones are in
[pipelines/configs](../pipelines/configs). Every section below is a mapping in that file, and a
field's path is its place in it: `distill.losses.dmd.guidance_scale` is

```yaml
distill:
  losses:
    dmd:
      guidance_scale: 4.5
```

and `--set distill.losses.dmd.guidance_scale=4.5` overrides it from the command line. Unknown
fields are errors (with the closest allowed name, or the new name of a renamed field);
`swd plan --config my.yaml` validates a file and prints what it would run. `swd schema` prints
the same schema as JSON Schema, for editors' YAML completion.
"""


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _anchor(path: str) -> str:
    """GitHub's heading anchor for the heading "`path`"."""
    return re.sub(r"[^a-z0-9_ -]", "", f"`{path}`".lower()).replace(" ", "-")


def _cell(text: str) -> str:
    # a table cell is one line, and `|` ends it even inside a code span
    return " ".join(text.split()).replace("|", "\\|")


def _value(v: Any) -> str:
    return f"`{json.dumps(v, ensure_ascii=False)}`"


def _constraints(p: dict) -> list[str]:
    out = []
    for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in p:
            out.append(f"{op} {p[key]:g}")
    if "pattern" in p:
        out.append(f"matching `{p['pattern']}`")
    if "minItems" in p and "prefixItems" not in p:
        out.append(f"at least {p['minItems']}")
    return out


def _type(p: dict, links: dict[str, str]) -> str:
    """A readable type for a JSON Schema property; `links` maps a model to its section's path."""
    if "$ref" in p:
        name = _ref_name(p["$ref"])
        return f"[section](#{_anchor(links[name])})"
    if "anyOf" in p:
        return " or ".join(_type(option, links) for option in p["anyOf"])
    if "const" in p:
        return _value(p["const"])
    if "enum" in p:
        return "one of " + ", ".join(_value(v) for v in p["enum"])
    kind = p.get("type")
    if kind == "array":
        if "prefixItems" in p:
            base = "[" + ", ".join(_type(i, links) for i in p["prefixItems"]) + "]"
        else:
            items = p.get("items", {})
            if "$ref" in items:
                base = f"list of [sections](#{_anchor(links[_ref_name(items['$ref'])])})"
            elif "enum" in items:
                base = "list, each " + _type(items, links)
            else:
                base = f"list of {_type(items, links)}"
    else:
        base = {"integer": "integer", "number": "number", "string": "string", "boolean": "boolean",
                "null": "null", "object": "mapping"}.get(kind, "any")
    extra = _constraints(p)
    return f"{base} ({', '.join(extra)})" if extra else base


def _nested(p: dict) -> tuple[str, str] | None:
    """(model name, path suffix) of a property that holds a model, a model or null, or a list of models."""
    options = p.get("anyOf", [p])
    for option in options:
        if "$ref" in option:
            return _ref_name(option["$ref"]), ""
        if option.get("type") == "array" and "$ref" in option.get("items", {}):
            return _ref_name(option["items"]["$ref"]), "[]"
    return None


def _sections(schema: dict) -> list[tuple[str, str, dict]]:
    """(path, model name, model schema) of every section, depth first in the fields' order."""
    defs = schema.get("$defs", {})
    out: list[tuple[str, str, dict]] = []

    def walk(path: str, name: str, model: dict) -> None:
        out.append((path, name, model))
        for field, p in model.get("properties", {}).items():
            nested = _nested(p)
            if nested:
                child, suffix = nested
                walk(f"{path}.{field}{suffix}".lstrip("."), child, defs[child])

    walk("", schema.get("title", "PipelineConfig"), schema)
    return out


def render_markdown(schema: dict | None = None) -> str:
    """The configuration reference for `schema` (default: the pipeline definition's)."""
    if schema is None:
        from pipelines.schema import PipelineConfig

        schema = PipelineConfig.model_json_schema()
    sections = _sections(schema)
    # a model used at one place links there; each model appears once in this schema
    links = {name: path or "top level" for path, name, _ in sections}
    parts = [HEADER.format(regenerate=REGENERATE), "## Sections\n"]
    for path, _, _ in sections:
        title = path or "top level"
        depth = path.count(".") + (1 if path else 0)
        parts.append(f"{'  ' * depth}- [`{title}`](#{_anchor(title)})")
    parts.append("")
    for path, _, model in sections:
        title = path or "top level"
        parts.append(f"## `{title}`\n")
        if model.get("description"):
            parts.append(model["description"].strip() + "\n")
        parts.append("| field | type | default | description |\n|---|---|---|---|")
        required = set(model.get("required", []))
        for field, p in model.get("properties", {}).items():
            full = f"{path}.{field}" if path else field
            if field in required:
                default = "required"
            elif _nested(p) and isinstance(p.get("default"), dict):
                default = "see its section"  # the whole sub-mapping of defaults would say nothing here
            else:
                default = _value(p.get("default"))
            row = [f"`{full}`", _type(p, links), default, p.get("description", "")]
            parts.append("| " + " | ".join(_cell(c) for c in row) + " |")
        parts.append("")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    text = render_markdown()
    if argv:
        Path(argv[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
