#!/usr/bin/env python
"""Host cost of one training iteration in eager PyTorch, the part of a GPU iteration that does not
shrink with the scale: aten ops that launch work (about one GPU kernel each; views excluded) and
wall time with a transformer so narrow (2 heads x 16) that its arithmetic is negligible on this CPU.

    python bench/host_overhead.py --baseline ad34827   # -> bench/results/host_overhead.json

Setup: the toy definition's scales and losses with a 12-block narrow SD3 (feature block 4), 5
fake-score updates (the paper's), batch 2, ZeRO-2, one thread, through the distill stage's own
`train_iteration` (`bench/distill.py --case`). `--baseline REF` runs the same case on the code
of commit REF too (a temporary git worktree with this bench file in it), so both numbers come from
one machine and one session.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from bench.distill import run_case  # noqa: E402

NARROW = "builtin:tiny-sd3?layers=12&heads=2&head_dim=16"


def _case(args, code: Path, port: int) -> dict:
    """bench/distill.py's case, on the code checked out at `code`."""
    case_args = argparse.Namespace(batch=2, definition=code / "pipelines" / "configs" / "toy.yaml",
                                   rounds=args.rounds, threads=1, device="cpu")
    extra = ["--setup", "toy", "--model", NARROW, "--model-blocks", "12", "--fake-updates", "5", "--count-ops", "1"]
    out = run_case(f"host overhead ({code})", extra, case_args, port, root=code)
    times = out["iter_times_s"]
    return {"median_iter_s": statistics.median(times), "min_iter_s": min(times),
            "ops_per_iter": statistics.median(out["ops_per_iter"]), "case": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8, help="timed rounds over the 4 scales")
    p.add_argument("--baseline", default=None, help="a git commit to measure as well")
    args = p.parse_args()
    result = {"command": "python " + " ".join(["bench/host_overhead.py", *sys.argv[1:]]), "model": NARROW,
              "current": _case(args, ROOT, 29531)}
    if args.baseline:
        tree = Path(tempfile.mkdtemp(prefix="swd-baseline-")) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline], cwd=ROOT, check=True)
        try:
            shutil.copy(Path(__file__).parent / "distill.py", tree / "bench" / "distill.py")
            result["baseline"] = {"commit": args.baseline, **_case(args, tree, 29532)}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
        for key in ("median_iter_s", "ops_per_iter"):
            result[f"{key}_ratio"] = result["current"][key] / result["baseline"][key]
    path = write_result("host_overhead", result)
    summary = {k: v for k, v in result.items() if k not in ("current", "baseline")}
    print(summary | {k: {f: result[k][f] for f in ("median_iter_s", "ops_per_iter")}
                     for k in ("current", "baseline") if k in result})
    print(f"[bench] wrote {path}")


if __name__ == "__main__":
    main()
