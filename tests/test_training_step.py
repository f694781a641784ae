"""The SwD training iteration (swd_core.training): inputs by hand, and where gradients go."""

import copy

import pytest
import torch

from swd_core.gan_head import GANHead
from swd_core.lora import FAKE, STUDENT, adapter_parameters, add_swd_adapters, base_parameters
from swd_core.scale_ops import x0_from_velocity
from swd_core.training import LossSettings, Networks, fake_update_loss, frozen, generator_loss, student_input


def _nets(adapter, full: bool = False) -> Networks:
    student = None
    if full:
        student = copy.deepcopy(adapter.transformer).requires_grad_(True)
    add_swd_adapters(adapter.transformer, rank=4, names=(FAKE,) if full else (STUDENT, FAKE))
    for p in adapter_parameters(adapter.transformer, FAKE):  # B = 0 at init: make the adapters matter
        torch.nn.init.normal_(p, std=0.02)
    if not full:
        for p in adapter_parameters(adapter.transformer, STUDENT):
            torch.nn.init.normal_(p, std=0.02)
    dim = adapter.transformer.config.num_attention_heads * adapter.transformer.config.attention_head_dim
    return Networks(adapter, GANHead(dim), feature_block=1, student_transformer=student)


def _all_reached(params) -> bool:
    """Every parameter got a finite gradient that is not all zero."""
    return all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.any() for p in params)


@pytest.fixture(params=["sd3", "flux"])
def family_adapter(request):
    """A fresh small teacher of each family (random weights, loaded through from_pretrained)."""
    from swd_core.adapters import load_adapter
    from tests.conftest import TINY

    if request.param == "sd3":
        return load_adapter("sd3", TINY, max_sequence_length=0)
    return load_adapter("flux", "builtin:tiny-flux", max_sequence_length=16)


def _grid(adapter, schedule) -> tuple[float, ...]:
    """The run's sigma grid of the adapter's family (what `loss_settings` gives the losses)."""
    from swd_core.schedules import family_sigma_grid

    return tuple(family_sigma_grid(adapter.family, schedule.final_scale, adapter.patch_size).tolist())


def _batch(adapter, schedule, b=2):
    g = torch.Generator().manual_seed(0)
    lat = {s: torch.randn(b, adapter.latent_channels, s, s, generator=g) for s in schedule.scales}
    text = adapter.encode_prompts(["a red circle", "a blue square"][:b])
    return lat, text


def test_student_input_by_hand(toy_schedule):
    lat = {s: torch.randn(3, 4, s, s) for s in toy_schedule.scales}
    x0_in, sigma0 = student_input(lat, toy_schedule, 0, torch.Generator().manual_seed(5))
    assert x0_in.shape == (3, 4, 8, 8) and torch.equal(sigma0, torch.ones(3))
    assert torch.equal(x0_in, torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(5)))
    x, sigma = student_input(lat, toy_schedule, 2, torch.Generator().manual_seed(5))
    eps = torch.randn((3, 4, 12, 12), generator=torch.Generator().manual_seed(5))
    s2 = float(toy_schedule.sigmas[2])
    expected = (1 - s2) * torch.nn.functional.interpolate(lat[10], size=(12, 12), mode="bicubic") + s2 * eps
    assert torch.allclose(x, expected, atol=1e-6)
    assert torch.allclose(sigma, torch.full((3,), s2))


@pytest.mark.parametrize("terms", [
    {"mmd_weight": 1.0, "dmd_weight": 0.0, "gan_weight": 0.0},
    {"mmd_weight": 0.0, "dmd_weight": 1.0, "gan_weight": 0.0},
    {"mmd_weight": 0.0, "dmd_weight": 0.0, "gan_weight": 1.0},
])
def test_generator_loss_trains_only_the_student(family_adapter, toy_schedule, terms):
    tiny_adapter = family_adapter
    nets = _nets(tiny_adapter)
    lat, text = _batch(tiny_adapter, toy_schedule)
    settings = LossSettings(feature_block=1, guidance_scale=4.5, grid=_grid(tiny_adapter, toy_schedule), **terms)
    i = 1
    x, sigma = student_input(lat, toy_schedule, i, torch.Generator().manual_seed(1))
    with frozen(nets.fake_parameters()):
        x0 = x0_from_velocity(x, nets.student(x, sigma, text), sigma)
        loss, logged = generator_loss(nets, x0, lat[toy_schedule.scales[i]], text, tiny_adapter.empty_prompt(),
                                      settings, torch.Generator().manual_seed(2))
        loss.backward()
    term = {"mmd_weight": "mmd", "dmd_weight": "dmd", "gan_weight": "gan_g"}[next(k for k, w in terms.items() if w)]
    # the loss is the one term switched on (weight 1), logged as itself and as the total
    assert set(logged) == {term, "generator"} and torch.isfinite(loss) and loss.item() > 0
    assert torch.equal(logged[term], loss.detach()) and torch.equal(logged["generator"], loss.detach())
    assert _all_reached(nets.student_parameters())  # every student adapter, not just one
    assert all(p.grad is None for p in nets.fake_parameters())
    assert all(p.grad is None for p in base_parameters(tiny_adapter.transformer))
    # frozen() restored the fake network's trainability for its own update
    assert all(p.requires_grad for p in nets.fake_parameters())


def test_dmd_runs_only_from_its_min_scale(tiny_adapter, toy_schedule, monkeypatch):
    nets = _nets(tiny_adapter)
    lat, text = _batch(tiny_adapter, toy_schedule)
    settings = LossSettings(feature_block=1, guidance_scale=4.5, dmd_min_scale=16)
    teacher_calls = []
    real_teacher = nets.teacher_cfg
    monkeypatch.setattr(nets, "teacher_cfg",
                        lambda *a, **k: teacher_calls.append(a[0].shape[-1]) or real_teacher(*a, **k))
    logged = {}
    for i in (1, 3):  # scales 10 and 16
        x, sigma = student_input(lat, toy_schedule, i, torch.Generator().manual_seed(1))
        with frozen(nets.fake_parameters()):
            x0 = x0_from_velocity(x, nets.student(x, sigma, text), sigma)
            loss, logged[i] = generator_loss(nets, x0, lat[toy_schedule.scales[i]], text, tiny_adapter.empty_prompt(),
                                             settings, torch.Generator().manual_seed(2))
        assert torch.allclose(loss.detach(), sum(settings_w * logged[i].get(k, 0.0) for k, settings_w in
                                                 (("mmd", 1.0), ("dmd", 1.0), ("gan_g", settings.gan_weight))))
    assert "dmd" not in logged[1] and {"mmd", "gan_g"} <= set(logged[1])
    assert {"mmd", "dmd", "gan_g"} <= set(logged[3])
    assert teacher_calls == [16]  # the teacher ran at the 16 scale only


def test_fake_update_trains_only_fake_and_head(family_adapter, toy_schedule):
    tiny_adapter = family_adapter
    nets = _nets(tiny_adapter)
    lat, text = _batch(tiny_adapter, toy_schedule)
    settings = LossSettings(feature_block=1, grid=_grid(tiny_adapter, toy_schedule))
    with torch.no_grad():
        x, sigma = student_input(lat, toy_schedule, 3, torch.Generator().manual_seed(1))
        x0 = x0_from_velocity(x, nets.student(x, sigma, text), sigma)
    loss, logged = fake_update_loss(nets, x0, lat[16], text, settings, torch.Generator().manual_seed(3))
    loss.backward()
    assert set(logged) == {"fake_denoise", "gan_d", "fake"}
    assert all(p.grad is None for p in nets.student_parameters())
    assert all(p.grad is None for p in base_parameters(tiny_adapter.transformer))
    assert _all_reached(nets.head.parameters()) and _all_reached(adapter_parameters(tiny_adapter.transformer, FAKE))


def test_full_finetune_student_is_separate(tiny_adapter, toy_schedule):
    nets = _nets(tiny_adapter, full=True)
    lat, text = _batch(tiny_adapter, toy_schedule)
    settings = LossSettings(feature_block=1, guidance_scale=4.5)
    x, sigma = student_input(lat, toy_schedule, 1, torch.Generator().manual_seed(1))
    with frozen(nets.fake_parameters()):
        x0 = x0_from_velocity(x, nets.student(x, sigma, text), sigma)
        loss, _ = generator_loss(nets, x0, lat[10], text, tiny_adapter.empty_prompt(), settings,
                                 torch.Generator().manual_seed(2))
        loss.backward()
    student = nets.student_parameters()
    assert len(student) == len(list(nets.student_transformer.parameters()))
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in student)
    # every weight but the last block's text-query projection, whose output that block discards
    unreached = {n for n, p in nets.student_transformer.named_parameters() if p.grad is None or not p.grad.any()}
    last = len(nets.student_transformer.transformer_blocks) - 1
    assert unreached <= {f"transformer_blocks.{last}.attn.add_q_proj.{w}" for w in ("weight", "bias")}, unreached
    assert all(p.grad is None for p in base_parameters(tiny_adapter.transformer))
    assert all(p.grad is None for p in nets.fake_parameters())


def test_loss_settings_refuse_nothing_to_train():
    with pytest.raises(ValueError, match="all loss weights are 0"):
        LossSettings(mmd_weight=0, dmd_weight=0, gan_weight=0)


def test_lr_factor_is_constant_then_falls_linearly_to_zero():
    from swd_core.training import lr_factor

    assert [lr_factor(u, 10, 0.0) for u in (0, 5, 10)] == [1.0, 1.0, 1.0]  # no decay: the paper's constant rate
    # decay over the last 40% of 10 updates: 1 until update 6, then (10 − u) / 4
    assert [lr_factor(u, 10, 0.4) for u in range(11)] == [1, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_factor(3, 4, 1.0) == 0.25 and lr_factor(0, 4, 1.0) == 1.0


def test_logged_floats_keeps_order_and_reads_tensors_once():
    from swd_core.training import logged_floats

    terms = {"mmd": torch.tensor(0.25), "grad_norm_g": 1.5, "dmd": torch.tensor([2.0]), "grad_norm_f": None}
    out = logged_floats(terms)
    assert list(out) == ["mmd", "grad_norm_g", "dmd", "grad_norm_f"]
    assert out == {"mmd": 0.25, "grad_norm_g": 1.5, "dmd": 2.0, "grad_norm_f": 0.0}
    assert all(type(v) is float for v in out.values())


def test_student_ema_is_exported_and_training_weights_come_back():
    """diffusers' EMAModel with its warm-up: update n uses decay min(ema_decay, n/(9+n)) (0 for the
    first, which copies), so after weights 1 then 2 the average is 1 + (1 − 2/11)·(2 − 1) = 20/11;
    inside `averaged_student` the student holds the average, after it its training weights."""
    from types import SimpleNamespace

    from pipelines.schema import parse_pipeline_config
    from pipelines.stages.distill.engines import averaged_student, student_ema

    cfg = parse_pipeline_config({"name": "ema", "teacher": {"path": "builtin:tiny-sd3"},
                                 "distill": {"schedule": {"preset": "toy_4step"}, "ema_decay": 0.5}})
    p = torch.nn.Parameter(torch.zeros(3))
    nets = SimpleNamespace(student_parameters=lambda: [p])
    ema = student_ema(cfg, nets)
    for _ in range(2):
        with torch.no_grad():
            p.add_(1.0)
        ema.step([p])
    with averaged_student(ema, nets.student_parameters()):
        assert torch.allclose(p, torch.full((3,), 20 / 11))
    assert torch.equal(p.detach(), torch.full((3,), 2.0))
    no_ema = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"ema_decay": 0.0})})
    assert student_ema(no_ema, nets) is None


def test_ema_with_a_sharded_full_student_is_refused():
    from pipelines.schema import parse_pipeline_config

    with pytest.raises(ValueError, match="ZeRO-3 shards"):
        parse_pipeline_config({"name": "ema", "teacher": {"path": "builtin:tiny-sd3"},
                               "distill": {"schedule": {"preset": "toy_4step"}, "ema_decay": 0.9, "mode": "full",
                                           "zero_stage": 3}})


def test_workers_get_absolute_storage_and_store_paths(tmp_path, monkeypatch):
    """Ray Train workers run in their own directories: relative local paths of the definition are
    resolved on the driver (a relative `precompute.output` once failed every worker)."""
    from pipelines.schema import parse_pipeline_config
    from pipelines.stages.distill.trainer import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(parse_pipeline_config({"name": "abs", "teacher": {"path": "builtin:tiny-sd3"},
                                           "precompute": {"output": "stores/a"},
                                           "distill": {"schedule": {"preset": "toy_4step"}},
                                           "resources": {"storage": "runs"}}))
    assert cfg.precompute.output == str(tmp_path / "stores" / "a")
    assert cfg.resources.storage == str(tmp_path / "runs")
    s3 = parse_pipeline_config({"name": "abs", "teacher": {"path": "builtin:tiny-sd3"},
                                "precompute": {"output": "s3://bucket/store"},
                                "distill": {"schedule": {"preset": "toy_4step"}},
                                "resources": {"storage": "s3://bucket/runs"}})
    assert with_absolute_paths(s3) == s3


@pytest.mark.parametrize("gan_weight", [0.0, 5e-3])
def test_fake_update_loss_by_hand(tiny_adapter, toy_schedule, gan_weight):
    """The fake loss is the x0-prediction MSE at the drawn σ, plus (GAN on) w_d × the discriminator
    loss on real and generated latents noised alike; the generated and real rows share one call,
    and the terms are those of two separate passes."""
    from swd_core.losses import gan_discriminator_loss
    from swd_core.scale_ops import add_noise
    from swd_core.schedules import sample_grid_sigmas

    nets = _nets(tiny_adapter)
    lat, text = _batch(tiny_adapter, toy_schedule)
    settings = LossSettings(feature_block=1, gan_weight=gan_weight, discriminator_weight=0.5)
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    loss, logged = fake_update_loss(nets, x0, lat[16], text, settings, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    sigma = sample_grid_sigmas(2, 0, 28, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    v, feat_fake = nets.fake(x_t, sigma, text)
    denoise = ((x_t - sigma.view(-1, 1, 1, 1) * v - x0) ** 2).mean()
    assert torch.allclose(logged["fake_denoise"], denoise, rtol=1e-5)
    if gan_weight == 0:
        assert set(logged) == {"fake_denoise", "fake"} and torch.allclose(loss, denoise, rtol=1e-5)
        return
    _, feat_real = nets.fake(add_noise(lat[16], eps, sigma), sigma, text, features_only=True)
    disc = gan_discriminator_loss(nets.head(feat_real), nets.head(feat_fake))
    assert torch.allclose(logged["gan_d"], disc, rtol=1e-5)
    assert torch.allclose(loss, denoise + 0.5 * disc, rtol=1e-5)


def test_student_samples_in_one_call_equal_one_call_per_batch(tiny_adapter, toy_schedule):
    """Batched sampling for the fake updates draws the same inputs in the same order and gives the
    same x0 as sampling each batch on its own (the student does not change between them)."""
    from swd_core.training import student_samples

    nets = _nets(tiny_adapter)
    batches = [_batch(tiny_adapter, toy_schedule)[::-1], _batch(tiny_adapter, toy_schedule, b=1)[::-1]]
    with torch.no_grad():
        together = student_samples(nets, batches, toy_schedule, 2, torch.Generator().manual_seed(6))
        g = torch.Generator().manual_seed(6)
        inputs = [student_input(lat, toy_schedule, 2, g) for _, lat in batches]
        alone = [x0_from_velocity(x, nets.student(x, sigma, text), sigma)
                 for (text, _), (x, sigma) in zip(batches, inputs)]
    assert [x.shape for x in together] == [(2, 4, 12, 12), (1, 4, 12, 12)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(together, alone))
    assert student_samples(nets, [], toy_schedule, 2) == []


def test_generator_loss_in_shared_calls_equals_separate_passes(tiny_adapter, toy_schedule):
    """With MMD and GAN on, the two fake passes on x0 share one call; the terms and the gradient
    reaching x0 are those of separate passes, drawn σ, ε in the same order."""
    from swd_core.losses import dmd_loss, gan_generator_loss, mmd_linear
    from swd_core.scale_ops import add_noise
    from swd_core.schedules import sample_grid_sigmas

    nets = _nets(tiny_adapter)
    lat, text = _batch(tiny_adapter, toy_schedule)
    uncond = tiny_adapter.empty_prompt()
    settings = LossSettings(feature_block=1, guidance_scale=4.5, gan_weight=0.5)
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    with frozen(nets.fake_parameters()):
        loss, logged = generator_loss(nets, x0, lat[16], text, uncond, settings, torch.Generator().manual_seed(2))
        (grad_shared,) = torch.autograd.grad(loss, x0)

        g = torch.Generator().manual_seed(2)
        sigma_m = sample_grid_sigmas(2, *settings.mmd_range, generator=g)
        eps_m = torch.randn(x0.shape, generator=g)
        sigma = sample_grid_sigmas(2, *settings.dmd_range, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        _, feat_real = nets.fake(add_noise(lat[16], eps_m, sigma_m), sigma_m, text, features_only=True)
        _, feat_fake = nets.fake(add_noise(x0, eps_m, sigma_m), sigma_m, text, features_only=True)
        x_t = add_noise(x0, eps, sigma)
        v_fake, feats = nets.fake(x_t, sigma, text)
        x_d = x_t.detach()
        v_teacher = nets.teacher_cfg(x_d, sigma, text, uncond, 4.5)
        mmd = mmd_linear(feat_real.detach(), feat_fake, settings.mmd_c)
        dmd = dmd_loss(x0, x0_from_velocity(x_d, v_teacher, sigma), x0_from_velocity(x_d, v_fake.detach(), sigma))
        gan = gan_generator_loss(nets.head(feats))
        (grad_separate,) = torch.autograd.grad(mmd + dmd + 0.5 * gan, x0)
    for name, value in (("mmd", mmd), ("dmd", dmd), ("gan_g", gan)):
        assert torch.allclose(logged[name], value.detach(), rtol=1e-5), name
    assert torch.allclose(loss, mmd + dmd + 0.5 * gan, rtol=1e-5)
    assert torch.isfinite(grad_shared).all() and grad_shared.abs().sum() > 0
    assert torch.allclose(grad_shared, grad_separate, rtol=1e-4, atol=1e-7)


class _Engine:
    """What `train_iteration` asks of a DeepSpeed engine: backward, an SGD step, a grad norm."""

    def __init__(self, params):
        self.opt = torch.optim.SGD(list(params), lr=1e-2)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def get_global_grad_norm(self):
        return 0.0


def test_the_critic_is_fitted_at_a_scale_before_the_generator_steps_there(tiny_adapter, toy_schedule, monkeypatch):
    """The authors' order: at every iteration the fake-score updates run on student samples at
    s_i, then the generator updates at s_i (2 rounds of the 4 scales)."""
    import swd_core.training as training
    from pipelines.stages.distill.iteration import train_iteration

    events = []
    for name, kind in (("fake_update_loss", "fake"), ("generator_loss", "generator")):
        real = getattr(training, name)

        def recorded(nets, x0, *args, _real=real, _kind=kind, **kwargs):
            events.append((_kind, x0.shape[-1]))
            return _real(nets, x0, *args, **kwargs)

        monkeypatch.setattr(training, name, recorded)
    nets = _nets(tiny_adapter)
    uncond = tiny_adapter.empty_prompt()
    settings = LossSettings(feature_block=1, guidance_scale=4.5)

    def next_batch():
        lat, text = _batch(tiny_adapter, toy_schedule)
        return text, lat

    rng = torch.Generator().manual_seed(0)
    for step in range(2 * toy_schedule.num_steps):
        i, _ = train_iteration(nets, _Engine(nets.student_parameters()), _Engine(nets.fake_parameters()), next_batch,
                               toy_schedule, settings, uncond, step, fake_updates=2, rng=rng)
        assert i == step % toy_schedule.num_steps
    expected = [e for s in list(toy_schedule.scales) * 2 for e in (("fake", s), ("fake", s), ("generator", s))]
    assert events == expected
