"""Known-answer tests for lofa.metrics: the metric math on synthetic tensors, and evaluators trained on the
smoke worlds scoring fresh ground-truth renders of the right case above renders of a wrong case."""
import numpy as np
import pytest
import scipy.linalg
import torch

from lofa.errors import LofaError
from lofa.metrics import scores
from lofa.metrics.features import ArcMarginHead, ConvEncoder


# ----------------------------------------------------------------------------- Fréchet distance


def _scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The reference FID formula (pytorch-fid): float64 scipy sqrtm of the covariance product."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_matches_scipy_reference():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(12, 12))
    a = rng.normal(size=(400, 12)) @ mix
    b = rng.normal(size=(300, 12)) @ (mix + 0.3 * rng.normal(size=(12, 12))) + 0.5
    ours = scores.frechet_distance(torch.tensor(a, dtype=torch.float32), b)
    assert ours == pytest.approx(_scipy_fd(a, b), rel=1e-4)


def test_frechet_self_zero_shift_positive():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 16))
    assert scores.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # A pure shift leaves the covariances equal: the distance is exactly the squared shift.
    shift = np.zeros(16)
    shift[3] = 2.0
    assert scores.frechet_distance(a, a + shift) == pytest.approx(4.0, rel=1e-6)


def test_frechet_singular_covariances_stay_real_and_nonnegative():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(10, 64))  # N < D: rank-deficient covariances
    fd = scores.frechet_distance(a, b)
    assert np.isfinite(fd) and fd > 0
    assert scores.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_refuses_single_sample():
    with pytest.raises(LofaError):
        scores.frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))


# ----------------------------------------------------------------------------- motion


def _moving_square(n=4, t=8, size=16, speed=2):
    x = -torch.ones(n, 3, t, size, size)
    for f in range(t):
        x[:, :, f, 4:8, 1 + speed * f:5 + speed * f] = 1.0
    return x


def test_dynamic_degree_static_zero_moving_one():
    moving = _moving_square()
    static = moving[:, :, :1].expand_as(moving)
    assert scores.motion_magnitude(static).abs().max() == 0
    threshold = scores.calibrate_motion_threshold(scores.motion_magnitude(moving), 0.1) / 2
    assert scores.dynamic_degree(static, threshold).sum() == 0
    assert scores.dynamic_degree(moving, threshold).mean() == 1


def test_motion_ignores_pixel_noise_more_than_motion():
    g = torch.Generator().manual_seed(0)
    static = _moving_square()[:, :, :1].expand(-1, -1, 8, -1, -1)
    noisy = static + 0.05 * torch.randn(static.shape, generator=g)
    assert scores.motion_magnitude(noisy).max() < scores.motion_magnitude(_moving_square()).min()


def test_smoothness_linear_is_one_shuffled_lower():
    ramp = torch.linspace(-1, 1, 8).view(1, 1, 8, 1, 1).expand(2, 3, 8, 4, 4)
    assert torch.allclose(scores.motion_smoothness(ramp), torch.ones(2))
    video = _moving_square()
    shuffled = video[:, :, torch.tensor([0, 4, 1, 6, 2, 7, 3, 5])]
    assert (scores.motion_smoothness(shuffled) < scores.motion_smoothness(video)).all()


def test_motion_refuses_images():
    with pytest.raises(LofaError):
        scores.motion_smoothness(torch.zeros(2, 3, 8, 8))


# ----------------------------------------------------------------------------- cosine scores, diversity, CIs


def test_group_diversity_identical_zero_distinct_positive():
    e = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    same = e[:1].expand(3, 8)
    div = scores.group_diversity(torch.cat([same, e[3:]]), [0, 0, 0, 1, 1, 1])
    assert div[0] == pytest.approx(0.0, abs=1e-5) and div[1] > 10
    with pytest.raises(LofaError):
        scores.group_diversity(e[:2], [0, 1])


def test_bootstrap_ci_brackets_mean_and_shrinks():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 50), rng.normal(1.0, 1.0, 5000)
    m, lo, hi = scores.bootstrap_ci(small, n=500, seed=0)
    assert lo < m < hi and m == pytest.approx(small.mean())
    _, lo2, hi2 = scores.bootstrap_ci(large, n=500, seed=0)
    assert hi2 - lo2 < (hi - lo) / 3
    assert scores.bootstrap_ci(small, n=200, seed=3) == scores.bootstrap_ci(small, n=200, seed=3)
    med, lo3, hi3 = scores.bootstrap_ci(small, n=200, seed=0, stat=np.median)
    assert med == pytest.approx(np.median(small)) and lo3 <= med <= hi3


def test_top1():
    logits = torch.tensor([[0.1, 2.0], [3.0, 0.0], [0.0, 1.0]])
    assert scores.top1(logits, [1, 0, 0]).tolist() == [1.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- networks


def test_arcface_margin_lowers_only_the_target_logit():
    head = ArcMarginHead(8, 5, scale=10.0, margin=0.3)
    emb = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    plain, margin = head(emb), head(emb, y)
    target = torch.nn.functional.one_hot(y, 5).bool()
    assert (margin[target] < plain[target]).all()
    assert torch.equal(margin[~target], plain[~target])


@pytest.mark.parametrize("shape,modality", [((2, 3, 8, 32, 32), "video"), ((2, 3, 32, 32), "image"),
                                            ((2, 3, 4, 16, 16), "video")])
def test_encoder_shapes(shape, modality):
    assert ConvEncoder(modality, width=4, depth=4, dim=12)(torch.zeros(shape)).shape == (2, 12)


# ----------------------------------------------------------------------------- evaluators on the smoke worlds

SANITY_SEED = 4242  # outside every evaluator training seed range (EvalConfig.seed_offset + ...)


# smoke-size convolutions: a second intra-op thread costs more in synchronisation than it gains
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["actions", "styles", "identities"])
def trained(request, tmp_path_factory):
    from lofa.config import preset
    from lofa.metrics import EvalConfig, evaluator_sanity_table, train_evaluators
    from lofa.worlds import make_world

    world = make_world(request.param, "smoke", seed=0)
    out = tmp_path_factory.mktemp(f"eval_{request.param}")
    ev = train_evaluators(world, preset(EvalConfig, "smoke"), out, seed=0)
    table = evaluator_sanity_table(world, ev, seed=SANITY_SEED, n=48)
    return world, ev, out, table


def test_right_case_beats_wrong_case_on_every_evaluator(trained):
    world, ev, _, table = trained
    expected = {"acc", "attr_acc", "clip_t", "dynamic", "smoothness", "fvd"} if world.modality == "video" else \
        {"acc", "attr_acc", "clip_t", "fid", "face_sim", "dino", "clip_i", "face_div"}
    if world.task == "styles":
        expected.add("csd")
    assert expected <= set(table.metric), table
    per_sample = table[~table.metric.str.startswith("acc:")]
    assert (per_sample.margin > 0).all(), per_sample
    paired = table[~table.metric.isin(["fvd", "fid", "face_div"])]
    assert paired.right_wins.between(0, 1).all() and table.right_wins.isna().sum() == len(table) - len(paired)
    if world.modality == "video":  # a small absolute margin, but render by render: shuffling breaks nearly every clip
        assert table.set_index("metric").loc["smoothness"].right_wins > 0.8


def test_referee_recognises_fresh_renders(trained):
    world, ev, _, table = trained
    right = table.set_index(["metric", "wrong"]).right
    assert right[("acc", "random case")] > 0.35  # chance: 1 / 24..32 at smoke
    assert right[("coarse_acc", "random case")] > 0.8
    if world.modality == "video":  # ground-truth clips move; their first frame repeated does not
        dynamic = table.set_index("metric").loc["dynamic"]
        assert dynamic.right > 0.5 and dynamic.wrong_score == 0


def test_evaluators_saved_in_float16_score_as_saved(tmp_path):
    from dataclasses import replace

    from safetensors import safe_open

    from lofa.config import preset
    from lofa.metrics import EvalConfig, Evaluators, train_evaluators
    from lofa.metrics.evaluators import fingerprint
    from lofa.worlds import make_world

    world = make_world("identities", "smoke", seed=0)
    cfg = preset(EvalConfig, "smoke", {"steps_referee": 5, "steps_clip": 5, "steps_embed": 5, "steps_generic": 5})
    half = train_evaluators(world, replace(cfg, save_dtype="float16"), tmp_path, seed=0)
    with safe_open(str(tmp_path / "referee.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.float16}
    x = world.render([0, 1, 2, 3], seed=SANITY_SEED + 10)
    assert torch.equal(Evaluators.load(tmp_path, world).features(x), half.features(x))
    # at its default the field leaves the fingerprint as it was (the shipped mini evaluators still match)
    assert fingerprint(world, cfg, 0) != fingerprint(world, replace(cfg, save_dtype="float16"), 0)


def test_cached_evaluators_load_and_score_identically(trained):
    from lofa.metrics import Evaluators, train_evaluators

    world, ev, out, _ = trained
    x = world.render([0, 1, 2, 3], seed=SANITY_SEED + 10)
    stamps = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    again = train_evaluators(world, ev.cfg, out, seed=0)  # complete folder: loads, does not retrain
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == stamps
    assert again.curves == ev.curves and len(again.curves["referee"]) == ev.cfg.steps_referee
    assert torch.allclose(again.features(x), ev.features(x))
    assert torch.allclose(Evaluators.load(out, world).features(x), ev.features(x))


def test_score_keys_and_bad_input(trained):
    world, ev, _, _ = trained
    ids = [0, 1, 2, 3]
    x = world.render(ids, seed=SANITY_SEED + 20)
    refs = world.condition(ids, seed=SANITY_SEED + 21) if world.task != "actions" else None
    s = ev.score(x, ids, [ev.caption(i) for i in ids], refs)
    assert all(v.shape == (4,) for v in s.values())
    components = [k for k in s if k.startswith("acc:")]
    assert components and np.allclose(s["attr_acc"], np.mean([s[k] for k in components], axis=0))
    metrics = ev.paper_metrics(x, [0, 0, 1, 1], [ev.caption(i) for i in [0, 0, 1, 1]], refs,
                               real=world.render(ids, seed=SANITY_SEED + 22))
    want = {"actions": {"FVD", "CLIP-T", "DD", "MS"}, "styles": {"FVD", "CLIP-T", "CSD", "DD", "MS"},
            "identities": {"FID", "Face Sim", "DINO", "CLIP-I", "Face Div"}}[world.task]
    assert want <= set(metrics)
    with pytest.raises(LofaError):
        ev.score(x[:3], ids)
    with pytest.raises(LofaError):
        ev.score(x.flatten(1), ids)
    if world.task == "actions":
        with pytest.raises(LofaError):
            ev.score(x, ids, references=world.condition(ids, seed=0))


@pytest.mark.parametrize("trained", ["identities"], indirect=True)  # one world suffices; it trains fastest
def test_interrupted_training_resumes_missing_roles_only(trained, tmp_path):
    import shutil

    from lofa.metrics import train_evaluators

    world, ev, out, _ = trained
    folder = tmp_path / "ev"
    shutil.copytree(out, folder)
    (folder / "evaluators.json").unlink()  # as if killed while training the last role
    (folder / "generic.safetensors").unlink()
    before = (folder / "referee.safetensors").stat().st_mtime_ns
    again = train_evaluators(world, ev.cfg, folder, seed=0)
    assert (folder / "referee.safetensors").stat().st_mtime_ns == before
    assert (folder / "evaluators.json").exists() and (folder / "generic.safetensors").exists()
    x = world.render([0, 1], seed=SANITY_SEED + 30)
    assert torch.allclose(again.generic_features(x), ev.generic_features(x), atol=1e-5)  # same seed, same net


@pytest.mark.parametrize("trained", ["identities"], indirect=True)
def test_evaluators_of_another_version_get_a_clear_error(trained, tmp_path):
    import json
    import shutil

    from lofa.metrics.evaluators import META_FILE, Evaluators

    world, _, out, _ = trained
    folder = tmp_path / "old"
    shutil.copytree(out, folder)
    meta = json.loads((folder / META_FILE).read_text())
    del meta["curves"]
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(LofaError, match="another version of lofa"):
        Evaluators.load(folder, world)


def test_frechet_sees_what_is_drawn_more_than_pixel_degradation(trained):
    """The FVD / FID referee is no pixel metric: slightly blurred or noisy renders of the same cases stay far closer
    to the renders than noise does (the mini bases' gap is in what they draw; README, issue 3)."""
    import torch.nn.functional as F

    world, ev, _, _ = trained
    ids = world.ids("train")[:32] * 2
    real, other = world.render(ids, SANITY_SEED + 20), world.render(ids, SANITY_SEED + 21)
    flat = other.reshape(-1, 1, *other.shape[-2:])
    blurred = F.avg_pool2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), 3, stride=1).reshape(other.shape)
    noisy = (other + 0.05 * torch.randn(other.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    noise = torch.rand(other.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    floor, fd_noise = ev.frechet(other, real), ev.frechet(noise, real)
    for degraded in (blurred, noisy):
        assert ev.frechet(degraded, real) - floor < 0.25 * (fd_noise - floor)


@pytest.mark.parametrize("task", ["actions", "identities"])
def test_prepared_captions_are_the_ones_encoded_one_at_a_time(task, monkeypatch):
    """`PooledText.prepare` encodes a CLIP pool's captions in batches before training (a `full` pool has ~90k):
    afterwards no step encodes anything, and each pooled state equals the one-prompt-at-a-time encoding."""
    from lofa.metrics.evaluators import PooledText, prompts_identify_cases
    from lofa.models.text import TextEncoder
    from lofa.worlds import make_world

    world = make_world(task, "smoke")
    from_attrs = not prompts_identify_cases(world)
    assert from_attrs == (task == "identities")  # both ways of reading a prompt are covered
    ids = list(range(min(6, len(world.cases))))
    _, captions = world.sample(ids, seed=3)
    plain = [world.prompt(c, 0, "train") for c in ids]
    wanted = PooledText(world, from_attrs)(captions + plain, ids + ids)

    prepared = PooledText(world, from_attrs)
    prepared.prepare(captions + plain, ids, chunk=4)  # several batches, the last one short

    def refuse(*args, **kwargs):
        raise AssertionError("a prepared caption was encoded again")

    monkeypatch.setattr(TextEncoder, "encode", refuse)
    got = prepared(captions + plain, ids + ids)
    assert got.shape == (2 * len(ids), TextEncoder.dim)
    torch.testing.assert_close(got, wanted, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="encoded again"):  # anything not prepared is still encoded on demand
        prepared(["a prompt nobody prepared"], [0])
