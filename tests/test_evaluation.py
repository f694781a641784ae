"""The evaluator: metric math on known inputs, and the committed classifier on real vs noise."""

import numpy as np
import pytest
import torch

from swd_core.evaluation import SceneReading, judge, prompt_accuracy, psnr, read_scenes
from swd_core.frechet import fd_mean_term, frechet_distance
from swd_core.toy import shapes
from swd_core.toy.shapes import ShapeObject, ShapesSample


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # same covariance, mean shifted by (3, 0, 0): FD = 9
    assert frechet_distance(a, a + np.array([3.0, 0, 0])) == pytest.approx(9.0, abs=1e-6)
    # N(0, I) vs N(0, 4I) in 3-d: Tr(I + 4I - 2·2I) = 3
    b = rng.normal(size=(200_000, 3))
    assert frechet_distance(b, 2 * rng.normal(size=(200_000, 3))) == pytest.approx(3.0, abs=0.1)
    # the mean-shift part: all of the shifted pair's 9, none of the scaled pair's 3
    assert fd_mean_term(a, a + np.array([3.0, 0, 0])) == pytest.approx(9.0, abs=1e-9)
    assert fd_mean_term(b, 2 * rng.normal(size=(200_000, 3))) == pytest.approx(0.0, abs=1e-3)


def test_psnr_known_value():
    ref = torch.zeros(1, 3, 4, 4)
    assert psnr(ref, ref + 0.02) == pytest.approx(10 * np.log10(4 / 0.0004))


def _one(**stated):
    return ShapesSample("a large red circle in the top left on a white background",
                        [ShapeObject("circle", "red", "large", 0, 0)], "white", None,
                        {"size": True, "position": True, "background": True, **stated})


def test_judge_checks_every_prompted_attribute():
    right = SceneReading([ShapeObject("circle", "red", "large", 0, 0)], [0.9], "white")
    assert judge(_one(), right)["all"]
    wrong_size = SceneReading([ShapeObject("circle", "red", "small", 0, 0)], [0.9], "white")
    v = judge(_one(), wrong_size)
    assert not v["all"] and v["size"] is False and v["shape"] and v["color"]
    assert judge(_one(size=False), wrong_size)["all"]  # size not prompted: not checked
    moved = SceneReading([ShapeObject("circle", "red", "large", 1, 1)], [0.9], "white")
    assert judge(_one(), moved)["position"] is False
    extra = SceneReading(right.objects + [ShapeObject("square", "blue", "small", 2, 2)], [0.9, 0.8], "white")
    assert judge(_one(), extra)["count"] is False and not judge(_one(), extra)["all"]
    assert not judge(_one(), SceneReading([], [], "white"))["all"]


def test_judge_two_objects_and_relation():
    s = ShapesSample("a red circle to the left of a blue square", [ShapeObject("circle", "red", "large", 1, 0),
                     ShapeObject("square", "blue", "small", 1, 2)], "black", "left of", {})
    ok = SceneReading([ShapeObject("square", "blue", "large", 0, 2), ShapeObject("circle", "red", "small", 2, 1)],
                      [0.9, 0.9], "white")
    assert judge(s, ok)["all"]  # size/background not prompted; detection order does not matter
    swapped = SceneReading([ShapeObject("square", "blue", "large", 0, 0), ShapeObject("circle", "red", "small", 2, 1)],
                           [0.9, 0.9], "white")
    v = judge(s, swapped)
    assert v["relation"] is False and not v["all"]
    acc = prompt_accuracy([s, s], [ok, swapped])
    assert acc["acc_two_object"] == 0.5 and acc["acc_one_object"] is None and acc["per_attribute"]["relation"] == 0.5


@pytest.fixture(scope="module")
def classifier():
    from swd_core.evaluation import load_classifier
    from swd_core.toy import CLASSIFIER

    return load_classifier(CLASSIFIER)


def test_committed_classifier_reads_real_images_and_rejects_noise(classifier):
    samples = shapes.held_out_prompts()[:128]
    rng = np.random.default_rng(1)
    real = shapes.to_tensor([shapes.render(s, rng) for s in samples])
    readings, feats = read_scenes(classifier, real)
    acc = prompt_accuracy(samples, readings)
    assert acc["prompt_accuracy"] >= 0.97
    noise = torch.rand_like(real) * 2 - 1
    noise_readings, noise_feats = read_scenes(classifier, noise)
    assert prompt_accuracy(samples, noise_readings)["prompt_accuracy"] <= 0.1
    # FD: real vs other real images is far below real vs noise
    other = shapes.to_tensor([shapes.render(s, rng) for s in shapes.held_out_prompts()[128:256]])
    _, other_feats = read_scenes(classifier, other)
    assert frechet_distance(feats, other_feats) * 10 < frechet_distance(feats, noise_feats)


@pytest.mark.parametrize("px", [32, 40, 48])
def test_smaller_images_are_upscaled_and_still_read(px):
    """The evaluator reads every size the toy schedules generate at: real renders area-downscaled
    to `px` and upscaled back to 64 px are read almost as well as full-size ones, and FD compares
    them with real renders of the same size (a second render set is near 0)."""
    from swd_core.evaluate_model import ShapesScorer, render_real

    samples = shapes.held_out_prompts()[:160]
    scorer = ShapesScorer(samples, size=px)
    assert scorer.real.shape[-1] == px
    assert scorer.real_accuracy["prompt_accuracy"] >= 0.95
    assert scorer.fd_floor(160) < 0.1
    acc, _ = scorer.score(render_real(samples, seed=9, size=px))
    assert acc["prompt_accuracy"] >= 0.95 and acc["fd"] < 0.1
    with pytest.raises(ValueError, match=f"reads {px}x{px} images"):
        scorer.score(render_real(samples[:4]))
