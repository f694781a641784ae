#!/usr/bin/env python
"""A/B of two versions of the training code on the toy definition: each side is a
`bench/recipe_sweep.py` result of the toy definition's own recipe over several `distill.seed`s
(same teacher, rows, prompts, iterations and evaluation points), combined into one table of FD and
prompt accuracy per evaluated step: mean, spread and every seed.

    python bench/recipe_sweep.py --recipes default --seeds 0,1,2 --steps 300 --eval-every 50 --out after.json
    (the same on the other version, in a checkout of it, evaluating at the same steps: the sweep
    rounds them up to whole rounds of scales, 52 100 152 200 252 300 here)
    python bench/fidelity_ab.py --before before.json --after after.json --name fidelity_ab
    -> bench/results/fidelity_ab.json

A sweep from before `--seeds` existed names its seeds as recipes (`{"seed": 1}` overrides); both
forms are read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from bench.recipe_sweep import summarize  # noqa: E402


def side(path: Path, label: str) -> dict:
    sweep = json.loads(path.read_text())
    records = []
    for r in sweep["evaluations"]:
        if "step" not in r:
            continue
        seed = r.get("seed", r.get("overrides", {}).get("seed", 0))
        overrides = {k: v for k, v in r.get("overrides", {}).items() if k != "seed"}
        if overrides:
            raise ValueError(f"{path}: recipe {r['recipe']} changes {overrides}: "
                             "the A/B compares the toy recipe itself")
        records.append({"recipe": label, "seed": seed, "step": r["step"], "fd": r["fd"],
                        "prompt_accuracy": r["prompt_accuracy"], "acc_one_object": r.get("acc_one_object"),
                        "acc_two_object": r.get("acc_two_object")})
    return {"sweep_command": sweep["command"], "git_commit": sweep["machine"].get("git_commit"),
            "teacher_4": sweep["teacher_4"], "summary": summarize(records)[label], "evaluations": records}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, type=Path)
    p.add_argument("--after", required=True, type=Path)
    p.add_argument("--name", default="fidelity_ab")
    p.add_argument("--note", default="", help="what differs between the sides, for the record")
    args = p.parse_args()
    result = {"before": side(args.before, "before"), "after": side(args.after, "after"), "note": args.note}
    steps = {label: sorted(map(int, result[label]["summary"]["by_step"])) for label in ("before", "after")}
    if steps["before"] != steps["after"]:
        p.error(f"the sides evaluated different steps ({steps}): compare at the same points")
    for label in ("before", "after"):
        s = result[label]["summary"]
        print(f"{label}: seeds {s['seeds']}")
        for step, row in s["by_step"].items():
            print(f"  step {step:>4}: FD {row['fd']['mean']:.3f} ± {row['fd']['std']:.3f} "
                  f"[{row['fd']['min']:.3f}, {row['fd']['max']:.3f}]  accuracy {row['prompt_accuracy']['mean']:.3f} "
                  f"± {row['prompt_accuracy']['std']:.3f}")
        m = s["mean_over_steps"]
        print(f"  mean over steps: FD {m['fd']['mean']:.3f} ± {m['fd']['std']:.3f}, "
              f"accuracy {m['prompt_accuracy']['mean']:.3f} ± {m['prompt_accuracy']['std']:.3f}")
    print(f"wrote {write_result(args.name, result)}")


if __name__ == "__main__":
    main()
