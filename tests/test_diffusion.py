import torch

from lofa.diffusion import condition_dropout, flow_matching_loss, sample
from lofa.models import Generator

SHAPE = (2, 3, 2, 8, 8)


def _gen():
    torch.manual_seed(0)
    return Generator.build("video_dit", "smoke", {"patch_size": (1, 2, 2), "num_layers": 1, "head_dim": 16,
                                                  "ffn_dim": 64, "zero_init_output": False})


def _context():
    g = torch.Generator().manual_seed(1)
    context = torch.randn(2, 5, 384, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    return context, mask


def test_loss_decreases_when_overfitting_one_batch():
    gen = _gen()
    context, mask = _context()
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-2)
    fixed = torch.Generator().manual_seed(3)
    t, noise = torch.tensor([0.4, 0.7]), torch.randn(SHAPE, generator=fixed)
    first = flow_matching_loss(gen, x0, context, mask, t=t, noise=noise).item()
    for _ in range(25):
        loss = flow_matching_loss(gen, x0, context, mask, t=t, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_loss_is_seeded_and_per_sample():
    gen = _gen()
    context, mask = _context()
    x0 = torch.zeros(SHAPE)
    times = gen.t_distribution
    a = flow_matching_loss(gen, x0, context, mask, generator=torch.Generator().manual_seed(5), times=times)
    b = flow_matching_loss(gen, x0, context, mask, generator=torch.Generator().manual_seed(5), times=times)
    per = flow_matching_loss(gen, x0, context, mask, generator=torch.Generator().manual_seed(5), times=times,
                             reduction="none")
    assert torch.equal(a, b) and per.shape == (2,) and torch.allclose(per.mean(), a)


def test_sample_shape_and_seed():
    gen = _gen().eval()
    context, mask = _context()
    a = sample(gen, context, mask, SHAPE, steps=3, seed=7)
    b = sample(gen, context, mask, SHAPE, steps=3, seed=7)
    c = sample(gen, context, mask, SHAPE, steps=3, seed=8)
    assert a.shape == SHAPE and torch.equal(a, b) and not torch.allclose(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_classifier_free_guidance():
    gen = _gen().eval()
    context, mask = _context()
    uncond = torch.zeros(1, 5, 384)
    umask = torch.tensor([[True, True, False, False, False]])
    kw = dict(steps=3, seed=0, uncond_context=uncond, uncond_mask=umask)
    plain = sample(gen, context, mask, SHAPE, steps=3, seed=0)
    assert torch.equal(sample(gen, context, mask, SHAPE, guidance_scale=1.0, **kw), plain)
    # g = 0 is the unconditional model alone: a check of the batched cond/uncond formula
    only_uncond = sample(gen, uncond.expand(2, -1, -1), umask.expand(2, -1), SHAPE, steps=3, seed=0)
    assert torch.allclose(sample(gen, context, mask, SHAPE, guidance_scale=0.0, **kw), only_uncond, atol=1e-5)
    assert not torch.allclose(sample(gen, context, mask, SHAPE, guidance_scale=4.0, **kw), plain, atol=1e-3)


def test_sampler_follows_exact_velocity():
    # for a single data point x*, the exact velocity is (x_t - x*) / t; Euler on it lands on x*
    target = torch.rand(SHAPE) * 2 - 1
    exact = lambda x_t, t, c, m: (x_t - target) / t.view(-1, 1, 1, 1, 1)  # noqa: E731
    context, mask = _context()
    assert torch.allclose(sample(exact, context, mask, SHAPE, steps=4, shift=3.0), target, atol=1e-4)


def test_condition_dropout():
    context, mask = _context()
    uncond, umask = torch.zeros(1, 5, 384), torch.tensor([[True, False, False, False, False]])
    c, m = condition_dropout(context, mask, uncond, umask, 1.0)
    assert (c == 0).all() and torch.equal(m, umask.expand(2, -1))
    c, m = condition_dropout(context, mask, uncond, umask, 0.0)
    assert torch.equal(c, context) and torch.equal(m, mask)


def test_sample_t_distributions():
    from lofa.diffusion import sample_t

    g = torch.Generator().manual_seed(0)
    sd3 = sample_t(4000, generator=g)
    noisy = sample_t(4000, generator=g, mean=0.8, std=0.8)
    uniform = sample_t(4000, generator=g, mode="uniform")
    for t in (sd3, noisy, uniform):
        assert ((t > 0) & (t < 1)).all()
    assert abs(sd3.mean() - 0.5) < 0.02 and noisy.mean() > 0.62 and abs(uniform.mean() - 0.5) < 0.02


def test_time_distribution_draws_what_sample_t_draws_and_refuses_an_unknown_mode():
    import pytest

    from lofa.diffusion import TimeDistribution, sample_t
    from lofa.errors import LofaError

    for times in (TimeDistribution(), TimeDistribution(mode="logit_normal", mean=0.0, std=1.0),
                  TimeDistribution(mode="uniform")):
        drawn = times.sample(64, torch.Generator().manual_seed(3), "cpu")
        expected = sample_t(64, generator=torch.Generator().manual_seed(3), mode=times.mode, mean=times.mean,
                            std=times.std)
        assert drawn.shape == (64,) and torch.equal(drawn, expected)
        # the keys the recipes (BaseTrainConfig, a zoo's index) store it under, and back
        assert TimeDistribution.from_record({**times.record(), "steps": 3}) == times
    assert TimeDistribution().record() == {"t_sampling": "logit_normal", "t_mean": 0.8, "t_std": 0.8}
    with pytest.raises(LofaError, match="unknown t sampling"):
        TimeDistribution(mode="beta")


def test_drawing_t_needs_a_distribution():
    import pytest

    from lofa.errors import LofaError

    gen = _gen()
    context, mask = _context()
    with pytest.raises(LofaError, match="times="):
        flow_matching_loss(gen, torch.zeros(SHAPE), context, mask, generator=torch.Generator().manual_seed(5))
