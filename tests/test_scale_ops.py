import torch
import torch.nn.functional as F

from swd_core.scale_ops import add_noise, downscale_pixels, upscale_latents, x0_from_velocity


def test_area_downscale_is_block_mean():
    img = torch.arange(16.0).view(1, 1, 4, 4)
    out = downscale_pixels(img, 2)
    expected = torch.tensor([[(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4],
                             [(8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]])
    assert torch.allclose(out[0, 0], expected)


def test_bicubic_upscale_of_x0():
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    up = upscale_latents(x0, 16)
    assert up.shape == (2, 4, 16, 16)
    assert torch.equal(up, F.interpolate(x0, size=(16, 16), mode="bicubic"))
    # bicubic, not nearest: the upscaled latent is not piecewise constant
    assert not torch.equal(up, F.interpolate(x0, size=(16, 16), mode="nearest"))
    # a constant latent stays constant (bicubic weights sum to 1), a linear ramp stays monotone
    assert torch.allclose(upscale_latents(torch.full((1, 1, 4, 4), 3.0), 8), torch.full((1, 1, 8, 8), 3.0))
    ramp = torch.arange(8.0).repeat(8, 1).view(1, 1, 8, 8)
    row = upscale_latents(ramp, 16)[0, 0, 8]
    assert torch.all(row[2:-2][1:] > row[2:-2][:-1])
    assert upscale_latents(x0, 8) is x0


def test_noising_and_x0_recovery():
    x0, eps = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), -1.0)
    sigma = torch.tensor([0.25, 1.0])
    xt = add_noise(x0, eps, sigma)
    assert torch.allclose(xt[0], torch.full((1, 2, 2), 0.75 - 0.25))
    assert torch.allclose(xt[1], eps[1])
    v = eps - x0  # the rectified-flow velocity
    assert torch.allclose(x0_from_velocity(xt, v, sigma), x0)
