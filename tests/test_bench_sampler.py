"""bench/sampler.py's SD3.5-Medium mode: the CPU smoke run of its code path (tiny sizes) and
the real sizes it builds on a GPU."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def test_quick_cpu_run_writes_the_result_file(tmp_path):
    out = tmp_path / "sampler.json"
    cmd = [sys.executable, "bench/sampler.py", "--device", "cpu", "--model", "sd35-medium", "--quick",
           "--batches", "1,2", "--repeats", "2", "--teacher-repeats", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["model"] == "sd35-medium-quick" and r["device"] == "cpu" and r["dtype"] == "float32"
    assert "--device cpu" in r["command"] and "gpu" in r["machine"] and "cpu" in r["machine"]
    assert r["schedule"]["scales"] == [8, 10, 12, 16] and r["image_px"] == 128 and r["text_tokens"] == 16
    assert set(r["params_m"]) == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"}
    assert [b["batch"] for b in r["batches"]] == [1, 2]
    for b in r["batches"]:
        raw = b["raw_batch_seconds"]
        assert [len(raw[k]) for k in ("scalewise", "fullres", "teacher")] == [2, 2, 1]
        # per-image seconds are the median request over the batch; the ratios are theirs
        for k in ("scalewise", "fullres", "teacher"):
            assert b[f"{k}_s"] == pytest.approx(statistics.median(raw[k]) / b["batch"])
        assert b["ratio_scalewise_vs_fullres"] == pytest.approx(b["scalewise_s"] / b["fullres_s"])
        assert b["ratio_scalewise_vs_teacher"] == pytest.approx(b["scalewise_s"] / b["teacher_s"])
        assert str(b["batch"]) in r["meets_goal"]
        # every request encoded text, ran the sampler's steps (CFG in one batched call) and decoded
        phases = b["phases_per_image"]
        assert {k: p["transformer_calls"] for k, p in phases.items()} == {"scalewise": 4, "fullres": 4, "teacher": 28}
        check_times(b)
        assert all(b["images_finite"].values())
    assert r["paper"]["ratio_scalewise_vs_fullres_a100"] == 0.59 and r["goal_ratio_scalewise_vs_fullres"] == 0.58


def test_real_size_is_sd35_medium():
    """Built on the meta device (no memory): the parameter counts of SD3.5-Medium's published
    components, and the layout the CUDA run times."""
    from bench.sampler import SD35_MEDIUM, build_sd3_pipeline

    pipe = build_sd3_pipeline(SD35_MEDIUM, "meta", torch.bfloat16)
    millions = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
                for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")}
    # MMDiT-X 2.24B, CLIP-L 124M, CLIP-G 695M, T5-XXL encoder 4.76B, VAE 84M
    assert millions == pytest.approx({"transformer": 2243.2, "text_encoder": 123.7, "text_encoder_2": 694.7,
                                      "text_encoder_3": 4762.3, "vae": 83.8}, rel=1e-3)
    t = pipe.transformer.config
    width = t.num_attention_heads * t.attention_head_dim
    assert (t.num_layers, width, t.patch_size, t.in_channels) == (24, 1536, 2, 16)
    assert (t.joint_attention_dim, t.pooled_projection_dim, t.qk_norm) == (4096, 2048, "rms_norm")
    assert tuple(t.dual_attention_layers) == tuple(range(13))
    assert SD35_MEDIUM.image_px == 1024 and SD35_MEDIUM.text_tokens == 333 and pipe.vae_scale_factor == 8


def check_times(b: dict) -> None:
    """A batch's seconds: every request and every phase (text, transformer, VAE) of every sampler
    timed, finite and positive."""
    assert all(math.isfinite(t) and t > 0 for times in b["raw_batch_seconds"].values() for t in times)
    for name, p in b["phases_per_image"].items():
        assert set(p) == {"text_s", "transformer_s", "vae_s", "transformer_calls"}, name
        assert all(math.isfinite(p[k]) and p[k] > 0 for k in ("text_s", "transformer_s", "vae_s")), (name, p)
