"""The image metrics (swd_core.image_metrics) and their intervals (swd_core.bootstrap), without Ray
and without downloaded weights: tiny random CLIP and DINOv2 models built from configs and saved
to a temporary folder, loaded by path as a Hub checkpoint would be. The CLIP score is checked
against torchmetrics' CLIPScore, the Fréchet distance against torchmetrics' FID and scipy, and
PickScore against its model card's computation; the intervals' coverage on synthetic data."""

import numpy as np
import pytest
import torch

from swd_core.bootstrap import Reading, estimate, paired_difference, win_rate
from swd_core.frechet import frechet_distance
from swd_core.generate import to_pil
from swd_core.image_metrics import ClipSimilarity, DinoFeatures, ImageMetrics, processor_images
from swd_core.tiny_models import save_tiny_clip, save_tiny_dinov2

PROMPTS = ["a red circle", "a blue square on a white background", "two small green crosses", "a photo of a dog"] * 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric-models")
    # seed 2: its random towers give both signs of the cosine on these images (checked below)
    clip = save_tiny_clip(root / "clip", seed=2)
    pick = save_tiny_clip(root / "pickscore", seed=3, with_processor=False)  # a model folder without a processor
    processor = save_tiny_clip(root / "processor", seed=4)
    return {"clip": clip, "pickscore": pick, "pickscore_processor": processor,
            "dinov2": save_tiny_dinov2(root / "dinov2")}


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(len(PROMPTS), 3, 48, 40) * 2 - 1  # not square: the processors resize and crop


def test_clip_score_equals_torchmetrics(tiny, images):
    from torchmetrics.functional.multimodal import clip_score
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    class Embeddings(torch.nn.Module):
        """The CLIP model with get_*_features returning the embedding tensor, as torchmetrics 1.9
        expects it (transformers 5 returns a model output holding it as `pooler_output`)."""

        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, pixel_values):
            return self.model.get_image_features(pixel_values=pixel_values).pooler_output

        def get_text_features(self, input_ids, attention_mask):
            return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    def reference():
        return Embeddings(CLIPModel.from_pretrained(tiny["clip"])), CLIPProcessor.from_pretrained(tiny["clip"])

    ours = ClipSimilarity(tiny["clip"], batch_size=5).scores(images, PROMPTS)
    assert ours.shape == (len(PROMPTS),) and (ours > 0).any() and (ours < 0).any() and ours.mean() > 0
    eight_bit = processor_images(images)
    with torch.no_grad():
        # per image: torchmetrics reports max(score, 0)
        each = np.array([float(clip_score(eight_bit[i], PROMPTS[i], reference)) for i in range(len(PROMPTS))])
        metric = CLIPScore(model_name_or_path=reference)
        metric.update(eight_bit, PROMPTS)
        mean = float(metric.compute())
    np.testing.assert_allclose(np.maximum(ours, 0), each, rtol=0, atol=1e-4)
    assert abs(ours.mean() - mean) < 1e-4
    # the batch does not change an image's score
    np.testing.assert_allclose(ClipSimilarity(tiny["clip"], batch_size=32).scores(images, PROMPTS), ours, atol=1e-4)


def test_pickscore_follows_its_model_card(tiny, images):
    """The card's computation, per prompt over its images: the processor from its own path, the
    model from another, logit_scale.exp() × cosine; and its softmax preference between images."""
    from transformers import AutoModel, AutoProcessor

    with pytest.raises(OSError):
        # the model folder has no processor: it must come from the other
        AutoProcessor.from_pretrained(tiny["pickscore"])
    processor = AutoProcessor.from_pretrained(tiny["pickscore_processor"])
    model = AutoModel.from_pretrained(tiny["pickscore"]).eval()

    def card(prompt, pil_images):
        image_inputs = processor(images=pil_images, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            image_embs = model.get_image_features(**image_inputs).pooler_output
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs).pooler_output
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
        return scores, torch.softmax(scores, dim=-1)

    metrics = ImageMetrics(["pickscore"], {k: tiny[k] for k in ("pickscore", "pickscore_processor")}, batch_size=4)
    pil = to_pil(images)
    for prompt in PROMPTS[:4]:
        want, probs = card(prompt, pil)
        got = metrics.read(images, [prompt] * len(pil))["pickscore"]
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(torch.softmax(torch.tensor(got), -1).numpy(), probs.numpy(), atol=1e-5)
    assert model.logit_scale.exp().item() != 100.0  # a scale of its own, not the CLIP score's


def test_models_load_once_per_process_and_device(tiny):
    a = ClipSimilarity(tiny["clip"])
    b = ImageMetrics(["clip_score"], {"clip": tiny["clip"]})._reader("clip_score")
    assert a.model is b.model
    with pytest.raises(ValueError, match="unknown image metric"):
        ImageMetrics(["fid"])
    with pytest.raises(OSError):
        ClipSimilarity(str(tiny["clip"]) + "-absent")


def test_dinov2_features_are_the_cls_token_after_the_final_norm(tiny, images):
    from transformers import AutoImageProcessor, Dinov2Model

    feats = DinoFeatures(tiny["dinov2"], batch_size=5).features(images)
    model = Dinov2Model.from_pretrained(tiny["dinov2"]).eval()
    proc = AutoImageProcessor.from_pretrained(tiny["dinov2"])
    with torch.no_grad():
        out = model(pixel_values=proc(images=to_pil(images), return_tensors="pt")["pixel_values"])
    want = out.last_hidden_state[:, 0]  # the final layer norm is applied to every token
    assert feats.shape == (len(PROMPTS), 32)
    np.testing.assert_allclose(feats, want.numpy(), atol=1e-5)


@pytest.mark.parametrize("n,d", [(400, 24), (40, 64), (12, 32)])  # more images than dimensions, and fewer
def test_frechet_distance_equals_torchmetrics_fid_and_scipy(n, d):
    import scipy.linalg
    from torchmetrics.image.fid import FrechetInceptionDistance

    def scipy_fd(x, y):  # the textbook formula, with scipy's matrix square root
        cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        root = np.real(scipy.linalg.sqrtm(cov_x @ cov_y))
        return ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(cov_x + cov_y - 2 * root)

    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.2

    class Features(torch.nn.Module):  # the FID's feature extractor: our features as they are
        num_features = d

        def forward(self, x):
            return x

    fid = FrechetInceptionDistance(feature=Features(), reset_real_features=True)
    fid.update(torch.tensor(a), real=True)
    fid.update(torch.tensor(b), real=False)
    reference = float(fid.compute())
    ours = frechet_distance(a, b)
    assert abs(ours / reference - 1) < 1e-6
    if n > d:  # scipy's matrix square root is exact only for full-rank covariances
        assert abs(ours / scipy_fd(a, b) - 1) < 1e-6
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9 * np.trace(np.cov(a.T)))


def _coverage(draw, truth, reps=400, n=60, **kw) -> float:
    rng = np.random.default_rng(0)
    hits = 0
    for r in range(reps):
        e = draw(rng, n, seed=r, **kw)
        hits += e.lo <= truth <= e.hi
    return hits / reps


def test_intervals_cover_the_true_value_at_about_their_level():
    # a per-prompt score (mean 2, sd 3) and a paired model whose scores share the prompt's part
    mean = _coverage(lambda rng, n, **kw: estimate(Reading(values=rng.normal(2.0, 3.0, n)), **kw), 2.0)

    def paired(rng, n, **kw):
        prompt = rng.normal(0, 3.0, n)  # how hard each prompt is, for both models
        a, b = prompt + 0.5 + rng.normal(0, 1.0, n), prompt + rng.normal(0, 1.0, n)
        return paired_difference(Reading(values=a), Reading(values=b), **kw)

    diff = _coverage(paired, 0.5)
    lower = _coverage(lambda rng, n, **kw: estimate(Reading(values=rng.normal(2.0, 3.0, n)), level=0.8, **kw), 2.0)
    print(f"coverage: mean {mean:.3f}, paired difference {diff:.3f} (level 0.95), mean {lower:.3f} (level 0.8)")
    assert 0.91 <= mean <= 0.98 and 0.91 <= diff <= 0.98  # 400 repetitions: sd of a 0.95 coverage is 0.011
    assert 0.74 <= lower <= 0.86


def test_a_paired_difference_is_tighter_than_separate_intervals():
    rng = np.random.default_rng(3)
    prompt = rng.normal(0, 3.0, 80)
    a, b = prompt + 0.5 + rng.normal(0, 0.5, 80), prompt + rng.normal(0, 0.5, 80)
    d = paired_difference(Reading(values=a), Reading(values=b))
    ea, eb = estimate(Reading(values=a)), estimate(Reading(values=b))
    assert ea.lo < eb.hi  # separately the two intervals overlap
    assert d.lo > 0 and d.value == pytest.approx(a.mean() - b.mean())  # paired, the difference is resolved
    w = win_rate(a, b)
    assert w.value == pytest.approx(np.mean(a > b)) and w.lo > 0.5


def test_fd_intervals_are_centred_on_the_fd_of_all_prompts():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(50, 16))
    near, far = Reading(features=ref + rng.normal(0, 0.3, (50, 16)), reference=ref), \
        Reading(features=ref + rng.normal(0.5, 0.3, (50, 16)), reference=ref)
    e = estimate(near)
    assert e.lo < e.value < e.hi and e.value == pytest.approx(frechet_distance(near.features, ref))
    d = paired_difference(far, near)
    assert d.lo > 0 and d.value == pytest.approx(far.statistic() - near.statistic())
    with pytest.raises(ValueError, match="same kind"):
        paired_difference(near, Reading(values=np.zeros(50)))
