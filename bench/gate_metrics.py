"""Do the teacher-only gate metrics rank students as the toy's classifier metrics do?

The promotion gate of scheduled retraining must work for teachers without a classifier, so it
offers `teacher_denoise` and `teacher_fd` (swd_core/teacher_metrics.py). This bench trains the
`make run` definition once, exporting the student at every checkpoint (students of every quality
along one run, as validation sees them), scores every student with all four gate metrics on the
same held-out prompts and seeds, and reports Spearman rank correlations of each teacher-only
metric with the toy's FD and with its prompt accuracy (negated, so +1 means the same ranking).

    python bench/gate_metrics.py                      # ~35 min on 2 cores
    python bench/gate_metrics.py --students DIR ...   # score existing exports (merged/ folders)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine_info, write_result  # noqa: E402

METRICS = ("fd", "prompt_accuracy", "teacher_denoise", "teacher_fd")


def train_students(work: Path, config: Path) -> list[Path]:
    d = yaml.safe_load(config.read_text())
    d["name"] = "gate-bench"
    d["stages"] = ["precompute", "distill"]
    d["distill"]["export_at_checkpoints"] = True
    d["distill"]["validation"] = {"num_prompts": 0}  # every checkpoint's student, not the chosen one
    d["resources"]["storage"] = str(work / "runs")
    path = work / "gate-bench.yaml"
    path.write_text(yaml.safe_dump(d))
    subprocess.run([sys.executable, "pipelines/distill.py", "--config", str(path)], cwd=ROOT, check=True)
    student = work / "runs" / "gate-bench" / "student"
    steps = sorted(student.glob("step_*"), key=lambda p: int(p.name.removeprefix("step_")))
    return [p / "merged" for p in steps] + [student / "merged"]


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "pipelines/configs/toy.yaml"))
    p.add_argument("--students", nargs="*", help="exported students (merged/ folders) instead of training")
    p.add_argument("--prompts", type=int, default=192)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--name", default="gate_metrics")
    args = p.parse_args(argv)
    start = time.time()
    work = Path(tempfile.mkdtemp(prefix="swd-gate-bench-"))
    folders = [Path(s) for s in args.students] if args.students else train_students(work, Path(args.config))
    train_s = time.time() - start

    from pipelines.retraining.gate import Gate
    from pipelines.schema import parse_pipeline_config

    d = yaml.safe_load(Path(args.config).read_text())
    d["retrain"] = {"gate": {"num_prompts": args.prompts, "sigma": args.sigma, "batch_size": 64,
                             "metrics": [{"name": m} for m in METRICS]}}
    gate = Gate(parse_pipeline_config(d))
    rows = []
    for folder in folders:
        t = time.time()
        scored = gate.score(str(folder))
        step = folder.parent.name.removeprefix("step_") if folder.parent.name.startswith("step_") else "final"
        rows.append({"student": str(folder), "step": step, **scored.metrics, "seconds": time.time() - t})
        print(f"{step:>6}: " + "  ".join(f"{m} {scored.metrics[m]:.4f}" for m in METRICS), flush=True)
    col = {m: [r[m] for r in rows] for m in METRICS}
    neg_acc = [-a for a in col["prompt_accuracy"]]
    result = {
        "command": " ".join(["python", "bench/gate_metrics.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(), "config": args.config, "n_prompts": args.prompts, "sigma": args.sigma,
        "n_students": len(rows),
        "spearman": {
            "teacher_denoise_vs_fd": spearman(col["teacher_denoise"], col["fd"]),
            "teacher_fd_vs_fd": spearman(col["teacher_fd"], col["fd"]),
            "teacher_denoise_vs_neg_accuracy": spearman(col["teacher_denoise"], neg_acc),
            "teacher_fd_vs_neg_accuracy": spearman(col["teacher_fd"], neg_acc),
            "fd_vs_neg_accuracy": spearman(col["fd"], neg_acc),  # how well the toy's own two agree
        },
        "rows": rows, "train_seconds": train_s, "seconds": time.time() - start,
    }
    print(yaml.safe_dump(result["spearman"]))
    write_result(args.name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
