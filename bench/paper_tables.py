#!/usr/bin/env python
"""The paper's comparison on the toy domain: one teacher, one held-out prompt set, every row.

    python bench/paper_tables.py [--config pipelines/configs/toy_tables.yaml] [--rows swd_4,swd_6]
    -> bench/results/paper_tables.json (+ one JSON per row under bench/results/paper_tables/)

Rows: teacher_28_cfg, teacher_4 (the teacher itself), and students trained by the pipeline's own
precompute and distill stages with the same training budget (steps, batch, workers):
swd_4 (scales 8 10 12 16), swd_6 (4 6 8 10 12 16), fullres_dmd_4 (the 4-step sigmas, every step
at 16), and the ablations swd_4_mmd_only and swd_4_no_mmd. Each student is evaluated by the
evaluate stage's code on the same prompts and seeds as the teacher rows.

Resumable: a finished row is read back from its JSON and skipped; an interrupted distill run
resumes from its last Ray Train checkpoint when the script is run again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, machine_info, write_result  # noqa: E402

ROWS = ("teacher_28_cfg", "teacher_4", "swd_4", "swd_6", "fullres_dmd_4", "swd_4_mmd_only", "swd_4_no_mmd")
# How each student row changes the tables definition's distill section.
VARIANTS = {
    "swd_4": {},
    "swd_6": {"schedule": {"preset": "toy_6step"}},
    "fullres_dmd_4": {"schedule": {"preset": "toy_4step", "scalewise": False}},
    "swd_4_mmd_only": {"losses": {"dmd": {"weight": 0.0}, "gan": {"weight": 0.0}}},
    "swd_4_no_mmd": {"losses": {"mmd": {"weight": 0.0}}},
}
# The paper's published costs (8×A100 training, A100 inference incl. text+VAE), for
# orientation only: another model, another machine.
PAPER = {
    "swd_4": "SD3.5-Medium: 3.2 s/iter, 0.17 s/img; Large: 7.8 s/iter, 0.32 s/img",
    "fullres_dmd_4": "SD3.5-Medium: 7.5 s/iter, 0.29 s/img; Large: 13.4 s/iter, 0.63 s/img",
    "swd_4_mmd_only": "SD3.5-Medium: 0.4 s/iter; Large: 0.9 s/iter",
}


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def student_definition(base: dict, row: str) -> dict:
    d = merge(base, {"name": f"{base['name']}-{row}", "distill": VARIANTS[row]})
    # one store per set of scales (a store holds the latents of exactly its definition's scales)
    schedule = d["distill"]["schedule"]
    scales = ("fullres" if schedule.get("scalewise") is False
              else "6step" if schedule.get("preset") == "toy_6step" else "4step")
    store = f"{d['resources']['storage']}/{base['name']}-store-{scales}"
    d["precompute"] = {**d.get("precompute", {}), "output": store}
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "pipelines/configs/toy_tables.yaml"))
    p.add_argument("--rows", default=",".join(ROWS))
    args = p.parse_args()
    import yaml

    from pipelines.ray_runtime import ensure_ray, quiet_output
    from pipelines.schema import parse_pipeline_config
    from pipelines.stages import distill, evaluate, precompute
    from swd_core.adapters import load_adapter
    from swd_core.evaluate_model import ShapesScorer, load_exported_student

    quiet_output()
    base = yaml.safe_load(Path(args.config).read_text())
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; allowed: {list(ROWS)}")
    work = RESULTS / "paper_tables"
    work.mkdir(parents=True, exist_ok=True)

    cfg = parse_pipeline_config(base, args.config)
    ev = cfg.evaluate
    prompts, samples, _, _ = evaluate.eval_prompts(cfg, "shapes", ev.num_prompts)
    seeds = [ev.seed + i for i in range(len(prompts))]
    scorer = ShapesScorer(samples)

    def save(row: str, res: dict) -> None:
        res.pop("_features", None)
        work.mkdir(parents=True, exist_ok=True)  # a row takes minutes; its folder may go meanwhile
        (work / f"{row}.json").write_text(json.dumps(res, indent=2) + "\n")
        print(f"[tables] {row}: accuracy {res['prompt_accuracy']:.3f}, FD {res['fd']:.3f}, "
              f"latency {res['latency']['total_s']:.3f} s, train {res.get('train_iter_s')}", flush=True)

    teacher_rows = [r for r in ("teacher_28_cfg", "teacher_4") if r in rows and not (work / f"{r}.json").exists()]
    if teacher_rows:
        t = cfg.teacher
        adapter = load_adapter(t.family, t.path, dtype=t.dtype, max_sequence_length=t.max_sequence_length)
        models = {"teacher_28_cfg": evaluate.Model("teacher_28_cfg", "teacher_cfg", "teacher 28 steps, cfg", 28,
                                                   ev.teacher_guidance_scale, len(prompts),
                                                   dict(teacher_steps=28, guidance=ev.teacher_guidance_scale)),
                  "teacher_4": evaluate.Model("teacher_4", "teacher_few_step", "teacher 4 steps", 4, 0.0, len(prompts),
                                              dict(teacher_steps=4, guidance=0.0))}
        results, _ = evaluate.evaluate_models(adapter, [models[r] for r in teacher_rows], prompts, seeds, cfg, scorer)
        for r in teacher_rows:
            save(r, {**results[r], "train_iter_s": None})

    for row in [r for r in rows if r in VARIANTS]:
        if (work / f"{row}.json").exists():
            print(f"[tables] {row}: done earlier, skipped", flush=True)
            continue
        scfg = parse_pipeline_config(student_definition(base, row), f"{args.config} [{row}]")
        ensure_ray(scfg)
        start = time.perf_counter()
        precompute.run(scfg)  # idempotent: a store that is complete is left as it is
        out = distill.run(scfg)
        train_s = time.perf_counter() - start
        student, schedule, _ = load_exported_student(f"{scfg.run_dir}/student/merged", scfg.teacher.family)
        model = evaluate.Model(row, "student", row, schedule.num_steps, 0.0, len(prompts), dict(schedule=schedule))
        results, _ = evaluate.evaluate_models(student, [model], prompts, seeds, cfg, scorer)
        save(row, {**results[row], "train_iter_s": out["final_metrics"].get("mean_iter_s"),
                   "train_seconds_total": train_s, "train_steps": scfg.distill.steps,
                   "final_metrics": out["final_metrics"]})

    table = []
    for row in ROWS:
        f = work / f"{row}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        table.append({"name": row, "steps": r["steps"], "prompt_accuracy": r["prompt_accuracy"], "fd": r["fd"],
                      "latency_s": r["latency"]["total_s"], "train_iter_s": r.get("train_iter_s"),
                      "per_attribute": r.get("per_attribute"), "fd_n": r.get("fd_n"), "paper": PAPER.get(row)})
    result = {"command": "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *sys.argv[1:]]),
              "machine": machine_info(), "definition": base, "n_prompts": len(prompts), "rows": table}
    path = write_result("paper_tables", result)
    print(markdown(table))
    print(f"[tables] wrote {path}")


def markdown(table: list[dict]) -> str:
    lines = ["| row | steps | prompt accuracy | FD | latency s/img | train s/iter |", "|---|---|---|---|---|---|"]
    for r in table:
        it = "" if r["train_iter_s"] is None else f"{r['train_iter_s']:.2f}"
        lines.append(f"| {r['name']} | {r['steps']} | {r['prompt_accuracy']:.3f} | {r['fd']:.3f} | "
                     f"{r['latency_s']:.3f} | {it} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
