#!/usr/bin/env python
"""`make run` once per distillation seed: does the student beat the 4-step teacher every time?

    python bench/make_run_seeds.py                       # seeds 0-4 -> bench/results/make_run_seeds.json
    python bench/make_run_seeds.py --seeds 0,1 --set distill.steps=48   # shorter, for a look

Each seed runs the definition exactly as `make run` does (`pipelines/distill.py --config ...`),
changed only in `distill.seed` (the adapters' initialisation, the noise and the data order) and
in its storage folder, `<storage>/seed<K>`, so that runs never share a checkpoint. The rows are
read from each run's evaluate report (`eval/report.json`): the student (`swd_4`) and the 4-step
teacher (`teacher_4`) on the evaluate stage's prompts and seeds. A seed whose report already
exists is read, not rerun, so an interrupted sweep continues where it stopped; the JSON is
rewritten after every seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, write_result  # noqa: E402

TOY = ROOT / "pipelines" / "configs" / "toy.yaml"


def run_name(config: Path, overrides: list[str]) -> str:
    from pipelines.schema import load_pipeline_config

    name = load_pipeline_config(config).name
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "name":
            name = value
    return name


def row_from_report(seed: int, report: dict) -> dict:
    models = {m["name"]: m for m in report["models"]}
    student, teacher = models["swd_4"], models["teacher_4"]
    row = {"seed": seed,
           "student_accuracy": student["prompt_accuracy"], "student_fd": student["fd"],
           "teacher_4_accuracy": teacher["prompt_accuracy"], "teacher_4_fd": teacher["fd"],
           "n_prompts": student["n"], "chosen": report.get("student", {}).get("chosen")}
    row["beats_on_accuracy"] = row["student_accuracy"] > row["teacher_4_accuracy"]
    row["beats_on_fd"] = row["student_fd"] < row["teacher_4_fd"]
    return row


def run_seed(cmd: list[str]) -> int:
    """One `make run` (its output goes to this terminal, its progress lines with it)."""
    return subprocess.run(cmd, cwd=ROOT).returncode


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(rows: list[dict]) -> dict:
    out = {k: spread([r[k] for r in rows]) for k in ("student_accuracy", "student_fd", "teacher_4_accuracy",
                                                       "teacher_4_fd")}
    out["beats_on_both"] = sum(r["beats_on_accuracy"] and r["beats_on_fd"] for r in rows)
    out["seeds"] = len(rows)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=TOY, help="the definition (default: make run's)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated distill.seed values")
    p.add_argument("--storage", type=Path, default=ROOT / "runs" / "make_run_seeds",
                   help="each seed runs in <storage>/seed<K>")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="another override for every seed (the result then says so)")
    p.add_argument("--out", type=Path, default=RESULTS / "make_run_seeds.json")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if any(o.split("=", 1)[0] in ("distill.seed", "resources.storage") for o in args.overrides):
        p.error("distill.seed and resources.storage are set per seed")
    name = run_name(args.config, args.overrides)
    rows, runs = [], []
    for seed in seeds:
        storage = args.storage / f"seed{seed}"
        report_path = storage / name / "eval" / "report.json"
        cmd = [sys.executable, "pipelines/distill.py", "--config", str(args.config),
               "--set", f"distill.seed={seed}", "--set", f"resources.storage={storage}",
               *[x for o in args.overrides for x in ("--set", o)]]
        entry = {"seed": seed, "command": " ".join(cmd[1:]), "storage": str(storage)}
        if report_path.exists():
            entry["reused_report"] = True
            print(f"[make_run_seeds] seed {seed}: report exists, reading {report_path}", flush=True)
        else:
            print(f"[make_run_seeds] seed {seed}: {' '.join(cmd[1:])}", flush=True)
            start = time.time()
            rc = run_seed(cmd)
            entry.update(rc=rc, wall_s=round(time.time() - start, 1))
            if rc != 0 or not report_path.exists():
                runs.append(entry)
                raise SystemExit(f"seed {seed}: the run failed (rc {rc}); its output is above, its files in {storage}")
        row = row_from_report(seed, json.loads(report_path.read_text()))
        rows.append(row)
        runs.append(entry)
        print(f"[make_run_seeds] seed {seed}: student {row['student_accuracy']:.3f} / FD {row['student_fd']:.3f}, "
              f"teacher_4 {row['teacher_4_accuracy']:.3f} / FD {row['teacher_4_fd']:.3f}", flush=True)
        write_result("make_run_seeds", {"config": str(args.config.relative_to(ROOT) if args.config.is_absolute()
                                                          and ROOT in args.config.parents else args.config),
                                        "overrides": args.overrides, "rows": rows, "summary": summarize(rows),
                                        "runs": runs}, path=args.out)
    s = summarize(rows)
    print(f"[make_run_seeds] the student beats the 4-step teacher on both in {s['beats_on_both']} of {s['seeds']} "
          f"seeds -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
