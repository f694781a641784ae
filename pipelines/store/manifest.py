"""The store's manifest: what made the store (teacher, VAE, scales, dtypes, text settings), and
the check that a store was made for a given pipeline definition."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipelines.schema import PipelineConfig

VERSION = 1
MANIFEST = "manifest.json"


def teacher_content_hash(path: str) -> str:
    """Cheap identity of a teacher: its config JSONs plus weight file names and sizes (reading
    gigabytes of weights to hash them would cost more than the check is worth). A hub id that is
    not a local folder is identified by the id itself."""
    from swd_core.tiny_models import resolve_pretrained

    folder = Path(resolve_pretrained(path))
    h = hashlib.sha256()
    if not folder.is_dir():
        h.update(f"id:{path}".encode())
        return h.hexdigest()[:16]
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if f.suffix == ".json":
            h.update(rel.encode() + b"\0" + f.read_bytes())
        else:
            h.update(f"{rel}\0{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def vae_settings(teacher_path: str) -> dict:
    """Scaling/shift and downsampling factor from the VAE config (no weights loaded)."""
    from diffusers import AutoencoderKL

    from swd_core.tiny_models import resolve_pretrained

    vcfg = AutoencoderKL.load_config(resolve_pretrained(teacher_path), subfolder="vae")
    return {
        "scaling_factor": float(vcfg["scaling_factor"]),
        "shift_factor": float(vcfg.get("shift_factor") or 0.0),
        # as diffusers' SD3 pipeline computes vae_scale_factor
        "downsample": 2 ** (len(vcfg["block_out_channels"]) - 1),
        "latent_channels": int(vcfg["latent_channels"]),
    }


def stored_scales(cfg) -> list[int]:
    """The latent sizes a store holds for a definition: each scale of its schedule once, in
    schedule order (a full-resolution schedule repeats its one scale at every step)."""
    return list(dict.fromkeys(int(s) for s in cfg.schedule().scales))


def expected_manifest(cfg: PipelineConfig) -> dict:
    """The manifest fields a store made for `cfg` must have (computed without loading models)."""
    vae = vae_settings(cfg.teacher.path)
    return {
        "version": VERSION,
        "teacher": {"path": cfg.teacher.path, "family": cfg.teacher.family,
                    "content_hash": teacher_content_hash(cfg.teacher.path)},
        "vae": {k: vae[k] for k in ("scaling_factor", "shift_factor", "downsample")},
        "scales": stored_scales(cfg),
        "latent_channels": vae["latent_channels"],
        "storage_dtype": cfg.precompute.storage_dtype,
        "text": {"max_sequence_length": cfg.teacher.max_sequence_length},
    }


# (label, getter) of every field that changes the stored values; the teacher's path is not
# among them (a moved folder with the same content is the same teacher).
COMPARED = (
    ("version", lambda m: m.get("version")),
    ("teacher.family", lambda m: m.get("teacher", {}).get("family")),
    ("teacher.content_hash", lambda m: m.get("teacher", {}).get("content_hash")),
    ("vae.scaling_factor", lambda m: m.get("vae", {}).get("scaling_factor")),
    ("vae.shift_factor", lambda m: m.get("vae", {}).get("shift_factor")),
    ("vae.downsample", lambda m: m.get("vae", {}).get("downsample")),
    ("scales", lambda m: m.get("scales")),
    ("latent_channels", lambda m: m.get("latent_channels")),
    ("storage_dtype", lambda m: m.get("storage_dtype")),
    ("text.max_sequence_length", lambda m: m.get("text", {}).get("max_sequence_length")),
)


def manifest_differences(stored: dict, expected: dict) -> list[str]:
    out = []
    for label, get in COMPARED:
        if get(stored) != get(expected):
            out.append(f"{label}: store has {get(stored)!r}, definition has {get(expected)!r}")
    if out and stored.get("teacher", {}).get("path") != expected["teacher"]["path"]:
        out.append(f"(teacher.path: store has {stored.get('teacher', {}).get('path')!r}, "
                   f"definition has {expected['teacher']['path']!r})")
    return out
