"""The three procedural worlds: API shapes, determinism, case counts and splits, prompts, conditions, and that the
cases are really different pictures. CPU, small sizes (smoke worlds; mini / full only where counts are the point).

Gallery for eyes (not run by pytest):  python tests/test_worlds.py [scale]  -> /tmp/worlds_gallery_<task>.png
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json

import pytest
import torch

from lofa.errors import LofaError
from lofa.worlds import WORLD_TASKS, Case, make_world

MIN_CASES = {"actions": 150, "styles": 100, "identities": 150}   # at mini, from the issue
MIN_FULL_TRAIN = 2000   # training cases per world at full (the paper's zoos: 2,630 action / 3,100 identity LoRAs)


@functools.cache
def _world(task: str, scale: str):
    """One shared world per (task, scale) for the read-only tests (the full identities draw takes ~2 s)."""
    return make_world(task, scale)


@pytest.fixture(scope="module", params=WORLD_TASKS)
def world(request):
    return make_world(request.param, "smoke", seed=0)


def test_api_shapes_and_range(world):
    ids = [0, 1, len(world.cases) - 1]
    x = world.render(ids, seed=0)
    assert x.dtype == torch.float32 and x.shape == (3, *world.shape)
    assert -1 <= x.min() and x.max() <= 1 and x.std() > 0.1
    c = world.condition(ids, seed=0)
    assert c.dtype == torch.float32 and -1 <= c.min() and c.max() <= 1
    expected = (3, *world.shape) if world.task == "actions" else (3, 3, world.cfg.height, world.cfg.width)
    assert c.shape == expected
    assert world.modality == ("image" if world.task == "identities" else "video")
    assert all(isinstance(k, Case) and k.id == i for i, k in enumerate(world.cases))
    assert 0 < len(world.coarse_names) <= 8
    assert sorted(world.ids("train") + world.ids("heldout")) == list(range(len(world.cases)))
    assert len({k.name for k in world.cases}) == len(world.cases)
    frame = world.describe()
    assert len(frame) == len(world.cases) and {"id", "name", "coarse", "split"} <= set(frame.columns)
    with pytest.raises(LofaError):
        world.render([len(world.cases)], seed=0)
    with pytest.raises(LofaError):
        world.ids("test")


def test_deterministic_given_seed(world):
    ids = list(range(6))
    assert torch.equal(world.render(ids, seed=3), world.render(ids, seed=3))
    assert not torch.allclose(world.render(ids, seed=3), world.render(ids, seed=4))
    assert torch.equal(world.condition(ids, seed=3), world.condition(ids, seed=3))
    # the case set and split depend only on the world seed
    again = make_world(world.task, "smoke", seed=0)
    assert [(k.name, k.split) for k in again.cases] == [(k.name, k.split) for k in world.cases]
    other = make_world(world.task, "smoke", seed=1)
    assert [k.split for k in other.cases] != [k.split for k in world.cases]


def test_appearance_varies_within_a_case(world):
    x = world.render([0] * 8, seed=0).flatten(1)
    assert torch.cdist(x, x).fill_diagonal_(float("inf")).min() > 1.0   # no two samples of a case coincide


@pytest.mark.parametrize("task", WORLD_TASKS)
@pytest.mark.parametrize("scale", ["smoke", "mini", "full"])
def test_counts_and_heldout_split(task, scale):
    w = _world(task, scale)
    n = len(w.cases)
    held = w.ids("heldout")
    assert {"smoke": 20 <= n <= 40, "mini": n >= MIN_CASES[task], "full": len(w.ids("train")) >= MIN_FULL_TRAIN}[scale]
    assert len(held) >= 0.2 * n
    # every component value (and coarse class) of a held-out case occurs in some training case
    seen = {(k, str(v)) for c in w.cases if c.split == "train" for k, v in c.attrs.items()}
    seen_coarse = {c.coarse for c in w.cases if c.split == "train"}
    for i in held:
        c = w.cases[i]
        assert {(k, str(v)) for k, v in c.attrs.items()} <= seen and c.coarse in seen_coarse
    # held-out cases are unseen combinations: no training case has the same attributes
    train_attrs = {tuple(sorted((k, str(v)) for k, v in c.attrs.items())) for c in w.cases if c.split == "train"}
    assert all(tuple(sorted((k, str(v)) for k, v in w.cases[i].attrs.items())) not in train_attrs for i in held)
    # every value of every component vocabulary (the full-only tempo and backgrounds too) is trained on
    assert {(k, str(v)) for k, values in w.vocab.items() if k in w.cases[0].attrs for v in values} <= seen


def test_prompts(world):
    assert world.n_prompts("train") >= 3 and world.n_prompts("eval") >= 1
    for case in world.cases[:5]:
        train = [world.prompt(case.id, v, "train") for v in range(world.n_prompts("train"))]
        held = [world.prompt(case.id, v, "eval") for v in range(world.n_prompts("eval"))]
        assert len(set(train)) == len(train)
        assert not set(held) & set(train)
        assert all(p and len(p.split()) <= 24 and ",," not in p and "  " not in p for p in train + held)
        if world.task == "identities":
            assert all("[V]" in p for p in train + held)
    if world.task != "identities":   # fine prompts name the case: no two cases share a phrasing
        prompts = [world.prompt(c.id, 0) for c in world.cases]
        assert len(set(prompts)) == len(prompts)
    coarse = [world.coarse_prompt(k, v) for k in range(len(world.coarse_names)) for v in range(3)]
    assert len(set(coarse)) == len(coarse)
    assert world.coarse_prompt(0, 1000) in [world.coarse_prompt(0, v) for v in range(6)]
    with pytest.raises(LofaError):
        world.prompt(0, world.n_prompts("train"))


@pytest.mark.parametrize("scale", ["mini", "full"])
@pytest.mark.parametrize("task", WORLD_TASKS)
def test_every_prompt_fits_the_text_encoder(task, scale):
    """Every fine phrasing of every case (train and eval) and the captions of drawn samples fit the 32 MiniLM tokens
    the pipeline reads: a longer prompt loses its tail (the full actions world once lost its tempo words) and two
    cases that differ there get the same condition."""
    from lofa.models.text import TextEncoder, _load

    tokenizer, _ = _load(torch.device("cpu"))
    w = _world(task, scale)
    prompts = {w.prompt(c.id, v, split) for c in w.cases for split in ("train", "eval")
               for v in range(w.n_prompts(split))}
    prompts |= set(w.sample(range(0, len(w.cases), max(1, len(w.cases) // 200)), seed=1)[1])
    prompts = sorted(prompts)
    lengths = {p: len(ids) for p, ids in zip(prompts, tokenizer(prompts, verbose=False)["input_ids"])}
    longest = max(lengths, key=lengths.get)
    assert lengths[longest] <= TextEncoder().max_length, (lengths[longest], longest)  # the default every step uses


def test_sample_captions_name_content_and_context():
    from lofa.worlds.styles import GENERIC_CONTENT

    styles = make_world("styles", "smoke")
    x, prompts = styles.sample([0, 1, 2, 3], seed=0)
    assert x.shape == (4, *styles.shape) and len(prompts) == 4
    assert not any(generic in p for p in prompts for generic in GENERIC_CONTENT)   # the content is named
    a = styles.render([0, 0], seed=1, content=["ball-bouncing", "box-sliding"])
    b = styles.render([0, 0], seed=1, content=["ball-bouncing", "ball-bouncing"])
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    assert "ball" in styles.prompt(0, 0, content="ball-bouncing")
    faces = make_world("identities", "smoke")
    plain, hat = faces.render([0, 0], seed=2), faces.render([0, 0], seed=2, context=["", "hat"])
    assert torch.equal(plain[0], hat[0]) and not torch.equal(plain[1], hat[1])
    assert "hat" in faces.prompt(0, 0, context="hat") and "hat" not in faces.prompt(0, 0)
    _, coarse = faces.sample(list(range(8)), seed=0, level="coarse")
    assert all("[V]" not in p for p in coarse)
    with pytest.raises(LofaError):
        faces.prompt(0, 0, content="ball-bouncing")


def _changed_pixels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pixels (over all frames) whose colour differs clearly (> 0.2 in some channel), averaged over samples."""
    return ((a - b).abs().amax(-3 if a.ndim == 4 else 1) > 0.2).flatten(1).sum(1).float().mean()


def test_cases_are_distinct_pictures(world):
    """With appearance held fixed (same seed, same batch layout), every pair of cases differs in a clearly
    visible patch (at least 8 pixels; smoke sizes are 16 x 16)."""
    x = [world.render([i] * 2, seed=7) for i in range(len(world.cases))]
    for i, j in itertools.combinations(range(len(x)), 2):
        assert _changed_pixels(x[i], x[j]) >= 8, (world.cases[i].name, world.cases[j].name)


@pytest.mark.parametrize("task", WORLD_TASKS)
def test_one_component_changes_the_picture(task):
    """Mini: cases that differ in one component only still differ visibly under fixed appearance."""
    w = make_world(task, "mini")
    for base in w.cases[:3]:
        for k in base.attrs:
            other = [c for c in w.cases if [j for j in c.attrs if c.attrs[j] != base.attrs[j]] == [k]]
            for c in other[:1]:
                a, b = w.render([base.id] * 2, seed=1), w.render([c.id] * 2, seed=1)
                assert _changed_pixels(a, b) >= 20, (base.name, c.name)


def test_pose_condition_follows_the_joint_motion():
    w = make_world("actions", "smoke")
    ids = list(range(len(w.cases)))
    a = w.condition(ids, seed=0)
    assert torch.equal(a, w.condition(ids, seed=1))          # canonical: the pose sequence is the case
    jittered = make_world("actions", "smoke", overrides={"pose_jitter": 0.03})
    assert not torch.equal(jittered.condition(ids, seed=0), jittered.condition(ids, seed=1))
    assert len({c.flatten().sum().item() for c in a}) == len(ids)   # every case has its own pose sequence
    # when the skeleton moves, the rendered figure moves: per-frame motion energy agrees over time
    energy = lambda v: (v[:, :, 1:] - v[:, :, :-1]).abs().mean((1, 3, 4))           # [N, T-1]
    r = w.render(ids, seed=2)
    e_pose, e_render = energy(a), energy(r)
    e_pose, e_render = e_pose - e_pose.mean(1, keepdim=True), e_render - e_render.mean(1, keepdim=True)
    corr = (e_pose * e_render).sum(1) / (e_pose.norm(dim=1) * e_render.norm(dim=1) + 1e-8)
    assert corr.mean() > 0.5


def test_styles_reference_shows_other_content():
    from lofa.worlds.styles import REFERENCE_SHAPES, SHAPES

    assert not set(REFERENCE_SHAPES) & set(SHAPES)
    w = make_world("styles", "smoke")
    refs = w.condition([0, 0], seed=0), w.condition([0, 0], seed=1)
    assert not torch.equal(refs[0], refs[1])


@pytest.mark.parametrize("scale", ["mini", "full"])
def test_identities_are_far_apart(scale):
    from lofa.worlds.identities import SALIENT

    w = _world("identities", scale)
    keys = list(w.cases[0].attrs)

    def differing(names):   # [N, N] number of attributes among `names` in which two identities differ
        hot = torch.cat([torch.nn.functional.one_hot(torch.tensor([w.vocab[k].index(c.attrs[k]) for c in w.cases]),
                                                     len(w.vocab[k])) for k in names], 1).float()
        return len(names) - hot @ hot.T + 99 * torch.eye(len(w.cases))

    assert differing(keys).min() >= w.cfg.min_distance
    assert differing([k for k in keys if k in SALIENT]).min() >= 2


def test_bad_input_is_refused():
    with pytest.raises(LofaError):
        make_world("music")
    with pytest.raises(LofaError):
        make_world("actions", "smoke", overrides={"parts": ("tail",)})
    with pytest.raises(LofaError):
        make_world("actions", "smoke", overrides={"tempos": ("steady", "warp")})
    with pytest.raises(LofaError):
        make_world("styles", "smoke", overrides={"backgrounds": ("plain", "marble")})
    with pytest.raises(LofaError):
        make_world("styles", "smoke").render([0], seed=0, content=["cat-dancing"])
    with pytest.raises(LofaError):
        make_world("identities", "smoke").render([0], seed=0, context=["crown"])
    with pytest.raises(ValueError):
        make_world("actions", "smoke", overrides={"colour": 1})


PINNED = {  # (task, scale) -> _pin(world), computed with the code before the full worlds grew (tempo, more
    # backgrounds, 2600 identities); the shipped mini models depend on these worlds
    ("actions", "smoke"): ("4b89d8ac4ad475ad9cb05392da76faefe6543e51c45d866c2f3bf9661cb33944",
        [-3154.2726, 686.4905, -2613.6217, -3500.4609, -2468.1805, 3291.8115, -3933.3051, 2080.5342, -4630.9168,
         -8.2133, 32.072, 38.8678, 7.9542, 28.4298, -17.6996, 18.3692, 27.5331, 59.5243, -5226.2035, -5237.7828,
         -5206.3332, -5204.248, -5217.9042, -5218.7665, -5207.7911, -5209.5924, -5198.7276, 23.7595, 37.6522,
         40.9464, 29.2612, 40.9105, 36.0852, 35.3889, 50.6981, 54.8667]),
    ("actions", "mini"): ("d42358c0df40245809862837e0d6f6a7c45a119fe6a5a98a17784c4dc93b2964",
        [-12536.2246, 2693.2667, -10482.8828, -14115.8345, -9545.1633, 13119.1511, -15608.4681, 8451.418,
         -18646.8718, 80.3837, 22.0305, 109.1617, 193.3321, 105.6413, -91.3745, 155.4466, -163.0247, 203.6083,
         -21125.914, -21128.7682, -21130.0779, -21171.4477, -20917.0717, -21052.5863, -21007.4382, -21151.3745,
         -21121.2408, 263.3673, 238.1354, 262.0473, 225.7393, 194.796, 289.4509, 210.4649, 141.1188, 174.645]),
    ("styles", "smoke"): ("3cfb86bd326c235998882545d2556d8a09264546bb7c1390fa3c99e256d6d2c6",
        [3115.2822, 4095.6842, 3692.1554, 3680.4284, 3690.3477, 3502.502, -3567.2916, -3859.2833, -3775.2252,
         -36.1473, -45.4197, -22.4838, -50.4581, -76.9591, -32.741, 74.8299, 66.5236, 50.7671, 327.6134, 470.7458,
         496.9307, 375.1829, 394.506, 328.8919, -458.4668, -441.9313, -428.5367, -28.0859, -14.1974, -28.5185,
         -17.713, -5.5918, -3.8345, 26.7404, 22.1124, 28.1716]),
    ("styles", "mini"): ("4bc7ccf1153c07e02326d4e6e06c0e37195d770adfd0db2b14fcb482f68b73d4",
        [12468.778, 15638.7511, 17001.1893, 15358.9125, -15614.1983, -17659.4517, 16029.8686, 14891.4651, 20196.9128,
         -185.7459, -222.9724, -86.2238, -59.0638, 74.05, 183.0152, -46.2929, -114.868, -196.6469, 1315.8518,
         1666.7417, 2273.158, 1571.5038, -1669.7705, -1534.3029, 1092.7653, 2078.559, 1778.7276, -21.333, 1.8827,
         -76.0782, -56.4113, 79.2711, -36.9728, -81.5299, 24.8797, -65.6179]),
    ("identities", "smoke"): ("d295f2ecf90c411d4a24af7766e465854a7d92ac75c2c4ef9975bfb6ceeb3aad",
        [-48.3906, 123.9304, -341.8344, -91.5547, -80.306, -185.7114, -254.3736, -170.0369, -177.9045, -19.129,
         -0.0704, -10.608, 20.0527, -14.2849, 17.376, -14.2317, -1.3383, 8.3661, 310.1804, 431.7346, 304.5128,
         345.9926, 192.2594, 327.419, 291.3857, 223.1835, 303.2932, 3.7768, 4.4862, 2.1606, 1.5561, -8.4993, -1.5487,
         -0.1399, -3.1744, -0.1055]),
    ("identities", "mini"): ("c97b95cde9ac3ac0c8729656920fe57866d3a1c9d9aea38bc35ec5a129103c65",
        [-185.2988, -36.287, -704.6573, -90.3226, 256.2435, -707.5142, -1045.982, -916.9659, -881.6908, 31.3597,
         8.4299, -36.9191, -37.8555, -28.6031, 15.8746, 10.0408, 8.6195, 36.5354, 1255.4497, 1165.8727, 1634.0972,
         1321.871, 1472.1588, 1745.7157, 762.4325, 799.0073, 1395.324, 25.179, 36.3361, 14.8732, 30.1292, 15.361,
         -2.6042, 37.5272, 59.6827, 17.7753]),
}


def _pin(w) -> tuple[str, list[float]]:
    """What a world produces, condensed: sha256 of its config repr (it fingerprints the shipped evaluators), cases
    (name, attrs, coarse, split), coarse names, every fine prompt, coarse prompts and sample() captions; and the
    sum and a random projection of nine renders and conditions (floats, compared with a tolerance so that another
    CPU's last-bit rounding does not count as a change)."""
    n = len(w.cases)
    text = {"cfg": repr(w.cfg), "coarse_names": w.coarse_names,
            "cases": [(c.name, sorted((k, str(v)) for k, v in c.attrs.items()), c.coarse, c.split) for c in w.cases],
            "prompts": [[w.prompt(c.id, v, s) for s in ("train", "eval") for v in range(w.n_prompts(s))]
                        for c in w.cases],
            "coarse": [w.coarse_prompt(k, v) for k in range(len(w.coarse_names)) for v in range(6)],
            "sample": w.sample([0, n // 2, n - 1], seed=5)[1]}
    sha = hashlib.sha256(json.dumps(text).encode()).hexdigest()
    ids = sorted({37 * i % n for i in range(8)} | {n - 1})   # spread over every component
    stats = []
    for x in (w.render(ids, seed=0), w.condition(ids, seed=0)):
        x = x.double().flatten(1)
        weight = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        stats += x.sum(1).tolist() + (x * weight).sum(1).tolist()
    return sha, stats


@pytest.mark.parametrize("task", WORLD_TASKS)
@pytest.mark.parametrize("scale", ["smoke", "mini"])
def test_smoke_and_mini_worlds_are_pinned(task, scale):
    """Growing `full` must leave the smoke and mini worlds exactly as they were: cases, names, attributes, split,
    prompts, config repr (the shipped mini evaluators' fingerprint) and renders."""
    sha, stats = _pin(make_world(task, scale))
    want_sha, want_stats = PINNED[(task, scale)]
    assert sha == want_sha, f"{task} {scale}: cases, prompts or config repr changed"
    assert stats == pytest.approx(want_stats, abs=1e-2), f"{task} {scale}: renders or conditions changed"


NEW_FULL_COMPONENTS = [("actions", "tempo", ("steady", "speeding_up", "slowing_down")),
                       ("styles", "background", ("plain", "grid", "ruled", "dotted", "vignette"))]


@pytest.mark.parametrize("task, component, values", NEW_FULL_COMPONENTS)
def test_full_only_components(task, component, values):
    """The component that makes `full` big enough is off at smoke / mini, spans `values` at full, and each value
    renders visibly differently (fixed appearance) in clips and conditions and is named by its own prompts."""
    full = _world(task, "full")
    assert full.vocab[component] == values and all(c.attrs[component] in values for c in full.cases)
    for scale in ("smoke", "mini"):
        assert len(make_world(task, scale).vocab.get(component, ())) <= 1
    margin = {"actions": 0.004, "styles": 0.03}[task]   # mean |difference| in [-1, 1] units; measured minima
    for base in full.cases[::len(full.cases) // 6]:     # 0.008 (tempo) and 0.06 (background) over 60 bases
        group = [c for c in full.cases
                 if all(c.attrs[k] == v for k, v in base.attrs.items() if k != component)]
        assert [c.attrs[component] for c in group] == list(values)
        clips = [full.render([c.id] * 2, seed=1) for c in group]
        conds = [full.condition([c.id] * 2, seed=1) for c in group]
        for i, j in itertools.combinations(range(len(group)), 2):
            names = (group[i].name, group[j].name)
            assert (clips[i] - clips[j]).abs().mean() > margin, names
            assert _changed_pixels(clips[i], clips[j]) >= 20, names
            assert (conds[i] - conds[j]).abs().mean() > margin * 0.75, names
        for split in ("train", "eval"):
            for v in range(full.n_prompts(split)):
                prompts = [full.prompt(c.id, v, split) for c in group]
                assert len(set(prompts)) == len(prompts), prompts
    prompts = [full.prompt(c.id, 0) for c in full.cases]   # and no two full cases share a phrasing
    assert len(set(prompts)) == len(prompts)


def test_steady_tempo_is_the_old_clock():
    """Listing tempo with its one value "steady" adds the attribute but renders exactly like no tempo at all, and
    only a preset that sets tempos prints them in the config repr."""
    plain = make_world("actions", "smoke")
    steady = make_world("actions", "smoke", overrides={"tempos": ("steady",)})
    assert [c.name for c in steady.cases] == [c.name for c in plain.cases]
    assert all(c.attrs["tempo"] == "steady" and "tempo" not in p.attrs for c, p in zip(steady.cases, plain.cases))
    ids = list(range(len(plain.cases)))
    assert torch.equal(steady.render(ids, seed=0), plain.render(ids, seed=0))
    assert torch.equal(steady.condition(ids, seed=0), plain.condition(ids, seed=0))
    assert "tempos" not in repr(plain.cfg) and "tempos=('steady',)" in repr(steady.cfg)
    assert "tempos=" in repr(_world("actions", "full").cfg)


def _gallery(scale: str = "mini") -> None:
    """Per task a PNG grid: rows = cases, columns = frames of two renders and the condition."""
    import numpy as np
    from PIL import Image

    def tile(img):   # [3, H, W] in [-1, 1] -> uint8 [4H, 4W, 3] with a 1 px border
        a = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        return np.pad(np.kron(a, np.ones((4, 4, 1), np.uint8)), ((1, 1), (1, 1), (0, 0)), constant_values=128)

    for task in WORLD_TASKS:
        w = make_world(task, scale)
        ids = torch.randperm(len(w.cases), generator=torch.Generator().manual_seed(0))[:10].tolist()
        x1, x2, c = w.render(ids, seed=0), w.render(ids, seed=1), w.condition(ids, seed=0)
        rows = []
        for i in range(len(ids)):
            if w.modality == "video":
                cells = list(x1[i].unbind(1)) + list(x2[i].unbind(1))[:4]
                cells += list(c[i].unbind(1)) if c.ndim == 5 else [c[i]]
            else:
                cells = [c[i]] + list(w.render([ids[i]] * 6, seed=i).unbind(0))
            rows.append(np.concatenate([tile(t) for t in cells], 1))
            print(task, ids[i], w.cases[ids[i]].name, "|", w.prompt(ids[i], 0))
        Image.fromarray(np.concatenate(rows, 0)).save(f"/tmp/worlds_gallery_{task}.png")


if __name__ == "__main__":
    import sys

    _gallery(*sys.argv[1:])


def test_empty_phrases_leave_no_dangling_punctuation():
    from lofa.worlds.world import _tidy

    assert _tidy("sunset palette, striped texture, thin outlines, : a ball") == \
        "sunset palette, striped texture, thin outlines: a ball"
    assert _tidy("a ,  , b") == "a, b"
