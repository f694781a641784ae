"""Built-in prompt sets: `builtin:parti` is PartiPrompts (Google Research, Apache 2.0; the file,
its licence and attribution are in pipelines/prompts/parti/), optionally narrowed to categories
and challenge aspects: `builtin:parti?category=animals,vehicles&challenge=basic`. Names match
without regard to case and punctuation (`food-beverage` is "Food & Beverage")."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qs

PARTI = Path(__file__).parent / "prompts" / "parti" / "PartiPrompts.tsv"
SETS = ("parti",)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@lru_cache(maxsize=1)
def parti_rows() -> tuple[dict, ...]:
    """Every row of PartiPrompts.tsv: {prompt, category, challenge, note}, in the file's order.
    Tab-separated without quoting: a prompt keeps its quotation marks."""
    lines = PARTI.read_text(encoding="utf-8").splitlines()
    header = [h.lower() for h in lines[0].split("\t")]
    return tuple(dict(zip(header, line.split("\t"))) for line in lines[1:] if line.strip())


def _choose(spec: str, key: str, wanted: list[str]) -> set[str]:
    known = {slug(r[key]): r[key] for r in parti_rows()}
    unknown = [w for w in wanted if slug(w) not in known]
    if unknown:
        raise ValueError(f"{spec}: unknown {key}(s) {unknown}; PartiPrompts has: {', '.join(sorted(set(known)))}")
    return {known[slug(w)] for w in wanted}


def builtin_prompts(spec: str) -> list[str]:
    """The prompts of a `builtin:` prompt set, in the file's order."""
    name, _, query = spec.removeprefix("builtin:").partition("?")
    if name not in SETS:
        raise ValueError(f"{spec}: unknown built-in prompt set {name!r}; "
                         f"known: {', '.join(f'builtin:{s}' for s in SETS)}")
    options = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    extra = sorted(set(options) - {"category", "challenge"})
    if extra:
        raise ValueError(f"{spec}: unknown option(s) {extra}; builtin:parti takes category= and challenge= "
                         "(comma-separated names)")
    rows = parti_rows()
    for key in ("category", "challenge"):
        if key in options:
            names = [n for v in options[key] for n in v.split(",") if n.strip()]
            keep = _choose(spec, key, names)
            rows = tuple(r for r in rows if r[key] in keep)
    if not rows:
        raise ValueError(f"{spec}: no PartiPrompts prompt has both the category and the challenge asked for")
    return [r["prompt"] for r in rows]
