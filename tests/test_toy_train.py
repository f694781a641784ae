"""swd_core/toy/train.py, the phases behind `make toy-teacher`, at the tiniest sizes: each trains,
writes what it documents, skips itself once done, and the transformer resumes its budget.

Every test points the module's folders (weights/, .work/) at tmp_path: nothing is written into
the committed toy weights (the `toy` fixture checks that)."""

import functools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from swd_core.toy import shapes
from swd_core.toy import train as T

COMMITTED = {"record": T.RECORD, "classifier": T.CLASSIFIER, "teacher": T.TEACHER}


def repository_files() -> dict:
    """swd_core/toy/ as it is on disk (bytecode caches aside): what the tests must leave alone. Of
    the work folder only its entries' names: a real training may be writing inside them."""
    toy = Path(T.__file__).parent
    files = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in toy.rglob("*")
             if "__pycache__" not in p.parts and ".work" not in p.relative_to(toy).parts}
    return {**files, ".work": sorted(p.name for p in (toy / ".work").glob("*"))}


def tiny_vae_config(full=T.vae_config) -> dict:
    """The phase's VAE with 8 channels a level instead of 32/64/64."""
    return {**full(), "block_out_channels": (8, 8, 8), "norm_num_groups": 8}


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The module's folders under tmp_path, and its log lines in a list."""
    before = repository_files()
    weights, work = tmp_path / "weights", tmp_path / ".work"
    for name, value in {"WEIGHTS": weights, "WORK": work, "CLASSIFIER": weights / "classifier.safetensors",
                        "TEACHER": weights / "toy-sd3", "RECORD": weights / "training_record.json",
                        "CKPT": work / "teacher_ckpt.pt"}.items():
        monkeypatch.setattr(T, name, value)
    lines = []
    monkeypatch.setattr(T, "log", lines.append)
    monkeypatch.setattr(T, "vae_config", tiny_vae_config)
    yield lines
    assert repository_files() == before, "a test wrote into swd_core/toy/"


def record() -> dict:
    return json.loads(T.RECORD.read_text())


def finite(module) -> bool:
    return all(torch.isfinite(p).all() for p in module.state_dict().values() if p.dtype.is_floating_point)


def small_classifier(monkeypatch):
    """A narrow classifier (same code, fewer channels) and a 16-prompt held-out evaluation."""
    monkeypatch.setattr(T, "ShapesClassifier", functools.partial(T.ShapesClassifier, width=8, feature_dim=16))
    evaluate = T.evaluate_classifier
    monkeypatch.setattr(T, "evaluate_classifier", lambda model, count=640: evaluate(model, count=16))


@pytest.mark.training
def test_the_classifier_phase_learns_saves_its_config_records_its_accuracy_and_then_skips(toy, monkeypatch):
    from swd_core.evaluation import classifier_loss, load_classifier

    small_classifier(monkeypatch)
    torch.manual_seed(T.SEED)
    initial = T.ShapesClassifier()  # what the phase starts from (same seed)
    held_images, held_targets = T.classifier_batch(np.random.default_rng(123), 16)
    T.train_classifier(steps=12, batch=8)

    model = load_classifier(T.CLASSIFIER)
    assert (model.width, model.feature_dim) == (8, 16) and finite(model)
    with torch.no_grad():
        before = classifier_loss(initial(held_images), held_targets).item()
        after = classifier_loss(model.eval()(held_images), held_targets).item()
    assert math.isfinite(after) and after < before, (before, after)
    entry = record()["classifier"]
    assert {k: entry[k] for k in ("seed", "steps", "batch")} == {"seed": 0, "steps": 12, "batch": 8}
    assert 0 <= entry["real_prompt_accuracy"] <= 1 and set(entry["real_per_attribute"]) >= {"shape", "color"}
    assert entry["seconds"] >= 0 and entry["command"].startswith("python -m swd_core.toy.train")

    saved = T.CLASSIFIER.read_bytes()
    T.train_classifier(steps=12, batch=8)
    assert T.CLASSIFIER.read_bytes() == saved and "skipping" in toy[-1]


@pytest.mark.training
def test_the_vae_phase_trains_at_every_size_on_16_channels_normalises_and_records_its_round_trip(
        toy, tmp_path, monkeypatch):
    """Run through the command line into `--weights`/`--work` folders of its own: the VAE trains at
    several of the toy's image sizes, has 16 latent channels, its saved shift/scale make
    (z - shift) * scale zero-mean and unit-variance on its pool, the record holds the held-out round
    trip at 32 px and up, the decoder refinement skips, and a rerun skips."""
    T.WEIGHTS.mkdir(parents=True)
    shutil.copy(COMMITTED["classifier"], T.CLASSIFIER)  # the round trip's scorer reads the evaluator
    pools, scene_pool, sizes = {}, T.scene_pool, set()

    def small_pool(seed, count):
        pools[seed] = scene_pool(seed, 16)
        return pools[seed]

    def downscale(images, side_px, resize=T.downscale):
        sizes.add(side_px)
        return resize(images, side_px)

    monkeypatch.setattr(T, "scene_pool", small_pool)
    monkeypatch.setattr(T, "downscale", downscale)
    round_trip = T.round_trip
    monkeypatch.setattr(T, "round_trip", lambda vae, count=320: round_trip(vae, count=4))
    torch.manual_seed(T.SEED)
    initial = AutoencoderKL(**tiny_vae_config())
    weights, work = tmp_path / "aside" / "weights", tmp_path / "aside" / "work"
    argv = ["vae", "--vae-steps", "8", "--vae-batch", "2", "--weights", str(weights), "--work", str(work)]
    T.main(argv)

    out = work / "vae"
    assert T.WORK == work and T.RECORD == weights / "training_record.json"
    vae = AutoencoderKL.from_pretrained(out)
    assert vae.config.latent_channels == 16 and finite(vae)
    moved = [not torch.equal(a, b) for a, b in zip(initial.state_dict().values(), vae.state_dict().values())]
    assert any(moved)
    assert len(sizes) > 1 and sizes <= {4 * s for s in T.TOY_SIDES}, sizes
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    with torch.no_grad():
        z = vae.encode(shapes.from_uint8(pools[T.SEED + 1])).latent_dist.mode()
    normalised = (z - shift) * scale
    assert abs(normalised.mean().item()) < 1e-4 and abs(normalised.std().item() - 1) < 1e-3
    entry = record()["vae"]
    assert (entry["shift_factor"], entry["scaling_factor"]) == (shift, scale)
    assert {k: entry[k] for k in ("seed", "steps", "batch", "latent_channels", "images", "device")} == {
        "seed": 0, "steps": 8, "batch": 2, "latent_channels": 16, "images": 16, "device": "cpu"}
    assert entry["sides"] == list(T.TOY_SIDES) and "command" in entry
    trip = entry["round_trip_320_held_out"]
    assert set(trip) == {str(4 * s) for s in T.TOY_SIDES[2:]}
    assert all(0 <= v["acc_one_object"] <= 1 and math.isfinite(v["psnr_db"]) for v in trip.values())

    config = (out / "config.json").read_text()
    del toy[:]
    T.main(argv)
    T.main(["vae-decoder", *argv[1:]])  # trained at every size already: no refinement due
    assert (out / "config.json").read_text() == config
    assert any("vae:" in line and "skipping" in line for line in toy)
    assert any("vae-decoder" in line and "skipping" in line for line in toy)


@pytest.mark.training
def test_the_vae_decoder_phase_trains_the_decoder_only_and_marks_its_sides(toy, monkeypatch):
    """The encoder stays as it was (the teacher's latent space), the decoder moves; a marker
    file says the sides, and a second run skips."""
    T.WEIGHTS.mkdir(parents=True)
    shutil.copy(COMMITTED["classifier"], T.CLASSIFIER)  # the round trip's scorer reads the evaluator
    torch.manual_seed(1)
    AutoencoderKL(**tiny_vae_config()).save_pretrained(T.WORK / "vae")
    original = AutoencoderKL.from_pretrained(T.WORK / "vae")
    pool = T.scene_pool
    monkeypatch.setattr(T, "scene_pool", lambda seed, count: pool(seed, 32))
    round_trip = T.round_trip
    monkeypatch.setattr(T, "round_trip", lambda vae, count=320: round_trip(vae, count=4))
    T.train_vae_decoder(steps=3, batch=2, lr=1e-3)

    saved = load_file(T.WORK / "vae" / "diffusion_pytorch_model.safetensors")  # fp16 on disk, as documented
    assert saved.keys() == original.state_dict().keys()
    assert all(t.dtype == torch.float16 and torch.isfinite(t).all() for t in saved.values())
    changed = {k for k, t in original.state_dict().items() if not torch.equal(t.half(), saved[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed), changed
    assert json.loads((T.WORK / "vae" / "decoder_sides.json").read_text()) == {"sides": list(T.TOY_SIDES)}
    entry = record()["vae_decoder"]
    assert entry["steps"] == 3 and entry["sides"] == list(T.TOY_SIDES) and entry["images"] == 32
    assert set(entry["round_trip_320_held_out"]) == {"before", "after"}
    assert set(entry["round_trip_320_held_out"]["after"]) == {str(4 * s) for s in T.TOY_SIDES[2:]}

    weights = (T.WORK / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    T.train_vae_decoder(steps=3, batch=2, lr=1e-3)
    assert (T.WORK / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == weights and "skipping" in toy[-1]


TINY_ARCH = {"layers": 1, "heads": 1, "head_dim": 16, "text_dim": 16, "text_layers": 1,
             "text_max_length": shapes.MAX_CAPTION_TOKENS, "interpolate_pos_embed": True, "seed": 0}


@pytest.mark.training
def test_make_toy_teacher_skips_finished_phases_and_resumes_the_transformer_budget(toy, monkeypatch):
    """`make toy-teacher` (`train all --hours H`) is resumable: with the classifier and VAE done,
    only the transformer trains, from scratch, since the teacher on disk is on another latent
    space; run again with the budget spent, everything skips; run with a larger budget, it
    continues from the checkpoint (step count, optimizer, init) instead of starting over, and
    keeps that budget for a run that names none."""
    from swd_core.tiny_models import TinySD3Config, build_tiny_sd3

    T.WEIGHTS.mkdir(parents=True)
    shutil.copy(COMMITTED["classifier"], T.CLASSIFIER)  # a finished phase
    # a teacher on a 4-channel latent space (an earlier VAE): not one to fine-tune on the new one
    build_tiny_sd3(TinySD3Config(latent_channels=4), vocab=shapes.vocabulary()).save_pretrained(T.TEACHER)
    T.RECORD.write_text(json.dumps({"transformer": {"steps": 1, "sides": [16]}}))
    torch.manual_seed(1)
    AutoencoderKL(**tiny_vae_config()).save_pretrained(T.WORK / "vae")
    (T.WORK / "vae" / "decoder_sides.json").write_text(json.dumps({"sides": list(T.TOY_SIDES)}))
    monkeypatch.setattr(T, "TEACHER_ARCH", TINY_ARCH)
    monkeypatch.setattr(T, "TRAIN_IMAGES", 500)
    argv = ["all", "--sides", "4", "8", "--batch", "4", "--hours"]

    T.main([*argv, str(1.0 / 3600)])
    assert not any("step" in line and "classifier" in line for line in toy)
    assert any("classifier" in line and "skipping" in line for line in toy)
    assert any("vae-decoder" in line and "skipping" in line for line in toy)
    first = torch.load(T.CKPT, weights_only=True)
    assert set(first) == {"model", "ema", "opt", "step", "elapsed", "rng", "history", "init", "sides", "lr",
                          "started_from", "previous_rounds", "latent_space", "warm_from", "hours"}
    assert first["latent_space"] == list(T.latent_space(T.WORK / "vae"))
    assert first["step"] >= 1 and first["elapsed"] >= 1.0 and first["init"] == "scratch" and first["sides"] == [4, 8]
    assert first["hours"] == 1.0 / 3600
    saved = load_file(T.TEACHER / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(t.dtype == torch.float16 and torch.isfinite(t).all() for t in saved.values())
    entry = record()["transformer"]
    assert entry["seed"] == 0 and entry["minutes"] >= 0 and "command" in entry and entry["history"] == []
    assert entry["steps"] == first["step"] and entry["sides"] == [4, 8]
    assert entry["architecture"] == {**TINY_ARCH, "latent_channels": 16} and entry["device"] == "cpu"
    assert entry["init"] == "scratch" and entry["lr"] == 3e-4 and entry["precision"] == T.pick_precision("auto", "cpu")

    ckpt = T.CKPT.read_bytes()
    teacher = (T.TEACHER / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    del toy[:]
    T.main([*argv, str(1.0 / 3600)])  # budget spent: nothing to do
    assert T.CKPT.read_bytes() == ckpt
    assert (T.TEACHER / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == teacher
    assert sum("skipping" in line for line in toy) == 4, toy

    del toy[:]
    T.main([*argv, str(3.0 / 3600)])  # a larger budget: continue from the checkpoint
    assert f"resumed at step {first['step']} " in "\n".join(toy) + " "
    assert any(line.startswith(f"budget {1 / 3600:g} h -> {3 / 3600:g} h") for line in toy), toy
    second = torch.load(T.CKPT, weights_only=True)
    assert second["step"] > first["step"] and second["elapsed"] >= 3.0 and second["hours"] == 3.0 / 3600
    del toy[:]
    T.main(argv[:-1])  # no --hours: the checkpoint's budget, spent (the default 2 h would train on)
    assert torch.load(T.CKPT, weights_only=True)["step"] == second["step"]
    assert any("transformer" in line and "skipping" in line for line in toy), toy
    assert second["init"] == "scratch", "it fine-tuned the teacher it had just written instead of resuming"
    assert {int(s["step"]) for s in second["opt"]["state"].values()} == {second["step"]}, "the optimizer started over"
    assert record()["transformer"]["steps"] == second["step"]

    # packed, and carried to another machine: fp16 weights, no optimizer state, no pickle, the VAE and record
    packed = T.WORK.parent / "packed"
    T.main(["pack", "--out", str(packed)])
    assert sorted(p.name for p in packed.iterdir()) == [
        "README.md", "teacher_ckpt.json", "teacher_ckpt.safetensors", "training_record.json", "vae"]
    slim = T.read_packed(packed / "teacher_ckpt.pt")
    assert "opt" not in slim and slim["step"] == second["step"] and slim["history"] == second["history"]
    assert torch.equal(slim["rng"], second["rng"]) and slim["latent_space"] == second["latent_space"]
    for part in ("model", "ema"):
        for name, module in slim[part].items():
            for key, t in module.items():
                reference = second[part][name][key]
                assert t.dtype == (torch.float16 if reference.is_floating_point() else reference.dtype)
                assert torch.allclose(t.float(), reference.float(), rtol=1e-3, atol=1e-4)
    assert (packed / "vae" / "config.json").read_bytes() == (T.WORK / "vae" / "config.json").read_bytes()
    assert json.loads((packed / "training_record.json").read_text()) == record()
    assert f"packed at step {second['step']} " in (packed / "README.md").read_text()
    assert f"--hours {3 / 3600:g}\n" in (packed / "README.md").read_text()
    with pytest.raises(SystemExit, match="name the folder to write with --out"):
        T.main(["pack"])
    for overlapping in (T.WORK, T.WORK.parent, T.TEACHER / "inside"):  # replacing it would lose what trains
        with pytest.raises(SystemExit, match="overlaps"):
            T.main(["pack", "--out", str(overlapping)])
    (T.WORK.parent / "other").mkdir()
    (T.WORK.parent / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds something other than an earlier pack"):
        T.main(["pack", "--out", str(T.WORK.parent / "other")])
    assert (T.WORK.parent / "other" / "notes.txt").read_text() == "mine"
    T.main(["pack", "--out", str(packed)])  # an earlier pack is replaced whole
    assert sorted(p.name for p in packed.parent.iterdir() if p.name.startswith(".packed")) == []
    weights_dir, work_dir = T.WEIGHTS, T.WORK
    moved = T.WORK.parent / "elsewhere"
    shutil.copytree(packed / "vae", moved / "work" / "vae")
    for f in ("teacher_ckpt.safetensors", "teacher_ckpt.json"):
        shutil.copy(packed / f, moved / "work")
    (moved / "weights").mkdir()
    shutil.copy(packed / "training_record.json", moved / "weights")
    shutil.copy(T.CLASSIFIER, moved / "weights")
    del toy[:]
    budget = second["elapsed"] + 3.0
    T.main([*argv, str(budget / 3600), "--precision", "fp32", "--weights", str(moved / "weights"),
            "--work", str(moved / "work")])
    assert any(f"resumed at step {second['step']} " in line and "no optimizer state" in line for line in toy), toy
    third = torch.load(moved / "work" / "teacher_ckpt.pt", weights_only=True)
    assert third["step"] > second["step"] and third["elapsed"] >= budget and "opt" in third
    assert third["warm_from"] == second["step"]  # the re-warm is kept for a resume during it
    assert all(t.dtype == torch.float32 for m in third["ema"].values() for t in m.values() if t.is_floating_point())
    moved_record = json.loads((moved / "weights" / "training_record.json").read_text())
    assert moved_record["transformer"]["steps"] == third["step"] and moved_record["transformer"]["precision"] == "fp32"
    assert T.latest_checkpoint()["step"] == third["step"]  # the work checkpoint, further on than the pack beside it
    T.use_folders(weights_dir, work_dir)

    # evaluations are due in training time since the last one recorded: a resume past that point
    # evaluates at once, even when it trains for less than the interval (the readings are stubbed;
    # what is under test is when they are taken)
    assert second["history"] == []
    monkeypatch.setattr(T, "_eval_ema", lambda *a, **k: {"acc_one_object": 0.5, "acc_two_object": 0.25})
    T.train_transformer(hours=(second["elapsed"] + 1.0) / 3600, batch=4, sides=(4, 8), eval_every_s=2.5)
    fourth = torch.load(T.CKPT, weights_only=True)
    assert fourth["history"][0]["step"] == second["step"] + 1
    assert fourth["history"][0]["side_8"] == {"acc_one_object": 0.5, "acc_two_object": 0.25}
    assert len(fourth["history"]) == 1  # 2.5 s of training apart, and this run trained about 1 s

    # the teacher's VAE carries its sides, and is a VAE of this design: no VAE phase is due
    assert json.loads((T.TEACHER / "vae" / "decoder_sides.json").read_text()) == {"sides": list(T.TOY_SIDES)}
    shutil.rmtree(T.WORK / "vae")
    T.train_vae(steps=1, batch=1)
    T.train_vae_decoder(steps=1, batch=1)
    assert "vae:" in toy[-2] and "skipping" in toy[-2] and "vae-decoder" in toy[-1] and "skipping" in toy[-1]


def test_the_vae_loss_weights_object_pixels_and_their_edges(monkeypatch):
    """On real renders: the object mask covers the object and not the background (either colour),
    the loss is zero on a perfect reconstruction, and the same error costs more on the object than
    on the background."""
    images = shapes.from_uint8(T.scene_pool(7, 8))
    mask = T.object_mask(images)
    for image, m in zip(images, mask):
        corner = image[:, 0, 0]
        background = min(shapes.BACKGROUNDS.values(), key=lambda c: (torch.tensor(c) / 127.5 - 1 - corner).abs().sum())
        away = (image - (torch.tensor(background) / 127.5 - 1).view(3, 1, 1)).abs().amax(0) > 0.1
        assert torch.equal(m[0].bool(), away) and 0 < m.mean() < 0.5
    assert T.reconstruction_loss(images, images).item() == 0
    # the same error on as many background pixels, taken at random
    g = torch.Generator().manual_seed(0)
    elsewhere = torch.zeros_like(mask)
    for m, e in zip(mask, elsewhere):
        free = (m[0] == 0).flatten().nonzero()[:, 0]
        e.view(-1)[free[torch.randperm(len(free), generator=g)[:int(m.sum())]]] = 1
    on_object, on_background = images + 0.3 * mask, images + 0.3 * elsewhere
    with_edges = T.reconstruction_loss(on_object, images), T.reconstruction_loss(on_background, images)
    monkeypatch.setattr(T, "EDGE_WEIGHT", 0.0)
    pixels = T.reconstruction_loss(on_object, images), T.reconstruction_loss(on_background, images)
    assert pixels[0] / pixels[1] == pytest.approx(T.OBJECT_WEIGHT, rel=1e-4)
    # the edge term is what scattered errors cost most: they break many edges, a uniform shift few
    assert with_edges[1] - pixels[1] > with_edges[0] - pixels[0] > 0
    assert T.sobel(torch.ones(1, 3, 8, 8))[..., 1:-1, 1:-1].abs().max() == 0  # flat: no edges


def test_a_cuda_device_without_a_gpu_is_refused_in_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match=r"--device cuda: torch sees no CUDA device"):
        T.main(["vae", "--device", "cuda"])


def test_adopt_makes_a_teacher_trained_aside_the_committed_one(toy, tmp_path):
    """The folder is replaced whole; the record keeps the classifier's entry, takes the new VAE's
    and transformer's, and drops the refinement of the VAE it replaced. A folder without a
    finished teacher is refused in one line, the committed teacher untouched."""
    from swd_core.tiny_models import TinySD3Config, build_tiny_sd3

    staged = tmp_path / "aside"
    build_tiny_sd3(TinySD3Config(latent_channels=16, seed=1), vocab=shapes.vocabulary()).save_pretrained(
        staged / "toy-sd3")
    build_tiny_sd3(TinySD3Config(latent_channels=4), vocab=shapes.vocabulary()).save_pretrained(T.TEACHER)
    (T.TEACHER / "vae" / "decoder_sides.json").write_text("{}")  # a file only the old folder has
    T.RECORD.write_text(json.dumps({"classifier": {"seed": 0}, "vae": {"v": 2}, "vae_decoder": {"v": 2},
                                    "transformer": {"v": 2}}))
    (staged / "training_record.json").write_text(json.dumps({"transformer": {"v": 3}}))

    with pytest.raises(SystemExit, match="has no vae entry: its teacher is not finished"):
        T.main(["adopt", "--weights", str(staged)])
    with pytest.raises(SystemExit, match="holds no trained teacher"):
        T.main(["adopt", "--weights", str(tmp_path / "empty")])
    assert json.loads((T.TEACHER / "vae" / "config.json").read_text())["latent_channels"] == 4

    (staged / "training_record.json").write_text(json.dumps({"vae": {"v": 3}, "transformer": {"v": 3},
                                                             "classifier": {"seed": 9}}))
    T.main(["adopt", "--weights", str(staged)])
    files = sorted(p.relative_to(staged / "toy-sd3") for p in (staged / "toy-sd3").rglob("*") if p.is_file())
    assert sorted(p.relative_to(T.TEACHER) for p in T.TEACHER.rglob("*") if p.is_file()) == files
    assert all((T.TEACHER / f).read_bytes() == (staged / "toy-sd3" / f).read_bytes() for f in files)
    assert record() == {"classifier": {"seed": 0}, "vae": {"v": 3}, "transformer": {"v": 3}}
    assert not list(T.WEIGHTS.glob(".*adopting"))


def test_what_another_vae_left_in_the_work_folder_is_not_trained_on(toy):
    """An older VAE there (4 latent channels) gives way to the teacher's; a checkpoint or a
    latents cache made on another latent space is refused, or encoded again."""
    T.WEIGHTS.mkdir(parents=True)
    AutoencoderKL(**{**tiny_vae_config(), "latent_channels": 4}).save_pretrained(T.WORK / "vae")
    AutoencoderKL(**tiny_vae_config()).save_pretrained(T.TEACHER / "vae")
    assert T.vae_dir() == T.TEACHER / "vae"

    torch.save({"step": 5, "elapsed": 1.0, "init": "scratch", "sides": [4, 8], "latent_space": [16, 0.5, 2.0]},
               T.CKPT)
    with pytest.raises(SystemExit, match="trains on another VAE's latent space"):
        T.train_transformer(hours=1.0, sides=(4, 8))
