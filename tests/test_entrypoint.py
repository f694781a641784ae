"""`pipelines/distill.py` runs the stages it is asked for (here the preview stage) and refuses unknown ones."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.distill import main

ROOT = Path(__file__).parents[1]
TOY = ROOT / "pipelines" / "configs" / "toy.yaml"


@pytest.mark.ray
def test_preview_stage_writes_a_labelled_grid(tmp_path, capsys, ray_cluster):
    data = yaml.safe_load(TOY.read_text())
    data["teacher"]["path"] = "builtin:tiny-sd3?layers=2"
    data["distill"]["losses"]["feature_block"] = 1
    data["resources"]["storage"] = str(tmp_path)
    data["data"]["preview_prompts"] = ["a red circle", "a blue star"]
    data["evaluate"]["teacher_steps"] = 4
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump(data))
    assert main(["--config", str(cfg), "--stages", "preview"]) == 0
    out = capsys.readouterr().out
    grid = Image.open(tmp_path / "toy" / "preview.png")
    # 3 columns (teacher, full-res, scale-wise) of 128 px after a 220 px label column; 2 rows
    assert grid.size == (220 + 3 * 128, 56 + 2 * 128)
    check_cells(grid, rows=2, cols=3)
    # the stage's own lines come from its Ray task, through the driver's log, later
    assert "[preview] starting" in out and "[distill] starting" not in out
    assert main(["--config", str(cfg), "--stages", "bogus"]) == 2


def check_cells(grid: Image.Image, rows: int, cols: int) -> None:
    """Each 128 px cell right of the 220 px labels and under the 56 px header is an image of its own:
    varying in every channel (std about 0.16 here), few clipped pixels (about 2%), no two alike."""
    pixels = np.asarray(grid.convert("RGB"), dtype=np.float32) / 255
    cells = [pixels[56 + r * 128:56 + (r + 1) * 128, 220 + c * 128:220 + (c + 1) * 128]
             for r in range(rows) for c in range(cols)]
    for i, cell in enumerate(cells):
        assert (cell.std(axis=(0, 1)) > 0.05).all() and ((cell == 0) | (cell == 1)).mean() < 0.1, f"cell {i}"
    assert len({cell.tobytes() for cell in cells}) == len(cells)


@pytest.mark.parametrize("quiet", [False, True])
def test_a_source_without_its_caption_column_is_one_line_from_the_driver(tmp_path, quiet):
    """Found when the driver reads the file's schema, before any Ray work: exit code 2 and one
    line naming the file and the column, no trace. Run as users run it, a script (whose module is
    `__main__`): the stage's start is an info line, which --quiet leaves out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [b"x"], "text": ["a red circle"]}), tmp_path / "part.parquet")
    data = yaml.safe_load(TOY.read_text())
    data["data"]["sources"] = [{"path": str(tmp_path / "part.parquet")}]
    data["resources"]["storage"] = str(tmp_path / "runs")
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump(data))
    run = subprocess.run([sys.executable, "pipelines/distill.py", "--config", str(cfg), "--stages", "precompute",
                          *(["--quiet"] if quiet else [])], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    err = run.stderr.strip().splitlines()
    assert len(err) == 1, err
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[precompute\] error: data source "
                        + re.escape(f"{tmp_path / 'part.parquet'}: no column(s) ['caption']; it has ['image', 'text'] "
                                    "(set image_column / caption_column of the source)"), err[0]), err
    assert ("[precompute] starting" in run.stdout) != quiet, run.stdout
