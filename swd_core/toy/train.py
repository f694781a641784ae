"""Train the embedded default: the evaluator classifier, the toy VAE and the toy SD3 teacher.

    python -m swd_core.toy.train all         # or: make toy-teacher   (resumable: rerun to continue)
    python -m swd_core.toy.train classifier | vae | transformer [--device cuda]
    python -m swd_core.toy.train all --weights DIR --work DIR   # train a new teacher aside
    python -m swd_core.toy.train adopt --weights DIR             # then make it the committed one
    python -m swd_core.toy.train pack --weights DIR --work DIR --out DIR   # a slim copy to go on elsewhere

Each phase writes its result under swd_core/toy/weights/ (or `--weights`) and skips itself when
that exists. The VAE (16 latent channels, as SD3's) and the transformer train at every latent
side of the toy schedules (4 6 8 10 12 16, one side per batch, images area-downscaled in pixel
space). The transformer starts from the committed teacher when that was trained at fewer sides
on the same latent space, otherwise from scratch; it checkpoints to swd_core/toy/.work/ (or
`--work`) every few minutes and resumes from there (`--hours` is its budget across runs, kept in
the checkpoint). Its forward pass runs under bf16 autocast where the device computes bf16
natively (`--precision`).
`training_record.json` records commands, seeds, steps, wall time and learning curves per phase.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from swd_core.evaluate_model import ShapesScorer, to_evaluator_size
from swd_core.evaluation import (
    ShapesClassifier,
    classifier_loss,
    load_classifier,
    prompt_accuracy,
    psnr,
    read_scenes,
    save_classifier,
    targets_from_sample,
)
from swd_core.toy import CLASSIFIER, RECORD, TEACHER, WEIGHTS, shapes

WORK = Path(__file__).parent / ".work"
SEED = 0


def log(msg: str) -> None:
    """Print one timestamped line, flushed, so a long run's progress shows in its log as it goes.

    Args:
        msg (`str`): the line.
    """
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def record(phase: str, replace: bool = False, **info) -> None:
    """Add `info` to the phase's entry of `RECORD`, with the command that ran.

    Args:
        phase (`str`): the entry's key ("classifier", "vae", "vae_decoder", "transformer").
        replace (`bool`): replace the entry rather than add to it.
        info: JSON-serialisable values.
    """
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    data = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    entry = {} if replace else data.get(phase, {})
    entry.update(info, command=" ".join(["python -m swd_core.toy.train", *sys.argv[1:]]))
    data[phase] = entry
    RECORD.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------- classifier

def classifier_scene(rng: np.random.Generator) -> shapes.ShapesSample:
    """0–3 objects in distinct cells, any colour/shape pair: broader than the captions, so the
    classifier reads whatever a generator draws.

    Args:
        rng (`np.random.Generator`): draws the scene.

    Returns:
        `ShapesSample`: with an empty caption.
    """
    n = int(rng.integers(0, 4))
    cells = rng.permutation(9)[:n]
    objs = [shapes.ShapeObject(str(rng.choice(shapes.SHAPES)), str(rng.choice(list(shapes.COLORS))),
                               str(rng.choice(list(shapes.SIZES))), int(c) // 3, int(c) % 3) for c in cells]
    return shapes.ShapesSample("", objs, str(rng.choice(list(shapes.BACKGROUNDS))))


def classifier_batch(rng, batch):
    """A freshly drawn training batch for the classifier.

    Args:
        rng (`np.random.Generator`): draws the scenes and their jitter.
        batch (`int`): images in the batch.

    Returns:
        `tuple[torch.Tensor, dict[str, torch.Tensor]]`: images (batch, 3, 64, 64) in [-1, 1] and
        their stacked `targets_from_sample` targets.
    """
    samples = [classifier_scene(rng) for _ in range(batch)]
    images = shapes.to_tensor([shapes.render(s, rng) for s in samples])
    targets = [targets_from_sample(s) for s in samples]
    return images, {k: torch.stack([t[k] for t in targets]) for k in targets[0]}


def train_classifier(steps: int = 1500, batch: int = 64) -> None:
    """Train the evaluator on freshly drawn scenes (no fixed dataset, so it cannot overfit one) and
    save it to `CLASSIFIER`, with its accuracy on real held-out renders in the record. Skips when
    `CLASSIFIER` exists.

    Args:
        steps (`int`): optimizer steps (one-cycle schedule).
        batch (`int`): images per step.
    """
    if CLASSIFIER.exists():
        log(f"classifier: {CLASSIFIER} exists, skipping")
        return
    torch.manual_seed(SEED)
    rng = np.random.default_rng([SEED, 1])
    model = ShapesClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    start = time.time()
    for step in range(steps):
        images, targets = classifier_batch(rng, batch)
        loss = classifier_loss(model(images), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"classifier step {step}/{steps} loss {loss.item():.4f}")
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    save_classifier(model, CLASSIFIER, seed=SEED, steps=steps)
    acc = evaluate_classifier(model)
    record("classifier", seed=SEED, steps=steps, batch=batch, seconds=round(time.time() - start), **acc)
    log(f"classifier: real held-out prompt accuracy {acc['real_prompt_accuracy']:.4f}")


def evaluate_classifier(model, count: int = 640) -> dict:
    """The evaluator's prompt accuracy on real renders of the held-out prompts: the ceiling a
    generator can reach under it.

    Args:
        model (`ShapesClassifier`): the evaluator.
        count (`int`): held-out prompts.

    Returns:
        `dict`: "real_prompt_accuracy" and "real_per_attribute".
    """
    samples = shapes.held_out_prompts(count)
    rng = np.random.default_rng([SEED, 99])
    images = shapes.to_tensor([shapes.render(s, rng) for s in samples])
    readings, _ = read_scenes(model, images)
    acc = prompt_accuracy(samples, readings)
    return {"real_prompt_accuracy": acc["prompt_accuracy"], "real_per_attribute": acc["per_attribute"]}


# ---------------------------------------------------------------- VAE

def vae_config() -> dict:
    """The toy VAE's `AutoencoderKL` config: 16 latent channels (as SD3's VAE), 4× downsampling.
    Four channels cannot hold a shape's outline at 32 px (8×8 latents); sixteen can.

    Returns:
        `dict`: keyword arguments for `AutoencoderKL`.
    """
    return dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64, 64), layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                norm_num_groups=32, sample_size=64, scaling_factor=1.0, shift_factor=0.0)


# The VAE's loss favours what the evaluator reads. An object covers a few percent of the image,
# so a plain MSE is satisfied by a blurred blob; weighting its pixels and matching edges (a cross's
# arms are 2 px wide at 32 px) asks for the outline. Sizes 32-48 px, where outlines are lost
# first, are drawn twice as often as the rest.
OBJECT_WEIGHT = 10.0
EDGE_WEIGHT = 0.25
VAE_SIDE_WEIGHTS = {8: 2.0, 10: 2.0, 12: 2.0}


def object_mask(images: torch.Tensor, tolerance: float = 0.1) -> torch.Tensor:
    """1 where a pixel is away from its image's background colour (the more common of the toy's
    two), else 0.

    Args:
        images (`torch.Tensor`): (N, 3, H, W) in [-1, 1].
        tolerance (`float`): largest channel difference still read as background.

    Returns:
        `torch.Tensor`: (N, 1, H, W) float.
    """
    backgrounds = torch.tensor(list(shapes.BACKGROUNDS.values()), dtype=images.dtype, device=images.device)
    backgrounds = backgrounds / 127.5 - 1
    distance = (images.unsqueeze(1) - backgrounds.view(1, -1, 3, 1, 1)).abs().amax(2)  # (N, B, H, W)
    which = (distance < tolerance).flatten(2).sum(-1).argmax(1)
    rows = torch.arange(len(images), device=images.device)
    return (distance[rows, which] > tolerance).unsqueeze(1).to(images.dtype)


def sobel(images: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical Sobel responses of each channel: (N, 3, H, W) -> (N, 6, H, W).
    Zero padding makes the border an edge too, so a wrong background colour costs there as well."""
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=images.dtype, device=images.device)
    kernels = torch.stack([k, k.T]).unsqueeze(1).repeat(images.shape[1], 1, 1, 1)
    return F.conv2d(images, kernels, padding=1, groups=images.shape[1])


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """MSE + L1 with object pixels weighted `OBJECT_WEIGHT` times (normalised by the weights'
    mean, so an empty image costs what it did unweighted), plus `EDGE_WEIGHT` times the L1
    between Sobel edges.

    Args:
        recon (`torch.Tensor`): decoded images.
        images (`torch.Tensor`): the targets, same shape.

    Returns:
        `torch.Tensor`: a scalar.
    """
    w = 1 + (OBJECT_WEIGHT - 1) * object_mask(images)
    err = recon - images
    pixel = (w * (err.square() + 0.5 * err.abs())).mean() / w.mean()
    return pixel + EDGE_WEIGHT * F.l1_loss(sobel(recon), sobel(images))


def train_vae(steps: int = 3000, batch: int = 32, device: str = "cpu") -> None:
    """Train the toy VAE at every image size the toy schedules decode (`TOY_SIDES` times its
    factor, one size per batch, drawn by `VAE_SIDE_WEIGHTS`) on renders of every (colour, shape) pair;
    set its shift and scale so that 64 px latents have zero mean and unit variance (as SD3
    normalises them); save it under `WORK` with the round trip of held-out renders in the record.
    Skips when it exists, or when the teacher's VAE has this design's latent channels.

    Args:
        steps (`int`): optimizer steps (one-cycle schedule).
        batch (`int`): images per step.
        device (`str`): where it trains ("cpu", "cuda").
    """
    from diffusers import AutoencoderKL

    out = WORK / "vae"
    for done in (out, TEACHER / "vae"):
        if latent_channels(done) == vae_config()["latent_channels"]:
            log(f"vae: {done} exists, skipping")
            return
    torch.manual_seed(SEED)
    pool = scene_pool(SEED + 1, 20_000)
    vae = AutoencoderKL(**vae_config()).to(device)
    factor = vae_factor(vae)
    weights = torch.tensor([VAE_SIDE_WEIGHTS.get(s, 1.0) for s in TOY_SIDES])
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(SEED)
    start = time.time()
    for step in range(steps):
        side = TOY_SIDES[int(torch.multinomial(weights, 1, generator=g))]
        x = downscale(shapes.from_uint8(pool[torch.randint(len(pool), (batch,), generator=g)]), side * factor)
        x = x.to(device)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)).sample
        loss = reconstruction_loss(recon, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            mse = F.mse_loss(recon.clamp(-1, 1), x).item()
            log(f"vae step {step}/{steps} side {side} loss {loss.item():.5f} "
                f"psnr~{10 * math.log10(4 / max(mse, 1e-12)):.1f}dB ({(time.time() - start) / 60:.1f} min)")
    vae.eval()
    # SD3-style normalisation: latents = (z - shift) * scale with unit variance.
    with torch.no_grad():
        z = torch.cat([vae.encode(shapes.from_uint8(pool[i:i + 256]).to(device)).latent_dist.mode().cpu()
                       for i in range(0, min(4096, len(pool)), 256)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
    seconds = round(time.time() - start)
    vae.to("cpu").save_pretrained(out)  # saved before it is measured: the measure needs the classifier
    (out / "decoder_sides.json").write_text(json.dumps({"sides": list(TOY_SIDES)}) + "\n")  # no refinement due
    trip = round_trip(vae)
    log(f"vae: round trip of held-out renders {json.dumps(trip)}")
    record("vae", replace=True, seed=SEED, steps=steps, batch=batch, seconds=seconds, device=str(device),
           latent_channels=vae.config.latent_channels, sides=list(TOY_SIDES), images=len(pool),
           side_weights={str(s): VAE_SIDE_WEIGHTS.get(s, 1.0) for s in TOY_SIDES},
           loss=f"object pixels x{OBJECT_WEIGHT:g} MSE + L1, L1 of Sobel edges x{EDGE_WEIGHT:g}, KL x1e-6",
           shift_factor=vae.config.shift_factor, scaling_factor=vae.config.scaling_factor,
           round_trip_320_held_out=trip)


# A VAE trained at one size can have its decoder refined at every size the toy schedules decode,
# the encoder frozen so that the latent space a teacher was trained in stays as it is. The VAE is
# not text-conditioned, so it sees every (colour, shape) pair, as SD3.5's VAE was trained on far
# broader images than any prompt split; the held-out pairs stay unseen by the transformer.


def vae_factor(vae) -> int:
    """Pixels per latent cell of an `AutoencoderKL`: 2 per downsampling level.

    Args:
        vae (`AutoencoderKL`): the VAE.

    Returns:
        `int`
    """
    return 2 ** (len(vae.config.block_out_channels) - 1)


def scene_pool(seed: int, count: int) -> torch.Tensor:
    """Renders drawn from every (colour, shape) pair, the held-out ones included: the VAE is not
    text-conditioned, so seeing them reveals nothing of the prompts the transformer is held out from.

    Args:
        seed (`int`): render i is drawn from [seed, i].
        count (`int`): how many.

    Returns:
        `torch.Tensor`: uint8, (N, 3, 64, 64).
    """
    arr = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        arr.append(np.asarray(shapes.render(shapes.sample_attributes(rng, allow_held_out=True), rng)))
    return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Images encoded (the posterior's mode) and decoded by `vae`, in batches.

    Args:
        vae (`AutoencoderKL`): the VAE, on any device.
        images (`torch.Tensor`): (N, 3, H, W) in [-1, 1], on the CPU.
        batch (`int`): images per call.

    Returns:
        `torch.Tensor`: (N, 3, H, W) float32 in [-1, 1], on the CPU.
    """
    device = next(vae.parameters()).device
    return torch.cat([vae.decode(vae.encode(images[i:i + batch].to(device)).latent_dist.mode())
                      .sample.clamp(-1, 1).float().cpu() for i in range(0, len(images), batch)])


@torch.no_grad()
def round_trip(vae, count: int = 320) -> dict:
    """Prompt accuracy and FD of held-out real renders encoded and decoded, per image size: what a
    perfect transformer could reach through this VAE.

    Args:
        vae (`AutoencoderKL`): the VAE.
        count (`int`): held-out prompts.

    Returns:
        `dict`: by image size in pixels (32 px and up), "acc_one_object", "acc_two_object", "fd"
        and "psnr_db".
    """
    samples = shapes.held_out_prompts()[:count]
    classifier = load_classifier(CLASSIFIER)  # this trainer's classifier, read once
    out = {}
    for side in TOY_SIDES[2:]:  # 32 px and up, as bench/teacher_quality.py reports
        px = side * vae_factor(vae)
        scorer = ShapesScorer(samples, classifier, size=px)
        rec = reconstruct(vae, scorer.real)
        acc, _ = scorer.score(rec)
        out[str(px)] = {"acc_one_object": round(acc["acc_one_object"], 3),
                        "acc_two_object": round(acc["acc_two_object"], 3), "fd": round(acc["fd"], 3),
                        "psnr_db": round(psnr(scorer.real, rec), 2)}
    return out


# the refinement of the committed 4-channel VAE drew sides so (its record says); kept, so that it reruns as recorded
DECODER_SIDE_WEIGHTS = {16: 2.0}


def train_vae_decoder(steps: int = 3000, batch: int = 32, lr: float = 3e-4) -> None:
    """Refine the VAE's decoder at every latent side of the toy schedules (TOY_SIDES), the
    encoder frozen, and save it over the VAE it refines; skips when that VAE's marker says it is
    refined.

    Args:
        steps (`int`): optimizer steps (warmup, then cosine decay).
        batch (`int`): images per step, all at one side drawn by `DECODER_SIDE_WEIGHTS`.
        lr (`float`): the peak learning rate.
    """
    from diffusers import AutoencoderKL

    folder = vae_dir()
    marker = folder / "decoder_sides.json"
    if marker.exists():
        log(f"vae-decoder: {folder} is refined at sides {json.loads(marker.read_text())['sides']}, skipping")
        return
    torch.manual_seed(SEED)
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
    vae.eval()
    before = round_trip(vae)
    log(f"vae-decoder: round trip before {json.dumps(before)}")
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    vae.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    pool = scene_pool(SEED + 3, 20_000)
    factor = vae_factor(vae)
    weights = torch.tensor([DECODER_SIDE_WEIGHTS.get(s, 1.0) for s in TOY_SIDES])
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min((k + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, k / steps)))))
    g = torch.Generator().manual_seed(SEED + 3)
    start = time.time()
    vae.decoder.train()
    for step in range(steps):
        side = TOY_SIDES[int(torch.multinomial(weights, 1, generator=g))]
        x = downscale(shapes.from_uint8(pool[torch.randint(len(pool), (batch,), generator=g)]), side * factor)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=g)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            minutes = (time.time() - start) / 60
            log(f"vae-decoder step {step}/{steps} side {side} loss {loss.item():.5f} ({minutes:.1f} min)")
    vae.eval()
    after = round_trip(vae)
    log(f"vae-decoder: round trip after {json.dumps(after)}")
    # fp16 on disk like the rest of the teacher folder; the encoder's weights come back unchanged
    vae.to(torch.float16).save_pretrained(folder)
    marker.write_text(json.dumps({"sides": list(TOY_SIDES)}) + "\n")
    record("vae_decoder", seed=SEED, steps=steps, batch=batch, lr=lr, sides=list(TOY_SIDES),
           side_weights={str(s): DECODER_SIDE_WEIGHTS.get(s, 1.0) for s in TOY_SIDES}, images=len(pool),
           seconds=round(time.time() - start), trained="decoder and post_quant_conv; encoder frozen",
           round_trip_320_held_out={"before": before, "after": after})


# ---------------------------------------------------------------- transformer (the teacher)

TEACHER_ARCH = dict(layers=8, heads=3, head_dim=64, text_dim=128, text_layers=2,
                    text_max_length=shapes.MAX_CAPTION_TOKENS, interpolate_pos_embed=True, seed=SEED)
TRAIN_IMAGES = 30_000
# Every latent side the toy schedules ask the teacher about (4 steps: 8 10 12 16; 6 steps: 4 6 8
# 10 12 16). SwD queries the teacher at the student's scale, so it must be in distribution there,
# as SD3.5 is after multi-resolution pre-training. The full size is drawn three times as often
# and 32 px one and a half: 28-step sampling and the student's last step run at the full size,
# and the teacher is held to targets at both.
TOY_SIDES = (4, 6, 8, 10, 12, 16)
SIDE_WEIGHTS = {16: 3.0, 8: 1.5}
DEFAULT_HOURS = 2.0  # the transformer's budget when neither --hours nor a checkpoint names one
CKPT = WORK / "teacher_ckpt.pt"


def vae_dir() -> Path:
    """The VAE a teacher trains on: the one the VAE phase wrote under `WORK` when it is of this
    design (an older one there is ignored), else the teacher's."""
    work = WORK / "vae"
    return work if latent_channels(work) == vae_config()["latent_channels"] else TEACHER / "vae"


def latent_channels(folder: Path) -> int | None:
    """The latent channels of the `AutoencoderKL` saved in `folder`, None when there is none."""
    space = latent_space(folder)
    return space[0] if space else None


def latent_space(folder: Path) -> tuple | None:
    """What identifies the latent space of the `AutoencoderKL` in `folder`: its channels and its
    normalisation, which a retrained VAE never reproduces. None when there is none."""
    config = folder / "config.json"
    if not config.exists():
        return None
    c = json.loads(config.read_text())
    return c["latent_channels"], c["shift_factor"], c["scaling_factor"]


def teacher_pipeline():
    """Tokenizer for the shapes vocabulary, small CLIP encoders, the trained VAE and a fresh
    SD3 transformer on that VAE's latent channels, as one `StableDiffusion3Pipeline`.

    Returns:
        `StableDiffusion3Pipeline`: the VAE frozen, the rest randomly initialised.
    """
    from diffusers import AutoencoderKL

    from swd_core.tiny_models import TinySD3Config, build_tiny_sd3

    vae = AutoencoderKL.from_pretrained(vae_dir())
    config = TinySD3Config(**TEACHER_ARCH, latent_channels=vae.config.latent_channels)
    pipe = build_tiny_sd3(config, vocab=shapes.vocabulary())
    pipe.vae = vae
    pipe.vae.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def downscale(images: torch.Tensor, side_px: int) -> torch.Tensor:
    """Pixel-space area downscaling, as SwD's training targets are made (before the VAE).

    Args:
        images (`torch.Tensor`): (N, 3, H, W), square.
        side_px (`int`): the target side.

    Returns:
        `torch.Tensor`: (N, 3, side_px, side_px); `images` itself at that side already.
    """
    if images.shape[-1] == side_px:
        return images
    return F.interpolate(images, size=(side_px, side_px), mode="area")


def training_latents(adapter, sides: tuple[int, ...]) -> tuple[dict[int, torch.Tensor], list[str]]:
    """VAE latents of the same TRAIN_IMAGES images at every latent side (fp16), and captions;
    cached under `WORK`, as encoding takes minutes.

    Args:
        adapter (`SD3Adapter`): the teacher being trained (its VAE encodes).
        sides (`tuple[int, ...]`): latent sides.

    Returns:
        `tuple[dict[int, torch.Tensor], list[str]]`: latents by side, and one caption per image.
    """
    cache = WORK / f"train_latents_{'_'.join(map(str, sides))}.pt"
    space = latent_space(vae_dir())
    if cache.exists():
        data = torch.load(cache, weights_only=True)
        if tuple(data.get("latent_space", space)) == space:
            return {int(k): v for k, v in data["latents"].items()}, data["captions"]
        log(f"{cache} holds another VAE's latents: encoding again")
    log(f"encoding {TRAIN_IMAGES} training images with the VAE at latent sides {list(sides)}")
    factor = adapter.vae_scale_factor
    latents, captions = {s: [] for s in sides}, []
    for start in range(0, TRAIN_IMAGES, 500):
        items = list(shapes.dataset(SEED + 2, 500, start))
        images = shapes.to_tensor([im for _, _, im in items]).to(adapter.device)
        with torch.no_grad():
            for s in sides:
                latents[s].append(adapter.encode_images(downscale(images, s * factor)).half().cpu())
        captions += [s.caption for _, s, _ in items]
        if start % 10_000 == 0:
            log(f"  encoded {start + 500}/{TRAIN_IMAGES}")
    data = {"latents": {str(s): torch.cat(v) for s, v in latents.items()}, "captions": captions,
            "latent_space": list(space)}
    WORK.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return {s: data["latents"][str(s)] for s in sides}, captions


def teacher_modules(pipe):
    """The modules the teacher's training updates (the VAE stays frozen).

    Args:
        pipe (`StableDiffusion3Pipeline`): the teacher.

    Returns:
        `dict[str, nn.Module]`: the transformer and both text encoders, by component name.
    """
    return {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}


@torch.no_grad()
def quick_eval(pipe, classifier, count: int = 48, steps: int = 28, guidance: float = 4.5,
               side: int | None = None) -> dict:
    """Teacher prompt accuracy on the first `count` held-out prompts (tracks learning); `side`
    samples at that latent side (images are upscaled to 64 px for the classifier).

    Args:
        pipe (`StableDiffusion3Pipeline`): the teacher.
        classifier (`ShapesClassifier`): the evaluator.
        count (`int`): held-out prompts, seeds 0..count-1.
        steps (`int`): sampling steps.
        guidance (`float`): the CFG scale.
        side (`int`, *optional*): the latent side; defaults to the teacher's native one.

    Returns:
        `dict`: `prompt_accuracy`'s scores.
    """
    from swd_core.adapters.sd3 import SD3Adapter
    from swd_core.generate import generate_latents

    adapter = SD3Adapter(pipe, max_sequence_length=0)
    samples = shapes.held_out_prompts()[:count]
    lat = generate_latents(adapter, [s.caption for s in samples], list(range(count)), teacher_steps=steps,
                           guidance=guidance, size=side)
    readings, _ = read_scenes(classifier, to_evaluator_size(adapter.decode_latents(lat).float().cpu()))
    return prompt_accuracy(samples, readings)


def trained_sides() -> tuple[int, ...]:
    """The latent sides the committed teacher was trained at, from `RECORD` (a transformer entry
    without `sides` is of a teacher trained at the full size only).

    Returns:
        `tuple[int, ...]`: empty when there is no record of a teacher.
    """
    if not RECORD.exists():
        return ()
    done = json.loads(RECORD.read_text()).get("transformer", {})
    return tuple(done.get("sides", (16,) if done else ()))


def train_transformer(hours: float | None = None, batch: int = 64, lr: float | None = None, eval_every_s: float = 900,
                      ckpt_every_s: float = 300, sides: tuple[int, ...] = TOY_SIDES, out: Path | None = None,
                      continue_teacher: bool = False, device: str = "cpu", precision: str = "fp32") -> None:
    """Train the teacher at every latent side in `sides`, one side per batch (bucketed, as
    multi-resolution pre-training does). `hours` is the budget of this training, across runs
    (resumable from the work checkpoint).

    Starts from the committed teacher when it exists on the same latent space as the VAE but was
    trained at fewer sides (a fine-tune, lr 1e-4), otherwise from scratch (lr 3e-4); skips when
    the committed teacher already covers `sides`, unless `continue_teacher`: then it is
    fine-tuned further for `hours` (a new round with a fresh optimizer; the record lists the
    earlier rounds).

    Args:
        hours (`float`, *optional*): the wall-clock budget, across resumed runs; evaluation time is
            not counted. Defaults to the checkpoint's budget, else `DEFAULT_HOURS`; a resume under
            another budget reshapes the rate's schedule, and says so.
        batch (`int`): latents per step.
        lr (`float`, *optional*): the peak learning rate; defaults as above, and a resumed run
            keeps its checkpoint's.
        eval_every_s (`float`): seconds between evaluations of the EMA weights (needs the classifier).
        ckpt_every_s (`float`): seconds between work checkpoints.
        sides (`tuple[int, ...]`): latent sides to train at, `SIDE_WEIGHTS` drawing among them.
        out (`Path`, *optional*): the teacher folder to write; only `TEACHER`, the default, is recorded.
        continue_teacher (`bool`): fine-tune the committed teacher for another round.
        device (`str`): where it trains ("cpu", "cuda"); batches are drawn on the CPU either way.
        precision (`str`): "bf16" runs the forward pass under bf16 autocast (weights, optimizer and
            loss stay fp32), "fp32" does not.
    """
    out = out or TEACHER
    space = latent_space(vae_dir())
    # a teacher on another latent space (another VAE) cannot be fine-tuned on this one
    exists = (TEACHER / "model_index.json").exists() and latent_space(TEACHER / "vae") == space
    ck = latest_checkpoint()
    if continue_teacher and ck is not None and ck["elapsed"] >= (hours or ck.get("hours", DEFAULT_HOURS)) * 3600:
        ck = None  # that round is done: --continue starts another
    hours = hours or (ck.get("hours") if ck else None) or DEFAULT_HOURS
    budget = hours * 3600
    covered = exists and set(sides) <= set(trained_sides()) and out == TEACHER
    if covered and ((ck is None and not continue_teacher) or (ck is not None and ck["elapsed"] >= budget)):
        log(f"transformer: {TEACHER} is trained at sides {list(trained_sides())}, skipping")
        return
    from swd_core.adapters.sd3 import SD3Adapter, load_sd3_pipeline

    torch.manual_seed(SEED)
    if continue_teacher and not exists:
        raise SystemExit(f"--continue: there is no teacher at {TEACHER} to train further")
    init = ck.get("init", "scratch") if ck else ("teacher" if exists else "scratch")
    if ck and tuple(ck.get("latent_space", space)) != space:
        raise SystemExit(f"{CKPT} trains on another VAE's latent space than {vae_dir()}: remove it to start over")
    if ck and ck.get("init") == "teacher" and not exists:
        raise SystemExit(f"{CKPT} fine-tunes a teacher on another latent space than {vae_dir()}: "
                         "remove it to start over")
    if ck and tuple(ck.get("sides", (16,))) != tuple(sides):
        raise SystemExit(f"{CKPT} trains sides {list(ck.get('sides', (16,)))}, not {list(sides)}: "
                         "remove it to start over")
    if ck and lr and ck.get("lr") not in (None, lr):
        raise SystemExit(f"{CKPT} trains at lr {ck['lr']}, not {lr}: "
                         "leave --lr out to continue, or remove it to start over")
    lr = (ck.get("lr") if ck else None) or lr or (1e-4 if init == "teacher" else 3e-4)
    # the record of the teacher a fine-tune starts from, kept with its checkpoints
    previous = json.loads(RECORD.read_text()).get("transformer") if RECORD.exists() else None
    if ck and "started_from" in ck:
        started_from = ck["started_from"]
    elif init == "teacher" and previous:  # the committed teacher: itself, or what it was fine-tuned from
        started_from = previous if "sides" not in previous else previous.get("started_from")
    else:
        started_from = None
    rounds = ck.get("previous_rounds", []) if ck else []
    if not ck and continue_teacher and previous and "sides" in previous:  # another round on this teacher
        rounds = previous.get("previous_rounds", []) + [
            {k: previous[k] for k in ("steps", "minutes", "lr", "batch", "command", "history") if k in previous}]
    pipe = load_sd3_pipeline(str(TEACHER), "float32") if init == "teacher" else teacher_pipeline()
    pipe.vae.requires_grad_(False)
    pipe.to(device)
    adapter = SD3Adapter(pipe, max_sequence_length=0)
    latents, captions = training_latents(adapter, sides)
    modules = teacher_modules(pipe)
    params = [p for m in modules.values() for p in m.parameters()]
    ema = {k: {n: t.detach().clone() for n, t in m.state_dict().items()} for k, m in modules.items()}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    step, elapsed = 0, 0.0
    warm_from, warmup = 0, 100 if init == "teacher" else 300
    g = torch.Generator().manual_seed(SEED + 1000 * len(rounds))  # each round draws its own batches
    history = []
    if ck:
        for k, m in modules.items():
            m.load_state_dict(ck["model"][k])
        ema = {k: {n: t.to(device, torch.float32) if t.is_floating_point() else t.to(device) for n, t in m.items()}
               for k, m in ck["ema"].items()}
        step, elapsed, history = ck["step"], ck["elapsed"], ck["history"]
        if "opt" in ck:
            opt.load_state_dict(ck["opt"])
            warm_from = ck.get("warm_from", 0)  # a re-warm under way goes on
        else:  # a packed checkpoint: Adam's moments start again, so its rate warms up again
            warm_from = step
        g.set_state(ck["rng"])
        log(f"resumed at step {step} ({elapsed / 60:.1f} min trained)"
            + ("" if "opt" in ck else f"; no optimizer state (packed): the rate warms up over {REWARM_STEPS} steps"))
        if ck.get("hours", hours) != hours:
            log(f"budget {ck['hours']:g} h -> {hours:g} h: the rate now decays from {0.75 * budget / 60:.0f} to "
                f"{budget / 60:.0f} min trained")
    del ck
    extra = {"init": init, "sides": list(sides), "lr": lr, "started_from": started_from, "previous_rounds": rounds,
             "latent_space": list(space), "warm_from": warm_from, "hours": hours}
    weights = torch.tensor([SIDE_WEIGHTS.get(s, 1.0) for s in sides])
    classifier = load_classifier(CLASSIFIER) if CLASSIFIER.exists() else None
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    log(f"teacher transformer {n_params / 1e6:.2f}M params on {pipe.transformer.config.in_channels} latent "
        f"channels (init: {init}, lr {lr}, {device}, {precision}); sides {list(sides)}; "
        f"{len(captions)} training images")
    last_ckpt = time.time()
    t0 = time.time() - elapsed
    # evaluations are spaced in training time from the last one recorded, so a resume keeps the
    # curve's spacing (a run restarted more often than eval_every_s would otherwise never evaluate)
    evaluated_at = history[-1]["minutes"] * 60 if history else 0.0
    for m in modules.values():
        m.train()
    while time.time() - t0 < budget:
        side = sides[int(torch.multinomial(weights, 1, generator=g))]
        idx = torch.randint(len(captions), (batch,), generator=g)
        keep = torch.rand(batch, generator=g) >= 0.1  # 10% caption dropout for CFG
        prompts = [captions[i] if k else "" for i, k in zip(idx.tolist(), keep.tolist())]
        z = latents[side][idx].float()
        sigma = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal timesteps
        eps = torch.randn(z.shape, generator=g)
        z, sigma, eps = z.to(device), sigma.to(device), eps.to(device)
        s = sigma.view(-1, 1, 1, 1)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=0)
            v = pipe.transformer(hidden_states=(1 - s) * z + s * eps, timestep=sigma * 1000,
                                 encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(v.float(), eps - z)
        # linear warmup, then a linear decay to zero over the last quarter of the budget (annealing
        # the rate is worth more late in training than extra steps at a constant rate)
        remaining = budget - (time.time() - t0)
        for group in opt.param_groups:
            rewarm = (step - warm_from + 1) / REWARM_STEPS if warm_from else 1.0
            group["lr"] = lr * min(1.0, (step + 1) / warmup, rewarm, remaining / (0.25 * budget))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, m in modules.items():
                for n, t in m.state_dict().items():
                    if t.dtype.is_floating_point:
                        ema[k][n].lerp_(t, 1 - decay)
                    else:
                        ema[k][n].copy_(t)
        step += 1
        if step % 50 == 0:
            log(f"step {step} side {side} loss {loss.item():.4f} ({(time.time() - t0) / 60:.1f} min)")
        now = time.time()
        if classifier is not None and now - t0 - evaluated_at > eval_every_s:
            evaluated_at = now - t0
            entry = {"step": step, "minutes": round(evaluated_at / 60, 1)}
            for eval_side in sorted({max(sides), min((s for s in sides if s >= 8), default=max(sides))}, reverse=True):
                acc = _eval_ema(pipe, modules, ema, classifier, side=eval_side)
                entry[f"side_{eval_side}"] = {"acc_one_object": acc["acc_one_object"],
                                              "acc_two_object": acc["acc_two_object"]}
            history.append(entry)
            log(f"eval at step {step}: {json.dumps({k: v for k, v in entry.items() if k.startswith('side')})}")
            t0 += time.time() - now  # evaluation time does not count against the training budget
        if now - last_ckpt > ckpt_every_s:
            _save_ckpt(modules, ema, opt, step, time.time() - t0, g, history, extra)
            last_ckpt = time.time()
    _save_ckpt(modules, ema, opt, step, time.time() - t0, g, history, extra)
    for k, m in modules.items():
        m.load_state_dict(ema[k])
    pipe.vae.requires_grad_(True)
    # fp16 on disk keeps the folder small; loading with dtype=float32 upcasts.
    # the VAE's sides go with it (from scratch the pipeline holds vae_dir()'s VAE; a fine-tune, the teacher's own)
    marker = vae_dir() / "decoder_sides.json" if init == "scratch" else TEACHER / "vae" / "decoder_sides.json"
    pipe.to("cpu", torch.float16).save_pretrained(out)
    if marker.exists() and marker.parent != out / "vae":
        shutil.copy(marker, out / "vae" / marker.name)
    if out == TEACHER:
        architecture = {**TEACHER_ARCH, "latent_channels": pipe.transformer.config.in_channels}
        record("transformer", replace=True, seed=SEED, steps=step, batch=batch, lr=lr, device=str(device),
               precision=precision,
               minutes=round((time.time() - t0) / 60, 1), architecture=architecture, transformer_params=n_params,
               history=history, sides=list(sides), side_weights={str(s): SIDE_WEIGHTS.get(s, 1.0) for s in sides},
               init=init, **({"started_from": started_from} if started_from else {}),
               **({"previous_rounds": rounds} if rounds else {}))
    log(f"teacher saved to {out} after {step} steps")


def _eval_ema(pipe, modules, ema, classifier, side=None):
    live = {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in modules.items()}
    for k, m in modules.items():
        m.load_state_dict(ema[k])
        m.eval()
    try:
        return quick_eval(pipe, classifier, side=side)
    finally:
        for k, m in modules.items():
            m.load_state_dict(live[k])
            m.train()


def _save_ckpt(modules, ema, opt, step, elapsed, g, history, extra: dict) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = CKPT.with_suffix(".tmp")  # written aside, then renamed: a kill never leaves half a checkpoint
    torch.save({"model": {k: m.state_dict() for k, m in modules.items()}, "ema": ema, "opt": opt.state_dict(),
                "step": step, "elapsed": elapsed, "rng": g.get_state(), "history": history, **extra}, tmp)
    tmp.replace(CKPT)
    log(f"checkpoint at step {step}")


PACK_README = "A toy teacher's training state"
REWARM_STEPS = 100  # Adam's warmup after a packed checkpoint, which has no optimizer state


def write_packed(ck: dict, path: Path) -> None:
    """A work checkpoint as `path`.safetensors (weights and EMA in fp16, the batch generator's
    state) and `path`.json (the rest), without the optimizer's state: a quarter of the size, and
    nothing that unpickles. `read_packed` reads it back; Adam restarts with a short warmup.

    Args:
        ck (`dict`): a checkpoint as `_save_ckpt` writes it.
        path (`Path`): the name to write beside (its suffix is replaced).
    """
    from safetensors.torch import save_file

    tensors = {"rng": ck["rng"].clone()}
    for part in ("model", "ema"):
        for component, state in ck[part].items():
            for name, t in state.items():
                tensors[f"{part}/{component}/{name}"] = (t.half() if t.is_floating_point() else t).contiguous().clone()
    save_file(tensors, path.with_suffix(".safetensors"))
    meta = {k: v for k, v in ck.items() if k not in ("model", "ema", "opt", "rng")}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")


def read_packed(path: Path) -> dict | None:
    """The checkpoint `write_packed` wrote beside `path`, None when there is none.

    Args:
        path (`Path`): the name it was written beside.

    Returns:
        `dict`: as `_save_ckpt` writes it, less "opt".
    """
    from safetensors.torch import load_file

    tensors_path, meta_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not (tensors_path.exists() and meta_path.exists()):
        return None
    ck = {**json.loads(meta_path.read_text()), "model": {}, "ema": {}}
    for key, t in load_file(tensors_path).items():
        if key == "rng":
            ck["rng"] = t
            continue
        part, component, name = key.split("/", 2)
        ck[part].setdefault(component, {})[name] = t
    return ck


def latest_checkpoint() -> dict | None:
    """The work checkpoint (`CKPT`) or a packed one copied in beside it, whichever is further on."""
    full = torch.load(CKPT, weights_only=True, map_location="cpu") if CKPT.exists() else None
    packed = read_packed(CKPT)
    if full is None or packed is None:
        return full or packed
    return full if full["step"] >= packed["step"] else packed


def pack(dest: Path) -> None:
    """Write what the transformer's training needs to go on elsewhere into `dest`: the VAE it
    trains on, the record, and the latest checkpoint packed by `write_packed` (fp16, no optimizer
    state: a quarter of the size, and no pickle). To go on, copy `vae/` and `teacher_ckpt.*` into
    the `--work` folder and `training_record.json` into `--weights`; the latents cache is rebuilt.
    A fine-tune's state is refused: it would need the teacher it started from as well.

    Args:
        dest (`Path`): the folder to write: new, empty, or an earlier pack (replaced).
    """
    ck = latest_checkpoint()
    if ck is None:
        raise SystemExit(f"pack: there is no checkpoint at {CKPT}")
    dest = dest.resolve()
    # replacing dest must not take a folder the training uses with it, nor write into a model folder
    for folder in {WORK, WEIGHTS, TEACHER, vae_dir()}:
        folder = folder.resolve()
        inside_model = folder in dest.parents and folder in (TEACHER.resolve(), vae_dir().resolve())
        if dest == folder or dest in folder.parents or inside_model:
            raise SystemExit(f"pack: --out {dest} overlaps {folder}, which the training uses; name another folder")
    readme = dest / "README.md"
    if dest.exists() and any(dest.iterdir()) and not (readme.exists() and readme.read_text().startswith(PACK_README)):
        raise SystemExit(f"pack: {dest} holds something other than an earlier pack; name a new or empty folder")
    if ck.get("init") == "teacher":
        raise SystemExit(f"pack: {CKPT} fine-tunes the teacher at {TEACHER}, which a pack does not carry")
    part, old = dest.with_name(f".{dest.name}.packing"), dest.with_name(f".{dest.name}.replaced")
    for leftover in (part, old):
        shutil.rmtree(leftover, ignore_errors=True)
    part.mkdir(parents=True)
    write_packed(ck, part / CKPT.name)
    shutil.copytree(vae_dir(), part / "vae")
    if RECORD.exists():
        shutil.copy(RECORD, part / RECORD.name)
    sides = " ".join(map(str, ck.get("sides", TOY_SIDES)))
    hours = f"{ck['hours']:g}" if "hours" in ck else "H"
    (part / "README.md").write_text(
        f"{PACK_README}, packed at step {ck['step']} ({ck['elapsed'] / 60:.0f} min trained, sides {sides}, "
        f"lr {ck.get('lr')}) by `python -m swd_core.toy.train pack`.\n\n"
        "To go on training, copy it into a work and a weights folder, then run the trainer on them:\n\n"
        "    mkdir -p WORK WEIGHTS && cp -r vae teacher_ckpt.* WORK/ && cp training_record.json WEIGHTS/\n"
        f"    python -m swd_core.toy.train all --work WORK --weights WEIGHTS --sides {sides} --hours {hours}\n\n"
        f"{hours} is the budget in hours across every run so far (the rate decays over its last quarter). "
        f"The weights and their EMA are fp16 and the optimizer's state is left out, so Adam restarts with a "
        f"{REWARM_STEPS}-step warmup.\n")
    if dest.exists():  # the earlier pack goes only once the new one is complete
        dest.rename(old)
    part.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    log(f"pack: step {ck['step']} ({ck['elapsed'] / 60:.1f} min trained) written to {dest}")


# ---------------------------------------------------------------- entry point

PHASES = {"classifier": lambda a: train_classifier(),
          "vae": lambda a: train_vae(a.vae_steps, a.vae_batch, device=a.device),
          "vae-decoder": lambda a: train_vae_decoder(a.decoder_steps),
          "transformer": lambda a: train_transformer(a.hours, a.batch, a.lr, sides=tuple(a.sides),
                                                     out=Path(a.out) if a.out else None,
                                                     continue_teacher=a.continue_teacher, device=a.device,
                                                     precision=a.precision)}


def use_folders(weights: Path | None = None, work: Path | None = None) -> None:
    """Point the phases at other folders, to train a new teacher beside the committed one (the
    evaluator classifier stays the committed one unless `weights` holds its own).

    Args:
        weights (`Path`, *optional*): replaces `WEIGHTS` (teacher, record).
        work (`Path`, *optional*): replaces `WORK` (the VAE, latents cache, checkpoint).
    """
    global WEIGHTS, TEACHER, RECORD, CLASSIFIER, WORK, CKPT
    if weights is not None:
        WEIGHTS, TEACHER, RECORD = weights, weights / "toy-sd3", weights / "training_record.json"
        if (weights / "classifier.safetensors").exists():
            CLASSIFIER = weights / "classifier.safetensors"
    if work is not None:
        WORK, CKPT = work, work / "teacher_ckpt.pt"


def adopt(staged: Path, teacher: Path, record_path: Path) -> None:
    """Make the teacher trained aside in `staged` (a `--weights` folder) the committed one: its
    folder replaces `teacher`, and its record's entries replace theirs in `record_path`; the
    classifier's entry stays, and a refinement of the replaced VAE (`vae_decoder`) goes with it.

    Args:
        staged (`Path`): holds toy-sd3/ and training_record.json with "vae" and "transformer".
        teacher (`Path`): the teacher folder to replace.
        record_path (`Path`): the record to update.
    """
    src, rec = staged / "toy-sd3", staged / "training_record.json"
    if not (src / "model_index.json").exists() or not rec.exists():
        raise SystemExit(f"adopt: {staged} holds no trained teacher (toy-sd3/ and training_record.json)")
    new = json.loads(rec.read_text())
    missing = sorted({"vae", "transformer"} - set(new))
    if missing:
        raise SystemExit(f"adopt: {rec} has no {' or '.join(missing)} entry: its teacher is not finished")
    old = json.loads(record_path.read_text()) if record_path.exists() else {}
    teacher_entries = ("vae", "vae_decoder", "transformer")
    merged = {k: v for k, v in old.items() if k not in teacher_entries} | {
        k: v for k, v in new.items() if k in teacher_entries}
    part = teacher.with_name(f".{teacher.name}.adopting")  # copied whole before the old one goes
    shutil.rmtree(part, ignore_errors=True)
    shutil.copytree(src, part)
    if teacher.exists():
        shutil.rmtree(teacher)
    part.rename(teacher)
    record_path.write_text(json.dumps(merged, indent=2) + "\n")
    log(f"adopt: {teacher} is the teacher trained in {staged}; {record_path} updated")


def pick_precision(name: str, device: str) -> str:
    """`name`, with "auto" resolved: bf16 where the device computes it natively (a CUDA GPU that
    supports it, a CPU with AVX-512 BF16 or AMX), since bf16 autocast on any other CPU is emulated
    and slower than fp32; fp32 elsewhere."""
    if name != "auto":
        return name
    if device.startswith("cuda"):  # Ampere and later; older GPUs emulate it
        return "bf16" if torch.cuda.get_device_properties(torch.device(device)).major >= 8 else "fp32"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: nothing says the CPU has bf16
        return "fp32"
    return "bf16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "fp32"


def pick_device(name: str) -> str:
    """`name`, checked: "cuda" without a GPU is one clear line rather than a trace mid-phase."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch sees no CUDA device here (torch {torch.__version__})")
    return name


def main(argv=None) -> None:
    """The command line: run one phase, or all in order (each skips itself when done).

    Args:
        argv (`list[str]`, *optional*): the arguments; defaults to `sys.argv[1:]`.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=[*PHASES, "all", "adopt", "pack"],
                        help="adopt: make the teacher trained in --weights DIR the committed one; "
                             "pack: write a slim copy of the transformer's training state to --out DIR")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the VAE and transformer train")
    parser.add_argument("--weights", type=Path, default=None,
                        help="write the teacher and its record here instead of swd_core/toy/weights")
    parser.add_argument("--work", type=Path, default=None,
                        help="the work folder (VAE, latents cache, checkpoint) instead of swd_core/toy/.work")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--decoder-steps", type=int, default=3000)
    parser.add_argument("--hours", type=float, default=None,
                        help=f"transformer training budget (wall clock, across resumed runs); default: the "
                             f"checkpoint's, else {DEFAULT_HOURS:g}")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="the transformer's forward pass: bf16 autocast or fp32; auto takes bf16 where "
                             "the device has it natively (1.4-1.8x faster on a CPU with AVX-512 BF16)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-4 for a fine-tune, 3e-4 from scratch")
    parser.add_argument("--sides", type=int, nargs="+", default=list(TOY_SIDES), help="latent sides to train at")
    parser.add_argument("--out", default=None,
                        help="write the teacher folder here instead of the committed one; pack: the folder to write")
    parser.add_argument("--continue", dest="continue_teacher", action="store_true",
                        help="fine-tune the committed teacher further for --hours (a new round)")
    args = parser.parse_args(argv)
    args.device = pick_device(args.device)
    args.precision = pick_precision(args.precision, args.device)
    if args.phase == "adopt":
        if args.weights is None:
            raise SystemExit("adopt: name the folder the teacher was trained in with --weights DIR")
        return adopt(args.weights, TEACHER, RECORD)
    use_folders(args.weights, args.work)
    if args.phase == "pack":
        if args.out is None:
            raise SystemExit("pack: name the folder to write with --out DIR")
        return pack(Path(args.out))
    if args.device == "cpu":
        torch.set_num_threads(2)
    for name, fn in PHASES.items():
        if args.phase in (name, "all"):
            fn(args)


if __name__ == "__main__":
    main()
