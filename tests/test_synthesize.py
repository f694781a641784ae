"""End-to-end: the synthesize stage on a real local Ray cluster (teacher samples -> Parquet)."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.schema import parse_pipeline_config
from pipelines.stages import synthesize

TOY = "builtin:toy-sd3"


def config(tmp_path, prompts_file, **synth):
    return parse_pipeline_config({
        "name": "syn", "teacher": {"path": TOY, "max_sequence_length": 0},
        "data": {"prompts": str(prompts_file)},
        "synthesize": {"enabled": True, "num_steps": 2, "guidance_scale": 3.0, "seed": 100, "batch_size": 2,
                       "actors": 2, **synth},
        "distill": {"schedule": {"preset": "toy_4step"}}, "resources": {"storage": str(tmp_path / "runs")},
    })


def test_samples_depend_on_prompt_and_seed_only_and_reruns_add_what_is_missing(ray_cluster, tmp_path):
    from swd_core.adapters import load_adapter
    from swd_core.generate import generate_images

    prompts = ["a red circle", "a big blue square", "a green cross in the center"]
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(prompts[:2]) + "\n   \n")
    first = synthesize.run(config(tmp_path, pf))
    assert first["sampled"] == 2 and first["rows"] == 2

    pf.write_text("\n".join(prompts) + "\n")
    second = synthesize.run(config(tmp_path, pf))
    assert second["sampled"] == 1 and second["skipped_present"] == 2 and second["rows"] == 3
    assert synthesize.run(config(tmp_path, pf))["sampled"] == 0

    rows = {r["caption"]: r for r in pq.read_table(tmp_path / "runs" / "syn" / "synthesized").to_pylist()}
    assert {c: r["seed"] for c, r in rows.items()} == {p: 100 + i for i, p in enumerate(prompts)}
    adapter = load_adapter("sd3", TOY, max_sequence_length=0)
    # one batch of all three, outside Ray: the same pixels as the actors' batches of two
    direct = generate_images(adapter, prompts, [100, 101, 102], teacher_steps=2, guidance=3.0)
    for p, im in zip(prompts, direct):
        stored = np.asarray(Image.open(io.BytesIO(rows[p]["image"])))
        assert stored.shape == (64, 64, 3)
        # batch composition may move a float by an ulp, hence a pixel by one level at most
        diff = np.abs(stored.astype(int) - np.asarray(im).astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01, (p, diff.max(), diff.mean())


def test_synthesize_disabled_is_skipped_and_needs_prompts(tmp_path):
    assert synthesize.run(config(tmp_path, tmp_path / "none.txt", enabled=False)) == {"skipped": True}
    cfg = config(tmp_path, tmp_path / "none.txt").model_copy(update={"data": parse_pipeline_config({
        "name": "x", "teacher": {"path": TOY}, "distill": {"schedule": {"preset": "toy_4step"}}}).data})
    with pytest.raises(ValueError, match="data.prompts"):
        synthesize.run(cfg)
    with pytest.raises(FileNotFoundError, match="none.txt: no such file"):
        synthesize.run(config(tmp_path, tmp_path / "none.txt"))
