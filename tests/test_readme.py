"""The README's commands and links name things that exist: every file a `bash` block passes to a
command, every `make` target, every `python -m` module, every linked path. Files a block creates
(`cp ... my.yaml`, `> rayjob.yaml`, `out.png`) count as existing after the line that makes them."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def bash_lines() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = []
    for block in blocks:
        joined = block.replace("\\\n", " ")  # continuation lines
        lines += [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]
    return lines


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def test_commands_name_existing_files_targets_and_modules():
    made: set[str] = set()
    problems = []
    for line in bash_lines():
        for part in re.split(r"\s*(?:\|\||&&|\|)\s*", line):
            try:
                words = shlex.split(part)
            except ValueError:
                continue
            if not words:
                continue
            if words[0] == "make":
                problems += [f"{line}: no make target {t!r}"
                             for t in words[1:] if "=" not in t and t not in make_targets()]
            if words[:2] == ["python", "-m"] and len(words) > 2:
                module = ROOT / words[2].replace(".", "/")
                if not (module.with_suffix(".py").exists() or (module / "__init__.py").exists()):
                    problems.append(f"{line}: no module {words[2]}")
            for i, w in enumerate(words):
                if i and words[i - 1] == ">":
                    made.add(w)
                    continue
                if w.startswith("-") or "://" in w or "$" in w or w in made or "=" in w:
                    continue
                if re.fullmatch(r"[\w./-]+\.(py|yaml|yml|md|txt|toml)", w):
                    if words[0] == "cp" and i == len(words) - 1:
                        made.add(w)
                    elif not (ROOT / w).exists():
                        problems.append(f"{line}: {w} does not exist")
    assert not problems, "\n".join(problems)


def test_links_point_to_existing_paths():
    links = [t for t in re.findall(r"\]\(([^)#]+)\)", README) if "://" not in t]
    assert links
    missing = [t for t in links if not (ROOT / t).exists()]
    assert not missing, missing
