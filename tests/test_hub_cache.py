"""A teacher named by its Hub id is read from the Hugging Face cache as from a local folder: the
caption limit from its own tokenizers (T5's window when it ships T5), its architecture for the
GPU memory estimate. Offline: a tiny snapshot laid out as the Hub cache lays it out (blobs,
symlinked snapshot files, refs/main), read by a fresh process with HF_HOME pointing at it and
HF_HUB_OFFLINE=1, as a pod reads the staged model cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPO = "swd-test/tiny-sd3-t5"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_snapshot(home: Path, repo: str, files: dict[str, bytes]) -> Path:
    """`files` of `repo` at COMMIT in the cache under `home` (HF_HOME), as huggingface_hub writes
    it: contents in blobs/ named by their hash, the snapshot's files symlinks to them."""
    base = home / "hub" / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = base / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return base / "snapshots" / COMMIT


def tokenizer_files(max_length: int, tmp: Path) -> dict[str, bytes]:
    from swd_core.tiny_models import build_tokenizer

    out = tmp / f"tok{max_length}"
    build_tokenizer(["a", "red", "circle", "on", "white"], max_length).save_pretrained(out)
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def index(t5: bool) -> bytes:
    parts = {"_class_name": "StableDiffusion3Pipeline", "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
             "tokenizer_3": ["transformers", "PreTrainedTokenizerFast"] if t5 else [None, None]}
    return json.dumps(parts).encode()


def run_offline(home: Path, code: str) -> str:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_caption_limit_of_a_hub_id_comes_from_its_own_tokenizers(tmp_path):
    home = tmp_path / "hf"
    clip, t5 = tokenizer_files(77, tmp_path), tokenizer_files(512, tmp_path)
    files = {"model_index.json": index(t5=True), **{f"tokenizer/{k}": v for k, v in clip.items()},
             **{f"tokenizer_3/{k}": v for k, v in t5.items()}}
    hub_snapshot(home, REPO, files)
    hub_snapshot(home, "swd-test/tiny-sd3-clip-only", {"model_index.json": index(t5=False),
                                                       **{f"tokenizer/{k}": v for k, v in clip.items()}})
    code = ("from pipelines.stages.precompute.checks import caption_limit\n"
            f"print([caption_limit({REPO!r}, 256)[1], caption_limit({REPO!r}, 0)[1], "
            "caption_limit('swd-test/tiny-sd3-clip-only', 256)[1], "
            f"caption_limit({REPO!r}, 256)[0].model_max_length])")
    # T5's window where the repo ships T5 (its tokenizer read from tokenizer_3/), CLIP's otherwise
    assert run_offline(home, code) == "[256, 77, 77, 512]"


def test_architecture_of_a_hub_id_is_read_from_the_cache(tmp_path):
    import numpy as np
    from safetensors.numpy import save

    home = tmp_path / "hf"
    weights = {"a.weight": np.zeros((16, 16), np.float16), "b.weight": np.zeros((3, 5, 7), np.float16)}
    config = {"num_layers": 3, "num_attention_heads": 2, "attention_head_dim": 8}
    hub_snapshot(home, "swd-test/tiny-transformer", {
        "model_index.json": index(t5=True), "transformer/config.json": json.dumps(config).encode(),
        "transformer/diffusion_pytorch_model.safetensors": save(weights)})
    code = ("from pipelines.schema import load_pipeline_config\n"
            "from pipelines.gpu_memory import teacher_architecture\n"
            f"cfg = load_pipeline_config({str(ROOT / 'pipelines/configs/sd35_medium_4step.yaml')!r}, "
            "['teacher.path=swd-test/tiny-transformer'])\n"
            "a = teacher_architecture(cfg)\n"
            "print([a.blocks, a.width, int(a.transformer_params)])")
    assert run_offline(home, code) == f"[3, 16, {16 * 16 + 3 * 5 * 7}]"
    # a Hub id neither cached nor known: no estimate (and no network)
    code = code.replace("teacher.path=swd-test/tiny-transformer", "teacher.path=swd-test/not-cached")
    code = code.replace("print([a.blocks, a.width, int(a.transformer_params)])", "print(a)")
    assert run_offline(home, code) == "None"
