"""bench/distill.py --family flux: the CPU smoke run of its code path at a tiny size, and the
FLUX.1-width model its GPU run times."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bench.distill import FLUX1_DEV_BLOCKS, FLUX_LIKE, flop_model_ratio
from swd_core.tiny_models import parse_builtin

ROOT = Path(__file__).parents[1]
TINY = "builtin:tiny-flux"


@pytest.mark.training
def test_quick_cpu_run_writes_the_ratio_and_the_share_of_flux_blocks(tmp_path):
    definition = tmp_path / "tiny_flux.yaml"
    definition.write_text(yaml.safe_dump({
        "name": "bench-flux", "teacher": {"path": TINY, "family": "flux", "max_sequence_length": 16},
        "distill": {"schedule": {"preset": "toy_4step"}, "losses": {"feature_block": 1}, "lora": {"rank": 4},
                    "steps": 4, "checkpoint_every": 4, "fake_updates": 1}}))
    out = tmp_path / "distill_flux.json"
    cmd = [sys.executable, "bench/distill.py", "--family", "flux", "--device", "cpu", "--model", TINY,
           "--definition", str(definition), "--batch", "1", "--rounds", "1", "--threads", "1", "--ratio-only",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    tiny = parse_builtin(TINY)
    assert r["family"] == "flux" and r["machine"]["gpu"] is None and "--device cpu" in r["command"]
    assert r["ratio_iter"] == pytest.approx(r["scalewise_iter_s"] / r["fullres_iter_s"])
    blocks = {"double": tiny.layers, "single": tiny.single_layers}
    assert {k: r["flux_blocks"][k] for k in blocks} == blocks and r["flux_blocks"]["of_flux1_dev"] == FLUX1_DEV_BLOCKS
    assert r["flux_blocks"]["fraction"] == pytest.approx(sum(blocks.values()) / sum(FLUX1_DEV_BLOCKS.values()))
    assert r["width"] == tiny.heads * tiny.head_dim
    sw, fr = r["cases"]["scalewise"], r["cases"]["fullres"]
    assert sw["scales"] == [8, 10, 12, 16] and fr["scales"] == [16] * 4
    # packed 2x2 tokens: the FLOP model counts (side / 2)² image tokens, not the transformer's patch of 1
    config = type("C", (), {"num_attention_heads": tiny.heads, "attention_head_dim": tiny.head_dim, "patch_size": 2})
    assert r["flop_model_ratio"] == pytest.approx(flop_model_ratio(config, sw["scales"], r["text_tokens"]))
    check_times(r, rounds=1)


def test_the_gpu_model_has_flux1_dev_blocks():
    """The default model's blocks are FLUX.1-dev's own (diffusers' default FluxTransformer2DModel
    config is FLUX.1's), built on the meta device: the same parameters per double- and single-stream block."""
    from diffusers import FluxTransformer2DModel

    from swd_core.tiny_models import build_tiny_flux

    cfg = parse_builtin(FLUX_LIKE)
    with torch.device("meta"):
        dev = FluxTransformer2DModel(guidance_embeds=True)
        ours = build_tiny_flux(cfg).transformer

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(ours.transformer_blocks[0]) == count(dev.transformer_blocks[0])
    assert count(ours.single_transformer_blocks[0]) == count(dev.single_transformer_blocks[0])
    assert len(dev.transformer_blocks) == FLUX1_DEV_BLOCKS["double"]
    assert len(dev.single_transformer_blocks) == FLUX1_DEV_BLOCKS["single"]
    assert 0 < cfg.layers < FLUX1_DEV_BLOCKS["double"] and 0 < cfg.single_layers < FLUX1_DEV_BLOCKS["single"]


def check_times(r: dict, rounds: int) -> None:
    """Each case timed every iteration of its rounds over the 4 scales (finite, positive seconds),
    and reports their mean."""
    cases = r["cases"]
    for case in (cases["scalewise"], cases["fullres"]):
        assert len(case["iter_times_s"]) == 4 * rounds
        assert all(math.isfinite(t) and t > 0 for t in case["iter_times_s"]), case["iter_times_s"]
        assert case["iter_s"] == pytest.approx(statistics.mean(case["iter_times_s"]))
    assert (r["scalewise_iter_s"], r["fullres_iter_s"]) == (cases["scalewise"]["iter_s"], cases["fullres"]["iter_s"])
