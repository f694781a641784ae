"""A FLUX.1 teacher through the pipeline's stages on the shared local Ray cluster: precompute writes
a FLUX store, distill trains on it with 2 Ray Train workers and DeepSpeed ZeRO-2, evaluate reports
on the exported student and deploy answers a real HTTP request with it. The same stage code as
SD3's; the family comes from the definition and the export's swd_schedule.json."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from pipelines.schema import parse_pipeline_config

pytestmark = pytest.mark.ray

TINY_FLUX = "builtin:tiny-flux"
PROMPTS = ["a red circle", "a blue square on a black background"]


def definition(tmp: Path, name: str, family: str = "flux", store: str = "store_flux", **distill) -> dict:
    teacher = ({"path": TINY_FLUX, "family": "flux", "max_sequence_length": 16} if family == "flux"
               else {"path": "builtin:toy-sd3", "max_sequence_length": 0})
    d = {
        "schedule": {"scales": [8, 16], "boundaries": [0, 14]},
        # tiny-flux has 2 double-stream blocks; FLUX.1-dev's teacher guidance is its embedding
        "losses": {"feature_block": 1, "dmd": {"guidance_scale": 3.5}},
        "mode": "lora", "lora": {"rank": 4}, "zero_stage": 2,
        "batch_size": 4, "steps": 2, "lr": 1e-3, "fake_updates": 1, "checkpoint_every": 2, "log_every": 1,
    }
    d.update(distill)
    return {
        "name": name, "teacher": teacher,
        "data": {"sources": [{"path": "builtin:shapes", "format": "shapes", "limit": 16}], "preview_prompts": PROMPTS},
        "precompute": {"batch_size": 8, "actors": 1, "cpus_per_actor": 1, "output": str(tmp / store)},
        "distill": d,
        "evaluate": {"num_prompts": 4, "teacher_steps": 4, "teacher_guidance_scale": 3.5, "batch_size": 4,
                     "latency_repeats": 1, "grid_prompts": 2},
        "resources": {"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "SPREAD",
                      "storage": str(tmp / "runs")},
    }


@pytest.fixture(scope="module")
def flux_store(tmp_path_factory, ray_cluster):
    from pipelines.stages import precompute

    tmp = tmp_path_factory.mktemp("flux")
    cfg = parse_pipeline_config(definition(tmp, "store"))
    return tmp, cfg, precompute.run(cfg)


def test_precompute_writes_a_flux_store(flux_store):
    """CLIP-L pooled + T5 tokens, and unpacked 16-channel latents with the VAE's shift and scale at
    every scale of the schedule, equal to the adapter's own encoding; the manifest names the family."""
    from pipelines import store
    from pipelines.stages.precompute import load_rgb, sample_id, square_pixels
    from swd_core.adapters import load_adapter
    from swd_core.scale_ops import downscale_pixels
    from swd_core.toy.shapes import dataset

    tmp, cfg, result = flux_store
    assert result["new_rows"] == 16
    st = store.open_store(cfg)
    m = st.manifest
    assert m["teacher"]["family"] == "flux" and st.scales == [8, 16] and m["latent_channels"] == 16
    assert m["vae"]["shift_factor"] == pytest.approx(0.1) and m["vae"]["scaling_factor"] == pytest.approx(0.5)
    adapter = load_adapter("flux", TINY_FLUX, max_sequence_length=16, load_transformer=False)
    assert m["text"]["prompt_embeds_shape"] == [16, adapter.pipe.text_encoder_2.config.d_model]  # T5 tokens
    assert m["text"]["pooled_shape"] == [adapter.pipe.text_encoder.config.hidden_size]  # CLIP pooled
    rows = {}
    for batch in st.dataset().iter_batches(batch_format="numpy", batch_size=16):
        dec = st.decode(batch)
        rows.update({sid: {k: v[i] for k, v in dec.items()} for i, sid in enumerate(dec["sample_id"])})
    assert len(rows) == 16
    _, sample, im = next(dataset(0, 1))  # the first generated row, encoded here by hand
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    image, caption = buf.getvalue(), sample.caption
    row = rows[sample_id(image, caption)]
    with torch.no_grad():
        text = adapter.encode_prompts([caption.strip()])
        px = square_pixels(load_rgb(image)[0])
        expected = {"prompt_embeds": text.prompt_embeds[0], "pooled_prompt_embeds": text.pooled[0]}
        for s in (8, 16):
            z = adapter.vae.encode(downscale_pixels(px, s * 4)).latent_dist.mode()
            expected[f"latents_{s}"] = ((z - 0.1) * 0.5)[0]  # the VAE's shift and scale, unpacked (C, s, s)
    for k, v in expected.items():
        got = torch.as_tensor(row[k]).float()
        assert got.shape == v.shape, k
        torch.testing.assert_close(got, v.to(torch.float16).float(), rtol=2e-3, atol=2e-3)


@pytest.fixture(scope="module")
def sd3_store(flux_store):
    from pipelines.stages import precompute

    tmp = flux_store[0]
    precompute.run(parse_pipeline_config(definition(tmp, "store_sd3", family="sd3", store="store_sd3")))
    return tmp


@pytest.mark.parametrize("family,store_of", [("flux", "store_sd3"), ("sd3", "store_flux")])
def test_distill_refuses_another_familys_store_before_training(flux_store, sd3_store, family, store_of):
    from pipelines.stages import distill
    from pipelines.store import StoreMismatchError

    tmp = flux_store[0]
    cfg = parse_pipeline_config(definition(tmp, f"wrong_{family}", family=family, store=store_of))
    with pytest.raises(StoreMismatchError) as err:
        distill.run(cfg)
    other = "sd3" if family == "flux" else "flux"
    message = str(err.value)
    assert f"'{other}'" in message and f"family '{family}'" in message and str(tmp / store_of) in message
    assert not (tmp / "runs" / f"wrong_{family}").exists()  # refused before Ray Train made its run folder


@pytest.fixture(scope="module")
def flux_run(flux_store):
    from pipelines.stages import distill

    tmp = flux_store[0]
    cfg = parse_pipeline_config(definition(tmp, "flux_run"))
    return cfg, distill.run(cfg)


def test_distill_trains_a_flux_student_with_two_workers_and_zero2(flux_run):
    from safetensors.torch import load_file

    cfg, out = flux_run
    m = out["final_metrics"]
    assert m["step"] == 2 and {"mmd", "dmd", "gan_g", "fake_denoise", "gan_d"} <= set(m)
    assert all(np.isfinite(m[k]) for k in ("mmd", "dmd", "gan_g", "fake_denoise", "gan_d"))
    assert m["nodes"] == 2 and len(out["workers"]) == 2
    student = Path(out["student"])
    record = json.loads((student / "merged" / "swd_schedule.json").read_text())
    # the export samples with the run's FLUX sigmas and the guidance the student's embedding saw
    assert record["family"] == "flux" and record["sigmas"] == list(cfg.schedule().sigmas)
    assert record["guidance_scale"] == 3.5 and (student / "merged" / "pipeline.py").exists()
    lora = load_file(student / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at 0: trained


def test_evaluate_reports_on_the_flux_student(flux_run):
    from pipelines.stages import evaluate

    cfg, _ = flux_run
    out = evaluate.run(cfg)
    assert out["student_found"]
    report = json.loads(Path(out["report_json"]).read_text())
    assert report["student"]["schedule"]["family"] == "flux"
    names = [m["name"] for m in report["models"]]
    assert names == ["teacher_4_cfg", "teacher_2", "swd_2"]
    assert "guidance embedding 3.5" in report["models"][0]["label"]  # one pass with the embedding, not CFG
    for m in report["models"]:
        assert 0 <= m["prompt_accuracy"] <= 1 and np.isfinite(m["fd"])
    assert Path(out["grid"]).exists()


def test_deploy_answers_an_http_request_with_the_flux_student(flux_run, ray_cluster):
    from ray import serve

    from pipelines.ray_compat import serve_http_address
    from pipelines.serve import build_app
    from pipelines.serve.model import load_student, render_pngs
    from tests.conftest import free_port

    cfg, out = flux_run
    merged = str(Path(out["student"]) / "merged")
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_validate(
        {"model": merged, "app_name": "swd-test-flux", "route_prefix": "/flux", "host": "127.0.0.1",
         "max_batch_size": 1, "cpus_per_replica": 1, "deterministic_batching": True})})
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": free_port()})
    _, port = serve_http_address()
    serve.run(build_app(cfg), name="swd-test-flux", route_prefix="/flux", blocking=False)
    try:
        r = requests.post(f"http://127.0.0.1:{port}/flux/v1/images/generations",
                          json={"prompt": PROMPTS[0], "seed": 3}, timeout=120)
        assert r.status_code == 200, r.text
        import base64

        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))
        assert got.shape == (64, 64, 3)
        model = load_student(cfg, merged, "flux")
        assert model.adapter.family == "flux" and model.adapter.guidance_scale == 3.5
        expected = np.asarray(Image.open(io.BytesIO(render_pngs(model, [PROMPTS[0]], [3], 1)[0])).convert("RGB"))
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # the offline sampler's image
    finally:
        serve.delete("swd-test-flux")


def test_preview_samples_the_flux_teacher_on_the_runs_sigmas(flux_store):
    """The preview stage's few-step columns use the run's schedule: FLUX's sigmas, not SD3's."""
    from pipelines.stages.preview import preview_here

    tmp = flux_store[0]
    cfg = parse_pipeline_config(definition(tmp, "flux_preview"))
    out = preview_here(cfg)
    assert out["sigmas"] == list(cfg.schedule().sigmas) and Path(out["grid"]).exists()
    sd3 = parse_pipeline_config(definition(tmp, "sd3_preview", family="sd3"))
    assert out["sigmas"] != list(sd3.schedule().sigmas)  # the same boundaries index another grid


def test_synthesize_samples_the_flux_teacher_with_its_guidance_embedding(flux_store):
    """The synthesize stage's actors sample a FLUX teacher as `generate_images` does in-process
    (the stock FluxPipeline's sigmas and embedded guidance, tests/test_flux_adapter.py)."""
    import pyarrow.parquet as pq

    from pipelines.stages import synthesize
    from swd_core.adapters import load_adapter
    from swd_core.generate import generate_images

    tmp = flux_store[0]
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    d = definition(tmp, "flux_synth")
    d["data"]["prompts"] = str(prompts)
    d["synthesize"] = {"enabled": True, "num_steps": 2, "guidance_scale": 3.5, "seed": 100, "batch_size": 2,
                       "actors": 1}
    out = synthesize.run(parse_pipeline_config(d))
    assert out["sampled"] == 2
    rows = {r["caption"]: r for r in pq.read_table(tmp / "runs" / "flux_synth" / "synthesized").to_pylist()}
    adapter = load_adapter("flux", TINY_FLUX, max_sequence_length=16)
    direct = generate_images(adapter, PROMPTS, [100, 101], teacher_steps=2, guidance=3.5)
    for p, im in zip(PROMPTS, direct):
        stored = np.asarray(Image.open(io.BytesIO(rows[p]["image"])), dtype=int)
        assert stored.shape == (64, 64, 3) and np.abs(stored - np.asarray(im, dtype=int)).max() <= 1
