import pytest
import torch

from swd_core.schedules import PRESETS, ScaleSchedule, boundaries_to_sigmas, preset, sample_grid_sigmas, sigma_grid


def test_grid_is_28_step_shift3():
    grid = sigma_grid()
    assert grid.shape == (28,) and grid.dtype == torch.float32
    assert grid[0] == 1.0
    # shift-3 transform of a linear grid: sigma' = 3 s / (1 + 2 s), strictly decreasing
    assert torch.all(grid[1:] < grid[:-1])


@pytest.mark.parametrize("boundaries,published", [
    ([0, 7, 14, 18], [1.0, 0.8959, 0.7371, 0.6022]),
    ([0, 4, 7, 12, 14, 18], [1.0, 0.9454, 0.8959, 0.7904, 0.7371, 0.6022]),
])
def test_boundaries_reproduce_published_sigmas(boundaries, published):
    sigmas = boundaries_to_sigmas(boundaries)
    assert sigmas == pytest.approx(published, abs=1e-4)
    # timesteps as the paper lists them (t ≈ 1000, 896, 737, 602 for the 4-step schedule)
    if len(boundaries) == 4:
        assert [round(s * 1000) for s in sigmas] == [1000, 896, 737, 602]


def test_presets_match_published_scales():
    assert preset("sd35_medium_6step").scales == (32, 48, 64, 80, 96, 128)
    assert preset("sd35_medium_4step").scales == (64, 80, 96, 128)
    assert preset("sd35_large_4step").sigmas == pytest.approx((1.0, 0.8959, 0.7371, 0.6022), abs=1e-4)
    assert preset("toy_4step").scales == (8, 10, 12, 16)
    assert preset("toy_6step").scales == (4, 6, 8, 10, 12, 16)
    assert set(PRESETS) >= {"sd35_medium_6step", "sd35_medium_4step", "sd35_large_4step"}


def test_full_resolution_keeps_sigmas_and_uses_final_scale():
    s = preset("toy_4step")
    full = s.full_resolution()
    assert full.scales == (16, 16, 16, 16) and full.sigmas == s.sigmas and not full.is_scalewise
    assert s.scale_factors() == [1.25, 1.5, 2.0]


@pytest.mark.parametrize("scales,sigmas,patch,needle", [
    ((8, 10, 9), (1.0, 0.9, 0.8), None, "non-decreasing"),
    ((8, 10, 12), (1.0, 0.9), None, "one sigma per scale"),
    ((8, 10, 12), (1.0, 0.9, 0.95), None, "strictly decreasing"),
    ((8, 10, 12), (1.2, 0.9, 0.8), None, "(0, 1]"),
    ((8, 11, 12), (1.0, 0.9, 0.8), 2, "not divisible by the transformer patch size 2"),
])
def test_invalid_schedules_are_refused_with_a_clear_message(scales, sigmas, patch, needle):
    with pytest.raises(ValueError, match=None) as err:
        ScaleSchedule(scales, sigmas, patch_size=patch)
    assert needle in str(err.value)
    assert str(list(scales)) in str(err.value) or str(list(sigmas)) in str(err.value)


def test_boundaries_out_of_grid_are_refused():
    with pytest.raises(ValueError, match="outside the 28-step grid"):
        boundaries_to_sigmas([0, 7, 30])
    with pytest.raises(ValueError, match="one grid index per scale"):
        ScaleSchedule.from_boundaries([8, 10], [0, 7, 14])


def test_sample_grid_sigmas_stays_in_range():
    grid = sigma_grid()
    s = sample_grid_sigmas(1000, 18, 28, torch.Generator().manual_seed(0))
    assert s.max() <= grid[18] and s.min() >= grid[27]
    assert len(set(s.tolist())) == 10  # every index in [18, 28) is drawn
